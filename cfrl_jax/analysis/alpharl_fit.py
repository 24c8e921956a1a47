"""AlphaRL's fit of a window run and its numbers (Cai et al. 2025, PAPERS.md section 3).

fit_window: this project's step-line fit, per attention/MLP kernel (cfrl_jax.analysis.rank1), on
the checkpoints 0..W of a window run, and the models it predicts at the planned step T (A, B, ExPO).
fit_released_window: the released procedure (PLS of the sign-chained singular vectors against the
run's own metric) on the same checkpoints. weight_quality: predicted vs actual kernel updates.
share_of_gain, target_verdict: the paper's measure (the share of the RL gain recovered) and its target
(>= TARGET_SHARE of the gain at <= TARGET_STEP_FRACTION of the steps); seed_verdicts pools them over
seeds. The run mode that trains the window and calls these is cfrl_jax/alpharl.py.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping, NamedTuple

import numpy as np

from cfrl_jax.analysis import rank1
from cfrl_jax.train import checkpoint


TARGET_SHARE, TARGET_STEP_FRACTION = 0.96, 0.4     # the paper's headline
RELEASED = ('released_oracle', 'released_window')
EXTRAPOLATED = ('alpharl_A', 'alpharl_B') + RELEASED + ('expo', 'expo_tuned')   # models at step T, W steps trained
UPPER_BOUND = ('released_oracle',)     # use the reference's final accuracy: not a prediction


def metric_value(record: Mapping, metric: str, where: str) -> tuple[float, float]:
  """(value, standard error) of `metric` in an eval record.

  The standard error is the record's '<metric>_stderr' (pass@1's over problems); for
  greedy_accuracy, a mean of 0/1 per problem, sqrt(p (1 - p) / (n - 1)); else NaN.
  """
  if metric not in record:
    keys = sorted(k for k in record if k not in ('step', 'kind') and not k.endswith('_stderr'))
    raise ValueError(f"config.alpharl.metric={metric!r} is not in the eval of {where}; the eval records hold {keys}.")
  value = float(record[metric])
  se = record.get(f'{metric}_stderr')
  if se is None and metric == 'greedy_accuracy' and record.get('num_problems', 0) > 1:
    n = float(record['num_problems'])
    se = math.sqrt(max(value * (1 - value), 0.0) / (n - 1))
  return value, float('nan') if se is None else float(se)


def share_of_gain(acc: float, acc_se: float, base: float, base_se: float, final: float, final_se: float,
                  *, min_gain: float = 1e-6) -> tuple[float, float]:
  """(share, standard error) of the gain recovered: (acc - base) / (final - base).

  The error propagates the three standard errors to first order as if independent:
  se^2 = (se_acc^2 + r^2 se_final^2 + (1 - r)^2 se_base^2) / (final - base)^2, r = share.
  NaN (with rank1.recovered_gain's warning) when |final - base| < min_gain.
  """
  share = rank1.recovered_gain(acc, base, final, min_gain=min_gain)
  if not math.isfinite(share):
    return share, float('nan')
  gain = final - base
  var = acc_se ** 2 + share ** 2 * final_se ** 2 + (1 - share) ** 2 * base_se ** 2
  return share, math.sqrt(var) / abs(gain)


def target_verdict(share: float, share_se: float, step_fraction: float, *, share_target: float = TARGET_SHARE,
                   fraction_target: float = TARGET_STEP_FRACTION) -> str:
  """'met' | 'not met' | 'within noise' (share within 2 s.e. of the target) | 'n/a' (no share)."""
  if not math.isfinite(share):
    return 'n/a'
  if step_fraction > fraction_target + 1e-12:
    return 'not met'
  if math.isfinite(share_se) and abs(share - share_target) <= 2 * share_se:
    return 'within noise'
  return 'met' if share >= share_target else 'not met'


class WindowFit(NamedTuple):
  """The extrapolation from a window run's checkpoints (parameter trees as host numpy).

  origin: the fit's (t_0, 0) point (0, or CF-RL's stage-2 start); fit_steps: window
  checkpoints used as points (> origin); models: {'alpharl_A', 'alpharl_B'[, 'expo']} at
  target_step; fits: rank1.Rank1Extrapolation per kernel path; diagnostics: JSON-able;
  factors: per kernel path the rank-1 factors of the fit_steps stacked (T, L, ...), for
  the released procedure (fit_released_window).
  """
  base: Any
  window: Any
  window_end: int
  origin: int
  fit_steps: list
  target_step: int
  models: dict
  fits: dict
  diagnostics: dict
  factors: dict | None = None


def fit_window(run_dir: str, window_end: int, target_step: int, *, keep=rank1.VARIANT_B,
               expo: bool = True) -> WindowFit:
  """Fits AlphaRL on the checkpoints 0..window_end of run_dir and builds the models at target_step.

  Checkpoints are read one at a time (memory: base, window end and one more tree), and
  the fit is rank1.fit_params_extrapolation's rule computed from their rank-1 factors.
  """
  steps = [s for s in checkpoint.available_steps(run_dir) if s <= window_end]
  if 0 not in steps or window_end not in steps:
    raise FileNotFoundError(f'AlphaRL needs the base (step 0) and window-end (step {window_end}) checkpoints under '
                            f'{checkpoint.checkpoint_dir(run_dir)}; found {steps}.')
  if target_step < window_end:
    raise ValueError(f'target_step={target_step} is before the window end {window_end}.')
  meta = checkpoint.read_meta(run_dir, window_end)
  if meta.get('stage') == 1:
    raise ValueError(f'CF-RL was still in its head-only stage at the window end (step {window_end}): the backbone '
                     'has not moved, so there is nothing to fit. Raise config.alpharl.window or make stage one '
                     'shorter (config.cfrl.stage1_steps / switch_threshold).')
  origin = int(meta.get('stage_start', 0)) if meta.get('stage') == 2 else 0
  fit_steps = [s for s in steps if s > origin]
  if not fit_steps:
    raise ValueError(f'No window checkpoint after the fit origin (step {origin}, the start of CF-RL stage 2); '
                     f'checkpoints: {steps}. Raise config.alpharl.window or lower config.alpharl.fit_every.')
  base = checkpoint.restore_params(run_dir, 0)
  paths = rank1.matrix_paths(base)
  window = None
  factors = {p: [] for p in paths}
  for s in fit_steps:
    params = checkpoint.restore_params(run_dir, s)
    rank1.check_same_structure(base, params, f'checkpoint {s} vs base')
    f = rank1.update_factors(base, params, 1)
    for p in paths:
      factors[p].append(f[p])
    if s == window_end:
      window = params
  stacked = {p: rank1.stack_factors(factors[p]) for p in paths}
  fits = {p: rank1.fit_rank1_extrapolation(fit_steps, stacked[p], origin) for p in paths}
  models = {'alpharl_A': rank1.alpharl_params(base, fits, target_step),
            'alpharl_B': rank1.alpharl_params(base, fits, target_step, keep=keep, kept_from=window)}
  if expo:
    models['expo'] = rank1.expo_params(base, window, rank1.expo_alpha(0, window_end, target_step))
  return WindowFit(base, window, window_end, origin, fit_steps, target_step, models, fits,
                   _fit_diagnostics(base, window, fits, target_step), stacked)


class ReleasedWindow(NamedTuple):
  """The released AlphaRL fit of a window (fit_released_window).

  fits: rank1.ReleasedFit per kernel path, or None when the procedure cannot run (reason says
  why); steps, accuracy: the PLS points; targets: {name: target accuracy}; models: {'released_<name>':
  params}; diagnostics: JSON-able.
  """
  fits: dict | None
  reason: str
  steps: list
  accuracy: list
  targets: dict
  models: dict
  diagnostics: dict


def released_targets(steps, accuracy, target_step: int, oracle: float | None) -> dict[str, float]:
  """{'oracle': the reference's final accuracy (when given), 'window': rank1.extrapolated_accuracy}."""
  out = {}
  if oracle is not None and math.isfinite(oracle):
    out['oracle'] = float(oracle)
  if len(steps) >= 2:
    out['window'] = rank1.extrapolated_accuracy(steps, accuracy, target_step)
  return out


def fit_released_window(fit: WindowFit, accuracy: Mapping[int, float], *, oracle: float | None = None,
                        scale: bool = True) -> ReleasedWindow:
  """The released procedure on fit.fit_steps with `accuracy` {step: metric}; models at both targets.

  Not an error when it cannot run (fewer than 2 points, constant accuracy): the mode reports the
  other variants and this reason.
  """
  steps = list(fit.fit_steps)
  missing = [s for s in steps if s not in accuracy]
  if missing:
    raise ValueError(f'fit_released_window needs the accuracy of every fit step; missing {missing}.')
  acc = [float(accuracy[s]) for s in steps]
  targets = released_targets(steps, acc, fit.target_step, oracle)
  if fit.factors is None:
    raise ValueError('fit_released_window needs a WindowFit from fit_window (it holds the stacked factors).')
  if len(steps) < 2:
    return ReleasedWindow(None, f'the PLS needs at least 2 window checkpoints after the fit origin (step {fit.origin}); '
                          f'there is {len(steps)} ({steps}). Lower config.alpharl.fit_every or raise '
                          'config.alpharl.window.', steps, acc, targets, {}, {})
  try:
    fits = {p: rank1.fit_released(steps, f, acc, scale=scale) for p, f in fit.factors.items()}
  except ValueError as e:
    return ReleasedWindow(None, f'{e} Raise config.eval.num_problems / eval.samples or the window.', steps, acc,
                          targets, {}, {})
  models = {f'released_{name}': rank1.released_params(fit.window, fits, t) for name, t in targets.items()}
  r2 = np.concatenate([np.ravel(f.pls.r2) for f in fits.values()])
  fb, fw = rank1.flatten(fit.base), rank1.flatten(fit.window)
  win_sq = sum(float(np.sum((np.asarray(fw[p], np.float64) - np.asarray(fb[p], np.float64)) ** 2)) for p in fits)
  added = {name: math.sqrt(sum(float(np.sum(rank1.released_update(f, t) ** 2)) for f in fits.values()) / win_sq)
           if win_sq > 0 else float('nan') for name, t in targets.items()}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)
    diag = {'pls_r2_median': float(np.nanmedian(r2)) if np.isfinite(r2).any() else float('nan'),
            'flat_kernels': int(sum(int(np.sum(f.pls.flat)) for f in fits.values())),
            'matrices': int(r2.size), 'added_norm_ratio': added, 'scale': bool(scale)}
  return ReleasedWindow(fits, '', steps, acc, targets, models, diag)


def _fit_diagnostics(base, window, fits, target_step) -> dict:
  """Median R^2 of the coefficient lines, and ||predicted kernel update at T|| / ||kernel update at W||."""
  fb, fw = rank1.flatten(base), rank1.flatten(window)
  r2 = np.concatenate([np.ravel(f.r2) for f in fits.values()])
  pred_sq = sum(float(np.sum(rank1.predicted_coefficient(f, target_step) ** 2)) for f in fits.values())
  win_sq = sum(float(np.sum((np.asarray(fw[p], np.float64) - np.asarray(fb[p], np.float64)) ** 2)) for p in fits)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)
    r2_median = float(np.nanmedian(r2)) if np.isfinite(r2).any() else float('nan')
  return {'r2_median': r2_median, 'r2_min': float(np.nanmin(r2)) if np.isfinite(r2).any() else float('nan'),
          'kernels': len(fits), 'norm_ratio': math.sqrt(pred_sq / win_sq) if win_sq > 0 else float('nan')}


def weight_quality(fit: WindowFit, reference_run: str, extra: Mapping[str, Any] | None = None) -> dict | None:
  """Cosine and relative error of predicted kernel updates against the reference's at target_step.

  Models: the window end, fit.models and `extra` ({name: params}). None when the reference has no checkpoint at target_step, or its base (step 0, when
  saved) differs from this run's. Kernels only, all pooled.
  """
  if not reference_run or fit.target_step not in checkpoint.available_steps(reference_run):
    return None
  fb = rank1.flatten(fit.base)
  if 0 in checkpoint.available_steps(reference_run):
    ref_base = rank1.flatten(checkpoint.restore_params(reference_run, 0))
    if any(not np.array_equal(ref_base[p], fb[p]) for p in fit.fits):
      return None
  ref = rank1.flatten(checkpoint.restore_params(reference_run, fit.target_step))
  actual = {p: np.asarray(ref[p], np.float64) - np.asarray(fb[p], np.float64) for p in fit.fits}
  act_sq = sum(float(np.sum(d * d)) for d in actual.values())
  out = {}
  for name, params in [('window', fit.window)] + list(fit.models.items()) + list((extra or {}).items()):
    if name == 'alpharl_B':
      continue   # its kernels are A's
    fp = rank1.flatten(params)
    dot = sq = 0.0
    for p, d in actual.items():
      pred = np.asarray(fp[p], np.float64) - np.asarray(fb[p], np.float64)
      dot += float(np.sum(pred * d))
      sq += float(np.sum(pred * pred))
    den = math.sqrt(sq * act_sq)
    out['alpharl' if name == 'alpharl_A' else name] = {
        'cosine': dot / den if den > 0 else float('nan'),
        'relative_error': math.sqrt(max(sq - 2 * dot + act_sq, 0.0) / act_sq) if act_sq > 0 else float('nan'),
        'norm_ratio': math.sqrt(sq / act_sq) if act_sq > 0 else float('nan')}
  return out


def pooled_share(shares: list[float], stderrs: list[float]) -> tuple[float, float]:
  """(mean share, its standard error): across seeds std(ddof=1) / sqrt(n) for n >= 2 (the seed-to-seed
  spread, evaluation noise included); for one seed, that run's own s.e. NaN shares are left out."""
  pairs = [(s, e) for s, e in zip(shares, stderrs) if math.isfinite(s)]
  if not pairs:
    return float('nan'), float('nan')
  x = np.array([s for s, _ in pairs])
  if len(x) == 1:
    return float(x[0]), float(pairs[0][1])
  return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


@dataclasses.dataclass(frozen=True)
class SeedVerdict:
  """One model variant of one arm pooled over seeds (seed_verdicts).

  runs: runs with a reference that built the model; with_share: of those, the runs whose share is
  defined (NaN when the reference gain is ~0); share, stderr: pooled_share over them (NaN: none);
  step_fraction: steps trained / planned; verdict: target_verdict, '(upper bound)' added for UPPER_BOUND.
  """
  arm: str
  model: str
  runs: int
  with_share: int
  share: float
  stderr: float
  step_fraction: float
  verdict: str


def seed_verdicts(results: list[tuple[str, Mapping]]) -> list[SeedVerdict]:
  """Per arm (the label before '/') and variant (EXTRAPOLATED, then 'continued'), the share of the gain
  pooled over seeds and its verdict. results: [(label 'arm/seed<k>' or a name, result of run_alpharl)];
  runs without a reference have no share and are left out."""
  arms: dict[str, list[Mapping]] = {}
  for label, r in results:
    if r.get('reference') is not None:
      arms.setdefault(label.split('/')[0], []).append(r)
  out = []
  for arm, runs in arms.items():
    for name in EXTRAPOLATED + ('continued',):
      have = [r['models'][name] for r in runs if name in r['models'] and 'share' in r['models'][name]]
      if not have:
        continue
      share, se = pooled_share([m['share'] for m in have], [m['share_stderr'] for m in have])
      fraction = max(m['steps_trained'] for m in have) / runs[0]['planned_steps']
      verdict = target_verdict(share, se, fraction)
      if name in UPPER_BOUND and verdict != 'n/a':
        verdict += ' (upper bound)'
      out.append(SeedVerdict(arm, name, len(have), sum(math.isfinite(m['share']) for m in have), share, se,
                             fraction, verdict))
  return out
