"""sft_loss: mean NLL of response tokens, per token and per sequence."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax.rl.sft import sft_loss

MASK = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 0]], np.float32)   # prompt/padding masked out
LOGP = np.array([[-5.0, -0.5, -1.0, -0.25], [-7.0, -7.0, -2.0, -0.1], [-0.3, -0.6, -0.9, -np.inf]], np.float32)


def test_token_mean_and_metrics_by_hand():
  # Counted NLLs: (0.5, 1.0, 0.25), (2.0, 0.1), (0.3, 0.6, 0.9): sum 5.65 over 8 tokens.
  loss, m = sft_loss(LOGP, MASK)
  assert float(loss) == pytest.approx(5.65 / 8, rel=1e-6)
  assert float(m['nll']) == pytest.approx(5.65 / 8, rel=1e-6)
  assert float(m['perplexity']) == pytest.approx(math.exp(5.65 / 8), rel=1e-5)
  assert float(m['seq_nll']) == pytest.approx((1.75 + 2.1 + 1.8) / 3, rel=1e-6)
  assert float(m['num_tokens']) == 8


def test_seq_mean_and_constant():
  loss, _ = sft_loss(LOGP, MASK, 'seq_mean')
  assert float(loss) == pytest.approx((1.75 / 3 + 2.1 / 2 + 1.8 / 3) / 3, rel=1e-6)
  loss, _ = sft_loss(LOGP, MASK, 'constant', max_tokens=4)
  assert float(loss) == pytest.approx(5.65 / 12, rel=1e-6)


def test_gradient_and_jit():
  g = jax.grad(lambda x: sft_loss(x, MASK)[0])(jnp.asarray(LOGP))
  np.testing.assert_allclose(g, -MASK / 8)
  loss = jax.jit(sft_loss, static_argnames=('aggregation', 'max_tokens'))(LOGP, MASK, aggregation='seq_mean')[0]
  assert np.isfinite(float(loss))


def test_errors():
  with pytest.raises(ValueError, match='valid modes'):
    sft_loss(LOGP, MASK, 'mean')
  with pytest.raises(ValueError, match='shape'):
    sft_loss(LOGP[:, :3], MASK)
