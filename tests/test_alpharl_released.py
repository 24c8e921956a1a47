"""The released AlphaRL procedure (caiyuchen-ustc/AlphaRL), tuned ExPO and the across-seed verdicts, against
hand-computed numbers: PLS1 fit and inversion, sign chaining, the window-end + rank-1 increment model, the
window target rule, the ExPO alpha choice, the pooled share."""
import dataclasses
import math

import jax
import numpy as np
import pytest

from cfrl_jax import alpharl
from cfrl_jax.analysis import alpharl_fit, alpharl_report, rank1
from cfrl_jax.config import base_config
from cfrl_jax.models import qwen
from cfrl_jax.train import checkpoint
from test_rank1 import unit_rank1   # per-layer unit u v^T


# --- PLS1 ------------------------------------------------------------------------------------
def test_pls1_on_a_3x2_example_worked_by_hand():
  # Unscaled: mean (1, 1), Xc = [[-1,-1],[0,1],[1,0]], yc = [-1,0,1]; X^T y = (2, 1), w = (2, 1)/sqrt5,
  # t = (-3, 1, 2)/sqrt5, t.t = 14/5, p = (5, 4) sqrt5/14, b = 5 sqrt5/14; R^2 = 1 - (3/14)/2 = 25/28.
  x = np.array([[0., 0.], [1., 2.], [2., 1.]])
  y = np.array([0., 1., 2.])
  fit = rank1.pls1(x, y, scale=False)
  r5 = math.sqrt(5)
  np.testing.assert_allclose(fit.weights, [2 / r5, 1 / r5], atol=1e-12)
  np.testing.assert_allclose(fit.scores, np.array([-3., 1., 2.]) / r5, atol=1e-12)
  np.testing.assert_allclose(fit.loadings, np.array([5., 4.]) * r5 / 14, atol=1e-12)
  assert fit.slope == pytest.approx(5 * r5 / 14, abs=1e-12)
  assert fit.r2 == pytest.approx(25 / 28, abs=1e-12)
  # y* = 4: score (4 - 1) / b, vector (1, 1) + 3 (1, 0.8) = (4, 3.4).
  np.testing.assert_allclose(rank1.pls1_invert(fit, 4.0), [4.0, 3.4], atol=1e-12)
  np.testing.assert_allclose(rank1.pls1_invert(fit, 1.0), [1.0, 1.0], atol=1e-12)   # the mean at mean(y)


def test_pls1_scaling_changes_the_direction_as_sklearn_default_does():
  # The second column doubled: standardised (sd (1, 2)) it is the example above, so the inversion at 4 is
  # (1, 2) + (1, 2) * (3, 2.4) = (4, 6.8); unscaled, X^T y = (2, 2), t = (-3, 2, 1)/sqrt2, t.t = 7,
  # p / b = (1, 2.5), giving (1, 2) + 3 (1, 2.5) = (4, 9.5).
  x = np.array([[0., 0.], [1., 4.], [2., 2.]])
  y = np.array([0., 1., 2.])
  np.testing.assert_allclose(rank1.pls1_invert(rank1.pls1(x, y, scale=True), 4.0), [4.0, 6.8], atol=1e-12)
  np.testing.assert_allclose(rank1.pls1_invert(rank1.pls1(x, y, scale=False), 4.0), [4.0, 9.5], atol=1e-12)


@pytest.mark.parametrize('scale', [True, False])
def test_pls1_inverts_a_linear_trajectory_at_the_matching_step(scale):
  """a_t = a_0 + t d (+ small noise), accuracy 0.2 + 0.01 t over t = 1..9: the vector at accuracy(27) is a_27."""
  rng = np.random.default_rng(0)
  L, n = 3, 40
  a0, d = rng.normal(size=(L, n)), rng.normal(size=(L, n))
  t = np.arange(1, 10, dtype=np.float64)
  acc = 0.2 + 0.01 * t
  exact = a0 + t[:, None, None] * d
  fit = rank1.pls1(exact, acc, scale=scale)
  np.testing.assert_allclose(rank1.pls1_invert(fit, 0.2 + 0.01 * 27), a0 + 27 * d, atol=1e-10)
  np.testing.assert_allclose(fit.r2, 1.0, atol=1e-12)
  noise = 1e-4
  noisy = exact + noise * rng.normal(size=exact.shape)
  pred = rank1.pls1_invert(rank1.pls1(noisy, acc, scale=scale), 0.47)
  # Off by a few noise units, amplified ~3x by the extrapolation from t ~ 5 to 27.
  assert np.max(np.abs(pred - (a0 + 27 * d))) < 50 * noise


def test_pls1_degenerate_inputs():
  x = np.zeros((4, 2, 3))
  x[:, 1] = np.arange(4.)[:, None] * np.array([1., -2., 0.5])
  fit = rank1.pls1(x, np.arange(4.) * 0.1)
  assert fit.flat.tolist() == [True, False]    # matrix 0 never moved: its prediction is its mean (0)
  np.testing.assert_allclose(rank1.pls1_invert(fit, 0.5)[0], 0.0)
  np.testing.assert_allclose(rank1.pls1_invert(fit, 0.5)[1], 5 * np.array([1., -2., 0.5]), atol=1e-12)
  with pytest.raises(ValueError, match='constant target'):
    rank1.pls1(x, np.full(4, 0.3))
  with pytest.raises(ValueError, match='at least 2 points'):
    rank1.pls1(x[:1], np.array([0.3]))


def test_pls1_agrees_with_sklearn_when_installed():
  skl = pytest.importorskip('sklearn.cross_decomposition')
  rng = np.random.default_rng(5)
  x = rng.normal(size=(7, 12)) + np.arange(7.)[:, None] * rng.normal(size=12)
  y = 0.3 + 0.02 * np.arange(7.) + 0.01 * rng.normal(size=7)
  pls = skl.PLSRegression(n_components=1).fit(x, y)
  scores = pls.transform(x)[:, 0]
  slope, intercept = np.polyfit(scores, y, 1)
  want = pls.inverse_transform(np.array([[(0.6 - intercept) / slope]]))[0]
  np.testing.assert_allclose(rank1.pls1_invert(rank1.pls1(x, y), 0.6), want, rtol=1e-8, atol=1e-10)


# --- sign chaining ---------------------------------------------------------------------------
def test_signs_chain_backwards_from_the_last_vector():
  # x2 kept; x1.x2 = 0.5 > 0 kept; x0.x1 = -0.9 < 0 flipped, although x0.x2 = 0.2 > 0 (a reference on the
  # last vector alone would keep it).
  x = np.array([[-1., 0.2], [1., 0.5], [0., 1.]])
  aligned, signs = rank1.chain_signs_backward(x)
  assert signs.tolist() == [-1.0, 1.0, 1.0]
  np.testing.assert_array_equal(aligned, [[1., -0.2], [1., 0.5], [0., 1.]])
  # Batched over a layer axis, and a zero vector keeps its sign.
  xb = np.stack([x, np.array([[0., 0.], [1., 0.], [-1., 0.]])], 1)
  _, sb = rank1.chain_signs_backward(xb)
  assert sb[:, 1].tolist() == [1.0, -1.0, 1.0]


def test_fit_released_vectors_are_s1_times_the_output_side_vector_sign_chained():
  """SVD sign flips between checkpoints are undone; the vector is s1 v1 of the (in, out) kernel."""
  rng = np.random.default_rng(2)
  m, n = 5, 4
  u, v = rng.normal(size=m), rng.normal(size=n)
  u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
  w0 = np.zeros((1, m, n))
  factors = []
  for k, t in enumerate((1., 2., 3.)):
    f = rank1.factorize_update(w0, w0 + t * np.outer(u, v)[None], 1, method='svd')
    sign = -1.0 if k == 1 else 1.0     # a flipped SVD pair at the middle checkpoint
    factors.append(rank1.UpdateFactors(f.s, sign * f.u, sign * f.vt, f.fro))
  fit = rank1.fit_released([1, 2, 3], rank1.stack_factors(factors), [0.1, 0.2, 0.3])
  last_sign = np.sign(factors[-1].vt[0, 0, 0] * v[0])
  for k, t in enumerate((1., 2., 3.)):
    np.testing.assert_allclose(fit.vectors[k, 0], last_sign * t * v, atol=1e-12)
  np.testing.assert_allclose(fit.u[0], last_sign * u, atol=1e-12)


# --- the window-end + rank-1 increment model --------------------------------------------------
def _tree(rng, L=2, d=4, f=6, V=7):
  n = lambda *s: rng.normal(size=s)
  layers = {name: {'kernel': n(L, *shape)} for name, shape in (
      ('q_proj', (d, d)), ('k_proj', (d, 2)), ('v_proj', (d, 2)), ('o_proj', (d, d)),
      ('gate_proj', (d, f)), ('up_proj', (d, f)), ('down_proj', (f, d)))}
  layers['q_proj']['bias'] = n(L, d)
  layers['input_norm'] = n(L, d)
  return {'backbone': {'embed': n(V, d), 'layers': layers, 'final_norm': n(d)}, 'head': {'w': n(V, d)}}


def test_released_model_is_the_window_end_plus_the_predicted_rank1_vector():
  """Kernels W_t = W_0 + t c u v^T + e u2 v2^T (u2 _|_ u, v2 _|_ v, e < c: a constant second direction that the
  window end keeps), accuracy 0.1 + 0.02 t over t = 1..4. At target accuracy 0.1 + 0.02 * 10 the predicted
  vector is 10 c v, so the model is W_4 + 10 c u v^T = W_0 + 14 c u v^T + e u2 v2^T; every other leaf is W_4's."""
  rng = np.random.default_rng(4)
  base = _tree(rng)
  fb = rank1.flatten(base)
  paths = rank1.matrix_paths(base)
  parts = {}
  for p in paths:
    L, m, n = fb[p].shape
    q1, _ = np.linalg.qr(rng.normal(size=(m, 2)))
    q2, _ = np.linalg.qr(rng.normal(size=(n, 2)))
    parts[p] = (0.3, 0.05, q1[:, 0], q2[:, 0], q1[:, 1], q2[:, 1])
  other = {p: rng.normal(size=np.shape(w)) for p, w in fb.items() if p not in paths}

  def at(t, c_mult=None):
    leaves = {}
    for p, w in fb.items():
      if p in parts:
        c, e, u, v, u2, v2 = parts[p]
        k = t if c_mult is None else c_mult
        leaves[p] = w + k * c * np.outer(u, v)[None] + e * np.outer(u2, v2)[None]
      else:
        leaves[p] = w + t * 0.01 * other[p]
    return rank1.unflatten(leaves, base)

  window = [(t, at(t)) for t in (1, 2, 3, 4)]
  acc = [0.1 + 0.02 * t for t in (1, 2, 3, 4)]
  fits = rank1.fit_params_released(base, window, acc)
  model = rank1.flatten(rank1.released_params(window[-1][1], fits, 0.1 + 0.02 * 10))
  want = rank1.flatten(at(4, c_mult=14))
  fw = rank1.flatten(window[-1][1])
  for p in fb:
    np.testing.assert_allclose(model[p], want[p] if p in parts else fw[p], atol=1e-9, err_msg=rank1.path_name(p))
  # At the window end's own accuracy the increment is the window end's rank-1 part: W_0 + 8 c u v^T + e u2 v2^T.
  model4 = rank1.flatten(rank1.released_params(window[-1][1], fits, 0.18))
  q = ('backbone', 'layers', 'q_proj', 'kernel')
  np.testing.assert_allclose(model4[q], rank1.flatten(at(4, c_mult=8))[q], atol=1e-9)
  with pytest.raises(ValueError, match=r"No released AlphaRL fit for \['backbone/layers/q_proj/kernel'\]"):
    rank1.released_params(window[-1][1], {p: f for p, f in fits.items() if p != q}, 0.18)


def test_fit_released_window_reports_why_it_cannot_run():
  fit = alpharl_fit.WindowFit(None, None, 4, 0, [4], 10, {}, {}, {}, {})
  out = alpharl_fit.fit_released_window(fit, {4: 0.3}, oracle=0.5)
  assert out.fits is None and 'at least 2' in out.reason and 'fit_every' in out.reason
  assert out.targets == {'oracle': 0.5}
  with pytest.raises(ValueError, match='missing'):
    alpharl_fit.fit_released_window(fit, {}, oracle=0.5)


def test_window_target_rule():
  # Line 0.1 t through (1, .1), (2, .2), (3, .3): 0.5 at step 5; 1.2 at step 12 is capped at 1.
  assert rank1.extrapolated_accuracy([1, 2, 3], [0.1, 0.2, 0.3], 5) == pytest.approx(0.5)
  assert rank1.extrapolated_accuracy([1, 2, 3], [0.1, 0.2, 0.3], 12) == 1.0
  # (1, .1), (2, .3), (3, .2): slope 0.05, intercept 0.2 - 2 * 0.05 = 0.1, so 0.6 at step 10.
  assert rank1.extrapolated_accuracy([1, 2, 3], [0.1, 0.3, 0.2], 10) == pytest.approx(0.6)
  assert rank1.extrapolated_accuracy([1, 2], [0.3, 0.1], 10) == 0.0
  assert alpharl_fit.released_targets([1, 2, 3], [0.1, 0.2, 0.3], 5, 0.42) == {'oracle': 0.42,
                                                                          'window': pytest.approx(0.5)}


# --- ExPO alpha --------------------------------------------------------------------------------
def test_expo_alpha_is_the_best_on_the_selection_score():
  grid = (0.5, 1, 2, 4, 100 / 40 - 1)
  alpha, scores = rank1.select_expo_alpha(grid, lambda a: 0.5 - (a - 2) ** 2)
  assert alpha == 2.0 and scores[1.5] == pytest.approx(0.25) and len(scores) == 5
  assert rank1.select_expo_alpha(grid, lambda a: 0.4)[0] == 0.5            # ties: the smaller alpha
  assert rank1.select_expo_alpha(grid, lambda a: float('nan') if a == 4 else a)[0] == 2.0   # NaN never wins
  with pytest.raises(ValueError, match='NaN'):
    rank1.select_expo_alpha(grid, lambda a: float('nan'))
  with pytest.raises(TypeError, match='float'):
    rank1.select_expo_alpha(grid, lambda a: 'x')
  # ExPO's parameterisation: theta_W + alpha (theta_W - theta_0) = expo_params(base, window, 1 + alpha).
  base, win = {'backbone': {'embed': np.array([1.0])}, 'head': {}}, {'backbone': {'embed': np.array([3.0])}, 'head': {}}
  assert rank1.expo_params(base, win, 1 + 2.0)['backbone']['embed'][0] == pytest.approx(3 + 2 * 2)


def test_selection_rows_are_disjoint_from_the_reported_problems():
  c = alpharl_config(select_problems=3)
  task = type('T', (), {'eval': [{'i': i} for i in range(10)], 'train': [{'j': j} for j in range(12)]})()
  c.eval.num_problems = 6
  s = alpharl.check_config(c)
  rows, how = alpharl.selection_rows(c, task, s, lambda rows, step, n, seed: rows[step * n:(step + 1) * n])
  assert [r['i'] for r in rows] == [6, 7, 8] and 'after the 6 reported' in how
  c.eval.num_problems = 8        # 2 left: 'auto' falls back to training prompts the window did not draw
  s = alpharl.check_config(c)    # W = 4 steps of 2 prompts: rows 0..7 drawn
  c.rl.prompts_per_step = 2
  rows, how = alpharl.selection_rows(c, task, s, lambda rows, step, n, seed: rows[step * n:(step + 1) * n])
  assert [r['j'] for r in rows] == [8, 9, 10] and 'not drawn' in how
  c.alpharl.select_on = 'eval_rest'
  with pytest.raises(ValueError, match='num_eval'):
    alpharl.selection_rows(c, task, alpharl.check_config(c), lambda *a: [])
  with pytest.raises(ValueError, match='select_on'):
    alpharl.check_config(alpharl_config(select_on='test'))
  with pytest.raises(ValueError, match='expo_alphas'):
    alpharl.check_config(alpharl_config(expo_alphas='1,x'))


def alpharl_config(**values):
  c = base_config('arithmetic')
  c.rl.steps = 10
  c.cfrl.enabled = False
  c.alpharl.fit_every = 2
  c.alpharl.update(values)
  return c


# --- across seeds ------------------------------------------------------------------------------
def test_pooled_share_and_seed_verdicts():
  # Three seeds 0.9, 1.0, 1.1: mean 1.0, sd 0.1, s.e. 0.1 / sqrt 3.
  share, se = alpharl_fit.pooled_share([0.9, 1.0, 1.1], [0.5, 0.5, 0.5])
  assert share == pytest.approx(1.0) and se == pytest.approx(0.1 / math.sqrt(3))
  assert alpharl_fit.pooled_share([0.7], [0.2]) == (0.7, 0.2)
  assert alpharl_fit.pooled_share([float('nan'), 0.4, 0.6], [1, 1, 1]) == (pytest.approx(0.5),
                                                                        pytest.approx(math.sqrt(0.02) / math.sqrt(2)))

  def run(seed, shares):
    models = {name: {'share': s, 'share_stderr': 0.01, 'steps_trained': 4} for name, s in shares.items()}
    return (f'grpo/seed{seed}', {'reference': {'accuracy': 0.5}, 'planned_steps': 10, 'models': models})

  # oracle: mean 0.99, sd 0.0071, s.e. 0.005: more than 2 s.e. above 0.96; window: 0.94 +- 0.02 is
  # within 2 s.e. of 0.96; ExPO: 0.32 +- 0.02.
  md = alpharl_report.seeds_section([run(0, {'released_oracle': 0.995, 'released_window': 0.92, 'expo': 0.30}),
                              run(1, {'released_oracle': 0.985, 'released_window': 0.96, 'expo': 0.34})])
  assert '| grpo | released, oracle target (upper bound) | 2 / 2 | 0.990 ± 0.005 | met (upper bound) |' in md
  assert '| grpo | released, window target | 2 / 2 | 0.940 ± 0.020 | within noise |' in md
  assert '| grpo | ExPO fixed | 2 / 2 | 0.320 ± 0.020 | not met |' in md
  assert alpharl_report.VERDICT_RULE in md
  assert alpharl_report.seeds_section([('x', {'reference': None, 'models': {}})]) == ''


def test_seed_verdicts_per_arm_and_variant_by_hand():
  """Three seeds of grpo, one of cfgrpo (the s.e. is then that run's own), a seed without a reference, a
  seed whose reference gain was 0 (share NaN), and a model trained past 40% of the steps."""
  nan = float('nan')

  def run(shares, reference=True, steps=4):
    models = {n: {'share': s, 'share_stderr': e, 'steps_trained': steps} for n, (s, e) in shares.items()}
    return {'reference': {'accuracy': 0.5} if reference else None, 'planned_steps': 10, 'models': models}

  results = [
      ('grpo/seed0', run({'alpharl_A': (0.30, 0.1), 'expo_tuned': (1.00, 0.1), 'released_oracle': (0.9, 0.1)})),
      ('grpo/seed1', run({'alpharl_A': (0.40, 0.1), 'expo_tuned': (0.90, 0.1), 'released_oracle': (nan, nan)})),
      ('grpo/seed2', run({'alpharl_A': (0.50, 0.1), 'expo_tuned': (1.10, 0.1)})),
      ('grpo/seed3', run({'alpharl_A': (9.0, 0.1)}, reference=False)),      # no reference: left out
      ('cfgrpo/seed0', run({'released_window': (0.99, 0.01), 'continued': (1.0, 0.01)})),
      ('cfgrpo/seed1', run({'released_window': (nan, nan)})),
  ]
  got = {(v.arm, v.model): v for v in alpharl_fit.seed_verdicts(results)}
  assert list(got) == [('grpo', 'alpharl_A'), ('grpo', 'released_oracle'), ('grpo', 'expo_tuned'),
                       ('cfgrpo', 'released_window'), ('cfgrpo', 'continued')]
  # A: 0.3, 0.4, 0.5 -> mean 0.4, sd 0.1, s.e. 0.1 / sqrt 3 = 0.0577: 0.56 below 0.96 -> not met.
  a = got[('grpo', 'alpharl_A')]
  assert (a.runs, a.with_share, a.verdict) == (3, 3, 'not met')
  assert a.share == pytest.approx(0.4) and a.stderr == pytest.approx(0.1 / math.sqrt(3))
  assert a.step_fraction == pytest.approx(0.4)
  # Tuned ExPO: 1.0, 0.9, 1.1 -> 1.0 +- 0.0577; |1.0 - 0.96| = 0.04 <= 2 s.e. -> within noise.
  e = got[('grpo', 'expo_tuned')]
  assert e.share == pytest.approx(1.0) and e.stderr == pytest.approx(0.1 / math.sqrt(3))
  assert e.verdict == 'within noise'
  # Oracle: one defined share (0.9 +- 0.1, that run's s.e.) of two runs; within 2 s.e. of 0.96; upper bound.
  o = got[('grpo', 'released_oracle')]
  assert (o.runs, o.with_share, o.share, o.stderr, o.verdict) == (2, 1, 0.9, 0.1, 'within noise (upper bound)')
  # cfgrpo's window target: 0.99 +- 0.01 (one seed's s.e.), 3 s.e. above 0.96 -> met.
  w = got[('cfgrpo', 'released_window')]
  assert (w.with_share, w.share, w.stderr, w.verdict) == (1, 0.99, 0.01, 'met')
  # continued: same steps here (4 of 10), share 1.0 +- 0.01 -> met; at 5 of 10 steps it is not met.
  assert got[('cfgrpo', 'continued')].verdict == 'met'
  late = alpharl_fit.seed_verdicts([('x/seed0', run({'continued': (1.0, 0.01)}, steps=5))])
  assert (late[0].step_fraction, late[0].verdict) == (0.5, 'not met')
  # No defined share anywhere: n/a, said so in the table.
  none = [('x/seed0', run({'expo': (nan, nan)})), ('x/seed1', run({'expo': (nan, nan)}))]
  (v,) = alpharl_fit.seed_verdicts(none)
  assert (v.runs, v.with_share, v.verdict) == (2, 0, 'n/a') and math.isnan(v.share)
  assert '| x | ExPO fixed | 0 / 2 | n/a (reference gain 0 in every seed) | n/a |' in alpharl_report.seeds_section(none)


# --- through the mode's checkpoint path -------------------------------------------------------
def test_window_checkpoints_to_released_models_and_report(tmp_path):
  """A rank-1-linear window saved as checkpoints (steps 0, 2, 4, 6, 8; kernel update (t c) u v^T, head moving),
  accuracy 0.3 + 0.01 t: fit_window + fit_released_window give W_8 + (T c) u v^T on every kernel at the
  target accuracy 0.3 + 0.01 T, the window-end head kept; summarize and the Markdown label the oracle as an
  upper bound."""
  cfg = qwen.QwenConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                        num_kv_heads=1, head_dim=8)
  shapes = jax.eval_shape(lambda key: qwen.init_params(cfg, key), jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  base = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape), shapes)
  fb = rank1.flatten(base)
  dirs = {}
  for p in rank1.matrix_paths(base):
    dirs[p] = 0.01 * unit_rank1(rng, *fb[p].shape)
  head = rng.normal(size=fb[('head', 'w')].shape)

  def at(t, k=None):
    leaves = {p: w + (t if k is None else k) * dirs[p] if p in dirs else w for p, w in fb.items()}
    leaves[('head', 'w')] = fb[('head', 'w')] + 0.01 * t * head
    return rank1.unflatten(leaves, base)

  ckpt = checkpoint.Checkpointer(str(tmp_path))
  for t in (0, 2, 4, 6, 8):
    ckpt.save(t, jax.tree_util.tree_map(np.float32, at(t)), {'opt': np.zeros(1, np.float32)},
              {'model_config': dataclasses.asdict(cfg), 'stage': 0, 'stage_start': 0})
  ckpt.close()
  T = 20
  fit = alpharl_fit.fit_window(str(tmp_path), 8, T)
  acc = {t: 0.3 + 0.01 * t for t in fit.fit_steps}
  rel = alpharl_fit.fit_released_window(fit, acc, oracle=0.3 + 0.01 * T, scale=True)
  assert rel.fits is not None and rel.steps == [2, 4, 6, 8]
  assert rel.targets == {'oracle': pytest.approx(0.5), 'window': pytest.approx(0.5)}
  got = rank1.flatten(rel.models['released_oracle'])
  want = rank1.flatten(at(8, k=8 + T))
  for p in fb:
    # float32 checkpoints of O(1) weights: ~1e-7 rounding, amplified by the extrapolation.
    np.testing.assert_allclose(got[p], want[p], atol=2e-5, err_msg=rank1.path_name(p))
  assert rel.diagnostics['pls_r2_median'] == pytest.approx(1.0, abs=1e-6)
  # ||added|| / ||window update|| = T / 8 on every kernel.
  assert rel.diagnostics['added_norm_ratio']['oracle'] == pytest.approx(T / 8, rel=1e-4)

  s = alpharl.check_config(alpharl_config(window=0.4))
  s = dataclasses.replace(s, planned_steps=T, window_steps=8)
  ev = lambda a: {'pass@1': a, 'pass@1_stderr': 0.01}
  evals = {'base': ev(0.3), 'window': ev(0.38), 'alpharl_A': ev(0.4), 'alpharl_B': ev(0.4),
           'released_oracle': ev(0.49), 'released_window': ev(0.45), 'expo': ev(0.41), 'expo_tuned': ev(0.42)}
  reference = {'run': str(tmp_path), 'accuracy': 0.5, 'stderr': 0.01, 'base_accuracy': 0.3, 'final_step': T,
               'curve': [(0, 0.3, 0.01), (T, 0.5, 0.01)]}
  c = alpharl_config()
  result = alpharl.summarize(c, s, str(tmp_path), fit, evals, {}, reference, None, {'fit': 1.0}, released=rel,
                             expo_selection={'alpha': 1.0, 'scores': [[0.5, 0.4], [1.0, 0.42]], 'split': 'x',
                                             'problems': 4, 'fixed_alpha': 1.5})
  assert result['models']['released_oracle']['share'] == pytest.approx(0.95)
  assert result['models']['released_oracle']['steps_trained'] == 8
  assert result['target']['verdicts']['released_oracle'] == 'within noise'
  md = alpharl_report.markdown_section(result, image=None)
  # s.e. = 0.01 sqrt(1 + 0.95^2 + 0.05^2) / 0.2 = 0.0690.
  assert 'upper bound | 8 | 0.490 ± 0.010 | +0.190 | 0.950 ± 0.069 | within noise (upper bound) |' in md
  assert 'Target from the window alone: 0.500' in md and 'ExPO tuned' in md and 'A: rank-1 step line' in md
  assert "paper's AlphaRL" not in md
  alpharl_report.write_plot(result, str(tmp_path / 'p.png'))
