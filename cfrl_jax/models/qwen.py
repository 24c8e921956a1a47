"""Qwen2 / Qwen2.5 / Qwen3 dense decoders: Flax linen modules behind a pure-function API.

The parameters are split at the one seam that CF-RL, the NTK probes and the
rank-1 analysis all use:

    params = {'backbone': {...}, 'head': {'w': (V, d)}}     # tie == 'untied'
    params = {'backbone': {...}, 'head': {}}                # tie == 'tied' (head IS backbone['embed'])

    phi, cache = features(cfg, params['backbone'], tokens, mask)      # (B, T, d), after final norm
    z = logits(cfg, head_params(cfg, params), phi)                    # (B, T, V), at least float32

`features` is `Backbone(cfg).apply({'params': backbone}, ...)` and `logits` is
`Head(cfg).apply({'params': head}, phi)`: the modules hold no state, so the policy stays a pure
function of two plain parameter dicts that jax.grad / jvp / vmap take apart freely.

Backbone tree (the HF-mapped names; layers stacked on a leading axis of size L by nn.scan):

    embed (V, d); final_norm (d,)
    layers/input_norm (L, d); layers/post_attn_norm (L, d)
    layers/{q,k,v,o}_proj/kernel (L, in, out); layers/{q,k,v}_proj/bias (L, out)   [Qwen2, or Qwen3 attention_bias]
    layers/o_proj/bias (L, d)                                                     [Qwen3 attention_bias]
    layers/{q,k}_norm (L, head_dim)                                               [Qwen3]
    layers/{gate,up,down}_proj/kernel (L, in, out)

Kernels are stored (in, out), i.e. transposed relative to torch's (out, in). Every parameter and
the residual stream carry logical axis names (`param_axes()`; the list is above `Dense` below);
the mesh axes they map to are rules in cfrl_jax/sharding.py (LOGICAL_RULES, config.mesh.logical_rules).

Numerics: matmuls run in cfg.dtype; RMSNorm, attention scores, softmax, silu and logits run in
promote_types(cfg.dtype, float32), as HF does for 16-bit models: float32 for bfloat16 / float32
models, float64 throughout for a float64 model.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfrl_jax import sharding

Params = dict[str, Any]

SUPPORTED_MODEL_TYPES = ('qwen2', 'qwen3')
TIE_CHOICES = ('tied', 'untied')


@dataclasses.dataclass(frozen=True)
class QwenConfig:
  """Architecture plus numerics of a dense Qwen model.

  `tie` is the state of the policy: 'tied' means logits use the input
  embedding (exact HF semantics of tie_word_embeddings=True); 'untied' means the
  head owns its own (V, d) matrix. `untied_from_tied` records that an untied head
  started as a copy of a tied checkpoint's embedding (the CF-RL default).
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  model_type: str = 'qwen2'
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  attention_bias: bool = True      # bias on q/k/v projections
  o_bias: bool = False             # bias on the output projection (Qwen3 with attention_bias)
  qk_norm: bool = False            # per-head RMSNorm on q and k (Qwen3)
  tie: str = 'untied'
  untied_from_tied: bool = False
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int | None = None
  dtype: str = 'float32'           # compute dtype of matmuls
  param_dtype: str = 'float32'     # storage dtype of parameters
  remat: bool = False              # rematerialise each layer in the backward pass (nn.remat)

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f'Unsupported model_type {self.model_type!r}: cfrl_jax implements the dense '
          f'{SUPPORTED_MODEL_TYPES} architectures only (no MoE, Llama, ...).')
    if self.tie not in TIE_CHOICES:
      raise ValueError(f'tie={self.tie!r}; expected one of {TIE_CHOICES}.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}.')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in ('float32', 'bfloat16', 'float16', 'float64'):
        raise ValueError(f'{name}={getattr(self, name)!r}; expected float32, bfloat16, float16 or float64.')

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> 'QwenConfig':
    return dataclasses.replace(self, **kw)

  # --- transformers config.json <-> QwenConfig -------------------------------
  @classmethod
  def from_hf_dict(cls, d: dict, **overrides) -> 'QwenConfig':
    """Builds a config from a transformers Qwen2Config/Qwen3Config dict (config.json)."""
    model_type = d.get('model_type')
    if model_type not in SUPPORTED_MODEL_TYPES:
      archs = d.get('architectures')
      raise ValueError(
          f'config.json has model_type={model_type!r} (architectures={archs}); cfrl_jax supports '
          f'the dense Qwen2/Qwen2.5/Qwen3 models ({SUPPORTED_MODEL_TYPES}). MoE and other families '
          'are not implemented.')
    if d.get('hidden_act', 'silu') != 'silu':
      raise ValueError(f"hidden_act={d['hidden_act']!r}; Qwen models use 'silu'.")
    if d.get('use_sliding_window', False):
      raise ValueError('use_sliding_window=True is not supported: every layer uses full attention here.')
    rope = d.get('rope_parameters') or d.get('rope_scaling') or {}
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if rope_type != 'default':
      raise ValueError(f'rope type {rope_type!r} is not supported (only the default RoPE).')
    rope_theta = rope.get('rope_theta', d.get('rope_theta', 10000.0))
    heads = d['num_attention_heads']
    head_dim = d.get('head_dim') or d['hidden_size'] // heads
    eos = d.get('eos_token_id')
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    if model_type == 'qwen2':
      bias = dict(attention_bias=True, o_bias=False, qk_norm=False)
    else:
      ab = bool(d.get('attention_bias', False))
      bias = dict(attention_bias=ab, o_bias=ab, qk_norm=True)
    kw = dict(
        vocab_size=d['vocab_size'], hidden_size=d['hidden_size'],
        intermediate_size=d['intermediate_size'], num_layers=d['num_hidden_layers'],
        num_heads=heads, num_kv_heads=d.get('num_key_value_heads') or heads,
        head_dim=head_dim, model_type=model_type, rope_theta=float(rope_theta),
        rms_norm_eps=d.get('rms_norm_eps', 1e-6),
        tie='tied' if d.get('tie_word_embeddings', False) else 'untied',
        untied_from_tied=bool(d.get('cfrl_untied_from_tied', False)),
        max_position_embeddings=d.get('max_position_embeddings', 32768),
        bos_token_id=d.get('bos_token_id'), eos_token_id=eos,
        pad_token_id=d.get('pad_token_id'), **bias)
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict:
    d = {
        'model_type': self.model_type,
        'architectures': ['Qwen2ForCausalLM' if self.model_type == 'qwen2' else 'Qwen3ForCausalLM'],
        'vocab_size': self.vocab_size, 'hidden_size': self.hidden_size,
        'intermediate_size': self.intermediate_size, 'num_hidden_layers': self.num_layers,
        'num_attention_heads': self.num_heads, 'num_key_value_heads': self.num_kv_heads,
        'head_dim': self.head_dim, 'hidden_act': 'silu',
        'max_position_embeddings': self.max_position_embeddings,
        'rms_norm_eps': self.rms_norm_eps,
        'rope_theta': self.rope_theta,
        'rope_parameters': {'rope_type': 'default', 'rope_theta': self.rope_theta},
        'tie_word_embeddings': self.tie == 'tied',
        'cfrl_untied_from_tied': self.untied_from_tied,
        'use_sliding_window': False, 'use_cache': True,
        'bos_token_id': self.bos_token_id,
        'eos_token_id': (list(self.eos_token_id) if len(self.eos_token_id) > 1
                         else (self.eos_token_id[0] if self.eos_token_id else None)),
        'pad_token_id': self.pad_token_id,
        'torch_dtype': self.param_dtype, 'dtype': self.param_dtype,
    }
    if self.model_type == 'qwen3':
      d['attention_bias'] = self.attention_bias
    return d



# --- numerics ----------------------------------------------------------------
def promoted(dtype):
  """The dtype of reductions and softmax for a compute dtype: at least float32, never lower than it."""
  return jnp.promote_types(dtype, jnp.float32)


# --- parameters -------------------------------------------------------------
def init_params(cfg: QwenConfig, key: jax.Array, std: float = 0.02) -> Params:
  """Random parameters with HF's initialisation (normal(0, std) weights, zero biases, unit norms).

  The tree is the one `Backbone(cfg).init` / `Head(cfg).init` build (tests/test_qwen.py checks
  paths, shapes and dtypes), but the draws come from one key split in a fixed order, so a seed
  gives the same model as it did before the modules existed (pretrained bases, tuned tests).
  """
  L, d, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  pdt = jnp.dtype(cfg.param_dtype)
  keys = iter(jax.random.split(key, 16))
  normal = lambda shape: (std * jax.random.normal(next(keys), shape, promoted(pdt))).astype(pdt)
  layers = {
      'input_norm': jnp.ones((L, d), pdt),
      'post_attn_norm': jnp.ones((L, d), pdt),
      'q_proj': {'kernel': normal((L, d, qd))},
      'k_proj': {'kernel': normal((L, d, kvd))},
      'v_proj': {'kernel': normal((L, d, kvd))},
      'o_proj': {'kernel': normal((L, qd, d))},
      'gate_proj': {'kernel': normal((L, d, F))},
      'up_proj': {'kernel': normal((L, d, F))},
      'down_proj': {'kernel': normal((L, F, d))},
  }
  if cfg.attention_bias:
    for name, n in (('q_proj', qd), ('k_proj', kvd), ('v_proj', kvd)):
      layers[name]['bias'] = jnp.zeros((L, n), pdt)
  if cfg.o_bias:
    layers['o_proj']['bias'] = jnp.zeros((L, d), pdt)
  if cfg.qk_norm:
    layers['q_norm'] = jnp.ones((L, cfg.head_dim), pdt)
    layers['k_norm'] = jnp.ones((L, cfg.head_dim), pdt)
  backbone = {'embed': normal((V, d)), 'layers': layers, 'final_norm': jnp.ones((d,), pdt)}
  head = {} if cfg.tie == 'tied' else {'w': normal((V, d))}
  return {'backbone': backbone, 'head': head}


def head_params(cfg: QwenConfig, params: Params) -> Params:
  """The head tree that `logits` takes: {'w': (V, d)}; for a tied model, the input embedding itself."""
  if cfg.tie == 'tied':
    return {'w': params['backbone']['embed']}
  return params['head']


def untie(cfg: QwenConfig, params: Params) -> tuple[QwenConfig, Params]:
  """Gives a tied model its own head, initialised as a copy of the embedding (same logits)."""
  if cfg.tie == 'untied':
    return cfg, params
  head = {'w': jnp.array(params['backbone']['embed'], copy=True)}
  return cfg.replace(tie='untied', untied_from_tied=True), {'backbone': params['backbone'], 'head': head}


def count_params(params: Params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


# --- building blocks --------------------------------------------------------
def rms_norm(x, weight, eps):
  """RMSNorm in promoted(x.dtype), then cast back, as HF Qwen2RMSNorm does (in float32)."""
  dt = x.dtype
  xf = x.astype(promoted(dt))
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight.astype(dt) * xf.astype(dt)


def rope_tables(positions, head_dim, theta, dtype=jnp.float32):
  """cos, sin of shape (B, T, head_dim) for integer positions (B, T) (HF's rotate-half layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim))
  freqs = positions.astype(dtype)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x: (B, T, H, hd); cos/sin: (B, T, hd)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def swiglu(gate, up):
  """silu(gate) * up in gate's dtype, with silu computed in promoted(dtype) and rounded once.

  torch's bfloat16 silu does the same; XLA would round after each of its ops (negate, exp, add,
  divide), which also made this the slowest elementwise loop of a bfloat16 prefill on CPU
  (bench/bench_decode.py's prefill profile).
  """
  return jax.nn.silu(gate.astype(promoted(gate.dtype))).astype(gate.dtype) * up


def _dense(x, p, dtype):
  # Flattened to one 2-D matmul: XLA:CPU lowers the weight-gradient dot of 3-D operands with
  # transposing copies (bench/bench_learner.py's `3-D dense` ablation).
  y = (x.reshape(-1, x.shape[-1]) @ p['kernel'].astype(dtype)).reshape(*x.shape[:-1], -1)
  if 'bias' in p:
    y = y + p['bias'].astype(dtype)
  return y


def positions_from_mask(mask, offset=None):
  """Positions (B, T) of left-padded tokens: 0 at the first real token; pads get 0.

  `offset` (B,) is the number of real tokens already in the KV cache.
  """
  pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
  if offset is not None:
    pos = pos + offset[:, None]
  return jnp.maximum(pos, 0)


class KVCache(NamedTuple):
  """Preallocated keys/values for all layers.

  k, v: (L, B, S, Hkv, hd); mask: (B, S) int32, 1 where a slot holds a real token;
  index: () int32, the next slot to write (the same for the whole batch).
  """
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array


def init_cache(cfg: QwenConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  dtype = dtype or cfg.compute_dtype
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                 jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def _attention(cfg, q, k, v, q_slots, key_mask):
  """Grouped-query attention.

  q: (B, T, Hq, hd); k, v: (B, S, Hkv, hd); q_slots: (T,) slot index of each query
  along the key axis; key_mask: (B, S). Causality is by slot: query at slot i sees
  keys at slots <= i that hold real tokens.
  """
  B, T, Hq, hd = q.shape
  S, Hkv = k.shape[1], k.shape[2]
  q = q.reshape(B, T, Hkv, Hq // Hkv, hd)
  acc = promoted(q.dtype)
  scores = jnp.einsum('btkgh,bskh->bkgts', q, k, preferred_element_type=acc)
  scores = scores / math.sqrt(hd)
  allowed = (jnp.arange(S)[None, :] <= q_slots[:, None])[None] & (key_mask[:, None, :] > 0)
  # A finite minimum, not -inf: a fully masked row (a left pad) must not produce NaN.
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(acc).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskh->btkgh', probs, v)
  return out.reshape(B, T, Hq * hd)


# --- modules -----------------------------------------------------------------
# Logical axis names. Parameters: 'vocab', 'embed' (the model dimension d of a weight matrix),
# 'heads' / 'kv_heads' (query / key-value head features), 'mlp', 'layers' (the scanned stack),
# 'norm' (norm scales and the o_proj bias: vectors that scale or shift the residual stream) and
# 'head_dim'. The residual stream (B, T, d): sharding.ACTIVATION_AXES ('batch', 'length', 'act_embed').
# cfrl_jax/sharding.py maps the names to mesh axes (LOGICAL_RULES, config.mesh.logical_rules).


def _normal(std):
  """normal(0, std) drawn in promoted(dtype), then cast: what init_params does."""
  def init(key, shape, dtype):
    return (std * jax.random.normal(key, shape, promoted(dtype))).astype(dtype)
  return init


class Dense(nn.Module):
  """x @ kernel (+ bias) in the compute dtype; kernel (in, out) named by axes = (in, out), the bias
  by bias_axis (default: the output axis)."""
  features: int
  axes: tuple[str, str]
  use_bias: bool
  dtype: Any
  param_dtype: Any
  init_std: float = 0.02
  bias_axis: str | None = None

  @nn.compact
  def __call__(self, x):
    p = {'kernel': self.param('kernel', nn.with_logical_partitioning(_normal(self.init_std), self.axes),
                              (x.shape[-1], self.features), self.param_dtype)}
    if self.use_bias:
      p['bias'] = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  (self.bias_axis or self.axes[1],)),
                             (self.features,), self.param_dtype)
    return _dense(x, p, self.dtype)


class DecoderLayer(nn.Module):
  """One decoder block: attention then SwiGLU MLP, each with a pre-RMSNorm and a residual.

  Scanned by Backbone (nn.scan), so its parameters gain the leading 'layers' axis. Called as
  (carry, layer, rope, q_slots, key_mask, start) -> (carry, None) with carry = (h, kv):
  h (B, T, d); kv None, or the stacked caches (ks, vs) (L, B, S, Hkv, hd) into which this layer
  (index `layer`) writes its T keys / values at slot `start` before attending over all S slots.
  rope: (cos, sin) (B, T, hd); q_slots: (T,) slot of each query; key_mask: (B, S).
  """
  cfg: QwenConfig
  init_std: float = 0.02

  def _vector(self, name, size, axis):
    return self.param(name, nn.with_logical_partitioning(nn.initializers.ones, (axis,)), (size,),
                      jnp.dtype(self.cfg.param_dtype))

  def _dense(self, name, features, axes, use_bias, bias_axis=None):
    return Dense(features, axes, use_bias, self.cfg.compute_dtype, jnp.dtype(self.cfg.param_dtype),
                 self.init_std, bias_axis, name=name)

  @nn.compact
  def __call__(self, carry, layer, rope, q_slots, key_mask, start):
    cfg = self.cfg
    h, kv = carry
    B, T, d = h.shape
    H, Hkv, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    x = rms_norm(h, self._vector('input_norm', d, 'norm'), eps)
    q = self._dense('q_proj', H * hd, ('embed', 'heads'), cfg.attention_bias)(x).reshape(B, T, H, hd)
    k = self._dense('k_proj', Hkv * hd, ('embed', 'kv_heads'), cfg.attention_bias)(x).reshape(B, T, Hkv, hd)
    v = self._dense('v_proj', Hkv * hd, ('embed', 'kv_heads'), cfg.attention_bias)(x).reshape(B, T, Hkv, hd)
    if cfg.qk_norm:
      q = rms_norm(q, self._vector('q_norm', hd, 'head_dim'), eps)
      k = rms_norm(k, self._vector('k_norm', hd, 'head_dim'), eps)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if kv is None:
      keys, values = k, v
    else:
      ks, vs = kv
      ks = jax.lax.dynamic_update_slice(ks, k[None].astype(ks.dtype), (layer, 0, start, 0, 0))
      vs = jax.lax.dynamic_update_slice(vs, v[None].astype(vs.dtype), (layer, 0, start, 0, 0))
      keys, values, kv = ks[layer].astype(k.dtype), vs[layer].astype(v.dtype), (ks, vs)
    attn = _attention(cfg, q, keys, values, q_slots, key_mask)
    h = h + self._dense('o_proj', d, ('heads', 'embed'), cfg.o_bias, bias_axis='norm')(attn)
    x = rms_norm(h, self._vector('post_attn_norm', d, 'norm'), eps)
    gate = self._dense('gate_proj', cfg.intermediate_size, ('embed', 'mlp'), False)(x)
    up = self._dense('up_proj', cfg.intermediate_size, ('embed', 'mlp'), False)(x)
    h = h + self._dense('down_proj', d, ('mlp', 'embed'), False)(swiglu(gate, up))
    if kv is None:
      # Under a mesh, keep the residual stream split by rows: each layer's output would
      # otherwise follow the weights' sharding.
      h = sharding.constrain_logical(h, sharding.ACTIVATION_AXES)
    return (h, kv), None


class Backbone(nn.Module):
  """Embedding, L decoder layers under nn.scan, final RMSNorm: tokens -> phi.

  __call__(tokens, mask=None, positions=None, cache=None) -> (phi (B, T, d), cache or None), as
  `features` documents. With cfg.remat (and no cache) each layer is rematerialised in the
  backward pass (nn.remat inside the scan: one layer's activations live at a time).
  """
  cfg: QwenConfig
  init_std: float = 0.02

  @nn.compact
  def __call__(self, tokens, mask=None, positions=None, cache: KVCache | None = None):
    cfg = self.cfg
    B, T = tokens.shape
    pdt = jnp.dtype(cfg.param_dtype)
    mask = jnp.ones((B, T), jnp.int32) if mask is None else mask.astype(jnp.int32)
    if positions is None:
      positions = positions_from_mask(mask, None if cache is None else cache.mask.sum(-1))
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, promoted(cfg.compute_dtype))
    embed = self.param('embed', nn.with_logical_partitioning(_normal(self.init_std), ('vocab', 'embed')),
                       (cfg.vocab_size, cfg.hidden_size), pdt)
    # A vocab-parallel lookup: the table keeps its vocab split (tensor) and is gathered over fsdp only,
    # as every ZeRO-3 weight is. Left to follow the table's ('vocab', 'embed') sharding, XLA's gather
    # came out split on d and had to be replicated to reach the batch-sharded activations
    # ("involuntary full rematerialization", tests/test_parallel.py).
    embed = sharding.constrain_logical(embed, ('vocab', None))
    h = jnp.take(embed, tokens, axis=0).astype(cfg.compute_dtype)
    h = sharding.constrain_logical(h, sharding.ACTIVATION_AXES)

    layer = nn.remat(DecoderLayer) if cfg.remat and cache is None else DecoderLayer
    layers = nn.scan(layer, variable_axes={'params': 0}, split_rngs={'params': True},
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                     length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})(
                         cfg, self.init_std, name='layers')
    index = jnp.arange(cfg.num_layers)
    if cache is None:
      (h, _), _ = layers((h, None), index, rope, jnp.arange(T), mask, None)
      new_cache = None
    else:
      start = cache.index
      key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, start))
      (h, (ks, vs)), _ = layers((h, (cache.k, cache.v)), index, rope, start + jnp.arange(T), key_mask, start)
      new_cache = KVCache(ks, vs, key_mask, start + T)
    final_norm = self.param('final_norm', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                            (cfg.hidden_size,), pdt)
    return rms_norm(h, final_norm, cfg.rms_norm_eps), new_cache


class Head(nn.Module):
  """Logits z = W phi: phi (..., d) -> (..., V) in promoted(cfg.dtype). Parameter w (V, d)."""
  cfg: QwenConfig
  init_std: float = 0.02

  @nn.compact
  def __call__(self, phi):
    cfg = self.cfg
    w = self.param('w', nn.with_logical_partitioning(_normal(self.init_std), ('vocab', 'embed')),
                   (cfg.vocab_size, cfg.hidden_size), jnp.dtype(cfg.param_dtype))
    dt = cfg.compute_dtype
    return jnp.einsum('...d,vd->...v', phi.astype(dt), w.astype(dt), preferred_element_type=promoted(dt))


@functools.cache
def _param_axes(cfg: QwenConfig) -> dict[str, tuple]:
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  phi = jax.ShapeDtypeStruct((1, cfg.hidden_size), cfg.compute_dtype)
  trees = {'backbone': jax.eval_shape(Backbone(cfg).init, jax.random.PRNGKey(0), tokens)['params'],
           'head': jax.eval_shape(Head(cfg).init, jax.random.PRNGKey(0), phi)['params']}
  specs = nn.get_partition_spec(trees)
  return {sharding.path_str(path): tuple(spec) for path, spec in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0]}


def param_axes(cfg: QwenConfig | None = None) -> dict[str, tuple]:
  """{'backbone/layers/q_proj/kernel': ('layers', 'embed', 'heads'), ..., 'head/w': ('vocab', 'embed')}:
  the logical axis names the modules give each parameter path (with_logical_partitioning).

  Without cfg: every parameter any Qwen configuration can have (biases, q/k norms, an untied
  head), which is what the sharding rules are generated from.
  """
  if cfg is None:
    cfg = QwenConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                     num_kv_heads=1, head_dim=8, model_type='qwen3', attention_bias=True, o_bias=True,
                     qk_norm=True)
  return _param_axes(cfg)


# --- the functional API --------------------------------------------------------
def features(cfg: QwenConfig, backbone: Params, tokens, mask=None, positions=None,
             cache: KVCache | None = None):
  """Final hidden states phi (after the final RMSNorm): Backbone(cfg) applied to `backbone`.

  tokens: (B, T) int; mask: (B, T) 1 for real tokens (left padding), default all ones;
  positions: (B, T), default derived from the mask (and the cache's real-token count).
  With a cache, the T tokens are written at slots [cache.index, cache.index + T).
  Returns (phi (B, T, d) in the compute dtype, updated cache or None).
  """
  return Backbone(cfg).apply({'params': backbone}, tokens, mask, positions, cache)


def logits(cfg: QwenConfig, head: Params, phi):
  """z = W phi in promoted(cfg.dtype) (float32 for float32 / 16-bit models). head: {'w': (V, d)};
  phi: (..., d) -> (..., V)."""
  return Head(cfg).apply({'params': head}, phi)


def forward(cfg: QwenConfig, params: Params, tokens, mask=None, positions=None,
            cache: KVCache | None = None):
  """Logits (B, T, V) (at least float32) and the updated cache: features then logits."""
  phi, cache = features(cfg, params['backbone'], tokens, mask, positions, cache)
  return logits(cfg, head_params(cfg, params), phi), cache


def token_logprobs(cfg: QwenConfig, params: Params, tokens, mask, temperature: float = 1.0):
  """log pi(tokens[:, t] | tokens[:, :t]) for t >= 1, plus the per-position entropy.

  tokens, mask: (B, T). Returns (logp (B, T-1), entropy (B, T-1)) aligned with tokens[:, 1:].
  """
  z, _ = forward(cfg, params, tokens, mask)
  z = z[:, :-1] / temperature
  logp_all = jax.nn.log_softmax(z, axis=-1)
  logp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, entropy
