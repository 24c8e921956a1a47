"""Checkpoints of a run with orbax's CheckpointManager.

Each step directory holds three items, kept separate so that analysis code can
restore the parameters without knowing the optimizer's structure:

    <run_dir>/checkpoints/<step>/params     the {'backbone','head'} tree
    <run_dir>/checkpoints/<step>/train      optimizer state, PRNG key, critic, ... (structure depends on the stage)
    <run_dir>/checkpoints/<step>/meta       JSON: step, stage, data position, model config, anything else

Restoring takes abstract targets (jax.ShapeDtypeStruct with a sharding, or
arrays), so a checkpoint written under one mesh restores under another.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cfrl_jax.models import qwen

CHECKPOINT_SUBDIR = 'checkpoints'


def checkpoint_dir(run_dir: str) -> str:
  return os.path.join(os.path.abspath(run_dir), CHECKPOINT_SUBDIR)


class Checkpointer:
  """Saves and restores (params, train_state, meta) at integer steps.

  max_to_keep=None keeps every checkpoint (what the rank-1 analysis wants);
  `keep_period` additionally protects every k-th step from deletion.
  """

  def __init__(self, run_dir: str, *, max_to_keep: int | None = None, keep_period: int | None = None,
               async_save: bool = False):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f'max_to_keep={max_to_keep} would delete every checkpoint; use None to keep all.')
    self.directory = checkpoint_dir(run_dir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('params', 'train', 'meta'))

  def save(self, step: int, params, train_state, meta: dict[str, Any], *, force: bool = True) -> None:
    meta = dict(meta, step=int(step))
    self._manager.save(int(step), args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        train=ocp.args.StandardSave(train_state),
        meta=ocp.args.JsonSave(_jsonable(meta))), force=force)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_meta(self, step: int) -> dict[str, Any]:
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out['meta'])

  def restore(self, step: int, abstract_params, abstract_train_state):
    """Returns (params, train_state, meta); targets give structure, dtype and sharding."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        train=ocp.args.StandardRestore(abstract_train_state),
        meta=ocp.args.JsonRestore()))
    return (_like(abstract_params, out['params']), _like(abstract_train_state, out['train']),
            dict(out['meta']))

  def close(self) -> None:
    self._manager.wait_until_finished()
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
  """The parameter tree saved at `step`, as host numpy arrays (no optimizer needed)."""
  path = os.path.join(checkpoint_dir(run_dir), str(step), 'params')
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'No checkpoint at step {step} under {checkpoint_dir(run_dir)}; '
        f'available steps: {available_steps(run_dir)}.')
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
  """A checkpoint's JSON metadata (stage, stage_start, model_config, ...); {} when it has none."""
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
  with open(_meta_path(run_dir, step)) as f:
    meta = json.load(f)
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
