"""An experiment: one training run, or a study of arms x seeds from the same base, then a report.

Arms are named variations of the config (cfrl_jax/arms.py). Every arm of a study
starts from the same base weights (one base per study; per seed with
config.study.vary_base) with the same seeds and rollout budget, so runs of one
seed differ only by their arm and are paired by seed.
"""
from __future__ import annotations

import copy
import json
import os
import time

import jax

from cfrl_jax import alpharl, report
from cfrl_jax.analysis import alpharl_report
from cfrl_jax.arms import arm_config, check_explicit_overrides
from cfrl_jax.config import parse_list, validate
from cfrl_jax.run_setup import load_policy, make_eval_fn, make_head_share_fn, make_probe_fn, write_run_config
from cfrl_jax.tasks import build_task
from cfrl_jax.train import pretrain, trainer


RUN_TIME_FILE = 'run_time.json'   # a run's wall seconds, summed over every invocation that worked on it


def run_single(config, run_dir: str, task=None, *, progress: bool | None = None) -> trainer.TrainResult:
  t0 = time.time()
  try:
    return _run_single(config, run_dir, task, progress)
  finally:   # a killed or failed invocation's time counts too: the run cost it
    if jax.process_index() == 0 and os.path.isdir(run_dir):
      _add_run_time(run_dir, time.time() - t0)


def _add_run_time(run_dir: str, seconds: float) -> None:
  path = os.path.join(run_dir, RUN_TIME_FILE)
  record = {'seconds': 0.0, 'invocations': 0}
  if os.path.exists(path):
    with open(path) as f:
      record.update(json.load(f))
  record['seconds'] += seconds
  record['invocations'] += 1
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f)
  os.replace(path + '.tmp', path)


def run_seconds(run_dir: str) -> float | None:
  """Wall seconds a run took: its run_time.json, else (a run made before that record existed, in one
  invocation) from its TensorBoard event file's creation stamp to the last metrics write; None if
  neither tells."""
  path = os.path.join(run_dir, RUN_TIME_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return float(json.load(f)['seconds'])
  tb = os.path.join(run_dir, 'tb')
  events = sorted(n for n in os.listdir(tb) if n.startswith('events.out.tfevents.')) if os.path.isdir(tb) else []
  metrics = os.path.join(run_dir, 'metrics.jsonl')
  if len(events) == 1 and os.path.exists(metrics):
    try:
      start = float(events[0].split('.')[3])
    except (IndexError, ValueError):
      return None
    return max(os.path.getmtime(metrics) - start, 0.0)
  return None


def _run_single(config, run_dir: str, task, progress) -> trainer.TrainResult:
  task = task or build_task(config.task)
  policy, params = load_policy(config, task)
  write_run_config(config, run_dir)
  eval_fn = make_eval_fn(config, policy, task) if config.eval.every > 0 else None
  probe_fn = make_probe_fn(config, policy, task)
  progress = config.log.progress if progress is None else progress
  return trainer.train(config, policy, params, task, run_dir, eval_fn=eval_fn, probe_fn=probe_fn,
                       head_share_fn=make_head_share_fn(config, policy, task), progress=progress)


def study_jobs(config, explicit: frozenset[str] = frozenset()) -> list[tuple[str, int, object]]:
  """[(arm, seed, arm config)] of a study, every one checked before any work (unknown arm or
  override key, an arm overwriting an explicit setting, an out-of-range value)."""
  arms = parse_list(config.arms)
  seeds = parse_list(config.seeds, int) or [config.seed]
  check_explicit_overrides(config, arms, explicit)
  jobs = []
  for seed in seeds:
    for arm in arms:
      c = arm_config(config, arm, seed)
      try:
        validate(c)
      except ValueError as e:
        raise ValueError(f'Arm {arm!r} (seed {seed}): {e}') from None
      jobs.append((arm, seed, c))
  return jobs


def run(config, explicit: frozenset[str] = frozenset()) -> str:
  """Runs the experiment the config describes; returns the run (or study) directory.

  explicit: dotted config paths the user set on the command line; an arm that would overwrite
  one is an error (arms.check_explicit_overrides).
  """
  validate(config)
  run_dir = config.run_dir or os.path.join('runs', config.name)
  task = build_task(config.task)
  if config.alpharl.enabled:
    return run_alpharl_mode(config, run_dir, task, explicit)
  t0 = time.time()
  if not config.arms:
    if not config.resume:
      trainer.check_fresh_run_dir(run_dir)
    run_single(config, run_dir, task)
    if config.report and jax.process_index() == 0:
      print(f'Report: {report.write_report(run_dir, title=config.name)}')
    return run_dir
  jobs = study_jobs(config, explicit)
  if not config.resume:   # before any pretraining or training: a study stopped at its second arm loses hours
    for arm, seed, _ in jobs:
      trainer.check_fresh_run_dir(os.path.join(run_dir, arm, f'seed{seed}'))
  arms = list(dict.fromkeys(arm for arm, _, _ in jobs))
  seeds = list(dict.fromkeys(seed for _, seed, _ in jobs))
  bases = {}
  if config.model.source == 'pretrain':
    # Only the bases the runs use: one per study, or one per seed with study.vary_base.
    for arm, seed, c in jobs:
      key = pretrain.cache_key(c)
      if key not in bases:
        t_base = time.time()
        path = pretrain.pretrained_base(c, task)
        with open(os.path.join(path, 'pretrain.json')) as f:
          bases[key] = dict(json.load(f), path=path, seconds_this_run=time.time() - t_base,
                            pretrain_seed=c.pretrain.seed, seeds=[])
      bases[key]['seeds'] = sorted(set(bases[key]['seeds']) | {seed})
  timings = {}
  for arm, seed, c in jobs:
    t_arm = time.time()
    print(f'== arm {arm}, seed {seed}')
    run_single(c, os.path.join(run_dir, arm, f'seed{seed}'), task)
    # On resume a finished run takes seconds here; its cost is what its record says.
    timings[f'{arm}/seed{seed}'] = run_seconds(os.path.join(run_dir, arm, f'seed{seed}')) or time.time() - t_arm
  timings['this_invocation'] = time.time() - t0
  # The study's cost: every run's recorded time, plus pretraining where this invocation did it
  # (a base found in the cache is reported as such, with the time it once took).
  timings['total'] = (sum(v for k, v in timings.items() if '/' in k) +
                      sum(b['seconds_this_run'] for b in bases.values()))
  if jax.process_index() == 0:
    base_list = list(bases.values())
    with open(os.path.join(run_dir, 'study.json'), 'w') as f:
      json.dump({'arms': arms, 'seeds': seeds, 'config': json.loads(config.to_json_best_effort()),
                 'base': base_list[0] if len(base_list) == 1 else {}, 'bases': base_list,
                 'base_varies_with_seed': bool(config.study.vary_base), 'timings': timings}, f, indent=1)
  if config.report and jax.process_index() == 0:
    print(f'Report: {report.write_report(run_dir, title=config.name)}')
  return run_dir


def run_alpharl_mode(config, run_dir: str, task, explicit: frozenset[str] = frozenset()) -> str:
  """AlphaRL (config.alpharl.enabled) for the single run or every arm x seed; returns <run_dir>/alpharl.

  Output: a single run in <run_dir>/alpharl/, a study's runs in <run_dir>/alpharl/<arm>/seed<k>/ with
  <run_dir>/alpharl/alpharl.md collecting their sections; the normal runs' files are never touched.
  Every arm's settings and reference run are checked before any training starts.
  """
  out_dir = os.path.join(run_dir, alpharl_report.SUBDIR)
  if not config.arms:
    c = copy.deepcopy(config)
    with c.unlocked():
      c.alpharl.reference_run = alpharl.resolve_reference(config.alpharl.reference_run, None, config.seed)
    jobs = [(None, c, out_dir)]
  else:
    jobs = []
    for arm, seed, c in study_jobs(config, explicit):
      with c.unlocked():
        c.alpharl.reference_run = alpharl.resolve_reference(config.alpharl.reference_run, arm, seed)
      jobs.append((f'{arm}/seed{seed}', c, os.path.join(out_dir, arm, f'seed{seed}')))
  for label, c, d in jobs:
    try:
      alpharl.prepare(c, d)
    except (ValueError, FileNotFoundError) as e:
      raise type(e)(f'AlphaRL{" for arm " + label if label else ""}: {e}') from None
  sections, results = [], []
  for label, c, d in jobs:
    if label:
      print(f'== AlphaRL, arm {label}')
    result = alpharl.run_alpharl(c, d, task)
    if label:
      results.append((label, result))
      rel = os.path.relpath(os.path.join(d, alpharl_report.PNG_NAME), out_dir)
      sections.append(alpharl_report.markdown_section(result, image=rel, heading_level=3, title=f'AlphaRL: {label}'))
  if sections and jax.process_index() == 0:
    across = alpharl_report.seeds_section(results)   # verdict per arm and variant, share +- s.e. over seeds
    with open(os.path.join(out_dir, alpharl_report.MD_NAME), 'w') as f:
      f.write(f'## AlphaRL: {config.name}\n\n' + (across + '\n' if across else '') + '\n'.join(sections) + '\n')
  if jax.process_index() == 0:
    print(f'AlphaRL report: {os.path.join(out_dir, alpharl_report.MD_NAME)}')
  return out_dir
