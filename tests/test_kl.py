"""KL estimators: closed forms, exact expectations under pi, k3 >= 0 and k3 ~ k1^2/2."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cfrl_jax.rl.kl import KL_ESTIMATORS, kl_penalty, kl_per_token

LOGP = np.array([[-0.5, -1.2, -0.3], [-2.0, -0.05, -3.0]], np.float32)
REF = np.array([[-0.7, -1.0, -0.3], [-0.5, -0.10, -4.5]], np.float32)
MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)


def test_closed_forms_token_by_token():
  for est in KL_ESTIMATORS:
    got = np.asarray(kl_per_token(LOGP, REF, est))
    for i in range(2):
      for t in range(3):
        x = float(LOGP[i, t]) - float(REF[i, t])   # log pi / pi_ref
        want = {'k1': x, 'k2': 0.5 * x * x, 'k3': math.exp(-x) + x - 1.0}[est]
        assert got[i, t] == pytest.approx(want, rel=1e-5, abs=1e-7), (est, i, t)


def test_hand_computed_values():
  # x = logp - ref = 0.2 and -1.5.
  x = np.array([0.2, -1.5], np.float32)
  np.testing.assert_allclose(kl_per_token(x, np.zeros(2), 'k1'), [0.2, -1.5], rtol=1e-6)
  np.testing.assert_allclose(kl_per_token(x, np.zeros(2), 'k2'), [0.02, 1.125], rtol=1e-6)
  # exp(-0.2) + 0.2 - 1 = 0.0187307531, exp(1.5) - 1.5 - 1 = 1.9816890703
  np.testing.assert_allclose(kl_per_token(x, np.zeros(2), 'k3'), [0.0187307531, 1.9816890703], rtol=1e-5)


@settings(max_examples=200, deadline=None)
@given(st.floats(-20, 20), st.floats(-20, 20))
def test_k3_is_nonnegative(a, b):
  assert float(kl_per_token(jnp.float32(a), jnp.float32(b), 'k3')) >= 0.0


def test_k3_matches_half_k1_squared_for_small_differences():
  x = np.array([1e-3, -1e-3, 3e-3, -3e-3, 1e-2, -1e-2, 3e-2, -3e-2], np.float32)
  k1 = np.asarray(kl_per_token(x, np.zeros_like(x), 'k1'))
  k3 = np.asarray(kl_per_token(x, np.zeros_like(x), 'k3'))
  # k3 = x^2/2 - x^3/6 + O(x^4): the relative gap to k1^2/2 is ~|x|/3 (float32 adds ~1e-4).
  half_sq = k1.astype(np.float64) ** 2 / 2
  np.testing.assert_allclose(k3, half_sq, rtol=0.011)
  assert np.all(np.abs(k3 / half_sq - 1) <= np.abs(x) / 3 * 1.1 + 3e-4)


def test_k1_and_k3_average_to_reverse_kl_under_pi():
  # The estimators are for KL(pi || pi_ref) with tokens drawn from pi: the exact
  # pi-weighted average over a whole vocabulary must be that KL, not KL(pi_ref || pi).
  rng = np.random.default_rng(0)
  for _ in range(5):
    pi = rng.dirichlet(np.ones(7))
    ref = rng.dirichlet(np.ones(7))
    reverse = float(np.sum(pi * np.log(pi / ref)))
    forward = float(np.sum(ref * np.log(ref / pi)))
    for est in ('k1', 'k3'):
      k = np.asarray(kl_per_token(np.log(pi).astype(np.float32), np.log(ref).astype(np.float32), est), np.float64)
      avg = float(np.sum(pi * k))
      assert avg == pytest.approx(reverse, rel=1e-4, abs=1e-6)
      assert abs(avg - forward) > 1e-3


def test_clip_bounds_the_estimate_and_overflow():
  x = np.array([-200.0, 0.1, 200.0], np.float32)
  unclipped = kl_per_token(x, np.zeros(3), 'k3')
  assert np.isinf(unclipped[0])
  clipped = np.asarray(kl_per_token(x, np.zeros(3), 'k3', clip=10.0))
  np.testing.assert_allclose(clipped, [10.0, math.exp(-0.1) + 0.1 - 1, 10.0], rtol=1e-5)
  with pytest.raises(ValueError, match='clip'):
    kl_per_token(x, np.zeros(3), 'k3', clip=0.0)


def test_kl_penalty_value_gradient_and_metrics():
  beta = 0.05
  penalty, metrics = kl_penalty(LOGP, REF, MASK, kl_coef=beta, estimator='k3', aggregation='token_mean')
  toks = [(i, t) for i in range(2) for t in range(3) if MASK[i, t]]
  k3 = lambda i, t: math.exp(float(REF[i, t] - LOGP[i, t])) - float(REF[i, t] - LOGP[i, t]) - 1
  mean_k3 = sum(k3(i, t) for i, t in toks) / len(toks)
  assert float(penalty) == pytest.approx(beta * mean_k3, rel=1e-5)
  assert float(metrics['kl']) == pytest.approx(mean_k3, rel=1e-5)
  # d/dlogp of beta * k3 / N = beta * (1 - exp(ref - logp)) / N; ref gets no gradient.
  g_logp, g_ref = jax.grad(lambda a, b: kl_penalty(a, b, MASK, kl_coef=beta, estimator='k3')[0],
                           argnums=(0, 1))(jnp.asarray(LOGP), jnp.asarray(REF))
  want = np.zeros_like(LOGP)
  for i, t in toks:
    want[i, t] = beta * (1 - math.exp(float(REF[i, t] - LOGP[i, t]))) / len(toks)
  np.testing.assert_allclose(g_logp, want, rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(g_ref) == 0)


def test_kl_penalty_without_reference():
  penalty, metrics = kl_penalty(LOGP, None, MASK, kl_coef=0.0)
  assert float(penalty) == 0.0 and metrics == {}
  with pytest.raises(ValueError, match='ref_logp'):
    kl_penalty(LOGP, None, MASK, kl_coef=0.01)
  with pytest.raises(ValueError, match='ref_logp'):
    kl_penalty(LOGP, None, MASK, kl_coef=jnp.float32(0.0))


def test_bad_estimator_and_shapes():
  with pytest.raises(ValueError, match="k1.*k2.*k3"):
    kl_per_token(LOGP, REF, 'k4')
  with pytest.raises(ValueError, match='shape'):
    kl_per_token(LOGP, REF[:, :2], 'k1')
