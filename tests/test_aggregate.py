"""aggregate(): the three GRPO-family normalisations, against plain-Python sums."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax.rl.aggregate import AGGREGATION_MODES, aggregate

# 2 prompts x 3 samples, T = 4, right-padded completions of lengths 4, 2, 3, 1, 4, 3.
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0],
                 [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
X = np.array([[0.5, -1.0, 2.0, 0.25], [3.0, 1.0, 9.0, 9.0], [-2.0, 0.5, 1.5, 9.0],
              [4.0, 9.0, 9.0, 9.0], [0.1, 0.2, 0.3, 0.4], [-1.0, -1.0, 2.5, 9.0]], np.float32)


def _rows(x, mask):
  return [[float(x[i][t]) for t in range(len(mask[i])) if mask[i][t]] for i in range(len(mask))]


def test_seq_mean_is_mean_of_sequence_means():
  rows = _rows(X, MASK)
  # Written out: row means 0.4375, 2.0, 0.0, 4.0, 0.25, 0.1666..., averaged over 6 rows.
  expected = (0.4375 + 2.0 + 0.0 + 4.0 + 0.25 + 0.5 / 3) / 6
  assert expected == pytest.approx(sum(sum(r) / len(r) for r in rows) / len(rows))
  np.testing.assert_allclose(aggregate(X, MASK, 'seq_mean'), expected, rtol=1e-6)


def test_token_mean_is_sum_over_token_count():
  total = 1.75 + 4.0 + 0.0 + 4.0 + 1.0 + 0.5
  np.testing.assert_allclose(aggregate(X, MASK, 'token_mean'), total / 17, rtol=1e-6)


def test_constant_divides_by_rows_times_budget():
  total = 1.75 + 4.0 + 0.0 + 4.0 + 1.0 + 0.5
  np.testing.assert_allclose(aggregate(X, MASK, 'constant', max_tokens=8), total / (6 * 8), rtol=1e-6)


def test_masked_entries_are_ignored_even_when_not_finite():
  x = X.copy()
  x[MASK == 0] = np.nan
  x[1, 3] = np.inf
  for mode in AGGREGATION_MODES:
    np.testing.assert_allclose(aggregate(x, MASK, mode, max_tokens=4), aggregate(X, MASK, mode, max_tokens=4))
  g = jax.grad(lambda v: aggregate(v, MASK, 'token_mean'))(jnp.asarray(x))
  assert np.all(np.isfinite(g))
  np.testing.assert_allclose(g, MASK / 17)


def test_all_masked_rows_do_not_dilute_seq_mean_and_empty_batch_is_zero():
  mask = MASK.copy()
  mask[3] = 0
  rows = [r for r in _rows(X, mask) if r]
  expected = sum(sum(r) / len(r) for r in rows) / 5
  np.testing.assert_allclose(aggregate(X, mask, 'seq_mean'), expected, rtol=1e-6)
  zero = np.zeros_like(MASK)
  for mode in AGGREGATION_MODES:
    assert float(aggregate(X, zero, mode, max_tokens=4)) == 0.0


def test_fractional_and_bool_masks():
  np.testing.assert_allclose(aggregate(X, MASK.astype(bool), 'token_mean'), aggregate(X, MASK, 'token_mean'))
  w = MASK * 0.5
  w[0] = MASK[0]
  # token_mean with weights = weighted mean.
  expected = float(np.sum(X * w) / np.sum(w))
  np.testing.assert_allclose(aggregate(X, w, 'token_mean'), expected, rtol=1e-6)


def test_gradients_of_each_mode():
  lengths = MASK.sum(1)
  g_tok = jax.grad(lambda v: aggregate(v, MASK, 'token_mean'))(jnp.asarray(X))
  g_seq = jax.grad(lambda v: aggregate(v, MASK, 'seq_mean'))(jnp.asarray(X))
  g_con = jax.grad(lambda v: aggregate(v, MASK, 'constant', max_tokens=5))(jnp.asarray(X))
  np.testing.assert_allclose(g_tok, MASK / 17, rtol=1e-6)
  np.testing.assert_allclose(g_seq, MASK / lengths[:, None] / 6, rtol=1e-6)
  np.testing.assert_allclose(g_con, MASK / 30, rtol=1e-6)


def test_jit():
  f = jax.jit(aggregate, static_argnames=('mode', 'max_tokens'))
  np.testing.assert_allclose(f(X, MASK, mode='constant', max_tokens=4), aggregate(X, MASK, 'constant', 4))


def test_bad_mode_lists_valid_modes():
  with pytest.raises(ValueError, match="seq_mean.*token_mean.*constant"):
    aggregate(X, MASK, 'mean')
  with pytest.raises(ValueError, match='max_tokens'):
    aggregate(X, MASK, 'constant')
  with pytest.raises(ValueError, match='max_tokens'):
    aggregate(X, MASK, 'constant', max_tokens=0)
  with pytest.raises(ValueError, match='shape'):
    aggregate(X[:, :3], MASK, 'token_mean')
  with pytest.raises(ValueError, match=r'\(B, T\)'):
    aggregate(X[0], MASK[0], 'token_mean')
