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
