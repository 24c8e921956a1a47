"""grpo_loss against a token-by-token plain-Python reference on a 2-prompt x 3-sample batch."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax.models import qwen
from cfrl_jax.rl.grpo import grpo_loss

MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0],
                 [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
OLD = np.array([[-0.5, -1.2, -0.3, -2.0], [-0.7, -0.9, -1.0, -1.0], [-1.5, -0.2, -0.8, -1.0],
                [-0.4, -1.0, -1.0, -1.0], [-1.1, -0.6, -0.9, -0.3], [-0.25, -1.3, -0.45, -1.0]], np.float32)
# logp - old_logp: +-0.3 and +0.4 push the ratio outside [0.8, 1.2]; +-0.1 stay inside.
DELTA = np.array([[0.3, -0.3, 0.1, 0.0], [-0.3, 0.3, 0.0, 0.0], [0.05, -0.1, 0.25, 0.0],
                  [0.3, 0.0, 0.0, 0.0], [-0.25, 0.4, -0.05, 0.2], [0.0, -0.35, 0.15, 0.0]], np.float32)
LOGP = (OLD + DELTA).astype(np.float32)
REF = (LOGP - np.array([[0.2, -0.1, 0.5, 0.0], [0.3, -0.4, 0, 0], [0.01, 0.02, -0.6, 0],
                        [1.0, 0, 0, 0], [-0.2, 0.1, 0.3, -0.05], [0.0, 0.7, -0.3, 0]])).astype(np.float32)
# GRPO advantages of rewards (1, 0, 0 | 1, 1, 0): (r - mean) / sample std, written out.
A = np.array([1.1547005, -0.5773503, -0.5773503, 0.5773503, 0.5773503, -1.1547005], np.float32)


def py_grpo(logp, old, ref, adv, mask, clip_low=0.2, clip_high=0.2, kl_coef=0.0, est='k3',
            agg='seq_mean', max_tokens=None):
  """Plain-Python GRPO: loop over tokens, then aggregate."""
  rows = []
  for i in range(len(mask)):
    row = []
    for t in range(len(mask[i])):
      if not mask[i][t]:
        continue
      a = adv[i] if np.ndim(adv) == 1 else adv[i][t]
      ratio = math.exp(logp[i][t] - old[i][t])
      clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
      pg = -min(ratio * a, clipped * a)
      kl = 0.0
      if kl_coef:
        x = logp[i][t] - ref[i][t]
        kl = {'k1': x, 'k2': x * x / 2, 'k3': math.exp(-x) + x - 1}[est]
      row.append(pg + kl_coef * kl)
    rows.append(row)
  if agg == 'seq_mean':
    nonempty = [r for r in rows if r]
    return sum(sum(r) / len(r) for r in nonempty) / len(nonempty)
  total = sum(sum(r) for r in rows)
  if agg == 'token_mean':
    return total / sum(len(r) for r in rows)
  return total / (len(rows) * max_tokens)


def _f64(x):
  return np.asarray(x, np.float64).tolist()


@pytest.mark.parametrize('agg', ['seq_mean', 'token_mean', 'constant'])
@pytest.mark.parametrize('clip_high', [0.2, 0.28])
def test_pg_loss_matches_reference(agg, clip_high):
  loss, m = grpo_loss(LOGP, OLD, None, A, MASK, clip_high=clip_high, aggregation=agg, max_tokens=6)
  want = py_grpo(_f64(LOGP), _f64(OLD), None, _f64(A), MASK.tolist(), clip_high=clip_high, agg=agg,
                 max_tokens=6)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(m['pg_loss']) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize('est', ['k1', 'k2', 'k3'])
@pytest.mark.parametrize('agg', ['seq_mean', 'token_mean', 'constant'])
def test_loss_with_kl_matches_reference(est, agg):
  loss, m = grpo_loss(LOGP, OLD, REF, A, MASK, kl_coef=0.04, kl_estimator=est, aggregation=agg,
                      max_tokens=5)
  want = py_grpo(_f64(LOGP), _f64(OLD), _f64(REF), _f64(A), MASK.tolist(), kl_coef=0.04, est=est,
                 agg=agg, max_tokens=5)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  pg = py_grpo(_f64(LOGP), _f64(OLD), None, _f64(A), MASK.tolist(), agg=agg, max_tokens=5)
  assert float(m['pg_loss']) == pytest.approx(pg, rel=1e-5)
  # metrics['kl'] is the token mean of the estimator, whatever the aggregation.
  x = [float(LOGP[i, t]) - float(REF[i, t]) for i in range(6) for t in range(4) if MASK[i, t]]
  k = {'k1': lambda v: v, 'k2': lambda v: v * v / 2, 'k3': lambda v: math.exp(-v) + v - 1}[est]
  assert float(m['kl']) == pytest.approx(sum(map(k, x)) / 17, rel=1e-5)
  if est == 'k3':
    assert float(m['kl']) >= 0


def test_clipping_on_each_side_by_hand():
  # Four one-token sequences: ratio e^{0.3} = 1.3498588 or e^{-0.3} = 0.7408182, A = +-1.
  old = np.zeros((4, 1), np.float32)
  logp = np.array([[0.3], [0.3], [-0.3], [-0.3]], np.float32)
  adv = np.array([1.0, -1.0, -1.0, 1.0], np.float32)
  mask = np.ones((4, 1), np.float32)
  # A>0, ratio high: clipped to 1.2 -> -1.2      A<0, ratio high: unclipped -> +1.3498588
  # A<0, ratio low: clipped to 0.8 -> +0.8       A>0, ratio low: unclipped -> -0.7408182
  per_seq = [-1.2, 1.3498588, 0.8, -0.7408182]
  loss, m = grpo_loss(logp, old, None, adv, mask, aggregation='token_mean')
  assert float(loss) == pytest.approx(sum(per_seq) / 4, rel=1e-5)
  assert float(m['clip_fraction_high']) == 0.25 and float(m['clip_fraction_low']) == 0.25
  assert float(m['clip_fraction']) == 0.5
  g = jax.grad(lambda lp: grpo_loss(lp, old, None, adv, mask, aggregation='token_mean')[0])(jnp.asarray(logp))
  # Clipped tokens get no gradient; unclipped ones get -A * ratio / N.
  np.testing.assert_allclose(g[:, 0], [0.0, 1.3498588 / 4, 0.0, -0.7408182 / 4], rtol=1e-5)
  # DAPO clip-higher: clip_high = 0.4 leaves e^{0.3} unclipped.
  loss_hi, m_hi = grpo_loss(logp, old, None, adv, mask, clip_high=0.4, aggregation='token_mean')
  assert float(loss_hi) == pytest.approx((-1.3498588 + 1.3498588 + 0.8 - 0.7408182) / 4, rel=1e-5)
  assert float(m_hi['clip_fraction_high']) == 0.0


def test_clip_fractions_and_ratio_metrics_on_toy_batch():
  _, m = grpo_loss(LOGP, OLD, None, A, MASK)
  # Low: ratio < 0.8 with A < 0 at (1,0) and (5,1). High: ratio > 1.2 with A > 0 at
  # (0,0), (3,0), (4,1), (4,3). 17 counted tokens.
  assert float(m['clip_fraction_low']) == pytest.approx(2 / 17)
  assert float(m['clip_fraction_high']) == pytest.approx(4 / 17)
  ratios = [math.exp(DELTA[i, t]) for i in range(6) for t in range(4) if MASK[i, t]]
  assert float(m['ratio_mean']) == pytest.approx(sum(ratios) / 17, rel=1e-5)
  assert float(m['ratio_max']) == pytest.approx(math.exp(0.4), rel=1e-5)
  kl_old = [math.exp(d) - 1 - d for d in (DELTA[i, t] for i in range(6) for t in range(4) if MASK[i, t])]
  assert float(m['kl_old']) == pytest.approx(sum(kl_old) / 17, rel=1e-4)
  assert float(m['num_tokens']) == 17
  assert 'kl' not in m


def test_gradient_at_ratio_one_is_minus_advantage_over_token_count():
  lp = jnp.asarray(OLD)
  g = jax.grad(lambda x: grpo_loss(x, OLD, None, A, MASK, aggregation='token_mean')[0])(lp)
  np.testing.assert_allclose(g, -A[:, None] * MASK / 17, rtol=1e-5, atol=1e-8)
  g = jax.grad(lambda x: grpo_loss(x, OLD, None, A, MASK, aggregation='seq_mean')[0])(lp)
  np.testing.assert_allclose(g, -A[:, None] * MASK / MASK.sum(1, keepdims=True) / 6, rtol=1e-5, atol=1e-8)
  g = jax.grad(lambda x: grpo_loss(x, OLD, None, A, MASK, aggregation='constant', max_tokens=8)[0])(lp)
  np.testing.assert_allclose(g, -A[:, None] * MASK / 48, rtol=1e-5, atol=1e-8)


def test_kl_gradient_k1_and_k3():
  # Advantages 0 isolate the KL term. k1: d/dlogp = beta / N. k3: beta (1 - exp(ref - logp)) / N.
  zero = np.zeros(6, np.float32)
  beta = 0.1
  g1 = jax.grad(lambda x: grpo_loss(x, OLD, REF, zero, MASK, kl_coef=beta, kl_estimator='k1',
                                    aggregation='token_mean')[0])(jnp.asarray(LOGP))
  np.testing.assert_allclose(g1, beta * MASK / 17, rtol=1e-5, atol=1e-8)
  g3 = jax.grad(lambda x: grpo_loss(x, OLD, REF, zero, MASK, kl_coef=beta, kl_estimator='k3',
                                    aggregation='token_mean')[0])(jnp.asarray(LOGP))
  np.testing.assert_allclose(g3, beta * (1 - np.exp(REF - LOGP)) * MASK / 17, rtol=1e-5, atol=1e-7)


def test_per_token_advantages_and_padding_garbage():
  adv_t = np.tile(A[:, None], (1, 4)) * np.array([1.0, 0.5, -1.0, 2.0], np.float32)
  loss, _ = grpo_loss(LOGP, OLD, REF, adv_t, MASK, kl_coef=0.01)
  want = py_grpo(_f64(LOGP), _f64(OLD), _f64(REF), _f64(adv_t), MASK.tolist(), kl_coef=0.01)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  # -inf / NaN at padding positions must not leak into the loss or the gradient.
  bad = LOGP.copy()
  bad[MASK == 0] = -np.inf
  bad_old = OLD.copy()
  bad_old[MASK == 0] = np.nan
  bad_ref = REF.copy()
  bad_ref[MASK == 0] = np.inf
  fn = lambda x: grpo_loss(x, bad_old, bad_ref, adv_t, MASK, kl_coef=0.01)[0]
  assert float(fn(jnp.asarray(bad))) == pytest.approx(want, rel=1e-5)
  g = jax.grad(fn)(jnp.asarray(bad))
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[MASK == 0] == 0)


def test_no_reference_needed_without_kl_and_errors():
  with pytest.raises(ValueError, match='ref_logp'):
    grpo_loss(LOGP, OLD, None, A, MASK, kl_coef=0.01)
  with pytest.raises(ValueError, match='valid modes'):
    grpo_loss(LOGP, OLD, None, A, MASK, aggregation='sum')
  with pytest.raises(ValueError, match='max_tokens'):
    grpo_loss(LOGP, OLD, None, A, MASK, aggregation='constant')
  with pytest.raises(ValueError, match='advantages has shape'):
    grpo_loss(LOGP, OLD, None, A[:5], MASK)
  with pytest.raises(ValueError, match='old_logp'):
    grpo_loss(LOGP, OLD[:, :3], None, A, MASK)
  with pytest.raises(ValueError, match='clip_low'):
    grpo_loss(LOGP, OLD, None, A, MASK, clip_low=1.0)
  with pytest.raises(ValueError, match='k1'):
    grpo_loss(LOGP, OLD, REF, A, MASK, kl_coef=0.1, kl_estimator='kl')


def test_jit_with_static_config_and_traced_kl_coef():
  f = jax.jit(functools.partial(grpo_loss, clip_high=0.28, kl_estimator='k3', aggregation='constant',
                                max_tokens=4))
  loss, m = f(LOGP, OLD, REF, A, MASK, kl_coef=jnp.float32(0.02))
  want = py_grpo(_f64(LOGP), _f64(OLD), _f64(REF), _f64(A), MASK.tolist(), clip_high=0.28, kl_coef=0.02,
                 agg='constant', max_tokens=4)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert all(v.shape == () for v in m.values())
  entropy = np.full_like(LOGP, 0.7)
  _, m = jax.jit(lambda *a: grpo_loss(*a, entropy=entropy))(LOGP, OLD, None, A, MASK)
  assert float(m['entropy']) == pytest.approx(0.7)


@pytest.mark.slow
def test_one_sgd_step_on_a_tiny_qwen_moves_logprobs_with_the_advantage():
  # End to end through the model: positive advantage raises the sequence's log-prob,
  # negative lowers it.
  cfg = qwen.QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8)
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (6, 7), 0, 64)
  attn = jnp.ones((6, 7), jnp.int32)
  mask = jnp.concatenate([jnp.zeros((6, 2)), jnp.ones((6, 4))], axis=1)   # prompt 3 tokens, completion 4
  adv = jnp.asarray(A)

  def loss_fn(p):
    lp, ent = qwen.token_logprobs(cfg, p, tokens, attn)
    return grpo_loss(lp, jax.lax.stop_gradient(lp), None, adv, mask, entropy=ent)

  (loss, m), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert np.isfinite(float(loss)) and float(m['ratio_mean']) == pytest.approx(1.0)
  new = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
  seq = jax.jit(lambda p: jnp.sum(qwen.token_logprobs(cfg, p, tokens, attn)[0] * mask, axis=1))
  change = np.asarray(seq(new) - seq(params))
  assert np.all(np.sign(change) == np.sign(A)), change
