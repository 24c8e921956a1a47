"""The statistics a study's report states: pure functions over per-seed numbers (numpy only).

A study is arms x RL seeds. The same RL seed gives every arm the same prompts, the same sampling
keys and the same base model, so two arms are compared seed by seed (paired), not as two samples.

Conventions (report_markdown prints METHOD with them):
  - Steps to target: the first eval step whose held-out pass@1 is >= the target, so it is resolved
    only to the eval interval. A seed that never reaches the target is counted at its last eval
    step and flagged censored: that value is a lower bound on its true steps.
  - AUC: the trapezoid area under the held-out pass@1 curve over eval steps divided by the step
    span, i.e. the mean pass@1 over training (in [0, 1]); it uses every eval, so it depends less
    on where the grid puts its points than steps to target does. Two seeds compared with each
    other use the step span both logged.
  - Across seeds: mean and sample standard deviation (n - 1) per arm.
  - Paired difference treatment - control over the n seeds both arms ran, with a 95% Student t
    interval: mean +- t_{0.975, n-1} * sd / sqrt(n). With one seed there is no interval.
  - A difference is called a difference ("faster", "higher") only when its interval excludes 0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

LEVEL = 0.95
# t_{0.975, df}, the two-sided 95% Student t quantile, for df = 1..30 (scipy.stats.t.ppf(0.975, df)
# rounded to 6 decimals); larger df use the Cornish-Fisher expansion in t_quantile_975.
T_975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
Z_975 = 1.959963984540054   # the standard normal 0.975 quantile

METHOD = ('Paired by RL seed (same prompts, sampling keys and base model in every arm). Differences are '
          'treatment − control per seed; 95% interval: mean ± t(0.975, n−1) · s.d. / √n (Student t over the '
          'n paired seeds, n−1 degrees of freedom); with 1 seed there is no interval. A difference is called '
          '"faster"/"higher" only when its interval excludes 0.')


def t_quantile_975(df: int) -> float:
  """t_{0.975, df}: the table for df <= 30, else the Cornish-Fisher series in 1/df (Abramowitz & Stegun
  26.7.5), whose error is below 1e-7 from df = 31 on."""
  if not (isinstance(df, (int, np.integer)) and df >= 1):
    raise ValueError(f'df={df!r}: a Student t quantile needs an integer df >= 1 (df = number of paired seeds - 1).')
  if df <= len(T_975):
    return T_975[df - 1]
  z = Z_975
  g1 = (z ** 3 + z) / 4
  g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
  g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
  g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
  return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def _curve(steps, values) -> tuple[np.ndarray, np.ndarray]:
  steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
  if steps.shape != values.shape or steps.ndim != 1:
    raise ValueError(f'steps {steps.shape} and values {values.shape} must be two 1-d arrays of one length.')
  if len(steps) > 1 and np.any(np.diff(steps) <= 0):
    raise ValueError(f'eval steps {steps.tolist()} are not strictly increasing; sort them and keep one value per '
                     'step (cfrl_jax.analysis.report_runs.load_run does both).')
  return steps, values


@dataclasses.dataclass(frozen=True)
class StepsToTarget:
  """steps: the first eval step at or above the target, or, when censored, the last eval step (a lower bound)."""
  steps: int
  censored: bool

  def __str__(self) -> str:
    return f'{self.steps}+' if self.censored else str(self.steps)


def steps_to_target(steps, values, target: float) -> StepsToTarget | None:
  """steps, values: (n,) eval steps (increasing) and pass@1. None when there is no eval at all."""
  steps, values = _curve(steps, values)
  if not len(steps):
    return None
  hit = np.nonzero(values >= target)[0]
  if len(hit):
    return StepsToTarget(int(steps[hit[0]]), False)
  return StepsToTarget(int(steps[-1]), True)


def mean_pass1_auc(steps, values, start: float | None = None, end: float | None = None) -> float | None:
  """Area under the pass@1 curve over [start, end] (default: the first and last eval) divided by end - start.

  steps, values: (n,). The curve is linear between evals (trapezoid rule), so an end point between two
  evals is interpolated. None when the span is empty or lies outside the logged evals.
  """
  steps, values = _curve(steps, values)
  if len(steps) < 2:
    return None
  start = float(steps[0]) if start is None else float(start)
  end = float(steps[-1]) if end is None else float(end)
  if not (steps[0] <= start < end <= steps[-1]):
    return None
  inside = (steps > start) & (steps < end)
  xs = np.concatenate([[start], steps[inside], [end]])
  ys = np.interp(xs, steps, values)
  area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2))
  return area / (end - start)


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (n - 1 denominator); sd None with fewer than 2 values."""
  vals = np.asarray(list(values), dtype=float)
  if not len(vals):
    return None, None
  return float(vals.mean()), (float(vals.std(ddof=1)) if len(vals) > 1 else None)


@dataclasses.dataclass(frozen=True)
class PairedInterval:
  """Mean of n paired differences, their sd, and the 95% t interval (low, high None when n < 2)."""
  n: int
  mean: float
  sd: float | None
  low: float | None
  high: float | None

  @property
  def excludes_zero(self) -> bool:
    return self.low is not None and (self.low > 0 or self.high < 0)

  def text(self, digits: int = 3) -> str:
    if self.low is None:
      return f'{self.mean:+.{digits}f} (1 seed: no interval)'
    return f'{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]'


def paired_interval(treatment: Sequence[float], control: Sequence[float]) -> PairedInterval:
  """treatment, control: (n,) one value per seed, in the same seed order."""
  t, c = np.asarray(list(treatment), dtype=float), np.asarray(list(control), dtype=float)
  if t.shape != c.shape or not len(t):
    raise ValueError(f'paired_interval needs one treatment and one control value per seed, got {len(t)} and '
                     f'{len(c)}; pair the arms by seed first.')
  if not (np.all(np.isfinite(t)) and np.all(np.isfinite(c))):
    raise ValueError(f'paired_interval got non-finite values (treatment {t.tolist()}, control {c.tolist()}); '
                     'leave out seeds without the metric.')
  d = t - c
  n = len(d)
  if n == 1:
    return PairedInterval(1, float(d[0]), None, None, None)
  mean, sd = float(d.mean()), float(d.std(ddof=1))
  half = t_quantile_975(n - 1) * sd / math.sqrt(n)
  return PairedInterval(n, mean, sd, mean - half, mean + half)


def moving_average(values, window: int) -> np.ndarray:
  """Centered moving average of (n,) values over `window` points (odd).

  Centered, so it does not lag behind a change such as the CF-RL stage switch; near the ends the window
  shrinks symmetrically (point i averages i - h .. i + h, h = min(window // 2, i, n - 1 - i)), so a
  linear trend is reproduced exactly instead of bending towards the interior at both ends.
  """
  if not (isinstance(window, int) and window >= 1 and window % 2 == 1):
    raise ValueError(f'window={window!r}: the moving average needs an odd integer window >= 1.')
  vals = np.asarray(values, dtype=float)
  idx = np.arange(len(vals))
  half = np.minimum(np.minimum(idx, len(vals) - 1 - idx), window // 2)
  csum = np.concatenate([[0.0], np.cumsum(vals)])
  return (csum[idx + half + 1] - csum[idx - half]) / (2 * half + 1)


# -- which arms are compared with which ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Comparison:
  """treatment - control; isolates: what the difference measures."""
  treatment: str
  control: str
  isolates: str


BASE_ALGORITHMS = ('grpo', 'ppo', 'rloo', 'reinforce')


def _designed(a: str) -> list[Comparison]:
  return [
      Comparison(f'cf{a}', a, 'CF-RL as run: head first, with its stage-one head lr'),
      Comparison(f'cf{a}_samelr', a, 'ordering alone (stage-one head lr = rl.head_lr)'),
      Comparison(f'{a}_headlr', a, "the head's stage-one lr alone (backbone trains from step 1)"),
      Comparison(f'cf{a}_adaptive', a, 'CF-RL with the NTK-decided (head_share) switch'),
      Comparison(f'cf{a}', f'{a}_headlr', 'ordering, with the head lr schedule matched'),
      Comparison(f'cf{a}', f'cf{a}_samelr', 'the larger stage-one head lr, with the ordering matched'),
  ]


COMPARISONS = tuple(c for a in BASE_ALGORITHMS for c in _designed(a))


def comparisons(arms: Sequence[str]) -> list[Comparison]:
  """The designed comparisons (COMPARISONS) whose two arms are both present, then every other arm
  'cf<X>' against a present '<X>' (its plain counterpart)."""
  present = set(arms)
  out = [c for c in COMPARISONS if c.treatment in present and c.control in present]
  seen = {(c.treatment, c.control) for c in out}
  for a in arms:
    if a.startswith('cf') and a[2:] in present and (a, a[2:]) not in seen:
      out.append(Comparison(a, a[2:], 'CF-RL against its plain counterpart'))
  return out
