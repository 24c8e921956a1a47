"""Autoregressive sampling: one jitted prefill + decode loop over a preallocated KV cache.

    out = sampling.sample(cfg, params, prompt_tokens, prompt_mask, key, max_new_tokens=256,
                          temperature=1.0, top_p=0.95, stop_token_ids=(eos,), pad_id=pad)
    out.tokens (B, N), out.mask (B, N), out.logprobs (B, N), out.sample_logprobs (B, N)

Prompts are LEFT-padded (B, P) arrays (see cfrl_jax.tokenization.encode_prompts), so every
prompt ends in column P-1: the prefill writes slots [0, P) of the cache and step t of the decode
writes slot P + t - 1 for the whole batch. Positions come from the real-token counts, so padding
never shifts RoPE.

The modules, from the bottom up:
  token_choice      temperature / top-k / top-p filtering, the draw, the greedy pick.
  decode_layout     the policy's weights and the KV cache laid out for the unrolled sampler
                    (prepare_decode, sampler_model, LayerKV) and the attention choice that fixes
                    the cache layout.
  unrolled_forward  prefill and decode step through the unrolled layers: XLA products or the
                    compiled CPU kernels (cfrl_jax/kernels/cpu_decode), attention forms, greedy head.
  decode_loop       the jitted prefill + lax.while_loop (sample_padded), in segments on CPU.
  prompt_batch      argument checks and the batch / length buckets.
  entry             sample(): one device, or the batch split over a mesh (mesh=...).

The decode step is kept lean: logits are computed for one position per row (never over the
prompt again), the cache is updated in place inside one lax.while_loop that exits as soon as
every row has stopped, and on CPU the layers are unrolled over per-layer fused (out, in) weights
and per-layer caches. In bfloat16 every matrix product accumulates in float32 and returns
bfloat16 (XLA:CPU's fast bf16 kernels need the float32 result type), and bf16 data is moved as
uint16 bits (decode_layout.bits).

This package re-exports the public names of its modules, so `sampling.sample`,
`sampling.prepare_decode`, `sampling.unroll_layers_default` etc. need no submodule.
"""
from cfrl_jax.sampling.decode_layout import (ATTENTION_CHOICES, WEIGHT_MAJOR_MAX_ROWS, DecodeParams, LayerKV,
                                             attention_default, attention_form, cache_slots, check_attention,
                                             decode_weights, init_layer_kv, prepare_decode, resolve_attention,
                                             sampler_model, unroll_layers_default)
from cfrl_jax.sampling.decode_loop import (MAX_DECODE_SEGMENTS, MIN_SEGMENT_STEPS, SampleOutput,
                                           compile_cache_size, decode_segments_default, decode_windows)
from cfrl_jax.sampling.entry import sample
from cfrl_jax.sampling.prompt_batch import (BATCH_BUCKET_STEP, LENGTH_BUCKET_STEP, MIN_LENGTH_BUCKET, batch_bucket,
                                            bucket_size, check_decoding, check_prompts, decoding_statics,
                                            min_batch_bucket, pad_prompts, stop_id_array)
from cfrl_jax.sampling.token_choice import draw, first_argmax, sampling_logits
from cfrl_jax.sampling.unrolled_forward import (BF16_KERNEL_PRODUCTS_MAX_ROWS, HEAD_WEIGHT_MAJOR_MAX_ROWS,
                                                MATVEC_MAX_ROWS, kernel_product, kernel_products,
                                                weight_major_logits)

__all__ = [
    'ATTENTION_CHOICES', 'BATCH_BUCKET_STEP', 'BF16_KERNEL_PRODUCTS_MAX_ROWS', 'DecodeParams',
    'HEAD_WEIGHT_MAJOR_MAX_ROWS', 'LENGTH_BUCKET_STEP', 'LayerKV', 'MATVEC_MAX_ROWS', 'MAX_DECODE_SEGMENTS',
    'MIN_LENGTH_BUCKET', 'MIN_SEGMENT_STEPS', 'SampleOutput', 'WEIGHT_MAJOR_MAX_ROWS', 'attention_default',
    'attention_form', 'batch_bucket', 'bucket_size', 'cache_slots', 'check_attention', 'check_decoding',
    'check_prompts', 'compile_cache_size', 'decode_segments_default', 'decode_weights', 'decode_windows',
    'decoding_statics', 'draw', 'first_argmax', 'init_layer_kv', 'kernel_product', 'kernel_products',
    'min_batch_bucket', 'pad_prompts', 'prepare_decode', 'resolve_attention', 'sample', 'sampler_model',
    'sampling_logits', 'stop_id_array', 'unroll_layers_default', 'weight_major_logits',
]
