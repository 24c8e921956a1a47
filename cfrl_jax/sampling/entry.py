"""sample(): the sampler's entry, on one device or with the batch split over a mesh.

It checks the prompts and decoding arguments, buckets and pads the batch (prompt_batch), resolves
the static choices (layer unrolling, attention form, kernel products) and runs
decode_loop.sample_padded; with mesh=... the rows are placed over ('data', 'fsdp') first.
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cfrl_jax import sharding
from cfrl_jax.models.qwen import Params, QwenConfig
from cfrl_jax.sampling import decode_layout, decode_loop
from cfrl_jax.sampling.decode_layout import DecodeParams, resolve_attention, unroll_layers_default
from cfrl_jax.sampling.decode_loop import SampleOutput
from cfrl_jax.sampling.prompt_batch import (LENGTH_BUCKET_STEP, MIN_LENGTH_BUCKET, batch_bucket, bucket_size,
                                            check_decoding, check_prompts, decoding_statics, pad_prompts,
                                            stop_id_array)
from cfrl_jax.sampling.unrolled_forward import kernel_products


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
  compiled CPU kernel cpu_decode.decode_attention) or 'xla' (XLA ops); default attention_default
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
  out = decode_loop.sample_padded(
      decode_layout.sampler_model(cfg, params, unroll_layers), jnp.asarray(tokens), jnp.asarray(mask),
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
    out = decode_loop.sample_padded(
        decode_layout.sampler_model(cfg, params, unroll), rows['tokens'], rows['mask'], rows['live'], rep(key),
        rep(np.float32(1.0 if greedy else temperature)), rep(np.float32(top_p)), rep(stops),
        rep(np.int32(pad_id)), cfg=cfg, max_new_tokens=int(max_new_tokens), greedy=greedy, top_k=top_k,
        use_top_p=use_top_p, unroll_layers=unroll,
        segments=None if decode_segments is None else int(decode_segments), attention=attention)
  if process_local:   # rows split as the prompts were (the partitioner may have chosen otherwise)
    out = jax.device_put(tuple(out), NamedSharding(mesh, sharding.batch_spec(mesh, Bp)))
    return SampleOutput(*(sharding.local_rows(x) for x in out))
  return SampleOutput(*(x[:B] for x in sharding.to_host(tuple(out))))
