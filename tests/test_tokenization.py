"""Prompt encoding / completion decoding (cfrl_jax/tokenization.py) on the tiny offline tokenizer."""
import numpy as np
import pytest

from cfrl_jax import tokenization
from cfrl_jax.models import qwen


@pytest.fixture(scope='module')
def tok(tiny_tokenizer_dir):
  return tokenization.load_tokenizer(tiny_tokenizer_dir)


def test_left_padded_encoding_matches_the_tokenizer(tok):
  texts = ['Hello world!', 'What is 12 + 34? The answer is', 'fox']
  tokens, mask = tokenization.encode_prompts(tok, texts)
  assert tokens.dtype == mask.dtype == np.int32
  assert tokens.shape == mask.shape == (3, max(len(tok.encode(t)) for t in texts))
  for row, text in enumerate(texts):
    ids = tok.encode(text)
    assert mask[row].tolist() == [0] * (tokens.shape[1] - len(ids)) + [1] * len(ids)
    assert tokens[row, mask[row] == 1].tolist() == ids
    assert np.all(tokens[row, mask[row] == 0] == tokenization.pad_id(tok))


def test_pad_to_widens_and_rejects_too_short(tok):
  tokens, mask = tokenization.encode_prompts(tok, ['fox'], pad_to=12)
  assert tokens.shape == (1, 12) and mask.sum() == len(tok.encode('fox'))
  with pytest.raises(ValueError, match='pad_to=1 is shorter'):
    tokenization.encode_prompts(tok, ['Hello world!'], pad_to=1)


def test_chat_template_wraps_a_user_turn_and_the_generation_prompt(tok):
  tokens, mask = tokenization.encode_prompts(tok, ['hi'], chat_template=True, system_prompt='Be brief.')
  text = tok.decode(tokens[0, mask[0] == 1])
  assert text == ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n'
                  '<|im_start|>assistant\n')
  # Special tokens of the template are single ids, not spelled out in bytes.
  assert tokens[0, mask[0] == 1].tolist().count(tok.convert_tokens_to_ids('<|im_start|>')) == 3


def test_chat_template_missing_is_a_clear_error(tok):
  template, tok.chat_template = tok.chat_template, None
  try:
    with pytest.raises(ValueError, match='has no chat template'):
      tokenization.encode_prompts(tok, ['hi'], chat_template=True)
  finally:
    tok.chat_template = template
  with pytest.raises(ValueError, match='system_prompt needs chat_template=True'):
    tokenization.encode_prompts(tok, ['hi'], system_prompt='x')


def test_bad_prompt_lists_are_errors(tok):
  with pytest.raises(TypeError, match='list of strings'):
    tokenization.encode_prompts(tok, 'hi')
  with pytest.raises(ValueError, match='empty list'):
    tokenization.encode_prompts(tok, [])
  with pytest.raises(ValueError, match='prompt 1 .* zero tokens'):
    tokenization.encode_prompts(tok, ['a', ''])


def test_decode_keeps_masked_tokens_and_drops_the_final_stop(tok):
  eos = tok.eos_token_id
  a, b = tok.encode(' the lazy dog'), tok.encode(' 46.')
  n = len(a) + 3
  tokens = np.full((3, n), eos, np.int32)
  mask = np.zeros((3, n), np.int32)
  tokens[0, :len(a)] = a
  mask[0, :len(a)] = 1                       # ran out of budget: no stop token
  tokens[1, :len(b)] = b
  mask[1, :len(b) + 1] = 1                   # stopped: the eos at len(b) is masked in
  tokens[2, :2] = [eos, 5]
  mask[2, :1] = 1                            # stopped immediately
  assert tokenization.decode_completions(tok, tokens, mask) == [' the lazy dog', ' 46.', '']
  # An explicit stop set that excludes eos keeps it.
  assert tokenization.decode_completions(tok, tokens, mask, stop_token_ids=[2])[1] == ' 46.<|endoftext|>'


def test_decode_shape_mismatch_is_an_error(tok):
  with pytest.raises(ValueError, match='same'):
    tokenization.decode_completions(tok, np.zeros((2, 3), int), np.zeros((2, 4), int))


def test_pad_and_stop_ids(tok):
  assert tokenization.pad_id(tok) == tok.pad_token_id == 0
  cfg = qwen.QwenConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, eos_token_id=(2, 0))
  assert tokenization.stop_ids(tok, cfg) == (0, 2)
  assert tokenization.stop_ids(tok) == (0,)


def test_load_tokenizer_from_a_checkpoint_dir_and_bad_paths(tiny_qwen2_dir, tmp_path):
  assert tokenization.load_tokenizer(tiny_qwen2_dir).eos_token == '<|endoftext|>'
  with pytest.raises(ValueError, match='no usable tokenizer files'):
    tokenization.load_tokenizer(tmp_path)
  with pytest.raises(ValueError, match='neither a local directory nor a reachable'):
    tokenization.load_tokenizer(str(tmp_path / 'missing' / 'dir'))
