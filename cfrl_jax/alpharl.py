"""AlphaRL run mode: train an early window, predict the planned end from its rank-1 dynamics, evaluate.

    python -m cfrl_jax.main --config=configs/demo.py --config.arms=grpo --config.alpharl.enabled=True \
        --config.alpharl.reference_run=runs/demo          # the full study of the same config

What runs (config.alpharl; Cai et al. 2025, PAPERS.md section 3). With T = rl.steps
planned and W = round(window * T):
  1. Training for W steps, checkpointing every fit_every steps (and step 0, the base W_0).
  2. This project's step-line fit, per attention/MLP kernel (cfrl_jax.dynamics.rank1): the
     last window checkpoint's top singular pair (u, v); every window checkpoint's rank-1
     update projected on u v^T; a least-squares line in step through those points and the
     origin (t_0, 0); the update at T is rho * c(T) * u v^T, rho = ||dW_W||_F / s1(W). The
     origin t_0 is step 0, or with CF-RL the start of stage 2 (the backbone is frozen before
     it, so its update is exactly 0 there; window checkpoints before it are not fit points).
  3. Models at step T. A: the step line in the rank-1 sufficiency convention of the released
     eval/upd_rank.py (kernels W_0 + predicted rank-1 update, embeddings, head, norms and
     biases at base); B: A plus the window-end value of the `keep` groups (by default the
     head, which CF-RL trains first). A and B are NOT the released AlphaRL predictor, which is:
     released_oracle / released_window (config.alpharl.released): the procedure of
     caiyuchen-ustc/AlphaRL (rank1.fit_released): per kernel the vectors s1 * (output-side
     singular vector) of the window checkpoints after the origin, signs chained backwards
     from the window end, a one-component PLS regression against the run's own eval metric
     at those checkpoints (evaluated where the window run did not log it), inverted at a
     target accuracy, and u1(W) pred^T added to the WINDOW-END checkpoint (its full-rank
     update, head, embeddings and norms kept; no norm rescale, no origin point). Targets:
     'oracle' = the reference run's final accuracy (an UPPER BOUND: it uses the answer),
     'window' = the least-squares line of accuracy against step over the same checkpoints,
     evaluated at T and clipped to [0, 1]. Fewer than 2 such checkpoints, or a constant
     accuracy over them, leaves these variants out with the reason in the report.
     ExPO: theta_0 + (T / W)(theta_W - theta_0) on every leaf (alpha = T/W - 1 in ExPO's
     theta_W + alpha (theta_W - theta_0)); expo_tuned (config.alpharl.expo_alphas): alpha
     picked from {expo_alphas} + {T/W - 1} by the metric on selection problems disjoint
     from the reported ones (select_on: 'eval_rest' = task.eval rows after the reported
     eval.num_problems, 'train' = training prompts the window never drew, 'auto' = the
     first when there are enough rows), then evaluated on the reported problems. All models,
     the base and the window end are evaluated with the run's own eval
     (run_setup.make_eval_fn: same problems, same sampling key).
  4. Optionally, continue_steps more steps of training from one extrapolated model, with
     the data order and randomness of the planned run from step W on (fresh optimizer;
     CF-RL's head-only stage is not repeated; a KL term stays anchored at the base).

What is reported (<dir>/alpharl.json, alpharl.md, alpharl.png): `metric` (pass@1 by
default) +- its standard error for each model; with a reference run (the full run of
the same config, checked field by field) the share of the RL gain,
(acc(model) - acc(base)) / (acc(reference final) - acc(base)), with a delta-method
standard error that treats the evaluations as independent (it ignores their positive
correlation over the same problems, so it overstates the noise of differences); the
steps trained as a share of the planned ones; and the paper's target (>= 96% of the
gain at <= 40% of the steps) as met / not met / within noise. seed_verdicts pools the
runs of several seeds (mean share +- its standard error across seeds, and the verdict);
seeds_section renders them with the rule (VERDICT_RULE) in <run_dir>/alpharl/alpharl.md.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfrl_jax import analyze
from cfrl_jax import metrics as metrics_lib
from cfrl_jax.analyze import fmt
from cfrl_jax.config import parse_list
from cfrl_jax.dynamics import rank1
from cfrl_jax.run_setup import load_policy, make_eval_fn, make_probe_fn, write_run_config
from cfrl_jax.tasks import build_task
from cfrl_jax.train import checkpoint, trainer

SUBDIR = 'alpharl'            # experiment.run writes AlphaRL output under <run_dir>/alpharl/
CONTINUED_SUBDIR = 'continued'
JSON_NAME, MD_NAME, PNG_NAME = 'alpharl.json', 'alpharl.md', 'alpharl.png'
TARGET_SHARE, TARGET_STEP_FRACTION = 0.96, 0.4     # the paper's headline
CONTINUE_FROM = ('A', 'B', 'expo')
RELEASED = ('released_oracle', 'released_window')
EXTRAPOLATED = ('alpharl_A', 'alpharl_B') + RELEASED + ('expo', 'expo_tuned')   # models at step T, W steps trained
UPPER_BOUND = ('released_oracle',)     # use the reference's final accuracy: not a prediction
SELECT_ON = ('auto', 'eval_rest', 'train')
MODEL_LABELS = {
    'base': 'base (step 0)',
    'window': 'window end',
    'alpharl_A': 'A: rank-1 step line, upd_rank convention (rest at base)',
    'alpharl_B': 'B: rank-1 step line, upd_rank convention + {keep} from the window end',
    'released_oracle': 'released AlphaRL (PLS), target = reference final accuracy: upper bound',
    'released_window': 'released AlphaRL (PLS), target from the window',
    'expo': 'ExPO, fixed alpha = T/W - 1',
    'expo_tuned': 'ExPO, alpha picked on selection problems',
    'continued': 'continued from {start}',
    'reference': 'reference: full run',
}
# Config fields that define what a run computes: a reference run must agree on all of them.
REFERENCE_SECTIONS = ('seed', 'task', 'model', 'tokenizer', 'pretrain', 'rl', 'cfrl', 'eval')
REFERENCE_IGNORED = ('pretrain.cache_dir', 'eval.every', 'model.remat')


# --- settings -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
  """config.alpharl resolved against rl.steps; see check_config."""
  planned_steps: int          # T
  window_steps: int           # W = round(window * T)
  fit_every: int
  continue_steps: int         # resolved (-1 -> T - W)
  continue_from: str
  keep: tuple[str, ...]
  reference_run: str
  metric: str
  expo: bool
  released: bool
  pls_scale: bool
  expo_alphas: tuple[float, ...]   # empty: no tuned ExPO; T/W - 1 is added to the grid
  select_on: str
  select_problems: int             # resolved (-1 -> eval.num_problems)


def check_config(config) -> Settings:
  """Validates config.alpharl (and what it needs elsewhere); ValueError naming the field and the fix."""
  a, rl = config.alpharl, config.rl
  T = int(rl.steps)
  if T < 1:
    raise ValueError(f'config.rl.steps={T}: AlphaRL needs a planned run of at least one step.')
  if not 0 < float(a.window) <= 1:
    raise ValueError(f'config.alpharl.window={a.window}; expected the fraction of rl.steps to train, in (0, 1] '
                     '(the paper: 0.4 or less).')
  W = int(round(float(a.window) * T))
  if W < 1:
    raise ValueError(f'config.alpharl.window={a.window} of rl.steps={T} rounds to {W} steps; raise the window '
                     'or rl.steps.')
  if int(a.fit_every) < 1:
    raise ValueError(f'config.alpharl.fit_every={a.fit_every}; expected a checkpoint interval >= 1 step.')
  if int(a.fit_every) > W:
    raise ValueError(f'config.alpharl.fit_every={a.fit_every} exceeds the window of {W} steps: the fit would '
                     f'see the window end alone. Use fit_every <= {W}.')
  if int(a.continue_steps) < -1:
    raise ValueError(f'config.alpharl.continue_steps={a.continue_steps}; expected >= 0, or -1 for the rest of '
                     'the planned steps.')
  cont = T - W if int(a.continue_steps) == -1 else int(a.continue_steps)
  if a.continue_from not in CONTINUE_FROM:
    raise ValueError(f'config.alpharl.continue_from={a.continue_from!r}; expected one of {CONTINUE_FROM}.')
  if a.continue_from == 'expo' and not a.expo and cont > 0:
    raise ValueError("config.alpharl.continue_from='expo' needs config.alpharl.expo=True.")
  keep = tuple(parse_list(a.keep))
  try:
    rank1.check_keep(keep)
  except ValueError as e:
    raise ValueError(f'config.alpharl.keep={a.keep!r}: {e}') from None
  if not keep:
    raise ValueError("config.alpharl.keep is empty, so variant B would equal variant A; keep e.g. 'head'.")
  metric = str(a.metric).strip()
  if not metric:
    raise ValueError("config.alpharl.metric is empty; use e.g. 'pass@1' or 'greedy_accuracy'.")
  if (metric.startswith('pass@') or metric.startswith('majority@')) and int(config.eval.samples) < 1:
    raise ValueError(f'config.alpharl.metric={metric!r} needs sampled evaluation: set config.eval.samples >= 1 '
                     "or use config.alpharl.metric='greedy_accuracy'.")
  try:
    alphas = tuple(float(x) for x in parse_list(a.expo_alphas))
  except ValueError:
    raise ValueError(f'config.alpharl.expo_alphas={a.expo_alphas!r}; expected comma-separated numbers, e.g. '
                     "'0.5,1,2,4' (T/W - 1 is always added), or '' for no tuned ExPO.") from None
  if any(not math.isfinite(x) for x in alphas):
    raise ValueError(f'config.alpharl.expo_alphas={a.expo_alphas!r} holds a non-finite number.')
  if a.select_on not in SELECT_ON:
    raise ValueError(f'config.alpharl.select_on={a.select_on!r}; expected one of {SELECT_ON}.')
  k = int(config.eval.num_problems) if int(a.select_problems) == -1 else int(a.select_problems)
  if k < 2:
    raise ValueError(f'config.alpharl.select_problems={a.select_problems}; expected >= 2 problems, or -1 for '
                     'as many as config.eval.num_problems.')
  if config.cfrl.enabled and config.cfrl.switch_on == 'steps' and int(config.cfrl.stage1_steps) >= W:
    raise ValueError(f'CF-RL trains the head alone for cfrl.stage1_steps={config.cfrl.stage1_steps} steps, '
                     f'which covers the whole AlphaRL window of {W} steps: the backbone never moves, so there '
                     'is nothing to fit. Raise config.alpharl.window or lower config.cfrl.stage1_steps.')
  return Settings(planned_steps=T, window_steps=W, fit_every=int(a.fit_every), continue_steps=cont,
                  continue_from=str(a.continue_from), keep=keep, reference_run=str(a.reference_run),
                  metric=metric, expo=bool(a.expo), released=bool(a.released), pls_scale=bool(a.pls_scale),
                  expo_alphas=alphas, select_on=str(a.select_on), select_problems=k)


def resolve_reference(path: str, arm: str | None, seed: int) -> str:
  """A reference_run for one (arm, seed): '{arm}'/'{seed}' filled in; a study dir -> <dir>/<arm>/seed<k>."""
  if not path:
    return ''
  if '{arm}' in path and arm is None:
    raise ValueError(f"config.alpharl.reference_run={path!r} names '{{arm}}' but this is a single run "
                     '(config.arms is empty); give the reference run directory itself.')
  out = path.replace('{arm}', arm or '').replace('{seed}', str(seed))
  study_arm = os.path.join(out, arm or '', f'seed{seed}')
  if arm is not None and not os.path.exists(os.path.join(out, 'metrics.jsonl')) and os.path.exists(
      os.path.join(study_arm, 'metrics.jsonl')):
    return study_arm
  return out


def window_config(config, settings: Settings):
  """The config of the window's training: W steps, a checkpoint every fit_every steps, all kept."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.rl.steps = settings.window_steps
    c.checkpoint.every = settings.fit_every
    c.checkpoint.max_to_keep = 0
  return c


def continued_config(config, settings: Settings):
  """The continuation's config: to step W + continue_steps, head and backbone trained together."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.rl.steps = settings.window_steps + settings.continue_steps
    c.cfrl.enabled = False
  return c


# --- reference run --------------------------------------------------------------------------
def _flat(d: Mapping, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def reference_mismatches(config, reference_config: Mapping) -> list[str]:
  """'field: this vs reference' for every field of REFERENCE_SECTIONS on which the two runs differ.

  Fields absent from the reference (written by an older schema) are not compared; pretrain
  counts only for model.source 'pretrain', cfrl's settings only when CF-RL is on.
  """
  mine = _flat({k: v for k, v in json.loads(config.to_json_best_effort()).items() if k in REFERENCE_SECTIONS})
  ref = _flat({k: v for k, v in reference_config.items() if k in REFERENCE_SECTIONS})
  out = []
  for key, value in sorted(mine.items()):
    if key in REFERENCE_IGNORED or key not in ref:
      continue
    if key.startswith('pretrain.') and mine.get('model.source') != 'pretrain':
      continue
    if key.startswith('cfrl.') and key != 'cfrl.enabled' and not mine.get('cfrl.enabled'):
      continue
    if value != ref[key]:
      out.append(f'{key}: {value!r} here vs {ref[key]!r} in the reference')
  return out


def eval_records(run_dir: str) -> dict[int, dict]:
  """{step: eval record} of a run's metrics.jsonl (the last record wins for a step logged twice)."""
  if not os.path.exists(os.path.join(run_dir, 'metrics.jsonl')):
    return {}
  return {int(r['step']): r for r in metrics_lib.read_metrics(run_dir, 'eval')}


def load_reference(path: str, config, metric: str) -> dict:
  """The reference run's eval curve and final accuracy, after checking it is the same config run to T."""
  fix = ('Train the full run first (the same command without --config.alpharl.enabled) and pass its directory, '
         "or leave config.alpharl.reference_run='' to report the gain over the base only.")
  if not os.path.isdir(path):
    raise FileNotFoundError(f'config.alpharl.reference_run={path!r} does not exist. {fix}')
  cfg_path = os.path.join(path, 'config.json')
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f'{cfg_path} not found: the reference must be a run directory written by cfrl_jax.main '
                            f'(a study keeps its runs in <study>/<arm>/seed<k>). {fix}')
  with open(cfg_path) as f:
    ref_config = json.load(f)
  bad = reference_mismatches(config, ref_config)
  if bad:
    raise ValueError(f'The reference run {path} is not the full run of this config; it differs in '
                     f'{"; ".join(bad[:6])}{" ..." if len(bad) > 6 else ""}. Point config.alpharl.reference_run at '
                     "the run of the same arm and seed (in a study: '<study>/{arm}/seed{seed}' or the study dir), "
                     'or pick the matching arm with --config.arms=<arm>.')
  records = eval_records(path)
  if not records:
    raise ValueError(f'The reference run {path} has no eval records in metrics.jsonl: it needs config.eval.every > 0.')
  final_step = max(records)
  T = int(config.rl.steps)
  if final_step != T:
    raise ValueError(f'The reference run {path} was last evaluated at step {final_step}, not at the planned '
                     f'rl.steps={T}: it did not finish. Finish it with --config.resume=True.')
  curve = [(s, *metric_value(records[s], metric, f'reference step {s}')) for s in sorted(records)]
  acc, se = metric_value(records[final_step], metric, f'reference step {final_step}')
  base = metric_value(records[0], metric, 'reference step 0') if 0 in records else (math.nan, math.nan)
  return {'run': os.path.abspath(path), 'final_step': final_step, 'accuracy': acc, 'stderr': se,
          'base_accuracy': base[0], 'curve': curve}


# --- metrics --------------------------------------------------------------------------------
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


# --- the fit -------------------------------------------------------------------------------
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


# --- the run mode --------------------------------------------------------------------------
def check_fresh(run_dir: str, resume: bool) -> None:
  """ValueError when run_dir already holds an AlphaRL run and config.resume is off."""
  if resume:
    return
  for d in (run_dir, os.path.join(run_dir, CONTINUED_SUBDIR)):
    if checkpoint.available_steps(d) or os.path.exists(os.path.join(d, 'metrics.jsonl')):
      raise ValueError(f'{d} already holds a run (checkpoints or metrics.jsonl). Delete it, choose another '
                       '--config.run_dir, or pass --config.resume=True to reuse its checkpoints.')


def prepare(config, run_dir: str) -> tuple[Settings, dict | None]:
  """Every check that can fail before training: settings, output directory, reference run."""
  settings = check_config(config)
  check_fresh(run_dir, bool(config.resume))
  reference = load_reference(settings.reference_run, config, settings.metric) if settings.reference_run else None
  if reference is not None and os.path.abspath(settings.reference_run) == os.path.abspath(run_dir):
    raise ValueError(f'config.alpharl.reference_run is the AlphaRL directory itself ({run_dir}).')
  return settings, reference


def selection_rows(config, task, settings: Settings, prompt_rows: Callable) -> tuple[list, str]:
  """(rows, description) of the problems tuned ExPO's alpha is picked on, disjoint from the reported ones.

  'eval_rest': task.eval[eval.num_problems : eval.num_problems + k] (held-out, never reported);
  'train': the first k training rows that the window's steps never drew (prompt_rows(rows, step,
  rl.prompts_per_step, seed) for step < W); 'auto': eval_rest when task.eval has k rows after the
  reported ones, else train. ValueError naming the fix when the split is too small.
  """
  k, n = settings.select_problems, int(config.eval.num_problems)
  rest = task.eval[n:n + k]
  how = settings.select_on
  if how == 'auto':
    how = 'eval_rest' if len(rest) >= k else 'train'
  if how == 'eval_rest':
    if len(rest) < k:
      raise ValueError(f"config.alpharl.select_on='eval_rest' needs {k} eval problems after the "
                       f'{n} reported ones, but the task has {len(task.eval)} in all. Raise the task\'s eval set '
                       "(e.g. task.num_eval), lower config.alpharl.select_problems, or use select_on='train'.")
    return list(rest), f'eval problems {n}..{n + k - 1} (after the {n} reported ones)'
  index = list(range(len(task.train)))
  drawn = {i for step in range(settings.window_steps)
           for i in prompt_rows(index, step, int(config.rl.prompts_per_step), int(config.seed))}
  unseen = [i for i in index if i not in drawn][:k]
  if len(unseen) < k:
    raise ValueError(f"config.alpharl.select_on='{settings.select_on}' picks ExPO's alpha on {k} training prompts "
                     f'the window never drew, but only {len(task.train) - len(drawn)} of {len(task.train)} are left. '
                     'Lower config.alpharl.select_problems, or use eval_rest with a larger task eval set.')
  return [task.train[i] for i in unseen], f'{k} training prompts not drawn in the window'


def _as_device(tree):
  # Fresh device buffers: the learner donates its params argument.
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def run_alpharl(config, run_dir: str, task=None, *, progress: bool | None = None,
                log: Callable[[str], None] = print) -> dict:
  """Runs the AlphaRL mode of `config` in run_dir (see the module docstring); returns the result dict."""
  settings, reference = prepare(config, run_dir)
  T, W = settings.planned_steps, settings.window_steps
  task = task or build_task(config.task)
  progress = config.log.progress if progress is None else progress
  seconds = {}
  t0 = time.time()
  policy, params = load_policy(config, task)
  seconds['load'] = time.time() - t0
  writer = jax.process_index() == 0
  write_run_config(config, run_dir)
  eval_fn = make_eval_fn(config, policy, task)
  # Checked before training: a selection split that is too small fails now, not after the window.
  selection = selection_rows(config, task, settings, trainer.prompt_rows) if settings.expo_alphas else None
  probe_fn = make_probe_fn(config, policy, task)
  train_eval = eval_fn if config.eval.every > 0 else None

  log(f'AlphaRL: training the window, {W} of {T} planned steps, checkpoints every {settings.fit_every}')
  t0 = time.time()
  trainer.train(window_config(config, settings), policy, params, task, run_dir, eval_fn=train_eval,
                probe_fn=probe_fn, progress=progress)
  seconds['window_training'] = time.time() - t0
  del params   # donated to the learner; the base is read back from the step-0 checkpoint

  t0 = time.time()
  fit = fit_window(run_dir, W, T, keep=settings.keep, expo=settings.expo)
  seconds['fit'] = time.time() - t0
  log(f'AlphaRL: fitted {fit.diagnostics["kernels"]} kernels on steps {fit.fit_steps} (origin {fit.origin}); '
      f'median R^2 {fit.diagnostics["r2_median"]:.3f}')

  t0 = time.time()
  recorded = eval_records(run_dir)
  evals = {'base': recorded.get(0) or eval_fn(_as_device(fit.base), 0),
           'window': recorded.get(W) or eval_fn(_as_device(fit.window), W)}
  for name, model in fit.models.items():
    evals[name] = eval_fn(_as_device(model), T)
    log(f'AlphaRL: {name} {settings.metric} = {metric_value(evals[name], settings.metric, name)[0]:.4f}')
  seconds['evaluation'] = time.time() - t0

  extra = {}
  released = None
  if settings.released:
    t0 = time.time()
    accuracy = {}
    for s in fit.fit_steps:   # the PLS's y: the run's own metric at each fit checkpoint
      record = recorded.get(s) or (evals['window'] if s == W else
                                   eval_fn(_as_device(checkpoint.restore_params(run_dir, s)), s))
      accuracy[s] = metric_value(record, settings.metric, f'window step {s}')[0]
    released = fit_released_window(fit, accuracy, scale=settings.pls_scale,
                                   oracle=None if reference is None else reference['accuracy'])
    if released.fits is None:
      log(f'AlphaRL: released AlphaRL (PLS) not fitted: {released.reason}')
    for name, model in released.models.items():
      evals[name] = eval_fn(_as_device(model), T)
      extra[name] = model
      log(f'AlphaRL: {name} (target {released.targets[name.split("_", 1)[1]]:.4f}) {settings.metric} = '
          f'{metric_value(evals[name], settings.metric, name)[0]:.4f}')
    seconds['released_fit_and_evaluation'] = time.time() - t0

  expo_selection = None
  if settings.expo_alphas:
    t0 = time.time()
    rows, split = selection
    select_eval = make_eval_fn(config, policy, dataclasses.replace(task, eval=rows), num_problems=len(rows))
    grid = tuple(settings.expo_alphas) + (T / W - 1,)

    def score(alpha):
      model = rank1.expo_params(fit.base, fit.window, 1 + alpha)
      return metric_value(select_eval(_as_device(model), T), settings.metric, f'ExPO alpha={alpha:g}')[0]

    alpha, scores = rank1.select_expo_alpha(grid, score)
    extra['expo_tuned'] = rank1.expo_params(fit.base, fit.window, 1 + alpha)
    evals['expo_tuned'] = eval_fn(_as_device(extra['expo_tuned']), T)
    expo_selection = {'alpha': alpha, 'scores': [[a, v] for a, v in scores.items()], 'split': split,
                      'problems': len(rows), 'fixed_alpha': T / W - 1}
    log(f'AlphaRL: ExPO alpha {alpha:g} picked on {split} ({len(rows)} problems); expo_tuned {settings.metric} = '
        f'{metric_value(evals["expo_tuned"], settings.metric, "expo_tuned")[0]:.4f}')
    seconds['expo_selection'] = time.time() - t0

  continued = None
  if settings.continue_steps > 0:
    start = {'A': 'alpharl_A', 'B': 'alpharl_B', 'expo': 'expo'}[settings.continue_from]
    cdir = os.path.join(run_dir, CONTINUED_SUBDIR)
    ccfg = continued_config(config, settings)
    log(f'AlphaRL: continuing from {start} for {settings.continue_steps} steps (data from step {W})')
    t0 = time.time()
    write_run_config(ccfg, cdir)
    t = trainer.Trainer(ccfg, policy, _as_device(fit.models[start]), task, cdir, eval_fn=train_eval,
                        probe_fn=probe_fn, progress=progress, initial_step=W)
    try:
      if t.ref_params is not None:   # the KL term of the planned run is to the base model
        t.ref_params = t.place.put(_as_device(fit.base), t.place.param_specs)
      if ccfg.checkpoint.every > 0 and t.ckpt.latest_step() is None:
        t.save()   # the continuation's own W_0, for the rank-1 analysis of the continued run
      res = t.run()
    finally:
      t.close()
    crec = eval_records(cdir)
    evals['continued'] = crec.get(res.step) or eval_fn(res.params, res.step)
    seconds['continued_training'] = time.time() - t0
    crec[int(res.step)] = evals['continued']
    continued = {'start': start, 'steps': settings.continue_steps, 'final_step': int(res.step),
                 'curve': [(s, *metric_value(crec[s], settings.metric, f'continued step {s}')) for s in sorted(crec)]}

  result = summarize(config, settings, run_dir, fit, evals, recorded, reference, continued, seconds,
                     released=released, expo_selection=expo_selection, extra=extra)
  if writer:
    paths = write_outputs(result, run_dir)
    log(f'AlphaRL: {paths["markdown"]}')
  return result


def summarize(config, settings: Settings, run_dir, fit: WindowFit, evals: Mapping[str, Mapping],
              window_records: Mapping[int, Mapping], reference: dict | None, continued: dict | None,
              seconds: Mapping[str, float], *, released: ReleasedWindow | None = None,
              expo_selection: dict | None = None, extra: Mapping[str, Any] | None = None) -> dict:
  """The JSON-able result: per model the metric, its s.e., steps trained and (with a reference) share of gain."""
  T, W, metric = settings.planned_steps, settings.window_steps, settings.metric
  steps_trained = {'base': 0, 'window': W, **{name: W for name in EXTRAPOLATED}}
  at_step = {'base': 0, 'window': W, **{name: T for name in EXTRAPOLATED}}
  if continued is not None:
    steps_trained['continued'] = W + settings.continue_steps
    at_step['continued'] = continued['final_step']
  models = {}
  for name, record in evals.items():
    acc, se = metric_value(record, metric, name)
    models[name] = {'accuracy': acc, 'stderr': se, 'steps_trained': steps_trained[name], 'step': at_step[name],
                    'eval': {k: v for k, v in record.items() if k not in ('step', 'kind')}}
  base = models['base']
  if reference is not None:
    models['reference'] = {'accuracy': reference['accuracy'], 'stderr': reference['stderr'], 'steps_trained': T,
                           'step': T}
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always', RuntimeWarning)
      for m in models.values():
        m['share'], m['share_stderr'] = share_of_gain(m['accuracy'], m['stderr'], base['accuracy'], base['stderr'],
                                                      reference['accuracy'], reference['stderr'])
    share_note = str(caught[0].message) if caught else ''
  else:
    share_note = ('No reference run (config.alpharl.reference_run): the fully trained model\'s accuracy is unknown, '
                  'so the share of the gain is unavailable; the table gives the gain over the base.')
  for m in models.values():
    m['gain'] = m['accuracy'] - base['accuracy']
  verdicts = {}
  for name in EXTRAPOLATED:
    if name in models and 'share' in models[name]:
      verdicts[name] = target_verdict(models[name]['share'], models[name]['share_stderr'],
                                      models[name]['steps_trained'] / T)
  window_curve = [(s, *metric_value(r, metric, f'window step {s}')) for s, r in sorted(window_records.items())]
  if not window_curve:   # config.eval.every = 0: the trainer evaluated nothing, the mode did
    window_curve = [(0, base['accuracy'], base['stderr']), (W, models['window']['accuracy'], models['window']['stderr'])]
  return {
      'name': config.name, 'run_dir': os.path.abspath(run_dir), 'algorithm': config.rl.algorithm,
      'cfrl': bool(config.cfrl.enabled), 'seed': int(config.seed), 'metric': metric,
      'planned_steps': T, 'window_steps': W, 'window': float(config.alpharl.window),
      'fit_every': settings.fit_every, 'fit_origin': fit.origin, 'fit_steps': fit.fit_steps,
      'keep': list(settings.keep), 'fit': fit.diagnostics,
      'step_fraction': W / T, 'step_saving': 1 - W / T, 'speedup': T / W,
      'models': models, 'reference': reference, 'share_note': share_note,
      'base_mismatch': (reference is not None and math.isfinite(reference['base_accuracy'])
                        and abs(reference['base_accuracy'] - base['accuracy']) > 1e-9),
      'target': {'share': TARGET_SHARE, 'step_fraction': TARGET_STEP_FRACTION, 'verdicts': verdicts},
      'weight_quality': weight_quality(fit, reference['run'], extra) if reference is not None else None,
      'released': None if released is None else {
          'fitted': released.fits is not None, 'reason': released.reason, 'steps': released.steps,
          'accuracy': released.accuracy, 'targets': released.targets, 'fit': released.diagnostics,
          'target_rule': 'window: least-squares line of the metric against step over the PLS checkpoints, at '
                         f'step {T}, clipped to [0, 1]; oracle: the reference run\'s final metric (upper bound)'},
      'expo_selection': expo_selection, 'upper_bound': [n for n in UPPER_BOUND if n in models],
      'window_curve': window_curve, 'continued': continued, 'seconds': dict(seconds),
  }


# --- output --------------------------------------------------------------------------------
def _label(name: str, result: Mapping) -> str:
  start = (result.get('continued') or {}).get('start', '')
  return MODEL_LABELS[name].format(keep='+'.join(result['keep']), start=SHORT_NAMES.get(start, start))


def markdown_section(result: Mapping, image: str | None = PNG_NAME, heading_level: int = 2,
                     title: str | None = None) -> str:
  """The Markdown report of one AlphaRL run; `image` is linked relatively when given."""
  r = result
  T, W, metric = r['planned_steps'], r['window_steps'], r['metric']
  has_share = r['reference'] is not None
  lines = ['#' * heading_level + ' ' + (title or f'AlphaRL: {r["name"]} ({r["algorithm"]}'
                                        f'{", CF-RL" if r["cfrl"] else ""}, seed {r["seed"]})'), '']
  lines += [f'Trained {W} of {T} planned steps ({fmt(100 * r["step_fraction"], 0)}% of the steps, '
            f'{fmt(r["speedup"], 2)}x fewer), fitted the rank-1 linear dynamics of {r["fit"]["kernels"]} stacked '
            f'attention/MLP kernels on checkpoints {r["fit_steps"]} plus the origin (step {r["fit_origin"]}'
            f'{", the start of CF-RL stage 2" if r["fit_origin"] else ""}; median R^2 of the coefficient lines '
            f'{fmt(r["fit"]["r2_median"])}), and extrapolated the update to step {T} '
            f'(predicted kernel update norm / window update norm: {fmt(r["fit"]["norm_ratio"], 2)}). A and B are this '
            'project\'s step line in the rank-1 sufficiency convention of the released eval/upd_rank.py '
            '(W_0 + ||dW||_F u1 v1^T, the rest at base); the released AlphaRL predictor is the PLS procedure '
            '(docs/alpharl.md).', '']
  head = ['model', 'steps trained', f'{metric} ± s.e.', 'gain over base']
  if has_share:
    head += ['share of the gain ± s.e.', f'target (≥{TARGET_SHARE:.0%} at ≤{TARGET_STEP_FRACTION:.0%} steps)']
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  order = ['base', 'window', *EXTRAPOLATED, 'continued', 'reference']
  for name in order:
    m = r['models'].get(name)
    if m is None:
      continue
    row = [_label(name, r), str(m['steps_trained']), f'{fmt(m["accuracy"])} ± {fmt(m["stderr"])}',
           f'{m["gain"]:+.3f}']
    if has_share:
      share = '—' if name == 'base' else f'{fmt(m["share"])} ± {fmt(m["share_stderr"])}'
      verdict = r['target']['verdicts'].get(name, '')
      row += [share, f'{verdict} (upper bound)' if verdict and name in UPPER_BOUND else verdict]
    lines.append('| ' + ' | '.join(row) + ' |')
  lines.append('')
  if has_share:
    ref = r['reference']
    lines += [f'Share of the gain = ({metric}(model) − {metric}(base)) / ({metric}(reference) − {metric}(base)), the '
              f'reference being the last eval (step {ref["final_step"]}) of the full run `{ref["run"]}`. Its standard '
              'error propagates the three evaluations\' standard errors as if independent (they share problems and '
              'are positively correlated, so this overstates the noise). "within noise": within 2 s.e. of the '
              'target share.', '']
    if r['base_mismatch']:
      lines += [f'Note: the reference\'s own base eval ({fmt(ref["base_accuracy"])}) differs from this run\'s '
                f'({fmt(r["models"]["base"]["accuracy"])}); the gain uses this run\'s base.', '']
  if r['share_note']:
    lines += [r['share_note'], '']
  lines += _released_notes(r) + _expo_notes(r)
  wq = r.get('weight_quality')
  if wq:
    lines += [f'Predicted vs actual kernel update at step {T} (reference checkpoint, all kernels pooled): ' + '; '.join(
        f'{WQ_NAMES.get(name, name)} cosine {fmt(q["cosine"])}, relative error {fmt(q["relative_error"])}, norm ratio '
        f'{fmt(q["norm_ratio"], 2)}' for name, q in wq.items()) + '.', '']
  secs = r['seconds']
  lines += ['Wall time: ' + ', '.join(f'{k.replace("_", " ")} {v:.0f} s' for k, v in secs.items()) + '.', '']
  if image:
    lines += [f'![AlphaRL accuracy vs step]({image})', '']
  return '\n'.join(lines)


SHORT_NAMES = {'alpharl_A': 'A (step line)', 'alpharl_B': 'B (step line + kept groups)',
               'released_oracle': 'released, oracle target (upper bound)', 'released_window': 'released, window target',
               'expo': 'ExPO fixed', 'expo_tuned': 'ExPO tuned'}
WQ_NAMES = {**SHORT_NAMES, 'alpharl': SHORT_NAMES['alpharl_A']}


def _released_notes(r: Mapping) -> list[str]:
  rel = r.get('released')
  if rel is None:
    return []
  if not rel['fitted']:
    return [f'Released AlphaRL (PLS) not fitted: {rel["reason"]}', '']
  t = rel['targets']
  out = [f'Released AlphaRL (PLS): {rel["fit"]["matrices"]} kernel matrices, PLS of the sign-chained vectors s1 * (output-side singular vector) '
         f'against {r["metric"]} at checkpoints {rel["steps"]} ({", ".join(fmt(a) for a in rel["accuracy"])}); median '
         f'R^2 {fmt(rel["fit"]["pls_r2_median"])}; coordinates {"standardised" if rel["fit"]["scale"] else "centred"}. '
         'Each model is the window-end checkpoint plus u1 pred^T on every kernel, as released: pred is the '
         'predicted rank-1 part of the whole update W_T - W_0, added on top of W_W, which already holds W_W - W_0.']
  if 'oracle' in t:
    out.append(f'Target (oracle, UPPER BOUND: it is the reference run\'s final {r["metric"]}): {fmt(t["oracle"])}.')
  if 'window' in t:
    out.append(f'Target from the window alone: {fmt(t["window"])} (least-squares line of {r["metric"]} against step '
               f'over those checkpoints, at step {r["planned_steps"]}, clipped to [0, 1]).')
  ratios = rel['fit'].get('added_norm_ratio', {})
  if ratios:
    out.append('Added kernel norm / window kernel update norm: ' +
               ', '.join(f'{k} {fmt(v, 2)}' for k, v in ratios.items()) + '.')
  return [' '.join(out), '']


def _expo_notes(r: Mapping) -> list[str]:
  sel = r.get('expo_selection')
  if not sel:
    return []
  scores = ', '.join(f'{fmt(a, 2)}: {fmt(v)}' for a, v in sel['scores'])
  return [f'ExPO tuned: theta_W + alpha (theta_W - theta_0) with alpha = {fmt(sel["alpha"], 2)}, the best '
          f'{r["metric"]} on {sel["split"]} ({sel["problems"]} problems, disjoint from the reported ones; ties go to '
          f'the smaller alpha) among {{{scores}}}; the fixed ExPO row is alpha = T/W - 1 = '
          f'{fmt(sel["fixed_alpha"], 2)}. The table reports both on the reported problems.', '']


def write_plot(result: Mapping, path: str) -> str:
  """Accuracy vs step: reference and window curves, the extrapolated models at T, the continuation."""
  from matplotlib.figure import Figure
  r = result
  T, W, metric = r['planned_steps'], r['window_steps'], r['metric']
  fig = Figure(figsize=(7, 4.2), layout='constrained')
  ax = fig.subplots()

  def curve(points, **kw):
    if points:
      s, a, e = (np.asarray(x, np.float64) for x in zip(*points))
      ax.errorbar(s, a, yerr=np.where(np.isfinite(e), e, 0.0), capsize=2, **kw)

  if r['reference'] is not None:
    curve(r['reference']['curve'], color='gray', marker='o', ms=3, label='reference: full run')
  curve(r['window_curve'], color='C0', marker='o', ms=4, lw=2, label=f'window training ({W} steps)')
  models = r['models']
  markers = {'alpharl_A': 's', 'alpharl_B': 'D', 'released_oracle': 'P', 'released_window': 'X', 'expo': '^',
             'expo_tuned': 'v'}
  shown = [n for n in EXTRAPOLATED if n in models]
  for i, name in enumerate(shown):
    m = models[name]
    ax.errorbar([T + (i - (len(shown) - 1) / 2) * 0.01 * T], [m['accuracy']], yerr=[np.nan_to_num(m['stderr'])],
                fmt=markers[name], color=f'C{i + 1}', capsize=3, ms=7,
                label=f'{SHORT_NAMES[name]} at step {T}')
  if r['continued'] is not None:
    c = r['continued']
    start = models[c['start']]
    pts = [(W, start['accuracy'], start['stderr'])] + [p for p in c['curve'] if p[0] > W]
    curve(pts, color='C4', marker='v', ms=4, ls='--',
          label=f'continued from {c["start"].replace("_", " ")} (x: steps trained)')
  ax.axvline(W, color='gray', lw=0.8, ls=':')
  if r['reference'] is not None and math.isfinite(models['base']['accuracy']):
    b = models['base']['accuracy']
    ax.axhline(b + TARGET_SHARE * (r['reference']['accuracy'] - b), color='gray', lw=0.8, ls='--',
               label=f'{TARGET_SHARE:.0%} of the reference gain')
  ax.set(xlabel='training step', ylabel=f'{metric} (± s.e.)',
         title=f'AlphaRL: window {W}/{T} steps, predicted models at step {T}')
  ax.legend(fontsize=7)
  fig.savefig(path, dpi=110)
  return path


def write_outputs(result: Mapping, run_dir: str) -> dict[str, str]:
  """Writes alpharl.json, alpharl.png and alpharl.md into run_dir; returns {kind: path}."""
  os.makedirs(run_dir, exist_ok=True)
  paths = {'json': os.path.join(run_dir, JSON_NAME), 'png': os.path.join(run_dir, PNG_NAME),
           'markdown': os.path.join(run_dir, MD_NAME)}
  with open(paths['json'], 'w') as f:
    json.dump(analyze.to_jsonable(result), f, indent=1, allow_nan=False)
  write_plot(result, paths['png'])
  with open(paths['markdown'], 'w') as f:
    f.write(markdown_section(result) + '\n')
  return paths


# --- across seeds ---------------------------------------------------------------------------
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


VERDICT_RULE = (f'Target: ≥{TARGET_SHARE:.0%} of the reference gain at ≤{TARGET_STEP_FRACTION:.0%} of the planned '
                'steps. Share of the gain = (acc(model) − acc(base)) / (acc(reference final) − acc(base)); across '
                'seeds its mean ± standard error (seed-to-seed s.d. / √n; one seed: that run\'s delta-method s.e.). '
                f'Verdict: "not met" when more than {TARGET_STEP_FRACTION:.0%} of the steps were trained; else '
                f'"within noise" when the mean is within 2 s.e. of {TARGET_SHARE:.0%}; else "met" above it, "not met" '
                'below it; "n/a" when no seed has a share (its reference gain is 0). The oracle-target row uses the '
                'reference\'s final accuracy: an upper bound, not a prediction.')


def seeds_section(results: list[tuple[str, Mapping]], heading_level: int = 3) -> str:
  """Markdown of seed_verdicts: per arm and variant, the share of the gain +- s.e. across seeds and the
  verdict, with the rule; '' when no run has a reference."""
  rows = seed_verdicts(results)
  if not rows:
    return ''
  lines = ['#' * heading_level + ' AlphaRL verdicts across seeds', '', VERDICT_RULE, '',
           '| arm | model | seeds with a share / runs | share of the gain ± s.e. | verdict |', '|---|---|---|---|---|']
  for v in rows:
    share = (f'{fmt(v.share)} ± {fmt(v.stderr)}' if math.isfinite(v.share) else
             'n/a (reference gain 0 in every seed)')
    lines.append(f'| {v.arm} | {SHORT_NAMES.get(v.model, v.model)} | {v.with_share} / {v.runs} | {share} | '
                 f'{v.verdict} |')
  lines.append('')
  return '\n'.join(lines)
