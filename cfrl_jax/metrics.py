"""The metrics stream of a run: JSONL (the source of truth for reports) plus TensorBoard events.

Every record is {'step': int, 'kind': str, ...floats}; `kind` separates the
trainer's per-step numbers ('train'), evaluations ('eval') and probes ('probe').
Only process 0 writes (multi-host runs call this on every host).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import jax
import numpy as np


def _to_float(v: Any):
  if isinstance(v, (str, bool)) or v is None:
    return v
  arr = np.asarray(v)
  if arr.size != 1:
    return None
  return float(arr.reshape(()))


class MetricsWriter:
  """Appends metric records to <run_dir>/metrics.jsonl and TensorBoard event files."""

  def __init__(self, run_dir: str, *, tensorboard: bool = True, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(run_dir, 'metrics.jsonl')
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(run_dir, exist_ok=True)
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: optional at analysis time
      self._tb = SummaryWriter(os.path.join(run_dir, 'tb'))

  def write(self, step: int, kind: str, values: dict[str, Any]) -> dict[str, Any]:
    record = {'step': int(step), 'kind': kind}
    for k, v in values.items():
      f = _to_float(v)
      if f is not None:
        record[k] = f
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record, allow_nan=True) + '\n')
      if self._tb is not None:
        for k, v in record.items():
          if isinstance(v, float) and math.isfinite(v):
            self._tb.add_scalar(f'{kind}/{k}', v, step)
    return record

  def truncate_after(self, step: int) -> None:
    """Drops records past `step` (a resumed run rewrites them, so the stream stays one history)."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    kept = [r for r in read_metrics(self.path) if r['step'] <= step]
    with open(self.path, 'w') as f:
      for r in kept:
        f.write(json.dumps(r, allow_nan=True) + '\n')

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str, kind: str | None = None) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl (a run dir or the file), optionally of one kind."""
  if os.path.isdir(path):
    path = os.path.join(path, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'No metrics file at {path}.')
  out = []
  with open(path) as f:
    for i, line in enumerate(f):
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{i + 1}: malformed metrics line ({e}).') from e
      if kind is None or rec.get('kind') == kind:
        out.append(rec)
  return out


def series(records: Iterable[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metric over records that have it."""
  pts = [(r['step'], r[key]) for r in records if key in r and r[key] is not None]
  if not pts:
    return np.zeros(0), np.zeros(0)
  s, v = zip(*pts)
  return np.asarray(s), np.asarray(v, dtype=float)
