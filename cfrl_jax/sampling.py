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
every row has stopped, and on CPU the layers are unrolled over per-layer fused (out, in) weights
and per-layer (B, Hkv, S, hd) caches (see unroll_layers_default, prepare_decode and LayerKV); the
prefill runs through the same unrolled layers. On CPU the decode step's attention (and the greedy
pick of many rows) are compiled C++ kernels (cfrl_jax/kernels/cpu_decode; see attention_form and
_greedy_head). In bfloat16 every matrix product accumulates in
float32 and returns bfloat16 (XLA:CPU's fast bf16 kernels need the float32 result type), and
bf16 data is moved as uint16 bits (see _bits).
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cfrl_jax import sharding
from cfrl_jax.kernels import cpu_decode
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


def first_argmax(z):
  """jnp.argmax(z, axis=-1) (the first index of the maximum), z (..., V) -> (...,) int32.

  A max and a min reduction: XLA:CPU lowers jnp.argmax to a variadic (value, index) reduction
  that the profile of a decode step showed ~10x slower than these two plain ones. A row holding
  NaN yields index V - 1 (jnp.argmax would point at the NaN).
  """
  V = z.shape[-1]
  top = jnp.max(z, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(z == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
  return jnp.minimum(first, V - 1)


def _logprob_of(z, tokens):
  """log softmax(z)[tokens] without materialising the (B, V) log-softmax. z (B, V), tokens (B,)."""
  return jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(z, axis=-1)


def _last_with_mass(p):
  """Index of the last entry > 0 along the last axis, -1 if none. p (..., n) -> (...,) int32."""
  return jnp.max(jnp.where(p > 0, jnp.arange(p.shape[-1], dtype=jnp.int32), -1), axis=-1)


def draw(key, z, block: int = 256):
  """One token per row from softmax(z), z (B, V) (-inf allowed), by inverting the CDF.

  key: one PRNG key for the whole batch (row r uses fold_in(key, r)).

  One uniform per row instead of jax.random.categorical's V Gumbel draws (the per-step cost
  that dominated sampling on CPU). The CDF is inverted in two levels, over per-block masses of
  `block` tokens and then inside the chosen block: a cumulative sum over all V tokens cost a
  decode step more than its attention (XLA:CPU's reduce-window). Tokens of probability 0 are
  never drawn.
  """
  B, V = z.shape
  probs = jax.nn.softmax(z, axis=-1)
  K = min(block, V)
  nb = -(-V // K)
  blocks = jnp.pad(probs, ((0, 0), (0, nb * K - V))).reshape(B, nb, K)
  mass = jnp.sum(blocks, axis=-1)                          # (B, nb)
  cdf = jnp.cumsum(mass, axis=-1)
  # Row r's uniform comes from fold_in(key, r): a row's draw does not depend on the batch size,
  # so bucketing (dummy rows) leaves the samples unchanged.
  rows = jnp.arange(B)
  u = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), ()))(rows) * cdf[:, -1]
  # Rounding can put u at or past the top of a CDF: fall back to the last block / token with mass.
  b = jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), _last_with_mass(mass))
  inside = jnp.take_along_axis(blocks, b[:, None, None], axis=1)[:, 0]           # (B, K)
  below = jnp.take_along_axis(cdf - mass, b[:, None], axis=1)[:, 0]
  j = jnp.minimum(jnp.sum(jnp.cumsum(inside, axis=-1) <= (u - below)[:, None], axis=-1),
                  _last_with_mass(inside))
  return (b * K + j).astype(jnp.int32)


def _choose(z, key, temperature, top_p, *, greedy, top_k, use_top_p):
  """Next tokens (B,) from logits z (B, V) plus their raw and sampling log-probs."""
  if greedy:
    tokens = first_argmax(z)
    return tokens, _logprob_of(z, tokens), jnp.zeros(tokens.shape, jnp.float32)
  zf = sampling_logits(z, temperature, top_k, top_p, use_top_p=use_top_p)
  tokens = draw(key, zf)
  return tokens, _logprob_of(z, tokens), _logprob_of(zf, tokens)


class LayerKV(NamedTuple):
  """The decode loop's KV cache: one (B, Hkv, S, hd) array per layer for keys and for values
  (16-bit caches as uint16 bits for the 'kernel' and 'fused' attention forms; keys (B, Hkv, hd, S)
  for 'fused', (B, Hkv, S / 16, hd, 16) blocks of 16 slots for 'kernel', whose S is rounded up to a
  multiple of 16; see attention_form and init_layer_kv).

  Separate per-layer arrays (not qwen.KVCache's stacked (L, B, S, Hkv, hd)) let each step update
  and read a layer's cache in place, and these orders are the ones the one-token attention
  contracts over without transposing the cache every step.
  mask: (B, S) int32, 1 on slots holding real tokens; index: () int32, the next slot to write.
  """
  k: tuple
  v: tuple
  mask: jax.Array
  index: jax.Array


def decode_weights(cfg: QwenConfig, layers: Params) -> list[dict]:
  """Per-layer weights laid out for one-token decoding: a list of L dicts.

  layers: the backbone's stacked layer tree. Each dict holds the layer's q/k/v kernels fused into
  one (Hq*hd + 2*Hkv*hd, d) matrix, gate and up fused into one (2F, d) matrix, o (d, Hq*hd) and
  down (d, F), all (out, in) and in the compute dtype, plus norms and biases. Built once per
  sample call by prepare_decode (an extra copy of the layer weights while sampling).

  Why: a decode step reads every weight once for a handful of rows, so it is bound by memory
  bandwidth and by the number of kernels launched per step. One matrix per stage halves the
  matmuls, and (out, in) rows are contiguous dot products, which XLA:CPU's matrix-vector kernels
  stream faster than (in, out) columns (measured ~10% on the MLP).
  """
  dt = cfg.compute_dtype
  kernels = {n: _bits(layers[n]['kernel'].astype(dt)) for n in
             ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')}
  out = []
  for l in range(cfg.num_layers):
    p = jax.tree_util.tree_map(lambda x, l=l: x[l], layers)
    fused = lambda *names, l=l: _unbits(jnp.concatenate([kernels[n][l] for n in names], axis=1).T, dt)
    w = {'input_norm': p['input_norm'], 'post_attn_norm': p['post_attn_norm'],
         'qkv': fused('q_proj', 'k_proj', 'v_proj'), 'o': fused('o_proj'),
         'gate_up': fused('gate_proj', 'up_proj'), 'down': fused('down_proj')}
    if cfg.attention_bias:
      w['qkv_bias'] = jnp.concatenate([p[n]['bias'] for n in ('q_proj', 'k_proj', 'v_proj')])
    if cfg.o_bias:
      w['o_bias'] = p['o_proj']['bias']
    if cfg.qk_norm:
      w['q_norm'], w['k_norm'] = p['q_norm'], p['k_norm']
    out.append(w)
  return out


class DecodeParams(NamedTuple):
  """The policy laid out for the unrolled sampler (see prepare_decode).

  embed: (V, d) input embedding in the compute dtype; for 16-bit dtypes its uint16 bits (see
    _bits), so the per-step row gather never converts the table. layers: decode_weights.
  final_norm: (d,).
  head: {'w': (V, d)} in the compute dtype, as qwen.logits reads it.
  """
  embed: jax.Array
  layers: list
  final_norm: jax.Array
  head: Params


def prepare_decode(cfg: QwenConfig, params: Params) -> DecodeParams:
  """Lays params out for the unrolled sampler (once per sample call, or once per params).

  The layer weights are laid out in their own compiled call, separate from the sampler's jit so
  that the sampler's matrix products read materialised compute-dtype matrices: inside one jit
  XLA:CPU fused the weight transposes into the prefill's products and ran those in float32
  (bfloat16 prefill ~3x slower, measured). The embedding and head stay outside that call: already
  in the compute dtype they are the params' own arrays, where a jit would have to return copies
  (two 65 MB copies on bench_decode's float32 model: 80 -> 42-50 ms per call, hand-timed).
  """
  backbone = params['backbone']
  head = qwen.head_params(cfg, params)
  return DecodeParams(embed=_embed_bits(backbone['embed'], cfg.compute_dtype),
                      layers=_decode_layers(cfg, backbone['layers']), final_norm=backbone['final_norm'],
                      head={'w': head['w'].astype(cfg.compute_dtype)})


_decode_layers = jax.jit(decode_weights, static_argnames=('cfg',))


def _embed_bits(embed, dtype):
  """The embedding in dtype, as its uint16 bits for 16-bit dtypes; the array itself when unchanged."""
  return _to_bits(embed, dtype) if jnp.dtype(dtype).itemsize == 2 else embed.astype(dtype)


_to_bits = jax.jit(lambda x, dtype: _bits(x.astype(dtype)), static_argnames=('dtype',))


def _bits(x):
  """A 16-bit float array viewed as uint16 (other dtypes unchanged), for pure data movement.

  XLA:CPU moves bfloat16 data (concatenate, transpose, gather) by converting it to float32 and
  back; on the raw bits the same moves are plain copies (~3x faster measured on the decode
  weights, and a gather from the embedding no longer converts the whole table every call).
  """
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if jnp.dtype(x.dtype).itemsize == 2 else x


def _unbits(x, dtype):
  """Inverse of _bits: the uint16 view back to `dtype`."""
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x


# Largest batch for which a decode step's products run weight-major (see _matvec): measured on
# bench_decode's model, 2 threads, ms per step, row-major -> weight-major, layers / layers + head:
#   float32: B8 14.9 -> 13.3 / 13.4, B16 19.4 -> 19.2 / 18.6, B32 30.5 -> 30.8 / 31.5, B64 47.3 -> 47.6 / 52.0
#   bfloat16: B8 6.9 -> 6.1 / 5.9, B16 9.5 -> 9.0 / 8.9, B32 16.2 -> 15.3 / 17.1, B64 24.8 -> 24.8 / 31.9
# The head's (V, B) logits are worth transposing back only for few rows.
WEIGHT_MAJOR_MAX_ROWS = 32
HEAD_WEIGHT_MAJOR_MAX_ROWS = 16


def _matvec(x, w, dtype, bias=None, *, weight_major: bool = False, kernel: bool = False):
  """x (B, in) times an (out, in) matrix -> (B, out) in dtype, accumulated in float32.

  The float32 result type is also what makes XLA:CPU take its fast bfloat16 kernel: a bf16 x bf16
  -> bf16 dot runs ~4x slower than the same dot with a float32 result (measured on the decode
  benchmark's shapes).

  weight_major (static): compute the product as w x^T, (out, B), and transpose that small result.
  For a few rows XLA:CPU's library kernel streams the weights much faster with the weight as the
  left operand (M = out, N = B) than as the right one (M = B): on bench_decode's shapes, a chain
  of the step's products at B = 8 takes 10.2 vs 11.5 ms in float32 and 3.4 vs 4.2 ms in bfloat16
  on 2 threads (18.0 vs 20.5 and 4.3 vs 8.7 on one). The optimization barrier keeps XLA from
  folding the transpose back into the product's output layout, which restores the slow form.
  """
  if kernel:
    y = kernel_product(x, w).astype(dtype)
    return y if bias is None else y + bias.astype(dtype)
  w = w.astype(dtype)
  if weight_major:
    yt = jnp.einsum('oi,bi->ob', w, x, preferred_element_type=jnp.float32)
    y = jax.lax.optimization_barrier(yt).T.astype(dtype)
  else:
    y = jnp.einsum('bi,oi->bo', x, w, preferred_element_type=jnp.float32).astype(dtype)
  return y if bias is None else y + bias.astype(dtype)


def weight_major_logits(cfg: QwenConfig, head: Params, phi):
  """The head's logits laid out (V, B): (V, d) x (d, B) in the compute dtype, float32 result."""
  dt = cfg.compute_dtype
  return jnp.einsum('vd,bd->vb', head['w'].astype(dt), phi.astype(dt), preferred_element_type=jnp.float32)


def _head_logits(cfg: QwenConfig, head: Params, phi, *, weight_major: bool):
  """qwen.logits for one position per row, phi (B, d) -> (B, V) float32, optionally weight-major."""
  if not weight_major:
    return qwen.logits(cfg, head, phi)
  return jax.lax.optimization_barrier(weight_major_logits(cfg, head, phi)).T


# How the unrolled sampler's decode step attends over its KV cache (the static `attention` choice
# of sample): 'kernel' calls the compiled CPU kernel cpu_decode.decode_attention, 'xla' expresses the
# attention in XLA ops (attention_form picks which). Only the attention differs: the same maths.
ATTENTION_CHOICES = ('kernel', 'xla')


def attention_default(cfg: QwenConfig) -> str:
  """'kernel' on the CPU backend for float32 and bfloat16 where the kernel builds (a C++ compiler
  is on the machine and CFRL_JAX_CPU_KERNELS is not 0), else 'xla'."""
  if jax.default_backend() != 'cpu' or jnp.dtype(cfg.compute_dtype) not in (jnp.float32, jnp.bfloat16):
    return 'xla'
  return 'kernel' if cpu_decode.available() else 'xla'


def check_attention(cfg: QwenConfig, attention: str) -> None:
  """A clear error for an attention choice this cfg or machine cannot run."""
  if attention not in ATTENTION_CHOICES:
    raise ValueError(f'attention={attention!r}: expected one of {ATTENTION_CHOICES} (or None for '
                     'attention_default).')
  if attention == 'kernel':
    if jnp.dtype(cfg.compute_dtype) not in (jnp.float32, jnp.bfloat16):
      raise ValueError(f"attention='kernel' runs float32 and bfloat16 caches, not {cfg.compute_dtype}; use "
                       "attention='xla'.")
    if not cpu_decode.available():
      raise ValueError(f"attention='kernel' is unavailable here ({cpu_decode.unavailable_reason()}); use "
                       "attention='xla'.")


def attention_form(cfg: QwenConfig, rows: int, attention: str) -> str:
  """How a decode step of `rows` rows attends, given the `attention` choice, and so the layout of
  its caches (init_layer_kv):

  'kernel': cpu_decode.decode_attention over a (B, Hkv, S / 16, hd, 16) key cache (cpu_decode.block_keys;
    S rounded up to a multiple of 16) and a (B, Hkv, S, hd) value cache, 16-bit ones held as uint16 bits
    (written in place), reading only the slots written so far.
  'fused' (attention='xla'; float32, and 16-bit dtypes above WEIGHT_MAJOR_MAX_ROWS rows): fused
    multiply-reduce loops over a (B, Hkv, hd, S) key cache, 16-bit caches as uint16 bits.
  'batched' (attention='xla' otherwise): batched dot products over (B, Hkv, S, hd) caches.

  Why 'fused': one query per row leaves XLA:CPU a batched (G x hd)(hd x S) product per row and KV
  head, which it runs far below both its matmul and its memory speed. As one loop, vectorised along
  the S contiguous keys of the transposed cache, the scores run faster in float32; in bfloat16 the
  uint16 cache is also written in place, where XLA:CPU writes a bf16 cache by converting the whole
  cache to float32 and back. Measured on bench_decode's model (prompt 64, 128 new tokens, decode
  segments on), ms per step, batched products -> fused, 2 threads unless noted: float32 B1 7.4 ->
  7.3, B8 14.3 -> 14.2 (1 thread 21.0 -> 20.8), B64 45.5 -> 41.7; bfloat16 B64 24.0 -> 23.1
  (1 thread 32.6 -> 30.8), but B32 14.2 -> 14.4 and B8 5.6 -> 6.0. Both stay far below memory
  speed (~20 GFLOP/s at B64), hence the kernel.
  """
  if attention == 'kernel':
    return 'kernel'
  return 'fused' if jnp.dtype(cfg.compute_dtype).itemsize > 2 or rows > WEIGHT_MAJOR_MAX_ROWS else 'batched'


# Most rows for which a kernel product streams the weights as dot products (cpu_decode.matvec);
# float32 products of more rows run register-blocked (cpu_decode.matmul). Chain of bench_decode's
# step products (8 layers and the head), float32, 2 threads, ms, matvec / matmul / XLA's library
# product: 1 row 3.9 / 4.9 / 3.8, 2 rows 4.4 / 5.2 / 7.0, 4 rows 4.9 / 4.9 / 6.7, 8 rows 6.3 / 5.6 / 8.2,
# 16 rows 8.3 / 4.9 / 9.9, 32 rows 12.5 / 6.9 / 12.4, 64 rows - / 11.9 / 18.3 (one thread: 21.6 / 33.1;
# hand-timed best of 15, AMD EPYC).
MATVEC_MAX_ROWS = 4
# Most rows for which a bfloat16 decode step's products run the kernels (cpu_decode.matvec, whose
# float32 FMAs read the bfloat16 weights widened). Above, XLA:CPU's bfloat16 dot instructions do
# twice the FLOPs per instruction and win.
BF16_KERNEL_PRODUCTS_MAX_ROWS = 16


def kernel_product(x, w):
  """x (B, K) times a weight-major w (N, K) -> (B, N) float32 in the compiled kernels: matvec for
  at most MATVEC_MAX_ROWS rows and for 16-bit weights, else matmul."""
  if x.shape[0] <= MATVEC_MAX_ROWS or w.dtype != jnp.float32:
    return cpu_decode.matvec(x, w)
  return cpu_decode.matmul(x, w)


def kernel_products(cfg: QwenConfig, attention: str, rows: int) -> bool:
  """Whether a decode step of `rows` rows runs its matrix products (layers and head) with the
  compiled kernels (kernel_product) over the weight-major decode weights: with attention='kernel',
  in float32 at any row count, in bfloat16 up to BF16_KERNEL_PRODUCTS_MAX_ROWS rows.
  sample(..., mesh=...) keeps XLA's products (the kernel has no rule for sharded operands)."""
  if attention != 'kernel':
    return False
  dtype = jnp.dtype(cfg.compute_dtype)
  return dtype == jnp.float32 or (dtype == jnp.bfloat16 and rows <= BF16_KERNEL_PRODUCTS_MAX_ROWS)


def _greedy_head(cfg: QwenConfig, head: Params, phi):
  """Greedy tokens (B,) int32 and their log-probs (B,) from phi (B, d) with the compiled CPU kernel
  cpu_decode.greedy_pick: the same as first_argmax and _logprob_of over qwen.logits.

  The product runs weight-major, (V, d) x (d, B) -> (V, B) logits, which the kernel reduces along V
  as they lie. Why: in the (B, V) form, XLA:CPU's bfloat16 product first repacks the whole (V, d)
  head every step, and its reductions over V (max, argmax, logsumexp) or a transpose of (V, B) back
  to (B, V) each cost more than the product. Rows are padded to a multiple of GREEDY_LANES (the
  product's cost is the head's bytes, whatever the rows) so that the kernel runs only full vectors.
  """
  B = phi.shape[0]
  x = jnp.pad(phi, ((0, -B % cpu_decode.GREEDY_LANES), (0, 0)))
  tokens, logprobs = cpu_decode.greedy_pick(weight_major_logits(cfg, head, x))
  return tokens[:B], logprobs[:B]


def _as_f32(cache):
  """A cache in float32: uint16 bits of bfloat16 widen exactly by a shift (fused into the reader)."""
  if cache.dtype == jnp.uint16:
    return jax.lax.bitcast_convert_type(cache.astype(jnp.uint32) << 16, jnp.float32)
  return cache.astype(jnp.float32)


def _cached_layer(cfg: QwenConfig, w: dict, h, cos, sin, k_cache, v_cache, slot, key_mask, *,
                  prefill: bool, form: str, weight_major: bool = False, kernel_products: bool = False):
  """One decoder block for T new tokens per row over per-layer caches (qwen._layer's maths).

  h: (B, T, d); cos, sin: (B, T, hd); k_cache, v_cache: laid out for `form` (attention_form; see
  init_layer_kv); key_mask: (B, S) with the
  T new slots [slot, slot + T) already set. prefill (static): the caches are empty and slot is 0,
  so the T tokens attend among themselves (causally) instead of over all S slots. Otherwise T is
  1 and the token attends over the cache. Returns (h, k_cache, v_cache) with the new keys/values
  written at [slot, slot + T). w: decode_weights' dict for the layer. weight_major, kernel_products
  (static): how the products run (see _matvec).
  """
  dt = cfg.compute_dtype
  product = lambda name, x: _matvec(x, w[name], dt, w.get(f'{name}_bias'), weight_major=weight_major,
                                    kernel=kernel_products)
  B, T, d = h.shape
  Hq, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  x = qwen.rms_norm(h, w['input_norm'], cfg.rms_norm_eps).reshape(B * T, d)
  qkv = product('qkv', x).reshape(B, T, -1)
  q = qkv[..., :Hq * hd].reshape(B, T, Hq, hd)
  k = qkv[..., Hq * hd:(Hq + Hkv) * hd].reshape(B, T, Hkv, hd)
  v = qkv[..., (Hq + Hkv) * hd:].reshape(B, T, Hkv, hd)
  if cfg.qk_norm:
    q = qwen.rms_norm(q, w['q_norm'], cfg.rms_norm_eps)
    k = qwen.rms_norm(k, w['k_norm'], cfg.rms_norm_eps)
  q, k = qwen.apply_rope(q, cos, sin), qwen.apply_rope(k, cos, sin)
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)            # (B, Hkv, T, hd), the cache's order
  fused = form == 'fused'
  store = lambda x, cache: _bits(x.astype(dt)) if cache.dtype == jnp.uint16 else x.astype(cache.dtype)
  if form == 'kernel':   # keys (B, Hkv, S / 16, hd, 16)
    if prefill:          # slot 0: the T keys padded to whole blocks
      padded = jnp.pad(k, ((0, 0), (0, 0), (0, -T % cpu_decode.KEY_BLOCK), (0, 0)))
      k_cache = jax.lax.dynamic_update_slice(k_cache, store(cpu_decode.block_keys(padded), k_cache),
                                             (0, 0, 0, 0, 0))
    else:                # one key: element i of slot s at [s // 16, i, s % 16]
      k_cache = jax.lax.dynamic_update_slice(
          k_cache, store(k[:, :, :, :, None], k_cache),
          (0, 0, slot // cpu_decode.KEY_BLOCK, 0, slot % cpu_decode.KEY_BLOCK))
  elif fused:            # keys (B, Hkv, hd, S)
    k_cache = jax.lax.dynamic_update_slice(k_cache, store(jnp.swapaxes(k, 2, 3), k_cache), (0, 0, 0, slot))
  else:
    k_cache = jax.lax.dynamic_update_slice(k_cache, store(k, k_cache), (0, 0, slot, 0))
  v_cache = jax.lax.dynamic_update_slice(v_cache, store(v, v_cache), (0, 0, slot, 0))
  G = Hq // Hkv
  neg = jnp.finfo(jnp.float32).min   # finite: a query at a left pad sees no key and gets no NaN
  if form == 'kernel':
    qg = q.reshape(B, T, Hkv, G, hd).astype(jnp.float32) / math.sqrt(hd)
    # Query t sits at slot slot + t and reads the slots up to it (a decode step's single query:
    # slot + 1); later slots hold no token yet. In a prefill this replaces the XLA products below,
    # whose queries XLA:CPU first transposes element by element into the layout its product wants:
    # that copy alone was 15 of the ~80 ms per layer of bench_decode's bfloat16 batch-64 prefill on
    # one thread (profiled). The kernel reads q as the layer's product lays it out.
    length = jnp.broadcast_to(slot + 1 + jnp.arange(T, dtype=jnp.int32), (B, T))
    attn = cpu_decode.decode_attention(qg, k_cache, v_cache, key_mask, length)
  elif prefill:
    # In float32 whatever the compute dtype: these T x T products are ~7% of a bf16 prefill
    # (profiled), and XLA:CPU's fallback kernel for batched products has no bf16 x bf16 -> f32
    # variant ("Unsupported element type for DotThunk" in some operand layouts; see below).
    qg = q.reshape(B, T, Hkv, G, hd).astype(jnp.float32)
    scores = jnp.einsum('btkgh,bksh->bkgts', qg, k.astype(jnp.float32)) / math.sqrt(hd)
    causal = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    allowed = (key_mask[:, None, None, None, :T] > 0) & causal
    probs = jax.nn.softmax(jnp.where(allowed, scores, neg), axis=-1)
    # (B, Hkv, G, T, hd) then moved: asking for (B, T, Hkv, G, hd) directly picks a slower kernel.
    attn = jnp.transpose(jnp.einsum('bkgts,bksh->bkgth', probs, v.astype(jnp.float32)), (0, 3, 1, 2, 4))
  elif fused:
    # The barriers keep scores, softmax and values in separate loops: XLA otherwise fuses them into
    # one another, measured slower in bfloat16 (this attention alone at B64: 11.0 vs 9.2 ms) and no
    # faster in float32.
    qg = q.reshape(B, Hkv, G, hd).astype(jnp.float32) / math.sqrt(hd)
    scores = jax.lax.optimization_barrier(jnp.sum(qg[..., None] * _as_f32(k_cache)[:, :, None], axis=-2))
    probs = jax.nn.softmax(jnp.where(key_mask[:, None, None, :] > 0, scores, neg), axis=-1)
    probs = jax.lax.optimization_barrier(probs)                      # (B, Hkv, G, S)
    attn = jnp.sum(probs[..., None] * _as_f32(v_cache)[:, :, None], axis=-2)   # (B, Hkv, G, hd)
  else:
    # One query per row, grouped-query attention straight on the (B, Hkv, S, hd) cache (no
    # transposed copy per step), in operand layouts XLA:CPU's library kernels take for bf16 with
    # float32 results (a (B, T, Hkv, G, hd) output here fell back to the kernel without one).
    # Slots after the current one are still 0 in key_mask: it is also the causal mask.
    qg = q.reshape(B, Hkv, G, hd)
    scores = jnp.einsum('bkgh,bksh->bkgs', qg, k_cache.astype(dt),
                        preferred_element_type=jnp.float32) / math.sqrt(hd)
    probs = jax.nn.softmax(jnp.where(key_mask[:, None, None, :] > 0, scores, neg), axis=-1)
    attn = jnp.einsum('bkgs,bksh->bkgh', probs.astype(dt), v_cache.astype(dt),
                      preferred_element_type=jnp.float32)
  attn = attn.astype(dt).reshape(B * T, Hq * hd)
  h = h + product('o', attn).reshape(B, T, d)
  x = qwen.rms_norm(h, w['post_attn_norm'], cfg.rms_norm_eps).reshape(B * T, d)
  gate_up = product('gate_up', x)
  F = cfg.intermediate_size
  mlp = product('down', qwen.swiglu(gate_up[:, :F], gate_up[:, F:]))
  return h + mlp.reshape(B, T, d), k_cache, v_cache


def _cached_forward(cfg: QwenConfig, model: DecodeParams, tokens, positions, kv: LayerKV, mask=None, *,
                    attention: str = 'xla', kernel_products: bool = False, rope=None):
  """T tokens per row through the decoder, layers unrolled over decode_weights and per-layer caches.

  tokens, positions: (B, T) int32. mask: (B, T) real-token mask of a prefill (the caches must be
  empty, kv.index 0); None for a decode step (T = 1, every row's token is real). Returns
  (phi (B, T, d), kv with the new keys/values at slots [kv.index, kv.index + T)). A decode step
  of at most WEIGHT_MAJOR_MAX_ROWS rows runs its products weight-major (see _matvec). attention
  (static): see attention_form; kv must be laid out for it (init_layer_kv). kernel_products
  (static): a decode step runs its products with the compiled kernels (see kernel_products).
  rope: optional (cos, sin) tables (n, hd) over positions 0..n-1 (qwen.rope_tables), from which the
  positions' rows are gathered. Why: XLA:CPU fused the cos / sin of the positions into every layer's
  query and key loops, recomputing them per head and per layer (0.9 ms of bench_decode's float32
  batch-64 step, profiled); a gather is cheap to repeat.
  """
  B, T = tokens.shape
  prefill = mask is not None
  weight_major = not prefill and B <= WEIGHT_MAJOR_MAX_ROWS
  form = attention_form(cfg, B, attention)
  slot = kv.index
  new = mask.astype(jnp.int32) if prefill else jnp.ones((B, T), jnp.int32)
  key_mask = jax.lax.dynamic_update_slice(kv.mask, new, (0, slot))
  if rope is None:
    cos, sin = qwen.rope_tables(positions, cfg.head_dim, cfg.rope_theta)
  else:
    cos, sin = (jnp.take(table, positions, axis=0) for table in rope)
  h = _unbits(jnp.take(model.embed, tokens, axis=0), cfg.compute_dtype)
  ks, vs = list(kv.k), list(kv.v)
  for l, w in enumerate(model.layers):
    h, ks[l], vs[l] = _cached_layer(cfg, w, h, cos, sin, ks[l], vs[l], slot, key_mask, prefill=prefill,
                                    form=form, weight_major=weight_major,
                                    kernel_products=kernel_products and not prefill)
  phi = qwen.rms_norm(h, model.final_norm, cfg.rms_norm_eps)
  return phi, LayerKV(tuple(ks), tuple(vs), key_mask, slot + T)


def cache_slots(cfg: QwenConfig, rows: int, slots: int, attention: str) -> int:
  """Slots a LayerKV allocates to hold `slots`: rounded up to whole key blocks for the 'kernel' form."""
  if attention_form(cfg, rows, attention) == 'kernel':
    return -(-slots // cpu_decode.KEY_BLOCK) * cpu_decode.KEY_BLOCK
  return slots


def init_layer_kv(cfg: QwenConfig, batch: int, slots: int, attention: str = 'xla') -> LayerKV:
  """An empty LayerKV laid out for attention_form(cfg, batch, attention): per layer (batch, Hkv,
  slots, hd) zeros in the compute dtype; for the 'kernel' and 'fused' forms 16-bit caches as uint16
  bits and keys (batch, Hkv, hd, slots) ('fused') or (batch, Hkv, S / 16, hd, 16) with S = slots
  rounded up to a multiple of 16 ('kernel'; see cache_slots)."""
  Hkv, hd, dtype = cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.compute_dtype)
  form = attention_form(cfg, batch, attention)
  if form != 'batched' and dtype.itemsize == 2:
    dtype = jnp.uint16
  slots = cache_slots(cfg, batch, slots, attention)
  k_shape = {'batched': (batch, Hkv, slots, hd), 'fused': (batch, Hkv, hd, slots),
             'kernel': (batch, Hkv, slots // cpu_decode.KEY_BLOCK, hd, cpu_decode.KEY_BLOCK)}[form]
  zeros = lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return LayerKV(zeros(k_shape), zeros((batch, Hkv, slots, hd)), jnp.zeros((batch, slots), jnp.int32),
                 jnp.zeros((), jnp.int32))


def unroll_layers_default() -> bool:
  """Whether the decode loop unrolls the layers by default: on CPU, where a scan over stacked
  weights copies every layer's weights out of the stack at every step (measured: about a third
  of the step). Unrolling holds one extra copy of the layer weights while sampling, so
  accelerators, whose memory is scarcer, keep the scan."""
  return jax.default_backend() == 'cpu'


# The decode loop attends over the whole preallocated cache at every step, so a step's attention
# costs the final length P + N - 1 however few tokens exist yet. Run it instead in segments, each
# over a cache just long enough for its last step (grown between segments): with K equal segments
# the mean length attended falls from P + N to about P + N/2 + N/(2K). Each segment compiles its
# own loop body, and growing the cache briefly holds the old and the new one, so the default (CPU
# only, where the attention over the cache was ~40% of a bfloat16 batch-64 step on bench_decode's
# model, profiled) stops at MAX_DECODE_SEGMENTS and keeps segments at least MIN_SEGMENT_STEPS long;
# 8 segments were no faster than 4 there (hand-timed).
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


def _grow_cache(cfg: QwenConfig, cache, slots: int, attention: str = 'xla'):
  """cache (LayerKV laid out for `attention`, or qwen.KVCache of the scanned sampler) with its slot
  axis zero-padded to slots (cache_slots(...) of them for a LayerKV)."""
  rows = cache.mask.shape[0]
  if isinstance(cache, LayerKV):
    slots = cache_slots(cfg, rows, slots, attention)
  extra = slots - cache.mask.shape[1]

  def pad(x, axis, n=extra):
    # On the uint16 bits: XLA:CPU would move bfloat16 data through float32 (see _bits).
    widths = [(0, n if a == axis else 0) for a in range(x.ndim)]
    return _unbits(jnp.pad(_bits(x), widths), x.dtype)

  mask = pad(cache.mask, 1)
  if isinstance(cache, LayerKV):
    form = attention_form(cfg, rows, attention)
    k_pad = {'batched': lambda k: pad(k, 2), 'fused': lambda k: pad(k, 3),
             'kernel': lambda k: pad(k, 2, extra // cpu_decode.KEY_BLOCK)}[form]
    return LayerKV(tuple(k_pad(k) for k in cache.k), tuple(pad(v, 2) for v in cache.v), mask, cache.index)
  return qwen.KVCache(pad(cache.k, 2), pad(cache.v, 2), mask, cache.index)


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'greedy', 'top_k', 'use_top_p',
                                             'unroll_layers', 'segments', 'attention', 'kernel_products'))
def _sample_padded(model: Params | DecodeParams, prompt_tokens, prompt_mask, live_rows, key, temperature, top_p,
                   stop_token_ids, pad_id, *, cfg: QwenConfig, max_new_tokens: int, greedy: bool,
                   top_k: int, use_top_p: bool, unroll_layers: bool | None = None,
                   segments: int | None = None, attention: str = 'xla',
                   kernel_products: bool = False) -> SampleOutput:
  """The compiled sampler on bucketed shapes. live_rows (B,) bool: False for dummy rows.

  model: prepare_decode's DecodeParams with unroll_layers (default on CPU), else the params tree.
  segments: how many segments the decode loop runs in (decode_windows; default
  decode_segments_default). attention: how the unrolled sampler's decode step attends
  (attention_form; the scanned sampler always uses XLA ops). kernel_products: the decode step's
  matrix products (layers and head) run the compiled kernels (see kernel_products; unrolled only).
  """
  B, P = prompt_tokens.shape
  N = max_new_tokens
  if unroll_layers is None:
    unroll_layers = unroll_layers_default()
  if unroll_layers != isinstance(model, DecodeParams):
    raise ValueError('the unrolled sampler takes prepare_decode(cfg, params); the scanned one the params.')
  choose = functools.partial(_choose, temperature=temperature, top_p=top_p, greedy=greedy,
                             top_k=top_k, use_top_p=use_top_p)
  is_stop = lambda t: jnp.any(t[:, None] == stop_token_ids[None, :], axis=-1)
  keys = jax.random.split(key, N)
  if kernel_products and attention != 'kernel':
    raise ValueError(f"kernel_products runs the decode step's products in the compiled CPU kernels, which needs "
                     f"attention='kernel' (got {attention!r}); see sampling.kernel_products.")
  if not unroll_layers:
    attention, kernel_products = 'xla', False
  windows = decode_windows(P, N, decode_segments_default(N, attention) if segments is None else segments)

  # Prefill: logits only at the last column (every prompt ends there), not over all P positions.
  if unroll_layers:
    head = model.head
    forward = functools.partial(_cached_forward, cfg, model, attention=attention, kernel_products=kernel_products)
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
      new, lp = _greedy_head(cfg, head, phi)
      slp = jnp.zeros_like(lp)
    else:
      z = _head_logits(cfg, head, phi, weight_major=unroll_layers and B <= HEAD_WEIGHT_MAJOR_MAX_ROWS)
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
      carry = (t, tok, done, _grow_cache(cfg, cache, slots, attention), out)
    # This segment's cache holds the steps t <= slots - P (the last segment's: t <= N - 1).
    cond = lambda carry, last=slots - P: (carry[0] <= last) & ~jnp.all(carry[2])
    carry = jax.lax.while_loop(cond, body, carry)
  return carry[-1]


def sampler_model(cfg: QwenConfig, params: Params | DecodeParams, unroll_layers: bool) -> Params | DecodeParams:
  """What _sample_padded takes: prepare_decode(cfg, params) when unrolled, else params itself.

  params may already be prepare_decode's DecodeParams (laid out once, reused across calls).
  """
  if isinstance(params, DecodeParams):
    if not unroll_layers:
      raise ValueError('params is prepare_decode(...) output, which only the unrolled sampler reads; '
                       'pass the params tree itself with unroll_layers=False.')
    head = tuple(params.head['w'].shape)
    if len(params.layers) != cfg.num_layers or head != (cfg.vocab_size, cfg.hidden_size):
      raise ValueError(f'prepared decode weights ({len(params.layers)} layers, head {head}) do not match cfg '
                       f'({cfg.num_layers} layers, head {(cfg.vocab_size, cfg.hidden_size)}); lay them out '
                       'with prepare_decode(cfg, params) for this cfg.')
    return params
  return prepare_decode(cfg, params) if unroll_layers else params


def bucket_size(n: int, step: int, minimum: int = 1) -> int:
  """n rounded up to a power of two (at least `minimum`) up to `step`, then to a multiple of step."""
  if n <= step:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())
  return -(-n // step) * step


def min_batch_bucket(cfg: QwenConfig, unroll_layers: bool) -> int:
  """The fewest rows the unrolled sampler runs: 2 in a 16-bit compute dtype, else 1.

  XLA:CPU multiplies a single bfloat16 row by a matrix on a path ~18x slower than two rows
  (measured on bench_decode's (32000, 512) head: 18.9 vs 1.0 ms), so a one-prompt bf16 call decodes
  a dummy second row: 6.9 -> 4.3 ms per step on that model. Bucketing changes no sample.
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


def compile_cache_size() -> int:
  """How many shape/static-arg variants of the sampler have been compiled (for tests and logs)."""
  return _sample_padded._cache_size()  # pylint: disable=protected-access


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


def resolve_attention(cfg: QwenConfig, attention: str | None, unroll_layers: bool) -> str:
  """sample's `attention` argument checked, or its default (attention_default) when None."""
  if attention is None:
    return attention_default(cfg) if unroll_layers else 'xla'
  check_attention(cfg, attention)
  if attention == 'kernel' and not unroll_layers:
    raise ValueError("attention='kernel' needs the unrolled sampler (unroll_layers=True); the scanned one "
                     "attends with XLA ops.")
  return attention


def decoding_statics(cfg: QwenConfig, greedy: bool, top_k: int, top_p: float) -> tuple[bool, int, bool]:
  """The compiled sampler's static choices (greedy, top_k, use_top_p): filters that keep every token
  (top_k >= vocab, top_p = 1) and all filters under greedy compile away."""
  greedy = bool(greedy)
  top_k = 0 if greedy or int(top_k) >= cfg.vocab_size else int(top_k)
  return greedy, top_k, (not greedy) and float(top_p) < 1.0


def sample(cfg: QwenConfig, params: Params | DecodeParams, prompt_tokens, prompt_mask, key, *, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
           stop_token_ids: Iterable[int] = (), pad_id: int = 0, bucket: bool = True,
           unroll_layers: bool | None = None, decode_segments: int | None = None,
           attention: str | None = None, mesh: Mesh | None = None, process_local: bool = False) -> SampleOutput:
  """Samples up to max_new_tokens tokens after each LEFT-padded prompt.

  params: the policy's {'backbone', 'head'} tree, or prepare_decode(cfg, params) to lay the
  weights out once for many calls on the same params (evaluation, several rollout batches per
  policy version); the unrolled sampler otherwise lays them out at every call.
  prompt_tokens, prompt_mask: (B, P) ints, mask 1 on real tokens, every row with at least one.
  key: a PRNG key (split once per step inside). greedy: argmax instead of sampling (temperature,
  top_k and top_p are then ignored; sample_logprobs are 0). A row stops after emitting any of
  stop_token_ids (the stop token is kept, mask 1); later columns hold pad_id with mask 0.
  bucket: round B and P up to buckets so few shapes compile. Each row's randomness depends on
  the key, the step and its row index only, so bucketing changes no sample.
  unroll_layers: decode with the layers unrolled over per-layer weight copies (default: on CPU
  only, see unroll_layers_default) instead of a scan over the stacked weights; the same maths
  (equal results in float32, equal up to rounding in bfloat16).
  decode_segments: run the decode loop in this many segments, each attending over a KV cache just
  long enough for its last step (see decode_windows); default decode_segments_default (up to 4
  on CPU with the XLA attention, else 1). The same maths at any count.
  attention: how the unrolled sampler's decode step attends over the KV cache: 'kernel' (the
  compiled CPU kernel kernels.decode_attention) or 'xla' (XLA ops); default attention_default
  ('kernel' on CPU for float32 and bfloat16 where it builds). With 'kernel', a float32 decode step
  (and a bfloat16 one of at most BF16_KERNEL_PRODUCTS_MAX_ROWS rows) also runs its matrix products
  and greedy pick in the compiled kernels (kernel_products); the results are the same up to the
  order of float32 sums. The scanned sampler always uses XLA ops.
  mesh: a jax Mesh (cfrl_jax/sharding.py) to split the prompt batch over ('data', 'fsdp'); params
  should already be placed with sharding.shard. The batch bucket is then rounded up to a multiple
  of the batch shards, the products stay XLA's, and the result is host numpy arrays, gathered on
  every process. None: one device, the arrays stay where JAX put them.
  process_local (with mesh): each process passes only its own prompts (b, P), the block
  sharding.process_block(b * process_count, mesh) of the global batch, with the same (b, P) on every
  process, and gets back its own rows (b, N). The rows are not bucketed, so every row sits at its
  global index and draws the random numbers it would draw in a single-process run (draw folds in
  the row index).
  Returns SampleOutput with (B, max_new_tokens) arrays.
  """
  tokens, mask = check_prompts(cfg, prompt_tokens, prompt_mask)
  check_decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 greedy=greedy, decode_segments=decode_segments)
  if mesh is not None:
    if not bucket:
      raise ValueError('sample(mesh=...) always buckets the batch (its rows must split over the mesh); '
                       'drop bucket=False.')
    return _sample_on_mesh(cfg, params, tokens, mask, key, mesh=mesh, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                           stop_token_ids=stop_token_ids, pad_id=pad_id, process_local=process_local,
                           unroll_layers=unroll_layers, decode_segments=decode_segments, attention=attention)
  if process_local:
    raise ValueError('process_local=True splits the rows over a mesh\'s processes; pass mesh=... too.')
  B, P = tokens.shape
  if unroll_layers is None:
    unroll_layers = isinstance(params, DecodeParams) or unroll_layers_default()
  unroll_layers = bool(unroll_layers)
  attention = resolve_attention(cfg, attention, unroll_layers)
  Bp = batch_bucket(cfg, B, unroll_layers) if bucket else B
  Pp = bucket_size(P, LENGTH_BUCKET_STEP, MIN_LENGTH_BUCKET) if bucket else P
  tokens, mask, live_rows = pad_prompts(tokens, mask, Bp, Pp, pad_id)
  greedy, top_k, use_top_p = decoding_statics(cfg, greedy, top_k, top_p)
  in_kernel = unroll_layers and kernel_products(cfg, attention, Bp)
  out = _sample_padded(
      sampler_model(cfg, params, unroll_layers), jnp.asarray(tokens), jnp.asarray(mask),
      jnp.asarray(live_rows), key,
      jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p), jnp.asarray(stop_id_array(stop_token_ids)),
      jnp.int32(pad_id), cfg=cfg, max_new_tokens=int(max_new_tokens), greedy=greedy, top_k=top_k,
      use_top_p=use_top_p, unroll_layers=unroll_layers,
      segments=None if decode_segments is None else int(decode_segments), attention=attention,
      kernel_products=in_kernel)
  if Bp > B:
    out = SampleOutput(*(x[:B] for x in out))
  return out


def _sample_on_mesh(cfg: QwenConfig, params: Params, tokens: np.ndarray, mask: np.ndarray, key, *, mesh: Mesh,
                    max_new_tokens: int, temperature: float, top_k: int, top_p: float, greedy: bool,
                    stop_token_ids: Iterable[int], pad_id: int, process_local: bool,
                    unroll_layers: bool | None, decode_segments: int | None,
                    attention: str | None) -> SampleOutput:
  """sample's mesh path on checked prompts (B, P): the batch split over ('data', 'fsdp'), params as placed."""
  B, P = tokens.shape
  unroll = unroll_layers_default() if unroll_layers is None else bool(unroll_layers)
  attention = resolve_attention(cfg, attention, unroll)
  if process_local and jax.process_count() > 1:
    shapes = multihost_utils.process_allgather(np.asarray([B, P], np.int32))
    if np.any(shapes != shapes[:1]):
      raise ValueError(f'process-local prompt batches must have one shape on every process; got (rows, width) '
                       f'{shapes.tolist()} by process. Pad the prompts to the widest (rollout.collect\'s '
                       'prompt_width does) and give every process the same number of prompts.')
    Bp = B
  else:
    process_local = False
    Bp = batch_bucket(cfg, B, unroll, sharding.batch_shards(mesh))
  Pp = bucket_size(P, LENGTH_BUCKET_STEP, MIN_LENGTH_BUCKET)
  tokens, mask, live = pad_prompts(tokens, mask, Bp, Pp, pad_id)
  rows = sharding.shard_batch({'tokens': tokens, 'mask': mask, 'live': live}, mesh, process_local=process_local)
  rep = lambda x: sharding.shard(x, mesh, PartitionSpec())
  greedy, top_k, use_top_p = decoding_statics(cfg, greedy, top_k, top_p)
  stops = stop_id_array(stop_token_ids)
  with jax.sharding.set_mesh(mesh):
    out = _sample_padded(
        sampler_model(cfg, params, unroll), rows['tokens'], rows['mask'], rows['live'], rep(key),
        rep(np.float32(1.0 if greedy else temperature)), rep(np.float32(top_p)), rep(stops),
        rep(np.int32(pad_id)), cfg=cfg, max_new_tokens=int(max_new_tokens), greedy=greedy, top_k=top_k,
        use_top_p=use_top_p, unroll_layers=unroll,
        segments=None if decode_segments is None else int(decode_segments), attention=attention)
  if process_local:   # rows split as the prompts were (the partitioner may have chosen otherwise)
    out = jax.device_put(tuple(out), NamedSharding(mesh, sharding.batch_spec(mesh, Bp)))
    return SampleOutput(*(sharding.local_rows(x) for x in out))
  return SampleOutput(*(x[:B] for x in sharding.to_host(tuple(out))))
