"""How the unrolled sampler lays out the policy and its KV cache.

The weights: prepare_decode turns the params tree into DecodeParams, one list entry per layer
with fused (out, in) matrices (decode_weights), 16-bit tables moved as uint16 bits (bits).
sampler_model picks that layout or the params tree itself (the scanned sampler) for the decode
loop; unroll_layers_default says which by backend.

The cache: LayerKV holds one array per layer for keys and for values, in the layout that the
decode step's attention form reads (attention_form: the compiled CPU kernel's key blocks, a
transposed key cache for XLA's fused loops, or plain (B, Hkv, S, hd)); init_layer_kv allocates it,
grow_cache extends its slots between decode segments. The attention choice itself ('kernel' or
'xla', attention_default / resolve_attention) is checked here because it fixes the layout.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cfrl_jax.kernels import cpu_decode
from cfrl_jax.models import qwen
from cfrl_jax.models.qwen import Params, QwenConfig


def bits(x):
  """A 16-bit float array viewed as uint16 (other dtypes unchanged), for pure data movement.

  XLA:CPU moves bfloat16 data (concatenate, transpose, gather) by converting it to float32 and
  back; on the raw bits the same moves are plain copies (and a gather from the embedding no longer
  converts the whole table every call).
  """
  return jax.lax.bitcast_convert_type(x, jnp.uint16) if jnp.dtype(x.dtype).itemsize == 2 else x


def unbits(x, dtype):
  """Inverse of bits: the uint16 view back to `dtype`."""
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x


_to_bits = jax.jit(lambda x, dtype: bits(x.astype(dtype)), static_argnames=('dtype',))


def _embed_bits(embed, dtype):
  """The embedding in dtype, as its uint16 bits for 16-bit dtypes; the array itself when unchanged."""
  return _to_bits(embed, dtype) if jnp.dtype(dtype).itemsize == 2 else embed.astype(dtype)


def decode_weights(cfg: QwenConfig, layers: Params) -> list[dict]:
  """Per-layer weights laid out for one-token decoding: a list of L dicts.

  layers: the backbone's stacked layer tree. Each dict holds the layer's q/k/v kernels fused into
  one (Hq*hd + 2*Hkv*hd, d) matrix, gate and up fused into one (2F, d) matrix, o (d, Hq*hd) and
  down (d, F), all (out, in) and in the compute dtype, plus norms and biases. Built once per
  sample call by prepare_decode (an extra copy of the layer weights while sampling).

  Why: a decode step reads every weight once for a handful of rows, so it is bound by memory
  bandwidth and by the number of kernels launched per step. One matrix per stage halves the
  matmuls, and (out, in) rows are contiguous dot products, which XLA:CPU's matrix-vector kernels
  stream faster than (in, out) columns.
  """
  dt = cfg.compute_dtype
  kernels = {n: bits(layers[n]['kernel'].astype(dt)) for n in
             ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')}
  out = []
  for l in range(cfg.num_layers):
    p = jax.tree_util.tree_map(lambda x, l=l: x[l], layers)
    fused = lambda *names, l=l: unbits(jnp.concatenate([kernels[n][l] for n in names], axis=1).T, dt)
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


_decode_layers = jax.jit(decode_weights, static_argnames=('cfg',))


class DecodeParams(NamedTuple):
  """The policy laid out for the unrolled sampler (see prepare_decode).

  embed: (V, d) input embedding in the compute dtype; for 16-bit dtypes its uint16 bits (see
    bits), so the per-step row gather never converts the table. layers: decode_weights.
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
  XLA:CPU fused the weight transposes into the prefill's products and ran those in float32 (a
  much slower bfloat16 prefill). The embedding and head stay outside that call: already in the
  compute dtype they are the params' own arrays, where a jit would have to return copies of two
  vocabulary-sized tables at every call.
  """
  backbone = params['backbone']
  head = qwen.head_params(cfg, params)
  return DecodeParams(embed=_embed_bits(backbone['embed'], cfg.compute_dtype),
                      layers=_decode_layers(cfg, backbone['layers']), final_norm=backbone['final_norm'],
                      head={'w': head['w'].astype(cfg.compute_dtype)})


def unroll_layers_default() -> bool:
  """Whether the decode loop unrolls the layers by default: on CPU, where a scan over stacked
  weights copies every layer's weights out of the stack at every step (a large share of a decode
  step in a profile). Unrolling holds one extra copy of the layer weights while sampling, so
  accelerators, whose memory is scarcer, keep the scan."""
  return jax.default_backend() == 'cpu'


def sampler_model(cfg: QwenConfig, params: Params | DecodeParams, unroll_layers: bool) -> Params | DecodeParams:
  """What decode_loop.sample_padded takes: prepare_decode(cfg, params) when unrolled, else params itself.

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


def resolve_attention(cfg: QwenConfig, attention: str | None, unroll_layers: bool) -> str:
  """sample's `attention` argument checked, or its default (attention_default) when None."""
  if attention is None:
    return attention_default(cfg) if unroll_layers else 'xla'
  check_attention(cfg, attention)
  if attention == 'kernel' and not unroll_layers:
    raise ValueError("attention='kernel' needs the unrolled sampler (unroll_layers=True); the scanned one "
                     "attends with XLA ops.")
  return attention


# Largest batch for which a decode step's products run weight-major (unrolled_forward.matvec), and
# for which a 16-bit step's XLA attention uses batched products rather than the fused loops
# (attention_form): with few rows the step streams its weights, and the weight-major product streams
# them faster; with more rows the row-major products and the fused attention catch up or win.
WEIGHT_MAJOR_MAX_ROWS = 32


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
  cache to float32 and back. In bfloat16 that pays only for many rows: up to WEIGHT_MAJOR_MAX_ROWS
  the batched products were as fast or faster on bench_decode's model. Both XLA forms stay far
  below memory speed, hence the kernel.
  """
  if attention == 'kernel':
    return 'kernel'
  return 'fused' if jnp.dtype(cfg.compute_dtype).itemsize > 2 or rows > WEIGHT_MAJOR_MAX_ROWS else 'batched'


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


def grow_cache(cfg: QwenConfig, cache, slots: int, attention: str = 'xla'):
  """cache (LayerKV laid out for `attention`, or qwen.KVCache of the scanned sampler) with its slot
  axis zero-padded to slots (cache_slots(...) of them for a LayerKV)."""
  rows = cache.mask.shape[0]
  if isinstance(cache, LayerKV):
    slots = cache_slots(cfg, rows, slots, attention)
  extra = slots - cache.mask.shape[1]

  def pad(x, axis, n=extra):
    # On the uint16 bits: XLA:CPU would move bfloat16 data through float32 (see bits).
    widths = [(0, n if a == axis else 0) for a in range(x.ndim)]
    return unbits(jnp.pad(bits(x), widths), x.dtype)

  mask = pad(cache.mask, 1)
  if isinstance(cache, LayerKV):
    form = attention_form(cfg, rows, attention)
    k_pad = {'batched': lambda k: pad(k, 2), 'fused': lambda k: pad(k, 3),
             'kernel': lambda k: pad(k, 2, extra // cpu_decode.KEY_BLOCK)}[form]
    return LayerKV(tuple(k_pad(k) for k in cache.k), tuple(pad(v, 2) for v in cache.v), mask, cache.index)
  return qwen.KVCache(pad(cache.k, 2), pad(cache.v, 2), mask, cache.index)
