"""The prompt batch as the compiled sampler takes it: checked, bucketed and padded.

Batch size and prompt length are rounded up to buckets (powers of two, then multiples of 64
rows / 128 columns), so a run with varying batch and prompt sizes compiles a handful of times;
padded rows are dummies that start finished and are stripped on return.
"""
from __future__ import annotations

from typing import Iterable

import jax.numpy as jnp
import numpy as np

from cfrl_jax.models.qwen import QwenConfig


# Buckets: powers of two up to the step, then multiples of it; prompts at least MIN_LENGTH_BUCKET wide.
BATCH_BUCKET_STEP = 64
LENGTH_BUCKET_STEP = 128
MIN_LENGTH_BUCKET = 8


def bucket_size(n: int, step: int, minimum: int = 1) -> int:
  """n rounded up to a power of two (at least `minimum`) up to `step`, then to a multiple of step."""
  if n <= step:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())
  return -(-n // step) * step


def min_batch_bucket(cfg: QwenConfig, unroll_layers: bool) -> int:
  """The fewest rows the unrolled sampler runs: 2 in a 16-bit compute dtype, else 1.

  XLA:CPU multiplies a single bfloat16 row by a matrix on a path many times slower than two rows,
  so a one-prompt bf16 call decodes a dummy second row, which makes its steps faster overall.
  Bucketing changes no sample.
  """
  return 2 if unroll_layers and jnp.dtype(cfg.compute_dtype).itemsize == 2 else 1


def batch_bucket(cfg: QwenConfig, rows: int, unroll_layers: bool, shards: int = 1) -> int:
  """The rows the sampler compiles for `rows` prompts split over `shards` devices.

  bucket_size(rows, BATCH_BUCKET_STEP) rounded up to a multiple of shards, with at least
  min_batch_bucket rows on every shard (the products run per shard).
  """
  least = min_batch_bucket(cfg, unroll_layers)
  padded = -(-bucket_size(rows, BATCH_BUCKET_STEP, least) // shards) * shards
  return max(padded, least * shards)


def check_prompts(cfg: QwenConfig, prompt_tokens, prompt_mask) -> tuple[np.ndarray, np.ndarray]:
  """(B, P) prompts as the sampler takes them: int32 tokens and a 0/1 int32 mask, LEFT-padded, every
  row with a real token, ids inside the vocabulary; otherwise a ValueError that names the problem."""
  tokens = np.asarray(prompt_tokens)
  mask = np.asarray(prompt_mask)
  if tokens.ndim != 2 or tokens.shape != mask.shape:
    raise ValueError(f'prompt_tokens {tokens.shape} and prompt_mask {mask.shape} must both be (B, P).')
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'prompt_tokens must be integer token ids, got dtype {tokens.dtype}.')
  if tokens.size == 0:
    raise ValueError(f'empty prompt batch {tokens.shape}.')
  mask = (mask > 0).astype(np.int32)
  if np.any(mask.sum(-1) == 0):
    raise ValueError(f'prompt rows {np.flatnonzero(mask.sum(-1) == 0).tolist()} have no real token.')
  if np.any(np.diff(mask, axis=-1) < 0):
    raise ValueError('prompts must be LEFT-padded (mask 0...0 1...1 per row); use '
                     'tokenization.encode_prompts or move the padding to the left.')
  if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
    raise ValueError(f'prompt token ids must lie in [0, {cfg.vocab_size}); got range '
                     f'[{tokens.min()}, {tokens.max()}].')
  return tokens.astype(np.int32), mask


def check_decoding(*, max_new_tokens, temperature, top_k, top_p, greedy, decode_segments=None) -> None:
  """A ValueError naming the first decoding argument out of range (sampling ones only unless greedy)."""
  if int(max_new_tokens) < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens}; need at least 1.')
  if decode_segments is not None and (int(decode_segments) != decode_segments or decode_segments < 1):
    raise ValueError(f'decode_segments={decode_segments}; it must be a positive integer (None: the default).')
  if not greedy:
    if not temperature > 0:
      raise ValueError(f'temperature={temperature}; it must be > 0 (use greedy=True for argmax decoding).')
    if not 0 < top_p <= 1:
      raise ValueError(f'top_p={top_p}; it must lie in (0, 1] (1 disables nucleus filtering).')
    if top_k < 0:
      raise ValueError(f'top_k={top_k}; it must be >= 0 (0 disables top-k filtering).')


def pad_prompts(tokens, mask, rows: int, width: int, pad_id: int):
  """check_prompts' (B, P) arrays grown to (rows, width): more left padding, then dummy rows that copy
  row 0 (no all-padding row) and start finished. Returns (tokens, mask, live_rows (rows,) bool)."""
  B, P = tokens.shape
  tokens = np.concatenate([np.full((B, width - P), pad_id, np.int32), tokens], axis=1)
  mask = np.concatenate([np.zeros((B, width - P), np.int32), mask], axis=1)
  tokens = np.concatenate([tokens, np.repeat(tokens[:1], rows - B, axis=0)], axis=0)
  mask = np.concatenate([mask, np.repeat(mask[:1], rows - B, axis=0)], axis=0)
  return tokens, mask, np.arange(rows) < B


def stop_id_array(stop_token_ids: Iterable[int]) -> np.ndarray:
  """The distinct stop ids, int32, padded with -1 (never a token) to a multiple of 4 (at least 4),
  so a different number of stop ids rarely means a new compilation."""
  stops = sorted({int(t) for t in stop_token_ids})
  return np.asarray(stops + [-1] * (-len(stops) % 4 if stops else 4), np.int32)


def decoding_statics(cfg: QwenConfig, greedy: bool, top_k: int, top_p: float) -> tuple[bool, int, bool]:
  """The compiled sampler's static choices (greedy, top_k, use_top_p): filters that keep every token
  (top_k >= vocab, top_p = 1) and all filters under greedy compile away."""
  greedy = bool(greedy)
  top_k = 0 if greedy or int(top_k) >= cfg.vocab_size else int(top_k)
  return greedy, top_k, (not greedy) and float(top_p) < 1.0
