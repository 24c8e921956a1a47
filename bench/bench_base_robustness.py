"""Does the demo's base depend on the CPU? Pretrain it under several float orders and compare.

The quantity: the embedded demo's from-scratch base (configs/demo.py), pretrained with XLA's native
code path, with XLA limited to AVX2 (`XLA_FLAGS=--xla_cpu_max_isa=AVX2`, kernels built for
-march=x86-64-v3) or to SSE4.2 (kernels for x86-64-v2), and natively with whole-batch steps instead of
micro-batches: each is a float order another CPU could have. Pretraining ends its main phase when the mean of the last
`stop_window` validation readings meets the band (config.pretrain.stop_accuracy, train-pattern
problems), then anneals the learning rate to zero over `cooldown_steps`, so the bases should land close
together on the held-out set, where a fixed step count left them apart (issue 24: greedy 0.57 vs 0.66
between two machines at 330 steps) and a single-reading stop without a cooldown left 0.62-0.72.

Each base is pretrained in its own process (or reused from its cache directory when that already holds
it), then all are evaluated in this process, natively, exactly as a study's step-0 eval does: greedy
accuracy and sampled pass@1 (+/- s.e.) on the demo's held-out problems.

    python bench/bench_base_robustness.py [--parallel --variants=native,SSE4.2,... --cache_root DIR --no_write]

Writes its section of bench/RESULTS.md (between <!-- bench_base_robustness --> markers) unless --no_write.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

import results_md  # bench/results_md.py: this directory is on sys.path when a script runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {   # name: (environment, pretrain overrides)
    'native': ({}, {}),
    'AVX2': ({'XLA_FLAGS': '--xla_cpu_max_isa=AVX2', 'CFRL_JAX_CPU_KERNELS_MARCH': 'x86-64-v3'}, {}),
    # On jax 0.10.2 / an Intel Xeon with AVX-512 the AVX2 path computed bit for bit what the native one did;
    # SSE4.2 does not.
    'SSE4.2': ({'XLA_FLAGS': '--xla_cpu_max_isa=SSE4_2', 'CFRL_JAX_CPU_KERNELS_MARCH': 'x86-64-v2'}, {}),
    # Whole-batch steps instead of micro-batches: another summation order on the same CPU.
    'native whole-batch': ({}, {'micro_batches': 1}),
}


def demo_config(cache_dir: str, overrides: dict | None = None):
  import ml_collections
  from configs import demo
  c = ml_collections.ConfigDict(demo.get_config('').to_dict())
  c.pretrain.cache_dir = cache_dir
  c.pretrain.update(overrides or {})
  return c


def child(cache_dir: str, overrides: dict) -> None:
  """Pretrains (or finds) the demo base under this process's ISA; prints its directory."""
  from cfrl_jax.tasks import build_task
  from cfrl_jax.train import pretrain
  c = demo_config(cache_dir, overrides)
  print(json.dumps({'path': pretrain.pretrained_base(c, build_task(c.task), progress=True)}), flush=True)


def evaluate_base(path: str, cache_dir: str) -> dict:
  import jax
  from cfrl_jax import run_setup, tokenization
  from cfrl_jax.models import hf
  from cfrl_jax.policy import make_policy
  from cfrl_jax.tasks import build_task
  c = demo_config(cache_dir)
  task = build_task(c.task)
  tok = tokenization.load_tokenizer(path)
  cfg, params = hf.load_pretrained(path, tie=c.model.tie)
  policy = make_policy(cfg, tok, task)
  out = run_setup.make_eval_fn(c, policy, task)(jax.tree_util.tree_map(jax.numpy.asarray, params), 0)
  with open(os.path.join(path, 'pretrain.json')) as f:
    out['pretrain'] = json.load(f)
  return out


def _f(x) -> str:
  return 'n/a' if x is None else f'{x:.3f}'


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--cache_root', default=os.path.join(ROOT, 'cache_bases'),
                  help='one cache directory per variant under this one (native: <root>/native, ...)')
  ap.add_argument('--variants', default=','.join(VARIANTS), help=f'a subset of {", ".join(VARIANTS)}')
  ap.add_argument('--parallel', action='store_true',
                  help='pretrain the bases in parallel processes (their times then share the CPU)')
  ap.add_argument('--child', default='', help=argparse.SUPPRESS)
  ap.add_argument('--overrides', default='{}', help=argparse.SUPPRESS)
  ap.add_argument('--no_write', action='store_true')
  args = ap.parse_args()
  if args.child:
    return child(args.child, json.loads(args.overrides))
  names = [v.strip() for v in args.variants.split(',') if v.strip()]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown or len(names) < 2:
    raise SystemExit(f'--variants={args.variants!r}: give two or more of {", ".join(VARIANTS)} (unknown: {unknown}).')
  caches = {v: os.path.join(args.cache_root, v.replace(' ', '_').replace('.', '')) for v in names}
  procs = {}
  for name in names:
    env, overrides = VARIANTS[name]
    os.makedirs(caches[name], exist_ok=True)
    log = open(os.path.join(caches[name], 'bench_base_robustness.log'), 'w')
    procs[name] = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--child', caches[name],
                                    '--overrides', json.dumps(overrides)], cwd=ROOT, env=dict(os.environ, **env),
                                   stdout=subprocess.PIPE, stderr=log, text=True)
    if not args.parallel:
      procs[name].wait()
  rows = {}
  for name, p in procs.items():
    out, _ = p.communicate()
    if p.returncode:
      raise SystemExit(f'{name}: pretraining failed (exit {p.returncode}); see {caches[name]}/bench_base_robustness.log')
    path = json.loads(out.strip().splitlines()[-1])['path']
    rows[name] = dict(evaluate_base(path, caches[name]), path=path)
    print(name, {k: v for k, v in rows[name].items() if k not in ('pretrain', 'path')}, flush=True)

  pc = demo_config('').pretrain
  lines = [f'Config: configs/demo.py base (main phase until the mean of the last {pc.stop_window} validation '
           f'readings >= {pc.stop_accuracy} (greedy, {pc.validation_problems} train-pattern problems, every '
           f'{pc.eval_every} steps from step {pc.eval_from}, cap {pc.steps}), then {pc.cooldown_steps} cooldown '
           'steps to lr 0). Held-out eval: the key of a study\'s step-0 eval, every base evaluated natively in '
           f'this process. Bases pretrained {"in parallel processes" if args.parallel else "one after another"}.',
           '', '| variant | band met at step | steps in all | pretrain min | final loss | validation mean at the '
           'band | validation after cooldown | held-out greedy | held-out pass@1 ± s.e. |',
           '|---|---|---|---|---|---|---|---|---|']
  for name, r in rows.items():
    pt = r['pretrain']
    val = pt.get('validation') or []
    window = [v['validation_greedy_accuracy'] for v in val[-pt.get('stop_window', 1):]]
    lines.append(f"| {name} | {pt.get('stopped_at') or 'no (cap)'} | {pt['steps']} | {pt['seconds'] / 60:.1f} | "
                 f"{pt['final_loss']:.3f} | {_f(sum(window) / len(window) if window else None)} | "
                 f"{_f(pt.get('final_validation_greedy_accuracy'))} | {r['greedy_accuracy']:.3f} | "
                 f"{r['pass@1']:.3f} ± {r['pass@1_stderr']:.3f} |")
  digest = {n: hashlib.sha256(open(os.path.join(r['path'], 'model.safetensors'), 'rb').read()).hexdigest()
            for n, r in rows.items()}
  first = names[0]
  lines += ['', f'Weights bit-identical to {first}\'s: ' + ', '.join(
      f"{n}: {'yes' if digest[n] == digest[first] else 'no'}" for n in names[1:]) + '.']
  for name, r in rows.items():
    if r['pretrain'].get('validation'):
      lines += ['', f'{name} validation readings (step: greedy accuracy): ' + ', '.join(
          f"{v['step']}: {v['validation_greedy_accuracy']:.3f}" for v in r['pretrain']['validation'])]
  greedy = [r['greedy_accuracy'] for r in rows.values()]
  pass1 = [r['pass@1'] for r in rows.values()]
  se = max(r['pass@1_stderr'] for r in rows.values())
  lines += ['', f'Range over the {len(rows)} bases: held-out greedy {min(greedy):.3f}-{max(greedy):.3f} (spread '
            f'{max(greedy) - min(greedy):.3f}), pass@1 {min(pass1):.3f}-{max(pass1):.3f} (spread '
            f'{max(pass1) - min(pass1):.3f}; 2 s.e. of a difference of two: {2 * 2 ** 0.5 * se:.3f}). Pretraining '
            'times are whatever the machine gave each process (a cached base reports the time of the run that '
            'made it).']
  print('\n'.join(lines))
  if not args.no_write:
    results_md.write_section('bench_base_robustness', 'Demo base under several float orders '
                             '(bench/bench_base_robustness.py)', results_md.host(), lines)


if __name__ == '__main__':
  main()
