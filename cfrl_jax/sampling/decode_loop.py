"""The compiled decode loop: one jitted prefill, then a lax.while_loop over a preallocated KV cache.

sample_padded runs on bucketed shapes (prompt_batch): the prefill writes slots [0, P) of the
cache and computes logits at the last prompt column only; step t writes slot P + t - 1 for the
whole batch and exits as soon as every row has stopped. On CPU the loop runs in segments, each
attending over a cache just long enough for its last step (decode_windows).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cfrl_jax.kernels import cpu_decode
from cfrl_jax.models import qwen
from cfrl_jax.models.qwen import Params, QwenConfig
from cfrl_jax.sampling import token_choice
from cfrl_jax.sampling.decode_layout import DecodeParams, grow_cache, init_layer_kv, unroll_layers_default
from cfrl_jax.sampling.unrolled_forward import (HEAD_WEIGHT_MAJOR_MAX_ROWS, cached_forward, greedy_head,
                                                head_logits, kernel_product)


class SampleOutput(NamedTuple):
  """A batch of completions; all arrays (B, N), N = max_new_tokens.

  tokens: int32 completion tokens, pad_id after the stop token (and wherever mask == 0).
  mask: int32, 1 for generated tokens up to and including the stop token.
  logprobs: float32 log pi(token | prefix) under the raw policy at temperature 1 (0 where mask == 0).
  sample_logprobs: float32 log-prob under the distribution actually sampled from (temperature,
    top-k, top-p applied; 0 for greedy, a point mass; 0 where mask == 0).
  """
  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array
  sample_logprobs: jax.Array


# The decode loop attends over the whole preallocated cache at every step, so a step's attention
# costs the final length P + N - 1 however few tokens exist yet. Run it instead in segments, each
# over a cache just long enough for its last step (grown between segments): with K equal segments
# the mean length attended falls from P + N to about P + N/2 + N/(2K). Each segment compiles its
# own loop body, and growing the cache briefly holds the old and the new one, so the default (CPU
# only, where the XLA attention over the cache is a large share of a many-row step) stops at
# MAX_DECODE_SEGMENTS and keeps segments at least MIN_SEGMENT_STEPS long: the saving shrinks as
# 1/K while the compiles and copies grow with K.
MAX_DECODE_SEGMENTS = 4
MIN_SEGMENT_STEPS = 32


def decode_segments_default(max_new_tokens: int, attention: str = 'xla') -> int:
  """How many segments the decode loop runs in by default: on CPU with the XLA attention up to
  MAX_DECODE_SEGMENTS of at least MIN_SEGMENT_STEPS steps; 1 on accelerators (whose memory is
  scarcer; see above) and with attention='kernel', which reads only the slots written so far."""
  if jax.default_backend() != 'cpu' or attention == 'kernel':
    return 1
  return int(min(MAX_DECODE_SEGMENTS, max(1, (max_new_tokens - 1) // MIN_SEGMENT_STEPS)))


def decode_windows(prompt_len: int, max_new_tokens: int, segments: int) -> tuple[int, ...]:
  """Cache slots of each decode segment: increasing, the last = prompt_len + max_new_tokens - 1.

  Step t (1 <= t < max_new_tokens) writes slot prompt_len + t - 1 and attends over the slots
  before it, so a segment with W slots runs the steps t <= W - prompt_len. The N - 1 steps split as
  evenly as the count allows (at most one segment per step).
  """
  steps = max_new_tokens - 1
  k = max(1, min(int(segments), steps))
  return tuple(prompt_len + -(-steps * j // k) for j in range(1, k + 1)) if steps else (prompt_len,)


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'greedy', 'top_k', 'use_top_p',
                                             'unroll_layers', 'segments', 'attention', 'kernel_products'))
def sample_padded(model: Params | DecodeParams, prompt_tokens, prompt_mask, live_rows, key, temperature, top_p,
                   stop_token_ids, pad_id, *, cfg: QwenConfig, max_new_tokens: int, greedy: bool,
                   top_k: int, use_top_p: bool, unroll_layers: bool | None = None,
                   segments: int | None = None, attention: str = 'xla',
                   kernel_products: bool = False) -> SampleOutput:
  """The compiled sampler on bucketed shapes. live_rows (B,) bool: False for dummy rows.

  model: prepare_decode's DecodeParams with unroll_layers (default on CPU), else the params tree.
  segments: how many segments the decode loop runs in (decode_windows; default
  decode_segments_default). attention: how the unrolled sampler's decode step attends
  (decode_layout.attention_form; the scanned sampler always uses XLA ops). kernel_products: the decode step's
  matrix products (layers and head) run the compiled kernels (see unrolled_forward.kernel_products; unrolled only).
  """
  B, P = prompt_tokens.shape
  N = max_new_tokens
  if unroll_layers is None:
    unroll_layers = unroll_layers_default()
  if unroll_layers != isinstance(model, DecodeParams):
    raise ValueError('the unrolled sampler takes prepare_decode(cfg, params); the scanned one the params.')
  choose = functools.partial(token_choice.choose, temperature=temperature, top_p=top_p, greedy=greedy,
                             top_k=top_k, use_top_p=use_top_p)
  is_stop = lambda t: jnp.any(t[:, None] == stop_token_ids[None, :], axis=-1)
  keys = jax.random.split(key, N)
  if kernel_products and attention != 'kernel':
    raise ValueError(f"kernel_products runs the decode step's products in the compiled CPU kernels, which needs "
                     f"attention='kernel' (got {attention!r}); see unrolled_forward.kernel_products.")
  if not unroll_layers:
    attention, kernel_products = 'xla', False
  windows = decode_windows(P, N, decode_segments_default(N, attention) if segments is None else segments)

  # Prefill: logits only at the last column (every prompt ends there), not over all P positions.
  if unroll_layers:
    head = model.head
    forward = functools.partial(cached_forward, cfg, model, attention=attention, kernel_products=kernel_products)
    phi, cache = forward(prompt_tokens, qwen.positions_from_mask(prompt_mask),
                         init_layer_kv(cfg, B, windows[0], attention), mask=prompt_mask)

    cos, sin = qwen.rope_tables(jnp.arange(P + N)[None], cfg.head_dim, cfg.rope_theta)

    def step(tok, pos, cache):
      phi, cache = forward(tok[:, None], pos[:, None], cache, rope=(cos[0], sin[0]))
      return phi[:, 0], cache
  else:
    backbone, head = model['backbone'], qwen.head_params(cfg, model)
    cache = qwen.init_cache(cfg, B, windows[0])
    phi, cache = qwen.features(cfg, backbone, prompt_tokens, prompt_mask, cache=cache)

    def step(tok, pos, cache):
      phi, cache = qwen.features(cfg, backbone, tok[:, None], jnp.ones((B, 1), jnp.int32),
                                 positions=pos[:, None], cache=cache)
      return phi[:, 0], cache

  tok, lp, slp = choose(qwen.logits(cfg, head, phi[:, -1]), keys[0])
  tok = jnp.where(live_rows, tok, pad_id)
  live = live_rows.astype(jnp.int32)
  out = SampleOutput(
      tokens=jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok),
      mask=jnp.zeros((B, N), jnp.int32).at[:, 0].set(live),
      logprobs=jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp * live),
      sample_logprobs=jnp.zeros((B, N), jnp.float32).at[:, 0].set(slp * live))
  done = ~live_rows | is_stop(tok)
  lengths = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)

  def body(carry):
    t, tok, done, cache, out = carry
    # Token t-1 sits at position len + t - 1; finished rows keep feeding pads that nobody reads.
    phi, cache = step(tok, lengths + t - 1, cache)
    if kernel_products:   # the head streamed by the kernel; (B, V) logits
      z = kernel_product(phi, head['w'])
      if greedy:
        new, lp = cpu_decode.greedy_pick_rows(z)
        slp = jnp.zeros_like(lp)
      else:
        new, lp, slp = choose(z, keys[t])
    elif greedy and attention == 'kernel' and B > HEAD_WEIGHT_MAJOR_MAX_ROWS:
      new, lp = greedy_head(cfg, head, phi)
      slp = jnp.zeros_like(lp)
    else:
      z = head_logits(cfg, head, phi, weight_major=unroll_layers and B <= HEAD_WEIGHT_MAJOR_MAX_ROWS)
      new, lp, slp = choose(z, keys[t])
    live = ~done
    new = jnp.where(live, new, pad_id)
    livef = live.astype(jnp.float32)
    out = SampleOutput(
        tokens=out.tokens.at[:, t].set(new),
        mask=out.mask.at[:, t].set(live.astype(jnp.int32)),
        logprobs=out.logprobs.at[:, t].set(lp * livef),
        sample_logprobs=out.sample_logprobs.at[:, t].set(slp * livef))
    return t + 1, new, done | is_stop(new), cache, out

  carry = (jnp.int32(1), tok, done, cache, out)
  for j, slots in enumerate(windows):
    if j:
      t, tok, done, cache, out = carry
      carry = (t, tok, done, grow_cache(cfg, cache, slots, attention), out)
    # This segment's cache holds the steps t <= slots - P (the last segment's: t <= N - 1).
    cond = lambda carry, last=slots - P: (carry[0] <= last) & ~jnp.all(carry[2])
    carry = jax.lax.while_loop(cond, body, carry)
  return carry[-1]


def compile_cache_size() -> int:
  """How many shape/static-arg variants of the sampler have been compiled (for tests and logs)."""
  return sample_padded._cache_size()  # pylint: disable=protected-access
