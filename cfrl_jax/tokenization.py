"""Text <-> left-padded token arrays for a model, through a transformers tokenizer (training a new
tokenizer from task text is cfrl_jax/tasks/tokenizer_training.py).

    tok = load_tokenizer('Qwen/Qwen2.5-0.5B-Instruct')        # or a local directory
    tokens, mask = encode_prompts(tok, ['What is 2+2?'], chat_template=True)   # (B, P) int32, left-padded
    texts = decode_completions(tok, out.tokens, out.mask)     # generated text, stop token dropped

Left padding puts every prompt's last token in the last column, which is what the sampler's
prefill and qwen.positions_from_mask expect.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

from cfrl_jax.models.qwen import QwenConfig


def load_tokenizer(path: str | os.PathLike):
  """transformers.AutoTokenizer from a local directory (offline), else from a hub id."""
  import transformers
  path = os.fspath(path)
  local = os.path.isdir(path)
  try:
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=local)
  except Exception as e:  # pylint: disable=broad-except
    where = ('the local directory has no usable tokenizer files (tokenizer.json / tokenizer_config.json)'
             if local else 'it is neither a local directory nor a reachable Hugging Face hub id')
    raise ValueError(f'cannot load a tokenizer from {path!r}: {where} ({type(e).__name__}: {e}).') from e


def pad_id(tokenizer) -> int:
  """The id used for padding: the tokenizer's pad token, else its eos token, else 0."""
  for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if tid is not None:
      return int(tid)
  return 0


def stop_ids(tokenizer, cfg: QwenConfig | None = None) -> tuple[int, ...]:
  """Token ids that end a completion: the tokenizer's eos plus cfg.eos_token_id (sorted, unique)."""
  ids = set()
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  if cfg is not None:
    ids.update(int(t) for t in cfg.eos_token_id)
  return tuple(sorted(ids))


def format_prompt(tokenizer, text: str, *, chat_template: bool = False,
                  system_prompt: str | None = None) -> str:
  """The exact string that is tokenised: the text itself, or the chat template applied to it."""
  if not chat_template:
    if system_prompt is not None:
      raise ValueError('system_prompt needs chat_template=True (plain prompts have no system turn).')
    return text
  if not getattr(tokenizer, 'chat_template', None):
    raise ValueError(f'chat_template=True but the tokenizer {getattr(tokenizer, "name_or_path", "")!r} '
                     'has no chat template; use chat_template=False (base models) or a tokenizer '
                     'with one (instruct models).')
  messages = ([{'role': 'system', 'content': system_prompt}] if system_prompt is not None else [])
  messages.append({'role': 'user', 'content': text})
  return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(tokenizer, texts: Sequence[str], *, chat_template: bool = False,
                   system_prompt: str | None = None, pad_to: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises prompts into LEFT-padded arrays.

  Returns tokens (B, P) int32 (pad_id(tokenizer) in the padding) and mask (B, P) int32 (1 on real
  tokens), P = the longest prompt (or pad_to, which must be >= it). With chat_template=True each
  text becomes one user turn (after an optional system turn) followed by the generation prompt.
  """
  if isinstance(texts, str):
    raise TypeError('encode_prompts takes a list of strings, not a single string.')
  if not texts:
    raise ValueError('encode_prompts got an empty list of prompts.')
  ids = []
  for i, text in enumerate(texts):
    s = format_prompt(tokenizer, text, chat_template=chat_template, system_prompt=system_prompt)
    # A chat template already spells out its special tokens; do not let the tokenizer add more.
    row = tokenizer(s, add_special_tokens=not chat_template)['input_ids']
    if not row:
      raise ValueError(f'prompt {i} ({text!r}) encodes to zero tokens; a prompt needs at least one.')
    ids.append(row)
  width = max(len(r) for r in ids)
  if pad_to is not None:
    if pad_to < width:
      raise ValueError(f'pad_to={pad_to} is shorter than the longest prompt ({width} tokens).')
    width = pad_to
  tokens = np.full((len(ids), width), pad_id(tokenizer), np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for i, row in enumerate(ids):
    tokens[i, width - len(row):] = row
    mask[i, width - len(row):] = 1
  return tokens, mask


def decode_completions(tokenizer, tokens, mask, *, stop_token_ids: Iterable[int] | None = None,
                       skip_special_tokens: bool = False) -> list[str]:
  """Text of each completion: tokens (B, N) where mask (B, N) == 1, minus a final stop token.

  stop_token_ids defaults to stop_ids(tokenizer). Ids beyond the tokenizer's vocabulary (padded
  model vocabularies) decode to nothing.
  """
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  if tokens.shape != mask.shape or tokens.ndim != 2:
    raise ValueError(f'tokens {tokens.shape} and mask {mask.shape} must be the same (B, N) shape.')
  stops = set(stop_ids(tokenizer) if stop_token_ids is None else (int(t) for t in stop_token_ids))
  out = []
  for row, m in zip(tokens, mask):
    ids = [int(t) for t in row[m > 0]]
    if ids and ids[-1] in stops:
      ids = ids[:-1]
    out.append(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))
  return out
