"""Training the from-scratch byte-level BPE tokenizer (cfrl_jax/tasks/tokenizer_training.py)."""
import re

import pytest
import transformers

from cfrl_jax.tasks import arithmetic, task_config
from cfrl_jax.tasks.tokenizer_training import EOS_TOKEN, UNK_TOKEN, train_tokenizer


@pytest.fixture(scope='module')
def texts():
  return [p + c for p, c in arithmetic.pretraining_corpus(task_config('arithmetic'), 600, seed=0)]


@pytest.fixture(scope='module')
def tok_dir(texts, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tok'))
  train_tokenizer(texts, path)
  return path


@pytest.fixture(scope='module')
def tok(tok_dir):
  return transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


def test_loads_offline_with_eos_and_pad(tok):
  assert 257 < len(tok) <= 384  # an upper bound: BPE stops when every word is one token
  assert tok.eos_token == tok.pad_token == EOS_TOKEN
  assert tok.eos_token_id == tok.pad_token_id == 0
  assert tok.bos_token_id is None and tok.padding_side == 'left'
  assert tok('7 + 5')['input_ids'][-1] != 0  # no eos appended by default


@pytest.mark.parametrize('text', [
    'Question: Ann has 7 apples. Then she buys 5 more and gives away 3. How many apples does Ann have now?'
    '\nAnswer: 7 + 5 = 12. 12 - 3 = 9. The answer is 9.',
    ' <<13+4=17>><<17-10=7>> #### 7', 'héllo wörld € 1,000.50 \t\n 😀', '', '0123456789' * 3,
])
def test_round_trip(tok, text):
  assert tok.decode(tok(text)['input_ids']) == text


def test_every_digit_is_its_own_token(tok, texts):
  for text in texts[:200] + ['x 1234567890 y', '12,345.67']:
    tokens = tok.convert_ids_to_tokens(tok(text)['input_ids'])
    for t in tokens:
      assert not re.search(r'[0-9]', t) or re.fullmatch(r'[0-9]', t), (t, text)
    assert sum(len(t) for t in tokens if t.isdigit()) == len(re.findall(r'[0-9]', text))
  vocab = tok.get_vocab()
  assert all(d in vocab for d in '0123456789')


def test_eos_is_special_and_batches_pad_left(tok):
  ids = tok('#### 9' + EOS_TOKEN)['input_ids']
  assert ids[-1] == 0 and ids.count(0) == 1
  batch = tok(['#### 9', ' 1 + 1 = 2. The answer is 2.'], padding=True)
  assert batch['input_ids'][0][0] == 0 and batch['attention_mask'][0][0] == 0
  assert batch['attention_mask'][1] == [1] * len(batch['input_ids'][1])


def test_deterministic(texts, tok_dir, tmp_path):
  train_tokenizer(texts, str(tmp_path))
  with open(f'{tok_dir}/tokenizer.json', 'rb') as a, open(tmp_path / 'tokenizer.json', 'rb') as b:
    assert a.read() == b.read()


def test_seen_alphabet_variant_is_small_and_marks_unknown_characters(texts, tmp_path):
  train_tokenizer(texts, str(tmp_path), vocab_size=160)  # auto: too small for the 256 bytes
  small = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  assert len(small) <= 160 and small.eos_token_id == 0
  assert small.decode(small(texts[0])['input_ids']) == texts[0]
  assert UNK_TOKEN in small.decode(small('snow ü')['input_ids'])  # not silently dropped


def test_merges_shorten_the_text(tok, texts):
  n_tokens = sum(len(tok(t)['input_ids']) for t in texts[:50])
  n_bytes = sum(len(t.encode()) for t in texts[:50])
  assert n_tokens < 0.6 * n_bytes


def test_bad_arguments(texts, tmp_path):
  with pytest.raises(ValueError, match='vocab_size=200 is below'):
    train_tokenizer(texts, str(tmp_path), vocab_size=200, full_byte_alphabet=True)
  with pytest.raises(ValueError, match=r'vocab_size=20 cannot hold the \d+ distinct characters'):
    train_tokenizer(texts, str(tmp_path), vocab_size=20)
  with pytest.raises(ValueError, match='at least one text'):
    train_tokenizer([], str(tmp_path))
  with pytest.raises(TypeError, match=r'texts\[1\]'):
    train_tokenizer(['a', 3], str(tmp_path))
