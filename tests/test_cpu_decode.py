"""The compiled CPU decode kernels (cfrl_jax/kernels/cpu_decode.*) against float64 numpy, and the
sampler with them against the sampler with XLA ops."""
import ctypes
import os
import platform
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax import sampling
from cfrl_jax.kernels import cpu_decode
from cfrl_jax.models import qwen


def _attention_reference(q, k, v, mask, length):
  """float64 softmax attention: q (B, H, G, hd), k, v (B, H, S, hd) -> (B, H, G, hd)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.zeros(q.shape)
  for b in range(q.shape[0]):
    n = int(length[b])
    real = np.asarray(mask[b, :n]) > 0
    if not real.any():
      continue
    scores = np.einsum('kgh,ksh->kgs', q[b], k[b, :, :n])
    scores[..., ~real] = -np.inf
    p = np.exp(scores - scores.max(-1, keepdims=True))
    out[b] = np.einsum('kgs,ksh->kgh', p / p.sum(-1, keepdims=True), v[b, :, :n])
  return out


def _attention_case(B, H, G, hd, S, seed):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, H, G, hd)).astype(np.float32) / np.sqrt(hd)
  k = (rng.normal(size=(B, H, S, hd)) * 2).astype(np.float32)
  v = rng.normal(size=(B, H, S, hd)).astype(np.float32)
  length = rng.integers(1, S + 1, size=B).astype(np.int32)
  length[0] = S                                       # one row reads the whole cache
  length[1] = min(S, 7)                               # one reads part of one key block
  mask = (rng.random((B, S)) > 0.3).astype(np.int32)  # left pads and holes
  mask[np.arange(B), length - 1] = 1                  # the current slot is always real
  mask[-1, length[-1]:] = 1                           # slots past `length` must be ignored
  return q, k, v, mask, length


def _blocked(k):
  """Keys (B, H, S, hd) -> (B, H, S / 16, hd, 16): element i of slot s at [s // 16, i, s % 16]."""
  B, H, S, hd = k.shape
  return np.ascontiguousarray(k.reshape(B, H, S // 16, 16, hd).transpose(0, 1, 2, 4, 3))


def test_block_keys_layout_and_bad_slot_count():
  k = np.random.default_rng(0).normal(size=(2, 3, 32, 8)).astype(np.float32)
  kb = np.asarray(cpu_decode.block_keys(jnp.asarray(k)))
  np.testing.assert_array_equal(kb, _blocked(k))
  assert kb[1, 2, 1, 5, 3] == k[1, 2, 16 + 3, 5]
  with pytest.raises(ValueError, match='slot axis \\(20\\) must be a multiple of 16; pad the cache to 32'):
    cpu_decode.block_keys(jnp.zeros((2, 20, 8)))


@pytest.mark.parametrize('hd,G,S', [
    (64, 4, 48),    # vector path, lengths inside blocks
    (16, 5, 48),    # vector path, a group of 4 queries plus 1
    (128, 2, 16),   # vector path, one block
    (32, 3, 16),    # vector path, a row reading fewer slots than lanes
    (12, 3, 32),    # scalar path (head_dim not a multiple of 16)
    (8, 1, 16)])
def test_decode_attention_equals_float64_softmax_attention(cpu_kernels, hd, G, S):
  q, k, v, mask, length = _attention_case(4, 2, G, hd, S, seed=hd + G + S)
  ref = _attention_reference(q, k, v, mask, length)
  kt = _blocked(k)
  out = jax.jit(cpu_kernels.decode_attention)(q, kt, v, mask, length)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6, rtol=2e-6)
  # bfloat16 caches, as bfloat16 and as their uint16 bits: exact float32 maths on the rounded values.
  kb, vb = jnp.asarray(kt, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
  ref16 = _attention_reference(q, np.asarray(jnp.asarray(k, jnp.bfloat16), np.float32), np.asarray(vb, np.float32),
                               mask, length)
  bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
  for kc, vc in ((kb, vb), (bits(kb), bits(vb))):
    np.testing.assert_allclose(np.asarray(cpu_kernels.decode_attention(q, kc, vc, mask, length)), ref16,
                               atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize('hd', [64, 12])   # vector and scalar paths
def test_decode_attention_with_several_query_positions_is_causal_prefill_attention(cpu_kernels, hd):
  """q (B, T, Hkv, G, hd) with length[b, t] = t + 1: each query position equals a one-step call,
  i.e. causal attention over the slots up to it (with the mask's left pads and holes)."""
  B, T, H, G, S = 3, 21, 2, 4, 32
  q, k, v, mask, _ = _attention_case(B, H, G, hd, S, seed=hd)
  qt = np.random.default_rng(hd).normal(size=(B, T, H, G, hd)).astype(np.float32) / np.sqrt(hd)
  mask[:, :T] = 1
  mask[0, :5] = 0                                     # left pads: queries 0-4 of row 0 see nothing
  length = np.tile(np.arange(1, T + 1, dtype=np.int32), (B, 1))
  out = np.asarray(jax.jit(cpu_kernels.decode_attention)(qt, _blocked(k), v, mask, length))
  assert out.shape == qt.shape
  for t in range(T):
    ref = _attention_reference(qt[:, t], k, v, mask, length[:, t])
    np.testing.assert_allclose(out[:, t], ref, atol=2e-6, rtol=2e-6)
  assert np.all(out[0, :5] == 0)
  with pytest.raises(ValueError, match=r'length \(3,\) must be \(3, 21\)'):
    cpu_kernels.decode_attention(qt, _blocked(k), v, mask, length[:, 0])


def test_decode_attention_under_vmap_and_with_nothing_to_attend(cpu_kernels):
  q, k, v, mask, length = _attention_case(3, 2, 4, 16, 32, seed=1)
  kt = _blocked(k)
  one = np.asarray(cpu_kernels.decode_attention(q, kt, v, mask, length))
  two = jax.vmap(cpu_kernels.decode_attention, in_axes=(0, 0, 0, 0, 0))(
      *(np.stack([x, x]) for x in (q, kt, v, mask, length)))
  np.testing.assert_array_equal(np.asarray(two), np.stack([one, one]))
  # Only k batched: the other operands are broadcast to the mapped axis.
  kk = np.stack([kt, kt * 0.5])
  mapped = jax.vmap(cpu_kernels.decode_attention, in_axes=(None, 0, None, None, None))(q, kk, v, mask, length)
  np.testing.assert_allclose(np.asarray(mapped[1]), _attention_reference(q * 0.5, k, v, mask, length), atol=2e-6)
  mask0 = mask.copy()
  mask0[1, :length[1]] = 0                            # row 1 reads only masked slots: zeros
  out = np.asarray(cpu_kernels.decode_attention(q, kt, v, mask0, length))
  assert np.all(out[1] == 0) and np.all(np.isfinite(out))


def test_decode_attention_rejects_bad_operands(cpu_kernels):
  q, k, v, mask, length = _attention_case(2, 2, 4, 16, 32, seed=2)
  kt = _blocked(k)
  with pytest.raises(ValueError, match=r'k \(B, Hkv, S / 16, hd, 16\) \(block_keys\)'):
    cpu_kernels.decode_attention(q, k, v, mask, length)          # keys not in blocks
  with pytest.raises(ValueError, match='S a multiple of 16'):
    cpu_kernels.decode_attention(q, kt[:, :, :1], v[:, :, :20], mask[:, :20], length)
  with pytest.raises(ValueError, match=r'mask .* must be \(B, S\)'):
    cpu_kernels.decode_attention(q, kt, v, mask[:, :5], length)
  with pytest.raises(ValueError, match='share a dtype'):
    cpu_kernels.decode_attention(q, kt, v.astype(np.float16), mask, length)
  with pytest.raises(Exception, match=r'length\[1\] = 33 is outside \[1, 32\]'):
    jax.block_until_ready(cpu_kernels.decode_attention(q, kt, v, mask, np.array([3, 33], np.int32)))


@pytest.mark.parametrize('B', [16, 48, 5, 21])  # vector lanes only; one at a time only; both
def test_greedy_pick_equals_first_argmax_and_log_softmax(cpu_kernels, B):
  rng = np.random.default_rng(B)
  z = (rng.normal(size=(600, B)) * 4).astype(np.float32)   # 600 rows: chunks of 256, 256 and 88
  z[[7, 250, 520], 0] = z[:, 0].max() + 1.0            # a tie within and across chunks: the first wins
  z[:, 1] = -3.0                                       # all equal: index 0
  z[:, 2] = np.linspace(-40, 40, 600)                  # the max grows chunk after chunk (rescaled sums)
  z[:300, 3] = -np.inf                                 # a first chunk without mass (masked logits)
  tokens, logprobs = jax.jit(cpu_kernels.greedy_pick)(z)
  z64 = z.astype(np.float64)
  log_softmax = z64 - z64.max(0) - np.log(np.exp(z64 - z64.max(0)).sum(0))
  np.testing.assert_array_equal(np.asarray(tokens), np.argmax(z, axis=0))
  assert tokens[0] == 7 and tokens[1] == 0 and tokens[2] == 599
  np.testing.assert_allclose(np.asarray(logprobs), log_softmax[np.argmax(z, 0), np.arange(B)], atol=2e-6)
  with pytest.raises(ValueError, match=r'\(V, B\)'):
    cpu_kernels.greedy_pick(z[None])


@pytest.mark.parametrize('V', [300, 37])   # vector lanes plus a tail; a tail after one vector
def test_greedy_pick_rows_equals_first_argmax_and_log_softmax(cpu_kernels, V):
  rng = np.random.default_rng(V)
  z = (rng.normal(size=(4, V)) * 4).astype(np.float32)
  z[0, [7, 33]] = z[0].max() + 1.0                     # a tie across vector lanes: the first wins
  z[1] = -3.0                                          # all equal: index 0
  z[2, V - 1] = z[2].max() + 1.0                       # the maximum in the tail
  z[3, [17, 1]] = z[3].max() + 1.0                     # a tie whose first index is in a later lane
  tokens, logprobs = jax.jit(cpu_kernels.greedy_pick_rows)(z)
  z64 = z.astype(np.float64)
  log_softmax = z64 - z64.max(1, keepdims=True) - np.log(np.exp(z64 - z64.max(1, keepdims=True)).sum(1, keepdims=True))
  np.testing.assert_array_equal(np.asarray(tokens), np.argmax(z, axis=1))
  assert list(np.asarray(tokens)) == [7, 0, V - 1, 1]
  np.testing.assert_allclose(np.asarray(logprobs), log_softmax[np.arange(4), np.argmax(z, 1)], atol=2e-6)
  with pytest.raises(ValueError, match=r'\(B, V\)'):
    cpu_kernels.greedy_pick_rows(z[None])


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('B,N,K', [(1, 37, 20), (3, 37, 20), (4, 64, 48), (9, 70, 33), (1, 130, 64)])
def test_matvec_equals_float64_product(cpu_kernels, dtype, B, N, K):
  """Row counts on every tile path (8 weight rows for one x row; 4 x 4 tiles; remainder rows of
  both), N not a multiple of the tiles, K with a partial vector."""
  rng = np.random.default_rng(B * N + K)
  x = rng.normal(size=(B, K)).astype(np.float32)
  w = jnp.asarray(rng.normal(size=(N, K)).astype(np.float32)).astype(dtype)
  y = np.asarray(jax.jit(cpu_kernels.matvec)(x, w))
  w64 = np.asarray(w.astype(jnp.float32), np.float64)
  ref = x.astype(np.float64) @ w64.T
  scale = np.abs(x).astype(np.float64) @ np.abs(w64).T
  assert y.shape == (B, N) and y.dtype == np.float32
  assert np.all(np.abs(y - ref) <= 1e-6 * scale + 1e-7), np.max(np.abs(y - ref) / scale)
  bits = jax.lax.bitcast_convert_type(w, jnp.uint16) if dtype == 'bfloat16' else w
  np.testing.assert_array_equal(np.asarray(cpu_kernels.matvec(x, bits)), y)     # uint16 bits read alike
  with pytest.raises(ValueError, match=r'the same K'):
    cpu_kernels.matvec(x, w[:, :-1])
  with pytest.raises(ValueError, match=r'float32, bfloat16 or uint16'):
    cpu_kernels.matvec(x, jnp.zeros((N, K), jnp.int32))


@pytest.mark.parametrize('M,N,K', [
    (64, 97, 70),     # 4 row vectors: tiles of 6 weight rows, 1-row tail tiles, a partial band, K % 16 != 0
    (20, 50, 33),     # 2 row vectors (tiles of 12), rows padded to 32
    (48, 48, 16),     # 3 row vectors (tiles of 8), one full band of 48 written in 16 x 16 transposed blocks
    (5, 130, 64),     # 1 row vector
    (150, 200, 40)])  # three passes over w (64 + 64 + 22 rows)
def test_matmul_equals_float64_product(cpu_kernels, M, N, K):
  rng = np.random.default_rng(M * N + K)
  x = rng.normal(size=(M, K)).astype(np.float32)
  w = rng.normal(size=(N, K)).astype(np.float32)
  y = np.asarray(jax.jit(cpu_kernels.matmul)(x, w))
  ref = x.astype(np.float64) @ w.astype(np.float64).T
  scale = np.abs(x).astype(np.float64) @ np.abs(w.astype(np.float64)).T
  assert y.shape == (M, N) and y.dtype == np.float32
  assert np.all(np.abs(y - ref) <= 1e-6 * scale + 1e-7), np.max(np.abs(y - ref) / scale)
  # Each output is one in-order FMA chain along K, whatever the row's place in its tile or pass.
  np.testing.assert_array_equal(np.asarray(cpu_kernels.matmul(x[7:7 + 3], w)), y[7:10])
  with pytest.raises(ValueError, match=r'the same K'):
    cpu_kernels.matmul(x, w[:, :-1])
  with pytest.raises(ValueError, match=r'w must be float32'):
    cpu_kernels.matmul(x, jnp.asarray(w, jnp.bfloat16))


def _fake_compiler(tmp_path, library):
  """A 'compiler' that logs its arguments and copies `library` (already built) to its -o path: build()'s
  bookkeeping without a real compile of cpu_decode.cc (minutes at -O3 on a 2-core machine)."""
  log = tmp_path / 'fake-cxx.log'
  fake = tmp_path / 'fake-cxx'
  fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "fake-cxx 1.0"; exit 0; }\n'
                  f'echo "$@" >> {log}\n'
                  'while [ $# -gt 1 ]; do [ "$1" = -o ] && out=$2; shift; done\n'
                  f'cp {library} "$out"\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  return str(fake), log


def test_build_reuses_the_library_and_reports_a_failing_compiler(cpu_kernels, tmp_path, monkeypatch):
  monkeypatch.delenv(cpu_kernels.MARCH_ENV, raising=False)
  cxx, log = _fake_compiler(tmp_path, cpu_kernels.build())
  out = tmp_path / 'libs'
  lib = cpu_kernels.build(out, cxx=cxx)
  assert lib.parent == out and lib.exists() and [p.name for p in out.iterdir()] == [lib.name]
  assert hasattr(ctypes.cdll.LoadLibrary(str(lib)), 'CfrlMatmul')          # the renamed file is whole
  args = log.read_text().split()
  assert '-march=native' in args and '-O3' in args and str(cpu_kernels.SOURCE) in args
  assert f'-I{jax.ffi.include_dir()}' in args
  built = lib.stat().st_mtime_ns
  assert cpu_kernels.build(out, cxx=cxx) == lib and lib.stat().st_mtime_ns == built     # not rebuilt
  assert len(log.read_text().splitlines()) == 1
  # Another -march is another library, built with that flag.
  monkeypatch.setenv(cpu_kernels.MARCH_ENV, 'x86-64-v3')
  assert cpu_kernels.cxx_flags()[1] == '-march=x86-64-v3'
  other = cpu_kernels.build(out, cxx=cxx)
  assert other != lib and '-march=x86-64-v3' in log.read_text().splitlines()[1].split()
  broken = tmp_path / 'broken-cxx'
  broken.write_text('#!/bin/sh\necho "broken-cxx: no such luck" >&2\nexit 3\n')
  broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
  with pytest.raises(RuntimeError, match=r'failed to build cpu_decode.cc \(exit 3\):\nbroken-cxx: no such luck'):
    cpu_kernels.build(tmp_path / 'other', cxx=str(broken))
  assert not any((tmp_path / 'other').iterdir())                   # no half-written library left


# -march targets whose code paths the float64 tests above also check, where this CPU runs them: the
# portable build (SSE2, no FMA: separate roundings of each product and sum), AVX2 + FMA (the
# non-AVX-512 path of an AVX-512 machine) and AVX-512. A CPU lacking one skips it.
ISAS = {'x86-64': ('x86_64', ()),
        'x86-64-v3': ('x86_64', ('avx2', 'fma', 'bmi2', 'f16c', 'movbe')),
        'x86-64-v4': ('x86_64', ('avx512f', 'avx512bw', 'avx512cd', 'avx512dq', 'avx512vl')),
        'armv8-a': ('aarch64', ())}
REFERENCE_TESTS = 'float64 or first_argmax or causal_prefill'


@pytest.mark.slow      # one -O3 build of cpu_decode.cc per target (minutes on 2 cores), then cached
@pytest.mark.parametrize('march', list(ISAS))
def test_kernels_built_for_each_isa_pass_the_reference_tests(cpu_kernels, march):
  machine, needs = ISAS[march]
  if platform.machine() != machine:
    pytest.skip(f'-march={march} is for {machine}; this machine is {platform.machine()}')
  flags = set(cpu_kernels._cpu_signature().split())  # pylint: disable=protected-access
  missing = [f for f in needs if f not in flags]
  if missing:
    pytest.skip(f'this CPU lacks {missing}, which -march={march} code uses')
  probe = subprocess.run([cpu_kernels.compiler(), f'-march={march}', '-x', 'c++', '-E', '-', '-o', os.devnull],
                         input='', capture_output=True, text=True, check=False)
  if probe.returncode:
    pytest.skip(f'{cpu_kernels.compiler()} does not know -march={march}: {probe.stderr.strip()[-200:]}')
  env = {k: v for k, v in os.environ.items() if k not in (cpu_kernels.DISABLE_ENV, 'PYTEST_ADDOPTS')}
  env[cpu_kernels.MARCH_ENV] = march
  done = subprocess.run([sys.executable, '-m', 'pytest', __file__, '-k', REFERENCE_TESTS],
                        cwd=os.path.dirname(os.path.dirname(__file__)), env=env, capture_output=True, text=True,
                        check=False)
  assert done.returncode == 0 and ' passed' in done.stdout and 'skipped' not in done.stdout, done.stdout[-3000:]


def test_switched_off_kernels_fall_back_to_xla_attention(monkeypatch):
  cfg = qwen.QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=16)
  cpu_decode._register.cache_clear()  # pylint: disable=protected-access
  monkeypatch.setenv(cpu_decode.DISABLE_ENV, '0')
  try:
    assert not cpu_decode.available()
    assert cpu_decode.unavailable_reason() == f'switched off by {cpu_decode.DISABLE_ENV}=0'
    with pytest.raises(RuntimeError, match='matvec: the CPU decode kernels are unavailable: switched off'):
      cpu_decode.matvec(jnp.ones((1, 4)), jnp.ones((2, 4)))
    with pytest.raises(RuntimeError, match='greedy_pick_rows: the CPU decode kernels are unavailable'):
      cpu_decode.greedy_pick_rows(jnp.ones((1, 4)))
    assert sampling.attention_default(cfg) == 'xla'
    with pytest.raises(ValueError, match=r"attention='kernel' is unavailable here \(switched off"):
      sampling.resolve_attention(cfg, 'kernel', True)
  finally:
    monkeypatch.undo()            # CFRL_JAX_CPU_KERNELS as it was (a whole run may set it to 0)
    cpu_decode._register.cache_clear()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="expected one of"):
    sampling.resolve_attention(cfg, 'flash', True)
  with pytest.raises(ValueError, match='float32 and bfloat16 caches, not float16'):
    sampling.resolve_attention(cfg.replace(dtype='float16', param_dtype='float16'), 'kernel', True)
  # (With the kernels switched off for the whole run, unavailability is the first error.)
  with pytest.raises(ValueError, match='needs the unrolled sampler' if cpu_decode.available() else 'unavailable here'):
    sampling.resolve_attention(cfg, 'kernel', False)
  assert sampling.resolve_attention(cfg, None, False) == 'xla'


# Kernel products and greedy_pick_rows at both: 3 rows through matvec, 21 through matmul; head_dim 16
# and 12: the kernel's vector and scalar attention. Four sampler compiles per case: slow (over 15 s
# each on 2 cores); the default run's float32 sampler tests (test_sampling) run the kernels already.
@pytest.mark.slow
@pytest.mark.parametrize('rows,head_dim', [(3, 12), (21, 16), (3, 16), (21, 12)])
def test_sampler_with_kernels_equals_sampler_with_xla_ops(cpu_kernels, rows, head_dim):
  """float32: the same tokens and masks, log-probs within float32 summation-order noise, greedy and
  sampled (temperature, top-p), stop ids and left padding included."""
  cfg = qwen.QwenConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=head_dim, eos_token_id=(3,))
  params = qwen.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
  rng = np.random.RandomState(rows)
  lengths = rng.randint(1, 9, size=rows)
  tokens = np.zeros((rows, 8), np.int32)
  mask = np.zeros((rows, 8), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, 8 - n:] = rng.randint(4, cfg.vocab_size, size=n)
    mask[i, 8 - n:] = 1
  for kw in (dict(greedy=True), dict(temperature=0.8, top_p=0.9)):
    outs = {a: sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(1), max_new_tokens=20,
                               stop_token_ids=(3,), attention=a, **kw) for a in ('xla', 'kernel')}
    np.testing.assert_array_equal(np.asarray(outs['kernel'].tokens), np.asarray(outs['xla'].tokens))
    np.testing.assert_array_equal(np.asarray(outs['kernel'].mask), np.asarray(outs['xla'].mask))
    assert np.asarray(outs['xla'].mask).sum() > rows * 4
    for field in ('logprobs', 'sample_logprobs'):
      np.testing.assert_allclose(np.asarray(getattr(outs['kernel'], field)),
                                 np.asarray(getattr(outs['xla'], field)), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_sampler_with_kernel_products_matches_xla_products(cpu_kernels):
  """bfloat16, 3 rows: matvec reads the bfloat16 weights widened (exact products, float32 sums), as
  XLA's bfloat16 dots with a float32 result do; only the order of the sums differs, and with it which
  way a bf16 activation rounds. So both samplers must pick the same greedy tokens and be about as close
  to a float32 recomputation as a bf16 full forward is: the tolerance is bf16 rounding measured on this
  CPU (its bf16 dots may run on AVX512-BF16 or AMX), not a fixed bound."""
  cfg = qwen.QwenConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, dtype='bfloat16', param_dtype='bfloat16')
  assert sampling.kernel_products(cfg, 'kernel', 3)
  params = qwen.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
  tokens = np.random.RandomState(0).randint(4, cfg.vocab_size, size=(3, 6)).astype(np.int32)
  outs = {a: sampling.sample(cfg, params, tokens, np.ones_like(tokens), jax.random.PRNGKey(1), max_new_tokens=6,
                             greedy=True, stop_token_ids=(), attention=a) for a in ('xla', 'kernel')}
  np.testing.assert_array_equal(np.asarray(outs['kernel'].tokens), np.asarray(outs['xla'].tokens))
  full = np.concatenate([tokens, np.asarray(outs['xla'].tokens)], 1)
  cfg32 = cfg.replace(dtype='float32', param_dtype='float32')
  params32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  ref = np.asarray(qwen.token_logprobs(cfg32, params32, full, np.ones_like(full))[0])[:, tokens.shape[1] - 1:]
  peer = np.asarray(qwen.token_logprobs(cfg, params, full, np.ones_like(full))[0], np.float32)[:, tokens.shape[1] - 1:]
  e_peer = np.abs(peer - ref)
  assert 0 < e_peer.mean() < 0.05                              # the peer is bf16-accurate, not exact
  for a, out in outs.items():
    e = np.abs(np.asarray(out.logprobs) - ref)
    assert e.mean() <= 1.5 * e_peer.mean() + 0.005, (a, e.mean(), e_peer.mean())
    assert e.max() <= 3 * e_peer.max() + 0.02, (a, e.max(), e_peer.max())


def test_sampler_default_attention_is_the_kernel_on_cpu(cpu_kernels):
  cfg = qwen.QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=16)
  assert sampling.attention_default(cfg) == 'kernel'
  assert sampling.attention_default(cfg.replace(dtype='bfloat16', param_dtype='bfloat16')) == 'kernel'
  assert sampling.attention_default(cfg.replace(dtype='float64', param_dtype='float64')) == 'xla'
  assert sampling.decode_segments_default(128, 'kernel') == 1      # it reads only the written slots
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  jaxpr = str(jax.make_jaxpr(lambda p: sampling.decode_loop.sample_padded(
      sampling.prepare_decode(cfg, p), jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), jnp.int32),
      jnp.ones((2,), bool), jax.random.PRNGKey(0), 1.0, 1.0, jnp.zeros((0,), jnp.int32), 0, cfg=cfg,
      max_new_tokens=4, greedy=True, top_k=0, use_top_p=False, unroll_layers=True, attention='kernel'))(params))
  # One call per layer in the prefill and one in the loop.
  assert jaxpr.count('cfrl_decode_attention') == 2 * cfg.num_layers
  assert jaxpr.count('cfrl_matvec') == 0 and jaxpr.count('cfrl_greedy_pick') == 0
  assert os.environ.get(cpu_decode.DISABLE_ENV) is None


@pytest.mark.parametrize('dtype,rows,product', [('float32', 2, 'matvec'), ('float32', 17, 'matmul'),
                                                ('bfloat16', 2, 'matvec'), ('bfloat16', 17, None)])
def test_kernel_products_run_the_decode_step_products(cpu_kernels, dtype, rows, product):
  """Decode steps with attention='kernel' run the layers' four products and the head in the compiled
  kernels and pick greedily with greedy_pick_rows: float32 at any row count (matvec for at most
  MATVEC_MAX_ROWS rows, else matmul), bfloat16 up to BF16_KERNEL_PRODUCTS_MAX_ROWS rows (matvec);
  larger bfloat16 steps keep XLA's products, and the prefill always does."""
  cfg = qwen.QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, dtype=dtype, param_dtype=dtype)
  products = product is not None
  assert sampling.kernel_products(cfg, 'kernel', rows) == products
  assert not sampling.kernel_products(cfg, 'xla', rows)
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  jaxpr = str(jax.make_jaxpr(lambda p: sampling.decode_loop.sample_padded(
      sampling.prepare_decode(cfg, p), jnp.ones((rows, 4), jnp.int32), jnp.ones((rows, 4), jnp.int32),
      jnp.ones((rows,), bool), jax.random.PRNGKey(0), 1.0, 1.0, jnp.zeros((0,), jnp.int32), 0, cfg=cfg,
      max_new_tokens=4, greedy=True, top_k=0, use_top_p=False, unroll_layers=True, attention='kernel',
      kernel_products=products))(params))
  for name in ('matvec', 'matmul'):
    assert jaxpr.count(f'cfrl_{name}') == (4 * cfg.num_layers + 1 if name == product else 0), name
  assert jaxpr.count('cfrl_greedy_pick_rows') == int(products)
  with pytest.raises(ValueError, match="needs attention='kernel'"):
    sampling.decode_loop.sample_padded(
        sampling.prepare_decode(cfg, params), jnp.ones((rows, 4), jnp.int32), jnp.ones((rows, 4), jnp.int32),
        jnp.ones((rows,), bool), jax.random.PRNGKey(0), 1.0, 1.0, jnp.zeros((0,), jnp.int32), 0, cfg=cfg,
        max_new_tokens=4, greedy=True, top_k=0, use_top_p=False, unroll_layers=True, attention='xla',
        kernel_products=True)
