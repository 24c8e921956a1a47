"""PPO: clipped policy loss with token advantages, clipped value loss, value head, KL-shaped rewards."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax.rl import advantages as adv
from cfrl_jax.rl.ppo import (init_value_head, ppo_loss, ppo_policy_loss, token_rewards_with_kl_penalty,
                             value_head, value_loss)
from test_grpo import LOGP, MASK, OLD   # tests/test_grpo.py's batch: some ratios outside [0.8, 1.2], some inside

ADV_T = np.array([[0.9, -0.4, 0.3, 1.2], [-0.6, -0.2, 0, 0], [0.1, -0.8, 0.5, 0],
                  [0.7, 0, 0, 0], [-0.3, 0.6, -1.0, 0.2], [0.4, -0.9, 1.1, 0]], np.float32)


def py_policy_loss(logp, old, a, mask, cl=0.2, ch=0.2):
  vals = []
  for i in range(len(mask)):
    for t in range(len(mask[i])):
      if mask[i][t]:
        r = math.exp(float(logp[i][t]) - float(old[i][t]))
        vals.append(-min(r * float(a[i][t]), min(max(r, 1 - cl), 1 + ch) * float(a[i][t])))
  return sum(vals) / len(vals)


def test_policy_loss_token_advantages():
  for cl, ch in ((0.2, 0.2), (0.1, 0.3)):
    loss, m = ppo_policy_loss(LOGP, OLD, ADV_T, MASK, clip_low=cl, clip_high=ch)
    assert float(loss) == pytest.approx(py_policy_loss(LOGP, OLD, ADV_T, MASK, cl, ch), rel=1e-5)
  _, m = ppo_policy_loss(LOGP, OLD, ADV_T, MASK)
  # ratio < 0.8 and A < 0: (0,1) r=.741 A=-.4; (1,0) r=.741 A=-.6; (4,0) r=.779 A=-.3;
  # (5,1) r=.705 A=-.9. ratio > 1.2 and A > 0: (0,0) r=1.35 A=.9; (2,2) r=1.28 A=.5;
  # (3,0) r=1.35 A=.7; (4,1) r=1.49 A=.6; (4,3) r=1.22 A=.2. ((1,1) r=1.35 has A < 0: not clipped.)
  assert float(m['clip_fraction_low']) == pytest.approx(4 / 17)
  assert float(m['clip_fraction_high']) == pytest.approx(5 / 17)
  assert float(m['clip_fraction']) == pytest.approx(9 / 17)


def test_policy_gradient_at_ratio_one():
  g = jax.grad(lambda x: ppo_policy_loss(x, OLD, ADV_T, MASK)[0])(jnp.asarray(OLD))
  np.testing.assert_allclose(g, -ADV_T * MASK / 17, rtol=1e-5, atol=1e-8)


# Value clipping, one token each, old value 0, clip 0.2 (V_clip = clip(V, -0.2, 0.2)):
#   V     R     (V-R)^2  (Vc-R)^2  0.5*max   clipped branch larger?
#   0.5   1.0   0.25     0.64      0.32      yes  (gradient 0)
#   0.1   1.0   0.81     0.81      0.405     no   (inside the clip range)
#  -0.5  -1.0   0.25     0.64      0.32      yes
#   0.5   0.6   0.01     0.16      0.08      yes
#   0.5  -1.0   2.25     1.44      1.125     no   (gradient V - R = 1.5)
V = np.array([[0.5], [0.1], [-0.5], [0.5], [0.5]], np.float32)
R = np.array([[1.0], [1.0], [-1.0], [0.6], [-1.0]], np.float32)
V_OLD = np.zeros_like(V)
ONE = np.ones_like(V)


def test_value_loss_clipping_by_hand():
  loss, m = value_loss(V, V_OLD, R, ONE, clip=0.2)
  assert float(loss) == pytest.approx((0.32 + 0.405 + 0.32 + 0.08 + 1.125) / 5, rel=1e-5)
  assert float(m['value_clip_fraction']) == pytest.approx(3 / 5)
  g = jax.grad(lambda v: value_loss(v, V_OLD, R, ONE, clip=0.2)[0])(jnp.asarray(V))
  np.testing.assert_allclose(g[:, 0], [0.0, (0.1 - 1.0) / 5, 0.0, 0.0, 1.5 / 5], rtol=1e-5, atol=1e-8)
  unclipped, m = value_loss(V, V_OLD, R, ONE, clip=None)
  assert float(unclipped) == pytest.approx(0.5 * (0.25 + 0.81 + 0.25 + 0.01 + 2.25) / 5, rel=1e-5)
  assert float(m['value_clip_fraction']) == 0.0


def test_value_loss_masking_and_explained_variance():
  rng = np.random.default_rng(0)
  v = rng.normal(size=MASK.shape).astype(np.float32)
  r = (v + rng.normal(scale=0.3, size=MASK.shape)).astype(np.float32)
  vo = (v + rng.normal(scale=0.3, size=MASK.shape)).astype(np.float32)
  v_junk = np.where(MASK > 0, v, np.nan).astype(np.float32)
  loss, m = value_loss(v_junk, vo, r, MASK, clip=0.2, aggregation='seq_mean')
  per_row = []
  for i in range(6):
    row = []
    for t in range(4):
      if MASK[i, t]:
        vc = vo[i, t] + min(max(v[i, t] - vo[i, t], -0.2), 0.2)
        row.append(0.5 * max((v[i, t] - r[i, t]) ** 2, (vc - r[i, t]) ** 2))
    per_row.append(sum(row) / len(row))
  assert float(loss) == pytest.approx(sum(per_row) / 6, rel=1e-5)
  sel = MASK > 0
  ev = 1 - np.var(r[sel] - v[sel]) / np.var(r[sel])
  assert float(m['explained_variance']) == pytest.approx(ev, rel=1e-4)
  with pytest.raises(ValueError, match='clip'):
    value_loss(V, V_OLD, R, ONE, clip=-1.0)


def test_ppo_loss_combines_terms():
  rng = np.random.default_rng(3)
  values = rng.normal(size=MASK.shape).astype(np.float32)
  old_values = values + 0.1
  returns = rng.normal(size=MASK.shape).astype(np.float32)
  ref = LOGP - 0.1
  loss, m = ppo_loss(LOGP, OLD, ADV_T, values, old_values, returns, MASK, vf_coef=0.25,
                     ref_logp=ref, kl_coef=0.5, kl_estimator='k1')
  pg = py_policy_loss(LOGP, OLD, ADV_T, MASK)
  vf = float(value_loss(values, old_values, returns, MASK)[0])
  # k1 = logp - ref = 0.1 on every token.
  assert float(loss) == pytest.approx(pg + 0.25 * vf + 0.5 * 0.1, rel=1e-5)
  assert float(m['kl']) == pytest.approx(0.1, rel=1e-4)
  assert {'pg_loss', 'value_loss', 'clip_fraction', 'explained_variance', 'loss'} <= set(m)
  f = jax.jit(functools.partial(ppo_loss, aggregation='constant', max_tokens=4))
  l2, _ = f(LOGP, OLD, ADV_T, values, old_values, returns, MASK)
  assert np.isfinite(float(l2))


def test_token_rewards_with_kl_penalty_and_gae():
  old = np.log(np.array([[0.5, 0.25, 0.5]], np.float32))
  ref = np.log(np.array([[0.25, 0.25, 1.0]], np.float32))
  mask = np.array([[1, 1, 0]], np.float32)
  tr = token_rewards_with_kl_penalty([1.0], old, ref, mask, kl_coef=0.1)
  # k1 = log 2, 0 on the two counted tokens; reward 1 on the last counted token (t = 1).
  np.testing.assert_allclose(tr, [[-0.1 * math.log(2), 1.0, 0.0]], rtol=1e-6)
  A, R = adv.gae(tr, np.zeros((1, 3), np.float32), mask, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(R, [[1 - 0.1 * math.log(2), 1.0, 0.0]], rtol=1e-6)


def test_value_head():
  params = init_value_head(16, jax.random.PRNGKey(0), scale=0.1)
  assert params['w'].shape == (16,) and params['b'].shape == ()
  assert float(params['b']) == 0.0
  params = {'w': params['w'], 'b': jnp.float32(0.3)}
  phi = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 5, 16)))
  want = np.einsum('btd,d->bt', phi.astype(np.float64), np.asarray(params['w'], np.float64)) + 0.3
  np.testing.assert_allclose(value_head(params, phi), want, rtol=1e-5, atol=1e-6)
  # Initial values have std ~ scale for unit-variance features.
  big = init_value_head(4096, jax.random.PRNGKey(2), scale=0.1)
  assert float(jnp.linalg.norm(big['w'])) == pytest.approx(0.1, rel=0.05)
  with pytest.raises(ValueError, match='phi'):
    value_head(params, phi[..., :8])
  with pytest.raises(ValueError, match='hidden_size'):
    init_value_head(0, jax.random.PRNGKey(0))
