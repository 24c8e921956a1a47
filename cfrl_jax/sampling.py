"""Autoregressive sampling: one jitted prefill + decode loop over a preallocated KV cache.

    out = sample(cfg, params, prompt_tokens, prompt_mask, key, max_new_tokens=256,
                 temperature=1.0, top_p=0.95, stop_token_ids=(eos,), pad_id=pad)
    out.tokens (B, N), out.mask (B, N), out.logprobs (B, N), out.sample_logprobs (B, N)

Prompts are LEFT-padded (B, P) arrays (see cfrl_jax.tokenization.encode_prompts), so every
prompt ends in column P-1: the prefill writes slots [0, P) of the cache and step t of the decode
writes slot P + t - 1 for the whole batch. Positions come from the real-token counts, so padding
never shifts RoPE.

The Python wrapper rounds the batch size and the prompt length up to buckets (powers of two,
then multiples of 64 rows / 128 columns), so a run with varying batch and prompt sizes compiles a
handful of times; padded rows are dummies that start finished and are stripped on return.

The decode step is kept lean: logits are computed for one position per row (never over the
prompt again), the cache is updated in place inside one lax.while_loop that exits as soon as
every row has stopped, and on CPU the layers are unrolled over per-layer weights and per-layer
(B, Hkv, S, hd) caches (see unroll_layers_default and LayerKV).
"""
from __future__ import annotations

import functools
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfrl_jax.models import qwen
from cfrl_jax.models.qwen import Params, QwenConfig

BATCH_BUCKET_STEP = 64
LENGTH_BUCKET_STEP = 128
MIN_LENGTH_BUCKET = 8


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


def sampling_logits(logits, temperature=1.0, top_k: int = 0, top_p=1.0, *,
                    use_top_p: bool | None = None, top_p_candidates: int = 64):
  """The logits of the sampling distribution: z / T, then top-k, then top-p (HF's order).

  logits: (..., V). Tokens outside the kept set get -inf; softmax of the result is the
  distribution sampled from. top_k: static int, 0 = off (ties with the k-th value are kept).
  top_p: nucleus mass in (0, 1] (may be traced); keeps the smallest set of most likely tokens
  whose mass reaches top_p, after top-k (ties with the last kept value are kept). use_top_p:
  static switch; default (top_p < 1) needs a concrete top_p. top_p_candidates: the nucleus is
  first looked for among this many top tokens (a cheap top-k instead of a sort of the whole
  vocabulary); rows whose nucleus is larger fall back to an exact bisection on the threshold.
  """
  z = logits.astype(jnp.float32) / temperature
  V = z.shape[-1]
  if use_top_p is None:
    use_top_p = float(top_p) < 1.0
  neg_inf = jnp.array(-jnp.inf, z.dtype)
  if 0 < top_k < V:
    candidates = jax.lax.top_k(z, top_k)[0]          # (..., k), descending
    z = jnp.where(z < candidates[..., -1:], neg_inf, z)
    exhaustive = True                                # the k values hold all the remaining mass
  else:
    candidates = None
    exhaustive = False
  if not use_top_p:
    return z
  lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
  if candidates is None:
    k = min(V, max(1, int(top_p_candidates)))
    candidates = jax.lax.top_k(z, k)[0]
    exhaustive = k == V
  probs = jnp.exp(candidates - lse)
  mass_through = jnp.cumsum(probs, axis=-1)
  # Keep a token while the mass strictly above it is < top_p; the top token is always kept.
  n_keep = jnp.maximum(jnp.sum(mass_through - probs < top_p, axis=-1, keepdims=True), 1)
  cutoff = jnp.take_along_axis(candidates, n_keep - 1, axis=-1)
  if not exhaustive:
    covered = jnp.all(mass_through[..., -1] >= top_p)
    cutoff = jax.lax.cond(covered, lambda: cutoff, lambda: _nucleus_cutoff_bisection(z, lse, top_p))
  return jnp.where(z < cutoff, neg_inf, z)


def _nucleus_cutoff_bisection(z, lse, top_p, iterations: int = 40):
  """The largest logit value t with mass(z >= t) >= top_p, per row: z (..., V) -> (..., 1).

  Bisection keeps mass(z >= lo) >= top_p > mass(z >= hi); 40 halvings bring lo and hi to
  neighbouring float32 values, so {z >= lo} is exactly the nucleus.
  """
  probs = jnp.exp(z - lse)
  mass_at = lambda t: jnp.sum(jnp.where(z >= t, probs, 0.0), axis=-1, keepdims=True)
  lo = jnp.min(jnp.where(jnp.isfinite(z), z, jnp.inf), axis=-1, keepdims=True)
  top = jnp.max(z, axis=-1, keepdims=True)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) / 2
    ok = mass_at(mid) >= top_p
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, iterations, halve, (lo, top))
  return jnp.where(mass_at(top) >= top_p, top, lo)


def _gather(logp_all, tokens):
  return jnp.take_along_axis(logp_all, tokens[:, None], axis=-1)[:, 0]


def draw(key, z):
  """One token per row from softmax(z), z (B, V) (-inf allowed), by inverting the CDF.

  key: one PRNG key for the whole batch (row r uses fold_in(key, r)).

  One uniform per row instead of jax.random.categorical's V Gumbel draws (the per-step cost
  that dominated sampling on CPU). Tokens of probability 0 are never drawn.
  """
  probs = jax.nn.softmax(z, axis=-1)
  cdf = jnp.cumsum(probs, axis=-1)
  # Row r's uniform comes from fold_in(key, r): a row's draw does not depend on the batch size,
  # so bucketing (dummy rows) leaves the samples unchanged.
  rows = jnp.arange(z.shape[0])
  u = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), (1,)))(rows) * cdf[:, -1:]
  token = jnp.sum(cdf <= u, axis=-1)
  # Rounding can put u at the very top of the CDF: fall back to the last token that has mass.
  last = z.shape[-1] - 1 - jnp.argmax((probs > 0)[:, ::-1], axis=-1)
  return jnp.minimum(token, last).astype(jnp.int32)


def _choose(z, key, temperature, top_p, *, greedy, top_k, use_top_p):
  """Next tokens (B,) from logits z (B, V) plus their raw and sampling log-probs."""
  logp_raw = jax.nn.log_softmax(z, axis=-1)
  if greedy:
    tokens = jnp.argmax(z, axis=-1).astype(jnp.int32)
    return tokens, _gather(logp_raw, tokens), jnp.zeros(tokens.shape, jnp.float32)
  zf = sampling_logits(z, temperature, top_k, top_p, use_top_p=use_top_p)
  tokens = draw(key, zf)
  return tokens, _gather(logp_raw, tokens), _gather(jax.nn.log_softmax(zf, axis=-1), tokens)


class LayerKV(NamedTuple):
  """The decode loop's KV cache: one (B, Hkv, S, hd) array per layer for keys and for values.

  Separate per-layer arrays (not qwen.KVCache's stacked (L, B, S, Hkv, hd)) let each step update
  and read a layer's cache in place, and the (B, Hkv, S, hd) order is the one the one-token
  attention contracts over without transposing the cache every step.
  mask: (B, S) int32, 1 on slots holding real tokens; index: () int32, the next slot to write.
  """
  k: tuple
  v: tuple
  mask: jax.Array
  index: jax.Array


def _layer_kv_from_prefill(cache: qwen.KVCache, total_slots: int) -> LayerKV:
  """Moves a prefilled qwen.KVCache (L, B, P, Hkv, hd) into a LayerKV with total_slots slots."""
  L, B, P, Hkv, hd = cache.k.shape
  grow = lambda x: jnp.zeros((B, Hkv, total_slots, hd), x.dtype).at[:, :, :P].set(jnp.swapaxes(x, 1, 2))
  mask = jnp.zeros((B, total_slots), jnp.int32).at[:, :P].set(cache.mask)
  return LayerKV(tuple(grow(cache.k[l]) for l in range(L)), tuple(grow(cache.v[l]) for l in range(L)),
                 mask, cache.index)


def _decode_step(cfg: QwenConfig, embed, final_norm, layers: list, tokens, positions, kv: LayerKV):
  """One token per row through the decoder, layers unrolled over per-layer weights and caches.

  tokens, positions: (B,) int32. layers: per-layer parameter trees (unstacked). Returns
  (phi (B, d), kv with the new keys/values at slot kv.index).
  """
  B = tokens.shape[0]
  slot = kv.index
  key_mask = jax.lax.dynamic_update_slice(kv.mask, jnp.ones((B, 1), jnp.int32), (0, slot))
  cos, sin = qwen.rope_tables(positions[:, None], cfg.head_dim, cfg.rope_theta)
  h = jnp.take(embed, tokens[:, None], axis=0).astype(cfg.compute_dtype)
  ks, vs = list(kv.k), list(kv.v)
  for l, p in enumerate(layers):
    def kv_write(k, v, l=l):  # k, v: (B, 1, Hkv, hd) -> the layer's keys/values as (B, S, Hkv, hd)
      ks[l] = jax.lax.dynamic_update_slice(ks[l], jnp.swapaxes(k, 1, 2).astype(ks[l].dtype), (0, 0, slot, 0))
      vs[l] = jax.lax.dynamic_update_slice(vs[l], jnp.swapaxes(v, 1, 2).astype(vs[l].dtype), (0, 0, slot, 0))
      return jnp.swapaxes(ks[l], 1, 2).astype(k.dtype), jnp.swapaxes(vs[l], 1, 2).astype(v.dtype)
    h = qwen._layer(cfg, p, h, cos, sin, slot[None], key_mask, kv_write)  # pylint: disable=protected-access
  phi = qwen.rms_norm(h[:, 0], final_norm, cfg.rms_norm_eps)
  return phi, LayerKV(tuple(ks), tuple(vs), key_mask, slot + 1)


def unroll_layers_default() -> bool:
  """Whether the decode loop unrolls the layers by default: on CPU, where a scan over stacked
  weights copies every layer's weights out of the stack at every step (measured: about a third
  of the step). Unrolling holds one extra copy of the layer weights while sampling, so
  accelerators, whose memory is scarcer, keep the scan."""
  return jax.default_backend() == 'cpu'


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'greedy', 'top_k', 'use_top_p',
                                             'unroll_layers'))
def _sample_padded(params: Params, prompt_tokens, prompt_mask, live_rows, key, temperature, top_p,
                   stop_token_ids, pad_id, *, cfg: QwenConfig, max_new_tokens: int, greedy: bool,
                   top_k: int, use_top_p: bool, unroll_layers: bool | None = None) -> SampleOutput:
  """The compiled sampler on bucketed shapes. live_rows (B,) bool: False for dummy rows."""
  B, P = prompt_tokens.shape
  N = max_new_tokens
  if unroll_layers is None:
    unroll_layers = unroll_layers_default()
  choose = functools.partial(_choose, temperature=temperature, top_p=top_p, greedy=greedy,
                             top_k=top_k, use_top_p=use_top_p)
  is_stop = lambda t: jnp.any(t[:, None] == stop_token_ids[None, :], axis=-1)
  backbone, head = params['backbone'], qwen.head_params(cfg, params)
  keys = jax.random.split(key, N)

  # Prefill: logits only at the last column (every prompt ends there), not over all P positions.
  cache = qwen.init_cache(cfg, B, P if unroll_layers else P + N - 1)
  phi, cache = qwen.features(cfg, backbone, prompt_tokens, prompt_mask, cache=cache)
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

  if unroll_layers:
    cache = _layer_kv_from_prefill(cache, P + N - 1)
    layers = [jax.tree_util.tree_map(lambda x, l=l: x[l], backbone['layers']) for l in range(cfg.num_layers)]
    step = lambda tok, pos, cache: _decode_step(cfg, backbone['embed'], backbone['final_norm'], layers,
                                                tok, pos, cache)
  else:
    def step(tok, pos, cache):
      phi, cache = qwen.features(cfg, backbone, tok[:, None], jnp.ones((B, 1), jnp.int32),
                                 positions=pos[:, None], cache=cache)
      return phi[:, 0], cache

  def cond(carry):
    t, _, done, _, _ = carry
    return (t < N) & ~jnp.all(done)

  def body(carry):
    t, tok, done, cache, out = carry
    # Token t-1 sits at position len + t - 1; finished rows keep feeding pads that nobody reads.
    phi, cache = step(tok, lengths + t - 1, cache)
    new, lp, slp = choose(qwen.logits(cfg, head, phi), keys[t])
    live = ~done
    new = jnp.where(live, new, pad_id)
    livef = live.astype(jnp.float32)
    out = SampleOutput(
        tokens=out.tokens.at[:, t].set(new),
        mask=out.mask.at[:, t].set(live.astype(jnp.int32)),
        logprobs=out.logprobs.at[:, t].set(lp * livef),
        sample_logprobs=out.sample_logprobs.at[:, t].set(slp * livef))
    return t + 1, new, done | is_stop(new), cache, out

  _, _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, done, cache, out))
  return out


def bucket_size(n: int, step: int, minimum: int = 1) -> int:
  """n rounded up to a power of two (at least `minimum`) up to `step`, then to a multiple of step."""
  if n <= step:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())
  return -(-n // step) * step


def compile_cache_size() -> int:
  """How many shape/static-arg variants of the sampler have been compiled (for tests and logs)."""
  return _sample_padded._cache_size()  # pylint: disable=protected-access


def sample(cfg: QwenConfig, params: Params, prompt_tokens, prompt_mask, key, *, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
           stop_token_ids: Iterable[int] = (), pad_id: int = 0, bucket: bool = True,
           unroll_layers: bool | None = None) -> SampleOutput:
  """Samples up to max_new_tokens tokens after each LEFT-padded prompt.

  prompt_tokens, prompt_mask: (B, P) ints, mask 1 on real tokens, every row with at least one.
  key: a PRNG key (split once per step inside). greedy: argmax instead of sampling (temperature,
  top_k and top_p are then ignored; sample_logprobs are 0). A row stops after emitting any of
  stop_token_ids (the stop token is kept, mask 1); later columns hold pad_id with mask 0.
  bucket: round B and P up to buckets so few shapes compile. Each row's randomness depends on
  the key, the step and its row index only, so bucketing changes no sample.
  unroll_layers: decode with the layers unrolled over per-layer weight copies (default: on CPU
  only, see unroll_layers_default) instead of a scan over the stacked weights; same results.
  Returns SampleOutput with (B, max_new_tokens) arrays.
  """
  tokens = np.asarray(prompt_tokens)
  mask = np.asarray(prompt_mask)
  if tokens.ndim != 2 or tokens.shape != mask.shape:
    raise ValueError(f'prompt_tokens {tokens.shape} and prompt_mask {mask.shape} must both be (B, P).')
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'prompt_tokens must be integer token ids, got dtype {tokens.dtype}.')
  B, P = tokens.shape
  if B == 0 or P == 0:
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
  if int(max_new_tokens) < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens}; need at least 1.')
  if not greedy:
    if not temperature > 0:
      raise ValueError(f'temperature={temperature}; it must be > 0 (use greedy=True for argmax decoding).')
    if not 0 < top_p <= 1:
      raise ValueError(f'top_p={top_p}; it must lie in (0, 1] (1 disables nucleus filtering).')
    if top_k < 0:
      raise ValueError(f'top_k={top_k}; it must be >= 0 (0 disables top-k filtering).')
  stops = sorted({int(t) for t in stop_token_ids})
  # Padded with -1 (never a token) to a multiple of 4, so a different number of stop ids rarely
  # means a new compilation.
  stops = np.asarray(stops + [-1] * (-len(stops) % 4 if stops else 4), np.int32)

  Bp = bucket_size(B, BATCH_BUCKET_STEP) if bucket else B
  Pp = bucket_size(P, LENGTH_BUCKET_STEP, MIN_LENGTH_BUCKET) if bucket else P
  if Pp > P:  # more left padding
    tokens = np.concatenate([np.full((B, Pp - P), pad_id, tokens.dtype), tokens], axis=1)
    mask = np.concatenate([np.zeros((B, Pp - P), np.int32), mask], axis=1)
  if Bp > B:  # dummy rows copy row 0 (no all-padding rows) and start finished
    tokens = np.concatenate([tokens, np.repeat(tokens[:1], Bp - B, axis=0)], axis=0)
    mask = np.concatenate([mask, np.repeat(mask[:1], Bp - B, axis=0)], axis=0)
  live_rows = np.arange(Bp) < B

  greedy = bool(greedy)
  top_k = 0 if greedy or int(top_k) >= cfg.vocab_size else int(top_k)
  use_top_p = (not greedy) and float(top_p) < 1.0
  out = _sample_padded(
      params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), jnp.asarray(live_rows), key,
      jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p), jnp.asarray(stops),
      jnp.int32(pad_id), cfg=cfg, max_new_tokens=int(max_new_tokens), greedy=greedy, top_k=top_k,
      use_top_p=use_top_p,
      unroll_layers=unroll_layers_default() if unroll_layers is None else bool(unroll_layers))
  if Bp > B:
    out = SampleOutput(*(x[:B] for x in out))
  return out
