"""An experiment: one training run, or a study of arms x seeds from the same base, then a report.

Arms are named variations of the config (cfrl_jax/arms.py). Every arm of a study
starts from the same base weights (one base per study; per seed with
config.study.vary_base) with the same seeds and rollout budget, so runs of one
seed differ only by their arm and are paired by seed.
"""
from __future__ import annotations

import copy
import fcntl
import json
import os
import struct
import time

import jax

from cfrl_jax import alpharl, report
from cfrl_jax.analysis import alpharl_report
from cfrl_jax.arms import arm_config, check_explicit_overrides
from cfrl_jax.config import base_config, parse_list, validate
from cfrl_jax.run_setup import load_policy, make_eval_fn, make_head_share_fn, make_probe_fn, write_run_config
from cfrl_jax.tasks import build_task
from cfrl_jax.train import pretrain, trainer


RUN_TIME_FILE = 'run_time.json'   # a run's wall seconds, summed over every invocation that worked on it


def run_single(config, run_dir: str, task=None, *, progress: bool | None = None) -> trainer.TrainResult:
  t0 = time.time()
  # Read before this invocation adds to the run's files: a run made before run_time.json existed
  # has its time only in them (see run_seconds).
  before = run_seconds(run_dir) if os.path.isdir(run_dir) else None
  try:
    return _run_single(config, run_dir, task, progress)
  finally:   # a killed or failed invocation's time counts too: the run cost it
    if jax.process_index() == 0 and os.path.isdir(run_dir):
      _add_run_time(run_dir, time.time() - t0, earlier=before)


def _add_run_time(run_dir: str, seconds: float, earlier: float | None = None) -> None:
  """Adds one invocation's seconds to the run's record; `earlier` starts a record the run lacks."""
  path = os.path.join(run_dir, RUN_TIME_FILE)
  record = {'seconds': float(earlier or 0.0), 'invocations': 0 if earlier is None else 1}
  if os.path.exists(path):
    with open(path) as f:
      record.update(json.load(f))
  record['seconds'] += seconds
  record['invocations'] += 1
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f)
  os.replace(path + '.tmp', path)


def run_seconds(run_dir: str) -> float | None:
  """Wall seconds a run took: its run_time.json, else (a run made before that record existed) the
  span of the wall times its TensorBoard event files record, summed over files (one per invocation);
  None if neither tells."""
  path = os.path.join(run_dir, RUN_TIME_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return float(json.load(f)['seconds'])
  tb = os.path.join(run_dir, 'tb')
  spans = [_event_span(os.path.join(tb, n)) for n in sorted(os.listdir(tb))
           if n.startswith('events.out.tfevents.')] if os.path.isdir(tb) else []
  spans = [s for s in spans if s is not None]
  return float(sum(spans)) if spans else None


def _event_span(path: str) -> float | None:
  """Last minus first wall time of a TensorBoard event file (TFRecord framing: u64 length, u32 crc,
  an Event proto whose field 1, wall_time, is a double and comes first, u32 crc); None if unreadable."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError:
    return None
  times, i = [], 0
  while i + 12 <= len(data):
    n = struct.unpack('<Q', data[i:i + 8])[0]
    record = data[i + 12:i + 12 + n]
    i += 12 + n + 4
    if len(record) >= 9 and record[0] == 0x09:
      times.append(struct.unpack('<d', record[1:9])[0])
  return max(times) - min(times) if times else None


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
  earlier_study_record(config, run_dir)   # before any work: an incompatible study is an error
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
    record = {'arms': arms, 'seeds': seeds, 'config': json.loads(config.to_json_best_effort()),
              'bases': list(bases.values()), 'base_varies_with_seed': bool(config.study.vary_base),
              'timings': timings}
    write_study_record(config, run_dir, record)
  if config.report and jax.process_index() == 0:
    print(f'Report: {report.write_report(run_dir, title=config.name)}')
  return run_dir


STUDY_FILE = 'study.json'
# Settings that say where and how a study ran, not what it computed: invocations that differ only
# in these (e.g. one process per seed, on several machines) belong to one study.
_PLACE_FIELDS = ('arms', 'seeds', 'resume', 'run_dir', 'compile_cache_dir', 'report', 'log',
                 'pretrain.cache_dir')


def _comparable(config_dict: dict) -> dict:
  out = json.loads(json.dumps(config_dict))
  for field in _PLACE_FIELDS:
    *parents, leaf = field.split('.')
    d = out
    for p in parents:
      d = d.get(p, {})
    d.pop(leaf, None)
  return out


_MISSING = object()


def _differences(a, b, default, prefix: str = '') -> list[str]:
  """Fields whose values differ; a field one side lacks (a record written before it existed) counts
  as its default, which by this project's rule keeps the old behaviour."""
  if a is _MISSING:
    a = default
  if b is _MISSING:
    b = default
  if isinstance(a, dict) and isinstance(b, dict):
    d = default if isinstance(default, dict) else {}
    return [x for k in sorted(set(a) | set(b))
            for x in _differences(a.get(k, _MISSING), b.get(k, _MISSING), d.get(k, _MISSING), f'{prefix}{k}.')]
  return [] if a == b else [f'{prefix[:-1]} ({a!r} there, {b!r} now)']


def earlier_study_record(config, run_dir: str) -> dict | None:
  """The study.json an earlier invocation left in run_dir, if this invocation may join it.

  Invocations of one study (e.g. one per seed, possibly in parallel) each add their arms and seeds;
  one whose config differs in anything but where it ran is refused before any work, since its runs
  would not be comparable."""
  path = os.path.join(run_dir, STUDY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    earlier = json.load(f)
  now = json.loads(config.to_json_best_effort())
  defaults = json.loads(base_config(config.task.name).to_json_best_effort())
  diff = _differences(_comparable(earlier.get('config', {})), _comparable(now), _comparable(defaults))
  if diff:
    raise ValueError(f'{path} belongs to a study with other settings: {"; ".join(diff[:5])}'
                     f'{" ..." if len(diff) > 5 else ""}. Its runs would not be comparable with these: use '
                     'another --config.run_dir, or the settings of that study.')
  return earlier


def write_study_record(config, run_dir: str, record: dict) -> dict:
  """Merges this invocation's record into run_dir/study.json and returns what was written.

  The file is read again here, after the runs, not only at the start: invocations of one study that
  run at the same time (one per seed) all start before any has written it, and a record merged with
  the start-time copy would drop the seeds of every invocation that finished in between. An exclusive
  lock (fcntl.flock on study.json.lock) orders the read-merge-write of processes on one machine; the
  file is replaced atomically, so a reader never sees half a record.
  """
  path = os.path.join(run_dir, STUDY_FILE)
  with open(path + '.lock', 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    earlier = earlier_study_record(config, run_dir)   # checked again: it may have appeared meanwhile
    if earlier is not None:
      record = merge_study_records(earlier, record)
    record['base'] = record['bases'][0] if len(record['bases']) == 1 else {}
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
      json.dump(record, f, indent=1)
    os.replace(tmp, path)
  return record


def merge_study_records(earlier: dict, now: dict) -> dict:
  """One study record from an earlier invocation's and this one's: arms and seeds in first-seen order,
  bases by cache key, each run's time from whichever invocation recorded it last; the total is every
  run's time plus the pretraining any invocation did."""
  out = dict(now)
  out['arms'] = list(dict.fromkeys(list(earlier.get('arms', [])) + list(now['arms'])))
  out['seeds'] = sorted(set(earlier.get('seeds', [])) | set(now['seeds']))
  bases = {}
  for b in list(earlier.get('bases', [])) + list(now['bases']):
    key = b.get('cache_key') or b.get('path')
    kept = bases.get(key)
    if kept is None:
      bases[key] = dict(b)
    else:
      kept['seeds'] = sorted(set(kept.get('seeds', [])) | set(b.get('seeds', [])))
      kept['seconds_this_run'] = max(kept.get('seconds_this_run', 0.0), b.get('seconds_this_run', 0.0))
  out['bases'] = list(bases.values())
  runs = {k: v for k, v in dict(earlier.get('timings', {}), **now['timings']).items() if '/' in k}
  out['timings'] = dict(runs, this_invocation=now['timings'].get('this_invocation'),
                        total=sum(runs.values()) + sum(b.get('seconds_this_run', 0.0) for b in out['bases']))
  return out


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
