"""Compiled XLA:CPU custom calls for the sampler's decode step (cpu_decode.cc).

`decode_attention`: one query step's attention over the KV cache, which XLA:CPU runs far below
memory speed when written in XLA ops. `greedy_pick` / `greedy_pick_rows`: the argmax and its
log-probability over (V, B) / (B, V) logits, where XLA:CPU's reductions over V cost more than the
head's product. `matvec`: a few rows times a weight-major matrix, streaming the weights faster than
XLA:CPU's library product does at float32 decode shapes; `matmul`: the same product for many rows
(a batch-64 step), register-blocked where it is compute-bound. The C++
source ships with the package and is compiled on first use with the machine's C++ compiler
(`$CXX`, else g++ or c++; -O3 -march=native against jax's FFI headers) into a cache directory
keyed by the source, compiler, flags, jaxlib version and CPU, then registered with jax.ffi.
CFRL_JAX_CPU_KERNELS_MARCH names another -march (x86-64-v3: the AVX2 code path on an AVX-512
machine; x86-64: any x86-64 CPU), for testing the code paths this CPU would not pick.

Where it cannot be built (no compiler, a failed build) or is switched off with
CFRL_JAX_CPU_KERNELS=0, `available()` is False, `unavailable_reason()` says why, and the sampler
keeps its XLA attention: the same maths, slower.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = Path(__file__).with_name('cpu_decode.cc')
TARGETS = {'cfrl_decode_attention': 'CfrlDecodeAttention', 'cfrl_greedy_pick': 'CfrlGreedyPick',
           'cfrl_greedy_pick_rows': 'CfrlGreedyPickRows', 'cfrl_matvec': 'CfrlMatvec',
           'cfrl_matmul': 'CfrlMatmul'}
DISABLE_ENV = 'CFRL_JAX_CPU_KERNELS'      # '0' switches the kernel off
CACHE_ENV = 'CFRL_JAX_KERNEL_CACHE'       # where built libraries go (default ~/.cache/cfrl_jax/kernels)
MARCH_ENV = 'CFRL_JAX_CPU_KERNELS_MARCH'  # the build's -march (default native)


def cxx_flags() -> tuple[str, ...]:
  """build()'s compiler flags, with -march=$CFRL_JAX_CPU_KERNELS_MARCH (native where unset)."""
  march = os.environ.get(MARCH_ENV, '').strip() or 'native'
  return ('-O3', f'-march={march}', '-fopenmp-simd', '-std=c++17', '-shared', '-fPIC', '-w')


def compiler() -> str | None:
  """The C++ compiler to build with: $CXX, else g++ or c++ on PATH; None if there is none."""
  if os.environ.get('CXX'):
    return shutil.which(os.environ['CXX'])
  return shutil.which('g++') or shutil.which('c++')


def cache_dir() -> Path:
  return Path(os.environ.get(CACHE_ENV) or Path.home() / '.cache' / 'cfrl_jax' / 'kernels')


def _cpu_signature() -> str:
  """What -march=native depends on: the machine and its CPU flags (a shared cache dir may serve
  several kinds of host)."""
  flags = ''
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith(('flags', 'Features')):
        flags = line
        break
  except OSError:
    pass
  return f'{platform.machine()} {flags}'


def build(out_dir: Path | None = None, cxx: str | None = None) -> Path:
  """Compiles cpu_decode.cc into out_dir (default cache_dir()); returns the library's path.

  Reuses a library already built from the same source, compiler, flags (cxx_flags), jaxlib and CPU. The
  library is written under a temporary name and renamed, so processes building at once (several
  hosts of a pod on one shared file system, test workers) never load a half-written file.
  Raises RuntimeError naming the compiler's output when the build fails.
  """
  cxx = cxx or compiler()
  if cxx is None:
    raise RuntimeError('no C++ compiler found (set $CXX, or install g++)')
  version = subprocess.run([cxx, '--version'], capture_output=True, text=True, check=False).stdout
  include = jax.ffi.include_dir()
  flags = cxx_flags()
  key = hashlib.sha256('\0'.join([SOURCE.read_text(), version, ' '.join(flags), jax.__version__,
                                  jaxlib.__version__, _cpu_signature()]).encode()).hexdigest()[:16]
  out_dir = Path(out_dir or cache_dir())
  lib = out_dir / f'libcfrl_cpu_decode-{key}.so'
  if lib.exists():
    return lib
  out_dir.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=out_dir)
  os.close(fd)
  try:
    done = subprocess.run([cxx, *flags, f'-I{include}', str(SOURCE), '-o', tmp],
                          capture_output=True, text=True, check=False)
    if done.returncode:
      raise RuntimeError(f'{cxx} failed to build {SOURCE.name} (exit {done.returncode}):\n'
                         f'{done.stderr.strip()[-800:]}')
    os.replace(tmp, lib)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return lib


@functools.cache
def _register() -> str | None:
  """Builds and registers the kernel once per process; None on success, else why it is unavailable."""
  if os.environ.get(DISABLE_ENV, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return f'switched off by {DISABLE_ENV}={os.environ[DISABLE_ENV]}'
  try:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
    # Every operand and the result lead with the batch axis, and rows are independent: a batch
    # split over devices runs the kernel on each shard. (greedy_pick's batch axis is its last.)
    jax.ffi.register_ffi_target_as_batch_partitionable('cfrl_decode_attention')
  except (RuntimeError, OSError, AttributeError) as e:
    warnings.warn(f'cfrl_jax: the CPU decode kernels are unavailable, so the sampler uses its (slower) '
                  f'XLA ops: {e}. Set {DISABLE_ENV}=0 to silence this.', RuntimeWarning,
                  stacklevel=3)
    return str(e)
  return None


def available() -> bool:
  """Whether the kernels can run here (builds and registers the kernel on first call)."""
  return _register() is None


def _require(kernel: str) -> None:
  """Raises RuntimeError naming `kernel` and the reason when the kernels cannot run here."""
  reason = _register()
  if reason is not None:
    raise RuntimeError(f'{kernel}: the CPU decode kernels are unavailable: {reason}')


def unavailable_reason() -> str | None:
  """Why the kernel is unavailable (None when it is available)."""
  return _register()


# Slots per block of the kernel's key cache (block_keys).
KEY_BLOCK = 16


def block_keys(k):
  """Keys (..., S, hd) -> the kernel's layout (..., S / KEY_BLOCK, hd, KEY_BLOCK), same dtype.

  Each block holds KEY_BLOCK consecutive slots with their element i side by side, so that the
  kernel's scores load one vector per element and one (row, KV head)'s slots are one contiguous run
  (cpu_decode.cc says why). S must be a multiple of KEY_BLOCK.
  """
  *lead, S, hd = k.shape
  if S % KEY_BLOCK:
    raise ValueError(f'block_keys: the slot axis ({S}) must be a multiple of {KEY_BLOCK}; pad the cache to '
                     f'{-(-S // KEY_BLOCK) * KEY_BLOCK} slots.')
  return jnp.swapaxes(jnp.reshape(k, (*lead, S // KEY_BLOCK, KEY_BLOCK, hd)), -1, -2)


def decode_attention(q, k, v, mask, length):
  """Softmax attention of one query step (or of T query positions) per row over a KV cache, on the
  CPU backend.

  q: (B, Hkv, G, hd), or (B, T, Hkv, G, hd) for T query positions per row (a prefill), float32,
  already scaled by 1/sqrt(hd); k: (B, Hkv, S / 16, hd, 16) keys in blocks of 16 slots (block_keys
  of (B, Hkv, S, hd) keys; S a multiple of 16) and v: (B, Hkv, S, hd) values, float32 or bfloat16
  (as bfloat16 or as its uint16 bits), one dtype; mask: (B, S), nonzero on slots holding real
  tokens; length: (B,) int32, or (B, T) with T query positions: how many leading slots each query
  reads (1 <= length <= S, else a runtime error; later slots are ignored whatever the mask says, so
  length[b, t] = t + 1 is causal attention for queries at slots 0..T-1). Returns q's shape in
  float32. A query whose read slots are all masked gets zeros. Under vmap the mapped axes lead
  every operand (vmap_method 'broadcast_all').
  """
  _require('decode_attention')
  if q.ndim not in (4, 5):
    raise ValueError(f'decode_attention: q must be (B, Hkv, G, hd) or (B, T, Hkv, G, hd); got {q.shape}.')
  one_step = q.ndim == 4
  B, T, Hkv, G, hd = (q.shape[0], 1, *q.shape[1:]) if one_step else q.shape
  S = v.shape[2] if v.ndim == 4 else None
  if v.shape != (B, Hkv, S, hd) or S % KEY_BLOCK or k.shape != (B, Hkv, S // KEY_BLOCK, hd, KEY_BLOCK):
    raise ValueError(f'decode_attention: for q {q.shape} (Hkv = {Hkv}, hd = {hd}), v must be (B, Hkv, S, hd) '
                     f'with S a multiple of {KEY_BLOCK} and k (B, Hkv, S / {KEY_BLOCK}, hd, {KEY_BLOCK}) '
                     f'(block_keys); got k {k.shape}, v {v.shape}.')
  want = (B,) if one_step else (B, T)
  if mask.shape != (B, S) or length.shape != want:
    raise ValueError(f'decode_attention: mask {mask.shape} must be (B, S) = ({B}, {S}) and length '
                     f'{length.shape} must be {want}.')
  if k.dtype not in (jnp.float32, jnp.bfloat16, jnp.uint16) or v.dtype != k.dtype:
    raise ValueError(f'decode_attention: k and v must share a dtype among float32, bfloat16, uint16 '
                     f'(bfloat16 bits); got {k.dtype}, {v.dtype}.')
  shape = (B, T, Hkv, G, hd)
  call = jax.ffi.ffi_call('cfrl_decode_attention', jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method='broadcast_all')
  out = call(q.astype(jnp.float32).reshape(shape), k, v, mask.astype(jnp.int32),
             length.astype(jnp.int32).reshape(B, T))
  return out.reshape(q.shape)


def _greedy(kernel: str, logits, batch_axis: int):
  """The FFI call behind greedy_pick (rows on axis 1) and greedy_pick_rows (rows on axis 0)."""
  _require(kernel)
  layout = '(B, V)' if batch_axis == 0 else '(V, B)'
  if logits.ndim != 2 or logits.shape[1 - batch_axis] < 1:
    raise ValueError(f'{kernel}: logits must be {layout} with V >= 1; got {logits.shape}.')
  B = logits.shape[batch_axis]
  call = jax.ffi.ffi_call(f'cfrl_{kernel}', (jax.ShapeDtypeStruct((B,), jnp.int32),
                                            jax.ShapeDtypeStruct((B,), jnp.float32)),
                          vmap_method='sequential')
  return call(logits.astype(jnp.float32))


def greedy_pick_rows(logits_bv):
  """greedy_pick for logits laid out (B, V): vector lanes along V, so any B runs at full speed.

  Returns (tokens (B,) int32, logprobs (B,) float32): the first index of each row's maximum and
  its log-softmax value. NaN logits are not detected (a NaN is never the maximum).
  """
  return _greedy('greedy_pick_rows', logits_bv, batch_axis=0)


# Columns per vector of greedy_pick: a (V, B) input with B a multiple of this runs only full vectors.
GREEDY_LANES = 16


def greedy_pick(logits_vb):
  """Greedy choice over logits laid out (V, B), on the CPU backend: (tokens (B,) int32, logprobs (B,)
  float32), the first index of each column's maximum and its log-softmax value.

  For B a multiple of GREEDY_LANES all columns run in vector lanes; others run the last B % 16
  columns one at a time (slower). NaN logits are not detected (a NaN is never the maximum).
  """
  return _greedy('greedy_pick', logits_vb, batch_axis=1)


def _check_product(kernel: str, x, w) -> None:
  """The kernels are available and x (rows, K), w (N, K) share K; else an error naming `kernel`."""
  _require(kernel)
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
    raise ValueError(f'{kernel}: expected x (rows, K) and w (N, K) with the same K; got x {x.shape}, w {w.shape}.')


def matvec(x, w):
  """x w^T for a few rows on the CPU backend: x (B, K) times a weight-major w (N, K) -> (B, N)
  float32.

  w: float32, bfloat16 or its uint16 bits; x is converted to float32 (exact from bfloat16), so a
  bfloat16 w gives exact products accumulated in float32, as a bfloat16 dot with a float32 result.
  Streams each weight once, R rows at a time, the rows of x sharing each loaded weight vector;
  meant for a decode step's few rows (the sampler's kernel_products), not for large B.
  Under vmap the call runs once per mapped index (vmap_method 'sequential').
  """
  _check_product('matvec', x, w)
  if w.dtype not in (jnp.float32, jnp.bfloat16, jnp.uint16):
    raise ValueError(f'matvec: w must be float32, bfloat16 or uint16 (bfloat16 bits); got {w.dtype}.')
  (B, _), (N, _) = x.shape, w.shape
  call = jax.ffi.ffi_call('cfrl_matvec', jax.ShapeDtypeStruct((B, N), jnp.float32), vmap_method='sequential')
  return call(x.astype(jnp.float32), w)


def matmul(x, w):
  """x w^T for many rows on the CPU backend: x (M, K) times a weight-major float32 w (N, K) -> (M, N)
  float32; matvec's product, register-blocked for the rows of a large decode batch.

  x is transposed once per call into (K, 64) column blocks; each tile of 6 weight rows (fewer
  vectors of rows: 8 or 12) then holds its (6, 64) block of the result in registers while its
  weights are broadcast from w's rows as they lie, so every weight is read once per 64 rows of x
  (cpu_decode.cc says why). Accumulates in float32, one FMA per term, in order within partial
  sums of 128 terms that are then added up in order.
  Under vmap the call runs once per mapped index (vmap_method 'sequential').
  """
  _check_product('matmul', x, w)
  if w.dtype != jnp.float32:
    raise ValueError(f'matmul: w must be float32 (use matvec or an XLA product for {w.dtype}); got {w.dtype}.')
  (M, _), (N, _) = x.shape, w.shape
  call = jax.ffi.ffi_call('cfrl_matmul', jax.ShapeDtypeStruct((M, N), jnp.float32), vmap_method='sequential')
  return call(x.astype(jnp.float32), w)
