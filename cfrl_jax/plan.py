"""Fit before launch: compile a config's training step for a TPU topology (or a simulated CPU mesh)
from abstract inputs only, and report each program's per-device memory, FLOPs and predicted time.

    python -m cfrl_jax.plan --config=configs/qwen_cfrl.py --topology=v5e:4x8
    python -m cfrl_jax.plan --config=configs/qwen_cfrl.py --topology=v4-32 --config.rl.minibatches=8
    python -m cfrl_jax.plan --config=configs/qwen_cfrl.py --topology=cpu:8 --hbm_gib=16

TPU topologies ('v5e:4x8', 'v4:2x2x4', 'v5p:2x4x4', 'v6e:4x4', or slice names 'v5e-32', 'v4-32',
'v5p-64') come from jax.experimental.topologies.get_topology_desc, which needs libtpu (the
`jax[tpu]` install) but no TPU: XLA's TPU compiler runs on this host. v4 and v5p are planned as
JAX runs them, one device per chip (megacore). 'cpu:N' is the fallback without libtpu: N simulated
CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set here before JAX starts its
backend), XLA:CPU's memory figures standing in for the chip of --chip.

What is compiled is what the trainer (cfrl_jax/train/trainer.py) jits, built from the same
functions with the same shardings (cfrl_jax/sharding.py): the sharded sampler
(sampling.decode_loop.sample_padded as sampling.sample(..., mesh=...) calls it on an accelerator: layers scanned,
XLA attention, one decode segment), the old-policy and reference log-prob passes over the whole
rollout batch (completion_stats in row chunks, as Trainer._logp), the learner update of each stage
(learner.make_update through placement.sharded_update; CF-RL stage one has no backbone optimizer
state) on one minibatch, and for PPO the critic's value pass and update. Inputs are
jax.ShapeDtypeStructs carrying NamedShardings: no weights are read and nothing is allocated.

Per program the table gives XLA's memory_analysis (arguments, outputs, temporaries per device),
the trainer's other resident state (parameters, optimizer state, reference policy, critic that
the program does not take but that stay in HBM), their sum against the chip's HBM, FLOPs and HBM
bytes per call counted from the compiled per-device HLO (XLA's cost_analysis counts a loop body
once; here scanned layers count L times and the decode loop its max_new_tokens - 1 steps, an
upper bound), and the predicted time max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth) with
the bound that applies (collectives and host work are not modelled). A program that does not fit
(XLA's TPU compiler refuses it, or its total exceeds --hbm_gib / the chip's HBM) makes the planner
exit with status 2, naming the largest buffers and the config fields that would make it fit.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from cfrl_jax import sampling, sharding
from cfrl_jax.models import presets, qwen
from cfrl_jax.rl import algorithms, ppo
from cfrl_jax.train import learner, objectives, placement, rollout, trainer

GIB = 1024 ** 3
EXIT_DOES_NOT_FIT = 2


# --- chips and topologies ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures (Google Cloud TPU system architecture pages)."""
  name: str
  hbm_gib: float
  bf16_tflops: float
  hbm_gbps: float


CHIPS = {
    'v4': Chip('TPU v4', 32.0, 275.0, 1200.0),
    'v5e': Chip('TPU v5e', 16.0, 197.0, 819.0),
    'v5p': Chip('TPU v5p', 95.0, 459.0, 2765.0),
    'v6e': Chip('TPU v6e', 32.0, 918.0, 1640.0),
}
# v4 and v5p chips hold two TensorCores that JAX drives as one device (megacore); v5e / v6e one.
_CHIP_CONFIG = {'v4': 'megacore', 'v5p': 'megacore', 'v5e': 'default', 'v6e': 'default'}
# Slice names (TensorCores for v4 / v5p, chips for v5e / v6e) -> the topology they are sold as.
_SLICES = {
    'v4': {8: '2x2x1', 16: '2x2x2', 32: '2x2x4', 64: '2x4x4', 128: '4x4x4', 256: '4x4x8'},
    'v5p': {8: '2x2x1', 16: '2x2x2', 32: '2x2x4', 64: '2x4x4', 128: '4x4x4', 256: '4x4x8'},
    'v5e': {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'},
    'v6e': {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'},
}


@dataclasses.dataclass(frozen=True)
class Target:
  name: str            # 'v5e:4x8' or 'cpu:8'
  platform: str        # 'tpu' | 'cpu'
  chip: Chip
  devices: tuple


def parse_topology(spec: str) -> tuple[str, str, str]:
  """(platform, chip key or '', topology) of 'v5e:4x8' / 'v5e-32' / 'cpu:8'."""
  spec = spec.strip().lower()
  m = re.fullmatch(r'cpu:(\d+)', spec)
  if m:
    return 'cpu', '', m.group(1)
  m = re.fullmatch(r'(v4|v5e|v5p|v6e)-(\d+)', spec)
  if m:
    slices = _SLICES[m.group(1)]
    if int(m.group(2)) not in slices:
      raise ValueError(f'--topology={spec}: no known {m.group(1)} slice of {m.group(2)}; known: '
                       f'{sorted(slices)}, or give the topology itself, e.g. {m.group(1)}:{slices[max(slices)]}.')
    return 'tpu', m.group(1), f'{m.group(1)}:{slices[int(m.group(2))]}'
  m = re.fullmatch(r'(v4|v5e|v5p|v6e):(\d+(x\d+)+)', spec)
  if m:
    return 'tpu', m.group(1), spec
  raise ValueError(f'--topology={spec!r}: expected a TPU topology such as v5e:4x8, v4:2x2x4, v5p:2x4x4, '
                   f'v6e:4x4, a slice name such as v5e-32 / v4-32 / v5p-64, or cpu:N (N simulated CPU devices).')


def prepare_cpu_devices(n: int) -> None:
  """Asks for n host devices before JAX starts its CPU backend (a no-op afterwards: see topology)."""
  flag = f'--xla_force_host_platform_device_count={n}'
  others = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
  os.environ['XLA_FLAGS'] = f'{others} {flag}'.strip()


def topology(spec: str, chip: str = 'v5e') -> Target:
  """The devices to compile for. cpu:N uses the constants of `chip`."""
  platform, key, name = parse_topology(spec)
  if platform == 'cpu':
    n = int(name)
    prepare_cpu_devices(n)
    devices = jax.devices('cpu')
    if len(devices) != n:
      raise ValueError(f'--topology=cpu:{n}: JAX started with {len(devices)} CPU devices (its backend was '
                       f'initialised before the planner could ask for {n}); run the planner in a fresh process, '
                       f'or set XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting Python.')
    if chip not in CHIPS:
      raise ValueError(f'--chip={chip!r}; expected one of {sorted(CHIPS)}.')
    return Target(f'cpu:{n}', 'cpu', CHIPS[chip], tuple(devices))
  # Compiling only: several planners may share this host's libtpu (it would otherwise hold a lock file).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    desc = topologies.get_topology_desc(topology_name=name, platform='tpu', chip_config_name=_CHIP_CONFIG[key])
  except Exception as e:   # no libtpu, or a topology libtpu does not know
    raise RuntimeError(
        f'cannot describe TPU topology {name!r}: {str(e).splitlines()[0][:300]}\nCompiling for a TPU needs libtpu '
        '(pip install "jax[tpu]==0.10.2", best in its own virtualenv: it must not be in the default test '
        'environment) but no TPU; without it, plan on a simulated mesh with --topology=cpu:N.') from None
  return Target(name, 'tpu', CHIPS[key], tuple(desc.devices))


# --- the model ---------------------------------------------------------------------------
def model_config(config, vocab_size: int = 0) -> tuple[qwen.QwenConfig, str]:
  """(QwenConfig of the policy the trainer would hold, where its shape came from), without weights.

  source 'pretrained': config.model.path must name a preset (presets.resolve: 'preset:<name>' or a
  hub id of a preset's model); 'init': config.model.arch with vocab_size (default
  config.tokenizer.vocab_size). config.model.tie is applied as hf.load_pretrained / load_policy do.
  """
  m = config.model
  numerics = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=bool(m.remat))
  if m.source == 'pretrained':
    name = presets.resolve(m.path) if m.path else None
    if name is None:
      raise ValueError(f'config.model.path={m.path!r} is not a model the planner knows the shape of; use '
                       f'--config.model.path=preset:<name> with one of {sorted(presets.PRESETS)}.')
    cfg, origin = presets.config(name, **numerics), f'preset {name}'
  elif m.source in ('init', 'pretrain'):
    a = m.arch
    cfg = qwen.QwenConfig(
        vocab_size=int(vocab_size or config.tokenizer.vocab_size), hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size, num_layers=a.num_layers, num_heads=a.num_heads,
        num_kv_heads=a.num_kv_heads, head_dim=a.head_dim or a.hidden_size // a.num_heads,
        model_type=a.model_type, rope_theta=a.rope_theta, qk_norm=a.model_type == 'qwen3',
        attention_bias=a.model_type == 'qwen2', tie='tied' if a.tied else 'untied',
        max_position_embeddings=a.max_position_embeddings, **numerics)
    origin = 'config.model.arch'
  else:
    raise ValueError(f"config.model.source={m.source!r}; expected 'pretrained', 'pretrain' or 'init'.")
  if m.tie == 'untie' and cfg.tie == 'tied':
    cfg = cfg.replace(tie='untied', untied_from_tied=True)
  elif m.tie == 'tied' and cfg.tie != 'tied':
    raise ValueError(f'config.model.tie="tied" but {origin} has an untied head; use tie="auto" or "untie".')
  return cfg, origin


def abstract_params(cfg: qwen.QwenConfig):
  """ShapeDtypeStructs of the policy's params (the untied head included when cfg.tie == 'untied')."""
  return jax.eval_shape(lambda: qwen.init_params(cfg, jax.random.PRNGKey(0)))


def with_shardings(tree, mesh, specs):
  return sharding.abstract_sharded(tree, mesh, specs)


def leaf_bytes(x) -> int:
  """Bytes one device holds of an abstract array with a sharding (the whole array without one)."""
  shape = x.sharding.shard_shape(x.shape) if getattr(x, 'sharding', None) is not None else x.shape
  return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


def tree_bytes(tree) -> int:
  return sum(leaf_bytes(x) for x in jax.tree_util.tree_leaves(tree))


def opt_group_bytes(opt_state) -> dict[str, int]:
  """Per-device optimizer-state bytes per parameter group ('head', 'backbone') of a learner state."""
  _, mt = opt_state
  return {label: tree_bytes(mt.inner_states[label]) for label in learner.LABELS}


# --- counting the compiled program ---------------------------------------------------------
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
                'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 's4': 0.5, 'u4': 0.5}
_ARRAY = re.compile(r'\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]')
_FREE_OPS = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all', 'partition-id',
             'replica-id', 'iota', 'opt-barrier', 'add-dependency'}
_SLICING = {'dynamic-slice', 'slice', 'gather'}


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string (a tuple's leaves summed); unknown element types count 4."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    n = math.prod(int(d) for d in dims.split(',') if d) if dims else 1
    total += n * _DTYPE_BYTES.get(dtype, 1 if dtype.startswith('f8') else 4)
  return total


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(',') if d] if m else []


@dataclasses.dataclass
class _Instr:
  name: str
  shape: str
  op: str
  operands: list
  attrs: str
  raw: str = ''       # the text between the opcode's parentheses (a parameter's index)


def _split_balanced(s: str, start: int) -> int:
  """Index just past the bracket group opening at s[start]."""
  depth, pairs = 0, {'(': ')', '{': '}', '[': ']'}
  closers = set(pairs.values())
  for i in range(start, len(s)):
    c = s[i]
    if c in pairs:
      depth += 1
    elif c in closers:
      depth -= 1
      if depth == 0:
        return i + 1
  return len(s)


def parse_hlo(text: str) -> tuple[dict[str, list[_Instr]], str]:
  """{computation: instructions}, entry name, from an HloModule's text."""
  comps: dict[str, list[_Instr]] = {}
  entry, current = '', None
  for line in text.splitlines():
    stripped = line.strip()
    if not stripped or stripped.startswith('HloModule') or stripped.startswith('//'):
      continue
    if stripped.endswith('{') and '=' not in stripped.split('(')[0]:
      head = stripped.split('(')[0].split()
      current = head[-1].lstrip('%')
      comps[current] = []
      if head[0] == 'ENTRY':
        entry = current
      continue
    if stripped == '}' or current is None:
      continue
    m = re.match(r'(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*', stripped)
    if not m:
      continue
    rest = stripped[m.end():]
    if rest.startswith('('):
      end = _split_balanced(rest, 0)
    else:
      end = rest.find(' ')
    shape, rest = rest[:end], rest[end:].strip()
    op_m = re.match(r'([\w\-]+)\(', rest)
    if not op_m:
      continue
    close = _split_balanced(rest, op_m.end() - 1)
    operands = re.findall(r'%([\w.\-]+)', rest[op_m.end():close - 1])
    comps[current].append(_Instr(m.group(1), shape, op_m.group(1), operands, rest[close:],
                                 rest[op_m.end():close - 1]))
  return comps, entry


def _called(attrs: str, key: str) -> list[str]:
  m = re.search(key + r'=\{?([^}\s]*(?:,\s*%[\w.\-]+)*)\}?', attrs)
  return re.findall(r'%?([\w.\-]+)', m.group(1)) if m else []


def _window(attrs: str, n: int) -> dict[str, list]:
  """A convolution's window attributes per spatial dim: size, stride, pad (lo, hi), lhs / rhs dilation."""
  m = re.search(r'window=\{([^}]*)\}', attrs)
  fields = dict(kv.split('=', 1) for kv in m.group(1).split()) if m else {}
  ints = lambda key, default: [int(v) for v in fields[key].split('x')] if key in fields else [default] * n
  pads = [tuple(int(v) for v in p.split('_')) for p in fields['pad'].split('x')] if 'pad' in fields else [(0, 0)] * n
  return {'size': ints('size', 1), 'stride': ints('stride', 1), 'pad': pads, 'lhs_dilate': ints('lhs_dilate', 1),
          'rhs_dilate': ints('rhs_dilate', 1)}


def _conv_flops(i: _Instr, shapes: dict[str, str]) -> float:
  """2 x multiply-adds of a convolution (XLA:TPU writes matrix products as convolutions; gradients as
  ones with dilated or padded inputs): per output, the input features of its group times the window
  taps that land on a real input element (not on padding or between dilated elements)."""
  m = re.search(r'dim_labels=([^_]+)_([^-]+)->(\w+)', i.attrs)
  lhs, rhs = _dims(shapes.get(i.operands[0], '')), _dims(shapes.get(i.operands[1], ''))
  out = _dims(i.shape)
  if not m or not lhs or not rhs:
    return 0.0
  lhs_l, rhs_l, out_l = m.groups()
  spatial = sorted(c for c in out_l if c.isdigit())
  w = _window(i.attrs, len(spatial))
  per_output = rhs[rhs_l.index('i')]
  outer = math.prod(n for n, c in zip(out, out_l) if not c.isdigit())
  taps = 1
  for j, c in enumerate(spatial):
    n, mo = lhs[lhs_l.index(c)], out[out_l.index(c)]
    pos = (np.arange(mo)[:, None] * w['stride'][j] + np.arange(w['size'][j])[None, :] * w['rhs_dilate'][j]
           - w['pad'][j][0])
    d = w['lhs_dilate'][j]
    taps *= int(np.count_nonzero((pos >= 0) & (pos <= (n - 1) * d) & (pos % d == 0)))
  return 2.0 * outer * per_output * taps


class HloCounter:
  """FLOPs (dots and convolutions) and HBM bytes (each kernel's operands and result) of a compiled
  per-device HLO module, with while loops counted by their trip count (XLA's known_trip_count, else
  `unknown_trip`) and fusion operands read only through a slice counted at the slice's size."""

  def __init__(self, text: str, unknown_trip: int = 1):
    self.comps, self.entry = parse_hlo(text)
    self.unknown_trip = unknown_trip
    self.unknown_loops = 0
    self._flops: dict[str, float] = {}

  def _shapes(self, comp: str) -> dict[str, str]:
    return {i.name: i.shape for i in self.comps.get(comp, [])}

  def trip(self, instr: _Instr) -> int:
    """XLA's known_trip_count; else the largest integer scalar constant of the loop's condition (the
    bound of `i < L` or of the decode loop's `t <= max_new_tokens - 1`), else unknown_trip."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
    if m:
      return int(m.group(1))
    cond = _called(instr.attrs, 'condition')
    bounds = [int(v) for c in cond for v in self._int_constants(c)]
    if bounds and max(bounds) > 0:
      return -(-max(bounds) // self._step(instr, cond))
    self.unknown_loops += 1
    return self.unknown_trip

  def _step(self, instr: _Instr, cond: list[str]) -> int:
    """The increment of the loop counter the condition reads: 1, or k where XLA steps a counter by k
    (XLA:TPU's collective-matmul loops over the FSDP shards handle two shards per iteration)."""
    indices = {int(m.group(1)) for c in cond for j in self.comps.get(c, []) if j.op == 'get-tuple-element'
               for m in [re.search(r'index=(\d+)', j.attrs)] if m}
    body = (_called(instr.attrs, 'body') or [''])[0]
    inner = self.comps.get(body, [])
    if not inner or inner[-1].op != 'tuple':
      return 1
    by_name = {j.name: j for j in inner}
    consts = {j.name: j.raw.strip() for j in inner if j.op == 'constant'}
    for k in sorted(indices):
      if k >= len(inner[-1].operands):
        continue
      j = by_name.get(inner[-1].operands[k])
      if j is None:
        continue
      add = j.op == 'add' or (j.op == 'fusion' and any(
          c and self.comps.get(c) and self.comps[c][-1].op == 'add' for c in _called(j.attrs, 'calls')))
      steps = [int(consts[o]) for o in j.operands if re.fullmatch(r'\d+', consts.get(o, ''))] if add else []
      if steps and steps[0] > 0:
        return steps[0]
    return 1

  def _int_constants(self, comp: str, depth: int = 0) -> list[int]:
    out = []
    for i in self.comps.get(comp, []):
      if i.op == 'constant' and re.fullmatch(r'[su]\d+\[\]', i.shape.split('{')[0]):
        v = i.raw.strip()
        if re.fullmatch(r'-?\d+', v):
          out.append(int(v))
      elif depth < 3:
        for c in _called(i.attrs, 'calls'):
          out += self._int_constants(c, depth + 1)
    return out

  def flops(self, comp: str | None = None) -> float:
    comp = comp or self.entry
    if comp in self._flops:
      return self._flops[comp]
    shapes, total = self._shapes(comp), 0.0
    for i in self.comps.get(comp, []):
      if i.op == 'dot':
        lhs = _dims(shapes.get(i.operands[0], ''))
        m = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', i.attrs)
        k = math.prod(lhs[int(d)] for d in m.group(1).split(',') if d) if m and lhs else 1
        total += 2.0 * math.prod(_dims(i.shape)) * k
      elif i.op == 'convolution':
        total += _conv_flops(i, shapes)
      elif i.op == 'while':
        body = _called(i.attrs, 'body') + _called(i.attrs, 'condition')
        total += self.trip(i) * sum(self.flops(c) for c in body)
      elif i.op == 'conditional':
        branches = _called(i.attrs, 'branch_computations') or (
            _called(i.attrs, 'true_computation') + _called(i.attrs, 'false_computation'))
        total += max((self.flops(c) for c in branches), default=0.0)
      elif i.op in ('fusion', 'call', 'custom-call', 'async-start'):
        total += sum(self.flops(c) for c in _called(i.attrs, 'calls') + _called(i.attrs, 'to_apply'))
    self._flops[comp] = total
    return total

  def _read_bytes(self, comp: str, index: int, full: float, depth: int = 0) -> float | None:
    """Bytes a fused computation reads of its parameter `index` when it reads it only through slices
    (directly or inside nested fusions); None when it reads the whole operand."""
    inner = self.comps.get(comp, [])
    name = next((j.name for j in inner if j.op == 'parameter' and j.raw.strip() == str(index)), None)
    use = [j for j in inner if name in j.operands]
    if not use or depth > 4:
      return None
    total = 0.0
    for u in use:
      if u.op in _SLICING and u.operands[0] == name:
        total += shape_bytes(u.shape)
      elif u.op == 'fusion' and _called(u.attrs, 'calls'):
        part = self._read_bytes(_called(u.attrs, 'calls')[0], u.operands.index(name), full, depth + 1)
        if part is None:
          return None
        total += part
      else:
        return None
    return min(total, full)

  def _fusion_bytes(self, i: _Instr, shapes: dict[str, str]) -> float:
    called = _called(i.attrs, 'calls')
    inner = self.comps.get(called[0], []) if called else []
    root = inner[-1] if inner else None
    by_index = {int(j.raw): j.name for j in inner if j.op == 'parameter' and j.raw.strip().isdigit()}
    total = 0.0
    for idx, operand in enumerate(i.operands):
      full = shape_bytes(shapes.get(operand, ''))
      name = by_index.get(idx)
      if root is not None and root.op == 'dynamic-update-slice' and root.operands[0] == name and \
          sum(name in j.operands for j in inner) == 1:
        continue   # updated in place: only the written slice moves (counted below)
      part = self._read_bytes(called[0], idx, full) if called else None
      total += full if part is None else part
    if root is not None and root.op == 'dynamic-update-slice':
      inner_shapes = {j.name: j.shape for j in inner}
      return total + shape_bytes(inner_shapes.get(root.operands[1], ''))
    return total + shape_bytes(i.shape)

  def bytes(self, comp: str | None = None) -> float:
    comp = comp or self.entry
    shapes, total = self._shapes(comp), 0.0
    for i in self.comps.get(comp, []):
      if i.op in _FREE_OPS:
        continue
      if i.op == 'while':
        total += self.trip(i) * sum(self.bytes(c) for c in _called(i.attrs, 'body'))
      elif i.op == 'conditional':
        branches = _called(i.attrs, 'branch_computations') or (
            _called(i.attrs, 'true_computation') + _called(i.attrs, 'false_computation'))
        total += max((self.bytes(c) for c in branches), default=0.0)
      elif i.op == 'call':
        total += sum(self.bytes(c) for c in _called(i.attrs, 'to_apply'))
      elif i.op == 'fusion':
        total += self._fusion_bytes(i, shapes)
      elif i.op in _SLICING:
        total += 2 * shape_bytes(i.shape)
      elif i.op == 'dynamic-update-slice':
        total += 2 * shape_bytes(shapes.get(i.operands[1], ''))
      else:
        total += shape_bytes(i.shape) + sum(shape_bytes(shapes.get(o, '')) for o in i.operands)
    return total

  def largest_buffers(self, k: int = 6) -> list[tuple[float, str, str]]:
    """The k largest values the program computes: (bytes, shape, op / source), distinct by shape."""
    found: dict[str, tuple[float, str, str]] = {}
    fused = {c for comp in self.comps.values() for i in comp if i.op == 'fusion' for c in _called(i.attrs, 'calls')}
    for name, comp in self.comps.items():
      if name in fused:
        continue
      for i in comp:
        if i.op in ('parameter', 'get-tuple-element', 'tuple', 'bitcast', 'while', 'constant'):
          continue
        src = re.search(r'op_name="([^"]+)"', i.attrs)
        where = src.group(1) if src else i.op
        b = shape_bytes(i.shape)
        key = i.shape.split('{')[0]
        if key not in found or found[key][0] < b:
          found[key] = (b, key, where)
    return sorted(found.values(), reverse=True)[:k]


# --- the programs of a step ------------------------------------------------------------------
@dataclasses.dataclass
class Program:
  """One jitted program of a training step, ready to lower: fn.lower(*args) under the mesh."""
  name: str
  calls: int                 # times per RL step
  jitted: Any                # a jax.jit-wrapped callable (has .lower)
  args: tuple
  kwargs: dict
  resident_args: Sequence[str]   # which of the trainer's resident trees it takes as arguments
  kind: str                  # sampler | logp | learner | values | critic
  unknown_trip: int = 1      # trip count of loops XLA cannot count (the decode loop: its max)
  notes: str = ''


@dataclasses.dataclass
class Shapes:
  rows: int                  # rollout rows per step (prompts x group)
  prompt_len: int            # the learner's prompt columns (trainer.bucket of the prompt width)
  sampler_rows: int
  sampler_prompt_len: int
  minibatch_rows: int
  new_tokens: int


def step_shapes(config, cfg: qwen.QwenConfig, prompt_width: int, mesh) -> Shapes:
  rl = config.rl
  alg = algorithms.algorithm(rl.algorithm)
  rows = rl.prompts_per_step * alg.rows_per_prompt(rl)
  if alg.step == algorithms.EXPERT_ITERATION:
    minibatch = rl.ei.batch_size
  elif alg.step == algorithms.SFT:
    minibatch = rows
  else:
    if rows % rl.minibatches:
      raise ValueError(f'config.rl.minibatches={rl.minibatches} does not divide the rollout batch of {rows} rows '
                       f'(rl.prompts_per_step x rl.group_size); pick a divisor of {rows}.')
    minibatch = rows // rl.minibatches
  return Shapes(rows=rows, prompt_len=trainer.bucket(prompt_width),
                sampler_rows=sampling.batch_bucket(cfg, rows, False, sharding.batch_shards(mesh)),
                sampler_prompt_len=sampling.bucket_size(prompt_width, sampling.LENGTH_BUCKET_STEP,
                                                        sampling.MIN_LENGTH_BUCKET),
                minibatch_rows=minibatch, new_tokens=int(rl.max_new_tokens))


def _sds(shape, dtype, mesh, spec):
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=NamedSharding(mesh, spec))


def _rows(mesh, n, *cols, dtype=jnp.float32):
  return _sds((n,) + tuple(cols), dtype, mesh, sharding.batch_spec(mesh, n))


def _learner_batch(config, mesh, rows: int, prompt_len: int, N: int, alg: algorithms.Algorithm) -> dict:
  """The minibatch dict the trainer's step of `alg` hands the update (keys as it builds them)."""
  rl = config.rl
  T = prompt_len + N
  batch = {'tokens': _rows(mesh, rows, T, dtype=jnp.int32), 'mask': _rows(mesh, rows, T, dtype=jnp.int32),
           'completion_mask': _rows(mesh, rows, N)}
  if alg.step != algorithms.POLICY_GRADIENT:   # Expert Iteration and SFT: cross-entropy on the tokens
    return batch
  batch['old_logp'] = _rows(mesh, rows, N)
  if alg.loss_takes_reference(rl):
    batch['ref_logp'] = _rows(mesh, rows, N)
  if alg.critic:
    batch.update(returns=_rows(mesh, rows, N), old_values=_rows(mesh, rows, N))
  batch['advantages'] = _rows(mesh, rows, N) if alg.token_advantages(rl) else _rows(mesh, rows)
  return batch


def critic_step(loss_fn: Callable, tx) -> Callable:
  """The PPO critic update as Trainer._critic_update builds it: (critic, opt, batch) -> (critic, opt, metrics)."""

  def step(critic, opt, batch):
    (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(critic, batch)
    upd, opt = tx.update(g, opt, critic)
    return optax.apply_updates(critic, upd), opt, dict(m, value_loss=loss)

  return step


@dataclasses.dataclass
class Plan:
  cfg: qwen.QwenConfig
  origin: str
  mesh: Any
  shapes: Shapes
  programs: list
  resident: dict             # name -> per-device bytes of the trainer's persistent trees
  stage_resident: dict       # stage -> names resident during that stage
  opt_groups: dict           # stage -> {'head': bytes, 'backbone': bytes}


def build_programs(config, cfg: qwen.QwenConfig, mesh, prompt_width: int, platform: str = 'tpu') -> Plan:
  """The jitted programs of one training step of `config` on `mesh`, with abstract sharded inputs."""
  rl = config.rl
  alg = algorithms.algorithm(rl.algorithm)   # a ValueError naming the valid ones
  rules = sharding.MeshConfig.from_config(config.mesh).all_rules(qwen.param_axes())
  params0 = abstract_params(cfg)
  pspecs = sharding.partition_specs(params0, rules, mesh)
  params = with_shardings(params0, mesh, pspecs)
  shapes = step_shapes(config, cfg, prompt_width, mesh)
  P, N = shapes.prompt_len, shapes.new_tokens
  rep = PartitionSpec()
  rep_sds = lambda dtype, shape=(): _sds(shape, dtype, mesh, rep)
  ocfg = learner.OptimConfig(b1=rl.b1, b2=rl.b2, eps=rl.eps, weight_decay=rl.weight_decay, grad_clip=rl.grad_clip)
  programs, resident = [], {'params': tree_bytes(params)}
  if rl.kl_coef > 0:
    resident['reference params'] = tree_bytes(params)

  # The sampler, as sampling.sample(..., mesh=...) runs it on an accelerator (scanned layers, XLA
  # attention, one decode segment: sampling.unroll_layers_default / decode_segments_default off the
  # CPU backend).
  if alg.samples:
    B, Pp = shapes.sampler_rows, shapes.sampler_prompt_len
    greedy, top_k, use_top_p = sampling.decoding_statics(cfg, False, rl.top_k, rl.top_p)
    stops = sampling.stop_id_array(cfg.eos_token_id or (0,))
    args = (params, _rows(mesh, B, Pp, dtype=jnp.int32), _rows(mesh, B, Pp, dtype=jnp.int32),
            _rows(mesh, B, dtype=jnp.bool_), rep_sds(jnp.uint32, (2,)), rep_sds(jnp.float32),
            rep_sds(jnp.float32), rep_sds(jnp.int32, stops.shape), rep_sds(jnp.int32))
    kwargs = dict(cfg=cfg, max_new_tokens=N, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
                  unroll_layers=False, segments=1, attention='xla')
    programs.append(Program('sampler', 1, sampling.decode_loop.sample_padded, args, kwargs, ('params',), 'sampler',
                            unknown_trip=max(N - 1, 1),
                            notes=f'{B} rows x ({Pp} prompt + {N} new tokens); decode loop counted at {N - 1} steps'))

  # Old-policy / reference log-probs over the rollout batch, in rl.minibatches row chunks (Trainer._logp).
  calls = int(bool(rl.recompute_old_logp)) + int(rl.kl_coef > 0)
  if calls and alg.step == algorithms.POLICY_GRADIENT:
    bspec = sharding.batch_spec(mesh, shapes.rows)
    chunks = trainer.logp_chunks(rl, shapes.rows)
    fn = trainer.row_chunked(lambda p, t, m: rollout.completion_stats(cfg, p, t, m, P)[0], chunks)
    jitted = sharding.jit_sharded(fn, mesh, (pspecs, bspec, bspec), bspec).jitted
    seq = _rows(mesh, shapes.rows, P + N, dtype=jnp.int32)
    which = ' + '.join(n for n, on in (('old policy', rl.recompute_old_logp), ('reference', rl.kl_coef > 0)) if on)
    programs.append(Program('log-probs', calls, jitted, (params, seq, seq), {}, ('params',), 'logp',
                            notes=f'{which}: {shapes.rows} rows x {P + N} tokens in {chunks} chunk'
                                  f'{"s" if chunks > 1 else ""} of {shapes.rows // chunks} rows'))

  # PPO: the critic's values over the batch and its update per minibatch.
  if alg.critic:
    critic0 = {'backbone': params0['backbone'],
               'value_head': jax.eval_shape(lambda: ppo.init_value_head(cfg.hidden_size, jax.random.PRNGKey(0)))}
    cspecs = sharding.partition_specs(critic0, rules, mesh)
    critic = with_shardings(critic0, mesh, cspecs)
    ctx = optax.chain(optax.clip_by_global_norm(rl.grad_clip) if rl.grad_clip > 0 else optax.identity(),
                      optax.adamw(rl.ppo.critic_lr, b1=rl.b1, b2=rl.b2, eps=rl.eps))
    copt0 = jax.eval_shape(ctx.init, critic0)
    cospecs = sharding.opt_state_specs(copt0, critic0, cspecs)
    copt = with_shardings(copt0, mesh, cospecs)
    resident.update({'critic': tree_bytes(critic), 'critic optimizer': tree_bytes(copt)})
    bspec = sharding.batch_spec(mesh, shapes.rows)
    values = lambda c, t, m: objectives.critic_values(cfg, c, t, m, P)
    seq = _rows(mesh, shapes.rows, P + N, dtype=jnp.int32)
    programs.append(Program('critic values', 1, sharding.jit_sharded(values, mesh, (cspecs, bspec, bspec), bspec).jitted,
                            (critic, seq, seq), {}, ('critic',), 'values', notes=f'{shapes.rows} rows'))
    mb = _learner_batch(config, mesh, shapes.minibatch_rows, P, N, alg)
    step = critic_step(objectives.critic_objective(cfg, P, rl), ctx)
    jitted = sharding.jit_sharded(step, mesh, (cspecs, cospecs, sharding.batch_spec(mesh, shapes.minibatch_rows)),
                                  (cspecs, cospecs, rep), donate_argnums=(0, 1)).jitted
    programs.append(Program('critic update', rl.epochs * rl.minibatches, jitted, (critic, copt, mb), {},
                            ('critic', 'critic optimizer'), 'critic', notes=f'{shapes.minibatch_rows} rows'))

  # The learner update of each stage (Trainer._update_fn -> Placement.update -> placement.sharded_update).
  kind = alg.name if alg.step == algorithms.POLICY_GRADIENT else 'sft'   # EI and SFT steps: cross-entropy
  loss_fn = objectives.algorithm_objective(cfg, P, rl, kind)
  stages = (1, 2) if config.cfrl.enabled else (0,)
  if alg.step == algorithms.POLICY_GRADIENT:
    updates = rl.epochs * rl.minibatches
  elif alg.step == algorithms.EXPERT_ITERATION:   # at most: every sample kept
    updates = rl.ei.sft_epochs * max(1, math.ceil(shapes.rows / shapes.minibatch_rows))
  else:
    updates = 1
  opt_groups, stage_resident = {}, {}
  mb = _learner_batch(config, mesh, shapes.minibatch_rows, P, N, alg)
  lrs = {label: rep_sds(jnp.float32) for label in learner.LABELS}
  for stage in stages:
    tx = learner.make_optimizer(cfg, params0, stage, ocfg)
    opt0 = jax.eval_shape(tx.init, params0)
    ospecs = sharding.opt_state_specs(opt0, params0, pspecs)
    opt = with_shardings(opt0, mesh, ospecs)
    opt_groups[stage] = opt_group_bytes(opt)
    name = f'optimizer (stage {stage})' if stage else 'optimizer'
    resident[name] = tree_bytes(opt)
    stage_resident[stage] = [k for k in resident if not k.startswith('optimizer')] + [name]
    update = placement.sharded_update(learner.make_update(cfg, loss_fn, tx, stage), mesh, pspecs, ospecs)
    label = {0: 'learner update', 1: 'learner update, CF-RL stage 1', 2: 'learner update, CF-RL stage 2'}[stage]
    groups = opt_groups[stage]
    programs.append(Program(label, updates, update.jitted, (params, opt, mb, lrs), {}, ('params', name), 'learner',
                            notes=(f'{shapes.minibatch_rows} rows x {P + N} tokens; optimizer state head '
                                   f'{_gib(groups["head"])} GiB, backbone {_gib(groups["backbone"])} GiB per device')))
    programs[-1].stage = stage
  return Plan(cfg, '', mesh, shapes, programs, resident, stage_resident, opt_groups)


# --- compiling and reporting ------------------------------------------------------------------
@dataclasses.dataclass
class Result:
  program: Program
  ok: bool
  error: str = ''
  argument: int = 0
  output: int = 0
  alias: int = 0
  temp: int = 0
  other_resident: int = 0
  flops: float = 0.0
  hbm_bytes: float = 0.0
  xla_flops: float = 0.0
  largest: list = dataclasses.field(default_factory=list)

  @property
  def total(self) -> int:
    return self.argument + self.output - self.alias + self.temp + self.other_resident


def _stage_of(program: Program, plan: Plan) -> int:
  return getattr(program, 'stage', max(plan.stage_resident) if plan.stage_resident else 0)


def compile_program(program: Program, plan: Plan, mesh) -> Result:
  """Lowers and compiles one program; XLA's refusal (out of HBM) becomes ok=False with its message."""
  try:
    with jax.sharding.set_mesh(mesh):
      compiled = program.jitted.lower(*program.args, **program.kwargs).compile()
  except Exception as e:   # XlaRuntimeError RESOURCE_EXHAUSTED from the TPU compiler
    msg = str(e)
    if 'RESOURCE_EXHAUSTED' not in msg and 'memory' not in msg.lower():
      raise
    return Result(program, False, error=msg.strip())
  ma = compiled.memory_analysis()
  counter = HloCounter(compiled.as_text(), unknown_trip=program.unknown_trip)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  stage = _stage_of(program, plan)
  live = plan.stage_resident.get(stage, list(plan.resident))
  other = sum(plan.resident[k] for k in live if k not in program.resident_args)
  return Result(program, True, argument=int(ma.argument_size_in_bytes), output=int(ma.output_size_in_bytes),
                alias=int(ma.alias_size_in_bytes), temp=int(ma.temp_size_in_bytes), other_resident=other,
                flops=counter.flops(), hbm_bytes=counter.bytes(), xla_flops=float(cost.get('flops', 0.0)),
                largest=counter.largest_buffers())


def predicted_seconds(r: Result, chip: Chip) -> tuple[float, float, str]:
  """(seconds, the other bound's seconds, 'compute' | 'memory'): max(flops / peak, bytes / bandwidth)."""
  t_c = r.flops / (chip.bf16_tflops * 1e12)
  t_m = r.hbm_bytes / (chip.hbm_gbps * 1e9)
  return (t_c, t_m, 'compute') if t_c >= t_m else (t_m, t_c, 'memory')


def fixes(r: Result, config, cfg: qwen.QwenConfig, mesh) -> list[str]:
  """Config fields that lower this program's per-device memory, most effective first."""
  rl, sizes = config.rl, sharding.axis_sizes(mesh)
  shape = tuple(config.mesh.shape)
  out = []
  batch_axes = f'data x fsdp = {sharding.batch_shards(mesh)}'
  if r.program.kind in ('learner', 'critic'):
    out.append(f'rl.minibatches={rl.minibatches * 2} (now {rl.minibatches}: half the rows per update)')
    if not cfg.remat:
      out.append('model.remat=True (keep one activation per layer, recompute the rest in the backward pass)')
  if r.program.kind == 'logp':
    out.append(f'rl.minibatches={rl.minibatches * 2} (now {rl.minibatches}: this pass runs over the rollout batch '
               'in that many row chunks, as the learner does)')
  if r.program.kind in ('logp', 'values'):
    out.append(f'rl.prompts_per_step={max(1, rl.prompts_per_step // 2)} (now {rl.prompts_per_step}: '
               + ('fewer rows per chunk)' if r.program.kind == 'logp' else 'this pass runs over the whole rollout '
                  'batch at once)'))
  if r.program.kind == 'sampler':
    out.append(f'rl.prompts_per_step={max(1, rl.prompts_per_step // 2)} or rl.group_size (fewer rows decoding at '
               f'once), or rl.max_new_tokens (now {rl.max_new_tokens}: a shorter KV cache)')
  if r.other_resident and cfg.param_dtype == 'float32':
    out.append("model.param_dtype='bfloat16' (halves parameters, reference policy and Adam moments)")
  if sizes.get('tensor', 1) == 1:
    out.append(f'mesh.shape=(1, -1, 2) or (1, -1, 4) (now {shape}: a tensor axis also splits activations, '
               f'logits over the vocabulary and the KV cache by heads)')
  out.append(f'more devices on the batch axes ({batch_axes} now) or a chip with more HBM (--topology)')
  if cfg.dtype == 'float32':
    out.append("model.dtype='bfloat16' (half-size activations)")
  return out


def _gib(b: float) -> str:
  return f'{b / GIB:.3g}'


def _seconds(s: float) -> str:
  return f'{s * 1e3:.1f} ms' if s < 1 else f'{s:.2f} s'


def report(plan: Plan, results: list[Result], target: Target, hbm_gib: float, config, config_path: str) -> str:
  """The markdown report: setup, one row per program, the step total, and what does not fit."""
  cfg, chip, s = plan.cfg, target.chip, plan.shapes
  n_params = qwen.count_params(abstract_params(cfg))
  mesh_txt = ' x '.join(f'{k}={v}' for k, v in sharding.axis_sizes(plan.mesh).items())
  lines = [
      f'# Plan: {config_path} on {target.name}',
      '',
      f'- devices: {len(target.devices)} x {target.devices[0].device_kind} ({target.platform}); mesh {mesh_txt}',
      f'- model: {plan.origin}, {n_params:,} parameters, tie={cfg.tie}, dtype={cfg.dtype}, '
      f'param_dtype={cfg.param_dtype}, remat={cfg.remat}',
      f'- step: {config.rl.algorithm}, {s.rows} rows ({config.rl.prompts_per_step} prompts), prompt width '
      f'{s.prompt_len} (sampler {s.sampler_prompt_len}), {s.new_tokens} new tokens, {config.rl.minibatches} '
      f'minibatches of {s.minibatch_rows} rows, CF-RL {"on" if config.cfrl.enabled else "off"}',
      f'- chip: {chip.name}, HBM {hbm_gib:g} GiB{" (overridden)" if hbm_gib != chip.hbm_gib else ""}, '
      f'{chip.bf16_tflops:g} bf16 TFLOP/s, {chip.hbm_gbps:g} GB/s',
      f'- resident per device: ' + ', '.join(f'{k} {_gib(v)} GiB' for k, v in plan.resident.items()),
      '',
      '| program | calls/step | args GiB | out GiB | temp GiB | other resident GiB | total GiB | % HBM | '
      'TFLOP/call | HBM GB/call | predicted/call | bound |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|',
  ]
  step_time = {}
  for r in results:
    p = r.program
    if not r.ok:
      lines.append(f'| {p.name} | {p.calls} | - | - | - | - | > HBM | - | - | - | - | XLA: does not fit |')
      continue
    t, _, bound = predicted_seconds(r, chip)
    stage = _stage_of(p, plan)
    for st in ([stage] if p.kind == 'learner' else list(plan.stage_resident)):
      step_time[st] = step_time.get(st, 0.0) + p.calls * t
    lines.append(f'| {p.name} | {p.calls} | {_gib(r.argument)} | {_gib(r.output - r.alias)} | {_gib(r.temp)} | '
                 f'{_gib(r.other_resident)} | {_gib(r.total)} | {100 * r.total / (hbm_gib * GIB):.0f}% | '
                 f'{r.flops / 1e12:.3g} | {r.hbm_bytes / 1e9:.3g} | {_seconds(t)} | {bound} |')
  lines.append('')
  for st, t in sorted(step_time.items()):
    what = {0: 'step', 1: 'CF-RL stage-1 step', 2: 'CF-RL stage-2 step'}[st]
    lines.append(f'- predicted {what}: {_seconds(t)} (sum of calls x predicted/call; collectives and host work not modelled)')
  lines.append('')
  lines.append('Notes:')
  for r in results:
    lines.append(f'- {r.program.name}: {r.program.notes}' + (
        f'; XLA cost_analysis FLOPs (loop bodies once) {r.xla_flops / 1e12:.3g} T' if r.ok else ''))
  lines.append('- args / out / temp: compiled.memory_analysis() per device (out excludes buffers aliased to donated '
               'arguments); other resident: the trainer\'s parameters / optimizer state / reference / critic that '
               'stay in HBM while this program runs but are not its arguments. FLOPs and bytes: counted from the '
               'compiled per-device HLO, loops by trip count; bytes count every kernel\'s operands in full, an '
               'upper bound (see docs/plan.md).')
  return '\n'.join(lines) + '\n'


def failure_message(failing: list[Result], plan: Plan, config, hbm_gib: float) -> str:
  out = []
  for r in failing:
    head = f'{r.program.name} does not fit in {hbm_gib:g} GiB of HBM per device'
    if r.ok:
      head += (f': needs {_gib(r.total)} GiB (args {_gib(r.argument)}, out {_gib(r.output - r.alias)}, '
               f'temp {_gib(r.temp)}, other resident {_gib(r.other_resident)})')
    out.append(head + '.')
    if not r.ok:
      excerpt = [l for l in r.error.splitlines() if l.strip()][:14]
      out.append('  XLA: ' + '\n  '.join(excerpt))
    else:
      out.append('  largest buffers: ' + '; '.join(f'{shape} {_gib(b)} GiB ({where.rsplit("/", 2)[-1]})'
                                                   for b, shape, where in r.largest[:4]))
    resident = sorted(plan.resident.items(), key=lambda kv: -kv[1])
    out.append('  resident state: ' + ', '.join(f'{k} {_gib(v)} GiB' for k, v in resident))
    out.append('  config fields that would make it fit: ' + '; '.join(fixes(r, config, plan.cfg, plan.mesh)))
  return '\n'.join(out)


def summary(plan: Plan, results: list[Result], target: Target, hbm_gib: float, config_path: str = '',
            overrides: Sequence[str] = ()) -> dict:
  """The report's numbers as JSON (per device; bytes, FLOPs, seconds), with the config file and the
  command line's --config.* overrides that made them."""
  programs = []
  for r in results:
    row = {'name': r.program.name, 'kind': r.program.kind, 'calls': r.program.calls, 'fits_compiler': r.ok,
           'stage': getattr(r.program, 'stage', None)}
    if r.ok:
      t, _, bound = predicted_seconds(r, target.chip)
      row.update(argument_bytes=r.argument, output_bytes=r.output, alias_bytes=r.alias, temp_bytes=r.temp,
                 other_resident_bytes=r.other_resident, total_bytes=r.total, flops=r.flops, hbm_bytes=r.hbm_bytes,
                 xla_cost_analysis_flops=r.xla_flops, predicted_seconds=t, bound=bound)
    else:
      row['error'] = r.error[:2000]
    programs.append(row)
  return {'config': config_path, 'overrides': list(overrides), 'model_origin': plan.origin,
          'parameters': qwen.count_params(abstract_params(plan.cfg)),
          'topology': target.name, 'devices': len(target.devices), 'chip': dataclasses.asdict(target.chip),
          'hbm_gib': hbm_gib, 'mesh': sharding.axis_sizes(plan.mesh), 'model': dataclasses.asdict(plan.cfg),
          'shapes': dataclasses.asdict(plan.shapes), 'resident_bytes': plan.resident,
          'optimizer_state_bytes': {str(k): v for k, v in plan.opt_groups.items()}, 'programs': programs}


# --- one line per plan: the README's summary of generated plans ---------------------------------------
_TITLE = re.compile(r'^# Plan: (.+) on (\S+)$', re.M)
_MODEL_LINE = re.compile(r'^- model: (.+?), ([\d,]+) parameters', re.M)


def _plan_header(summary_: dict, json_path: str) -> tuple[str, str, int]:
  """(config, model origin, parameters) of a plan summary; plans written before the .json carried
  them have them in the title and model line of the .md beside it."""
  if 'model_origin' in summary_:
    config = ' '.join([summary_['config']] + list(summary_.get('overrides', ())))
    return config, summary_['model_origin'], int(summary_['parameters'])
  md_path = os.path.splitext(json_path)[0] + '.md'
  with open(md_path) as f:
    md = f.read()
  title, model = _TITLE.search(md), _MODEL_LINE.search(md)
  if not title or not model:
    raise ValueError(f'{json_path} has no model_origin and {md_path} no "# Plan: ..." title and "- model: ..." '
                     'line to take it from; regenerate the plan with python -m cfrl_jax.plan.')
  return title.group(1), model.group(1), int(model.group(2).replace(',', ''))


def readme_row(summary_: dict, json_path: str = '') -> dict[str, str]:
  """One plan's line: config, topology, model, its largest program, that program's per-device total
  against the HBM, and whether every program fits (XLA compiled it and its total is within the HBM)."""
  config, origin, params = _plan_header(summary_, json_path)
  hbm = float(summary_['hbm_gib'])
  progs = summary_['programs']
  refused = [p for p in progs if not p['fits_compiler']]
  mesh = 'x'.join(str(v) for v in summary_['mesh'].values())
  row = {'config': f'`{config}`',
         'topology': f"{summary_['topology']} ({summary_['devices']} x {summary_['chip']['name']}, mesh {mesh})",
         'model': f'{origin}, {params / 1e9:.2f}B params'}
  if refused:
    row.update(largest=', '.join(p['name'] for p in refused) + ' (XLA: out of memory)',
               peak=f'> {hbm:g} GiB', fits='no')
    return row
  top = max(progs, key=lambda p: p['total_bytes'])
  peak = top['total_bytes'] / GIB
  row.update(largest=top['name'], peak=f'{peak:.3g} / {hbm:g} GiB ({100 * peak / hbm:.0f}%)',
             fits='yes' if all(p['total_bytes'] <= hbm * GIB for p in progs) else 'no')
  return row


_README_COLUMNS = (('config', 'config'), ('topology', 'topology'), ('model', 'model'),
                   ('largest', 'largest program'), ('peak', 'peak HBM per chip / HBM'), ('fits', 'fits'))


def readme_table(json_paths: Sequence[str]) -> str:
  """A Markdown table, one row per plan .json (written by this module), in the order given."""
  if not json_paths:
    raise ValueError('--readme_table needs the plan .json files as arguments, e.g. docs/plan/*.json.')
  lines = ['| ' + ' | '.join(h for _, h in _README_COLUMNS) + ' |',
           '|' + '---|' * len(_README_COLUMNS)]
  for path in json_paths:
    with open(path) as f:
      row = readme_row(json.load(f), path)
    lines.append('| ' + ' | '.join(row[k] for k, _ in _README_COLUMNS) + ' |')
  return '\n'.join(lines)


def run_plan(config, target: Target, *, prompt_width: int, hbm_gib: float | None = None, config_path: str = '',
             vocab_size: int = 0, log: Callable[[str], None] = print) -> tuple[str, list[Result], Plan, bool]:
  """Builds, compiles and reports. Returns (markdown, results, plan, fits)."""
  cfg, origin = model_config(config, vocab_size)
  mesh = sharding.MeshConfig.from_config(config.mesh).make_mesh(target.devices)
  plan = build_programs(config, cfg, mesh, prompt_width, target.platform)
  plan.origin = origin
  hbm = float(hbm_gib or target.chip.hbm_gib)
  results = []
  for p in plan.programs:
    log(f'compiling {p.name} ...')
    results.append(compile_program(p, plan, mesh))
  md = report(plan, results, target, hbm, config, config_path)
  failing = [r for r in results if not r.ok or r.total > hbm * GIB]
  if failing:
    md += '\n## Does not fit\n\n```\n' + failure_message(failing, plan, config, hbm) + '\n```\n'
  return md, results, plan, not failing


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string('topology', 'v5e:4x8', 'TPU topology (v5e:4x8, v4:2x2x4, v5p:2x4x4, v6e:4x4), slice name '
                      '(v5e-32, v4-32, v5p-64) or cpu:N', flag_values=fv)
  flags.DEFINE_string('chip', 'v5e', 'chip constants for a cpu:N topology', flag_values=fv)
  flags.DEFINE_float('hbm_gib', 0.0, 'HBM per device to fit in (0: the chip\'s)', flag_values=fv)
  flags.DEFINE_integer('prompt_len', 256, 'prompt width in tokens (the longest prompt of a step; GSM8K with '
                       'the Qwen chat template stays under 256)', flag_values=fv)
  flags.DEFINE_integer('vocab_size', 0, 'vocabulary of a config.model.arch model (0: config.tokenizer.vocab_size)',
                       flag_values=fv)
  flags.DEFINE_string('out', '', 'where to write the markdown (default: <run_dir>/plan-<topology>.md)', flag_values=fv)
  flags.DEFINE_bool('readme_table', False, 'print the one-row-per-plan summary table of the plan .json files given '
                    'as arguments (e.g. docs/plan/*.json) and exit; compiles nothing', flag_values=fv)
  rest = fv(argv)[1:]
  if fv.readme_table:
    try:
      print(readme_table(rest))
    except (ValueError, OSError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    return 0
  if fv['config'].value is None:
    print('error: --config=configs/<file>.py is required', file=sys.stderr)
    return 1
  spec = fv.topology
  try:
    target = topology(spec, fv.chip)
    config = fv['config'].value
    config_path = fv['config'].config_filename
    md, results, plan, fits = run_plan(config, target, prompt_width=fv.prompt_len, hbm_gib=fv.hbm_gib or None,
                              config_path=config_path, vocab_size=fv.vocab_size,
                              log=lambda m: print(m, file=sys.stderr))
  except (ValueError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  path = fv.out or os.path.join(config.run_dir or os.path.join('runs', config.name),
                                f'plan-{target.name.replace(":", "-")}.md')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write(md)
  with open(os.path.splitext(path)[0] + '.json', 'w') as f:
    json.dump(summary(plan, results, target, fv.hbm_gib or target.chip.hbm_gib, config_path,
                      [a for a in argv[1:] if a.startswith('--config.')]), f, indent=1, default=str)
  print(md)
  print(f'written to {path}', file=sys.stderr)
  if not fits:
    print('error: a program does not fit; see "Does not fit" above for the largest buffers and the config fields '
          'to change.', file=sys.stderr)
    return EXIT_DOES_NOT_FIT
  return 0


if __name__ == '__main__':
  sys.exit(main())
