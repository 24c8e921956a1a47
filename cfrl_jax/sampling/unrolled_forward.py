"""The decoder unrolled over decode_layout's per-layer weights and caches: prefill and decode step.

cached_forward runs T tokens per row through every layer (cached_layer: qwen._layer's maths),
writing their keys and values into a LayerKV. What varies is how a step computes, chosen by rows
and dtype: its matrix products run as XLA products (weight-major for few rows, matvec) or in the
compiled CPU kernels (kernel_products, kernel_product), its attention in the form the cache is
laid out for (decode_layout.attention_form), and a greedy step over many rows picks its token in
the kernel straight from weight-major logits (greedy_head).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cfrl_jax.kernels import cpu_decode
from cfrl_jax.models import qwen
from cfrl_jax.models.qwen import Params, QwenConfig
from cfrl_jax.sampling.decode_layout import (WEIGHT_MAJOR_MAX_ROWS, DecodeParams, LayerKV, attention_form,
                                             bits, unbits)


# Most rows for which the head's (V, B) weight-major logits are worth transposing back to (B, V)
# (head_logits): the transpose of a vocabulary-wide result grows with the rows, the weight streaming
# it saves does not.
HEAD_WEIGHT_MAJOR_MAX_ROWS = 16


def matvec(x, w, dtype, bias=None, *, weight_major: bool = False, kernel: bool = False):
  """x (B, in) times an (out, in) matrix -> (B, out) in dtype, accumulated in float32.

  The float32 result type is also what makes XLA:CPU take its fast bfloat16 kernel: a bf16 x bf16
  -> bf16 dot runs on a much slower path than the same dot with a float32 result.

  weight_major (static): compute the product as w x^T, (out, B), and transpose that small result.
  For a few rows XLA:CPU's library kernel streams the weights much faster with the weight as the
  left operand (M = out, N = B) than as the right one (M = B), in float32 and in bfloat16. The
  optimization barrier keeps XLA from folding the transpose back into the product's output layout,
  which restores the slow form.
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


def head_logits(cfg: QwenConfig, head: Params, phi, *, weight_major: bool):
  """qwen.logits for one position per row, phi (B, d) -> (B, V) float32, optionally weight-major."""
  if not weight_major:
    return qwen.logits(cfg, head, phi)
  return jax.lax.optimization_barrier(weight_major_logits(cfg, head, phi)).T


# Most rows for which a kernel product streams the weights as dot products (cpu_decode.matvec);
# float32 products of more rows run register-blocked (cpu_decode.matmul). A dot product per row and
# output reads each weight once per row, which is cheapest while the rows are few; a register-blocked
# product reuses each loaded weight across rows, which wins as rows grow (the two met at 4 rows on
# bench_decode's model).
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


def greedy_head(cfg: QwenConfig, head: Params, phi):
  """Greedy tokens (B,) int32 and their log-probs (B,) from phi (B, d) with the compiled CPU kernel
  cpu_decode.greedy_pick: the same as first_argmax and logprob_of over qwen.logits.

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
  (static): how the products run (see matvec).
  """
  dt = cfg.compute_dtype
  product = lambda name, x: matvec(x, w[name], dt, w.get(f'{name}_bias'), weight_major=weight_major,
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
  store = lambda x, cache: bits(x.astype(dt)) if cache.dtype == jnp.uint16 else x.astype(cache.dtype)
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
    # whose queries XLA:CPU first transposes element by element into the layout its product wants
    # (a sizeable part of a bfloat16 prefill in a profile). The kernel reads q as the layer's product
    # lays it out.
    length = jnp.broadcast_to(slot + 1 + jnp.arange(T, dtype=jnp.int32), (B, T))
    attn = cpu_decode.decode_attention(qg, k_cache, v_cache, key_mask, length)
  elif prefill:
    # In float32 whatever the compute dtype: these T x T products are a small part of a bf16
    # prefill, and XLA:CPU's fallback kernel for batched products has no bf16 x bf16 -> f32
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
    # one another, which ran slower in bfloat16 and no faster in float32.
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


def cached_forward(cfg: QwenConfig, model: DecodeParams, tokens, positions, kv: LayerKV, mask=None, *,
                   attention: str = 'xla', kernel_products: bool = False, rope=None):
  """T tokens per row through the decoder, layers unrolled over decode_weights and per-layer caches.

  tokens, positions: (B, T) int32. mask: (B, T) real-token mask of a prefill (the caches must be
  empty, kv.index 0); None for a decode step (T = 1, every row's token is real). Returns
  (phi (B, T, d), kv with the new keys/values at slots [kv.index, kv.index + T)). A decode step
  of at most WEIGHT_MAJOR_MAX_ROWS rows runs its products weight-major (see matvec). attention
  (static): see attention_form; kv must be laid out for it (init_layer_kv). kernel_products
  (static): a decode step runs its products with the compiled kernels (see kernel_products).
  rope: optional (cos, sin) tables (n, hd) over positions 0..n-1 (qwen.rope_tables), from which the
  positions' rows are gathered. Why: XLA:CPU fused the cos / sin of the positions into every layer's
  query and key loops, recomputing them per head and per layer; a gather is cheap to repeat.
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
  h = unbits(jnp.take(model.embed, tokens, axis=0), cfg.compute_dtype)
  ks, vs = list(kv.k), list(kv.v)
  for l, w in enumerate(model.layers):
    h, ks[l], vs[l] = _cached_layer(cfg, w, h, cos, sin, ks[l], vs[l], slot, key_mask, prefill=prefill,
                                    form=form, weight_major=weight_major,
                                    kernel_products=kernel_products and not prefill)
  phi = qwen.rms_norm(h, model.final_norm, cfg.rms_norm_eps)
  return phi, LayerKV(tuple(ks), tuple(vs), key_mask, slot + T)
