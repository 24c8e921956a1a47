"""Update dynamics of a run: AlphaRL rank-1 dominance, linear dynamics, RELEX and ExPO, computed.

Reads every checkpoint of the run one at a time (memory: the base, the current and
the final parameters, plus small per-checkpoint SVD factors; RELEX additionally keeps
every update while that fits in AnalysisConfig.relex_max_gb) and computes the weight-space
statistics of cfrl_jax.analysis.rank1 for each attention/MLP kernel of every layer
(analyze_run), as a JSON-able dict that update_dynamics_report renders and writes.

Evaluation is a callable evaluate(params) -> float (held-out accuracy) passed to
analyze_run; without one every weight-space statistic is still computed. The command,
`python -m cfrl_jax.analyze`, builds it (cfrl_jax/analyze.py).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from typing import Callable, Mapping, Sequence

import numpy as np

from cfrl_jax.analysis import rank1
from cfrl_jax.train import checkpoint


Evaluate = Callable[[Mapping], float]


MAX_SINGULAR_VALUES = 32      # singular values of the final update kept per layer in the JSON


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
  """Settings of analyze_run.

  ks: ranks of the rank-k models (the full update is always added). base_step: W_0
  (None: the first checkpoint; with CF-RL, the stage-2 start isolates stage 2's
  backbone dynamics). steps: analyse only these steps (None: all). windows: AlphaRL
  window ends as fractions of the run (base..final). variant_b_keep: leaf groups kept
  at their updated value in variant B (rank1.KEEP_GROUPS). relex_max_gb: memory for
  the stacked updates that RELEX and the full-update R^2 need (skipped above it).
  eval_checkpoints: evaluate every checkpoint too (gives R^2 against accuracy).
  """
  ks: tuple[int, ...] = (1, 2, 4)
  base_step: int | None = None
  steps: tuple[int, ...] | None = None
  windows: tuple[float, ...] = (0.25, 1 / 3, 0.5)
  variant_b_keep: tuple[str, ...] = rank1.VARIANT_B
  relex_max_gb: float = 4.0
  eval_checkpoints: bool = True
  min_gain: float = 1e-6
  svd_dtype: str = 'float64'
  svd_method: str = 'gram'

  def __post_init__(self):
    if not self.ks or any(int(k) < 1 for k in self.ks):
      raise ValueError(f'ks={self.ks}; expected positive ranks such as 1,2,4.')
    if any(not 0 < w <= 1 for w in self.windows):
      raise ValueError(f'windows={self.windows}; expected fractions of the run in (0, 1].')
    rank1.check_keep(self.variant_b_keep)
    if self.svd_dtype not in ('float32', 'float64'):
      raise ValueError(f"svd_dtype={self.svd_dtype!r}; expected 'float32' or 'float64'.")
    if self.svd_method not in rank1.SVD_METHODS:
      raise ValueError(f'svd_method={self.svd_method!r}; expected one of {rank1.SVD_METHODS}.')


def select_steps(run_dir: str, base_step: int | None = None, steps: Sequence[int] | None = None) -> list[int]:
  """Checkpoint steps to analyse, base first; clear errors for a missing run or < 2 checkpoints."""
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f'Run directory {run_dir!r} does not exist; pass --run=<dir with checkpoints/>.')
  available = checkpoint.available_steps(run_dir)
  if not available:
    raise FileNotFoundError(f'No checkpoints under {checkpoint.checkpoint_dir(run_dir)}: train with checkpoints '
                            'enabled (the rank-1 analysis needs every saved step).')
  chosen = available if steps is None else sorted(set(int(s) for s in steps))
  missing = sorted(set(chosen) - set(available))
  if missing:
    raise ValueError(f'Steps {missing} have no checkpoint; available: {available}.')
  base = chosen[0] if base_step is None else int(base_step)
  if base not in available:
    raise ValueError(f'base_step={base} has no checkpoint; available: {available}.')
  later = [s for s in chosen if s > base]
  if not later:
    raise ValueError(f'The analysis needs at least 2 checkpoints (a base and a later one); {run_dir} has '
                     f'{available} and the selection after base {base} is empty.')
  return [base] + later


def _model_summary(run_dir: str) -> dict | None:
  try:
    cfg = checkpoint.restore_model_config(run_dir)
  except (KeyError, TypeError, ValueError, OSError):
    return None
  return {k: getattr(cfg, k) for k in ('model_type', 'vocab_size', 'hidden_size', 'intermediate_size',
                                       'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'tie',
                                       'untied_from_tied', 'param_dtype')}


def analyze_run(run_dir: str, config: AnalysisConfig = AnalysisConfig(), evaluate: Evaluate | None = None,
                log: Callable[[str], None] = lambda s: None) -> dict:
  """Computes the analysis of a run; returns a JSON-able dict (NaN as float nan; see write_report)."""
  t_start = time.time()
  steps = select_steps(run_dir, config.base_step, config.steps)
  base_step, later = steps[0], steps[1:]
  dtype = np.dtype(config.svd_dtype)
  kmax = max(int(k) for k in config.ks)
  base = checkpoint.restore_params(run_dir, base_step)
  fb = rank1.flatten(base)
  tied = rank1.is_tied(base)
  paths = rank1.matrix_paths(base)
  T = len(later)
  matrix_bytes = sum(np.asarray(fb[p]).size for p in paths) * dtype.itemsize
  keep_deltas = T * matrix_bytes <= config.relex_max_gb * 2 ** 30
  if not keep_deltas:
    log(f'RELEX skipped: {T} updates of {matrix_bytes / 2 ** 30:.2f} GiB exceed --relex_max_gb={config.relex_max_gb}.')
  factors = {p: [] for p in paths}
  deltas = {p: [] for p in paths}
  grams = {p: np.zeros((fb[p].shape[0], T, T)) for p in paths} if keep_deltas else None
  groups = sorted({rank1.leaf_group(p, tied) for p in fb} - {'matrix'})
  group_base_norm = {g: math.sqrt(sum(float(np.sum(np.asarray(fb[p], np.float64) ** 2))
                                      for p in fb if rank1.leaf_group(p, tied) == g)) for g in groups}
  group_update = {g: [] for g in groups}
  acc_ckpt = {}
  acc = {}
  if evaluate is not None:
    acc['base'] = _evaluate_one(evaluate, base, 'base')
  params = None
  for i, step in enumerate(later):
    params = checkpoint.restore_params(run_dir, step)
    rank1.check_same_structure(base, params, f'checkpoint {step} vs base {base_step}')
    fp = rank1.flatten(params)
    for p in paths:
      dw = np.asarray(fp[p], dtype) - np.asarray(fb[p], dtype)
      factors[p].append(rank1.factorize(dw, kmax, dtype, config.svd_method))
      if keep_deltas:
        for j, prev in enumerate(deltas[p]):
          grams[p][:, i, j] = grams[p][:, j, i] = np.einsum('lmn,lmn->l', dw, prev)
        grams[p][:, i, i] = np.einsum('lmn,lmn->l', dw, dw)
        deltas[p].append(dw)
    for g in groups:
      sq = sum(float(np.sum((np.asarray(fp[p], np.float64) - np.asarray(fb[p], np.float64)) ** 2))
               for p in fp if rank1.leaf_group(p, tied) == g)
      group_update[g].append(math.sqrt(sq))
    if evaluate is not None and (config.eval_checkpoints or step == later[-1]):
      acc_ckpt[step] = _evaluate_one(evaluate, params, f'checkpoint {step}')
    log(f'step {step}: factorised {len(paths)} kernels ({i + 1}/{T}, {time.time() - t_start:.1f}s)')
  del deltas
  final = params
  final_step = later[-1]
  if evaluate is not None:
    acc['final'] = acc_ckpt[final_step]

  stacked = {p: rank1.stack_factors(factors[p]) for p in paths}
  checkpoint_acc = None
  if evaluate is not None and config.eval_checkpoints:
    checkpoint_acc = np.array([acc_ckpt[s] for s in later])
  matrices = {}
  for p in paths:
    matrices[p[2]] = _matrix_statistics(p, later, base_step, stacked[p], fb[p], config.ks,
                                        grams[p] if keep_deltas else None, checkpoint_acc, acc.get('base'))

  analysis = {
      'run_dir': os.path.abspath(run_dir),
      'base_step': base_step, 'final_step': final_step, 'steps': later,
      'stages': {str(s): checkpoint.read_meta(run_dir, s).get('stage') for s in steps},
      'model': _model_summary(run_dir),
      'tied': tied,
      'config': dataclasses.asdict(config),
      'matrices': matrices,
      'other_updates': {g: {'base_norm': group_base_norm[g], 'update_norm': group_update[g]} for g in groups},
      'relex_computed': keep_deltas,
  }
  final_factors = {p: rank1.UpdateFactors(*(x[-1] for x in stacked[p])) for p in paths}
  analysis['extrapolation'] = _extrapolations(run_dir, config, base, final, later, base_step, stacked, paths,
                                              evaluate, acc, log)
  analysis['extrapolation_curve'] = _extrapolation_curve(config, later, base_step, stacked, paths)
  if evaluate is not None:
    for name, keep in (('A', rank1.VARIANT_A), ('B', tuple(config.variant_b_keep))):
      for k in list(config.ks) + [None]:
        label = f'rank{k}_{name}' if k is not None else f'full_{name}'
        model = rank1.rank_k_params(base, final, None if k is None else int(k), keep=keep, factors=final_factors)
        acc[label] = _evaluate_one(evaluate, model, label)
        log(f'evaluated {label}: {acc[label]:.4f}')
    analysis['evaluation'] = _gains(acc, acc_ckpt, config, analysis, getattr(evaluate, 'metric', 'accuracy'))
  else:
    analysis['evaluation'] = None
  analysis['seconds'] = time.time() - t_start
  return analysis


def _evaluate_one(evaluate: Evaluate, params, name: str) -> float:
  return rank1.evaluate_models({name: params}, evaluate)[name]


def _matrix_statistics(path, later, base_step, f: rank1.UpdateFactors, w0, ks, gram, checkpoint_acc,
                       base_acc) -> dict:
  """JSON-able statistics of one stacked kernel; f stacked (T, L, ...)."""
  w0 = np.asarray(w0, np.float64)
  dyn = rank1.rank1_dynamics(later, f, base_step=base_step, accuracy=checkpoint_acc, base_accuracy=base_acc)
  base_norm = np.sqrt(np.sum(w0 * w0, axis=(-2, -1)))
  out = {
      'path': rank1.path_name(path),
      'shape': list(w0.shape),
      'base_norm': base_norm,
      'update_norm': f.fro,                                             # (T, L)
      'relative_update': f.fro[-1] / np.where(base_norm > 0, base_norm, np.nan),
      'share': {str(k): rank1.energy_share(f.s, int(k)) for k in ks},   # (T, L)
      'singular_values_final': f.s[-1][:, :MAX_SINGULAR_VALUES],
      'coefficient': dyn.coefficient, 'cos_u': dyn.cos_u, 'cos_v': dyn.cos_v,
      'slope': dyn.fit_step.slope, 'intercept': dyn.fit_step.intercept,
      'r2_step': dyn.fit_step.r2, 'r2_pooled': dyn.r2_pooled,
      'r2_accuracy': None if dyn.fit_accuracy is None else dyn.fit_accuracy.r2,
      'r2_pooled_accuracy': dyn.r2_pooled_accuracy,
      'relex': None, 'r2_full_pooled': None,
  }
  if gram is not None:
    rel = rank1.relex(gram, later)
    out['relex'] = {'share': rel.share, 'r2': rel.fit.r2, 'slope': rel.fit.slope, 'coefficient': rel.coefficient}
    xo = np.concatenate([[base_step], np.asarray(later, np.float64)])
    out['r2_full_pooled'] = rank1.pooled_linear_r2(rank1.gram_with_origin(gram), xo)
  return out


def _windows(config, later, base_step):
  """[(fraction, window steps)] with distinct, non-empty windows."""
  span = later[-1] - base_step
  seen, out = set(), []
  for frac in config.windows:
    end = base_step + frac * span
    window = tuple(s for s in later if s <= end + 1e-9)
    if window and window not in seen:
      seen.add(window)
      out.append((float(frac), list(window)))
  return out


def _extrapolations(run_dir, config, base, final, later, base_step, stacked, paths, evaluate, acc, log):
  """AlphaRL and ExPO from each early window to the final step: weight-space quality (and accuracy)."""
  fb, ff = rank1.flatten(base), rank1.flatten(final)
  final_step = later[-1]
  final_dw = {p: np.asarray(ff[p], np.float64) - np.asarray(fb[p], np.float64) for p in paths}
  final_sq = sum(float(np.sum(d * d)) for d in final_dw.values())
  results = []
  for frac, window in _windows(config, later, base_step):
    idx = [later.index(s) for s in window]
    fits = {p: rank1.fit_rank1_extrapolation(
        window, rank1.UpdateFactors(*(x[idx] for x in stacked[p])), base_step) for p in paths}
    # <pred, dW_T> and ||pred||^2 of the rank-1 predictions, without materialising them.
    dot = sq = 0.0
    for p in paths:
      c = rank1.predicted_coefficient(fits[p], final_step)
      dot += float(np.sum(c * np.einsum('lm,lmn,ln->l', fits[p].u, final_dw[p], fits[p].v)))
      sq += float(np.sum(c * c))
    window_params = final if window[-1] == final_step else checkpoint.restore_params(run_dir, window[-1])
    fw = rank1.flatten(window_params)
    alpha = rank1.expo_alpha(base_step, window[-1], final_step)
    e_dot = e_sq = 0.0
    for p in paths:
      dw = alpha * (np.asarray(fw[p], np.float64) - np.asarray(fb[p], np.float64))
      e_dot += float(np.sum(dw * final_dw[p]))
      e_sq += float(np.sum(dw * dw))
    entry = {
        'fraction': frac, 'window_steps': window, 'window_end': window[-1],
        'speedup': (final_step - base_step) / (window[-1] - base_step),
        'expo_alpha': alpha,
        'alpharl': _weight_quality(dot, sq, final_sq),
        'expo': _weight_quality(e_dot, e_sq, final_sq),
        'window_r2_median': float(np.nanmedian(np.concatenate([np.ravel(f.r2) for f in fits.values()])))
        if any(np.isfinite(f.r2).any() for f in fits.values()) else float('nan'),
    }
    if evaluate is not None:
      models = {
          'alpharl_A': rank1.alpharl_params(base, fits, final_step),
          'alpharl_B': rank1.alpharl_params(base, fits, final_step, keep=config.variant_b_keep,
                                            kept_from=window_params),
          'expo': rank1.expo_params(base, window_params, alpha),
          'window': window_params,
      }
      for name, model in models.items():
        label = f'{name}@{window[-1]}'
        acc[label] = _evaluate_one(evaluate, model, label)
        entry.setdefault('accuracy', {})[name] = acc[label]
      log(f'evaluated extrapolations from window ending at {window[-1]}')
    results.append(entry)
  return results


def _weight_quality(dot, sq, final_sq):
  """cosine and relative error of a predicted update against the actual final one (all kernels pooled)."""
  denom = math.sqrt(sq * final_sq)
  return {'cosine': dot / denom if denom > 0 else float('nan'),
          'relative_error': math.sqrt(max(sq - 2 * dot + final_sq, 0.0) / final_sq) if final_sq > 0
          else float('nan'),
          'norm_ratio': math.sqrt(sq / final_sq) if final_sq > 0 else float('nan')}


def _extrapolation_curve(config, later, base_step, stacked, paths):
  """For the first window: per kernel type, the actual and predicted rank-1 coefficient on the window's
  direction at every step, times rho and divided by the final ||dW||_F (layer mean)."""
  windows = _windows(config, later, base_step)
  if not windows:
    return None
  frac, window = windows[0]
  idx = [later.index(s) for s in window]
  out = {'fraction': frac, 'window_steps': window, 'steps': [base_step] + list(later), 'types': {}}
  for p in paths:
    f = stacked[p]
    fit = rank1.fit_rank1_extrapolation(window, rank1.UpdateFactors(*(x[idx] for x in f)), base_step)
    s1, u1, v1 = rank1.top_pair(f)
    actual = fit.scale * rank1.rank1_coefficients(s1, u1, v1, fit.u, fit.v)          # (T, L)
    predicted = np.stack([rank1.predicted_coefficient(fit, s) for s in out['steps']])  # (T+1, L)
    norm = f.fro[-1]
    ok = norm > 0
    with np.errstate(invalid='ignore', divide='ignore'):
      actual_n = np.where(ok, actual / np.where(ok, norm, 1.0), np.nan)
      predicted_n = np.where(ok, predicted / np.where(ok, norm, 1.0), np.nan)
    out['types'][p[2]] = {
        'actual': [0.0] + list(nanmean_rows(actual_n)),
        'predicted': list(nanmean_rows(predicted_n)),
    }
  return out


def nanmean_rows(x):
  """The NaN-aware mean over the last axis (rows of all-NaN give NaN, silently)."""
  x = np.asarray(x, np.float64)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)
    return np.nanmean(x, axis=-1)


def _gains(acc, acc_ckpt, config, analysis, metric: str = 'accuracy') -> dict:
  base, final = acc['base'], acc['final']
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always', RuntimeWarning)
    gains = {name: rank1.recovered_gain(a, base, final, min_gain=config.min_gain)
             for name, a in acc.items() if name not in ('base', 'final')}
  for entry in analysis['extrapolation']:
    if 'accuracy' in entry:
      entry['recovered_gain'] = {name: gains[f'{name}@{entry["window_end"]}'] for name in entry['accuracy']}
  out = {'accuracy': acc, 'checkpoint_accuracy': {str(s): a for s, a in acc_ckpt.items()},
         'recovered_gain': gains, 'gain': final - base, 'metric': metric}
  if caught:
    out['warning'] = str(caught[0].message)
  elif final - base < 0:
    # A negative gain flips every share's sign: -3 would read as "worse than base" when the model is better.
    out['warning'] = (f'The final checkpoint scores below the base on {metric} (gain {final - base:.3g}): the run did '
                      'not improve this metric, so the shares of the gain are not meaningful. Analyse a metric the '
                      "run improved (--metric, e.g. pass@1 for a run whose greedy accuracy did not move).")
  if 'warning' in out:
    warnings.warn(out['warning'], RuntimeWarning, stacklevel=3)
  return out


def summarize(analysis: Mapping) -> dict:
  """Per kernel type, layer-aggregated figures of the final update and the fits (nan-aware)."""
  out = {}
  for name, m in analysis['matrices'].items():
    row = {'relative_update': _agg(m['relative_update'], np.nanmean)}
    for k, share in m['share'].items():
      row[f'share{k}_mean'] = _agg(np.asarray(share, np.float64)[-1], np.nanmean)
      row[f'share{k}_min'] = _agg(np.asarray(share, np.float64)[-1], np.nanmin)
    for key in ('r2_step', 'r2_pooled', 'r2_accuracy', 'r2_full_pooled'):
      row[f'{key}_median'] = _agg(m[key], np.nanmedian)
    row['cos_u_first'] = _agg(np.asarray(m['cos_u'], np.float64)[0], np.nanmean)
    if m['relex'] is not None:
      row['relex_share_median'] = _agg(m['relex']['share'], np.nanmedian)
      row['relex_r2_median'] = _agg(m['relex']['r2'], np.nanmedian)
    out[name] = row
  return out


def _agg(x, fn):
  if x is None:
    return float('nan')
  x = np.asarray(x, np.float64)
  if x.size == 0 or not np.isfinite(x).any():
    return float('nan')
  return float(fn(x))


def to_jsonable(x):
  """Arrays to lists, numpy scalars to Python, non-finite floats to None (strict JSON)."""
  if isinstance(x, Mapping):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return to_jsonable(x.tolist())
  if isinstance(x, np.generic):
    return to_jsonable(x.item())
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x
