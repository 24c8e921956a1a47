"""Learner-step throughput: tokens/s and achieved FLOP/s of one GRPO update vs this machine's matmul peak.

The step is what the trainer runs: forward over [prompt | completion] sequences, the GRPO clipped
surrogate on the completion tokens, backward, global-norm clip and AdamW on all parameters (CF-RL
stage two), jitted through cfrl_jax.train.placement.sharded_update on a mesh of every local device.
Its FLOPs are counted analytically (below) and also read from XLA's cost_analysis() of the compiled
step. The peak is a dense (M x M) @ (M x M) matmul in the same dtype, timed in the same run: rounds
alternate matmul and learner timings, so machine load hits both alike, and the headline ratio
compares the best (least disturbed) repetition of each; the ratio of medians is printed beside it.

Analytic FLOPs of one step = 3 x forward (backward = 2 x forward), forward =
    2 * B*T * L * (d*(q + 2 kv) + q*d + 3*d*F)     projections and MLP over all T positions
  + 4 * B*T * L * T * q                            attention scores and values (full T x T, as computed)
  + 2 * B*N * V*d                                  the head, on the N completion positions only
with q = heads*head_dim, kv = kv_heads*head_dim. The embedding lookup, norms, softmaxes and the
optimizer are not counted (they are memory-bound, not FLOPs).

    python bench/bench_learner.py                      # CPU: hidden 512, 8 layers, vocab 32k, 8 x 256
    python bench/bench_learner.py --shape=qwen2.5-0.5b --dtype=bfloat16 --batch=16 --seq=1024   # an H100
    python bench/bench_learner.py --breakdown          # also time forward, backward and the head alone

Also measured in the same rounds (unless --stock_only), each after checking that its loss, metrics
and gradients equal the stock step's, the two earlier forms of code the step runs (ablations, so the
table shows what each of these choices is worth):
  autodiff stats  rollout.completion_stats as plain autodiff of log_softmax + the entropy / max-prob
                  metrics (`autodiff_completion_stats` below). The library instead sends the log-probs
                  through a custom VJP that keeps only the log-sum-exp, and computes the metrics from
                  the same exp pass without gradients; autodiff makes about six passes over the
                  (B, N, V) logits, which on CPU are single-threaded.
  3-D dense       qwen._dense as (B, T, d) @ (d, out) (`dense_3d` below). The library flattens the
                  activations to (B*T, d) around each projection: XLA:CPU lowers the weight-gradient
                  dots of 3-D operands with transposing copies that absorb the SiLU backward.
The second is applied by swapping qwen._dense while that variant is traced (the module is not edited).

Writes its section of bench/RESULTS.md (between <!-- bench_learner --> markers) unless --no_write.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import results_md  # bench/results_md.py: this directory is on sys.path when a script runs

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cfrl_jax import sharding  # noqa: E402
from cfrl_jax.models import qwen  # noqa: E402
from cfrl_jax.rl import grpo  # noqa: E402
from cfrl_jax.train import learner, objectives, placement, rollout  # noqa: E402


# name -> QwenConfig fields (Qwen2.5 shapes from their config.json; 'cpu' is bench_decode's model)
SHAPES = {
    'cpu': dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                num_kv_heads=2, head_dim=64),
    'qwen2.5-0.5b': dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                         num_heads=14, num_kv_heads=2, head_dim=64),
    'qwen2.5-1.5b': dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                         num_heads=12, num_kv_heads=2, head_dim=128),
    'qwen2.5-3b': dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                       num_heads=16, num_kv_heads=2, head_dim=128),
}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--shape', default='cpu', choices=sorted(SHAPES))
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'), help='compute dtype')
  p.add_argument('--param_dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq', type=int, default=256, help='prompt + completion length')
  p.add_argument('--prompt_len', type=int, default=64)
  p.add_argument('--remat', action='store_true', help='rematerialise each layer (memory for FLOPs)')
  p.add_argument('--mesh', default='1,-1,1', help='data,fsdp,tensor over the local devices')
  p.add_argument('--matmul', type=int, default=0, help='peak matmul size M (0: 2048 on CPU, 8192 otherwise)')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--stock_only', action='store_true', help='skip the ablations')
  p.add_argument('--breakdown', action='store_true', help='also time pieces of the step alone')
  p.add_argument('--no_write', action='store_true', help='print only; leave RESULTS.md alone')
  return p.parse_args()


def machine() -> str:
  dev = jax.devices()[0]
  return (f'{results_md.host()}; jax {jax.__version__}; '
          f'{jax.device_count()} x {dev.device_kind} ({dev.platform})')


def analytic_flops(cfg, B: int, T: int, N: int) -> dict:
  d, L, F, V = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  dense = 2 * B * T * L * (d * (q + 2 * kv) + q * d + 3 * d * F)
  attention = 4 * B * T * L * T * q
  head = 2 * B * N * V * d
  return {'dense': 3 * dense, 'attention': 3 * attention, 'head': 3 * head,
          'total': 3 * (dense + attention + head)}


def autodiff_token_stats(z, targets):
  """(logp, entropy, max_prob), each (B, N), by plain autodiff of log_softmax (the earlier library form)."""
  logp_all = jax.nn.log_softmax(z, axis=-1)
  probs = jnp.exp(logp_all)
  return (jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0],
          -jnp.sum(probs * logp_all, axis=-1), jnp.max(probs, axis=-1))


def autodiff_completion_stats(cfg, params, tokens, mask, prompt_len: int):
  """rollout.completion_stats with autodiff_token_stats: (logp, entropy, max_prob) (B, N), phi."""
  phi, _ = qwen.features(cfg, params['backbone'], tokens, mask)
  z = qwen.logits(cfg, qwen.head_params(cfg, params), phi[:, prompt_len - 1:-1])
  return (*autodiff_token_stats(z, tokens[:, prompt_len:]), phi)


def autodiff_grpo_objective(cfg, prompt_len: int, rl):
  """objectives.grpo_objective with autodiff_completion_stats in place of rollout.completion_stats."""

  def loss_fn(params, batch):
    logp, entropy, max_prob, _ = autodiff_completion_stats(cfg, params, batch['tokens'], batch['mask'], prompt_len)
    mask = batch['completion_mask']
    loss, m = grpo.grpo_loss(
        logp, batch['old_logp'], batch.get('ref_logp'), batch['advantages'], mask,
        clip_low=rl.clip_low, clip_high=rl.clip_high, kl_coef=rl.kl_coef,
        kl_estimator=rl.kl_estimator, aggregation=rl.aggregation, max_tokens=rl.max_new_tokens)
    return loss, dict(m, **objectives._policy_metrics(logp, entropy, max_prob, mask))  # pylint: disable=protected-access

  return loss_fn


def dense_3d(x, p, dtype):
  """qwen._dense without flattening: (B, T, in) @ (in, out) (the earlier library form)."""
  y = x @ p['kernel'].astype(dtype)
  if 'bias' in p:
    y = y + p['bias'].astype(dtype)
  return y


@contextlib.contextmanager
def qwen_dense(fn):
  """Traces inside use fn as qwen._dense (None: leave it alone)."""
  stock = qwen._dense  # pylint: disable=protected-access
  if fn is not None:
    qwen._dense = fn  # pylint: disable=protected-access
  try:
    yield
  finally:
    qwen._dense = stock  # pylint: disable=protected-access


# (name, objective builder, replacement for qwen._dense or None)
VARIANTS = (
    ('as the trainer runs it', objectives.grpo_objective, None),
    ('ablation: autodiff stats', autodiff_grpo_objective, None),
    ('ablation: autodiff stats + 3-D dense', autodiff_grpo_objective, dense_3d),
)


def timed(fn, *args):
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - t, out


def rl_settings(N: int):
  import types
  return types.SimpleNamespace(clip_low=0.2, clip_high=0.2, kl_coef=0.0, kl_estimator='k3',
                               aggregation='seq_mean', max_new_tokens=N)


class Variant:
  """One compiled learner step; all variants step the same (params, opt_state) in turn (one copy in memory)."""

  def __init__(self, name, objective, dense, cfg, mesh, state, batch, lrs, P, N):
    self.name = name
    self.loss_fn = objective(cfg, P, rl_settings(N))
    self.step = placement.sharded_update(learner.make_update(cfg, self.loss_fn, state['tx'], stage=2), mesh,
                                        state['specs'], state['opt_specs'])
    self.batch, self.lrs, self.times = batch, lrs, []
    with qwen_dense(dense):   # trace (and compile) with the variant's dense
      lowered = self.step.jitted.lower(state['params'], state['opt_state'], batch,
                                       sharding.shard(lrs, mesh, sharding.PartitionSpec()))
      self.xla_flops = float((lowered.compile().cost_analysis() or {}).get('flops', float('nan')))
      self.compile_s = self.run(state)
    self.times.clear()

  def run(self, state) -> float:
    s, res = timed(self.step, state['params'], state['opt_state'], self.batch, self.lrs)
    state['params'], state['opt_state'] = res.params, res.opt_state
    self.times.append(s)
    return s


def init_state(cfg, mesh) -> dict:
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  specs = sharding.partition_specs(params, sharding.MeshConfig().all_rules(qwen.param_axes()), mesh)
  params = sharding.shard(params, mesh, specs)
  tx = learner.make_optimizer(cfg, params, 2, learner.OptimConfig())
  opt_state, opt_specs = sharding.init_opt_state(tx, params, mesh, specs)
  return {'params': params, 'opt_state': opt_state, 'tx': tx, 'specs': specs, 'opt_specs': opt_specs}


def max_error_vs_stock(cfg, batch, P, N, objective, dense):
  """Max relative error of the variant's loss, metrics and gradient leaves against the stock objective."""
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  (ls, ms), gs = jax.jit(jax.value_and_grad(objectives.grpo_objective(cfg, P, rl_settings(N)), has_aux=True))(
      params, batch)
  with qwen_dense(dense):
    (lf, mf), gf = jax.jit(jax.value_and_grad(objective(cfg, P, rl_settings(N)), has_aux=True))(params, batch)
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
  return max([rel(lf, ls)] + [rel(mf[k], ms[k]) for k in ('entropy', 'max_prob', 'mean_prob')] +
             [rel(a, b) for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gs))])


def main():
  args = parse_args()
  cfg = qwen.QwenConfig(**SHAPES[args.shape], dtype=args.dtype, param_dtype=args.param_dtype,
                        remat=args.remat, rope_theta=10000.0)
  B, T, P = args.batch, args.seq, args.prompt_len
  N = T - P
  if N < 1:
    raise SystemExit(f'--seq {T} must exceed --prompt_len {P}.')
  mesh = sharding.make_mesh(tuple(int(s) for s in args.mesh.split(',')))

  rng = np.random.RandomState(0)
  tokens = rng.randint(1, cfg.vocab_size, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  params0 = qwen.init_params(cfg, jax.random.PRNGKey(0))
  old_logp = jax.jit(lambda p, t, m: rollout.completion_stats(cfg, p, t, m, P)[0])(params0, tokens, mask)
  del params0
  host_batch = {'tokens': tokens, 'mask': mask, 'completion_mask': np.ones((B, N), np.float32),
                'old_logp': np.asarray(old_logp), 'advantages': rng.randn(B).astype(np.float32)}
  batch = sharding.shard_batch(host_batch, mesh)
  lrs = {'head': np.float32(1e-6), 'backbone': np.float32(1e-6)}

  chosen = VARIANTS[:1] if args.stock_only else VARIANTS
  errors = {name: max_error_vs_stock(cfg, host_batch, P, N, obj, dense) for name, obj, dense in chosen[1:]}
  state = init_state(cfg, mesh)
  variants = [Variant(name, obj, dense, cfg, mesh, state, batch, lrs, P, N) for name, obj, dense in chosen]

  M = args.matmul or (2048 if jax.devices()[0].platform == 'cpu' else 8192)
  dt = jnp.dtype(args.dtype)
  a = jax.random.normal(jax.random.PRNGKey(1), (M, M), jnp.float32).astype(dt)
  b = jax.random.normal(jax.random.PRNGKey(2), (M, M), jnp.float32).astype(dt)
  matmul = jax.jit(lambda x, y: x @ y)
  timed(matmul, a, b)
  reps = max(3, min(100, int(0.5 / max(timed(matmul, a, b)[0], 1e-6))))
  flops = analytic_flops(cfg, B, T, N)
  load_before = os.getloadavg()[0]

  mm_s = []
  for _ in range(args.rounds):
    for _ in range(reps):                       # ~0.5 s of single, separately timed matmuls
      mm_s.append(timed(matmul, a, b)[0])
    for v in variants:
      v.run(state)
  load_after = os.getloadavg()[0]

  # Best-of timings for both sides: on a shared machine the fastest repetition is the one least
  # disturbed by other processes (medians are printed too).
  peak = 2 * M ** 3 / min(mm_s)
  peak_median = 2 * M ** 3 / statistics.median(mm_s)
  n_params = qwen.count_params(state['params'])
  desc = machine()
  lines = [
      f'Model `{args.shape}` ({n_params / 1e6:.1f}M parameters: hidden {cfg.hidden_size}, {cfg.num_layers} layers, '
      f'{cfg.num_heads}/{cfg.num_kv_heads} heads, FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}, untied), '
      f'compute {args.dtype}, params {args.param_dtype}{", remat" if args.remat else ""}; batch {B} x {T} tokens '
      f'(prompt {P}, completion {N}); GRPO + AdamW on all parameters; mesh {dict(mesh.shape)}; '
      f'{args.rounds} alternating rounds; load average {load_before:.1f} -> {load_after:.1f}.',
      '',
      f'Analytic FLOPs per step: {flops["total"] / 1e9:.1f} G (dense {flops["dense"] / 1e9:.1f}, attention '
      f'{flops["attention"] / 1e9:.1f}, head {flops["head"] / 1e9:.1f}); XLA cost_analysis of the compiled step: '
      f'{variants[0].xla_flops / 1e9:.1f} G (it counts the scanned layer body once, not {cfg.num_layers} times). '
      f'Peak: {M}^3 {args.dtype} matmul, {peak / 1e9:.1f} GFLOP/s best of {len(mm_s)} '
      f'(median {peak_median / 1e9:.1f}).',
      '',
      '| learner step | best ms | median ms | tokens/s (best) | GFLOP/s (best) | step / matmul FLOP/s (best; medians) |',
      '|---|---|---|---|---|---|',
  ]
  for v in variants:
    best, med = min(v.times), statistics.median(v.times)
    lines.append(f'| {v.name} | {best * 1e3:.0f} | {med * 1e3:.0f} | {B * T / best:,.0f} | '
                 f'{flops["total"] / best / 1e9:.1f} | **{flops["total"] / best / peak:.2f}**; '
                 f'{flops["total"] / med / peak_median:.2f} |')
  lines.append('')
  for name, err in errors.items():
    lines.append(f'`{name}`: loss, metrics and every gradient leaf equal the stock step\'s to {err:.1e} '
                 '(max relative error).')
  if args.breakdown:
    lines += ['', *breakdown(cfg, variants, state, P, peak, flops)]
  print(f'Machine: {desc}')
  print('\n'.join(lines))
  if not args.no_write:
    results_md.write_section(
        'bench_learner', 'Learner step: achieved FLOP/s vs dense matmul (bench/bench_learner.py)', desc, lines)


def breakdown(cfg, variants, state, P, peak, flops):
  """Times of pieces of the step, each jitted alone, as rows of a table."""
  v = variants[0]
  params, batch = state['params'], v.batch
  phi = jax.jit(lambda p, t, m: qwen.features(cfg, p['backbone'], t, m)[0])(params, batch['tokens'], batch['mask'])
  fwd = flops['total'] / 3

  def head_loss(stats):
    def f(params, phi, tokens):
      z = qwen.logits(cfg, params['head'], phi[:, P - 1:-1])
      logp, entropy, max_prob = stats(z, tokens[:, P:])
      sg = jax.lax.stop_gradient
      return logp.sum() + sg(entropy).sum() + sg(max_prob).sum()
    return f

  def stock_stats(z, targets):
    logp, lse = rollout.logp_and_lse(z, targets)
    zs, lses = jax.lax.stop_gradient(z), jax.lax.stop_gradient(lse)
    probs = jnp.exp(zs - lses[..., None])
    return logp, lses - jnp.sum(probs * zs, axis=-1), jnp.exp(jnp.max(zs, axis=-1) - lses)

  def head_matmul_only(params, phi, tokens):
    return jnp.sum(qwen.logits(cfg, params['head'], phi[:, P - 1:-1]) * 1e-3)

  pieces = [
      ('loss forward (stock)', jax.jit(lambda p, b: v.loss_fn(p, b)[0]), (params, batch), fwd),
      ('loss forward + backward (stock)', jax.jit(jax.grad(lambda p, b: v.loss_fn(p, b)[0])), (params, batch),
       flops['total']),
      ('loss forward + backward (autodiff stats + 3-D dense)', _traced_with(
          dense_3d, jax.jit(jax.grad(lambda p, b: autodiff_grpo_objective(cfg, P, rl_settings(b['old_logp'].shape[1]))(
              p, b)[0])), (params, batch)), (params, batch), flops['total']),
      ('backbone features, forward', jax.jit(lambda p, b: qwen.features(cfg, p['backbone'], b['tokens'], b['mask'])[0]),
       (params, batch), (flops['dense'] + flops['attention']) / 3),
      ('head matmul alone, fwd + bwd', jax.jit(jax.grad(head_matmul_only, argnums=(0, 1))),
       (params, phi, batch['tokens']), flops['head']),
      ('head + stock (custom-VJP) softmax stats, fwd + bwd', jax.jit(jax.grad(head_loss(stock_stats), argnums=(0, 1))),
       (params, phi, batch['tokens']), flops['head']),
      ('head + autodiff softmax stats, fwd + bwd', jax.jit(jax.grad(head_loss(autodiff_token_stats), argnums=(0, 1))),
       (params, phi, batch['tokens']), flops['head']),
  ]
  rows = ['| piece (jitted alone, median of 3) | ms | GFLOP/s | / matmul |', '|---|---|---|---|']
  for name, fn, fargs, f in pieces:
    timed(fn, *fargs)
    s = statistics.median(timed(fn, *fargs)[0] for _ in range(3))
    rows.append(f'| {name} | {s * 1e3:.0f} | {f / s / 1e9:.1f} | {f / s / peak:.2f} |')
  return rows


def _traced_with(dense, fn, args):
  """fn, after one call (its trace and compile) with qwen._dense = dense."""
  with qwen_dense(dense):
    timed(fn, *args)
  return fn


if __name__ == '__main__':
  main()
