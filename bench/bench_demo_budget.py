"""The README's first command against its time budget: first run <= 25 min, cached run <= 15 min.

Runs `python -m cfrl_jax.main --config=configs/demo.py` twice in subprocesses, in a fresh directory:
the first run pretrains the base and compiles everything (empty base, compilation and kernel caches);
the second finds the base and the compiled programs cached. Each run's wall time is measured here, and
its parts (pretraining, each arm) are read from the study.json the run wrote. `--isa=AVX2` limits XLA
to AVX2 (`XLA_FLAGS=--xla_cpu_max_isa=AVX2`) and builds the decode kernels for x86-64-v3: a CPU
without AVX-512, emulated on one that has it. Writes the `bench_demo_budget` section of
bench/RESULTS.md.

  python bench/bench_demo_budget.py --isa=AVX2      # about 40 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import results_md  # bench/results_md.py: this directory is on sys.path when a script runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS_MIN = {'first': 25.0, 'cached': 15.0}
ISA_ENV = {
    'native': {},
    'AVX2': {'XLA_FLAGS': '--xla_cpu_max_isa=AVX2', 'CFRL_JAX_CPU_KERNELS_MARCH': 'x86-64-v3'},
}


def run_demo(config: str, work: str, name: str, env: dict) -> dict:
  """One run of the demo under `work`; its wall seconds and the parts study.json records."""
  run_dir = os.path.join(work, name)
  cmd = [sys.executable, '-m', 'cfrl_jax.main', f'--config={config}', f'--config.run_dir={run_dir}',
         f'--config.pretrain.cache_dir={os.path.join(work, "cache")}',
         f'--config.compile_cache_dir={os.path.join(work, "jax")}']
  t0 = time.time()
  subprocess.run(cmd, cwd=ROOT, env=env, check=True)
  wall = time.time() - t0
  with open(os.path.join(run_dir, 'study.json')) as f:
    study = json.load(f)
  timings = study.get('timings', {})
  base = study.get('base', {})
  # The base's held-out scores: the step-0 eval of the first arm (every arm starts from the same base).
  step0 = {}
  arm = next(iter(study.get('arms') or []), None)
  metrics = os.path.join(run_dir, str(arm), 'seed0', 'metrics.jsonl') if arm else ''
  if os.path.exists(metrics):
    with open(metrics) as f:
      step0 = next((r for r in map(json.loads, f) if r.get('kind') == 'eval' and r.get('step') == 0), {})
  return {'wall': wall, 'pretrain': float(base.get('seconds_this_run', 0.0)), 'step0': step0,
          'arms': {k: float(v) for k, v in timings.items() if '/' in k},
          'base': base}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--isa', choices=sorted(ISA_ENV), default='native')
  ap.add_argument('--config', default='configs/demo.py')
  ap.add_argument('--work', default='', help='an empty directory for the runs and caches (default: a new temp dir)')
  args = ap.parse_args()
  work = args.work or tempfile.mkdtemp(prefix='demo_budget_')
  if os.listdir(work):
    raise SystemExit(f'--work={work} is not empty: the first run must start with no cached base or programs.')
  env = dict(os.environ, **ISA_ENV[args.isa], CFRL_JAX_KERNEL_CACHE=os.path.join(work, 'kernels'))
  first = run_demo(args.config, work, 'first', env)
  cached = run_demo(args.config, work, 'cached', env)

  lines = [f'Command: `python -m cfrl_jax.main --config={args.config}`, twice in one fresh directory '
           f'(first: nothing cached; then with the base, compiled programs and kernels cached). XLA code '
           f'path: {args.isa}' + (f' (`{ISA_ENV[args.isa]["XLA_FLAGS"]}`, kernels built for x86-64-v3)'
                                    if args.isa != 'native' else '') + '.', '',
           '| run | wall min | limit min | wall / limit | pretraining min | arms (min) |', '|---|---|---|---|---|---|']
  for name, r in (('first', first), ('cached', cached)):
    arms = ', '.join(f'{k} {v / 60:.1f}' for k, v in r['arms'].items())
    lines.append(f'| {name} | {r["wall"] / 60:.1f} | {LIMITS_MIN[name]:.0f} | {r["wall"] / 60 / LIMITS_MIN[name]:.2f} '
                 f'| {r["pretrain"] / 60:.1f} | {arms} |')
  b, e = first['base'], first['step0']
  nan = float('nan')
  lines += ['', f'Base of the first run: band met at step {b.get("stopped_at")}, {b.get("steps")} steps in all '
            f'(cooldown {b.get("cooldown_steps", 0)}); validation greedy after the cooldown '
            f'{b.get("final_validation_greedy_accuracy") or nan:.3f}; held-out (step-0 eval) greedy '
            f'{e.get("greedy_accuracy", nan):.3f}, pass@1 {e.get("pass@1", nan):.3f} '
            f'± {e.get("pass@1_stderr", nan):.3f}.']
  for line in lines:
    print(line)
  results_md.write_section('bench_demo_budget', 'The demo against its time budget (bench/bench_demo_budget.py)',
                           results_md.host(), lines)


if __name__ == '__main__':
  main()
