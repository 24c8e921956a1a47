"""cfrl_jax.dynamics.confidence against hand-computed values and numpy/scipy-free references."""
import math
from itertools import combinations

import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax.dynamics import confidence


def test_token_measures_by_hand():
  # Two positions with hand-picked distributions over 3 tokens; the second is masked out.
  probs = np.array([[[0.5, 0.25, 0.25], [0.9, 0.05, 0.05]],
                    [[0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]]])
  logits = jnp.log(jnp.asarray(probs)) + 3.0               # any shift: logits, not probabilities
  targets = jnp.asarray([[1, 0], [2, 1]])
  mask = jnp.asarray([[1, 0], [1, 1]])
  out = confidence.token_confidence(logits, targets, mask)
  ent = lambda p: -sum(x * math.log(x) for x in p)
  np.testing.assert_allclose(out['sampled_prob'], (0.25 + 0.7 + 1 / 3) / 3, rtol=1e-6)
  np.testing.assert_allclose(out['max_prob'], (0.5 + 0.7 + 1 / 3) / 3, rtol=1e-6)
  np.testing.assert_allclose(out['entropy'],
                             (ent([.5, .25, .25]) + ent([.1, .2, .7]) + math.log(3)) / 3, rtol=1e-6)
  # Log-probs give the same as logits.
  logp = jnp.log(jnp.asarray(probs, jnp.float32))
  np.testing.assert_allclose(confidence.mean_entropy(logp, mask), out['entropy'], rtol=1e-5)
  np.testing.assert_allclose(confidence.mean_sampled_prob(jnp.log(jnp.asarray([[.25, .9], [.7, 1 / 3]])), mask),
                             out['sampled_prob'], rtol=1e-6)


def test_masked_mean_of_empty_mask_is_nan_and_shapes_are_checked():
  assert np.isnan(confidence.masked_mean(jnp.ones((2, 3)), jnp.zeros((2, 3))))
  with pytest.raises(ValueError, match='mask shape'):
    confidence.masked_mean(jnp.ones((2, 3)), jnp.ones((2, 2)))
  with pytest.raises(ValueError, match='align'):
    confidence.token_confidence(jnp.zeros((2, 3, 4)), jnp.zeros((2, 2), int), jnp.ones((2, 2)))


def brute_pass_at_k(n, c, k):
  """Fraction of k-subsets of n samples (c correct) with at least one correct."""
  samples = [True] * c + [False] * (n - c)
  subsets = list(combinations(range(n), k))
  return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize('n,c,k', [(5, 0, 1), (5, 1, 1), (5, 2, 2), (6, 3, 4), (6, 1, 6), (8, 5, 3)])
def test_pass_at_k_equals_subset_enumeration(n, c, k):
  assert confidence.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_formula_and_large_n():
  assert confidence.pass_at_k(10, 3, 1) == pytest.approx(0.3)
  assert confidence.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)          # 1 - C(3,2)/C(4,2)
  # Stable where C(n, k) overflows float: 1 - C(900, 100)/C(1000, 100).
  expected = 1 - math.exp(math.lgamma(901) - math.lgamma(801) - math.lgamma(1001) + math.lgamma(901))
  assert confidence.pass_at_k(1000, 100, 100) == pytest.approx(expected, rel=1e-9)
  correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)
  out = confidence.pass_at_ks(correct, [1, 2])
  assert out[1] == pytest.approx((0.25 + 0.5 + 0) / 3)
  assert out[2] == pytest.approx((0.5 + 5 / 6 + 0) / 3)
  with pytest.raises(ValueError, match='k <= n'):
    confidence.pass_at_k(4, 1, 5)
  with pytest.raises(ValueError, match='c <= n'):
    confidence.pass_at_k(4, 5, 1)


def test_majority_vote_and_majority_at_k():
  assert confidence.majority_vote(['3', '5', '5', None, '3']) == '3'       # tie 2-2: first seen wins
  assert confidence.majority_vote(['5', '3', '3', None, '5']) == '5'
  assert confidence.majority_vote([None, '7', None, None]) == '7'          # None does not vote
  assert confidence.majority_vote([None, None]) is None
  groups = [['4', '4', '1', '1', '1'], ['2', '9', '9', '2', '2'], [None, None, None, None, None]]
  targets = ['4', '9', '0']
  # k=4: group 0 tie 4/1 -> '4' (first) correct; group 1 '2' vs '9' tie -> '2' wrong; group 2 no answer.
  assert confidence.majority_at_k(groups, targets, 4) == pytest.approx(1 / 3)
  # k=5: group 0 -> '1' wrong; group 1 -> '2' wrong.
  assert confidence.majority_at_k(groups, targets, 5) == 0.0
  assert confidence.majority_at_k([['1.0']], ['1'], 1, is_correct=lambda a, t: float(a) == float(t)) == 1.0
  with pytest.raises(ValueError, match='at least 6'):
    confidence.majority_at_k(groups, targets, 6)


def test_distinct_answers_and_format_fractions():
  assert confidence.distinct_answers(['1', '2', '1', None]) == 2
  assert confidence.distinct_answers([None]) == 0
  detector = lambda c: 'code' if 'def ' in c else ('tagged' if '<<' in c else 'text')
  out = confidence.format_fractions(['def f(): 1', '<<1+1=2>>', 'two', 'three'], detector,
                                    formats=['code', 'tagged', 'text', 'latex'])
  assert out == {'code': 0.25, 'tagged': 0.25, 'text': 0.5, 'latex': 0.0}
  with pytest.raises(TypeError, match='format name'):
    confidence.format_fractions(['x'], lambda c: None)


def test_feature_stats_and_head_norm():
  phi = jnp.asarray([[3.0, 4.0], [4.0, 3.0], [0.0, 2.0]])
  out = confidence.feature_stats(phi)
  np.testing.assert_allclose(out['norm'], (5 + 5 + 2) / 3, rtol=1e-6)
  cos = [24 / 25, 4 / 5, 3 / 5]                              # pairs (0,1), (0,2), (1,2)
  np.testing.assert_allclose(out['mean_cos'], np.mean(cos), rtol=1e-6)
  np.testing.assert_allclose(confidence.head_norm(jnp.asarray([[1.0, 2.0], [2.0, 4.0]])), 5.0, rtol=1e-6)
  with pytest.raises(ValueError, match='n >= 2'):
    confidence.feature_stats(phi[:1])
