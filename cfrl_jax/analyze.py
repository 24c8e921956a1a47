"""Update-dynamics analysis of a run (AlphaRL rank-1 dominance, linear dynamics, RELEX, ExPO): the command.

    python -m cfrl_jax.analyze --run=DIR [--out=DIR/analysis] [--ks=1,2,4] [--evaluate=none|task|MODULE:FACTORY]

Computes cfrl_jax.analysis.update_dynamics.analyze_run over every checkpoint of the run and
writes OUT/analysis.json, the PNGs and OUT/analysis.md (cfrl_jax.analysis.update_dynamics_report).
Evaluation: --evaluate=task builds it with cfrl_jax.run_setup.evaluator_for_run(run_dir,
metric=--metric): by default pass@1 under the run's own eval settings and key when the run
samples in its eval (so the base and final scores equal what the run logged), else greedy
accuracy; --evaluate=MODULE:FACTORY with FACTORY(run_dir); --evaluate=none computes the
weight-space statistics only.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Sequence

from absl import flags

from cfrl_jax.analysis import rank1
from cfrl_jax.analysis.update_dynamics import AnalysisConfig, Evaluate, analyze_run
from cfrl_jax.analysis.update_dynamics_report import write_report


def make_evaluator(spec: str, run_dir: str, metric: str = 'auto') -> Evaluate | None:
  """'none' -> None; 'task' -> cfrl_jax.run_setup.evaluator_for_run(run_dir, metric=metric);
  'MODULE:FACTORY' -> FACTORY(run_dir) (which picks its own metric; `metric` must then be 'auto')."""
  if spec == 'none':
    return None
  if spec != 'task' and metric != 'auto':
    raise ValueError(f'--metric={metric} applies to --evaluate=task only; a custom FACTORY(run_dir) chooses its '
                     'own metric (drop --metric).')
  if spec == 'task':
    module_name, attr = 'cfrl_jax.run_setup', 'evaluator_for_run'
  elif ':' in spec:
    module_name, attr = spec.split(':', 1)
  else:
    raise ValueError(f"--evaluate={spec!r}; expected 'none', 'task' or 'MODULE:FACTORY'.")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f'--evaluate={spec}: cannot import {module_name} ({e}). '
                     + ('--evaluate=task needs the trainer\'s cfrl_jax.run_setup; use --evaluate=none for the '
                        'weight-space statistics only.' if spec == 'task' else '')) from None
  factory = getattr(module, attr, None)
  if not callable(factory):
    raise ValueError(f'--evaluate={spec}: {module_name} has no callable {attr}(run_dir) -> evaluate(params); '
                     'use --evaluate=none for the weight-space statistics only.')
  evaluate = factory(run_dir, metric=metric) if spec == 'task' else factory(run_dir)
  if not callable(evaluate):
    raise ValueError(f'--evaluate={spec}: {module_name}.{attr}(run_dir) returned {type(evaluate).__name__}; '
                     'expected a callable evaluate(params) -> float.')
  return evaluate


def make_flags() -> flags.FlagValues:
  """The command's flags, on their own FlagValues so importing this module defines no global flags."""
  fv = flags.FlagValues()
  d = AnalysisConfig()
  flags.DEFINE_string('run', None, 'Run directory (holds checkpoints/).', flag_values=fv)
  flags.DEFINE_string('out', None, 'Output directory (default: RUN/analysis).', flag_values=fv)
  flags.DEFINE_list('ks', [str(k) for k in d.ks], 'Ranks of the rank-k models; the full update is always added.',
                    flag_values=fv)
  flags.DEFINE_string('evaluate', 'none', "none | task (cfrl_jax.run_setup.evaluator_for_run) | "
                      'MODULE:FACTORY, FACTORY(run_dir) -> evaluate(params) -> float.', flag_values=fv)
  flags.DEFINE_string('metric', 'auto', "With --evaluate=task: the held-out metric, 'greedy_accuracy', 'pass@1', "
                      "'pass@4', 'majority@4', ... (the run's eval settings); 'auto': pass@1 when the run samples "
                      'in its eval (eval.samples > 0), else greedy_accuracy.', flag_values=fv)
  flags.DEFINE_integer('base_step', None, 'Checkpoint used as W_0 (default: the first).', flag_values=fv)
  flags.DEFINE_list('steps', None, 'Analyse only these checkpoint steps (default: all).', flag_values=fv)
  flags.DEFINE_list('windows', ['0.25', '0.333', '0.5'], 'AlphaRL/ExPO window ends as fractions of the run.',
                    flag_values=fv)
  flags.DEFINE_list('variant_b_keep', list(d.variant_b_keep),
                    f'Leaf groups kept updated in variant B, from {rank1.KEEP_GROUPS}.', flag_values=fv)
  flags.DEFINE_float('relex_max_gb', d.relex_max_gb, 'Memory for the stacked updates of RELEX (skipped above).',
                     flag_values=fv)
  flags.DEFINE_bool('eval_checkpoints', d.eval_checkpoints, 'With --evaluate, also evaluate every checkpoint.',
                    flag_values=fv)
  flags.DEFINE_enum('svd_dtype', d.svd_dtype, ['float32', 'float64'], 'Precision of updates and SVDs.',
                    flag_values=fv)
  flags.DEFINE_enum('svd_method', d.svd_method, list(rank1.SVD_METHODS),
                    'gram: eigendecomposition of the smaller Gram matrix (fast); svd: LAPACK SVD.', flag_values=fv)
  flags.mark_flag_as_required('run', flag_values=fv)
  return fv


def main(argv: Sequence[str] | None = None) -> int:
  fv = make_flags()
  argv = list(sys.argv if argv is None else argv)
  try:
    fv(argv)
  except flags.Error as e:
    print(f'error: {e}\n\n{fv.main_module_help()}', file=sys.stderr)
    return 2
  try:
    config = AnalysisConfig(
        ks=tuple(int(k) for k in fv.ks), base_step=fv.base_step,
        steps=None if fv.steps is None else tuple(int(s) for s in fv.steps),
        windows=tuple(float(w) for w in fv.windows), variant_b_keep=tuple(fv.variant_b_keep),
        relex_max_gb=fv.relex_max_gb, eval_checkpoints=fv.eval_checkpoints, svd_dtype=fv.svd_dtype,
        svd_method=fv.svd_method)
    evaluate = make_evaluator(fv.evaluate, fv.run, fv.metric) if os.path.isdir(fv.run) else None
    analysis = analyze_run(fv.run, config, evaluate, log=lambda s: print(s, flush=True))
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  out = fv.out or os.path.join(fv.run, 'analysis')
  files = write_report(analysis, out)
  print(f'Analysis of {len(analysis["steps"]) + 1} checkpoints written to {os.path.abspath(out)}:')
  for kind, path in files.items():
    print(f'  {kind}: {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
