"""AlphaRL run mode: train an early window, predict the planned end from its rank-1 dynamics, evaluate.

    python -m cfrl_jax.main --config=configs/demo.py --config.arms=grpo --config.alpharl.enabled=True \
        --config.alpharl.reference_run=runs/demo          # the full study of the same config

What runs (config.alpharl; Cai et al. 2025, PAPERS.md section 3). With T = rl.steps
planned and W = round(window * T):
  1. Training for W steps, checkpointing every fit_every steps (and step 0, the base W_0).
  2. This project's step-line fit, per attention/MLP kernel (cfrl_jax.analysis.rank1): the
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

This module is the run mode: settings, the reference run, training the window and the
continuation, evaluating every model, and the result dict (summarize). The fit and its
numbers are cfrl_jax/analysis/alpharl_fit.py, the rendering (alpharl.md, .png, .json)
cfrl_jax/analysis/alpharl_report.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from cfrl_jax import metrics as metrics_lib
from cfrl_jax.analysis import rank1
from cfrl_jax.analysis.alpharl_fit import (EXTRAPOLATED, TARGET_SHARE, TARGET_STEP_FRACTION, UPPER_BOUND,
                                           ReleasedWindow, WindowFit, fit_released_window, fit_window, metric_value,
                                           share_of_gain, target_verdict, weight_quality)
from cfrl_jax.analysis.alpharl_report import write_outputs
from cfrl_jax.config import parse_list
from cfrl_jax.run_setup import load_policy, make_eval_fn, make_probe_fn, write_run_config
from cfrl_jax.tasks import build_task
from cfrl_jax.train import checkpoint, trainer

CONTINUED_SUBDIR = 'continued'
CONTINUE_FROM = ('A', 'B', 'expo')
SELECT_ON = ('auto', 'eval_rest', 'train')


# Config fields that define what a run computes: a reference run must agree on all of them.
REFERENCE_SECTIONS = ('seed', 'task', 'model', 'tokenizer', 'pretrain', 'rl', 'cfrl', 'eval')
REFERENCE_IGNORED = ('pretrain.cache_dir', 'eval.every', 'model.remat')


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
