"""REINFORCE with each baseline against plain-Python sums and gradients."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax.rl.reinforce import reinforce_advantages, reinforce_loss

MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0],
                 [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
LOGP = np.array([[-0.2, -1.5, 0.0, -0.7], [-0.4, -0.6, -9.0, -9.0], [-1.45, -0.3, -0.55, -9.0],
                 [-0.1, -9.0, -9.0, -9.0], [-1.35, -0.2, -0.95, -0.1], [-0.25, -1.65, -0.3, -9.0]], np.float32)
REF = LOGP - 0.2 * MASK
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]

# Baselines written out for rewards (1, 0, 0 | 1, 1, 0):
#   batch mean 1/2                 -> ( .5, -.5, -.5,  .5,  .5, -.5)
#   group means 1/3 and 2/3        -> (2/3, -1/3, -1/3, 1/3, 1/3, -2/3)
#   leave-one-out means of others  -> (1 - 0, 0 - .5, 0 - .5, 1 - .5, 1 - .5, 0 - 1)
BASELINE_ADV = {
    'none': [1.0, 0.0, 0.0, 1.0, 1.0, 0.0],
    'batch_mean': [0.5, -0.5, -0.5, 0.5, 0.5, -0.5],
    'group_mean': [2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3],
    'rloo': [1.0, -0.5, -0.5, 0.5, 0.5, -1.0],
}


@pytest.mark.parametrize('baseline', list(BASELINE_ADV))
def test_advantages_of_each_baseline(baseline):
  np.testing.assert_allclose(reinforce_advantages(REWARDS, baseline, group_size=3), BASELINE_ADV[baseline],
                             rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('baseline', list(BASELINE_ADV))
@pytest.mark.parametrize('agg', ['seq_mean', 'token_mean', 'constant'])
def test_loss_and_gradient_against_python(baseline, agg):
  a = BASELINE_ADV[baseline]
  rows = [[-a[i] * float(LOGP[i, t]) for t in range(4) if MASK[i, t]] for i in range(6)]
  lengths = [len(r) for r in rows]
  if agg == 'seq_mean':
    want = sum(sum(r) / len(r) for r in rows) / 6
    scale = [1 / (n * 6) for n in lengths]
  elif agg == 'token_mean':
    want = sum(map(sum, rows)) / 17
    scale = [1 / 17] * 6
  else:
    want = sum(map(sum, rows)) / (6 * 5)
    scale = [1 / 30] * 6
  f = lambda lp: reinforce_loss(lp, REWARDS, MASK, baseline=baseline, group_size=3, aggregation=agg,
                                max_tokens=5)
  loss, m = f(jnp.asarray(LOGP))
  assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-7)
  g = jax.grad(lambda lp: f(lp)[0])(jnp.asarray(LOGP))
  want_g = np.array([[-a[i] * scale[i] * MASK[i, t] for t in range(4)] for i in range(6)])
  np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-8)
  if baseline == 'none':
    assert 'reward_mean' not in m   # the argument may be advantages: no misleading reward figure
  else:
    assert float(m['reward_mean']) == pytest.approx(0.5)


def test_kl_term_and_jit():
  f = jax.jit(functools.partial(reinforce_loss, baseline='rloo', group_size=3, kl_estimator='k1',
                                aggregation='token_mean'))
  loss, m = f(LOGP, REWARDS, MASK, ref_logp=REF, kl_coef=0.5)
  pg = sum(-BASELINE_ADV['rloo'][i] * float(LOGP[i, t]) for i in range(6) for t in range(4) if MASK[i, t]) / 17
  assert float(loss) == pytest.approx(pg + 0.5 * 0.2, rel=1e-5)
  assert float(m['kl']) == pytest.approx(0.2, rel=1e-4)
  _, m3 = reinforce_loss(LOGP, REWARDS, MASK, ref_logp=REF, kl_coef=0.5, kl_estimator='k3')
  assert float(m3['kl']) == pytest.approx(math.exp(-0.2) + 0.2 - 1, rel=1e-4)


def test_errors():
  with pytest.raises(ValueError, match='group_size'):
    reinforce_loss(LOGP, REWARDS, MASK, baseline='rloo')
  with pytest.raises(ValueError, match="none.*batch_mean.*group_mean.*rloo"):
    reinforce_loss(LOGP, REWARDS, MASK, baseline='mean')
  with pytest.raises(ValueError, match='rows'):
    reinforce_loss(LOGP, REWARDS[:4], MASK)
  with pytest.raises(ValueError, match='do not split'):
    reinforce_loss(LOGP, REWARDS, MASK, baseline='group_mean', group_size=4)
  with pytest.raises(ValueError, match='ref_logp'):
    reinforce_loss(LOGP, REWARDS, MASK, kl_coef=0.1)
