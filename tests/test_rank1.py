"""Tests of cfrl_jax.analysis.rank1 against numpy references and exactly solvable trajectories."""
import warnings

import numpy as np
import pytest

from cfrl_jax.analysis import rank1

RNG = np.random.default_rng(0)
L, M, N = 3, 7, 5


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def unit_rank1(rng, L: int, m: int, n: int) -> np.ndarray:
  """(L, m, n): per layer u_l v_l^T, u_l and v_l drawn from rng (u first) and scaled to unit length:
  the update direction of the exactly rank-1 trajectories here and in test_alpharl*, test_analyze."""
  u, v = _unit(rng.normal(size=(L, m))), _unit(rng.normal(size=(L, n)))
  return u[:, :, None] * v[:, None, :]


def _tiny_tree(rng, tied=False, L=2, d=6, f=8, V=10):
  """A cfrl_jax-shaped parameter tree (Qwen2 layout with biases) of random numbers."""
  n = lambda *s: rng.normal(size=s).astype(np.float32)
  layers = {name: {'kernel': n(L, *shape)} for name, shape in (
      ('q_proj', (d, d)), ('k_proj', (d, 4)), ('v_proj', (d, 4)), ('o_proj', (d, d)),
      ('gate_proj', (d, f)), ('up_proj', (d, f)), ('down_proj', (f, d)))}
  for name, width in (('q_proj', d), ('k_proj', 4), ('v_proj', 4)):
    layers[name]['bias'] = n(L, width)
  layers['input_norm'] = n(L, d)
  layers['post_attn_norm'] = n(L, d)
  backbone = {'embed': n(V, d), 'layers': layers, 'final_norm': n(d)}
  return {'backbone': backbone, 'head': {} if tied else {'w': n(V, d)}}


def _perturb(tree, rng, scale=0.1):
  return {k: _perturb(v, rng, scale) if isinstance(v, dict) else
          (v + scale * rng.normal(size=v.shape)).astype(v.dtype) for k, v in tree.items()}


# --- SVD shares and rank-k reconstructions vs np.linalg.svd --------------------------
@pytest.mark.parametrize('method', rank1.SVD_METHODS)
@pytest.mark.parametrize('shape', [(M, N), (N, M)])
def test_shares_and_reconstructions_match_numpy(method, shape):
  w0 = RNG.normal(size=(L,) + shape)
  wt = w0 + RNG.normal(size=(L,) + shape)
  f = rank1.factorize_update(w0, wt, rank=4, method=method)
  for l in range(L):
    dw = wt[l] - w0[l]
    u, s, vt = np.linalg.svd(dw)
    np.testing.assert_allclose(f.s[l], s, rtol=1e-10)
    np.testing.assert_allclose(f.fro[l], np.linalg.norm(dw), rtol=1e-12)
    # Singular vectors agree up to a joint sign per pair.
    signs = np.sign(np.sum(f.u[l] * u[:, :4], 0))
    np.testing.assert_allclose(f.u[l] * signs, u[:, :4], atol=1e-10)
    np.testing.assert_allclose(f.vt[l] * signs[:, None], vt[:4], atol=1e-10)
    for k in (1, 2, 4):
      share = np.sum(s[:k] ** 2) / np.sum(s ** 2)
      np.testing.assert_allclose(rank1.energy_share(f.s, k)[l], share, rtol=1e-12)
      pk = (u[:, :k] * s[:k]) @ vt[:k]
      np.testing.assert_allclose(rank1.low_rank_update(f, k, rescale=False)[l], pk, atol=1e-10)
      ref = w0[l] + np.linalg.norm(dw) * pk / np.linalg.norm(pk)
      wk = rank1.rank_k_weight(w0, wt, k, method=method)[l]
      np.testing.assert_allclose(wk, ref, atol=1e-10)
      # The paper's rescaling: the rank-k update has the full update's norm.
      np.testing.assert_allclose(np.linalg.norm(wk - w0[l]), np.linalg.norm(dw), rtol=1e-12)
  np.testing.assert_allclose(rank1.energy_share(f.s, None), 1.0)
  np.testing.assert_allclose(rank1.rank_k_weight(w0, wt, None), wt)
  # All pairs kept: the rank-r model is the update itself.
  np.testing.assert_allclose(rank1.rank_k_weight(w0, wt, min(shape), method=method), wt, atol=1e-10)


@pytest.mark.parametrize('method', rank1.SVD_METHODS)
def test_zero_update_gives_nan_share_and_base_weights(method):
  w0 = RNG.normal(size=(2, 4, 3))
  w1 = w0.copy()
  w1[1] += RNG.normal(size=(4, 3))
  f = rank1.factorize_update(w0, w1, 2, method=method)
  share = rank1.energy_share(f.s, 1)
  assert np.isnan(share[0]) and 0 < share[1] <= 1
  w = rank1.rank_k_weight(w0, w1, 1)
  assert np.all(np.isfinite(w))
  np.testing.assert_array_equal(w[0], w0[0])


def test_low_rank_update_needs_enough_factors():
  f = rank1.factorize(RNG.normal(size=(4, 3)), rank=1)
  with pytest.raises(ValueError, match='keep 1 singular'):
    rank1.low_rank_update(f, 2)
  with pytest.raises(ValueError, match='method'):
    rank1.factorize(np.ones((2, 2)), method='qr')


# --- parameter trees ----------------------------------------------------------------
@pytest.mark.parametrize('tied', [False, True])
def test_rank_k_params_variants(tied):
  rng = np.random.default_rng(1)
  base = _tiny_tree(rng, tied)
  final = _perturb(base, rng)
  fb, ff = rank1.flatten(base), rank1.flatten(final)
  paths = rank1.matrix_paths(base)
  assert [p[2] for p in paths] == list(rank1.MATRIX_NAMES)
  a = rank1.flatten(rank1.rank_k_params(base, final, 1))
  b = rank1.flatten(rank1.rank_k_params(base, final, 1, keep=rank1.VARIANT_B))
  everything = rank1.flatten(rank1.rank_k_params(base, final, 1, keep=('head', 'embed', 'norms', 'biases')))
  head_path = ('backbone', 'embed') if tied else ('head', 'w')
  for p in fb:
    if p in paths:
      w0 = fb[p].astype(np.float64)
      dw = ff[p].astype(np.float64) - w0
      for l in range(dw.shape[0]):
        u, s, vt = np.linalg.svd(dw[l])
        ref = w0[l] + np.linalg.norm(dw[l]) * np.outer(u[:, 0], vt[0])
        np.testing.assert_allclose(a[p][l], ref, atol=1e-5)
        np.testing.assert_allclose(b[p][l], ref, atol=1e-5)
      assert a[p].dtype == np.float32
    else:
      np.testing.assert_array_equal(a[p], fb[p])          # variant A: everything else at base
      np.testing.assert_array_equal(b[p], ff[p] if p == head_path else fb[p])
      np.testing.assert_array_equal(everything[p], ff[p])
  full = rank1.flatten(rank1.rank_k_params(base, final, None))
  for p in paths:
    np.testing.assert_array_equal(full[p], ff[p])
  with pytest.raises(ValueError, match='Unknown keep group'):
    rank1.rank_k_params(base, final, 1, keep=('heads',))


def test_tree_structure_errors():
  rng = np.random.default_rng(2)
  base = _tiny_tree(rng)
  other = _tiny_tree(rng, L=3)
  with pytest.raises(ValueError, match='shapes'):
    rank1.rank_k_params(base, other, 1)
  with pytest.raises(ValueError, match='No backbone/layers'):
    rank1.matrix_paths({'backbone': {'embed': np.zeros((3, 2))}, 'head': {}})


# --- linear fits ------------------------------------------------------------------
def test_linear_fit_and_pooled_r2_match_lstsq():
  x = np.array([0., 1., 3., 4., 7., 9.])
  y = RNG.normal(size=(6, 3, 4))                       # 6 points, 12 coordinates
  fit = rank1.linear_fit(x, y)
  design = np.stack([np.ones(6), x], 1)
  coef, *_ = np.linalg.lstsq(design, y.reshape(6, -1), rcond=None)
  np.testing.assert_allclose(fit.intercept.ravel(), coef[0], atol=1e-12)
  np.testing.assert_allclose(fit.slope.ravel(), coef[1], atol=1e-12)
  resid = y.reshape(6, -1) - design @ coef
  r2 = 1 - np.sum(resid ** 2, 0) / np.sum((y.reshape(6, -1) - y.reshape(6, -1).mean(0)) ** 2, 0)
  np.testing.assert_allclose(fit.r2.ravel(), r2, atol=1e-12)
  # Pooled over the last axis (4 coordinates per row of 3), from the Gram only.
  gram = np.einsum('iab,jab->aij', y, y)
  pooled = rank1.pooled_linear_r2(gram, x)
  res3 = resid.reshape(6, 3, 4)
  yc = y - y.mean(0)
  np.testing.assert_allclose(pooled, 1 - np.sum(res3 ** 2, (0, 2)) / np.sum(yc ** 2, (0, 2)), atol=1e-12)


def test_r2_is_nan_when_undetermined():
  assert np.isnan(rank1.linear_fit([0, 1], [3., 5.]).r2)          # two points
  assert np.isnan(rank1.linear_fit([0, 1, 2], [0.1, 0.1, 0.1]).r2)  # constant target
  with pytest.raises(ValueError, match='two distinct'):
    rank1.linear_fit([1, 1, 1], [0., 1., 2.])


# --- rank-1 linear synthetic trajectory ------------------------------------------------
def _rank1_trajectory(steps, c, u, v, w0):
  """W_t = W_0 + t c u v^T for each layer (c (L,), u (L, m), v (L, n))."""
  return [w0 + t * c[:, None, None] * u[:, :, None] * v[:, None, :] for t in steps]


def test_exact_rank1_linear_trajectory_is_recovered_and_extrapolated():
  steps = np.arange(0, 31, 3)                          # base at 0, 10 later checkpoints
  u = _unit(RNG.normal(size=(L, M)))
  v = _unit(RNG.normal(size=(L, N)))
  c = np.array([0.5, -2.0, 3.0])
  w0 = RNG.normal(size=(L, M, N))
  ws = _rank1_trajectory(steps, c, u, v, w0)
  factors = rank1.stack_factors([rank1.factorize_update(w0, w, 2) for w in ws[1:]])
  dyn = rank1.rank1_dynamics(steps[1:], factors, base_step=0)
  np.testing.assert_allclose(dyn.share1, 1.0, atol=1e-12)
  np.testing.assert_allclose(dyn.fit_step.r2, 1.0, atol=1e-12)
  np.testing.assert_allclose(dyn.r2_pooled, 1.0, atol=1e-12)
  np.testing.assert_allclose(np.abs(dyn.fit_step.slope), np.abs(c), rtol=1e-10)
  np.testing.assert_allclose(dyn.cos_u, 1.0, atol=1e-12)
  # RELEX on the same trajectory: one temporal component, linear in step.
  deltas = np.stack([w - w0 for w in ws[1:]])
  rel = rank1.relex(rank1.update_gram(deltas), steps[1:])
  np.testing.assert_allclose(rel.share, 1.0, atol=1e-12)
  np.testing.assert_allclose(rel.fit.r2, 1.0, atol=1e-12)
  # AlphaRL from the first third of the run predicts the last checkpoint exactly.
  window = steps[(steps > 0) & (steps <= 10)]          # 3, 6, 9
  fit = rank1.fit_rank1_extrapolation(window, rank1.stack_factors(
      [rank1.factorize_update(w0, ws[list(steps).index(t)], 1) for t in window]), base_step=0)
  pred = w0 + rank1.predict_rank1_update(fit, 30)
  np.testing.assert_allclose(pred, ws[-1], atol=1e-6)
  assert np.max(np.abs(pred - ws[-1])) < 1e-10
  fit_no_origin = rank1.fit_rank1_extrapolation(window, rank1.stack_factors(
      [rank1.factorize_update(w0, ws[list(steps).index(t)], 1) for t in window]), base_step=0,
      include_origin=False)
  np.testing.assert_allclose(w0 + rank1.predict_rank1_update(fit_no_origin, 30), ws[-1], atol=1e-10)
  # ExPO with alpha = 30/9 is exact as well on a linear trajectory.
  alpha = rank1.expo_alpha(0, 9, 30)
  np.testing.assert_allclose(w0 + alpha * (ws[3] - w0), ws[-1], atol=1e-10)


def test_extrapolation_of_a_rank1_model_with_curved_magnitude():
  """Window coefficients that are not linear: the rule is the least-squares line, checked by hand."""
  u = _unit(RNG.normal(size=(1, M)))
  v = _unit(RNG.normal(size=(1, N)))
  w0 = np.zeros((1, M, N))
  steps = np.array([1., 2., 4.])
  mags = np.array([1., 3., 4.])
  ws = [w0 + m * u[:, :, None] * v[:, None, :] for m in mags]
  fit = rank1.fit_rank1_extrapolation(steps, rank1.stack_factors(
      [rank1.factorize_update(w0, w, 1) for w in ws]), base_step=0)
  slope, intercept = np.polyfit([0., 1., 2., 4.], [0., 1., 3., 4.], 1)
  pred = rank1.predict_rank1_update(fit, 10)
  np.testing.assert_allclose(pred[0], (intercept + 10 * slope) * np.outer(u[0], v[0]), atol=1e-12)


def test_extrapolation_rescales_to_full_norm():
  """A rank-2 update: the predicted update at the last window step has ||dW||_F, on u1 v1^T."""
  w0 = np.zeros((1, M, N))
  dw = RNG.normal(size=(1, M, N))
  fit = rank1.fit_rank1_extrapolation([5.], rank1.stack_factors([rank1.factorize_update(w0, dw, 1)]),
                                      base_step=0)
  pred = rank1.predict_rank1_update(fit, 5.)
  u, s, vt = np.linalg.svd(dw[0])
  np.testing.assert_allclose(np.abs(pred[0]), np.abs(np.linalg.norm(dw) * np.outer(u[:, 0], vt[0])),
                             atol=1e-12)
  np.testing.assert_allclose(rank1.predict_rank1_update(fit, 10.), 2 * pred, atol=1e-12)


def test_alpharl_and_expo_trees():
  rng = np.random.default_rng(3)
  base = _tiny_tree(rng)
  fb = rank1.flatten(base)
  paths = rank1.matrix_paths(base)
  dirs = {p: (_unit(rng.normal(size=fb[p].shape[:2])), _unit(rng.normal(size=(fb[p].shape[0], fb[p].shape[2]))))
          for p in paths}
  head_step = rng.normal(size=fb[('head', 'w')].shape).astype(np.float32)

  def at(t):
    leaves = dict(fb)
    for p, (u, v) in dirs.items():
      leaves[p] = (fb[p] + 0.01 * t * u[:, :, None] * v[:, None, :]).astype(np.float32)
    leaves[('head', 'w')] = fb[('head', 'w')] + 0.01 * t * head_step
    return rank1.unflatten(leaves, base)

  window = [(t, at(t)) for t in (2, 4)]
  fits = rank1.fit_params_extrapolation(base, window, 0)
  pred = rank1.flatten(rank1.alpharl_params(base, fits, 12))
  truth = rank1.flatten(at(12))
  for p in fb:
    if p in paths:
      np.testing.assert_allclose(pred[p], truth[p], atol=1e-5)
    else:
      np.testing.assert_array_equal(pred[p], fb[p])
  pred_b = rank1.flatten(rank1.alpharl_params(base, fits, 12, keep=('head',), kept_from=window[-1][1]))
  np.testing.assert_array_equal(pred_b[('head', 'w')], rank1.flatten(window[-1][1])[('head', 'w')])
  with pytest.raises(ValueError, match='kept_from'):
    rank1.alpharl_params(base, fits, 12, keep=('head',))
  with pytest.raises(ValueError, match=r"No extrapolation fit for \['backbone/layers/q_proj/kernel'\]"):
    rank1.alpharl_params(base, {p: f for p, f in fits.items() if p[2] != 'q_proj'}, 12)
  expo = rank1.flatten(rank1.expo_params(base, window[-1][1], rank1.expo_alpha(0, 4, 12)))
  for p in fb:
    np.testing.assert_allclose(expo[p], truth[p], atol=1e-5)


# --- sign alignment ------------------------------------------------------------------
@pytest.mark.parametrize('reference', ['final', 'previous'])
def test_sign_alignment_undoes_svd_flips(reference):
  T = 8
  # A slowly rotating direction, so consecutive and final references agree on signs.
  base_u = _unit(RNG.normal(size=(L, M)))
  drift_u = _unit(RNG.normal(size=(L, M)))
  base_v = _unit(RNG.normal(size=(L, N)))
  drift_v = _unit(RNG.normal(size=(L, N)))
  ts = np.linspace(0, 0.3, T)[:, None, None]
  u_true = _unit(base_u + ts * drift_u)
  v_true = _unit(base_v + ts * drift_v)
  # What an SVD returns: each (u, v) pair flipped jointly at random.
  flips = RNG.choice([-1.0, 1.0], size=(T, L))
  flips[[0, -1]] = 1.0                                 # the references keep their SVD signs
  u_svd, v_svd = u_true * flips[..., None], v_true * flips[..., None]
  # Real SVDs of the rank-1 matrices (they choose their own signs) give the same pairs up to sign.
  for t in range(T):
    for l in range(L):
      uu, _, vt = np.linalg.svd(np.outer(u_true[t, l], v_true[t, l]))
      np.testing.assert_allclose(np.outer(uu[:, 0], vt[0]), np.outer(u_true[t, l], v_true[t, l]), atol=1e-12)
  au, av, signs = rank1.align_signs(u_svd, v_svd, reference)
  np.testing.assert_allclose(au, u_true, atol=1e-12)
  np.testing.assert_allclose(av, v_true, atol=1e-12)
  np.testing.assert_array_equal(signs, flips)
  # u v^T is unchanged by the joint flips.
  np.testing.assert_allclose(np.einsum('tlm,tln->tlmn', au, av), np.einsum('tlm,tln->tlmn', u_svd, v_svd))
  assert np.all(np.sum(au[1:] * au[:-1], -1) > 0)


def test_coefficients_are_sign_invariant():
  T = 5
  s1 = np.abs(RNG.normal(size=(T, L)))
  u = _unit(RNG.normal(size=(T, L, M)))
  v = _unit(RNG.normal(size=(T, L, N)))
  flips = RNG.choice([-1.0, 1.0], size=(T, L))[..., None]
  a = rank1.rank1_coefficients(s1, u, v, u[-1], v[-1])
  b = rank1.rank1_coefficients(s1, u * flips, v * flips, -u[-1], -v[-1])
  np.testing.assert_allclose(a, b)
  # Against the explicit Frobenius inner product.
  for t in range(T):
    for l in range(L):
      ref = np.sum(s1[t, l] * np.outer(u[t, l], v[t, l]) * np.outer(u[-1, l], v[-1, l]))
      np.testing.assert_allclose(a[t, l], ref, atol=1e-12)
  g = rank1.rank1_gram(s1, u, v)
  r = s1[..., None, None] * np.einsum('tlm,tln->tlmn', u, v)
  np.testing.assert_allclose(g, rank1.update_gram(r), atol=1e-12)


# --- RELEX --------------------------------------------------------------------------
def test_relex_recovers_linear_coefficient():
  T = 7
  steps = np.arange(1, T + 1) * 10.0
  a = 2.0 + 0.3 * steps                                   # the linear temporal coefficient
  e = RNG.normal(size=T)
  e -= a * (e @ a) / (a @ a)                             # a second, orthogonal temporal pattern
  e *= 0.2 * np.linalg.norm(a) / np.linalg.norm(e)
  m1 = RNG.normal(size=(M, N))
  m2 = RNG.normal(size=(M, N))
  m2 -= m1 * np.sum(m1 * m2) / np.sum(m1 * m1)            # orthogonal spatial patterns
  m1 /= np.linalg.norm(m1)
  m2 /= np.linalg.norm(m2)
  deltas = (a[:, None, None] * m1 + e[:, None, None] * m2)[:, None]   # (T, 1, M, N)
  rel = rank1.relex(rank1.update_gram(deltas), steps)
  np.testing.assert_allclose(rel.coefficient[0], a, rtol=1e-10)
  np.testing.assert_allclose(rel.fit.slope[0], 0.3, rtol=1e-10)
  np.testing.assert_allclose(rel.fit.intercept[0], 2.0, rtol=1e-10)
  np.testing.assert_allclose(rel.fit.r2[0], 1.0, atol=1e-12)
  # Independent reference: np.linalg.svd of the explicit (T x numel) stack.
  ua, sa, _ = np.linalg.svd(deltas.reshape(T, -1), full_matrices=False)
  lead = ua[:, 0] * sa[0]
  np.testing.assert_allclose(rel.coefficient[0], lead * np.sign(lead[-1]), rtol=1e-10)
  np.testing.assert_allclose(rel.share[0], sa[0] ** 2 / np.sum(sa ** 2), rtol=1e-10)


# --- gain recovered --------------------------------------------------------------------
def test_recovered_gain():
  assert rank1.recovered_gain(0.45, 0.3, 0.5) == pytest.approx(0.75)
  with pytest.warns(RuntimeWarning, match='below min_gain'):
    assert np.isnan(rank1.recovered_gain(0.4, 0.3, 0.3))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    rank1.recovered_gain(0.2, 0.3, 0.5)
  with pytest.raises(TypeError, match='must return a float'):
    rank1.evaluate_models({'m': {}}, lambda p: 'high')
