"""cfrl_jax.dynamics.ntk against brute force: explicit Jacobians (jax.jacrev over the flattened
parameters) in float64 on tiny Qwen2 (q/k/v biases) and Qwen3 (q/k norms) models,
untied and tied.

float64: the module enters jax.enable_x64 for its own tests only (a module fixture, undone
when the module finishes); a model built with dtype='float64' is then float64 end to end
(qwen.py's upcasts for RMSNorm, attention scores and logits promote, never downcast).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from cfrl_jax.dynamics import ntk
from cfrl_jax.models import qwen

TOL = 1e-10


@pytest.fixture(scope='module', autouse=True)
def float64_model():
  with jax.enable_x64(True):
    yield


MODELS = {
    'qwen3_tied': dict(model_type='qwen3', tie='tied', qk_norm=True, attention_bias=False),
    'qwen2_untied': dict(model_type='qwen2', tie='untied'),
    'qwen2_tied': dict(model_type='qwen2', tie='tied'),
}
# Default runs cover the tied Qwen3 (q/k norms, cross terms) everywhere and the untied Qwen2
# (q/k/v biases) on the Gram matrix; `-m slow` runs every test on both.
TIED_FAST = ['qwen3_tied', pytest.param('qwen2_untied', marks=pytest.mark.slow)]
# Halves XLA's compile time; at float64 the numerics are unchanged at the tolerance used here.
OPTS = {'xla_backend_optimization_level': 0}


@functools.cache
def make_model(name, dtype='float64', seed=0):
  cfg = qwen.QwenConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                        num_kv_heads=1, head_dim=8, dtype=dtype, param_dtype=dtype, **MODELS[name])
  params = qwen.init_params(cfg, jax.random.PRNGKey(seed), std=0.3)
  # Non-trivial norm weights and biases, so every parameter group matters.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return cfg, jax.tree_util.tree_unflatten(tree, leaves)


@pytest.fixture(params=TIED_FAST)
def name(request):
  return request.param


@functools.cache
def jitted(fn, cfg, **kw):
  return jax.jit(functools.partial(fn, cfg, **kw), compiler_options=OPTS)


def features_at(cfg, params, pts):
  """phi at the points (n, d), compiled (eager op-by-op dispatch is slow)."""
  f = jax.jit(lambda b, p: qwen.features(cfg, b, p.tokens, p.mask)[0][p.seq, p.pos], compiler_options=OPTS)
  return f(params['backbone'], pts)


def batch_a():
  tokens = jnp.asarray(np.random.RandomState(0).randint(1, 48, (3, 7)))
  mask = jnp.asarray([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])
  return ntk.Points(tokens, mask, jnp.asarray([0, 0, 1, 2, 2]), jnp.asarray([2, 5, 3, 1, 4]))


def batch_b():
  tokens = jnp.asarray(np.random.RandomState(1).randint(1, 48, (2, 6)))
  mask = jnp.asarray([[0, 1, 1, 1, 1, 1], [1] * 6])
  return ntk.Points(tokens, mask, jnp.asarray([0, 1, 1, 0]), jnp.asarray([1, 0, 4, 4]))


def pairs():
  """Pairs (a_i, b_i) of contexts: the first 4 points of batch a with the 4 of batch b."""
  a, b = batch_a(), batch_b()
  return ntk.Points(a.tokens, a.mask, a.seq[:4], a.pos[:4]), b


# --- brute force ------------------------------------------------------------
def view_fn(cfg, out):
  """out(cfg, params) -> (N,) as a function of the untied view (W, backbone)."""
  ucfg = cfg.replace(tie='untied')
  return lambda w, b: out(ucfg, {'backbone': b, 'head': {'w': w}})


def jacobians(cfg, params, out):
  """Explicit Jacobians of out(cfg, params) (N,): head use H (N, Vd), backbone B (N, Pb) over
  ravel_pytree(backbone), its embedding columns BE (N, Vd), and the model's own J (N, P) over
  ravel_pytree(params): for a tied model a separate Jacobian (the embedding is input AND head);
  for an untied model the view is the model, so J = [H, B]."""
  w, bb = qwen.head_params(cfg, params)['w'], params['backbone']
  f = view_fn(cfg, out)
  flat_b, unravel_b = ravel_pytree(bb)
  H, B = jax.jacrev(lambda w_, fb: f(w_, unravel_b(fb)), argnums=(0, 1))(w, flat_b)
  n = B.shape[0]
  H = H.reshape(n, -1)
  leaves = jax.tree_util.tree_leaves(bb)
  start = sum(x.size for x in leaves[:[x is bb['embed'] for x in leaves].index(True)])
  BE = B[:, start:start + bb['embed'].size]
  if cfg.tie == 'untied':
    return H, B, BE, jnp.concatenate([H, B], axis=1)
  flat, unravel = ravel_pytree(params)
  return H, B, BE, jax.jacrev(lambda x: out(cfg, unravel(x)))(flat)


def logprob_out(points):
  def out(cfg, params):
    z, _ = qwen.forward(cfg, params, points.tokens, points.mask)
    logp = jax.nn.log_softmax(z, axis=-1)
    return logp[points.seq, points.pos, points.tokens[points.seq, points.pos + 1]]
  return out


def logits_out(points):
  """All V logits at each point, flattened: (n * V,)."""
  def out(cfg, params):
    z, _ = qwen.forward(cfg, params, points.tokens, points.mask)
    return z[points.seq, points.pos].reshape(-1)
  return out


def all_logits_out(points):
  def out(cfg, params):
    return qwen.forward(cfg, params, points.tokens, points.mask)[0].reshape(-1)
  return out


@functools.cache
def brute_jacobians(name, key):
  """Explicit Jacobians of one output set of one model (numpy), computed once per session."""
  cfg, params = make_model(name)
  pts = {'a': batch_a(), 'b': batch_b()}[key[-1]]
  if key.startswith('phi'):
    def f(p):
      flat, unravel = ravel_pytree(p['backbone'])
      phi = lambda x: qwen.features(cfg, unravel(x), pts.tokens, pts.mask)[0][pts.seq[:2], pts.pos[:2]]
      return jax.jacrev(phi)(flat)                  # (2, d, Pb)
  else:
    out = {'lp': logprob_out, 'all': all_logits_out}[key[:-2]](pts)
    f = lambda p: jacobians(cfg, p, out)
  return jax.device_get(jax.jit(f, compiler_options=OPTS)(params))


class brute:
  """brute(name)[key]: 'lp_a'/'lp_b' log-probs at the points of batch a/b, 'all_a'/'all_b' every
  logit of the batch, 'z_a'/'z_b' the logits at the points, 'phi_a'/'phi_b' phi at 2 points."""

  def __init__(self, name):
    self.name = name

  def __getitem__(self, key):
    if not key.startswith('z'):
      return brute_jacobians(self.name, key)
    # The logits at the points are rows of the all-position Jacobians.
    V = make_model(self.name)[0].vocab_size
    pts = {'a': batch_a(), 'b': batch_b()}[key[-1]]
    width = pts.tokens.shape[1]
    rows = ((np.asarray(pts.seq) * width + np.asarray(pts.pos))[:, None] * V + np.arange(V)).reshape(-1)
    return tuple(j[rows] for j in self['all' + key[1:]])


def brute_parts(cfg, ja, jb):
  """R, G, cross, total between two sets of outputs from their explicit Jacobians."""
  (Ha, Ba, Ea, Ja), (Hb, Bb, Eb, Jb) = ja, jb
  r, g = Ha @ Hb.T, Ba @ Bb.T
  cross = Ha @ Eb.T + Ea @ Hb.T if cfg.tie == 'tied' else np.zeros_like(r)
  return r, g, cross, Ja @ Jb.T


def pair_blocks(name):
  """Brute-force V x V blocks K(a_i, b_i) for the `pairs()`, per part: 4 arrays (4, V, V)."""
  cfg, _ = make_model(name)
  V, bf = cfg.vocab_size, brute(name)
  full = brute_parts(cfg, bf['z_a'], bf['z_b'])
  idx = np.arange(4)
  return [k[:4 * V, :].reshape(4, V, 4, V)[idx, :, idx, :] for k in full]


def assert_close(actual, expected, tol=TOL):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = max(1.0, float(np.abs(expected).max()))
  err = float(np.abs(actual - expected).max())
  assert err <= tol * scale, f'max error {err:.3e} > {tol:.0e} x scale {scale:.3e}'


def assert_parts(parts, expected, cfg):
  for a, e in zip(parts, expected):
    assert_close(a, e)
  assert_close(parts.r + parts.g + parts.cross, parts.total)
  if cfg.tie == 'untied':
    assert not np.any(np.asarray(parts.cross))
  else:
    assert np.abs(np.asarray(parts.cross)).max() > 1e-6  # the tie does contribute


@pytest.mark.slow
def test_brute_force_parts_add_up():
  """The references themselves: explicit R + G + cross equals the tied model's own J J^T."""
  cfg, _ = make_model('qwen3_tied')
  r, g, cross, total = brute_parts(cfg, brute('qwen3_tied')['lp_a'], brute('qwen3_tied')['lp_a'])
  assert np.abs(cross).max() > 1e-6
  assert_close(r + g + cross, total)


# --- 1. scalar log-prob kernel ----------------------------------------------
@pytest.mark.parametrize('model_name,method', [
    pytest.param('qwen3_tied', 'gram', marks=pytest.mark.slow), ('qwen3_tied', 'jvp'), ('qwen2_untied', 'gram'),
    pytest.param('qwen2_untied', 'jvp', marks=pytest.mark.slow)])
def test_logprob_kernel_gram_matrix_equals_brute_force(model_name, method):
  cfg, params = make_model(model_name)
  bf = brute(model_name)
  parts = jitted(ntk.logprob_kernel, cfg, method=method)(params, batch_a())
  assert_parts(parts, brute_parts(cfg, bf['lp_a'], bf['lp_a']), cfg)
  for k in (parts.r, parts.g, parts.total):       # Gram matrices: symmetric, PSD
    k = np.asarray(k)
    assert_close(k, k.T)
    eig = np.linalg.eigvalsh(k)
    assert eig.min() >= -TOL * np.abs(eig).max()


@pytest.mark.slow
@pytest.mark.parametrize('method', ['gram', 'jvp'])
def test_logprob_cross_kernel_between_batches_in_chunks(name, method):
  cfg, params = make_model(name)
  bf = brute(name)
  # 5 rows in chunks of 2: padded chunks, and (gram) several column blocks.
  parts = jitted(ntk.logprob_kernel, cfg, method=method, chunk_size=2)(params, batch_a(), batch_b())
  assert parts.total.shape == (5, 4)
  assert_parts(parts, brute_parts(cfg, bf['lp_a'], bf['lp_b']), cfg)


@pytest.mark.slow
def test_logprob_kernel_qwen2_tied():
  cfg, params = make_model('qwen2_tied')
  bf = brute('qwen2_tied')
  for method in ('gram', 'jvp'):
    parts = jitted(ntk.logprob_kernel, cfg, method=method, chunk_size=3)(params, batch_a())
    assert_parts(parts, brute_parts(cfg, bf['lp_a'], bf['lp_a']), cfg)


def test_auto_method_choice():
  # n x n Gram matrix within one chunk: no column VJPs, contraction is cheapest.
  assert ntk._pick_method('auto', 64, 64, 64, 32, True, 64) == 'gram'
  # A few rows against every position of a few long sequences: JVPs cover them at once.
  assert ntk._pick_method('auto', 4, 2000, 8, 256, False, 4) == 'jvp'
  with pytest.raises(ValueError, match='method'):
    ntk._pick_method('fast', 4, 4, 1, 8, True, 4)


# --- 2. kernel-vector products ----------------------------------------------
def random_u(shape, seed=3):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


@pytest.mark.slow
def test_kernel_vector_product_equals_brute_force(name):
  cfg, params = make_model(name)
  bf = brute(name)
  a, b = batch_a(), batch_b()
  V = cfg.vocab_size
  u = random_u(b.tokens.shape + (V,))
  f = jitted(ntk.kernel_vector_product, cfg)
  parts = f(params, a.tokens, a.mask, b.tokens, b.mask, u)
  u_real = np.asarray(u * b.mask[..., None]).reshape(-1)       # padding positions are ignored
  expected = [(k @ u_real).reshape(a.tokens.shape + (V,))
              for k in brute_parts(cfg, bf['all_a'], bf['all_b'])]
  assert_parts(parts, expected, cfg)


@pytest.mark.slow
def test_logprob_kernel_vector_product_equals_brute_force(name):
  cfg, params = make_model(name)
  bf = brute(name)
  a, b = batch_a(), batch_b()
  u = random_u(b.tokens.shape + (cfg.vocab_size,)) * b.mask[..., None]
  parts = jitted(ntk.logprob_kernel_vector_product, cfg)(params, a, b.tokens, b.mask, u)
  expected = [k @ np.asarray(u).reshape(-1) for k in brute_parts(cfg, bf['lp_a'], bf['all_b'])]
  assert_parts(parts, expected, cfg)


def test_logprob_change_is_log_softmax_jacobian():
  z = random_u((3, 7), 4)
  dz = random_u((3, 7), 5)
  jac = jax.vmap(jax.jacfwd(jax.nn.log_softmax))(z)       # (3, 7, 7)
  assert_close(ntk.logprob_change(z, dz), jnp.einsum('bij,bj->bi', jac, dz))


# --- 3. token blocks and traces ----------------------------------------------
def test_head_part_is_feature_inner_product_times_identity(name):
  cfg, params = make_model(name)
  bf = brute(name)
  a, b = batch_a(), batch_b()
  V = cfg.vocab_size
  r = (bf['z_a'][0] @ bf['z_b'][0].T).reshape(5, V, 4, V)
  phi_a, phi_b = features_at(cfg, params, a), features_at(cfg, params, b)
  expected = jnp.einsum('ik,jk->ij', phi_a, phi_b)[:, None, :, None] * jnp.eye(V)[None, :, None, :]
  assert_close(r, expected)


def test_token_block_equals_brute_force(name):
  cfg, params = make_model(name)
  a, b = pairs()
  ids = jnp.asarray([3, 17, 40])
  parts = jitted(ntk.token_block, cfg, batch_size=2)(params, a, b, ids)
  expected = [k[:, ids][:, :, ids] for k in pair_blocks(name)]
  assert parts.total.shape == (4, 3, 3)
  assert_parts(parts, expected, cfg)


@pytest.mark.slow
def test_vocab_trace_is_a_sum_over_the_vocabulary(name):
  cfg, params = make_model(name)
  a, b = pairs()
  parts = jitted(ntk.vocab_trace, cfg, chunk_size=4)(params, a, b)
  expected = [np.trace(k, axis1=1, axis2=2) for k in pair_blocks(name)]
  assert_parts(parts, expected, cfg)   # np.trace: a sum over the V diagonal entries, not a mean


# --- 4. Theta_phi and spectra ------------------------------------------------
@pytest.mark.slow
def test_feature_kernel_and_gradient_spectrum(name):
  cfg, params = make_model(name)
  bf = brute(name)
  a, b = pairs()
  a2 = ntk.Points(a.tokens, a.mask, a.seq[:2], a.pos[:2])
  b2 = ntk.Points(b.tokens, b.mask, b.seq[:2], b.pos[:2])
  same = jitted(ntk.feature_kernel, cfg, chunk_size=5)(params, a2, a2)    # 5 -> chunks of 4 (divides d)
  cross = jitted(ntk.feature_kernel, cfg, chunk_size=8)(params, a2, b2)
  w = np.asarray(qwen.head_params(cfg, params)['w'])
  g_blocks = pair_blocks(name)[1]
  d = cfg.hidden_size
  for i in range(2):
    Ja, Jb = bf['phi_a'][i], bf['phi_b'][i]                   # (d, Pb)
    assert_close(same[i], Ja @ Ja.T)
    assert_close(cross[i], Ja @ Jb.T)
    # Spectrum of G(c, c) = W Theta W^T: its top d eigenvalues (V = 48 > d = 16).
    assert_close(ntk.gradient_spectrum(w, same[i]), np.linalg.eigvalsh(w @ Ja @ Ja.T @ w.T)[::-1][:d])
    assert_close(ntk.gradient_spectrum(w, cross[i], symmetric=False),
                 np.linalg.svd(g_blocks[i], compute_uv=False)[:d])


# --- first-order prediction of an SGD step -----------------------------------
@pytest.mark.slow
def test_first_order_prediction_error_shrinks_like_eta_squared(name):
  cfg, params = make_model(name)
  probe, batch = batch_a(), batch_b()
  r_hat = jnp.asarray([1.0, -0.5])                   # per sequence of the batch
  N = batch.tokens.shape[0]
  loss = lambda p: -jnp.sum(r_hat[batch.seq] * logprob_out(batch)(cfg, p)) / N
  grad = jax.jit(jax.grad(loss), compiler_options=OPTS)(params)
  logp = jax.jit(lambda p: logprob_out(probe)(cfg, p), compiler_options=OPTS)
  # Prediction from the log-prob kernel: eta/N sum_i r_i k(probe, batch entry i).
  k = jitted(ntk.logprob_kernel, cfg, method='jvp', chunk_size=2)(params, probe, batch).total
  per_eta = k @ (r_hat[batch.seq] / N)
  # The same from the kernel-vector product with u = -dL/dz = r/N (e_y - pi).
  @functools.partial(jax.jit, compiler_options=OPTS)
  def minus_dloss_dlogits(p):
    z = qwen.forward(cfg, p, batch.tokens, batch.mask)[0][batch.seq, batch.pos]
    d = jax.nn.one_hot(batch.tokens[batch.seq, batch.pos + 1], cfg.vocab_size) - jax.nn.softmax(z)
    return jnp.zeros(batch.tokens.shape + (cfg.vocab_size,)).at[batch.seq, batch.pos].add(
        (r_hat[batch.seq] / N)[:, None] * d)

  u = minus_dloss_dlogits(params)
  kvp = jitted(ntk.logprob_kernel_vector_product, cfg)(params, probe, batch.tokens, batch.mask, u)
  assert_close(kvp.total, per_eta)
  errors = []
  for eta in (4e-4, 2e-4, 1e-4):
    stepped = jax.tree_util.tree_map(lambda p, g, e=eta: p - e * g, params, grad)
    actual = logp(stepped) - logp(params)
    errors.append(float(jnp.max(jnp.abs(actual - eta * per_eta))))
    assert errors[-1] < 0.2 * float(jnp.max(jnp.abs(actual)))
  for big, small in zip(errors, errors[1:]):
    assert 3.0 <= big / small <= 5.0, errors


def random_delta(params, seed=9):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.mark.slow
def test_logprob_jvp_equals_jvp_of_the_model(name):
  cfg, params = make_model(name)
  pts = batch_a()
  delta = random_delta(params)
  split = jitted(ntk.logprob_jvp, cfg)(params, pts, delta)
  _, expected = jax.jit(lambda p, t: jax.jvp(lambda q: logprob_out(pts)(cfg, q), (p,), (t,)),
                        compiler_options=OPTS)(params, delta)
  assert_close(split.total, expected)
  assert_close(split.head + split.backbone, split.total)
  # The head part alone: only the head (tied: the embedding used as the head) moves.
  w = qwen.head_params(cfg, params)['w']
  dw = qwen.head_params(cfg, delta)['w']
  zero_b = jax.tree_util.tree_map(jnp.zeros_like, params['backbone'])
  _, head_only = jax.jit(lambda *x: jax.jvp(view_fn(cfg, logprob_out(pts)), x[:2], x[2:]),
                         compiler_options=OPTS)(w, params['backbone'], dw, zero_b)
  assert_close(split.head, head_only)
  # Eager (no jit) gives the same numbers.
  eager = ntk.logprob_jvp(cfg, params, pts, delta)
  for x, y in zip(eager, split):
    assert_close(x, y)


# --- transformations ---------------------------------------------------------
@pytest.mark.slow
def test_jit_and_eager_agree_on_two_entries(name):
  """Eager (op-by-op) dispatch is slow, so the default suite checks two entries; `-m slow` all of them."""
  cfg, params = make_model(name)
  a = batch_a()
  pts = ntk.Points(a.tokens, a.mask, a.seq[:2], a.pos[:2])
  eager = ntk.logprob_kernel(cfg, params, pts, method='gram')
  jitted_ = jax.jit(ntk.logprob_kernel, static_argnums=0, static_argnames='method')(cfg, params, pts, method='gram')
  for x, y in zip(eager, jitted_):
    assert_close(x, y)


@pytest.mark.slow
def test_jit_and_eager_agree_for_the_kernel(name):
  cfg, params = make_model(name)
  pts = batch_a()
  eager = ntk.logprob_kernel(cfg, params, pts, method='gram')
  jitted_ = jax.jit(ntk.logprob_kernel, static_argnums=0, static_argnames='method')(cfg, params, pts, method='gram')
  for x, y in zip(eager, jitted_):
    assert_close(x, y)


@pytest.mark.slow
def test_vmap_over_probe_sets_matches_python_loop(name):
  cfg, params = make_model(name)
  a = batch_a()
  sets = [ntk.Points(a.tokens, a.mask, a.seq[i:i + 3], a.pos[i:i + 3]) for i in range(3)]
  stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *sets)
  f = functools.partial(ntk.logprob_kernel, cfg, params, method='gram')
  batched = jax.jit(jax.vmap(f), compiler_options=OPTS)(stacked)
  single = jax.jit(f, compiler_options=OPTS)
  for i, s in enumerate(sets):
    for x, y in zip(batched, single(s)):
      assert_close(x[i], y)


def test_float32_model_runs_under_jit(name, monkeypatch):
  """The default float32 path (no x64): same kernel as float64 to float32 accuracy."""
  cfg64, params64 = make_model(name)
  expected = np.asarray(jitted(ntk.logprob_kernel, cfg64, method='gram')(params64, batch_a()).total)
  monkeypatch.setattr(qwen, 'jnp', jnp)
  with jax.enable_x64(False):
    cfg = cfg64.replace(dtype='float32', param_dtype='float32')
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x), jnp.float32), params64)
    pts = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x), jnp.int32), batch_a())
    parts = jax.jit(functools.partial(ntk.logprob_kernel, cfg), compiler_options=OPTS)(params, pts)
    assert parts.total.dtype == jnp.float32
    got = np.asarray(parts.total)
  assert_close(got, expected, tol=1e-4)


def test_bad_inputs_raise_clear_errors():
  cfg, params = make_model('qwen3_tied')
  a = batch_a()
  with pytest.raises(ValueError, match='pos must lie'):
    ntk.logprob_kernel(cfg, params, a._replace(pos=a.pos.at[0].set(6)))   # no target after the last token
  with pytest.raises(ValueError, match='padding'):
    ntk.logprob_kernel(cfg, params, a._replace(seq=jnp.asarray([1, 0, 1, 2, 2]), pos=jnp.asarray([0, 5, 3, 1, 4])))
  with pytest.raises(ValueError, match='method'):
    ntk.logprob_kernel(cfg, params, a, method='fast')
  with pytest.raises(ValueError, match='same number of contexts'):
    ntk.token_block(cfg, params, a, batch_b(), jnp.asarray([1, 2]))
  with pytest.raises(ValueError, match=r'\(B, T, V\)'):
    ntk.kernel_vector_product(cfg, params, a.tokens, a.mask, a.tokens, a.mask, jnp.zeros((3, 7, 5)))
  with pytest.raises(ValueError, match='tree structure'):
    ntk.logprob_jvp(cfg, params, a, {'backbone': params['backbone']})
  with pytest.raises(TypeError, match='Points'):
    ntk.logprob_kernel(cfg, params, (a.tokens, a.mask, a.seq, a.pos))
  with pytest.raises(ValueError, match='first token'):
    ntk.completion_points(a.tokens, a.mask, jnp.ones_like(a.tokens))


def test_completion_points():
  tokens = np.arange(12).reshape(2, 6)
  mask = np.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
  cm = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
  p = ntk.completion_points(tokens, mask, cm)
  np.testing.assert_array_equal(p.seq, [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(p.pos, [2, 3, 4, 1, 2, 3])
