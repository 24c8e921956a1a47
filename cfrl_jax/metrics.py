"""The metrics stream of a run: JSONL (the source of truth for reports) plus TensorBoard events.

Every record is {'step': int, 'kind': str, ...floats}; `kind` separates the
trainer's per-step numbers ('train'), evaluations ('eval') and probes ('probe').
Only process 0 writes (multi-host runs call this on every host).

A resumed run keeps metrics.jsonl one history: the trainer cuts it back to the restored
checkpoint's step (`MetricsWriter.truncate_after`), or empties it when there is no checkpoint
(`MetricsWriter.start_fresh`). A run killed mid-write can leave a cut-off last line; readers drop
it with a note. TensorBoard event files are not rewritten: a resumed run's SummaryWriter appends
a new events file, so TensorBoard may show the steps between the checkpoint and the kill twice
(metrics.jsonl is the record; reports read only it).
"""
from __future__ import annotations

import json
import math
import os
import warnings
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
  """Appends metric records to <run_dir>/metrics.jsonl and TensorBoard event files.

  On resume the trainer calls truncate_after / start_fresh first, so metrics.jsonl holds one
  history. TensorBoard: tensorboardX opens a new events file per writer, so a resumed run adds one
  beside the old; steps logged after the checkpoint and before the kill then appear in both (the
  newer file's values are the surviving history's). Delete <run_dir>/tb to see one history there.
  """

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
    """Drops records past `step` (a resumed run rewrites them, so the stream stays one history).

    Records AT `step` stay: the trainer writes every record of a step before saving that step's
    checkpoint, and a run resumed from it starts with step + 1. A cut-off last line is dropped.
    """
    if not (self.enabled and os.path.exists(self.path)):
      return
    records, partial = _read_records(self.path)
    kept = [r for r in records if r['step'] <= step]
    notes = []
    if partial is not None:
      notes.append(f'dropped the cut-off last line {partial} (a kill mid-write)')
    if len(kept) < len(records):
      notes.append(f'dropped {len(records) - len(kept)} record(s) past step {step}')
    if notes:
      print(f'Resuming at step {step}: {self.path}: {"; ".join(notes)}.')
    self._rewrite(kept)

  def start_fresh(self) -> None:
    """Empties the stream: a resumed run that found no checkpoint starts over from step 0."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    if os.path.getsize(self.path):
      print(f'Resuming found no checkpoint: the run starts at step 0, so {self.path} starts afresh '
            '(its records were of steps that will be run again).')
    self._rewrite([])

  def _rewrite(self, records: list[dict[str, Any]]) -> None:
    # Written beside the file and renamed over it: a kill during the rewrite leaves the old stream.
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      for r in records:
        f.write(json.dumps(r, allow_nan=True) + '\n')
    os.replace(tmp, self.path)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _read_records(path: str) -> tuple[list[dict[str, Any]], int | None]:
  """(records, line number of a cut-off last line or None). A malformed line elsewhere raises.

  A cut-off last line is one without its newline that does not parse: what a kill (or a full disk)
  during a write leaves. A complete line that does not parse is corruption, not a cut, and is an error.
  """
  with open(path) as f:
    text = f.read()
  lines = text.split('\n')   # the last item is '' when the file ends with a newline
  out, partial = [], None
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        partial = i + 1
        continue
      raise ValueError(f'{path}:{i + 1}: malformed metrics line ({e}). Only a cut-off last line (a kill '
                       'mid-write) is skipped; fix or delete this line.') from e
    out.append(rec)
  return out, partial


def read_metrics(path: str, kind: str | None = None) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl (a run dir or the file), optionally of one kind, in file order.

  A cut-off last line (no newline, not JSON: a kill mid-write) is dropped with a warning.
  """
  if os.path.isdir(path):
    path = os.path.join(path, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'No metrics file at {path}.')
  records, partial = _read_records(path)
  if partial is not None:
    warnings.warn(f'{path}:{partial}: dropped a cut-off last line (the run was killed while writing it).',
                  stacklevel=2)
  return [r for r in records if kind is None or (isinstance(r, dict) and r.get('kind') == kind)]


def dedupe(records: Iterable[Any]) -> list[Any]:
  """One record per (step, kind), the last one written, in the order of those last records.

  Streams written before resume truncated them can hold a step twice (a resumed run re-logged it);
  the later record is the one the surviving history continued from. Records without an integer
  step and a string kind pass through, for the caller's validation to name.
  """
  records = list(records)
  last: dict[tuple[int, str], int] = {}
  for i, r in enumerate(records):
    key = _key(r)
    if key is not None:
      last[key] = i
  return [r for i, r in enumerate(records) if _key(r) is None or last[_key(r)] == i]


def _key(r: Any) -> tuple[int, str] | None:
  if not isinstance(r, dict):
    return None
  step, kind = r.get('step'), r.get('kind')
  if isinstance(step, bool) or not isinstance(step, (int, float)) or not isinstance(kind, str):
    return None
  if isinstance(step, float) and not step.is_integer():
    return None
  return int(step), kind


def series(records: Iterable[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metric over records that have it."""
  pts = [(r['step'], r[key]) for r in records if key in r and r[key] is not None]
  if not pts:
    return np.zeros(0), np.zeros(0)
  s, v = zip(*pts)
  return np.asarray(s), np.asarray(v, dtype=float)
