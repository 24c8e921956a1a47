"""Plots and report.md from the metrics stream of one run or of a study (arms x seeds).

Layouts read (see cfrl_jax/experiment.py, which writes them):
  single run   <run>/metrics.jsonl (+ <run>/config.json)
  study        <study>/<arm>/seed<k>/metrics.jsonl (+ <study>/study.json, written when the
               study ends; without it the arms and seeds are found on disk, so a report of a
               study still in progress works too). <study>/<arm>/metrics.jsonl counts as one seed.

Conventions (stated in the report too):
  - An arm's curve is the mean over its seeds at the steps every seed has logged. The band of the
    held-out pass@1 is the min-max over seeds (several seeds) or pass@1 +- the eval's own standard
    error (one seed); training curves are drawn as a centered moving average over SMOOTH_WINDOW
    steps over the raw curve, faint.
  - "base" is the eval at step 0 (the model before RL); "final" is each seed's last eval.
  - Training-step metrics are noisy per step, so "first"/"last" are means over the first/last
    TRAIN_WINDOW training steps.
  - Plus-minus on a single run is the eval's standard error over problems (pass@1_stderr); on
    several seeds it is the standard deviation of the seed values.
  - An arm's change from its base counts as real only beyond 2 standard errors; the standard error of
    a seed mean is the larger of the eval standard error (sqrt(mean se_i^2 / S)) and the seed
    standard error (sd / sqrt(S)); otherwise the report says "within noise".
  - Arms are compared with each other per RL seed (paired), with the statistics of
    cfrl_jax.study_stats: per seed steps to target (censored at the last eval when never reached)
    and the AUC of held-out pass@1; across seeds the paired difference with a 95% Student t
    interval. A comparison says "faster"/"higher" only when that interval excludes 0.
  - Steps to target: the first eval step at which pass@1 >= target, so it is resolved only to the
    eval interval. Default target: the best arm's base pass@1 plus half of its gain (the midpoint of
    the best improvement).
  - One record per (kind, step): when a step was logged twice (a resumed run), the last wins.
  - An Echo Chamber study (configs/echo_chamber.py; is_echo_chamber) gets its own section and figure,
    echo_chamber.png: per arm the format shares of training samples with held-out accuracy on a second
    axis, sampled and greedy eval format fractions at base and end, and whether the format collapse falls
    in the eval interval of the largest pass@1 rise (rules in the section).

Figures are drawn on matplotlib Figure objects with the Agg canvas (no pyplot, no global
backend switch), so importing this module changes nothing for an interactive session.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np

from cfrl_jax import metrics as metrics_lib
from cfrl_jax import study_stats

TRAIN_WINDOW = 5
DPI = 120
PANEL_SIZE = (4.6, 3.9)     # inches per subplot; a single-panel figure is 7 x 4
NOISE_SIGMAS = 2.0
LOG_SCALE_SPAN = 20.0       # positive panels spanning more than this ratio get a log y axis
SMOOTH_WINDOW = 9           # steps in the centered moving average of training curves

ARM_LABELS = {
    'grpo': 'GRPO', 'cfgrpo': 'CF-GRPO', 'ppo': 'PPO', 'cfppo': 'CF-PPO', 'rloo': 'RLOO',
    'cfrloo': 'CF-RLOO', 'reinforce': 'REINFORCE', 'expert_iteration': 'Expert Iteration',
}
NTK_KEY = re.compile(r'^ntk_(R|G|cross|total)_(diag|offdiag)$')
PASS_K_KEY = re.compile(r'^pass@(\d+)$')
FORMAT_KEY = re.compile(r'^format_(.+)$')
SEED_DIR = re.compile(r'^seed(\d+)$')
FIGURES = ('accuracy', 'confidence', 'passk', 'formats', 'ntk', 'logprob_split', 'norms')


# Control arms are '<arm>_<variant>' (cfrl_jax.study_stats.COMPARISONS names them).
VARIANT_LABELS = {'headlr': 'head lr as CF', 'samelr': 'same lr', 'adaptive': 'adaptive switch'}


def arm_label(arm: str) -> str:
  if arm in ARM_LABELS:
    return ARM_LABELS[arm]
  base, _, variant = arm.rpartition('_')
  if base in ARM_LABELS and variant in VARIANT_LABELS:
    return f'{ARM_LABELS[base]} ({VARIANT_LABELS[variant]})'
  return arm


# -- loading ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunMetrics:
  """The metrics of one seed of one arm.

  records: kind -> records sorted by step, one per step (the last one logged for it).
  """
  arm: str
  seed: int | None
  path: str
  records: dict[str, list[dict[str, Any]]]

  def series(self, kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps (n,) int, values (n,) float) of one metric; non-numeric and non-finite values are left out."""
    pts = [(r['step'], r[key]) for r in self.records.get(kind, ())
           if _is_number(r.get(key)) and math.isfinite(r[key])]
    if not pts:
      return np.zeros(0, dtype=int), np.zeros(0)
    s, v = zip(*pts)
    return np.asarray(s, dtype=int), np.asarray(v, dtype=float)

  def record_at(self, kind: str, step: int) -> dict[str, Any] | None:
    for r in self.records.get(kind, ()):
      if r['step'] == step:
        return r
    return None


@dataclasses.dataclass(frozen=True)
class Study:
  """Runs grouped by arm (display order), plus what the directory says about them.

  info: study.json ({} without one); run_config: a single run's config.json ({} otherwise);
  missing: 'arm/seedK' runs that study.json names but that have no metrics.jsonl.
  """
  path: str
  arms: dict[str, list[RunMetrics]]
  info: dict[str, Any]
  run_config: dict[str, Any]
  missing: list[str]
  single: bool

  def keys(self, kind: str) -> list[str]:
    """Every numeric metric key logged under `kind` by any run (sorted)."""
    return logged_keys([r for runs in self.arms.values() for r in runs], kind)

  @property
  def config(self) -> dict[str, Any]:
    return self.info.get('config') or self.run_config


def logged_keys(runs: Sequence[RunMetrics], kind: str) -> list[str]:
  """Every numeric metric key logged under `kind` by any of `runs` (sorted)."""
  out = set()
  for run in runs:
    for r in run.records.get(kind, ()):
      out.update(k for k, v in r.items() if k not in ('step', 'kind') and _is_number(v))
  return sorted(out)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_run(path: str, arm: str, seed: int | None) -> RunMetrics:
  """Reads and validates one metrics.jsonl (a run dir or the file itself)."""
  file = os.path.join(path, 'metrics.jsonl') if os.path.isdir(path) else path
  by_kind: dict[str, dict[int, dict]] = {}
  for i, rec in enumerate(metrics_lib.dedupe(metrics_lib.read_metrics(file))):
    if not isinstance(rec, dict):
      raise ValueError(f'{file}: record {i + 1} is {type(rec).__name__}, not a JSON object; every line must be '
                       '{"step": int, "kind": str, ...} as written by cfrl_jax.metrics.MetricsWriter.')
    step, kind = rec.get('step'), rec.get('kind')
    if not (_is_number(step) and float(step) == int(step)) or not isinstance(kind, str):
      raise ValueError(f'{file}: record {i + 1} has step={step!r}, kind={kind!r}; every line needs an integer '
                       '"step" and a string "kind" (as written by cfrl_jax.metrics.MetricsWriter).')
    by_kind.setdefault(kind, {})[int(step)] = dict(rec, step=int(step))
  records = {k: [v[s] for s in sorted(v)] for k, v in by_kind.items()}
  return RunMetrics(arm=arm, seed=seed, path=file, records=records)


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    try:
      out = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON ({e}); fix or delete it.') from e
  if not isinstance(out, dict):
    raise ValueError(f'{path} holds a {type(out).__name__}; expected a JSON object.')
  return out


def _seed_dirs(arm_dir: str) -> list[tuple[int | None, str]]:
  """(seed, dir) of the runs of one arm directory: seed<k>/ subdirs, or the dir itself."""
  found = []
  for name in os.listdir(arm_dir):
    m = SEED_DIR.match(name)
    if m and os.path.exists(os.path.join(arm_dir, name, 'metrics.jsonl')):
      found.append((int(m.group(1)), os.path.join(arm_dir, name)))
  if not found and os.path.exists(os.path.join(arm_dir, 'metrics.jsonl')):
    return [(None, arm_dir)]
  return sorted(found)


def load_study(path: str) -> Study:
  """Loads a single run dir or a study dir (layouts in the module docstring)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path} is not a directory; pass a run dir (with metrics.jsonl) or a study dir '
                            '(with <arm>/seed<k>/metrics.jsonl).')
  path = os.path.normpath(path)
  if os.path.exists(os.path.join(path, 'metrics.jsonl')):
    name = os.path.basename(path)
    m = SEED_DIR.match(name)
    arm = os.path.basename(os.path.dirname(path)) if m else name
    run = load_run(path, arm, int(m.group(1)) if m else None)
    return Study(path=path, arms={arm: [run]}, info={}, run_config=_read_json(os.path.join(path, 'config.json')),
                 missing=[], single=True)
  info = _read_json(os.path.join(path, 'study.json'))
  arms: dict[str, list[RunMetrics]] = {}
  missing = []
  if info:
    for key in ('arms', 'seeds'):
      if not isinstance(info.get(key), list):
        raise ValueError(f"{path}/study.json has no list {key!r}; expected {{'arms': [...], 'seeds': [...], ...}} "
                         'as written by cfrl_jax.experiment.run.')
    for arm in info['arms']:
      runs = []
      for seed in info['seeds']:
        run_dir = os.path.join(path, str(arm), f'seed{seed}')
        if os.path.exists(os.path.join(run_dir, 'metrics.jsonl')):
          runs.append(load_run(run_dir, str(arm), int(seed)))
        else:
          missing.append(f'{arm}/seed{seed}')
      if runs:
        arms[str(arm)] = runs
  else:
    for name in sorted(os.listdir(path)):
      arm_dir = os.path.join(path, name)
      if os.path.isdir(arm_dir):
        runs = [load_run(d, name, seed) for seed, d in _seed_dirs(arm_dir)]
        if runs:
          arms[name] = runs
  if not arms:
    raise FileNotFoundError(f'No metrics.jsonl under {path}: expected {path}/metrics.jsonl (a run) or '
                            f'{path}/<arm>/seed<k>/metrics.jsonl (a study).' +
                            (f' study.json names {missing} but none has metrics.' if missing else ''))
  return Study(path=path, arms=arms, info=info, run_config={}, missing=missing, single=False)


# -- curves over seeds -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Curve:
  """One metric of one arm over steps. steps, mean, low, high: (n,); low/high: min/max over seeds, or
  mean -+ the logged standard error when se_band (with_se_band)."""
  steps: np.ndarray
  mean: np.ndarray
  low: np.ndarray
  high: np.ndarray
  num_seeds: int
  se_band: bool = False    # low/high are mean -+ a logged standard error (one seed), not a seed range


def arm_curve(runs: Sequence[RunMetrics], kind: str, key: str) -> Curve | None:
  """Seed mean and min-max of `key` at the steps all seeds that log it share; None without data."""
  per_seed = [r.series(kind, key) for r in runs]
  per_seed = [(s, v) for s, v in per_seed if len(s)]
  if not per_seed:
    return None
  steps = functools.reduce(np.intersect1d, [s for s, _ in per_seed])
  if not len(steps):
    return None
  vals = np.stack([v[np.searchsorted(s, steps)] for s, v in per_seed])   # (S, n)
  return Curve(steps, vals.mean(0), vals.min(0), vals.max(0), len(per_seed))


def _eval_endpoint(runs: Sequence[RunMetrics], key: str, which: str) -> list[tuple[int, float]] | None:
  """Per seed (step, value) of `key` at the base eval (step 0) or the last eval; None unless every seed has it."""
  out = []
  for run in runs:
    s, v = run.series('eval', key)
    if which == 'base':
      if not len(s) or s[0] != 0:
        return None
      out.append((0, float(v[0])))
    else:
      if not len(s):
        return None
      out.append((int(s[-1]), float(v[-1])))
  return out


def _train_window(runs: Sequence[RunMetrics], key: str, which: str) -> float | None:
  """Seed mean of the mean of `key` over the first/last TRAIN_WINDOW training steps; None unless every seed has it."""
  vals = []
  for run in runs:
    _, v = run.series('train', key)
    if not len(v):
      return None
    vals.append(float(np.mean(v[:TRAIN_WINDOW] if which == 'first' else v[-TRAIN_WINDOW:])))
  return float(np.mean(vals))


def first_step_at_or_above(curve: Curve | None, target: float) -> int | None:
  """The first step where the curve's seed mean reaches `target`; None when it never does."""
  if curve is None:
    return None
  hit = np.nonzero(curve.mean >= target)[0]
  return int(curve.steps[hit[0]]) if len(hit) else None


def stage2_starts(runs: Sequence[RunMetrics]) -> list[int]:
  """Per seed, the first training step logged in CF-RL stage 2 (seeds that never switch are left out)."""
  out = []
  for run in runs:
    s, v = run.series('train', 'stage')
    hit = np.nonzero(v == 2)[0]
    if len(hit):
      out.append(int(s[hit[0]]))
  return out


# -- the numbers of the report ---------------------------------------------------


@dataclasses.dataclass
class ArmSummary:
  """What the report says about one arm. Floats are seed means; None where the metric was not logged.

  final_pm: the plus-minus of final_pass1 (eval s.e. with one seed, s.d. over seeds otherwise).
  final_se / gain_se: standard errors used to judge noise (module docstring); None if unknown.
  """
  arm: str
  label: str
  num_seeds: int
  base_pass1: float | None = None
  final_pass1: float | None = None
  final_pm: float | None = None
  final_se: float | None = None
  gain: float | None = None
  gain_se: float | None = None
  final_steps: list[int] = dataclasses.field(default_factory=list)
  base_greedy: float | None = None
  final_greedy: float | None = None
  reward_first: float | None = None
  reward_last: float | None = None
  confidence_first: float | None = None
  confidence_last: float | None = None
  entropy_first: float | None = None
  entropy_last: float | None = None
  format_source: str | None = None            # 'eval' or 'train'
  base_format: tuple[str, float] | None = None
  final_format: tuple[str, float] | None = None
  r_share_first: float | None = None          # diagonal R share (a sample's own update)
  r_share_last: float | None = None
  r_share_off_first: float | None = None      # off-diagonal |R| / (|R| + |G|) (its reach to other contexts)
  r_share_off_last: float | None = None
  head_part_share: float | None = None        # |head| / (|head| + |backbone|) of the first-order probe change
  stage2_steps: list[int] = dataclasses.field(default_factory=list)
  steps_to_target: int | None = None
  steps_to_target_per_seed: list[int | None] = dataclasses.field(default_factory=list)
  last_eval_step: int | None = None


def _seed_se(values: Sequence[float]) -> float | None:
  return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def _eval_se(se_sq: Sequence[float] | None) -> float | None:
  """Standard error of a mean over seeds from per-seed squared standard errors."""
  if se_sq is None:
    return None
  return math.sqrt(float(np.mean(se_sq)) / len(se_sq))


def _noise_se(*ses: float | None) -> float | None:
  known = [s for s in ses if s is not None and math.isfinite(s)]
  return max(known) if known else None


def _dominant_format(runs: Sequence[RunMetrics], names: list[str], source: str, which: str):
  fractions = {}
  for name in names:
    if source == 'eval':
      ends = _eval_endpoint(runs, f'format_{name}', which)
      fractions[name] = None if ends is None else float(np.mean([v for _, v in ends]))
    else:
      fractions[name] = _train_window(runs, f'format_{name}', 'first' if which == 'base' else 'last')
  fractions = {k: v for k, v in fractions.items() if v is not None}
  if not fractions:
    return None
  best = max(fractions, key=fractions.get)
  return best, fractions[best]


def format_names(runs: Sequence[RunMetrics], kind: str) -> list[str]:
  """Solution-format names logged as format_<name> under `kind` ('unknown' last)."""
  names = [m.group(1) for k in logged_keys(runs, kind) for m in [FORMAT_KEY.match(k)] if m]
  return sorted(names, key=lambda n: (n == 'unknown', n))


def summarize_arm(study: Study, arm: str) -> ArmSummary:
  runs = study.arms[arm]
  out = ArmSummary(arm=arm, label=arm_label(arm), num_seeds=len(runs))
  base, final = _eval_endpoint(runs, 'pass@1', 'base'), _eval_endpoint(runs, 'pass@1', 'final')
  base_se, final_se = _eval_endpoint(runs, 'pass@1_stderr', 'base'), _eval_endpoint(runs, 'pass@1_stderr', 'final')
  if final is not None:
    finals = [v for _, v in final]
    out.final_pass1 = float(np.mean(finals))
    out.final_steps = [s for s, _ in final]
    eval_se = _eval_se(None if final_se is None else [v ** 2 for _, v in final_se])
    out.final_se = _noise_se(eval_se, _seed_se(finals))
    out.final_pm = (float(np.std(finals, ddof=1)) if len(finals) > 1 else
                    (final_se[0][1] if final_se is not None else None))
  if base is not None:
    out.base_pass1 = float(np.mean([v for _, v in base]))
  if base is not None and final is not None:
    gains = [f - b for (_, f), (_, b) in zip(final, base)]
    out.gain = float(np.mean(gains))
    both = None if base_se is None or final_se is None else [
        b ** 2 + f ** 2 for (_, b), (_, f) in zip(base_se, final_se)]
    out.gain_se = _noise_se(_eval_se(both), _seed_se(gains))
  for attr, which in (('base_greedy', 'base'), ('final_greedy', 'final')):
    ends = _eval_endpoint(runs, 'greedy_accuracy', which)
    setattr(out, attr, None if ends is None else float(np.mean([v for _, v in ends])))
  for prefix, key in (('reward', 'reward_mean'), ('confidence', 'mean_prob'), ('entropy', 'entropy')):
    setattr(out, f'{prefix}_first', _train_window(runs, key, 'first'))
    setattr(out, f'{prefix}_last', _train_window(runs, key, 'last'))
  for source in ('eval', 'train'):
    names = format_names(runs, source)
    if names:
      out.format_source = source
      out.base_format = _dominant_format(runs, names, source, 'base')
      out.final_format = _dominant_format(runs, names, source, 'final')
      break
  share = arm_curve(runs, 'probe', 'ntk_R_share')
  if share is not None:
    out.r_share_first, out.r_share_last = float(share.mean[0]), float(share.mean[-1])
  share = arm_curve(runs, 'probe', 'ntk_R_share_offdiag')
  if share is not None:
    out.r_share_off_first, out.r_share_off_last = float(share.mean[0]), float(share.mean[-1])
  head, backbone = (arm_curve(runs, 'probe', f'logprob_change_linear_{part}') for part in ('head', 'backbone'))
  if head is not None and backbone is not None:
    h, b = float(np.sum(np.abs(head.mean))), float(np.sum(np.abs(backbone.mean)))
    out.head_part_share = h / (h + b) if h + b > 0 else None
  out.stage2_steps = stage2_starts(runs)
  curve = arm_curve(runs, 'eval', 'pass@1')
  out.last_eval_step = None if curve is None else int(curve.steps[-1])
  return out


def default_target(summaries: Sequence[ArmSummary]) -> tuple[float | None, str]:
  """The best arm's base pass@1 + half its gain, and a sentence saying so; (None, why) if no arm improved."""
  known = [s for s in summaries if s.gain is not None]
  if not known:
    return None, 'no arm has both a base (step 0) and a final eval of pass@1'
  best = max(known, key=lambda s: s.gain)
  if best.gain <= 0:
    return None, f'no arm improved pass@1 (best change {best.gain:+.3f}, {best.label})'
  target = best.base_pass1 + 0.5 * best.gain
  return target, (f"default: the best arm's ({best.label}) base pass@1 {best.base_pass1:.3f} + half of its gain "
                  f'{best.gain:.3f}')


@dataclasses.dataclass
class TargetComparison:
  """Steps to target of a CF-RL arm vs its plain-RL arm. ratio: cf / rl steps when both reached, else None;
  text: the ratio as the report prints it (a bound when only one arm reached the target)."""
  cf: str
  rl: str
  ratio: float | None
  text: str


def cf_pairs(arms: Sequence[str]) -> list[tuple[str, str]]:
  """(CF-RL arm, its plain-RL arm) pairs present, e.g. ('cfgrpo', 'grpo')."""
  return [(a, a[2:]) for a in arms if a.startswith('cf') and a[2:] in arms]


def compare_steps(cf: ArmSummary, rl: ArmSummary) -> TargetComparison:
  c, r = cf.steps_to_target, rl.steps_to_target
  if c is not None and r is not None:
    if r == 0:
      return TargetComparison(cf.arm, rl.arm, None, f'n/a ({rl.label} met the target at its base eval)')
    return TargetComparison(cf.arm, rl.arm, c / r, f'{c / r:.2f}')
  if c is not None and rl.last_eval_step:
    return TargetComparison(cf.arm, rl.arm, None,
                            f'< {c / rl.last_eval_step:.2f} ({rl.label} not reached by step {rl.last_eval_step})')
  if r is not None and r > 0 and cf.last_eval_step is not None:
    return TargetComparison(cf.arm, rl.arm, None,
                            f'> {cf.last_eval_step / r:.2f} ({cf.label} not reached by step {cf.last_eval_step})')
  return TargetComparison(cf.arm, rl.arm, None, 'n/a (neither reached the target)' if c is None and r is None
                          else 'n/a')


@dataclasses.dataclass(frozen=True)
class SeedStats:
  """The numbers of one seed of one arm.

  auc: mean held-out pass@1 over the run's own eval span (study_stats.mean_pass1_auc); steps: steps to
  target (None without a target or an eval), censored at the last eval; stage2_step: the first CF-RL
  stage-2 training step (None: never switched, or not a CF-RL run).
  """
  arm: str
  seed: int | None
  base_pass1: float | None
  final_pass1: float | None
  last_eval_step: int | None
  auc: float | None
  steps: study_stats.StepsToTarget | None
  stage2_step: int | None


def seed_stats(run: RunMetrics, target: float | None) -> SeedStats:
  s, v = run.series('eval', 'pass@1')
  stage2 = stage2_starts([run])
  return SeedStats(
      arm=run.arm, seed=run.seed,
      base_pass1=float(v[0]) if len(s) and s[0] == 0 else None,
      final_pass1=float(v[-1]) if len(s) else None,
      last_eval_step=int(s[-1]) if len(s) else None,
      auc=study_stats.mean_pass1_auc(s, v),
      steps=None if target is None else study_stats.steps_to_target(s, v, target),
      stage2_step=stage2[0] if stage2 else None)


@dataclasses.dataclass(frozen=True)
class PairedResult:
  """One metric of one comparison over the seeds both arms ran.

  metric: 'steps' (steps to target), 'auc' or 'final' (final pass@1); seeds, treatment, control: (n,)
  the paired seeds and their values; censored: paired seeds whose steps to target is a bound in
  at least one arm; dropped: seeds left out because neither arm reached the target.
  """
  comparison: study_stats.Comparison
  metric: str
  seeds: list[int | None]
  treatment: list[float]
  control: list[float]
  interval: study_stats.PairedInterval
  censored: int = 0
  dropped: int = 0

  @property
  def verdict(self) -> str | None:
    """'better' / 'worse' for the treatment when the interval excludes 0 (fewer steps is better), else None."""
    if not self.interval.excludes_zero:
      return None
    lower_is_better = self.metric == 'steps'
    return 'better' if (self.interval.mean < 0) == lower_is_better else 'worse'


def paired_results(study: Study, per_seed: dict[str, list[SeedStats]],
                   target: float | None) -> list[PairedResult]:
  """Steps to target, AUC and final pass@1 of every comparison (study_stats.comparisons), paired by seed."""
  out = []
  for comp in study_stats.comparisons(list(study.arms)):
    t_by = {x.seed: x for x in per_seed[comp.treatment]}
    c_by = {x.seed: x for x in per_seed[comp.control]}
    seeds = [x.seed for x in per_seed[comp.treatment] if x.seed in c_by]
    runs_t = {r.seed: r for r in study.arms[comp.treatment]}
    runs_c = {r.seed: r for r in study.arms[comp.control]}
    if target is not None:
      both = [k for k in seeds if t_by[k].steps is not None and c_by[k].steps is not None]
      kept = [k for k in both if not (t_by[k].steps.censored and c_by[k].steps.censored)]
      if kept:
        out.append(PairedResult(
            comp, 'steps', kept, [t_by[k].steps.steps for k in kept], [c_by[k].steps.steps for k in kept],
            study_stats.paired_interval([t_by[k].steps.steps for k in kept], [c_by[k].steps.steps for k in kept]),
            censored=sum(t_by[k].steps.censored or c_by[k].steps.censored for k in kept),
            dropped=len(both) - len(kept)))
    # Each pair's AUC over the step span both seeds logged, so a run that stopped early is not compared
    # on a longer span than it has.
    aucs = {}
    for k in seeds:
      (st, vt), (sc, vc) = runs_t[k].series('eval', 'pass@1'), runs_c[k].series('eval', 'pass@1')
      if len(st) > 1 and len(sc) > 1:
        span = max(st[0], sc[0]), min(st[-1], sc[-1])
        a_t, a_c = study_stats.mean_pass1_auc(st, vt, *span), study_stats.mean_pass1_auc(sc, vc, *span)
        if a_t is not None and a_c is not None:
          aucs[k] = (a_t, a_c)
    if aucs:
      ks = list(aucs)
      out.append(PairedResult(comp, 'auc', ks, [aucs[k][0] for k in ks], [aucs[k][1] for k in ks],
                              study_stats.paired_interval([aucs[k][0] for k in ks], [aucs[k][1] for k in ks])))
    ks = [k for k in seeds if t_by[k].final_pass1 is not None and c_by[k].final_pass1 is not None]
    if ks:
      t, c = [t_by[k].final_pass1 for k in ks], [c_by[k].final_pass1 for k in ks]
      out.append(PairedResult(comp, 'final', ks, t, c, study_stats.paired_interval(t, c)))
  return out


@dataclasses.dataclass
class ReportNumbers:
  """Everything the tables and findings print. target_note says where the target came from;
  per_seed: arm -> one SeedStats per seed; paired: the paired comparisons between arms."""
  arms: dict[str, ArmSummary]
  target: float | None
  target_note: str
  comparisons: list[TargetComparison]
  eval_interval: int | None
  per_seed: dict[str, list[SeedStats]] = dataclasses.field(default_factory=dict)
  paired: list[PairedResult] = dataclasses.field(default_factory=list)
  base_note: str | None = None


def summarize(study: Study, target_accuracy: float | None = None) -> ReportNumbers:
  arms = {arm: summarize_arm(study, arm) for arm in study.arms}
  if target_accuracy is not None:
    if not 0.0 <= target_accuracy <= 1.0:
      raise ValueError(f'target_accuracy={target_accuracy} is not a pass@1 in [0, 1].')
    target, note = float(target_accuracy), 'given as target_accuracy'
  else:
    target, note = default_target(list(arms.values()))
  for arm, s in arms.items():
    if target is None:
      continue
    s.steps_to_target = first_step_at_or_above(arm_curve(study.arms[arm], 'eval', 'pass@1'), target)
    s.steps_to_target_per_seed = [first_step_at_or_above(arm_curve([r], 'eval', 'pass@1'), target)
                                  for r in study.arms[arm]]
  comparisons = [] if target is None else [compare_steps(arms[c], arms[r]) for c, r in cf_pairs(list(arms))]
  intervals = []
  for runs in study.arms.values():
    for run in runs:
      s, _ = run.series('eval', 'pass@1')
      intervals.extend(np.diff(s).tolist())
  interval = int(np.median(intervals)) if intervals else None
  per_seed = {arm: [seed_stats(r, target) for r in runs] for arm, runs in study.arms.items()}
  varies = study.info.get('base_varies_with_seed')   # written by cfrl_jax.experiment (study.vary_base)
  base_note = None if varies is None else (
      'Each RL seed started from its own pretrained base (study.vary_base), so the variation between seeds '
      'includes the base; arms are still paired, as one seed gives every arm the same base.' if varies else
      'Every arm and seed started from one shared pretrained base, so the variation between seeds is that of '
      'RL alone (prompts and sampling), not of the base.')
  return ReportNumbers(arms, target, note, comparisons, interval, per_seed, paired_results(study, per_seed, target),
                       base_note)


# -- findings: sentences generated from the numbers -------------------------------


def _fmt(x: float | None, digits: int = 3) -> str:
  return '—' if x is None or not math.isfinite(x) else f'{x:.{digits}f}'


def _direction(a: float, b: float, up: str = 'rose', down: str = 'fell') -> str:
  if round(a, 3) == round(b, 3):
    return 'stayed at'
  return up if b > a else down


def _noise_clause(diff: float, se: float | None) -> str:
  if se is None:
    return 'no standard error was logged, so noise cannot be judged'
  if abs(diff) > NOISE_SIGMAS * se:
    return f'beyond noise ({NOISE_SIGMAS:g} s.e. = {NOISE_SIGMAS * se:.3f})'
  return f'within noise ({NOISE_SIGMAS:g} s.e. = {NOISE_SIGMAS * se:.3f})'


def _seeds(n: int) -> str:
  return f'{n} seed' + ('' if n == 1 else 's')


def _paired_sentence(r: PairedResult, target: float | None) -> str:
  """One comparison on one metric; says faster/higher/... only when the 95% interval excludes 0."""
  t, c = arm_label(r.comparison.treatment), arm_label(r.comparison.control)
  n = r.interval.n
  digits = 1 if r.metric == 'steps' else 3
  vals = f'{np.mean(r.treatment):.{digits}f} vs {np.mean(r.control):.{digits}f}'
  diff = f'paired difference {r.interval.text(digits)}'
  what = (f'steps to the target pass@1 of {target:.3f}' if r.metric == 'steps' else
          {'auc': 'mean held-out pass@1 over training (AUC)', 'final': 'final held-out pass@1'}[r.metric])
  if r.verdict is None:
    out = f'{t} vs {c}, {what}: {vals} ({diff}); not distinguishable from {c} with {_seeds(n)}.'
  elif r.metric == 'steps':
    word = 'faster' if r.verdict == 'better' else 'slower'
    out = (f'{t} reached the target pass@1 of {target:.3f} {word} than {c}: {vals} steps, mean over '
           f'{_seeds(n)} ({diff}, 95% interval excludes 0).')
  else:
    word = 'higher' if r.verdict == 'better' else 'lower'
    out = f"{t}'s {what} is {word} than {c}'s: {vals}, mean over {_seeds(n)} ({diff}, 95% interval excludes 0)."
  if r.censored:
    out += (f' In {r.censored} of the {n} pairs a run never reached the target and is counted at its last eval '
            'step (a lower bound on its steps).')
  if r.dropped:
    out += f' Left out: {_seeds(r.dropped)} in which neither arm reached it.'
  return out


def _final_sentence(a: ArmSummary, b: ArmSummary) -> str:
  """Compares final pass@1 of arm `a` (the CF-RL arm, or the best arm) with `b`."""
  diff = a.final_pass1 - b.final_pass1
  se = None if a.final_se is None or b.final_se is None else math.hypot(a.final_se, b.final_se)
  noise = _noise_clause(diff, se)
  vals = f'{a.final_pass1:.3f} vs {b.final_pass1:.3f} ({diff:+.3f})'
  real = se is not None and abs(diff) > NOISE_SIGMAS * se
  if real and diff > 0:
    return f'Final pass@1: {a.label} beat {b.label}, {vals}, {noise}.'
  if real:
    return f'Final pass@1: {a.label} did not beat {b.label}, {vals}; {b.label} is higher {noise}.'
  if diff <= 0:
    return f'Final pass@1: {a.label} did not beat {b.label}, {vals}, {noise}.'
  return f'Final pass@1: {a.label} did not clearly beat {b.label}, {vals}, {noise}.'


def findings(nums: ReportNumbers) -> list[str]:
  """Plain sentences, each stating only what the numbers in the tables show."""
  out = []
  arms = nums.arms
  if nums.target is None:
    out.append(f'Steps to target were not computed: {nums.target_note}.')
  pairs = study_stats.comparisons(list(arms))
  for comp in pairs:
    results = [r for r in nums.paired if r.comparison == comp]
    if nums.target is not None and not any(r.metric == 'steps' for r in results):
      out.append(f'Neither {arm_label(comp.treatment)} nor {arm_label(comp.control)} reached the target pass@1 '
                 f'of {nums.target:.3f} in any seed both ran.')
    out += [_paired_sentence(r, nums.target) for r in results]
  if any(r.metric == 'steps' for r in nums.paired) and nums.eval_interval:
    out.append(f'Steps to target are resolved to the eval interval ({nums.eval_interval} steps).')
  with_final = [s for s in arms.values() if s.final_pass1 is not None]
  if not pairs and len(with_final) > 1:
    ranked = sorted(with_final, key=lambda s: -s.final_pass1)
    out.append(_final_sentence(ranked[0], ranked[1]))
  for s in arms.values():
    if s.gain is not None:
      verb = 'rose' if s.gain > 0 else 'fell' if s.gain < 0 else 'did not change'
      out.append(f'{s.label}: pass@1 {verb} from {s.base_pass1:.3f} to {s.final_pass1:.3f} ({s.gain:+.3f}), '
                 f'{_noise_clause(s.gain, s.gain_se)}.')
    if s.base_greedy is not None and s.final_greedy is not None:
      out.append(f'{s.label}: greedy accuracy {_direction(s.base_greedy, s.final_greedy)} '
                 f'{_from_to(s.base_greedy, s.final_greedy)}.')
    parts = []
    if s.entropy_first is not None:
      parts.append(f'entropy {_direction(s.entropy_first, s.entropy_last)} {_from_to(s.entropy_first, s.entropy_last)}')
    if s.confidence_first is not None:
      parts.append(f'confidence (mean sampled-token probability) {_direction(s.confidence_first, s.confidence_last)} '
                   f'{_from_to(s.confidence_first, s.confidence_last)}')
    if parts:
      out.append(f'{s.label}: ' + '; '.join(parts) + f' (means over the first/last {TRAIN_WINDOW} training steps).')
    if s.base_format is not None and s.final_format is not None:
      (b, bf), (f, ff) = s.base_format, s.final_format
      src = 'held-out samples' if s.format_source == 'eval' else 'training samples (no eval formats logged)'
      if b == f:
        out.append(f'{s.label}: the dominant format stayed {f} ({bf:.2f} → {ff:.2f} of {src}).')
      else:
        out.append(f'{s.label}: the dominant format shifted from {b} ({bf:.2f}) to {f} ({ff:.2f} of {src}).')
    if s.stage2_steps:
      out.append(f'{s.label}: CF-RL stage 2 (all parameters) started at step '
                 f'{", ".join(map(str, s.stage2_steps))}' + (' (per seed).' if s.num_seeds > 1 else '.'))
    if s.r_share_first is not None:
      out.append(f'{s.label}: the diagonal R (feature) share of the NTK {_direction(s.r_share_first, s.r_share_last)} '
                 f'{_from_to(s.r_share_first, s.r_share_last)} between the first and last probe.')
    if s.r_share_off_first is not None:
      out.append(f'{s.label}: across contexts (off-diagonal, |R| / (|R| + |G|)) the R share '
                 f'{_direction(s.r_share_off_first, s.r_share_off_last)} {_from_to(s.r_share_off_first, s.r_share_off_last)}.')
    if s.head_part_share is not None:
      out.append(f'{s.label}: over the probed updates the head moved {s.head_part_share:.0%} of the first-order '
                 'change of the probe log-probs, the backbone the rest (|head| / (|head| + |backbone|), summed '
                 'over probes).')
  return out


def _from_to(a: float, b: float) -> str:
  return f'{a:.3f}' if round(a, 3) == round(b, 3) else f'from {a:.3f} to {b:.3f}'


# -- figures ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Line:
  """One metric drawn for every arm in a panel; style tells lines of the same arm apart."""
  kind: str
  key: str
  style: str = '-'
  name: str = ''


@dataclasses.dataclass(frozen=True)
class Panel:
  title: str
  ylabel: str
  lines: tuple[Line, ...]
  log_if_positive: bool = False
  stage_switch: bool = False
  hline: float | None = None
  hline_label: str = ''
  se_key: str | None = None    # an arm with one seed gets the band value +- this logged standard error
  smooth: bool = False         # moving average over SMOOTH_WINDOW steps over the raw curve, faint; no band


def _colors(arms: Sequence[str]) -> dict[str, Any]:
  from matplotlib import colormaps
  cmap = colormaps['tab10']
  return {arm: cmap(i % 10) for i, arm in enumerate(arms)}


def _new_figure(n_panels: int, max_cols: int = 3):
  from matplotlib.figure import Figure
  ncols = 2 if n_panels == 4 else min(n_panels, max_cols)
  nrows = math.ceil(n_panels / ncols)
  size = (7.0, 4.0) if n_panels == 1 else (PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows)
  fig = Figure(figsize=size, dpi=DPI, layout='constrained')
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax in axes[n_panels:]:
    ax.set_visible(False)
  return fig, list(axes[:n_panels])


def _save(fig, out_dir: str, name: str) -> str:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  FigureCanvasAgg(fig)
  fig.savefig(os.path.join(out_dir, f'{name}.png'), dpi=DPI)
  return f'{name}.png'


def _band_note(study: Study) -> str:
  seeds = max(len(r) for r in study.arms.values())
  return f'; shaded: min–max over {seeds} seeds' if seeds > 1 else ''


def _draw_curve(ax, curve: Curve, color, style: str, label: str | None = None, smooth: bool = False):
  if smooth:
    ax.plot(curve.steps, curve.mean, style, color=color, lw=0.8, alpha=0.25)
    ax.plot(curve.steps, study_stats.moving_average(curve.mean, SMOOTH_WINDOW), style, color=color, lw=1.6,
            label=label)
    return
  ax.plot(curve.steps, curve.mean, style, color=color, lw=1.6, label=label,
          marker='o' if len(curve.steps) == 1 else None)
  if curve.num_seeds > 1 or curve.se_band:
    ax.fill_between(curve.steps, curve.low, curve.high, color=color, alpha=0.18, lw=0)


def with_se_band(curve: Curve, runs: Sequence[RunMetrics], kind: str, se_key: str) -> Curve:
  """A one-seed curve with low/high = mean -+ the run's logged standard error `se_key` (at the steps that
  have it); the curve unchanged when it has several seeds or no such error was logged."""
  if curve.num_seeds != 1:
    return curve
  logged = [run.series(kind, se_key) for run in runs]
  se_steps, se = next(((s, v) for s, v in logged if len(s)), (np.zeros(0, dtype=int), np.zeros(0)))
  steps, i, j = np.intersect1d(curve.steps, se_steps, return_indices=True)
  if not len(steps):
    return curve
  mean = curve.mean[i]
  return Curve(steps, mean, mean - se[j], mean + se[j], 1, se_band=True)


def _legend(ax, colors: dict[str, Any], arms: Sequence[str], styles: Sequence[tuple[str, str]], extra=()):
  from matplotlib.lines import Line2D
  handles = [Line2D([], [], color=colors[a], lw=2, label=arm_label(a)) for a in arms]
  if len(styles) > 1:
    handles += [Line2D([], [], color='0.3', ls=s, lw=1.6, label=n) for s, n in styles]
  handles += list(extra)
  ax.legend(handles=handles, fontsize=7, loc='best', framealpha=0.8)


def _draw_panels(study: Study, panels: Sequence[Panel], out_dir: str, name: str, suptitle: str,
                 band_note: str | None = None) -> str | None:
  """Draws the panels that have data (arms as colours, Line.style per metric); None if none has."""
  curves = {}
  for p in panels:
    for ln in p.lines:
      for arm, runs in study.arms.items():
        c = arm_curve(runs, ln.kind, ln.key)
        if c is not None:
          curves[(p.title, ln, arm)] = with_se_band(c, runs, ln.kind, p.se_key) if p.se_key else c
  drawn = [p for p in panels if any((p.title, ln, a) in curves for ln in p.lines for a in study.arms)]
  if not drawn:
    return None
  colors = _colors(list(study.arms))
  fig, axes = _new_figure(len(drawn))
  for ax, p in zip(axes, drawn):
    present_arms = [a for a in study.arms if any((p.title, ln, a) in curves for ln in p.lines)]
    present_lines = [ln for ln in p.lines if any((p.title, ln, a) in curves for a in study.arms)]
    values = []
    for ln in present_lines:
      for arm in present_arms:
        c = curves.get((p.title, ln, arm))
        if c is not None:
          _draw_curve(ax, c, colors[arm], ln.style, smooth=p.smooth)
          values.append(c.low)
    lo, hi = np.min(np.concatenate(values)), np.max(np.concatenate(values))
    if p.log_if_positive and lo > 0 and hi / lo >= LOG_SCALE_SPAN:
      ax.set_yscale('log')
    extra = []
    if p.stage_switch:
      from matplotlib.lines import Line2D
      for arm in present_arms:
        for step in sorted(set(stage2_starts(study.arms[arm]))):
          ax.axvline(step, color=colors[arm], ls=':', lw=1.2)
      if any(stage2_starts(study.arms[a]) for a in present_arms):
        extra.append(Line2D([], [], color='0.3', ls=':', lw=1.2, label='CF-RL stage 2 starts'))
    if p.hline is not None:
      from matplotlib.lines import Line2D
      ax.axhline(p.hline, color='0.5', ls='--', lw=1)
      extra.append(Line2D([], [], color='0.5', ls='--', lw=1, label=p.hline_label))
    ax.set_title(p.title, fontsize=10)
    ax.set_xlabel('RL step')
    ax.set_ylabel(p.ylabel)
    ax.grid(alpha=0.3)
    _legend(ax, colors, present_arms, [(ln.style, ln.name or ln.key) for ln in present_lines], extra)
  fig.suptitle(suptitle + (_band_note(study) if band_note is None else band_note), fontsize=11)
  return _save(fig, out_dir, name)


def figure_accuracy(study: Study, out_dir: str, target: float | None = None) -> str | None:
  return _draw_panels(study, [
      Panel('Held-out pass@1 (sampled)', 'pass@1', (Line('eval', 'pass@1'),), stage_switch=True,
            hline=target, hline_label=f'target {target:.3f}' if target is not None else '', se_key='pass@1_stderr'),
      Panel('Held-out greedy accuracy', 'accuracy', (Line('eval', 'greedy_accuracy'),)),
      Panel(f'Training reward (batch mean, {SMOOTH_WINDOW}-step moving average)', 'reward',
            (Line('train', 'reward_mean', '-', 'reward'), Line('train', 'accuracy', '--', 'correctness part')),
            stage_switch=True, smooth=True),
  ], out_dir, 'accuracy', 'Accuracy', band_note=f'; pass@1 band: {pass1_band(study)}')


def pass1_band(study: Study) -> str:
  """What the shaded band of the held-out pass@1 is, for the seed counts present."""
  counts = {len(runs) for runs in study.arms.values()}
  bands = ([f'min–max over seeds ({"/".join(str(c) for c in sorted(counts) if c > 1)} seeds)']
           if any(c > 1 for c in counts) else [])
  bands += ["± the eval's own s.e. of pass@1 (one seed)"] if 1 in counts else []
  return ' or '.join(bands)


def figure_confidence(study: Study, out_dir: str) -> str | None:
  return _draw_panels(study, [
      Panel('Confidence: mean prob. of sampled tokens', 'probability', (Line('train', 'mean_prob'),),
            stage_switch=True),
      Panel('Mean max-probability', 'probability', (Line('train', 'max_prob'),), stage_switch=True),
      Panel('Mean token entropy', 'entropy (nats)', (Line('train', 'entropy'),), stage_switch=True),
  ], out_dir, 'confidence', 'Confidence and entropy on training samples')


def figure_norms(study: Study, out_dir: str) -> str | None:
  head_kind = 'train' if 'head_norm' in study.keys('train') else 'probe'
  return _draw_panels(study, [
      Panel('Classifier (head) norm ||W||_F', 'norm', (Line(head_kind, 'head_norm'),)),
      Panel('Gradient norms', 'norm', (Line('train', 'grad_norm_head', '-', 'head'),
                                       Line('train', 'grad_norm_backbone', '--', 'backbone')),
            log_if_positive=True),
  ], out_dir, 'norms', 'Head and gradient norms')


def figure_ntk(study: Study, out_dir: str) -> str | None:
  keys = [k for k in study.keys('probe') if NTK_KEY.match(k)]
  styles = {'R': '-', 'G': '--', 'cross': ':', 'total': '-.'}
  panels = []
  for part in ('diag', 'offdiag'):
    lines = tuple(Line('probe', k, styles[NTK_KEY.match(k).group(1)], NTK_KEY.match(k).group(1))
                  for k in sorted(keys, key=lambda k: list(styles).index(NTK_KEY.match(k).group(1)))
                  if NTK_KEY.match(k).group(2) == part)
    if lines:
      where = 'same context (diagonal)' if part == 'diag' else 'across contexts (off-diagonal)'
      panels.append(Panel(f'eNTK components, {where}', 'kernel value', lines, log_if_positive=True))
  probe_keys = study.keys('probe')
  shares = tuple(Line('probe', k, style, name) for k, style, name in (
      ('ntk_R_share', '-', 'diagonal R/(R+G)'), ('ntk_R_share_offdiag', '--', 'off-diagonal |R|/(|R|+|G|)'))
      if k in probe_keys)
  if shares:
    panels.append(Panel('R share of the eNTK', 'share', shares))
  cosines = tuple(Line('probe', k, style, name) for k, style, name in (
      ('phi_cosine', '-', 'last prompt token'), ('phi_cosine_response', '--', 'response positions'))
      if k in probe_keys)
  if cosines:
    panels.append(Panel('Feature similarity: mean cos(phi, phi\') across contexts', 'cosine', cosines))
  return _draw_panels(study, panels, out_dir, 'ntk', 'Empirical NTK probes (R: from the head, G: from the backbone)')


def figure_logprob_split(study: Study, out_dir: str) -> str | None:
  """Who moves the log-probs: the first-order change of the probe log-probs per update, split into the
  head's and the backbone's parts for the optimizer actually used (AdamW), next to the actual change."""
  return _draw_panels(study, [
      Panel('First-order change of probe log-probs per update', 'mean Δ log π',
            (Line('probe', 'logprob_change_linear_head', '-', 'head part'),
             Line('probe', 'logprob_change_linear_backbone', '--', 'backbone part'),
             Line('probe', 'logprob_change_actual', ':', 'actual')), stage_switch=True),
  ], out_dir, 'logprob_split', 'Who moves the log-probs (head vs backbone, first order)')


def figure_passk(study: Study, out_dir: str) -> str | None:
  ks = sorted(int(m.group(1)) for k in study.keys('eval') for m in [PASS_K_KEY.match(k)] if m)
  if len(ks) < 2:   # pass@1 alone is already in accuracy.png
    ks = []
  colors = _colors(list(study.arms))
  per_arm = {}
  for arm, runs in study.arms.items():
    pts = {}
    for which in ('base', 'final'):
      xs, ys = [], []
      for k in ks:
        ends = _eval_endpoint(runs, f'pass@{k}', which)
        if ends is not None:
          xs.append(k)
          ys.append(float(np.mean([v for _, v in ends])))
      if xs:
        pts[which] = (xs, ys)
    if pts:
      per_arm[arm] = pts
  distinct = [a for a, runs in study.arms.items() if arm_curve(runs, 'eval', 'distinct_answers') is not None]
  n = bool(per_arm) + bool(distinct)
  if not n:
    return None
  from matplotlib.lines import Line2D
  fig, axes = _new_figure(n)
  axes = iter(axes)
  if per_arm:
    ax = next(axes)
    for arm, pts in per_arm.items():
      for which, style, marker in (('base', '--', 's'), ('final', '-', 'o')):
        if which in pts:
          ax.plot(*pts[which], style, marker=marker, color=colors[arm], lw=1.5, ms=4)
    if len(ks) > 1:
      ax.set_xscale('log', base=2)
      ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_title('pass@k: base (step 0) vs last eval', fontsize=10)
    ax.set_xlabel('k (samples per problem)')
    ax.set_ylabel('pass@k')
    ax.grid(alpha=0.3)
    _legend(ax, colors, list(per_arm), [], [Line2D([], [], color='0.3', ls='--', marker='s', ms=4, label='base'),
                                            Line2D([], [], color='0.3', ls='-', marker='o', ms=4, label='last eval')])
  if distinct:
    ax = next(axes)
    for arm in distinct:
      _draw_curve(ax, arm_curve(study.arms[arm], 'eval', 'distinct_answers'), colors[arm], '-')
    ax.set_title('Distinct final answers per problem', fontsize=10)
    ax.set_xlabel('RL step')
    ax.set_ylabel('distinct answers')
    ax.grid(alpha=0.3)
    _legend(ax, colors, distinct, [])
  fig.suptitle('Diversity: pass@k and distinct answers (held-out)' + _band_note(study), fontsize=11)
  return _save(fig, out_dir, 'passk')


def figure_formats(study: Study, out_dir: str) -> str | None:
  every_run = [r for runs in study.arms.values() for r in runs]
  source = 'eval' if format_names(every_run, 'eval') else 'train'
  names = format_names(every_run, source)
  arms = [a for a in study.arms if any(arm_curve(study.arms[a], source, f'format_{n}') is not None for n in names)]
  if not arms:
    return None
  from matplotlib import colormaps
  cmap = colormaps['Dark2']
  fig, axes = _new_figure(len(arms))
  for ax, arm in zip(axes, arms):
    for i, name in enumerate(names):
      c = arm_curve(study.arms[arm], source, f'format_{name}')
      if c is not None:
        _draw_curve(ax, c, cmap(i % 8), '-', label=name)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(arm_label(arm), fontsize=10)
    ax.set_xlabel('RL step')
    ax.set_ylabel('fraction of samples')
    ax.grid(alpha=0.3)
    ax.legend(title='format', fontsize=7, title_fontsize=7, loc='best', framealpha=0.8)
  where = 'held-out samples' if source == 'eval' else 'training samples'
  fig.suptitle(f'Solution formats over training ({where})' + _band_note(study), fontsize=11)
  return _save(fig, out_dir, 'formats')


# -- Echo Chamber: solution formats over training, with held-out accuracy ---------------

ECHO_CHAMBER_FIGURE = 'echo_chamber'
COLLAPSE_SHARE = 0.9        # a format has taken over once its smoothed share of training samples reaches this
GREEDY_FORMAT_KEY = re.compile(r'^greedy_format_(.+)$')


def is_echo_chamber(study: Study) -> bool:
  """A study of configs/echo_chamber.py: its config's name starts with 'echo_chamber' (that config and its
  :smoke variant), or it uses Echo Chamber's REINFORCE (rl.reinforce_style), which only that config sets."""
  name = _get(study.config, 'name')
  return ((isinstance(name, str) and name.startswith('echo_chamber'))
          or _get(study.config, 'rl.reinforce_style') == 'echo_chamber')


@dataclasses.dataclass(frozen=True)
class FormatTrack:
  """One solution format's share of an arm's training samples (train format_<name>) over RL steps.

  steps (n,): the training steps every seed logged; raw (n,): seed mean of the per-step fraction;
  smooth (n,): its centred moving average over `window` steps (study_stats.moving_average);
  low, high (n,): min / max over seeds of each seed's moving average (both equal smooth for one seed).
  """
  name: str
  steps: np.ndarray
  raw: np.ndarray
  smooth: np.ndarray
  low: np.ndarray
  high: np.ndarray
  num_seeds: int


def format_tracks(runs: Sequence[RunMetrics], window: int = SMOOTH_WINDOW) -> list[FormatTrack]:
  """A FormatTrack per format logged in the runs' training records ('unknown' last)."""
  out = []
  for name in format_names(runs, 'train'):
    per_seed = [(s, v) for s, v in (r.series('train', f'format_{name}') for r in runs) if len(s)]
    if not per_seed:
      continue
    steps = functools.reduce(np.intersect1d, [s for s, _ in per_seed])
    if not len(steps):
      continue
    vals = np.stack([v[np.searchsorted(s, steps)] for s, v in per_seed])            # (S, n)
    smooth = np.stack([study_stats.moving_average(v, window) for v in vals])         # (S, n)
    out.append(FormatTrack(name, steps, vals.mean(0), smooth.mean(0), smooth.min(0), smooth.max(0), len(vals)))
  return out


@dataclasses.dataclass(frozen=True)
class EchoChamberPanel:
  """One arm's panel of the Echo Chamber figure.

  pass1: held-out pass@1 at the eval temperature (band: min-max over seeds, or +- the eval's s.e. with one
  seed); greedy: held-out greedy accuracy (band: min-max over seeds). None where not logged.
  """
  arm: str
  formats: list[FormatTrack]
  pass1: Curve | None
  greedy: Curve | None


def echo_chamber_panels(study: Study, window: int = SMOOTH_WINDOW) -> list[EchoChamberPanel]:
  """The series the Echo Chamber figure draws, per arm that logged training format fractions."""
  out = []
  for arm, runs in study.arms.items():
    tracks = format_tracks(runs, window)
    if not tracks:
      continue
    pass1 = arm_curve(runs, 'eval', 'pass@1')
    if pass1 is not None:
      pass1 = with_se_band(pass1, runs, 'eval', 'pass@1_stderr')
    out.append(EchoChamberPanel(arm, tracks, pass1, arm_curve(runs, 'eval', 'greedy_accuracy')))
  return out


@dataclasses.dataclass(frozen=True)
class CollapseAndGain:
  """Does the format collapse coincide with the largest accuracy gain? (one arm)

  dominant: the format with the largest smoothed share at the last training step; first_share /
  last_share: its smoothed share at the first / last training step; collapse_step: the first training
  step at which that share reaches COLLAPSE_SHARE (None: never); gain_from, gain_to, gain: the pair of
  consecutive evals with the largest rise of seed-mean pass@1 (None with fewer than 2 evals);
  coincides: gain_from < collapse_step <= gain_to (None when either is unknown).
  """
  arm: str
  dominant: str
  first_share: float
  last_share: float
  collapse_step: int | None
  gain_from: int | None
  gain_to: int | None
  gain: float | None
  coincides: bool | None


def collapse_and_gain(panel: EchoChamberPanel, share: float = COLLAPSE_SHARE) -> CollapseAndGain:
  dom = max(panel.formats, key=lambda t: t.smooth[-1])
  hit = np.nonzero(dom.smooth >= share)[0]
  collapse = int(dom.steps[hit[0]]) if len(hit) else None
  gain_from = gain_to = gain = None
  p = panel.pass1
  if p is not None and len(p.steps) >= 2:
    i = int(np.argmax(np.diff(p.mean)))
    gain_from, gain_to, gain = int(p.steps[i]), int(p.steps[i + 1]), float(p.mean[i + 1] - p.mean[i])
  coincides = None if collapse is None or gain_from is None else gain_from < collapse <= gain_to
  return CollapseAndGain(panel.arm, dom.name, float(dom.smooth[0]), float(dom.smooth[-1]), collapse,
                         gain_from, gain_to, gain, coincides)


def eval_format_endpoints(runs: Sequence[RunMetrics]) -> dict[str, dict[str, float | None]]:
  """Per format: seed means of its eval fraction among sampled (format_<name>) and greedy
  (greedy_format_<name>) completions at the base eval (step 0) and at each seed's last eval.

  {name: {'sampled_base', 'sampled_end', 'greedy_base', 'greedy_end'}}; None where a seed lacks it.
  """
  keys = logged_keys(runs, 'eval')
  names = {m.group(1) for k in keys for m in [FORMAT_KEY.match(k) or GREEDY_FORMAT_KEY.match(k)] if m}
  out = {}
  for name in sorted(names, key=lambda n: (n == 'unknown', n)):
    row = {}
    for source, prefix in (('sampled', 'format_'), ('greedy', 'greedy_format_')):
      for which, label in (('base', 'base'), ('final', 'end')):
        ends = _eval_endpoint(runs, prefix + name, which)
        row[f'{source}_{label}'] = None if ends is None else float(np.mean([v for _, v in ends]))
    out[name] = row
  return out


def eval_temperature(config: dict[str, Any]) -> float | None:
  """The eval's sampling temperature: eval.temperature, or rl.temperature when that is < 0."""
  t = _get(config, 'eval.temperature')
  if _is_number(t) and t >= 0:
    return float(t)
  t = _get(config, 'rl.temperature')
  return float(t) if _is_number(t) else None


def echo_chamber_format_table(study: Study) -> list[str]:
  """Markdown: per arm and format, the sampled and greedy eval fractions at the base and at the end."""
  t = eval_temperature(study.config)
  sampled = f'sampled (T = {t:g})' if t is not None else 'sampled'
  rows = []
  for arm, runs in study.arms.items():
    for name, v in eval_format_endpoints(runs).items():
      if not any(x for x in v.values()):   # never produced, by either decoding
        continue
      rows.append(f'| {arm_label(arm)} | {name} | {_arrow(v["sampled_base"], v["sampled_end"])} | '
                  f'{_arrow(v["greedy_base"], v["greedy_end"])} |')
  if not rows:
    return ['No eval format fractions logged (eval format_<name> / greedy_format_<name>).']
  return [f'| arm | format | {sampled}: base → end | greedy: base → end |', '|---|---|---|---|', *rows]


def collapse_table(study: Study, window: int = SMOOTH_WINDOW) -> list[str]:
  """Markdown: per arm, the dominant training format, when it reached COLLAPSE_SHARE, and the largest gain."""
  rows = []
  for p in echo_chamber_panels(study, window):
    c = collapse_and_gain(p)
    gain = '—' if c.gain is None else f'{c.gain_from} → {c.gain_to} ({c.gain:+.3f})'
    coincide = {None: '—', True: 'yes', False: 'no'}[c.coincides]
    rows.append(f'| {arm_label(c.arm)} | {c.dominant} ({c.first_share:.2f} → {c.last_share:.2f}) | '
                f'{"not reached" if c.collapse_step is None else c.collapse_step} | {gain} | {coincide} |')
  if not rows:
    return []
  return [f'| arm | dominant training format at the end (share first → last step) | first step with share '
          f'≥ {COLLAPSE_SHARE:g} | largest pass@1 rise between evals (steps, change) | collapse within it |',
          '|---|---|---|---|---|', *rows]


def figure_echo_chamber(study: Study, out_dir: str) -> str | None:
  """Per arm: the share of training samples in each format over RL steps (moving average over SMOOTH_WINDOW
  steps, raw faint, min-max band over seeds) and, on a second axis, held-out pass@1 and greedy accuracy."""
  panels = echo_chamber_panels(study)
  if not panels:
    return None
  from matplotlib import colormaps
  from matplotlib.lines import Line2D
  cmap = colormaps['Dark2']
  names = list(dict.fromkeys(t.name for p in panels for t in p.formats))
  colors = {n: cmap(i % 8) for i, n in enumerate(names)}
  fig, axes = _new_figure(len(panels), max_cols=2)
  for ax, p in zip(axes, panels):
    handles = []
    for t in p.formats:
      if not np.any(t.raw > 0):   # never sampled: a line on 0 adds nothing
        continue
      ax.plot(t.steps, t.raw, color=colors[t.name], lw=0.8, alpha=0.25)
      ax.plot(t.steps, t.smooth, color=colors[t.name], lw=1.8)
      if t.num_seeds > 1:
        ax.fill_between(t.steps, t.low, t.high, color=colors[t.name], alpha=0.15, lw=0)
      handles.append(Line2D([], [], color=colors[t.name], lw=1.8, label=f'format: {t.name}'))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel('RL step')
    ax.set_ylabel('fraction of training samples')
    ax.set_title(arm_label(p.arm), fontsize=10)
    ax.grid(alpha=0.3)
    acc = ax.twinx()
    for curve, style, color, label in ((p.pass1, '-', 'black', 'held-out pass@1'),
                                       (p.greedy, '--', '0.45', 'held-out greedy accuracy')):
      if curve is None:
        continue
      acc.plot(curve.steps, curve.mean, style, color=color, lw=1.4, marker='o', ms=3)
      if curve.num_seeds > 1 or curve.se_band:
        acc.fill_between(curve.steps, curve.low, curve.high, color=color, alpha=0.10, lw=0)
      handles.append(Line2D([], [], color=color, ls=style, marker='o', ms=3, lw=1.4, label=label))
    acc.set_ylabel('held-out accuracy')
    acc.set_ylim(bottom=0)
    ax.legend(handles=handles, fontsize=7, loc='best', framealpha=0.8)
  fig.suptitle(f'Echo Chamber: formats of training samples ({SMOOTH_WINDOW}-step moving average, raw faint)\n'
               'and held-out accuracy (right axis)' + _band_note(study), fontsize=11)
  return _save(fig, out_dir, ECHO_CHAMBER_FIGURE)


def echo_chamber_section(study: Study, figure: str | None) -> list[str]:
  """The report's Echo Chamber section: format tables (greedy and sampled), the collapse vs gain table
  with its rule, and the figure."""
  md = ['## Echo Chamber: solution formats and accuracy', '',
        'Fraction of held-out completions in each solution format at the base (step 0) and at the end (each '
        "seed's last eval), among the sampled completions (the eval temperature) and the greedy ones; means over "
        'seeds. Formats that neither decoding produced are left out.', '', *echo_chamber_format_table(study), '']
  collapse = collapse_table(study)
  if collapse:
    md += ['Collapse vs gain. Dominant format: the one with the largest share of training samples at the last '
           f'step ({SMOOTH_WINDOW}-step centred moving average of the seed mean); its collapse step: the first '
           f'training step at which that share reaches {COLLAPSE_SHARE:g}. Largest gain: the pair of consecutive '
           'evals with the largest rise of seed-mean held-out pass@1. "Collapse within it": the collapse step lies '
           'after the first of those evals and at or before the second.', '', *collapse, '']
  if figure:
    md += [f'Per arm: the share of training samples in each format over RL steps ({SMOOTH_WINDOW}-step moving '
           'average, the raw per-step seed mean faint' +
           (', band: min–max over seeds of each seed\'s moving average' if any(len(r) > 1 for r in study.arms.values())
            else '') + '); right axis: held-out pass@1 (solid, band: ' + pass1_band(study) + ') and greedy '
           'accuracy (dashed). Formats never sampled in training are not drawn.', '',
           f'![Echo Chamber formats and accuracy]({figure})', '']
  return md


# -- report.md ----------------------------------------------------------------------


def _get(d: dict, dotted: str):
  for part in dotted.split('.'):
    if not isinstance(d, dict) or part not in d:
      return None
    d = d[part]
  return d


def _duration(seconds: float) -> str:
  return f'{seconds:.0f} s' if seconds < 120 else f'{seconds / 60:.1f} min' if seconds < 7200 else \
      f'{seconds / 3600:.1f} h'


def _what_was_run(study: Study) -> list[str]:
  cfg, info = study.config, study.info
  lines = []
  arms = ', '.join(f'{arm_label(a)} (`{a}`)' for a in study.arms)
  if study.single:
    seed = study.arms[next(iter(study.arms))][0].seed
    lines.append(f'- A single run: {arms}' + (f', seed {seed}' if seed is not None else '') + '.')
  else:
    seeds = info.get('seeds') or sorted({r.seed for runs in study.arms.values() for r in runs if r.seed is not None})
    lines.append(f'- Arms: {arms}; seeds: {", ".join(map(str, seeds)) or "one per arm"}.')
  if study.missing:
    lines.append(f'- **Missing runs** (named in study.json, no metrics.jsonl): {", ".join(study.missing)}.')
  last = [int(r.records['train'][-1]['step']) for runs in study.arms.values() for r in runs if r.records.get('train')]
  planned = _get(cfg, 'rl.steps')
  if last:
    logged = f'{min(last)}' if min(last) == max(last) else f'{min(last)}–{max(last)}'
    lines.append(f'- RL steps: {planned if planned is not None else "?"} planned (config.rl.steps); '
                 f'last training step logged: {logged}.')
  if cfg:
    algo = _get(cfg, 'rl.algorithm')
    if study.single and algo is not None:
      cf = _get(cfg, 'cfrl.enabled')
      lines.append(f'- Algorithm: {algo}' + (' with CF-RL' if cf else '') + '.')
    rl = [f'{n} {v}' for n, v in (('prompts/step', _get(cfg, 'rl.prompts_per_step')),
                                  ('group size', _get(cfg, 'rl.group_size')), ('lr', _get(cfg, 'rl.lr')),
                                  ('temperature', _get(cfg, 'rl.temperature')), ('KL coef', _get(cfg, 'rl.kl_coef')))
          if v is not None]
    if rl:
      lines.append(f'- RL settings: {", ".join(rl)}.')
    if any(a.startswith('cf') for a in study.arms) or (study.single and _get(cfg, 'cfrl.enabled')):
      s1, hlr = _get(cfg, 'cfrl.stage1_steps'), _get(cfg, 'cfrl.stage1_head_lr')
      how = _get(cfg, 'cfrl.switch_on')
      if s1 is not None:
        lines.append(f'- CF-RL stage 1 (head only): {s1} steps, head lr {hlr}, switch on {how}.')
  model = []
  source = _get(cfg, 'model.source')
  if source:
    model.append(f'source {source}' + (f' `{_get(cfg, "model.path")}`' if _get(cfg, 'model.path') else ''))
  base = info.get('base') or {}
  if base.get('num_params'):
    model.append(f'{base["num_params"] / 1e6:.2f}M parameters')
  elif source in ('pretrain', 'init') and _get(cfg, 'model.arch.hidden_size'):
    model.append(f'hidden {_get(cfg, "model.arch.hidden_size")}, {_get(cfg, "model.arch.num_layers")} layers')
  if base.get('steps') is not None:
    model.append(f'pretrained {base["steps"]} steps' +
                 (f' to loss {base["final_loss"]:.3f}' if _is_number(base.get('final_loss')) else '') +
                 (f' in {_duration(base["seconds"])}' if _is_number(base.get('seconds')) else ''))
  if model:
    lines.append(f'- Model: {", ".join(model)}.')
  n_problems = _get(cfg, 'eval.num_problems')
  for runs in study.arms.values():
    s, v = runs[0].series('eval', 'num_problems')
    if len(v):
      n_problems = int(v[-1])
  ev = [f'{n_problems} held-out problems' if n_problems is not None else None,
        f'{_get(cfg, "eval.samples")} samples each' if _get(cfg, 'eval.samples') is not None else None,
        f'every {_get(cfg, "eval.every")} steps' if _get(cfg, 'eval.every') is not None else None]
  if any(ev):
    lines.append(f'- Evaluation: {", ".join(e for e in ev if e)}.')
  timings = info.get('timings') or {}
  if timings:
    per_arm = []
    for arm in study.arms:
      t = [v for k, v in timings.items() if k.split('/')[0] == arm and _is_number(v)]
      if t:
        per_arm.append(f'{arm_label(arm)} {_duration(float(np.mean(t)))}')
    total = timings.get('total')
    lines.append('- Timings: ' + (f'total {_duration(total)}' if _is_number(total) else '') +
                 (('; ' if _is_number(total) else '') + 'mean per run: ' + ', '.join(per_arm) if per_arm else '') + '.')
  return lines


def _pm(x: float | None, pm: float | None) -> str:
  return _fmt(x) if pm is None or x is None or not math.isfinite(pm) else f'{x:.3f} ± {pm:.3f}'


def _arrow(a: float | None, b: float | None) -> str:
  return '—' if a is None and b is None else f'{_fmt(a)} → {_fmt(b)}'


def results_table(nums: ReportNumbers) -> list[str]:
  multi = any(s.num_seeds > 1 for s in nums.arms.values())
  pm = 's.d. over seeds' if multi else 's.e.'
  out = [f'| arm | seeds | pass@1 base | pass@1 final (± {pm}) | Δ pass@1 | final step '
         '| greedy acc. base → final | train reward first → last | confidence first → last '
         '| entropy first → last | dominant format base → final |',
         '|' + '---|' * 11]
  for s in nums.arms.values():
    steps = '—' if not s.final_steps else (str(s.final_steps[0]) if len(set(s.final_steps)) == 1 else
                                           f'{min(s.final_steps)}–{max(s.final_steps)}')
    fmt = '—'
    if s.final_format is not None:
      b = f'{s.base_format[0]} ({s.base_format[1]:.2f})' if s.base_format else '—'
      fmt = f'{b} → {s.final_format[0]} ({s.final_format[1]:.2f})'
      fmt += ' [train]' if s.format_source == 'train' else ''
    pm_value = s.final_pm if (s.num_seeds > 1 or not multi) else None   # match the column's header
    gain = '—' if s.gain is None else f'{s.gain:+.3f}'
    out.append(f'| {s.label} | {s.num_seeds} | {_fmt(s.base_pass1)} | {_pm(s.final_pass1, pm_value)} | '
               f'{gain} | {steps} | {_arrow(s.base_greedy, s.final_greedy)} | '
               f'{_arrow(s.reward_first, s.reward_last)} | {_arrow(s.confidence_first, s.confidence_last)} | '
               f'{_arrow(s.entropy_first, s.entropy_last)} | {fmt} |')
  return out


def target_table(nums: ReportNumbers) -> list[str]:
  if nums.target is None:
    return [f'Not computed: {nums.target_note}. Pass target_accuracy (--target_accuracy) to set one.']
  out = [f'Target pass@1: **{nums.target:.3f}** ({nums.target_note}).', '',
         '| arm | first eval step with seed-mean pass@1 ≥ target | per seed | last eval step |', '|---|---|---|---|']
  for s in nums.arms.values():
    per_seed = ', '.join('not reached' if x is None else str(x) for x in s.steps_to_target_per_seed)
    out.append(f'| {s.label} | {"not reached" if s.steps_to_target is None else s.steps_to_target} | '
               f'{per_seed or "—"} | {"—" if s.last_eval_step is None else s.last_eval_step} |')
  for comp in nums.comparisons:
    out += ['', f'Steps-to-target ratio {arm_label(comp.cf)} / {arm_label(comp.rl)}: **{comp.text}** '
                '(seed-mean curves; below 1: CF-RL got there in fewer steps; whether that is more than seed '
                'noise is in the paired comparisons).']
  return out


def per_seed_table(nums: ReportNumbers) -> list[str]:
  out = ['| arm | seed | pass@1 base | pass@1 final | last eval step | steps to target | AUC (mean pass@1) '
         '| stage 2 from |', '|' + '---|' * 8]
  for arm, rows in nums.per_seed.items():
    for x in rows:
      out.append(f'| {arm_label(arm)} | {"—" if x.seed is None else x.seed} | {_fmt(x.base_pass1)} | '
                 f'{_fmt(x.final_pass1)} | {"—" if x.last_eval_step is None else x.last_eval_step} | '
                 f'{"—" if x.steps is None else x.steps} | {_fmt(x.auc)} | '
                 f'{"—" if x.stage2_step is None else x.stage2_step} |')
  return out


def _mean_sd_text(values: Sequence[float], digits: int = 3) -> str:
  mean, sd = study_stats.mean_sd(values)
  if mean is None:
    return '—'
  return f'{mean:.{digits}f}' if sd is None else f'{mean:.{digits}f} ± {sd:.{digits}f}'


def across_seed_table(nums: ReportNumbers) -> list[str]:
  out = ['| arm | seeds | pass@1 final | AUC (mean pass@1) | steps to target | seeds not reaching the target |',
         '|' + '---|' * 6]
  for arm, rows in nums.per_seed.items():
    steps = [x.steps for x in rows if x.steps is not None]
    censored = sum(s.censored for s in steps)
    out.append(f'| {arm_label(arm)} | {len(rows)} | '
               f'{_mean_sd_text([x.final_pass1 for x in rows if x.final_pass1 is not None])} | '
               f'{_mean_sd_text([x.auc for x in rows if x.auc is not None])} | '
               f'{_mean_sd_text([s.steps for s in steps], 1)}{" (bound)" if censored else ""} | '
               f'{f"{censored} of {len(steps)}" if steps else "—"} |')
  return out


PAIRED_METRICS = {'steps': 'steps to target', 'auc': 'AUC (mean pass@1)', 'final': 'final pass@1'}


def paired_table(nums: ReportNumbers) -> list[str]:
  if not nums.paired:
    return ['No comparisons: the study has no pair of arms from the comparison table '
            '(cfrl_jax.study_stats.COMPARISONS, or cf<X> against <X>).']
  out = ['| treatment − control | isolates | metric | seeds | treatment | control | difference [95% interval] '
         '| verdict |', '|' + '---|' * 8]
  for r in nums.paired:
    digits = 1 if r.metric == 'steps' else 3
    verdict = {None: 'not distinguishable', 'better': 'faster' if r.metric == 'steps' else 'higher',
               'worse': 'slower' if r.metric == 'steps' else 'lower'}[r.verdict]
    note = f' ({r.censored} censored)' if r.censored else ''
    out.append(f'| {arm_label(r.comparison.treatment)} − {arm_label(r.comparison.control)} | {r.comparison.isolates} '
               f'| {PAIRED_METRICS[r.metric]} | {r.interval.n}{note} | {np.mean(r.treatment):.{digits}f} | '
               f'{np.mean(r.control):.{digits}f} | {r.interval.text(digits)} | {verdict} |')
  return out


METHOD_LINES = (
    study_stats.METHOD,
    'Steps to target: the first eval step with pass@1 ≥ the target, per seed; "N+" marks a seed that never reached '
    'it, counted at its last eval step N (a lower bound on its steps, so its arm\'s mean is a bound too); a seed in '
    'which neither arm of a comparison reached it is left out of that comparison.',
    'AUC: the trapezoid area under the held-out pass@1 curve over eval steps divided by the step span, i.e. the '
    'mean pass@1 over training; it uses every eval, so it depends less on the eval grid than steps to target. '
    'A paired comparison uses the step span both runs logged. Across seeds: mean ± sample standard deviation.',
)


def seed_statistics_section(nums: ReportNumbers) -> list[str]:
  """The per-seed table, the across-seed table, the paired comparisons and the method, as markdown lines."""
  return ['Per seed:', '', *per_seed_table(nums), '', 'Across seeds (mean ± s.d.; one seed: the value):', '',
          *across_seed_table(nums), '', 'Paired comparisons (treatment − control, per RL seed):', '',
          *paired_table(nums), '',
          *[x for line in METHOD_LINES + ((nums.base_note,) if nums.base_note else ()) for x in (line, '')]][:-1]


FIGURE_CAPTIONS = {   # name -> (heading, caption)
    'accuracy': ('Accuracy', 'Held-out pass@1 (sampled) and greedy accuracy, and the training reward, per RL step. '
                 'Band of pass@1: {band}. Training reward: centered moving average over {window} steps, the raw '
                 'per-step curve faint. Dotted vertical lines: the first step of CF-RL stage 2 (per seed).'),
    'confidence': ('Confidence and entropy', 'Confidence (mean probability of sampled tokens), mean max-probability '
                   'and entropy on training samples; dotted vertical lines: the first step of CF-RL stage 2.'),
    'passk': ('pass@k and diversity', 'pass@k of the base model (dashed) and at the last eval (solid), and distinct '
              'final answers per problem.'),
    'formats': ('Solution formats', 'Fraction of samples in each solution format, one panel per arm.'),
    'ntk': ('Empirical NTK', 'Empirical NTK components from the probes: R (head/feature part), G (backbone part), '
            'cross terms and total (log scale when positive and spanning a wide range); the R share on the '
            'diagonal (a sample on itself) and off it (|R| / (|R| + |G|) between different contexts: the '
            'paper\'s mechanism); the mean cosine between features of different contexts at the last prompt '
            'token and at the response positions.'),
    'logprob_split': ('Who moves the log-probs', 'The first-order change of the probe log-probs caused by each '
                      'probed update, split into the head\'s and the backbone\'s parts (exact JVPs along the '
                      'AdamW update actually applied), with the actual change.'),
    'norms': ('Norms', 'Classifier norm and gradient norms of the head and the backbone.'),
}
FIGURE_NEEDS = {
    'accuracy': 'eval pass@1 / greedy_accuracy or train reward_mean / accuracy',
    'confidence': 'train mean_prob/max_prob/entropy',
    'passk': 'eval pass@k or distinct_answers', 'formats': 'eval or train format_<name>',
    'ntk': 'probe ntk_<R|G|cross|total>_<diag|offdiag>, ntk_R_share(_offdiag) or phi_cosine(_response)',
    'logprob_split': 'probe logprob_change_linear_head / _backbone / logprob_change_actual',
    'norms': 'head_norm or train grad_norm_head/grad_norm_backbone',
}


def report_markdown(study: Study, nums: ReportNumbers, figures: dict[str, str | None], *,
                    title: str | None = None, analysis_md: str | None = None) -> str:
  """The text of report.md. figures: name (FIGURES) -> PNG file name relative to the report, None if not drawn."""
  title = title or _get(study.config, 'name') or os.path.basename(study.path)
  md = [f'# {title}', '',
        f'Generated by `cfrl_jax.report` from `{study.path}`.', '',
        '## What was run', '', *_what_was_run(study), '',
        '## Results', '', *results_table(nums), '',
        f'Base: the eval at step 0; final: each seed\'s last eval; Δ: mean over seeds of final − base. '
        f'Training metrics are means over the first/last {TRAIN_WINDOW} training steps. '
        'Confidence: mean probability of the sampled tokens. Values are means over seeds.', '',
        '## Steps to target accuracy', '', *target_table(nums), '',
        '## Seeds and paired comparisons', '', *seed_statistics_section(nums), '',
        '## Findings', '', *[f'- {f}' for f in findings(nums)], '',
        'Comparisons between arms use the paired 95% intervals above. An arm\'s change from its own base is called '
        f'real only beyond {NOISE_SIGMAS:g} standard errors (per seed: pass@1_stderr over problems; over seeds: the '
        'larger of that and the seed-to-seed standard error).', '',
        *(echo_chamber_section(study, figures.get(ECHO_CHAMBER_FIGURE)) if is_echo_chamber(study) else []),
        '## Figures', '']
  for name in FIGURES:
    if figures.get(name):
      heading, caption = FIGURE_CAPTIONS[name]
      caption = caption.format(band=pass1_band(study), window=SMOOTH_WINDOW)
      md += [f'### {heading}', '', caption, '', f'![{name}]({figures[name]})', '']
  skipped = [f'`{n}.png` (needs {FIGURE_NEEDS[n]})' for n in FIGURES if not figures.get(n)]
  if skipped:
    md += ['Not drawn, no data logged: ' + '; '.join(skipped) + '.', '']
  if analysis_md:
    md += ['## Analysis', '', analysis_md.strip(), '']
  return '\n'.join(md)


def write_figures(study: Study, out_dir: str, target: float | None = None) -> dict[str, str | None]:
  """Draws every figure that has data into out_dir; name -> PNG file name (None: nothing to draw)."""
  figures = {
      'accuracy': figure_accuracy(study, out_dir, target),
      'confidence': figure_confidence(study, out_dir),
      'passk': figure_passk(study, out_dir),
      'formats': figure_formats(study, out_dir),
      'ntk': figure_ntk(study, out_dir),
      'logprob_split': figure_logprob_split(study, out_dir),
      'norms': figure_norms(study, out_dir),
  }
  if is_echo_chamber(study):   # drawn only for configs/echo_chamber.py studies; its own report section
    figures[ECHO_CHAMBER_FIGURE] = figure_echo_chamber(study, out_dir)
  return figures


def found_analyses(study: Study) -> str | None:
  """Markdown of the analyses written next to the study's runs, images linked relative to the report.

  Picked up: <run>/analysis/analysis.json (python -m cfrl_jax.analyze) for every run, and
  <study>/alpharl/[<arm>/seed<k>/]alpharl.json (the AlphaRL run mode). Each is re-rendered from its
  JSON (not its .md), so its image links point from report.md to the PNGs beside the JSON.
  """
  from cfrl_jax import alpharl, analyze
  sections = []
  for runs in study.arms.values():
    for run in runs:
      adir = os.path.join(os.path.dirname(run.path), 'analysis')   # run.path is the run's metrics.jsonl
      if os.path.exists(os.path.join(adir, 'analysis.json')):
        with open(os.path.join(adir, 'analysis.json')) as f:
          loaded = json.load(f)
        pngs = [n for n in (analyze.PNG_SHARES, analyze.PNG_R2, analyze.PNG_GAIN, analyze.PNG_EXTRAPOLATION)
                if os.path.exists(os.path.join(adir, n))]
        section = analyze.markdown_section(loaded, os.path.relpath(adir, study.path), pngs, heading_level=3)
        sections.append(section.replace('### Update dynamics', f'### Update dynamics of {run.arm}'
                                        + (f' seed {run.seed}' if run.seed is not None else ''), 1))
  # A study's AlphaRL runs sit in <study>/alpharl/; a report of that directory itself finds them too.
  here = os.path.basename(os.path.normpath(study.path)) == alpharl.SUBDIR
  root = study.path if here else os.path.join(study.path, alpharl.SUBDIR)
  if os.path.isdir(root):
    for dirpath, _, files in sorted(os.walk(root)):
      if alpharl.JSON_NAME in files:
        with open(os.path.join(dirpath, alpharl.JSON_NAME)) as f:
          result = json.load(f)
        image = os.path.join(dirpath, alpharl.PNG_NAME)
        sections.append(alpharl.markdown_section(
            result, os.path.relpath(image, study.path) if os.path.exists(image) else None, heading_level=3))
  return '\n\n'.join(s.strip() for s in sections) if sections else None


def write_report(path: str, *, title: str | None = None, target_accuracy: float | None = None,
                 analysis_md: str | None = None) -> str:
  """Writes the figures (PNG) and report.md into `path` (a run or study dir); returns the report's path.

  The Analysis section holds `analysis_md` (e.g. report --analysis=FILE) and every analysis found
  beside the runs (found_analyses).
  """
  study = load_study(path)
  nums = summarize(study, target_accuracy)
  figures = write_figures(study, study.path, nums.target)
  found = found_analyses(study)
  analysis_md = '\n\n'.join(m.strip() for m in (analysis_md, found) if m) or None
  out = os.path.join(study.path, 'report.md')
  with open(out, 'w') as f:
    f.write(report_markdown(study, nums, figures, title=title, analysis_md=analysis_md))
  return out


README_BEGIN, README_END = '<!-- demo-results -->', '<!-- /demo-results -->'


def _machine() -> str:
  import platform
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{os.cpu_count()} cores, {cpu}'


def update_readme(path: str, readme: str, image_dir: str = 'docs', *, command: str = '',
                  target_accuracy: float | None = None) -> str:
  """Copies a study's accuracy plot into image_dir and rewrites the README block between
  <!-- demo-results --> markers with its results and steps-to-target tables, findings and timings,
  so the README shows a real run, regenerated by one command. Returns the image's path."""
  import shutil
  study = load_study(path)
  nums = summarize(study, target_accuracy)
  figures = write_figures(study, study.path, nums.target)
  if not figures.get('accuracy'):
    raise ValueError(f'{path}: no eval metrics logged, nothing to put in the README.')
  os.makedirs(image_dir, exist_ok=True)
  image = os.path.join(image_dir, f'{os.path.basename(os.path.normpath(path))}_accuracy.png')
  shutil.copyfile(os.path.join(study.path, figures['accuracy']), image)
  text = open(readme).read()
  if README_BEGIN not in text or README_END not in text:
    raise ValueError(f'{readme} has no {README_BEGIN} ... {README_END} block to fill.')
  timings = study.info.get('timings') or {}
  base = study.info.get('base') or {}
  took = []
  if _is_number(timings.get('total')):
    took.append(f'{_duration(timings["total"])} in all')
  if _is_number(base.get('seconds')):
    fresh = _is_number(base.get('seconds_this_run')) and base['seconds_this_run'] > 0.5 * base['seconds']
    took.append(f'of which pretraining the base {_duration(base["seconds"])}' if fresh else
                f'base model from the cache (pretraining it took {_duration(base["seconds"])} once)')
  block = [README_BEGIN, '',
           f'**A real run of the embedded default** (`{command or "python -m cfrl_jax.main --config=configs/demo.py"}`'
           f'; {", ".join(took) or "timings not recorded"}; on {_machine()}). Generated by '
           f'`python -m cfrl_jax.report --run={path} --readme={readme}`; the full report with every '
           f'figure is `{os.path.join(path, "report.md")}`.', '',
           *_what_was_run(study), '', *results_table(nums), '', *target_table(nums), '',
           *seed_statistics_section(nums), '', *[f'- {f}' for f in findings(nums)], '',
           f'![held-out accuracy and reward per arm]({image})', '', README_END]
  head, rest = text.split(README_BEGIN, 1)
  with open(readme, 'w') as f:
    f.write(head + '\n'.join(block) + rest.split(README_END, 1)[1])
  return image


def _main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f.run:
    raise app.UsageError('--run=DIR is required: a run dir (metrics.jsonl) or a study dir (<arm>/seed<k>/).')
  analysis = None
  if f.analysis:
    with open(f.analysis) as fh:
      analysis = fh.read()
  print(write_report(f.run, title=f.title, target_accuracy=f.target_accuracy, analysis_md=analysis))
  if f.readme:
    print(update_readme(f.run, f.readme, target_accuracy=f.target_accuracy))


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('run', None, 'Run dir (with metrics.jsonl) or study dir (<arm>/seed<k>/metrics.jsonl).')
  flags.DEFINE_string('title', None, 'Report title (default: the config name or the directory name).')
  flags.DEFINE_float('target_accuracy', None, 'pass@1 target for "steps to target" (default: midpoint of the '
                     "best arm's gain).")
  flags.DEFINE_string('analysis', None, 'Markdown file appended to the report as an Analysis section.')
  flags.DEFINE_string('readme', None, 'Also put the results into this README (between <!-- demo-results --> '
                      'markers), with the accuracy plot copied to docs/.')
  app.run(_main)
