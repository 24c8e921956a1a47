"""Scale-out on JAX's own machinery: a device mesh, regex partition rules, sharded jit.

Nothing here moves data by hand. Arrays carry `NamedSharding`s over one `jax.sharding.Mesh` spanning
every device of every process, and `jax.jit(in_shardings=..., out_shardings=...)` lets XLA's SPMD
partitioner insert the collectives. This module sits at the bottom of the package (it imports only
jax, flax and numpy), so the model can call `constrain_logical` on its activations. How several processes start
is cfrl_jax/distributed.py; the sharded sampler is `sampling.sample(..., mesh=...)`, the sharded
learner step `train.placement.sharded_update`.

Mesh axes (`config.mesh.shape`, -1 = the devices left over):

    data    batch split, parameters replicated (pure data parallelism)
    fsdp    batch split AND parameters / optimizer state split (ZeRO-3: XLA all-gathers each
            weight when a layer needs it and reduce-scatters its gradient)
    tensor  Megatron-style split of attention heads, MLP columns and the vocabulary

Logical axes: the model names every dimension of its parameters and of its residual stream
(cfrl_jax/models/qwen.py: `nn.with_logical_partitioning`, `qwen.param_axes()`), and LOGICAL_RULES
below map those names to mesh axes, the maxtext / big_vision way: 'embed' (the model dimension d of a
weight matrix) over fsdp, 'vocab' / 'heads' / 'kv_heads' / 'mlp' over tensor, the rest replicated.
`config.mesh.logical_rules` go before them (the first rule naming a logical axis wins).

Partition rules are an ordered list of (regex, spec): the regex is `re.search`ed in the '/'-joined
path of a leaf ('backbone/layers/q_proj/kernel'), the first match wins, and spec has one entry per
leading dimension: None (replicated), a mesh axis name, or a tuple of axis names (the dimension is
split over their product). Missing trailing entries mean replicated. The default rules are
generated from the logical ones (`logical_partition_rules`: one exact-path rule per parameter, then
replicate everything else: value heads, scalars); a user's `config.mesh.rules` go before them and
so override them. A dimension that its axes do not divide keeps the longest prefix of those axes
that does (often none: replicated) and a warning says so; it is never an error. The stacked layer
axis L of `backbone/layers/*` is scanned and is never sharded (a rule that tries is an error).

Typical use (what the trainer does):

    mesh = make_mesh((1, -1, 1))
    rules = MeshConfig().all_rules(qwen.param_axes())   # regex rules generated from LOGICAL_RULES
    specs = partition_specs(params, rules, mesh)
    params = shard(params, mesh, specs)
    opt_state, opt_specs = init_opt_state(tx, params, mesh, specs)
    update = placement.sharded_update(learner.make_update(cfg, loss_fn, tx, stage), mesh, specs, opt_specs)
    result = update(params, opt_state, host_batch, lrs)     # host numpy batch is split over (data, fsdp)

Multi-host: every process calls `distributed.initialize_distributed()` first (before anything
touches a device), builds the same mesh and feeds the same host data (global mode) or its own rows
(per-host mode: `process_block` says which rows, `shard_batch(..., process_local=True)` and
`sampling.sample(..., mesh=mesh, process_local=True)` take them, `local_rows` and `gather_rows`
bring results back).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')       # the leading (row) axis of batches and activations
DEFAULT_MESH_SHAPE = (1, -1, 1)     # all devices on fsdp: ZeRO-3 data parallelism, the safe default

# Logical axis name -> mesh axes (None: replicated), in priority order; flax's semantics
# (nn.logical_to_mesh_axes): a dimension takes the first rule naming it whose mesh axes the array's
# other dimensions do not already use. These give the specs of the earlier hand-written regex table:
# column-parallel q/k/v/gate/up kernels (None, 'fsdp', 'tensor'), row-parallel o/down kernels
# (None, 'tensor', 'fsdp'), q/k/v biases (None, 'tensor'), embedding and head ('tensor', 'fsdp').
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters (qwen.param_axes())
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),        # the model dimension d of a weight matrix: ZeRO-3 over fsdp
    ('heads', 'tensor'),      # query head features (Megatron column / row split)
    ('kv_heads', 'tensor'),   # key / value head features
    ('mlp', 'tensor'),        # MLP columns
    ('layers', None),         # the stacked layer axis: scanned, never sharded
    ('norm', None),           # norm scales and the o_proj bias: small vectors, replicated
    ('head_dim', None),       # q / k norm scales
    # activations (constrain_logical)
    ('batch', BATCH_AXES),
    ('length', None),
    ('act_embed', None),
)
# The logical names of a (B, T, d) activation: the model's residual stream.
ACTIVATION_AXES = ('batch', 'length', 'act_embed')
REPLICATE_REST: tuple[tuple[str, tuple], ...] = ((r'.*', ()),)


# --- the mesh ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape and extra rules, as in `config.mesh`: regex `rules` go before the generated ones,
  `logical_rules` before LOGICAL_RULES."""
  shape: tuple[int, ...] = DEFAULT_MESH_SHAPE
  axes: tuple[str, ...] = AXES
  rules: tuple[tuple[str, tuple], ...] = ()
  logical_rules: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, 'rules', normalize_rules(self.rules))
    object.__setattr__(self, 'logical_rules', normalize_logical_rules(self.logical_rules))
    activations = sorted({name for name, _ in self.logical_rules} & set(ACTIVATION_AXES))
    if activations:
      raise ValueError(f'config.mesh.logical_rules names activation axes {activations}; these rules map '
                       'parameter axes only (activations are split like the input batch, over '
                       f'{BATCH_AXES}). Remove them.')

  @classmethod
  def from_config(cls, mesh_config) -> 'MeshConfig':
    """From the ml_collections `config.mesh` (shape, rules, logical_rules); lists from the command
    line become tuples."""
    return cls(shape=tuple(int(s) for s in mesh_config.shape), rules=mesh_config.rules,
               logical_rules=mesh_config.get('logical_rules', ()))

  def all_rules(self, param_axes: Mapping[str, Sequence[str | None]]) -> tuple[tuple[str, tuple], ...]:
    """The regex rules partition_specs applies: the user's, then those generated from the logical
    axes of the model's parameters (param_axes: qwen.param_axes()), then replicate the rest."""
    return self.rules + logical_partition_rules(param_axes, self.logical_rules + LOGICAL_RULES)

  def make_mesh(self, devices: Sequence[Any] | None = None) -> Mesh:
    return make_mesh(self.shape, self.axes, devices)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 by the devices left over; the product must equal num_devices."""
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'mesh shape {shape}: use positive sizes and at most one -1 ("the rest").')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f'mesh shape {shape}: the fixed axes ({known} devices) do not divide the '
                       f'{num_devices} devices; pick sizes whose product divides {num_devices}.')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f'mesh shape {shape} has {math.prod(shape)} devices but {num_devices} are present; '
                     f'make the product {num_devices} or put -1 on one axis (e.g. (1, -1, 1)).')
  return shape


def make_mesh(shape: Sequence[int] = DEFAULT_MESH_SHAPE, axes: Sequence[str] = AXES,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all devices of all processes) with Auto (GSPMD) axes.

  The device order comes from jax.make_mesh (mesh_utils), which follows the physical TPU torus
  and the GPU numbering. Multi-slice TPU (devices with several slice_index values) gets a hybrid
  mesh with the data axis across slices (DCN) and everything else inside a slice (ICI).
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = tuple(axes)
  if len(axes) != len(tuple(shape)):
    raise ValueError(f'mesh shape {tuple(shape)} has {len(tuple(shape))} axes but axes={axes}.')
  if len(set(axes)) != len(axes):
    raise ValueError(f'mesh axes {axes} repeat a name.')
  shape = resolve_mesh_shape(shape, len(devices))
  auto = (AxisType.Auto,) * len(axes)
  slices = sorted({getattr(d, 'slice_index', 0) for d in devices})
  if len(slices) > 1:
    from jax.experimental import mesh_utils
    n, lead = len(slices), axes.index('data') if 'data' in axes else 0
    if shape[lead] % n:
      raise ValueError(f'{n} TPU slices: the {axes[lead]!r} axis ({shape[lead]}) must be a multiple of '
                       f'the slice count so that only it crosses slices.')
    ici = tuple(s // n if i == lead else s for i, s in enumerate(shape))
    dcn = tuple(n if i == lead else 1 for i in range(len(shape)))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, axes, axis_types=auto)
  return jax.make_mesh(shape, axes, axis_types=auto, devices=devices)


def axis_sizes(mesh) -> dict[str, int]:
  """{axis name: size} of a Mesh or AbstractMesh."""
  return dict(mesh.shape)


def batch_shards(mesh) -> int:
  """How many ways the batch (row) axis is split: data * fsdp."""
  sizes = axis_sizes(mesh)
  return math.prod(sizes.get(a, 1) for a in BATCH_AXES)


# --- partition rules ---------------------------------------------------------
def normalize_rules(rules: Iterable) -> tuple[tuple[str, tuple], ...]:
  """((regex, spec), ...) with spec entries None | str | tuple of str (lists, e.g. from a CLI, accepted)."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f'partition rule {rule!r}: expected (regex, spec), e.g. '
                       "('layers/q_proj/kernel$', (None, 'fsdp', 'tensor')).")
    regex, spec = rule
    try:
      re.compile(regex)
    except re.error as e:
      raise ValueError(f'partition rule regex {regex!r} does not compile: {e}.') from None
    entries = []
    for entry in (spec or ()):
      if entry is None or isinstance(entry, str):
        entries.append(entry)
      elif isinstance(entry, (list, tuple)) and all(isinstance(a, str) for a in entry):
        entries.append(tuple(entry))
      else:
        raise ValueError(f'partition rule {regex!r}: spec entry {entry!r} must be None, an axis name '
                         'or a tuple of axis names.')
    out.append((regex, tuple(entries)))
  return tuple(out)


def _mesh_axes_entry(entry, what: str):
  """None | axis name | tuple of axis names (lists accepted), else a ValueError naming `what`."""
  if entry is None or isinstance(entry, str):
    return entry
  if isinstance(entry, (list, tuple)) and all(isinstance(a, str) for a in entry):
    return tuple(entry)
  raise ValueError(f'{what}: {entry!r} must be None, a mesh axis name or a tuple of axis names.')


def normalize_logical_rules(rules: Iterable) -> tuple[tuple[str, Any], ...]:
  """((logical name, mesh axes), ...) with mesh axes None | str | tuple of str."""
  out = []
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f'logical rule {rule!r}: expected (logical axis name, mesh axes), e.g. '
                       "('mlp', 'tensor') or ('embed', ('data', 'fsdp')).")
    out.append((rule[0], _mesh_axes_entry(rule[1], f'logical rule for {rule[0]!r}')))
  return tuple(out)


def logical_partition_rules(param_axes: Mapping[str, Sequence[str | None]],
                            logical_rules=LOGICAL_RULES) -> tuple[tuple[str, tuple], ...]:
  """Regex partition rules from logical axis names: one rule per parameter path, then replicate the rest.

  param_axes: {'backbone/layers/q_proj/kernel': ('layers', 'embed', 'heads'), ...} (qwen.param_axes());
  the rule for a path matches it at the end of a leaf's path (a critic's 'backbone/...' too).
  A logical rule naming an axis that neither a parameter nor an activation has is an error (a typo
  would otherwise leave its dimension replicated without a word).
  """
  logical_rules = normalize_logical_rules(logical_rules)
  known = {n for names in param_axes.values() for n in names if n is not None} | set(ACTIVATION_AXES)
  unknown = sorted({name for name, _ in logical_rules} - known)
  if unknown:
    raise ValueError(f'logical rules name axes {unknown} that the model does not use; its logical axes '
                     f'are {sorted(known)}.')
  rules = tuple((rf'(^|/){re.escape(path)}$', tuple(nn.logical_to_mesh_axes(tuple(names), logical_rules)))
                for path, names in param_axes.items())
  return rules + REPLICATE_REST


def path_str(path) -> str:
  """'backbone/layers/q_proj/kernel' for a jax key path."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator='/')


def _axes_of(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _fit_entry(entry, dim: int, sizes: Mapping[str, int]):
  """The longest prefix of the entry's axes whose product divides dim (None when empty)."""
  axes = _axes_of(entry)
  keep = len(axes)
  while keep and dim % math.prod(sizes[a] for a in axes[:keep]):
    keep -= 1
  kept = axes[:keep]
  fitted = None if not kept else kept[0] if len(kept) == 1 and isinstance(entry, str) else kept
  return fitted, kept != axes


def spec_for(path: str, shape: Sequence[int], rules, mesh) -> PartitionSpec:
  """The PartitionSpec of one leaf: the first matching rule, fitted to divisibility."""
  sizes = axis_sizes(mesh)
  for regex, spec in rules:
    if re.search(regex, path):
      break
  else:
    raise ValueError(f'no partition rule matches {path!r}; end the rules with a catch-all (r".*", ()).')
  spec = tuple(spec)
  if len(spec) > len(shape):
    raise ValueError(f'rule {regex!r} gives {len(spec)} dims {spec} for {path!r} of shape {tuple(shape)}.')
  used = [a for entry in spec for a in _axes_of(entry)]
  unknown = sorted(set(used) - set(sizes))
  if unknown:
    raise ValueError(f'rule {regex!r} for {path!r} names mesh axes {unknown}; the mesh has {tuple(sizes)}.')
  if len(used) != len(set(used)):
    raise ValueError(f'rule {regex!r} for {path!r} uses a mesh axis twice: {spec}.')
  if re.search(r'(^|/)layers/', path) and spec and spec[0] is not None:
    raise ValueError(f'rule {regex!r} shards the stacked layer axis of {path!r}; that axis is scanned '
                     'layer by layer and must stay None.')
  fitted = []
  for i, entry in enumerate(spec):
    new, dropped = _fit_entry(entry, shape[i], sizes)
    if dropped:
      log.warning('partition: %s dim %d (size %d) is not divisible by mesh axes %s; using %s for it.',
                  path, i, shape[i], _axes_of(entry), _axes_of(new) or 'replication')
    fitted.append(new)
  while fitted and fitted[-1] is None:
    fitted.pop()
  return PartitionSpec(*fitted)


def partition_specs(params, rules, mesh=None):
  """Tree of PartitionSpec mirroring `params` (arrays or ShapeDtypeStructs) under regex `rules`
  (MeshConfig.all_rules). mesh: Mesh or AbstractMesh."""
  if mesh is None:
    raise ValueError('partition_specs needs the mesh (its axis sizes decide divisibility).')
  rules = normalize_rules(rules)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: spec_for(path_str(path), np.shape(x), rules, mesh), params)


def drop_axes(specs, axes: Iterable[str]):
  """Specs with the given mesh axes removed (those dimensions replicated over them).

  E.g. drop_axes(specs, ('fsdp',)) for decoding: FSDP re-gathers every weight at every generated
  token, so when the weights fit, sampling with fsdp-replicated weights (resharded once per RL
  step with `shard`) trades memory for far less communication.
  """
  axes = set(axes)

  def one(spec):
    entries = []
    for entry in spec:
      kept = tuple(a for a in _axes_of(entry) if a not in axes)
      entries.append(None if not kept else kept[0] if isinstance(entry, str) else kept)
    return PartitionSpec(*entries)

  return jax.tree.map(one, specs, is_leaf=lambda s: isinstance(s, PartitionSpec))


def named_shardings(mesh: Mesh, specs):
  """PartitionSpec tree -> NamedSharding tree (a single spec gives a single sharding)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, PartitionSpec))


def _put(x, sharding: NamedSharding):
  """x placed with `sharding`; host data on a multi-process mesh: every process passes the same value."""
  if getattr(x, 'sharding', None) == sharding:
    return x
  if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard(tree, mesh: Mesh, specs):
  """device_put of every leaf with NamedSharding(mesh, spec); specs is a tree or a prefix of it."""
  shardings = named_shardings(mesh, specs)
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: _put(x, s), sub), shardings, tree)


def abstract_sharded(tree, mesh: Mesh, specs):
  """ShapeDtypeStructs carrying the NamedShardings: restore targets (Checkpointer) and eval_shape inputs."""
  shardings = named_shardings(mesh, specs)
  return jax.tree.map(
      lambda s, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), sub),
      shardings, tree)


def opt_state_specs(opt_state, params, param_specs):
  """Specs of an optax state: a leaf whose key path ends with a parameter's path and has its shape
  (mu/nu of Adam, under any chain / multi_transform / inject_hyperparams nesting) takes that
  parameter's spec; everything else (counts, hyperparameters) is replicated."""
  by_path = {}
  for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             jax.tree_util.tree_leaves(param_specs, is_leaf=lambda s: isinstance(s, PartitionSpec))):
    by_path[_keys(path)] = (np.shape(x), spec)

  def spec_of(path, leaf):
    keys = _keys(path)
    for k in range(len(keys)):
      hit = by_path.get(keys[k:])
      if hit is not None and hit[0] == np.shape(leaf):
        return hit[1]
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec_of, opt_state)


def _keys(path) -> tuple[str, ...]:
  return tuple(path_str((k,)) for k in path)


def init_opt_state(tx, params, mesh: Mesh, param_specs):
  """(opt_state, opt_specs): tx.init run under jit so the state is born sharded (never whole on one device)."""
  abstract = jax.eval_shape(tx.init, params)
  specs = opt_state_specs(abstract, params, param_specs)
  init = jax.jit(tx.init, in_shardings=(named_shardings(mesh, param_specs),),
                 out_shardings=named_shardings(mesh, specs))
  with jax.sharding.set_mesh(mesh):
    return init(shard(params, mesh, param_specs)), specs


# --- batches and hosts ---------------------------------------------------------
def batch_spec(mesh, rows: int | None = None) -> PartitionSpec:
  """P(('data', 'fsdp')) for the leading axis; with `rows`, fitted to divisibility (warns when it drops axes)."""
  axes = tuple(a for a in BATCH_AXES if a in axis_sizes(mesh))
  if rows is None:
    return PartitionSpec(axes)
  entry, dropped = _fit_entry(axes, rows, axis_sizes(mesh))
  if dropped:
    log.warning('batch of %d rows is not divisible by the %d batch shards %s; splitting over %s.',
                rows, batch_shards(mesh), axes, _axes_of(entry) or 'nothing (replicated)')
  return PartitionSpec(entry)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, *, process_local: bool = False) -> dict:
  """Arrays with their leading (row) axis split over ('data', 'fsdp'); scalars replicated; None dropped.

  Global mode (default): every process passes the same full batch (B, ...). process_local: each
  process passes only its own rows, B / process_count of them, the block process_block(B, mesh)
  of the global batch (the split is batch_spec(mesh, B), which must put each process's devices on
  one such block; process_block says how to fix a mesh or batch size where it does not).
  """
  out = {}
  for name, x in batch.items():
    if x is None:
      continue
    if np.ndim(x) == 0:
      out[name] = _put(x, NamedSharding(mesh, PartitionSpec()))
      continue
    if process_local:
      x = np.asarray(x)
      rows = x.shape[0] * jax.process_count()
      process_block(rows, mesh)   # raises unless this process's devices hold exactly these rows
      sharding = NamedSharding(mesh, batch_spec(mesh, rows))
      out[name] = jax.make_array_from_process_local_data(sharding, x, (rows,) + x.shape[1:])
    else:
      out[name] = _put(x, NamedSharding(mesh, batch_spec(mesh, np.shape(x)[0])))
  return out


def host_rows(global_rows: int, mesh: Mesh) -> slice:
  """The rows of a (global_rows, ...) batch whose shards live on this process's devices.

  For meshes from make_mesh this is process_index * B / P .. (process_index + 1) * B / P, or all rows
  when the batch axis does not cross processes.
  """
  sharding = NamedSharding(mesh, batch_spec(mesh, global_rows))
  starts_stops = sorted({(i[0].start or 0, global_rows if i[0].stop is None else i[0].stop)
                         for i in sharding.addressable_devices_indices_map((global_rows,)).values()})
  start, stop = starts_stops[0][0], starts_stops[-1][1]
  covered = sum(b - a for a, b in starts_stops)
  if covered != stop - start:
    raise ValueError(f'this process owns non-contiguous rows {starts_stops} of the batch; build the mesh '
                     'with make_mesh so that processes own contiguous blocks.')
  return slice(start, stop)


def process_block(global_rows: int, mesh: Mesh) -> slice:
  """The rows of a (global_rows, ...) batch this process loads in per-host mode: host_rows, checked
  to be exactly a 1 / process_count share (so every process loads a disjoint, equal block).

  Raises ValueError when the batch split batch_spec(mesh, global_rows) does not cross processes
  that way (e.g. a batch axis of 1 with tensor parallelism across hosts, or too few rows for the
  batch shards): per-host loading then cannot work and the message says what to change.
  """
  n = jax.process_count()
  if global_rows % n:
    raise ValueError(f'{global_rows} batch rows do not split evenly over {n} processes; make the batch a '
                     f'multiple of {n} or use config.mesh.data_loading="global".')
  rows = host_rows(global_rows, mesh)
  if rows.stop - rows.start != global_rows // n:
    raise ValueError(
        f'per-host data loading needs each of the {n} processes to hold 1/{n} of the batch, but with mesh '
        f'{dict(axis_sizes(mesh))} and {global_rows} rows split as {batch_spec(mesh, global_rows)} this process '
        f'holds rows {rows.start}..{rows.stop}. Put the batch axes (data, fsdp) across the processes and make '
        f'the rows a multiple of data*fsdp={batch_shards(mesh)}, or set config.mesh.data_loading="global".')
  return rows


def local_rows(x) -> np.ndarray:
  """This process's rows of an array whose leading axis is split over processes, as one numpy block
  (the inverse of shard_batch(..., process_local=True)); the whole array when it is addressable here."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  blocks = {}
  for s in x.addressable_shards:   # replicas (e.g. over the tensor axis) share an index: keep one
    rows = s.index[0] if s.index else slice(None)
    start, stop = rows.start or 0, x.shape[0] if rows.stop is None else rows.stop
    if (start, stop) not in blocks:
      blocks[(start, stop)] = np.asarray(s.data)
  spans = sorted(blocks)
  if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
    raise ValueError(f'this process holds non-contiguous rows {spans}; build the mesh with make_mesh so that '
                     'processes own contiguous blocks.')
  return np.concatenate([blocks[k] for k in spans], axis=0)


def gather_rows(tree, mesh: Mesh):
  """Every process's rows, in global row order, on every process: a tree of process-local (b, ...)
  numpy arrays -> (b * process_count, ...) numpy arrays (placed with shard_batch(process_local=True),
  so the order is the batch's, then all-gathered)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  placed = shard_batch({str(i): x for i, x in enumerate(leaves)}, mesh, process_local=True)
  return jax.tree_util.tree_unflatten(treedef, [to_host(placed[str(i)]) for i in range(len(leaves))])


def process_max(n: int) -> int:
  """The largest of an integer over all processes (every process must call it); n itself for one."""
  if jax.process_count() == 1:
    return int(n)
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.int32(n))))


def to_host(tree):
  """numpy copies of every leaf; arrays spread over several processes are all-gathered first."""
  from jax.experimental import multihost_utils

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, tree)


# --- sharded jit ------------------------------------------------------------------
def jit_sharded(fn: Callable, mesh: Mesh, in_specs: Sequence, out_specs, *, donate_argnums=(),
                static_argnames=()) -> Callable:
  """jax.jit(fn) with NamedShardings from spec trees (one per positional argument; a prefix, e.g. a
  single P() for a whole dict, is fine; None = keep the argument's own sharding).

  The returned callable places host / wrongly placed inputs first (so numpy batches and Python
  scalars work on multi-host meshes too) and traces under `jax.sharding.set_mesh(mesh)`, so
  `constrain` calls inside fn see the mesh.
  """
  in_shardings = tuple(None if s is None else named_shardings(mesh, s) for s in in_specs)
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=named_shardings(mesh, out_specs),
                   donate_argnums=donate_argnums, static_argnames=static_argnames)

  def call(*args, **kwargs):
    if len(args) != len(in_shardings):
      raise TypeError(f'{getattr(fn, "__name__", fn)} was sharded for {len(in_shardings)} positional '
                      f'arguments, got {len(args)}.')
    placed = []
    for arg, sharding in zip(args, in_shardings):
      if sharding is None:
        placed.append(arg)
      else:
        placed.append(jax.tree.map(lambda s, sub: jax.tree.map(lambda x: _put(x, s), sub), sharding, arg))
    with jax.sharding.set_mesh(mesh):
      return jitted(*placed, **kwargs)

  call.jitted = jitted
  call.mesh = mesh
  return call



def constrain(x, *spec):
  """with_sharding_constraint(x, P(*spec)) against the mesh of the enclosing `jax.sharding.set_mesh`
  (jit_sharded / sharded_update set it); a no-op without one, for axes the mesh lacks, and for
  dimensions the axes do not divide. For model code, e.g. constrain(h, BATCH_AXES, None, None)
  on (B, T, d) activations."""
  if len(spec) > x.ndim:
    raise ValueError(f'constrain: spec {spec} has more entries than x has dimensions {x.shape}.')
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  sizes = axis_sizes(mesh)
  entries = []
  for i, entry in enumerate(spec):
    axes = tuple(a for a in _axes_of(entry) if a in sizes)
    entries.append(_fit_entry(axes, x.shape[i], sizes)[0] if axes else None)
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*entries))


def constrain_batch(x):
  """Leading axis over ('data', 'fsdp'), the rest replicated: activations (B, T, d), logits (B, T, V)."""
  return constrain(x, BATCH_AXES, *([None] * (x.ndim - 1)))


def constrain_logical(x, names: Sequence[str | None]):
  """`constrain` with the dimensions of x named logically, e.g. ACTIVATION_AXES for (B, T, d).

  The names map to mesh axes by the rules of an enclosing `nn.logical_axis_rules` context, else
  LOGICAL_RULES; like nn.with_logical_constraint, but a no-op for mesh axes the mesh lacks and for
  dimensions they do not divide (`constrain`), where with_sharding_constraint would fail.
  """
  if jax.sharding.get_abstract_mesh().empty:
    return x
  if len(names) != x.ndim:
    raise ValueError(f'constrain_logical: {len(names)} names {tuple(names)} for an array of shape {x.shape}.')
  rules = nn.get_logical_axis_rules() or LOGICAL_RULES
  return constrain(x, *nn.logical_to_mesh_axes(tuple(names), rules))
