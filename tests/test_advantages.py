"""Advantages: group normalisation, RLOO, batch baseline and GAE against plain-Python references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax.rl import advantages as adv

REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]   # 2 prompts x 3 samples, group-major


def test_group_normalized_hand_values():
  # Group 0: mean 1/3, sample std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3).
  s = math.sqrt(1 / 3)
  want = [(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, (1 / 3) / s, (1 / 3) / s, (-2 / 3) / s]
  np.testing.assert_allclose(adv.group_normalized(REWARDS, 3, eps=0.0), want, rtol=1e-6)
  np.testing.assert_allclose(want[:3], [1.1547005, -0.5773503, -0.5773503], rtol=1e-6)
  # eps enters the denominator.
  np.testing.assert_allclose(adv.group_normalized(REWARDS, 3, eps=0.1),
                             [w * s / (s + 0.1) for w in want], rtol=1e-6)


def test_group_normalized_population_std_and_dr_grpo():
  r = [0.2, 0.9, 0.4, 3.0, -1.0, 0.5]
  for g in range(2):
    grp = r[3 * g:3 * g + 3]
    mean = sum(grp) / 3
    pop_std = math.sqrt(sum((x - mean) ** 2 for x in grp) / 3)
    got = adv.group_normalized(r, 3, ddof=0, eps=1e-6)[3 * g:3 * g + 3]
    np.testing.assert_allclose(got, [(x - mean) / (pop_std + 1e-6) for x in grp], rtol=1e-5)
    got = adv.group_normalized(r, 3, scale_by_std=False)[3 * g:3 * g + 3]
    np.testing.assert_allclose(got, [x - mean for x in grp], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(adv.group_mean_baseline(r, 3), adv.group_normalized(r, 3, scale_by_std=False))


def test_constant_groups_give_exactly_zero():
  for r in ([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.7, 0.7, 0.7], [0.3] * 6):
    for scale in (True, False):
      a = np.asarray(adv.group_normalized(r, 3, scale_by_std=scale))
      assert np.all(a == 0.0), (r, scale, a)
  mixed = np.asarray(adv.group_normalized([0.1, 0.1, 0.1, 1.0, 0.0, 0.0], 3))
  assert np.all(np.isfinite(mixed)) and np.all(mixed[:3] == 0) and mixed[3] > 0


def test_rloo_against_explicit_leave_one_out():
  r = [0.2, 0.9, 0.4, 0.7, 3.0, -1.0, 0.5, 0.0]
  G = 4
  want = []
  for i in range(len(r)):
    g = i // G
    others = [r[j] for j in range(g * G, g * G + G) if j != i]
    want.append(r[i] - sum(others) / len(others))
  np.testing.assert_allclose(adv.rloo(r, G), want, rtol=1e-5, atol=1e-7)
  # The known identity: RLOO = G / (G - 1) * (r - group mean).
  np.testing.assert_allclose(adv.rloo(r, G), G / (G - 1) * np.asarray(adv.group_mean_baseline(r, G)),
                             rtol=1e-5, atol=1e-7)


def test_batch_mean_baseline():
  np.testing.assert_allclose(adv.batch_mean_baseline(REWARDS), [0.5, -0.5, -0.5, 0.5, 0.5, -0.5])


def test_bad_group_shapes():
  with pytest.raises(ValueError, match='do not split into groups of 4'):
    adv.group_normalized(REWARDS, 4)
  with pytest.raises(ValueError, match='do not split'):
    adv.rloo(REWARDS, 4)
  with pytest.raises(ValueError, match='group_size'):
    adv.rloo(REWARDS, 1)
  with pytest.raises(ValueError, match='group_size'):
    adv.group_normalized(REWARDS, 3.0)
  with pytest.raises(ValueError, match=r'\(B,\)'):
    adv.group_normalized(np.ones((2, 3)), 3)
  np.testing.assert_allclose(adv.group_normalized(REWARDS, np.int64(3)), adv.group_normalized(REWARDS, 3))


def _py_gae(rewards, values, mask, gamma, lam):
  """Direct recursion over each row's counted positions, right to left."""
  B, T = len(mask), len(mask[0])
  A = [[0.0] * T for _ in range(B)]
  for i in range(B):
    idx = [t for t in range(T) if mask[i][t]]
    next_v, next_a = 0.0, 0.0
    for t in reversed(idx):
      delta = rewards[i][t] + gamma * next_v - values[i][t]
      A[i][t] = delta + gamma * lam * next_a
      next_v, next_a = values[i][t], A[i][t]
  R = [[A[i][t] + values[i][t] if mask[i][t] else 0.0 for t in range(T)] for i in range(B)]
  return A, R


GAE_MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1],     # right-, left-padded
                     [1, 1, 0, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32)  # a hole, 1 token, empty


def test_gae_against_python_recursion():
  rng = np.random.default_rng(1)
  rewards = rng.normal(size=GAE_MASK.shape).astype(np.float32) * GAE_MASK
  values = rng.normal(size=GAE_MASK.shape).astype(np.float32)
  values_with_junk = np.where(GAE_MASK > 0, values, 1e6).astype(np.float32)
  for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.5, 0.0)):
    A, R = adv.gae(rewards, values_with_junk, GAE_MASK, gamma, lam)
    wantA, wantR = _py_gae(rewards.tolist(), values.tolist(), GAE_MASK.tolist(), gamma, lam)
    np.testing.assert_allclose(A, wantA, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(R, wantR, rtol=1e-5, atol=1e-6)


def test_gae_terminal_reward_hand_values():
  # One sequence of 3 tokens, reward 1 at the end, V = (0.5, 0.6, 0.8), gamma 1, lambda 0.95.
  # delta = (0.6-0.5, 0.8-0.6, 1-0.8) = (0.1, 0.2, 0.2);
  # A_2 = 0.2, A_1 = 0.2 + 0.95*0.2 = 0.39, A_0 = 0.1 + 0.95*0.39 = 0.4705.
  mask = np.array([[1, 1, 1, 0]], np.float32)
  tr = adv.terminal_token_rewards([1.0], mask)
  np.testing.assert_array_equal(tr, [[0, 0, 1, 0]])
  A, R = adv.gae(tr, np.array([[0.5, 0.6, 0.8, 7.0]], np.float32), mask, 1.0, 0.95)
  np.testing.assert_allclose(A, [[0.4705, 0.39, 0.2, 0.0]], rtol=1e-5)
  np.testing.assert_allclose(R, [[0.9705, 0.99, 1.0, 0.0]], rtol=1e-5)
  # lambda = 1, gamma = 1: Monte Carlo, returns are the reward-to-go (1 everywhere).
  _, R1 = adv.gae(tr, np.array([[0.5, 0.6, 0.8, 7.0]], np.float32), mask, 1.0, 1.0)
  np.testing.assert_allclose(R1, [[1.0, 1.0, 1.0, 0.0]], rtol=1e-6)


def test_gae_is_jittable_and_stops_gradients():
  rewards = adv.terminal_token_rewards(jnp.asarray(REWARDS), np.ones((6, 5), np.float32))
  f = jax.jit(adv.gae, static_argnames=('gamma', 'lam'))
  A, _ = f(rewards, jnp.zeros((6, 5)), jnp.ones((6, 5)), gamma=1.0, lam=0.95)
  np.testing.assert_allclose(A[:, 0], np.asarray(REWARDS) * 0.95 ** 4, rtol=1e-6)
  g = jax.grad(lambda v: jnp.sum(adv.gae(rewards, v, jnp.ones((6, 5)))[0]))(jnp.ones((6, 5)))
  assert np.all(np.asarray(g) == 0)


def test_terminal_token_rewards_places_reward_on_last_counted_token():
  tr = np.asarray(adv.terminal_token_rewards([1, 2, 3, 4, 5, 6], GAE_MASK))
  want = np.zeros_like(GAE_MASK)
  for i, t in ((0, 4), (1, 2), (2, 4), (3, 4), (4, 0)):
    want[i, t] = i + 1
  np.testing.assert_array_equal(tr, want)   # row 5 is empty: no reward anywhere


def test_masked_whiten():
  rng = np.random.default_rng(2)
  x = rng.normal(3.0, 2.0, size=GAE_MASK.shape).astype(np.float32)
  w = np.asarray(adv.masked_whiten(x, GAE_MASK))
  vals = w[GAE_MASK > 0]
  assert abs(vals.mean()) < 1e-5 and abs(vals.std() - 1) < 1e-4
  assert np.all(w[GAE_MASK == 0] == 0)
  scaled = np.asarray(adv.masked_whiten(x, GAE_MASK, shift_mean=False))
  np.testing.assert_allclose(scaled[GAE_MASK > 0], x[GAE_MASK > 0] / x[GAE_MASK > 0].std(), rtol=1e-4)


def test_echo_chamber_reinforce_advantages_2x3_by_hand():
  """Group-mean baseline, k1 KL in the per-token reward, returns-to-go, masked whitening, on 2x3."""
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  logp = np.array([[-0.9, -1.2, -0.7], [-0.6, -0.8, -3.0]], np.float32)
  ref = logp - np.array([[0.1, -0.2, 0.3], [0.4, 0.2, 9.0]], np.float32)  # logp - ref as written
  # rewards (1, 0) in one group of 2: centred (0.5, -0.5); kl_coef 0.1 -> token rewards
  #   row 0: -0.01, +0.02, -0.03 + 0.5      returns-to-go 0.48, 0.49, 0.47
  #   row 1: -0.04, -0.02 - 0.5, (masked)   returns-to-go -0.56, -0.52, 0
  returns = np.asarray(adv.kl_penalized_returns(np.array([0.5, -0.5]), logp, ref, mask, 0.1))
  np.testing.assert_allclose(returns, [[0.48, 0.49, 0.47], [-0.56, -0.52, 0.0]], atol=1e-6)
  # whitening over the 5 counted tokens: mean 0.072, population variance 1.24948 / 5 = 0.249896
  std = np.sqrt(0.249896)
  expected = np.array([[0.408, 0.418, 0.398], [-0.632, -0.592, 0.0]]) / std
  got = np.asarray(adv.echo_chamber_reinforce_advantages(np.array([1.0, 0.0]), logp, ref, mask, 2, kl_coef=0.1))
  np.testing.assert_allclose(got, expected, atol=1e-4)
  # without the KL every token of a row carries its centred reward, whitened: +-1 (equal counts aside)
  no_kl = np.asarray(adv.echo_chamber_reinforce_advantages(np.array([1.0, 0.0]), logp, ref, mask, 2))
  assert np.all(no_kl[0] > 0) and np.all(no_kl[1, :2] < 0) and no_kl[1, 2] == 0.0
