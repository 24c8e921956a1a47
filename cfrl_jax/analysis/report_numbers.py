"""The numbers of a report, computed from loaded runs (report_runs) and drawn or printed elsewhere.

Conventions (stated in the report too):
  - An arm's curve is the mean over its seeds at the steps every seed has logged (arm_curve); its band
    is the min-max over seeds, or with one seed the value +- a logged standard error (with_se_band).
  - "base" is the eval at step 0 (the model before RL); "final" is each seed's last eval.
  - Training-step metrics are noisy per step, so "first"/"last" are means over the first/last
    TRAIN_WINDOW training steps.
  - Plus-minus on a single run is the eval's standard error over problems (pass@1_stderr); on
    several seeds it is the standard deviation of the seed values.
  - An arm's change from its base counts as real only beyond NOISE_SIGMAS standard errors; the standard
    error of a seed mean is the larger of the eval standard error (sqrt(mean se_i^2 / S)) and the seed
    standard error (sd / sqrt(S)).
  - Arms are compared with each other per RL seed (paired), with the statistics of
    cfrl_jax.analysis.study_stats: per seed steps to target (censored at the last eval when never
    reached) and the AUC of held-out pass@1; across seeds the paired difference with a 95% Student t
    interval (paired_results).
  - Steps to target: the first eval step at which pass@1 >= target, so it is resolved only to the
    eval interval. Default target: the best arm's base pass@1 plus half of its gain (the midpoint of
    the best improvement).
  - An Echo Chamber study (configs/echo_chamber.py; is_echo_chamber) gets the series of its own figure:
    per arm the format shares of training samples (format_tracks) with held-out accuracy, the sampled
    and greedy eval format fractions at base and end (eval_format_endpoints), and whether the format
    collapse falls in the eval interval of the largest pass@1 rise (collapse_and_gain).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Sequence

import numpy as np

from cfrl_jax.analysis import study_stats
from cfrl_jax.analysis.report_runs import RunMetrics, Study, arm_label, config_field, is_number, logged_keys


TRAIN_WINDOW = 5
NOISE_SIGMAS = 2.0
SMOOTH_WINDOW = 9           # steps in the centered moving average of training curves
FORMAT_KEY = re.compile(r'^format_(.+)$')


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


def eval_endpoint(runs: Sequence[RunMetrics], key: str, which: str) -> list[tuple[int, float]] | None:
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
      ends = eval_endpoint(runs, f'format_{name}', which)
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
  base, final = eval_endpoint(runs, 'pass@1', 'base'), eval_endpoint(runs, 'pass@1', 'final')
  base_se, final_se = eval_endpoint(runs, 'pass@1_stderr', 'base'), eval_endpoint(runs, 'pass@1_stderr', 'final')
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
    ends = eval_endpoint(runs, 'greedy_accuracy', which)
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


COLLAPSE_SHARE = 0.9        # a format has taken over once its smoothed share of training samples reaches this
GREEDY_FORMAT_KEY = re.compile(r'^greedy_format_(.+)$')


def is_echo_chamber(study: Study) -> bool:
  """A study of configs/echo_chamber.py: its config's name starts with 'echo_chamber' (that config and its
  :smoke variant), or it uses Echo Chamber's REINFORCE (rl.reinforce_style), which only that config sets."""
  name = config_field(study.config, 'name')
  return ((isinstance(name, str) and name.startswith('echo_chamber'))
          or config_field(study.config, 'rl.reinforce_style') == 'echo_chamber')


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

  dominant: the named format ('unknown' is not one) with the largest smoothed share at the last training
  step, None when every named format ends at 0; first_share / last_share: its smoothed share at the first /
  last training step; already: that share is >= COLLAPSE_SHARE at the first step (no collapse during
  training); collapse_step: the first training step at which it reaches COLLAPSE_SHARE, having started
  below (None: never, or already); gain_from, gain_to, gain: the pair of consecutive evals with the largest
  rise of seed-mean pass@1 (None when no pair rises); coincides: gain_from < collapse_step <= gain_to
  (None when either is unknown).
  """
  arm: str
  dominant: str | None
  first_share: float | None
  last_share: float | None
  already: bool
  collapse_step: int | None
  gain_from: int | None
  gain_to: int | None
  gain: float | None
  coincides: bool | None


def collapse_and_gain(panel: EchoChamberPanel, share: float = COLLAPSE_SHARE) -> CollapseAndGain:
  named = [t for t in panel.formats if t.name != 'unknown']
  dom = max(named, key=lambda t: t.smooth[-1]) if named else None
  if dom is not None and not dom.smooth[-1] > 0:
    dom = None
  already, collapse = False, None
  if dom is not None:
    already = bool(dom.smooth[0] >= share)
    hit = np.nonzero(dom.smooth >= share)[0]
    collapse = int(dom.steps[hit[0]]) if len(hit) and not already else None
  gain_from = gain_to = gain = None
  p = panel.pass1
  if p is not None and len(p.steps) >= 2:
    rise = np.diff(p.mean)
    i = int(np.argmax(rise))
    if rise[i] > 0:
      gain_from, gain_to, gain = int(p.steps[i]), int(p.steps[i + 1]), float(rise[i])
  coincides = None if collapse is None or gain_from is None else gain_from < collapse <= gain_to
  return CollapseAndGain(panel.arm, None if dom is None else dom.name,
                         None if dom is None else float(dom.smooth[0]),
                         None if dom is None else float(dom.smooth[-1]), already, collapse,
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
        ends = eval_endpoint(runs, prefix + name, which)
        row[f'{source}_{label}'] = None if ends is None else float(np.mean([v for _, v in ends]))
    out[name] = row
  return out


def eval_temperature(config: dict[str, Any]) -> float | None:
  """The eval's sampling temperature: eval.temperature, or rl.temperature when that is < 0."""
  t = config_field(config, 'eval.temperature')
  if is_number(t) and t >= 0:
    return float(t)
  t = config_field(config, 'rl.temperature')
  return float(t) if is_number(t) else None
