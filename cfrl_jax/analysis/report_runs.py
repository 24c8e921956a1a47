"""The runs a report reads: one run or a study (arms x seeds), loaded from their metrics streams.

Layouts read (see cfrl_jax/experiment.py, which writes them):
  single run   <run>/metrics.jsonl (+ <run>/config.json)
  study        <study>/<arm>/seed<k>/metrics.jsonl (+ <study>/study.json, written when the
               study ends; without it the arms and seeds are found on disk, so a report of a
               study still in progress works too). <study>/<arm>/metrics.jsonl counts as one seed.

One record per (kind, step): when a step was logged twice (a resumed run), the last wins.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np

from cfrl_jax import metrics as metrics_lib


SEED_DIR = re.compile(r'^seed(\d+)$')
ARM_LABELS = {
    'grpo': 'GRPO', 'cfgrpo': 'CF-GRPO', 'ppo': 'PPO', 'cfppo': 'CF-PPO', 'rloo': 'RLOO',
    'cfrloo': 'CF-RLOO', 'reinforce': 'REINFORCE', 'expert_iteration': 'Expert Iteration',
}


# Control arms are '<arm>_<variant>' (cfrl_jax.analysis.study_stats.COMPARISONS names them).
VARIANT_LABELS = {'headlr': 'head lr as CF', 'samelr': 'same lr', 'adaptive': 'adaptive switch'}


def arm_label(arm: str) -> str:
  if arm in ARM_LABELS:
    return ARM_LABELS[arm]
  base, _, variant = arm.rpartition('_')
  if base in ARM_LABELS and variant in VARIANT_LABELS:
    return f'{ARM_LABELS[base]} ({VARIANT_LABELS[variant]})'
  return arm


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
           if is_number(r.get(key)) and math.isfinite(r[key])]
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
      out.update(k for k, v in r.items() if k not in ('step', 'kind') and is_number(v))
  return sorted(out)


def is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def config_field(d: dict, dotted: str):
  for part in dotted.split('.'):
    if not isinstance(d, dict) or part not in d:
      return None
    d = d[part]
  return d


def load_run(path: str, arm: str, seed: int | None) -> RunMetrics:
  """Reads and validates one metrics.jsonl (a run dir or the file itself)."""
  file = os.path.join(path, 'metrics.jsonl') if os.path.isdir(path) else path
  by_kind: dict[str, dict[int, dict]] = {}
  for i, rec in enumerate(metrics_lib.dedupe(metrics_lib.read_metrics(file))):
    if not isinstance(rec, dict):
      raise ValueError(f'{file}: record {i + 1} is {type(rec).__name__}, not a JSON object; every line must be '
                       '{"step": int, "kind": str, ...} as written by cfrl_jax.metrics.MetricsWriter.')
    step, kind = rec.get('step'), rec.get('kind')
    if not (is_number(step) and float(step) == int(step)) or not isinstance(kind, str):
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
