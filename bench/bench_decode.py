"""Greedy decode throughput: cfrl_jax.sampling.sample vs transformers generate, same weights, CPU.

A Qwen2-shaped model (hidden 512, 8 layers, 8 query / 2 KV heads, FFN 1408, vocab 32000, untied)
gets random weights from transformers + torch, is saved with save_pretrained and loaded by
cfrl_jax.models.hf.load_pretrained. Both sides then generate --new_tokens tokens greedily for the
same prompts (each --batch size) of --prompt_len random tokens, every step forced (no stop token for us,
min_new_tokens for transformers), in each --dtype (float32, and bfloat16 weights and compute on both
sides: the dtype RL rollouts run in), with the same number of threads (each thread count of
--threads runs in its own process, pinned to that many cores). Warm-up (compilation)
is excluded; the timed runs alternate ours / theirs so machine load hits both alike, and the
medians are compared. Tokens/s = batch * new_tokens / time of the whole call (prefill included);
ms/step = (time(new_tokens) - time(1)) / (new_tokens - 1), the decode step alone.

A third timing bounds what our decode step can reach: its matrix products alone (the fused
per-layer q/k/v, o, gate/up and down matrices of sampling.decode_weights and the head, chained over
a (batch, hidden) activation in the step's own product form: the compiled kernels where the step
uses them (sampling.kernel_products: float32 at any batch, cpu_decode.matvec up to 4 rows and
cpu_decode.matmul above; bfloat16 up to 16 rows, matvec), else XLA's products, weight-major for
small batches (see sampling.unrolled_forward.matvec); nothing else), jitted and timed in the same
rounds. The decode step cannot be faster than its matrix products, so when that figure exceeds half
of transformers' ms/step, a 2x speed-up is out of reach of this formulation on this machine. A
fourth timing, our sampler with the decode step in XLA ops only (attention='xla', with its default
decode segments: attention, greedy pick and products) instead of the compiled CPU kernels
(cfrl_jax/kernels/cpu_decode.cc, the default where they build), measures what the kernels save.

    python bench/bench_decode.py [--batch 1,8,64 --dtype float32,bfloat16 --prompt_len 64 --new_tokens 128
                                  --reps 5 --threads 2,1]

Writes its section of bench/RESULTS.md (between <!-- bench_decode --> markers).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import results_md  # bench/results_md.py: this directory is on sys.path when a script runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', default='1,8,64',
                 help='comma-separated batch sizes (1: one prompt; 8: memory-bound decode; 64: rows of an RL '
                      'rollout)')
  p.add_argument('--dtype', default='float32,bfloat16',
                 help='comma-separated dtypes of the weights and compute, the same on both sides')
  p.add_argument('--prompt_len', type=int, default=64)
  p.add_argument('--new_tokens', type=int, default=128)
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--threads', default=f'{os.cpu_count()},1',
                 help='comma-separated thread counts, each measured in its own process')
  p.add_argument('--no_write', action='store_true', help='print only; leave RESULTS.md alone')
  p.add_argument('--child', type=int, default=0, help=argparse.SUPPRESS)
  return p.parse_args()


def machine() -> str:
  import jax
  import torch
  import transformers
  return (f'{results_md.host()}; jax {jax.__version__}, '
          f'torch {torch.__version__}, transformers {transformers.__version__}')


def timed(fn):
  """(wall seconds, process CPU seconds) of fn()."""
  w, c = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w, time.process_time() - c


def measure(args, threads: int) -> dict:
  """One thread count, in this process: medians for ours and transformers."""
  # Before jax/torch start their pools: both size them from the CPUs this process may use.
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))
  import jax
  import numpy as np
  import torch
  import transformers
  sys.path.insert(0, ROOT)
  from cfrl_jax import sampling
  from cfrl_jax.kernels import cpu_decode
  from cfrl_jax.models import hf
  from cfrl_jax.sampling import unrolled_forward
  torch.set_num_threads(threads)

  B, P, N = int(args.batch), args.prompt_len, args.new_tokens
  dtype = args.dtype
  hf_config = transformers.Qwen2Config(
      vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
      max_position_embeddings=4096, eos_token_id=0, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    cfg, params = hf.load_pretrained(d, dtype=dtype, param_dtype=dtype)
  model = model.to(getattr(torch, dtype))
  prompts = np.random.RandomState(0).randint(1, cfg.vocab_size, (B, P)).astype(np.int32)
  mask = np.ones((B, P), np.int32)
  key = jax.random.PRNGKey(0)

  attention = sampling.attention_default(cfg)

  def ours(n, attention=attention):
    out = sampling.sample(cfg, params, prompts, mask, key, max_new_tokens=n, greedy=True,
                          stop_token_ids=(), attention=attention)
    return np.asarray(jax.block_until_ready(out.tokens))

  import jax.numpy as jnp
  prepared = sampling.prepare_decode(cfg, params)
  layer_w = [{k: w[k] for k in ('qkv', 'o', 'gate_up', 'down')} for w in prepared.layers]
  head_w = prepared.head['w']                        # (V, d), as qwen.logits reads it
  F = cfg.intermediate_size
  # The step's own product: float32 accumulation, results in the compute dtype.
  rows = sampling.batch_bucket(cfg, B, True)
  kernel_products = sampling.kernel_products(cfg, attention, rows)
  mm = lambda x, w: unrolled_forward.matvec(x, w, w.dtype, weight_major=rows <= sampling.WEIGHT_MAJOR_MAX_ROWS,
                                            kernel=kernel_products)
  if kernel_products:
    head_mm = sampling.kernel_product   # the step's own head product
  elif attention == 'kernel' and rows > sampling.HEAD_WEIGHT_MAJOR_MAX_ROWS:
    # The greedy step's own head product (unrolled_forward.greedy_head without its kernel): (V, B) logits.
    lanes = cpu_decode.GREEDY_LANES
    head_mm = lambda x, hw: sampling.weight_major_logits(cfg, {'w': hw}, jnp.pad(x, ((0, -rows % lanes), (0, 0))))
  else:
    head_mm = lambda x, hw: unrolled_forward.head_logits(cfg, {'w': hw}, x,
                                                         weight_major=rows <= sampling.HEAD_WEIGHT_MAJOR_MAX_ROWS)

  @jax.jit
  def products(x, layer_w, head_w):
    # The residual adds keep the chain sequential, as in the step; no norms, attention or cache.
    for w in layer_w:
      qkv = mm(x, w['qkv'])
      x = x + mm(qkv[:, :w['o'].shape[1]], w['o'])
      gu = mm(x, w['gate_up'])
      x = x + mm(gu[:, :F] * gu[:, F:], w['down'])
    return head_mm(x, head_w)

  x0 = jnp.ones((rows, cfg.hidden_size), cfg.compute_dtype)   # the rows the sampler runs
  layer_w, head_w = jax.block_until_ready((layer_w, head_w))

  def matmuls():
    # 10 calls per timing: one chain is a few ms, below timer and dispatch noise.
    for _ in range(10):
      y = products(x0, layer_w, head_w)
    jax.block_until_ready(y)

  # The products' FLOPs at this machine's dense-matmul rate: how far the step's products are from
  # matmul speed (compute-bound rows), or how far below it they run (memory-bound rows). Rate: a
  # 2048^3 product in the step's own form (compute-dtype operands, float32 accumulation and
  # result), best of 10. Not a strict floor: XLA's bf16 products on one thread have beaten it.
  Hq, Hkv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
  per_row = cfg.num_layers * (d * (Hq + 2 * Hkv) * hd + Hq * hd * d + 3 * d * F) + cfg.vocab_size * d
  products_gflop = 2 * rows * per_row / 1e9
  big = jnp.ones((2048, 2048), cfg.compute_dtype)
  dense = jax.jit(lambda a, b: jnp.einsum('ik,kj->ij', a, b, preferred_element_type=jnp.float32))
  jax.block_until_ready(dense(big, big))
  peak = 2 * 2048 ** 3 / 1e9 / min(timed(lambda: jax.block_until_ready(dense(big, big)))[0] for _ in range(10))

  ids, am = torch.from_numpy(prompts.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

  def theirs(n):
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    return out[:, P:].numpy()

  # Warm-up: compiles both shapes of ours, warms torch's allocator; also checks the tokens agree.
  a, b = ours(N), theirs(N)
  ours(1), theirs(1), matmuls()
  xla_ops = ours(N, attention='xla')   # ablation: attention and greedy pick in XLA ops (see below)
  assert a.shape == b.shape == (B, N), (a.shape, b.shape)
  differs = (a != b).any(0)
  agree = int(np.argmax(differs)) if differs.any() else N

  load_before = os.getloadavg()[0]
  runs = {'ours': [], 'transformers': []}
  runs1 = {'ours': [], 'transformers': []}
  products_ms, xla_s = [], []
  for _ in range(args.reps):
    for name, fn in (('ours', ours), ('transformers', theirs)):
      runs[name].append(timed(lambda: fn(N)))
      runs1[name].append(timed(lambda: fn(1)))
    products_ms += [1e3 * timed(matmuls)[0] / 10 for _ in range(3)]
    xla_s.append(timed(lambda: ours(N, attention='xla'))[0])
  result = dict(threads=threads, batch=B, dtype=dtype, agree=agree, load=(load_before, os.getloadavg()[0]),
                products_ms=statistics.median(products_ms), attention=attention,
                peak_gflops=peak, products_at_peak_ms=1e3 * products_gflop / peak,
                products='kernel' if kernel_products else 'XLA',
                segments=sampling.decode_segments_default(N, attention), xla_agree=bool((xla_ops == a).all()))
  for name in runs:
    wall = statistics.median(w for w, _ in runs[name])
    wall1 = statistics.median(w for w, _ in runs1[name])
    result[name] = dict(wall=wall, cpu=statistics.median(c for _, c in runs[name]),
                        tok_s=B * N / wall, step_ms=1e3 * (wall - wall1) / (N - 1),
                        prefill_ms=1e3 * wall1)
  # The N = 1 call runs no decode step: the same prefill time serves both.
  wall1 = statistics.median(w for w, _ in runs1['ours'])
  result['xla_step_ms'] = 1e3 * (statistics.median(xla_s) - wall1) / (N - 1)
  return result


def main():
  args = parse_args()
  if args.child:
    print('RESULT ' + json.dumps(measure(args, args.child)))
    return
  results = []
  for dtype in dict.fromkeys(args.dtype.split(',')):
    for batch in dict.fromkeys(int(b) for b in args.batch.split(',')):
      for threads in dict.fromkeys(int(t) for t in args.threads.split(',')):
        cmd = [sys.executable, os.path.abspath(__file__), '--child', str(threads), '--batch', str(batch),
               '--dtype', dtype, '--prompt_len', str(args.prompt_len), '--new_tokens', str(args.new_tokens),
               '--reps', str(args.reps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
        if proc.returncode or not line:
          sys.exit(f'measurement with {dtype}, batch {batch}, {threads} threads failed:\n{proc.stderr[-3000:]}')
        results.append(json.loads(line[0][len('RESULT '):]))
        print(f'{dtype} batch {batch} threads {threads}: ours {results[-1]["ours"]["step_ms"]:.1f} ms/step, '
              f'transformers {results[-1]["transformers"]["step_ms"]:.1f}', flush=True)

  P, N = args.prompt_len, args.new_tokens
  lines = [
      f'Prompt {P}, {N} new tokens (all forced), greedy; weights and compute in the dtype shown on both '
      'sides; torch threads = XLA threads (process pinned to that many cores); median of '
      f'{args.reps} alternating runs after warm-up. tokens/s = B * N / whole call (prefill and, for us, '
      'laying out the decode weights included); decode ms/step excludes the prefill.',
      '',
      '| dtype | batch | threads | | tokens/s | whole call (s) | decode ms/step | prefill + 1 token (ms) | CPU s per call | speed-up: tokens/s | speed-up: decode step | load avg |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in results:
    for name, label in (('ours', 'cfrl_jax `sample`'), ('transformers', 'transformers `generate`')):
      s = r[name]
      if name == 'ours':
        speed = f'**{r["ours"]["tok_s"] / r["transformers"]["tok_s"]:.2f}x**'
        step = f'**{r["transformers"]["step_ms"] / r["ours"]["step_ms"]:.2f}x**'
      else:
        speed = step = '1'
      lines.append(f'| {r["dtype"]} | {r["batch"]} | {r["threads"]} | {label} | {s["tok_s"]:.0f} | {s["wall"]:.2f} | '
                   f'{s["step_ms"]:.1f} | {s["prefill_ms"]:.0f} | {s["cpu"]:.2f} | {speed} | {step} | '
                   f'{r["load"][0]:.1f}-{r["load"][1]:.1f} |')
  lines += ['', 'Lower bound of our decode step: its matrix products alone (ms per step, median), run as the '
            'step runs them (`products`: `kernel`, the compiled `cpu_decode.matvec` / `cpu_decode.matmul` '
            '(float32 at any batch; bfloat16 up to 16 rows), else XLA\'s products), against the step time a 2x speed-up over transformers needs. Also our step '
            'in XLA ops only (`attention=\'xla\'`: attention, greedy pick and products, with its default decode '
            'segments; timed in the same rounds) instead of the compiled CPU kernels (docs/sampler.md). '
            '`at matmul rate`: the time the products\' FLOPs (2 x rows x their weights) take at the rate of a '
            'large dense product in the step\'s dtype (2048^3, compute-dtype operands, float32 results; best of '
            '10, GFLOP/s in the last column): how far compute-bound products are from matmul speed. It is an '
            'estimate, not a strict floor (a product of other shapes may run faster):', '',
            '| dtype | batch | threads | products | matrix products alone (ms) | at matmul rate (ms) | our decode step (ms) | 2x target (ms) | 2x reachable by this formulation | attention | step with XLA ops (ms) | XLA ops / kernels | matmul GFLOP/s |',
            '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    target = r['transformers']['step_ms'] / 2
    lines.append(f'| {r["dtype"]} | {r["batch"]} | {r["threads"]} | {r["products"]} | {r["products_ms"]:.1f} | '
                 f'{r["products_at_peak_ms"]:.1f} | {r["ours"]["step_ms"]:.1f} | '
                 f'{target:.1f} | {"yes" if r["products_ms"] < target else "no"} | {r["attention"]} | '
                 f'{r["xla_step_ms"]:.1f} | {r["xla_step_ms"] / r["ours"]["step_ms"]:.2f}x | {r["peak_gflops"]:.0f} |')
  same = list(dict.fromkeys(f'{r["dtype"]} batch {r["batch"]}' for r in results if r['xla_agree']))
  differ = list(dict.fromkeys(f'{r["dtype"]} batch {r["batch"]}' for r in results if not r['xla_agree']))
  lines += ['', f'Greedy tokens with XLA ops equal those with the kernels in: {", ".join(same) or "none"}'
            + (f'; they differ in: {", ".join(differ)} (bfloat16: the two round their sums in another order, '
               'and rounding flips near-tied argmaxes).' if differ else '.')]
  agree = ', '.join(f'{r["dtype"]} batch {r["batch"]}: {r["agree"]}' for r in results if r['threads'] == results[0]['threads'])
  lines += ['', f'Greedy tokens of the two implementations agree for the first steps (of {N}): {agree}. Random '
            'weights at HF init give near-tied logits, so rounding flips an argmax early in bfloat16 (each '
            'side rounds its own sums) and late or never in float32. The load average is that of the '
            'whole machine during the runs: it is shared, and a thread count above the free cores '
            'penalises torch\'s OpenMP pool most.']
  desc = machine()
  print(f'Machine: {desc}')
  print('\n'.join(lines))
  if not args.no_write:
    results_md.write_section(
        'bench_decode', 'Decode throughput: `sampling.sample` vs transformers `generate` (bench/bench_decode.py)', desc, lines)


if __name__ == '__main__':
  main()
