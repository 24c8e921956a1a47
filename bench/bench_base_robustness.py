"""Does the demo's base depend on the CPU? Pretrain it under two instruction sets and compare.

The quantity: the embedded demo's from-scratch base (configs/demo.py), pretrained once with XLA's
native code path and once with XLA limited to AVX2 (`XLA_FLAGS=--xla_cpu_max_isa=AVX2`, kernels built
for -march=x86-64-v3): the float order of the two differs, as it does between CPUs. Pretraining stops
at a validation-accuracy band (config.pretrain.stop_accuracy, on train-pattern problems), so the two
bases should land within one eval interval of each other on the held-out set, where a fixed step count
left them apart (issue 24: greedy 0.57 vs 0.66 between two machines at 330 steps).

Each base is pretrained in its own process under its ISA (or reused from --cache_<isa> when that
directory already holds it), then both are evaluated in this process, natively, exactly as a study's
step-0 eval does: greedy accuracy and sampled pass@1 (+/- s.e.) on the demo's held-out problems.

    python bench/bench_base_robustness.py [--cache_native cache --cache_avx2 cache_avx2 --no_write]

Writes its section of bench/RESULTS.md (between <!-- bench_base_robustness --> markers) unless --no_write.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import results_md  # bench/results_md.py: this directory is on sys.path when a script runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ISAS = {
    'native': {},
    'AVX2': {'XLA_FLAGS': '--xla_cpu_max_isa=AVX2', 'CFRL_JAX_CPU_KERNELS_MARCH': 'x86-64-v3'},
}


def demo_config(cache_dir: str):
  import ml_collections
  from configs import demo
  c = ml_collections.ConfigDict(demo.get_config('').to_dict())
  c.pretrain.cache_dir = cache_dir
  return c


def child(cache_dir: str) -> None:
  """Pretrains (or finds) the demo base under this process's ISA; prints its directory."""
  from cfrl_jax.tasks import build_task
  from cfrl_jax.train import pretrain
  c = demo_config(cache_dir)
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


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--cache_native', default=os.path.join(ROOT, 'cache'))
  ap.add_argument('--cache_avx2', default=os.path.join(ROOT, 'cache_avx2'))
  ap.add_argument('--child', default='', help=argparse.SUPPRESS)
  ap.add_argument('--no_write', action='store_true')
  args = ap.parse_args()
  if args.child:
    return child(args.child)
  caches = {'native': args.cache_native, 'AVX2': args.cache_avx2}
  rows = {}
  for isa, env in ISAS.items():
    p = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', caches[isa]], cwd=ROOT,
                       env=dict(os.environ, **env), stdout=subprocess.PIPE, text=True, check=True)
    path = json.loads(p.stdout.strip().splitlines()[-1])['path']
    rows[isa] = evaluate_base(path, caches[isa])
    print(isa, {k: v for k, v in rows[isa].items() if k != 'pretrain'}, flush=True)

  c = demo_config('')
  lines = [f'Config: configs/demo.py base (stop at validation greedy accuracy >= {c.pretrain.stop_accuracy} on '
           f'{c.pretrain.validation_problems} train-pattern problems, read every {c.pretrain.eval_every} steps '
           f'from step {c.pretrain.eval_from}, cap {c.pretrain.steps} steps). Held-out eval: '
           f'{c.eval.num_problems} problems, greedy and {c.eval.samples} samples at T={c.rl.temperature}, '
           'the key of a study\'s step-0 eval; both bases evaluated natively in one process.', '',
           '| XLA code path | pretrain steps | stopped by the band | pretrain min | final loss | validation greedy '
           'at stop | held-out greedy | held-out pass@1 ± s.e. |', '|---|---|---|---|---|---|---|---|']
  for isa, r in rows.items():
    pt = r['pretrain']
    val = pt['validation'][-1]['validation_greedy_accuracy'] if pt.get('validation') else float('nan')
    lines.append(f"| {isa} | {pt['steps']} | {'yes' if pt.get('stopped_at') else 'no (cap)'} | "
                 f"{pt['seconds'] / 60:.1f} | {pt['final_loss']:.3f} | {val:.3f} | {r['greedy_accuracy']:.3f} | "
                 f"{r['pass@1']:.3f} ± {r['pass@1_stderr']:.3f} |")
  for isa, r in rows.items():
    if r['pretrain'].get('validation'):
      lines += ['', f'{isa} validation readings (step: greedy accuracy): ' + ', '.join(
          f"{v['step']}: {v['validation_greedy_accuracy']:.3f}" for v in r['pretrain']['validation'])]
  a, b = rows['native'], rows['AVX2']
  lines += ['', f"Difference native - AVX2: held-out greedy {a['greedy_accuracy'] - b['greedy_accuracy']:+.3f}, "
            f"pass@1 {a['pass@1'] - b['pass@1']:+.3f} (2 s.e. of that difference: "
            f"{2 * (a['pass@1_stderr'] ** 2 + b['pass@1_stderr'] ** 2) ** 0.5:.3f}). Pretraining times are "
            'whatever the machine gave each process (a cached base reports the time of the run that made it).']
  print('\n'.join(lines))
  if not args.no_write:
    results_md.write_section('bench_base_robustness', 'Demo base under two XLA code paths '
                             '(bench/bench_base_robustness.py)', results_md.host(), lines)


if __name__ == '__main__':
  main()
