"""Checkpoints of a run with orbax's CheckpointManager, each verified by checksums on restore.

Each step directory holds three items, kept separate so that analysis code can
restore the parameters without knowing the optimizer's structure:

    <run_dir>/checkpoints/<step>/params     the {'backbone','head'} tree
    <run_dir>/checkpoints/<step>/train      optimizer state, PRNG key, critic, ... (structure depends on the stage)
    <run_dir>/checkpoints/<step>/meta       JSON: step, stage, data position, model config, anything else
    <run_dir>/checkpoints/<step>/cfrl_checksums.json   size + sha256 of every file of the three items

Restoring takes abstract targets (jax.ShapeDtypeStruct with a sharding, or
arrays), so a checkpoint written under one mesh restores under another.

Integrity. orbax commits a step atomically (it writes `<step>.orbax-checkpoint-tmp-*` and renames it),
so a kill during a save leaves no half-written step; it does not notice files damaged afterwards (a
flipped byte restores as a wrong weight, a cut-off file as a long tensorstore traceback). So once
orbax has committed a step (after the save returns, or, with async saves, at the next save, wait()
or close()), the checksums of every file under its items are written to cfrl_checksums.json (to a
temporary name, fsynced, then renamed). Every restore (Checkpointer.restore, restore_meta,
restore_params) first checks the files it will read against them: a missing file, another size or
another sha256 is a CheckpointError naming the step, the file and what to do. Resuming
(Checkpointer.resume_step) takes the newest step that passes; newer steps that fail are moved to
<run_dir>/checkpoints.corrupt/<step> (so the resumed run can write those steps again) with a
warning naming each; if no step passes, it stops with one CheckpointError. A step without
cfrl_checksums.json (written before checksums were recorded, or killed between orbax's commit and
the checksum file) restores unverified, with one warning per checkpoint directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cfrl_jax.models import qwen

CHECKPOINT_SUBDIR = 'checkpoints'
CORRUPT_SUBDIR = 'checkpoints.corrupt'
CHECKSUM_FILE = 'cfrl_checksums.json'
ITEMS = ('params', 'train', 'meta')


def checkpoint_dir(run_dir: str) -> str:
  return os.path.join(os.path.abspath(run_dir), CHECKPOINT_SUBDIR)


class CheckpointError(ValueError):
  """A checkpoint whose files do not match what was written (or none usable); names step and file."""

  def __init__(self, message: str, step: int | None = None, path: str | None = None,
               detail: str | None = None):
    super().__init__(message)
    self.step, self.path = step, path
    self.detail = detail or message   # the problem alone, without the advice


class CheckpointWarning(UserWarning):
  """A damaged checkpoint skipped on resume, or a checkpoint restored without checksums to verify."""


# --- checksums ------------------------------------------------------------------
def _item_files(step_dir: str, item: str) -> list[str]:
  """Paths relative to step_dir of every file under step_dir/item, sorted."""
  out = []
  for root, _, files in os.walk(os.path.join(step_dir, item)):
    out += [os.path.relpath(os.path.join(root, f), step_dir) for f in files]
  return sorted(out)


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def write_checksums(step_dir: str) -> None:
  """Records size and sha256 of every file of every item under a committed step directory.

  The record lands atomically (temporary name, fsync, rename), so it is complete or absent.
  """
  record = {'algorithm': 'sha256', 'items': {
      item: {rel: {'size': os.path.getsize(os.path.join(step_dir, rel)),
                   'sha256': _sha256(os.path.join(step_dir, rel))}
             for rel in _item_files(step_dir, item)}
      for item in ITEMS if os.path.isdir(os.path.join(step_dir, item))}}
  final = os.path.join(step_dir, CHECKSUM_FILE)
  tmp = final + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, final)
  fd = os.open(step_dir, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def verify_step(step_dir: str, step: int, items=ITEMS) -> bool:
  """Checks the files of `items` against the step's recorded checksums.

  Returns True when they all match, False when the step has no checksum file (unverifiable); raises
  CheckpointError naming the step and the first file that is missing, of another size, or changed.
  """
  record_path = os.path.join(step_dir, CHECKSUM_FILE)
  if not os.path.isdir(step_dir):
    raise CheckpointError(f'Checkpoint step {step}: {step_dir} does not exist.', step, step_dir)
  if not os.path.exists(record_path):
    return False
  try:
    with open(record_path) as f:
      recorded = json.load(f)['items']
  except (OSError, ValueError, KeyError, TypeError) as e:
    detail = f'step {step}: its checksum file {record_path} is unreadable ({type(e).__name__}: {e})'
    raise CheckpointError(f'Checkpoint {detail}, so none of its files can be trusted: restore another '
                          'step.', step, record_path, detail) from None
  for item in items:
    if item not in recorded:
      detail = f'step {step}: {record_path} records no item {item!r}'
      raise CheckpointError(f'Checkpoint {detail}; the checksum file is damaged: restore another step.',
                            step, record_path, detail)
    for rel, want in recorded[item].items():
      path = os.path.join(step_dir, rel)
      if not os.path.exists(path):
        problem = 'is missing'
      elif os.path.getsize(path) != want['size']:
        problem = f'has {os.path.getsize(path)} bytes where {want["size"]} were written (cut short or overwritten)'
      elif _sha256(path) != want['sha256']:
        problem = f'has other contents than were written (sha256 {_sha256(path)[:16]}..., written {want["sha256"][:16]}...)'
      else:
        continue
      detail = f'step {step}: {path} {problem}'
      raise CheckpointError(f'Checkpoint step {step} is damaged: {path} {problem}. Its data cannot be '
                            'trusted: restore another step, or put back a good copy of that file.',
                            step, path, detail)
  return True


_UNVERIFIED_WARNED: set[str] = set()


def _warn_unverified(step_dir: str, step: int) -> None:
  directory = os.path.dirname(step_dir)
  if directory in _UNVERIFIED_WARNED:
    return
  _UNVERIFIED_WARNED.add(directory)
  warnings.warn(
      f'Checkpoint step {step} under {directory} has no {CHECKSUM_FILE}: it was written before cfrl_jax '
      'recorded checksums (or the save was killed just after orbax committed it), so it restores '
      'unverified; a damaged file would go unnoticed. (Said once per checkpoint directory.)',
      CheckpointWarning, stacklevel=3)


def _check(step_dir: str, step: int, items=ITEMS) -> bool:
  """verify_step that warns (once per directory) where there is nothing to verify against."""
  verified = verify_step(step_dir, step, items)
  if not verified:
    _warn_unverified(step_dir, step)
  return verified


def _restore_failed(step: int, step_dir: str, verified: bool, e: Exception) -> Exception:
  first = (str(e).strip().splitlines() or [''])[0][:300]
  if verified:
    return ValueError(
        f'Could not restore checkpoint step {step} from {step_dir} ({type(e).__name__}: {first}). Its '
        'files match their checksums, so the checkpoint is intact: the model or optimizer config differs '
        'from the run that wrote it; restore with that config.')
  return CheckpointError(
      f'Could not restore checkpoint step {step} from {step_dir} ({type(e).__name__}: {first}). It has no '
      'checksums, so either a file is damaged or the config differs from the run that wrote it; '
      'restore an earlier step, or with the config that wrote it.', step, step_dir)


class Checkpointer:
  """Saves and restores (params, train_state, meta) at integer steps, with checksums (module docstring).

  max_to_keep=None keeps every checkpoint (what the rank-1 analysis wants);
  `keep_period` additionally protects every k-th step from deletion.
  """

  def __init__(self, run_dir: str, *, max_to_keep: int | None = None, keep_period: int | None = None,
               async_save: bool = False):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f'max_to_keep={max_to_keep} would delete every checkpoint; use None to keep all.')
    self.run_dir = os.path.abspath(run_dir)
    self.directory = checkpoint_dir(run_dir)
    self._async = async_save
    self._unhashed: list[int] = []   # saved steps whose checksums are not written yet
    self._verified: dict[int, bool] = {}   # step -> verified (True) or unverifiable (False), all items
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=ITEMS)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def save(self, step: int, params, train_state, meta: dict[str, Any], *, force: bool = True) -> None:
    self._write_checksums()
    meta = dict(meta, step=int(step))
    self._manager.save(int(step), args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        train=ocp.args.StandardSave(train_state),
        meta=ocp.args.JsonSave(_jsonable(meta))), force=force)
    self._unhashed.append(int(step))
    self._verified.pop(int(step), None)
    if not self._async:
      self._write_checksums()

  def _write_checksums(self) -> None:
    """Checksums of the steps saved since the last call, once orbax has committed them."""
    if not self._unhashed:
      return
    self._manager.wait_until_finished()
    for step in self._unhashed:
      # max_to_keep may already have deleted it; with several processes, the first one writes.
      if os.path.isdir(self.step_dir(step)) and jax.process_index() == 0:
        write_checksums(self.step_dir(step))
    self._unhashed.clear()

  def wait(self) -> None:
    self._manager.wait_until_finished()
    self._write_checksums()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def verify(self, step: int) -> bool:
    """verify_step for every item (cached); True verified, False no checksums, else CheckpointError."""
    if step not in self._verified:
      self._verified[step] = _check(self.step_dir(step), step)
    return self._verified[step]

  def resume_step(self) -> int | None:
    """The newest step whose files pass their checksums; None when there is no checkpoint at all.

    Newer steps that fail are moved to <run_dir>/checkpoints.corrupt/ with a CheckpointWarning naming
    each and the step resumed from instead. If every step fails, a CheckpointError says so.
    """
    self._write_checksums()
    damaged: list[CheckpointError] = []
    good = None
    for step in reversed(self.all_steps()):
      try:
        self.verify(step)
      except CheckpointError as e:
        damaged.append(e)
        continue
      good = step
      break
    if damaged and good is None:
      lines = '; '.join(e.detail for e in damaged)
      raise CheckpointError(
          f'Cannot resume from {self.directory}: no checkpoint passes its checksums ({lines}). '
          'The files changed after they were written (a disk or copy problem, or an edit). Put back '
          'good copies of the named files if you have them; otherwise start the run again without '
          f'resume (config.resume=False), into a new run_dir or after deleting {self.directory}.',
          damaged[0].step, damaged[0].path)
    for e in damaged:
      moved = self._quarantine(e.step)
      warnings.warn(f'Checkpoint {e.detail}; moved it to {moved} and resuming from step {good} instead.',
                    CheckpointWarning, stacklevel=2)
    if damaged:
      self._manager.reload()
    return good

  def _quarantine(self, step: int) -> str:
    """Moves a damaged step out of orbax's sight (it would refuse to save that step again)."""
    dest_dir = os.path.join(self.run_dir, CORRUPT_SUBDIR)
    os.makedirs(dest_dir, exist_ok=True)
    dest, k = os.path.join(dest_dir, str(step)), 1
    while os.path.exists(dest):
      dest, k = os.path.join(dest_dir, f'{step}-{k}'), k + 1
    os.rename(self.step_dir(step), dest)
    self._verified.pop(step, None)
    return dest

  def restore_meta(self, step: int) -> dict[str, Any]:
    if step not in self._verified:
      _check(self.step_dir(step), step, items=('meta',))
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out['meta'])

  def restore(self, step: int, abstract_params, abstract_train_state):
    """Returns (params, train_state, meta); targets give structure, dtype and sharding.

    The step's files are checked against its checksums first (CheckpointError if they differ).
    """
    verified = self.verify(step)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params),
          train=ocp.args.StandardRestore(abstract_train_state),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise _restore_failed(step, self.step_dir(step), verified, e) from e
    return (_like(abstract_params, out['params']), _like(abstract_train_state, out['train']),
            dict(out['meta']))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._write_checksums()
    self._manager.close()


def available_steps(run_dir: str) -> list[int]:
  """Steps with a finished checkpoint under run_dir (empty list if none)."""
  directory = checkpoint_dir(run_dir)
  if not os.path.isdir(directory):
    return []
  steps = []
  for name in os.listdir(directory):
    if name.isdigit() and os.path.isdir(os.path.join(directory, name, 'params')):
      steps.append(int(name))
  return sorted(steps)


def restore_params(run_dir: str, step: int):
  """The parameter tree saved at `step`, as host numpy arrays (no optimizer needed).

  The params item's files are checked against the step's checksums first (CheckpointError if not).
  """
  step_dir = os.path.join(checkpoint_dir(run_dir), str(step))
  path = os.path.join(step_dir, 'params')
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'No checkpoint at step {step} under {checkpoint_dir(run_dir)}; '
        f'available steps: {available_steps(run_dir)}.')
  verified = _check(step_dir, step, items=('params',))
  # Reading one item of a CheckpointManager step directly makes orbax warn, once per read, that the
  # step-level metadata file is not in the item's directory; it is where the manager put it.
  absl_logger = logging.getLogger('absl')
  quiet = _DropMessage('Metadata file does not exist')
  absl_logger.addFilter(quiet)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(path)
      tree = getattr(meta, 'item_metadata', None) or getattr(meta, 'tree', None) or meta
      abstract = jax.tree_util.tree_map(
          lambda m: np.zeros(m.shape, m.dtype), tree,
          is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))
      return ckptr.restore(path, abstract)
  except Exception as e:  # pylint: disable=broad-except
    raise _restore_failed(step, step_dir, verified, e) from e
  finally:
    absl_logger.removeFilter(quiet)


class _DropMessage(logging.Filter):
  def __init__(self, text: str):
    super().__init__()
    self.text = text

  def filter(self, record: logging.LogRecord) -> bool:
    return self.text not in record.getMessage()


def _meta_path(run_dir: str, step: int) -> str:
  # Where Checkpointer.save's JSON 'meta' item lands; read without orbax (no manager, no restore args).
  return os.path.join(checkpoint_dir(run_dir), str(step), 'meta', 'metadata')


def read_meta(run_dir: str, step: int) -> dict:
  """A checkpoint's JSON metadata (stage, stage_start, model_config, ...); {} when it has none.

  The meta item is checked against the step's checksums first (CheckpointError if it changed).
  """
  step_dir = os.path.join(checkpoint_dir(run_dir), str(step))
  if os.path.exists(_meta_path(run_dir, step)):
    _check(step_dir, step, items=('meta',))
  try:
    with open(_meta_path(run_dir, step)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def restore_model_config(run_dir: str, step: int | None = None) -> qwen.QwenConfig:
  """The model config recorded in a checkpoint's metadata (latest step by default)."""
  steps = available_steps(run_dir)
  if not steps:
    raise FileNotFoundError(f'No checkpoints under {checkpoint_dir(run_dir)}.')
  step = steps[-1] if step is None else step
  meta = read_meta(run_dir, step)   # verified against the step's checksums
  if 'model_config' not in meta:
    raise CheckpointError(f'Checkpoint step {step} under {checkpoint_dir(run_dir)} records no model_config '
                          f'in {_meta_path(run_dir, step)}; restore another step.', step,
                          _meta_path(run_dir, step))
  return qwen.QwenConfig(**_tuple_fields(meta['model_config']))


def _like(target, restored):
  """`restored` with the target's tree structure (orbax returns NamedTuples, e.g. optax states, as tuples)."""
  leaves = jax.tree_util.tree_leaves(restored)
  treedef = jax.tree_util.tree_structure(target)
  if treedef.num_leaves != len(leaves):
    raise ValueError(f'Checkpoint has {len(leaves)} arrays where {treedef.num_leaves} were expected: '
                     'the optimizer or model configuration differs from the one that wrote it.')
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _tuple_fields(d: dict) -> dict:
  d = dict(d)
  if 'eos_token_id' in d and d['eos_token_id'] is not None:
    d['eos_token_id'] = tuple(d['eos_token_id'])
  return d


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  return x
