"""Training a small byte-level BPE tokenizer from a task's text, for models pretrained from scratch on it.

The tokenizer it writes is then used like any other through cfrl_jax/tokenization.py (encoding
prompts and decoding completions for a model).

    texts = [p + c for p, c in arithmetic.pretraining_corpus(config, 20_000)]
    train_tokenizer(texts, '/tmp/tok')                               # vocab 384: 256 bytes + 127 merges
    tok = transformers.AutoTokenizer.from_pretrained('/tmp/tok')      # offline

Every digit is its own token: a Digits(individual_digits=True) pre-tokenizer splits digits
apart before byte-level BPE, so no merge can ever span two digits or a space and a
digit, and a number's tokens are its digits (models then learn arithmetic on digits
rather than on an arbitrary segmentation). '<|endoftext|>' (id 0) is both eos and pad,
padding is on the left (the sampler's layout), and there is no bos, as in Qwen.

full_byte_alphabet=True puts all 256 byte symbols in the vocabulary, so any text
round-trips exactly (vocab_size = 257 + the number of merges). With False, only the
characters of the training texts are in the alphabet (vocab_size=160 gives the arithmetic
task about as many merges as 384 with the full alphabet; CALIBRATION.md used 160) and an
'<|unk|>' token stands for every other character, visibly rather than silently dropping
it. The default (None) picks True when vocab_size leaves room for 64 merges beyond the
256 bytes, else False. Training is deterministic for a given list of texts.
"""
from __future__ import annotations

import os
from typing import Iterable

EOS_TOKEN = '<|endoftext|>'
UNK_TOKEN = '<|unk|>'
MIN_MERGES = 64


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 384,
                    full_byte_alphabet: bool | None = None, extra_special_tokens: tuple[str, ...] = ()):
  """Trains byte-level BPE on `texts`, saves a transformers tokenizer directory in out_dir, returns it.

  vocab_size is an upper bound: training stops early once every word of the corpus is a
  single token, so size a model's embedding from len(tokenizer). Returns the transformers
  PreTrainedTokenizerFast (eos = pad = '<|endoftext|>' = id 0).
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  texts = list(texts)
  if not texts:
    raise ValueError('train_tokenizer needs at least one text.')
  bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
  if bad is not None:
    raise TypeError(f'texts[{bad}] is a {type(texts[bad]).__name__}, not a str.')
  if full_byte_alphabet is None:
    full_byte_alphabet = vocab_size >= 256 + 1 + len(extra_special_tokens) + MIN_MERGES
  specials = [EOS_TOKEN] + ([] if full_byte_alphabet else [UNK_TOKEN]) + list(extra_special_tokens)
  alphabet = pre_tokenizers.ByteLevel.alphabet() if full_byte_alphabet else []
  minimum = len(specials) + (len(alphabet) if full_byte_alphabet else 1)
  if vocab_size < minimum:
    raise ValueError(f'vocab_size={vocab_size} is below the {minimum} tokens the alphabet and special '
                     'tokens need' + (' (use full_byte_alphabet=False for a smaller vocabulary).'
                                      if full_byte_alphabet else '.'))
  tok = Tokenizer(models.BPE(unk_token=None if full_byte_alphabet else UNK_TOKEN))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                show_progress=False)
  tok.train_from_iterator(texts, trainer, length=len(texts))
  if tok.get_vocab_size() > vocab_size:  # the trainer keeps every character it saw, whatever the size
    raise ValueError(f'vocab_size={vocab_size} cannot hold the {tok.get_vocab_size() - len(specials)} distinct '
                     f'characters of the texts plus {len(specials)} special tokens; raise vocab_size.')
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, padding_side='left',
      **({} if full_byte_alphabet else {'unk_token': UNK_TOKEN}))
  if fast.eos_token_id != 0:
    raise AssertionError(f'eos id {fast.eos_token_id}; expected 0.')
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  return fast
