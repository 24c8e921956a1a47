"""The pretraining language-model objective against a hand-written next-token cross-entropy."""
import jax
import jax.numpy as jnp
import numpy as np

from cfrl_jax.models import qwen
from cfrl_jax.train import objectives


def test_lm_objective_is_the_mean_nll_of_real_targets_after_a_real_token():
  cfg = qwen.QwenConfig(vocab_size=29, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=8)
  params = qwen.init_params(cfg, jax.random.PRNGKey(0), std=0.5)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 7), 1, 29), np.int32)
  mask = np.array([[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
  loss, m = objectives.lm_objective(cfg)(params, {'tokens': jnp.asarray(tokens), 'mask': jnp.asarray(mask)})
  z, _ = qwen.forward(cfg, params, tokens, mask)
  logp = np.asarray(jax.nn.log_softmax(z, axis=-1))
  nll = [-logp[b, t - 1, tokens[b, t]] for b in range(2) for t in range(1, 7) if mask[b, t] and mask[b, t - 1]]
  assert len(nll) == 3 + 6
  np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
  assert float(m['num_tokens']) == 9


def test_ppo_objective_aggregates_tokens_as_configured():
  """rl.aggregation reaches PPO's loss (it was always token_mean): by hand from the clipped surrogate."""
  import types
  cfg = qwen.QwenConfig(vocab_size=29, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=8)
  params = qwen.init_params(cfg, jax.random.PRNGKey(0), std=0.5)
  P, N = 3, 4
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, P + N), 1, 29), np.int32)
  mask = np.ones((2, P + N), np.int32)
  cm = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)   # completions of 3 and 1 tokens
  z, _ = qwen.forward(cfg, params, tokens, mask)
  logp_all = np.asarray(jax.nn.log_softmax(z, axis=-1))
  logp = np.array([[logp_all[b, P - 1 + t, tokens[b, P + t]] for t in range(N)] for b in range(2)])
  old = logp - 0.1                                  # ratio e^0.1 = 1.105 < 1.2: no clipping
  adv = np.array([[1.0] * N, [-2.0] * N], np.float32)
  per_token = -np.exp(logp - old) * adv
  expected = {'token_mean': (per_token * cm).sum() / cm.sum(),
              'seq_mean': np.mean([(per_token[b] * cm[b]).sum() / cm[b].sum() for b in range(2)])}
  batch = {'tokens': jnp.asarray(tokens), 'mask': jnp.asarray(mask), 'completion_mask': jnp.asarray(cm),
           'old_logp': jnp.asarray(old, jnp.float32), 'advantages': jnp.asarray(adv)}
  for aggregation, value in expected.items():
    rl = types.SimpleNamespace(clip_low=0.2, clip_high=0.2, aggregation=aggregation, max_new_tokens=N)
    loss, _ = objectives.ppo_policy_objective(cfg, P, rl)(params, batch)
    np.testing.assert_allclose(float(loss), value, rtol=1e-5)
  assert not np.isclose(expected['token_mean'], expected['seq_mean'])
