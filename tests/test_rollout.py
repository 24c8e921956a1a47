"""completion_stats: values and gradients equal plain autodiff through log_softmax."""
import jax
import jax.numpy as jnp
import numpy as np

from cfrl_jax.models import qwen
from cfrl_jax.train import rollout


def test_logp_and_lse_values_and_gradients_match_autodiff():
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 11)) * 3.0
  y = jax.random.randint(jax.random.PRNGKey(1), (3, 5), 0, 11)
  gl, gs = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 5))

  def ours(z):
    logp, lse = rollout.logp_and_lse(z, y)
    return jnp.sum(gl * logp + gs * lse), (logp, lse)

  def plain(z):
    logp = jnp.take_along_axis(jax.nn.log_softmax(z), y[..., None], axis=-1)[..., 0]
    lse = jax.nn.logsumexp(z, axis=-1)
    return jnp.sum(gl * logp + gs * lse), (logp, lse)

  (_, a), ga = jax.value_and_grad(ours, has_aux=True)(z)
  (_, b), gb = jax.value_and_grad(plain, has_aux=True)(z)
  for u, v in zip(a, b):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-6)


def test_completion_stats_match_a_full_forward():
  cfg = qwen.QwenConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=4)
  params = qwen.init_params(cfg, jax.random.PRNGKey(0), std=0.5)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 9), 1, 37)
  mask = jnp.ones((2, 9), jnp.int32).at[0, :2].set(0)
  P = 4
  logp, ent, maxp, _ = rollout.completion_stats(cfg, params, tokens, mask, P)
  z, _ = qwen.forward(cfg, params, tokens, mask)
  ls = jax.nn.log_softmax(z[:, P - 1:-1])
  np.testing.assert_allclose(logp, jnp.take_along_axis(ls, tokens[:, P:, None], -1)[..., 0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, -jnp.sum(jnp.exp(ls) * ls, -1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(maxp, jnp.exp(ls).max(-1), rtol=1e-5, atol=1e-6)
  # only logp is differentiated: the entropy is a metric
  g = jax.grad(lambda p: jnp.sum(rollout.completion_stats(cfg, p, tokens, mask, P)[1]))(params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(g))
