"""Where the trainer's arrays live: one device, or a `Mesh` with params sharded by partition rules.

The trainer asks this object for its jitted pieces instead of calling `jax.jit` itself, so the
same loop runs on a laptop and on a pod:

  * one device (`jax.device_count() == 1`): plain `jax.jit`, arrays wherever JAX puts them;
  * several devices: a mesh from `config.mesh` (cfrl_jax/sharding.py), parameters, optimizer
    state, reference policy and critic placed with `NamedSharding`s from the partition rules,
    and every step (learner update, critic update, reference / old-policy log-probs, value
    forward pass, sampler) a `jax.jit` with explicit `in_shardings` / `out_shardings` whose
    batch axis is split over ('data', 'fsdp').

Checkpoints are restored straight into the current mesh's shardings, so a run written on one
mesh resumes on another.

Several processes (multi-host) with `config.mesh.data_loading == 'per_host'`: each process loads,
samples and scores only its block of the batch rows (`rows_of_process`), and the methods below move
rows between that process-local view and the global arrays on the mesh (`to_global`, `own_rows`,
`all_rows`, `take_rows`). With one process, or 'global' loading, every process holds every row.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from cfrl_jax import sampling, sharding
from cfrl_jax.models import qwen
from cfrl_jax.train import learner

_REP = PartitionSpec()
DATA_LOADING = ('per_host', 'global')


class Placement:
  """Sharding decisions for one run. `mesh` is None on a single device (then every method is the
  unsharded equivalent)."""

  def __init__(self, mesh_config, params):
    self.mesh_config = sharding.MeshConfig.from_config(mesh_config)
    n = jax.device_count()
    # Checked on one device too, so a config that cannot run on the pod fails here, not there.
    sharding.resolve_mesh_shape(self.mesh_config.shape, n)
    self.mesh = self.mesh_config.make_mesh() if n > 1 else None
    self.rules = self.mesh_config.all_rules(qwen.param_axes())
    self.param_specs = (sharding.partition_specs(params, self.rules, self.mesh)
                        if self.mesh is not None else None)
    data_loading = mesh_config.get('data_loading', 'per_host')
    if data_loading not in DATA_LOADING:
      raise ValueError(f'config.mesh.data_loading={data_loading!r}; expected one of {DATA_LOADING}.')
    # Per-host loading only means something when the rows are spread over several processes.
    self.per_host = data_loading == 'per_host' and self.sharded and jax.process_count() > 1
    self._take_fns: dict = {}   # compiled row gathers of take_rows, per row count

  @property
  def sharded(self) -> bool:
    return self.mesh is not None

  # -- rows of a batch across processes (per-host loading) -----------------------------
  def rows_of_process(self, global_rows: int) -> slice:
    """The block of a (global_rows, ...) batch that this process loads: all rows unless per_host."""
    if not self.per_host:
      return slice(0, global_rows)
    return sharding.process_block(global_rows, self.mesh)

  def to_global(self, batch: dict) -> dict:
    """Per-host: this process's numpy rows -> global arrays on the mesh (rows split over processes).
    Otherwise the batch as is (the jitted steps place host data themselves)."""
    if not self.per_host:
      return batch
    return sharding.shard_batch(batch, self.mesh, process_local=True)

  def own_rows(self, x) -> np.ndarray:
    """A per-row result of a jitted step as numpy: this process's rows when per_host, else all of them."""
    return sharding.local_rows(x) if self.per_host else sharding.to_host(x)

  def all_rows(self, tree):
    """Per-host: every process's rows of a tree of process-local numpy arrays, in batch order, on
    every process (an all-gather). Otherwise the tree as is (every process has every row)."""
    return sharding.gather_rows(tree, self.mesh) if self.per_host else tree

  def max_over_processes(self, n: int) -> int:
    """An integer all processes agree on (the largest), e.g. the prompt width; n itself unless per_host."""
    return sharding.process_max(n) if self.per_host else int(n)

  def take_rows(self, batch: dict, idx) -> dict:
    """Per-host: rows idx (global indices, the same on every process) of a to_global batch, gathered
    on the devices (XLA moves rows between processes), split over the batch axes again."""
    if not self.per_host:
      raise ValueError('take_rows is for per-host batches of global arrays; index host arrays directly.')
    idx = np.asarray(idx, np.int32)
    if len(idx) not in self._take_fns:
      gather = lambda b, i: jax.tree_util.tree_map(lambda x: jnp.take(x, i, axis=0), b)
      self._take_fns[len(idx)] = sharding.jit_sharded(gather, self.mesh, (None, _REP),
                                                      sharding.batch_spec(self.mesh, len(idx)))
    return self._take_fns[len(idx)](batch, idx)

  # -- trees ---------------------------------------------------------------------
  def specs_of(self, tree):
    """Partition specs of any params-like tree (params, critic) under the rules."""
    return sharding.partition_specs(tree, self.rules, self.mesh)

  def put(self, tree, specs=None):
    """tree placed on the mesh (specs default: the rules); unchanged on one device."""
    if not self.sharded or tree is None:
      return tree
    return sharding.shard(tree, self.mesh, self.specs_of(tree) if specs is None else specs)

  def opt_specs(self, opt_state, params, param_specs=None):
    return sharding.opt_state_specs(opt_state, params, self.param_specs if param_specs is None else param_specs)

  def put_opt_state(self, opt_state, params, param_specs=None):
    """(placed opt_state, its specs); specs None on one device."""
    if not self.sharded:
      return opt_state, None
    specs = self.opt_specs(opt_state, params, param_specs)
    return sharding.shard(opt_state, self.mesh, specs), specs

  def restore_target(self, tree, specs):
    """Abstract arrays for Checkpointer.restore: shapes, dtypes and (on a mesh) the shardings."""
    if not self.sharded:
      return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return sharding.abstract_sharded(tree, self.mesh, specs)

  # -- jitted steps ----------------------------------------------------------------
  def update(self, update_fn, opt_specs) -> Callable:
    """learner.make_update(...) as is, or re-jitted with param / optimizer / batch shardings."""
    if not self.sharded:
      return lambda params, opt_state, batch, lrs: update_fn(
          params, opt_state, {k: jnp.asarray(v) for k, v in batch.items() if v is not None}, lrs)
    return sharded_update(update_fn, self.mesh, self.param_specs, opt_specs)

  def tree_step(self, step: Callable, tree_specs, opt_specs) -> Callable:
    """(tree, opt, batch) -> (tree, opt, metrics), e.g. the critic update; donates tree and opt."""
    if not self.sharded:
      jitted = jax.jit(step, donate_argnums=(0, 1))
      return lambda tree, opt, batch: jitted(tree, opt, {k: jnp.asarray(v) for k, v in batch.items()})
    jitted = {}

    def call(tree, opt, batch):
      batch = {k: v for k, v in batch.items() if v is not None}
      rows = len(next(iter(batch.values())))
      if rows not in jitted:
        bspec = sharding.batch_spec(self.mesh, rows)
        jitted[rows] = sharding.jit_sharded(step, self.mesh, (tree_specs, opt_specs, bspec),
                                            (tree_specs, opt_specs, _REP), donate_argnums=(0, 1))
      return jitted[rows](tree, opt, batch)

    return call

  def forward(self, fn: Callable, tree_specs=None) -> Callable:
    """fn(tree, *batch_arrays) -> per-row arrays, jitted; on a mesh with the rows split over
    ('data', 'fsdp') and `tree` (default: the params) kept as placed."""
    if not self.sharded:
      jitted = jax.jit(fn)
      return lambda tree, *xs: jitted(tree, *(jnp.asarray(x) for x in xs))
    tree_specs = self.param_specs if tree_specs is None else tree_specs
    jitted = {}

    def call(tree, *xs):
      rows = len(xs[0])
      if rows not in jitted:
        bspec = sharding.batch_spec(self.mesh, rows)
        jitted[rows] = sharding.jit_sharded(fn, self.mesh, (tree_specs,) + (bspec,) * len(xs), bspec)
      return jitted[rows](tree, *xs)

    return call

  def sample_fn(self, process_local: bool = False) -> Callable | None:
    """The sampler rollouts use on a mesh (sampling.sample bound to it); None: the default.

    process_local (with per_host): it takes and returns this process's rows only."""
    if not self.sharded:
      return None
    mesh, local = self.mesh, process_local and self.per_host

    def sample(cfg, params, tokens, mask, key, **kw):
      return sampling.sample(cfg, params, tokens, mask, key, mesh=mesh, process_local=local, **kw)

    return sample


def sharded_update(update_fn: Callable, mesh, param_specs, opt_specs, batch_specs=None) -> Callable:
  """The learner step (params, opt_state, batch, lrs) -> learner.UpdateResult, jitted with shardings.

  update_fn: learner.make_update(...) (a jax.jit of the plain step; its __wrapped__ step is
  re-jitted here) or any plain step function with that signature. Params and optimizer state keep
  their specs in and out (donated); the batch is split over ('data', 'fsdp') (batch_specs None:
  placed by shard_batch on every call, so any row count works; or a spec tree / prefix such as
  P(sharding.BATCH_AXES)); lrs and all outputs but the new state are replicated.
  """
  step = getattr(update_fn, '__wrapped__', update_fn)
  rep = PartitionSpec()
  out_specs = learner.UpdateResult(params=param_specs, opt_state=opt_specs, loss=rep, finite=rep, metrics=rep)
  jitted = sharding.jit_sharded(step, mesh, (param_specs, opt_specs, batch_specs, rep), out_specs,
                                donate_argnums=(0, 1))

  def call(params, opt_state, batch, lrs):
    if batch_specs is None:
      batch = sharding.shard_batch(batch, mesh)
    return jitted(params, opt_state, batch, lrs)

  call.jitted = jitted.jitted
  call.mesh = mesh
  return call


def describe(placement: Placement) -> dict[str, Any]:
  """What the run's metadata records about its placement."""
  if not placement.sharded:
    return {'devices': 1, 'mesh': None}
  out = {'devices': placement.mesh.size, 'mesh': dict(placement.mesh.shape), 'processes': jax.process_count()}
  if jax.process_count() > 1:
    out['data_loading'] = 'per_host' if placement.per_host else 'global'
  return out
