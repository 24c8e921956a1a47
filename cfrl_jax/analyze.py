"""Update-dynamics analysis of a run (AlphaRL rank-1 dominance, linear dynamics, RELEX, ExPO).

    python -m cfrl_jax.analyze --run=DIR [--out=DIR/analysis] [--ks=1,2,4] [--evaluate=none|task|MODULE:FACTORY]

Reads every checkpoint of the run one at a time (memory: the base, the current and
the final parameters, plus small per-checkpoint SVD factors; RELEX additionally keeps
every update while that fits in --relex_max_gb), computes the weight-space statistics
of cfrl_jax.dynamics.rank1 for each attention/MLP kernel of every layer, and writes

    OUT/analysis.json   every number (NaN written as null)
    OUT/*.png           singular-value shares, R^2 of the linear fits, recovered gain vs k, extrapolation
    OUT/analysis.md     a Markdown section for the run's report (links the PNGs relatively)

Evaluation is a callable evaluate(params) -> float (held-out accuracy) passed to
analyze_run; without one every weight-space statistic is still computed. On the
command line, --evaluate=task builds it with cfrl_jax.run_setup.evaluator_for_run(run_dir,
metric=--metric): by default pass@1 under the run's own eval settings and key when the run
samples in its eval (so the base and final scores equal what the run logged), else greedy
accuracy; --evaluate=MODULE:FACTORY with FACTORY(run_dir).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import flags

from cfrl_jax.dynamics import rank1
from cfrl_jax.train import checkpoint

Evaluate = Callable[[Mapping], float]

PNG_SHARES = 'rank_share.png'
PNG_R2 = 'linear_r2.png'
PNG_GAIN = 'recovered_gain.png'
PNG_EXTRAPOLATION = 'extrapolation.png'
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


# --- loading ---------------------------------------------------------------------------
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


# --- the analysis -----------------------------------------------------------------------------
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
        'actual': [0.0] + list(_nanmean_rows(actual_n)),
        'predicted': list(_nanmean_rows(predicted_n)),
    }
  return out


def _nanmean_rows(x):
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


# --- summaries, JSON, plots, Markdown ------------------------------------------------------------
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


def _arr(x):
  """JSON lists (None for NaN) back to a float array."""
  def nan_for_none(v):
    if isinstance(v, (list, tuple)):
      return [nan_for_none(w) for w in v]
    return np.nan if v is None else v
  return np.asarray(nan_for_none(x), np.float64)


def write_plots(analysis: Mapping, out_dir: str) -> list[str]:
  """Writes the PNGs into out_dir (Agg canvas, no pyplot state); returns their file names."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator
  os.makedirs(out_dir, exist_ok=True)
  a = to_jsonable(analysis)
  names = list(a['matrices'])
  written = []

  # 1. Top-k share of the final update per layer, and top-1 share over training.
  ks = sorted(int(k) for k in a['config']['ks'])
  fig = Figure(figsize=(4.2 * (len(ks) + 1), 3.6), layout='constrained')
  axes = fig.subplots(1, len(ks) + 1, squeeze=False)[0]
  for ax, k in zip(axes, ks):
    for name in names:
      share = _arr(a['matrices'][name]['share'][str(k)])[-1]
      ax.plot(np.arange(len(share)), share, marker='o', ms=3, label=name)
    ax.set(title=f'top-{k} share of ||dW||$_F^2$ (step {a["final_step"]})', xlabel='layer', ylim=(0, 1.02))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax = axes[-1]
  for name in names:
    ax.plot(a['steps'], _nanmean_rows(_arr(a['matrices'][name]['share']['1'])), marker='o', ms=3, label=name)
  ax.set(title='top-1 share over training (layer mean)', xlabel='step', ylim=(0, 1.02))
  axes[0].legend(fontsize=7)
  fig.savefig(os.path.join(out_dir, PNG_SHARES), dpi=110)
  written.append(PNG_SHARES)

  # 2. R^2 of the linear fits per layer.
  panels = [('r2_step', 'rank-1 coefficient vs step'), ('r2_pooled', 'rank-1 update (pooled) vs step')]
  if a['relex_computed']:
    panels += [('relex', 'RELEX leading coefficient vs step'), ('r2_full_pooled', 'full update (pooled) vs step')]
  if any(m['r2_accuracy'] is not None for m in a['matrices'].values()):
    panels.append(('r2_accuracy', 'rank-1 coefficient vs accuracy'))
  fig = Figure(figsize=(4.2 * len(panels), 3.6), layout='constrained')
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (key, title) in zip(axes, panels):
    for name in names:
      m = a['matrices'][name]
      vals = m['relex']['r2'] if key == 'relex' else m[key]
      if vals is not None:
        vals = _arr(vals)
        ax.plot(np.arange(len(vals)), vals, marker='o', ms=3, label=name)
    ax.set(title=f'R$^2$: {title}', xlabel='layer', ylim=(-0.05, 1.05))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  axes[0].legend(fontsize=7)
  fig.savefig(os.path.join(out_dir, PNG_R2), dpi=110)
  written.append(PNG_R2)

  # 3. Share of the RL gain recovered vs k (needs evaluation).
  ev = a.get('evaluation')
  if ev:
    fig = Figure(figsize=(5, 3.6), layout='constrained')
    ax = fig.subplots()
    labels = [str(k) for k in ks] + ['full']
    for variant in ('A', 'B'):
      g = [ev['recovered_gain'].get(f'rank{k}_{variant}') for k in ks] + [ev['recovered_gain'].get(f'full_{variant}')]
      ax.plot(labels, _arr(g), marker='o', label=f'variant {variant}')
    ax.axhline(1.0, color='gray', lw=0.8, ls=':')
    ax.set(title='share of the RL gain recovered by rank-k models', xlabel='k', ylabel='recovered gain')
    ax.legend(fontsize=8)
    fig.savefig(os.path.join(out_dir, PNG_GAIN), dpi=110)
    written.append(PNG_GAIN)

  # 4. Extrapolation: coefficient trajectories vs the first window's line, and quality per window.
  curve, ext = a.get('extrapolation_curve'), a.get('extrapolation') or []
  if curve:
    has_acc = any('recovered_gain' in e for e in ext)
    fig = Figure(figsize=(4.6 * (3 if has_acc else 2), 3.6), layout='constrained')
    axes = fig.subplots(1, 3 if has_acc else 2, squeeze=False)[0]
    ax = axes[0]
    for i, name in enumerate(curve['types']):
      color = f'C{i}'
      ax.plot(curve['steps'], _arr(curve['types'][name]['actual']), color=color, marker='o', ms=3, label=name)
      ax.plot(curve['steps'], _arr(curve['types'][name]['predicted']), color=color, ls='--', lw=1)
    ax.axvline(curve['window_steps'][-1], color='gray', lw=0.8, ls=':')
    ax.set(title=f'rank-1 coefficient / final ||dW||$_F$\n(dashed: line fitted up to step {curve["window_steps"][-1]})',
           xlabel='step')
    ax.legend(fontsize=7)
    ax = axes[1]
    ends = [e['window_end'] for e in ext]
    ax.plot(ends, _arr([e['alpharl']['cosine'] for e in ext]), marker='o', label='AlphaRL (rank-1) cosine')
    ax.plot(ends, _arr([e['expo']['cosine'] for e in ext]), marker='s', label='ExPO cosine')
    ax.plot(ends, _arr([e['alpharl']['relative_error'] for e in ext]), marker='o', ls='--',
            label='AlphaRL relative error')
    ax.plot(ends, _arr([e['expo']['relative_error'] for e in ext]), marker='s', ls='--', label='ExPO relative error')
    ax.set(title=f'predicted vs actual update at step {a["final_step"]}', xlabel='window end step')
    ax.legend(fontsize=7)
    if has_acc:
      ax = axes[2]
      for name, marker in (('alpharl_A', 'o'), ('alpharl_B', 'v'), ('expo', 's'), ('window', 'x')):
        ax.plot(ends, _arr([e.get('recovered_gain', {}).get(name) for e in ext]), marker=marker, label=name)
      ax.axhline(1.0, color='gray', lw=0.8, ls=':')
      ax.set(title='share of the RL gain recovered', xlabel='window end step')
      ax.legend(fontsize=7)
    fig.savefig(os.path.join(out_dir, PNG_EXTRAPOLATION), dpi=110)
    written.append(PNG_EXTRAPOLATION)
  return written


def fmt(x, digits=3):
  """A table cell: floats to `digits` decimals, None / NaN / inf as 'n/a', anything else str()."""
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return 'n/a'
  if isinstance(x, float):
    return f'{x:.{digits}f}'
  return str(x)


def markdown_section(analysis: Mapping, image_dir: str = '.', images: Sequence[str] | None = None,
                     heading_level: int = 2) -> str:
  """The Markdown section of a run's report; images are linked as image_dir/<name>."""
  a = to_jsonable(analysis)
  summary = summarize(analysis)
  ks = sorted(int(k) for k in a['config']['ks'])
  lines = ['#' * heading_level + ' Update dynamics: rank-1 dominance and linear dynamics', '']
  stages = {s: v for s, v in a['stages'].items() if v is not None}
  lines += [f'Run `{a["run_dir"]}`: base W_0 = step {a["base_step"]}, {len(a["steps"])} later checkpoints '
            f'(steps {a["steps"][0]}..{a["final_step"]}); {"tied" if a["tied"] else "untied"} head.'
            + (f' Stages: {_stage_ranges(stages)}.' if stages else ''), '']
  distinct = sorted(set(stages.values()), key=lambda v: min(int(s) for s in stages if stages[s] == v))
  if len(distinct) > 1:
    last_start = min(int(s) for s, v in stages.items() if v == distinct[-1])
    lines += [f'The run has several stages; with CF-RL the backbone is frozen in stage 1, so fits against step '
              f'mix two regimes. `--base_step={last_start}` analyses the last stage alone.', '']
  lines += ['Per kernel type (layers aggregated) for the final update dW = W_final - W_0: relative size '
            '‖dW‖/‖W_0‖ (mean), top-k share of ‖dW‖_F² (mean over layers), and R^2 of linear fits '
            'against step (median over layers; the point (base step, 0) included): the rank-1 coefficient '
            'on the final direction, the whole rank-1 update s1 u1 v1^T (pooled over its entries), RELEX\'s '
            'leading temporal coefficient and the whole update (pooled).', '']
  head = ['kernel', '‖dW‖/‖W_0‖'] + [f'top-{k} share' for k in ks] + \
         ['R^2 coef', 'R^2 rank-1', 'R^2 RELEX', 'RELEX share', 'R^2 full']
  if any(math.isfinite(r['r2_accuracy_median']) for r in summary.values()):
    head.append('R^2 coef vs acc')
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, r in summary.items():
    row = [name, fmt(r['relative_update'], 4)] + [fmt(r[f'share{k}_mean']) for k in ks] + [
        fmt(r['r2_step_median']), fmt(r['r2_pooled_median']), fmt(r.get('relex_r2_median')),
        fmt(r.get('relex_share_median')), fmt(r['r2_full_pooled_median'])]
    if 'R^2 coef vs acc' in head:
      row.append(fmt(r['r2_accuracy_median']))
    lines.append('| ' + ' | '.join(row) + ' |')
  lines.append('')
  if not a['relex_computed']:
    lines += ['RELEX and the full-update R^2 were skipped: the stacked updates exceed --relex_max_gb.', '']
  other = a['other_updates']
  if other:
    lines += ['Other parameters at the final step (kept at base in variant A): ' + '; '.join(
        f'{g} ‖Δ‖ = {fmt(v["update_norm"][-1], 4)} (‖base‖ = {fmt(v["base_norm"], 3)})'
        for g, v in other.items()) + '.', '']
  ev = a.get('evaluation')
  if ev:
    acc = ev['accuracy']
    lines += [f'Held-out {ev.get("metric", "accuracy")}: base {fmt(acc["base"])}, final {fmt(acc["final"])} '
              f'(gain {fmt(ev["gain"])}). Share of the gain recovered, (acc(model) - acc(base)) / '
              '(acc(final) - acc(base)), by rank-k models (variant A: embeddings, head, norms and biases at base '
              f'as in AlphaRL; variant B: also the full update of {", ".join(a["config"]["variant_b_keep"])}):', '']
    cols = [str(k) for k in ks] + ['full']
    lines += ['| variant | ' + ' | '.join(f'k={c}' for c in cols) + ' |', '|---|' + '---|' * len(cols)]
    for v in ('A', 'B'):
      cells = [fmt(ev['recovered_gain'].get(f'rank{k}_{v}')) for k in ks] + [fmt(ev['recovered_gain'].get(f'full_{v}'))]
      lines.append(f'| {v} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    if ev.get('warning'):
      lines += [f'Warning: {ev["warning"]}', '']
  ext = a.get('extrapolation') or []
  if ext:
    lines += [f'Extrapolation to step {a["final_step"]} from early windows (AlphaRL: per kernel, the last window '
              'checkpoint\'s top singular pair, its coefficient fitted linearly in step over the window and the '
              'origin, rescaled to the full update\'s norm; ExPO: theta_0 + alpha (theta_w - theta_0), alpha = '
              '(final - base) / (window end - base)). Cosine and relative error of the predicted update against '
              'the actual one, all kernels pooled:', '']
    has_acc = any('recovered_gain' in e for e in ext)
    head = ['window end', 'speed-up', 'AlphaRL cos', 'AlphaRL rel. err', 'ExPO cos', 'ExPO rel. err']
    if has_acc:
      head += ['gain AlphaRL A', 'gain AlphaRL B', 'gain ExPO', 'gain window ckpt']
    lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for e in ext:
      row = [str(e['window_end']), f'{fmt(e["speedup"], 2)}x', fmt(e['alpharl']['cosine']),
             fmt(e['alpharl']['relative_error']), fmt(e['expo']['cosine']), fmt(e['expo']['relative_error'])]
      if has_acc:
        g = e.get('recovered_gain', {})
        row += [fmt(g.get('alpharl_A')), fmt(g.get('alpharl_B')), fmt(g.get('expo')), fmt(g.get('window'))]
      lines.append('| ' + ' | '.join(row) + ' |')
    lines.append('')
  for name in (images if images is not None else []):
    lines += [f'![{os.path.splitext(name)[0]}]({image_dir.rstrip("/")}/{name})', '']
  return '\n'.join(lines)


def _stage_ranges(stages: Mapping[str, Any]) -> str:
  items = sorted((int(s), v) for s, v in stages.items())
  parts, start, prev, current = [], None, None, None
  for step, value in items:
    if value != current:
      if current is not None:
        parts.append(f'{current} {start}..{prev}')
      start, current = step, value
    prev = step
  parts.append(f'{current} {start}..{prev}')
  return ', '.join(parts)


def write_report(analysis: Mapping, out_dir: str) -> dict[str, str]:
  """Writes analysis.json, the PNGs and analysis.md into out_dir; returns {kind: path}."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, 'analysis.json')
  with open(json_path, 'w') as f:
    json.dump(to_jsonable(analysis), f, indent=1, allow_nan=False)
  pngs = write_plots(analysis, out_dir)
  md_path = os.path.join(out_dir, 'analysis.md')
  with open(md_path, 'w') as f:
    f.write(markdown_section(analysis, '.', pngs) + '\n')
  return {'json': json_path, 'markdown': md_path, **{name: os.path.join(out_dir, name) for name in pngs}}


# --- evaluation hook ----------------------------------------------------------------------------
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


# --- command ---------------------------------------------------------------------------------
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
