"""cfrl_jax.analysis.study_stats against hand-computed values and printed t tables (no training, no scipy needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cfrl_jax.analysis import study_stats as ss

# t_{0.975, df} from a printed Student t table (3 decimals).
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
           10: 2.228, 15: 2.131, 20: 2.086, 25: 2.060, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


@pytest.mark.parametrize('df', sorted(T_TABLE))
def test_t_quantile_matches_the_printed_table(df):
  assert ss.t_quantile_975(df) == pytest.approx(T_TABLE[df], abs=6e-4)


def test_t_quantile_against_scipy_when_installed():
  stats = pytest.importorskip('scipy.stats')
  for df in list(range(1, 61)) + [100, 500, 10_000]:
    assert ss.t_quantile_975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=2e-6), df


def test_t_quantile_decreases_to_the_normal_quantile():
  q = [ss.t_quantile_975(d) for d in range(1, 200)]
  assert all(a > b for a, b in zip(q, q[1:]))   # no jump where the table hands over to the series (30 -> 31)
  assert ss.t_quantile_975(10 ** 6) == pytest.approx(1.959964, abs=1e-5)
  for bad in (0, -1, 2.5):
    with pytest.raises(ValueError, match='df >= 1'):
      ss.t_quantile_975(bad)


def test_paired_interval_three_seeds_excludes_zero():
  # Steps to target: treatment 10, 20, 10 vs control 30, 40, 20 -> differences -20, -20, -10.
  # Mean -50/3; deviations -10/3, -10/3, 20/3 -> variance (100 + 100 + 400) / 9 / 2 = 100/3, sd 5.7735;
  # half width t(0.975, 2) * sd / sqrt(3) = 4.302653 * 3.33333 = 14.3422.
  iv = ss.paired_interval([10, 20, 10], [30, 40, 20])
  assert iv.n == 3 and iv.mean == pytest.approx(-50 / 3)
  assert iv.sd == pytest.approx(math.sqrt(100 / 3))
  assert iv.low == pytest.approx(-50 / 3 - 4.302653 * 10 / 3, abs=1e-5)
  assert iv.high == pytest.approx(-50 / 3 + 4.302653 * 10 / 3, abs=1e-5)
  assert iv.high == pytest.approx(-2.3245, abs=1e-4) and iv.excludes_zero
  assert iv.text(1) == '-16.7 [-31.0, -2.3]'


def test_paired_interval_three_seeds_includes_zero():
  # pass@1: 0.5, 0.6, 0.7 vs 0.4, 0.4, 0.6 -> differences 0.1, 0.2, 0.1: mean 0.13333, sd 0.057735,
  # half 4.302653 * 0.057735 / sqrt(3) = 0.143422 -> [-0.010089, 0.276755].
  iv = ss.paired_interval([0.5, 0.6, 0.7], [0.4, 0.4, 0.6])
  assert iv.mean == pytest.approx(0.133333, abs=1e-6) and iv.sd == pytest.approx(0.057735, abs=1e-6)
  assert (iv.low, iv.high) == (pytest.approx(-0.010089, abs=1e-6), pytest.approx(0.276755, abs=1e-6))
  assert not iv.excludes_zero


def test_paired_interval_pairs_by_seed_not_by_pooling():
  # Large seed-to-seed spread shared by both arms cancels in the paired differences (all +0.05):
  # an unpaired comparison of these two samples would not separate them, the paired one does.
  t, c = [0.15, 0.45, 0.85], [0.10, 0.40, 0.80]
  iv = ss.paired_interval(t, c)
  assert iv.mean == pytest.approx(0.05) and iv.sd == pytest.approx(0.0, abs=1e-12) and iv.excludes_zero


def test_paired_interval_one_seed_has_none():
  iv = ss.paired_interval([20], [40])
  assert (iv.n, iv.mean, iv.sd, iv.low, iv.high) == (1, -20.0, None, None, None)
  assert not iv.excludes_zero
  assert iv.text(1) == '-20.0 (1 seed: no interval)'


def test_paired_interval_rejects_unpaired_or_missing_values():
  with pytest.raises(ValueError, match='one treatment and one control value per seed'):
    ss.paired_interval([1, 2], [1])
  with pytest.raises(ValueError, match='one treatment and one control value per seed'):
    ss.paired_interval([], [])
  with pytest.raises(ValueError, match='non-finite'):
    ss.paired_interval([1.0, float('nan')], [0.0, 0.0])


def test_mean_sd():
  assert ss.mean_sd([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(math.sqrt(7 / 3)))
  assert ss.mean_sd([0.3]) == (0.3, None)
  assert ss.mean_sd([]) == (None, None)


def test_auc_is_the_mean_pass1_by_trapezoids():
  steps, vals = [0, 10, 20, 40], [0.2, 0.4, 0.4, 0.8]
  # Areas 10 * 0.3 + 10 * 0.4 + 20 * 0.6 = 19 over a span of 40.
  assert ss.mean_pass1_auc(steps, vals) == pytest.approx(19 / 40)
  # End at 30 (pass@1 0.6 by interpolation): 3 + 4 + 10 * 0.5 = 12 over 30.
  assert ss.mean_pass1_auc(steps, vals, end=30) == pytest.approx(0.4)
  # Start at 5 (pass@1 0.3): 5 * 0.35 + 4 + 12 = 17.75 over 35.
  assert ss.mean_pass1_auc(steps, vals, start=5) == pytest.approx(17.75 / 35)
  # A constant curve has AUC equal to the constant.
  assert ss.mean_pass1_auc([0, 7, 50], [0.3, 0.3, 0.3]) == pytest.approx(0.3)


def test_auc_does_not_depend_on_the_grid_of_a_linear_curve():
  fine, coarse = np.arange(0, 41, 10), np.arange(0, 41, 20)
  # pass@1 = 0.2 + 0.01 * step: its mean over 0..40 is the value at 20, 0.4, on either grid, while steps
  # to a target of 0.41 (truly 21) reads 30 on the 10-step grid and 40 on the 20-step grid.
  assert ss.mean_pass1_auc(fine, 0.2 + 0.01 * fine) == pytest.approx(0.4)
  assert ss.mean_pass1_auc(coarse, 0.2 + 0.01 * coarse) == pytest.approx(0.4)
  assert ss.steps_to_target(fine, 0.2 + 0.01 * fine, 0.41).steps == 30
  assert ss.steps_to_target(coarse, 0.2 + 0.01 * coarse, 0.41).steps == 40


def test_auc_without_a_span_is_none_and_bad_grids_raise():
  assert ss.mean_pass1_auc([0], [0.3]) is None
  assert ss.mean_pass1_auc([], []) is None
  assert ss.mean_pass1_auc([0, 10], [0.3, 0.4], start=10, end=10) is None
  assert ss.mean_pass1_auc([0, 10], [0.3, 0.4], end=20) is None   # beyond the last eval
  with pytest.raises(ValueError, match='not strictly increasing'):
    ss.mean_pass1_auc([0, 10, 10], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match='one length'):
    ss.mean_pass1_auc([0, 10], [0.1])


def test_steps_to_target_and_censoring():
  steps, vals = [0, 10, 20, 30], [0.1, 0.3, 0.25, 0.5]
  assert ss.steps_to_target(steps, vals, 0.3) == ss.StepsToTarget(10, False)   # at or above: 0.3 counts
  assert ss.steps_to_target(steps, vals, 0.31) == ss.StepsToTarget(30, False)
  assert ss.steps_to_target(steps, vals, 0.1) == ss.StepsToTarget(0, False)
  never = ss.steps_to_target(steps, vals, 0.6)
  assert never == ss.StepsToTarget(30, True) and str(never) == '30+'
  assert str(ss.StepsToTarget(10, False)) == '10'
  assert ss.steps_to_target([], [], 0.5) is None


def test_moving_average_by_hand():
  # Window 3: ends keep their value (the window shrinks symmetrically), inside (a + b + c) / 3.
  np.testing.assert_allclose(ss.moving_average([1, 2, 3, 10, 5], 3), [1, 2, 5, 6, 5])
  np.testing.assert_allclose(ss.moving_average([1, 2, 3, 10, 5, 6, 7], 5), [1, 2, 4.2, 5.2, 6.2, 6, 7])
  np.testing.assert_allclose(ss.moving_average([4, 1, 7], 1), [4, 1, 7])
  ramp = 0.2 + 0.01 * np.arange(30)   # a linear trend is reproduced exactly, ends included
  np.testing.assert_allclose(ss.moving_average(ramp, 9), ramp)
  assert ss.moving_average([], 3).shape == (0,)
  for bad in (0, 4, 2.0):
    with pytest.raises(ValueError, match='odd integer window'):
      ss.moving_average([1, 2, 3], bad)


def test_comparisons_table_applies_when_both_arms_are_present():
  arms = ['grpo', 'cfgrpo', 'grpo_headlr', 'cfgrpo_samelr', 'cfgrpo_adaptive']
  got = [(c.treatment, c.control) for c in ss.comparisons(arms)]
  assert got == [('cfgrpo', 'grpo'), ('cfgrpo_samelr', 'grpo'), ('grpo_headlr', 'grpo'), ('cfgrpo_adaptive', 'grpo'),
                 ('cfgrpo', 'grpo_headlr'), ('cfgrpo', 'cfgrpo_samelr')]
  # Absent arms drop their rows; PPO/RLOO have the same designs; a custom cf<X> meets <X>.
  assert [(c.treatment, c.control) for c in ss.comparisons(['cfgrpo', 'grpo_headlr'])] == [('cfgrpo', 'grpo_headlr')]
  got = [(c.treatment, c.control) for c in ss.comparisons(['ppo', 'cfppo', 'cfppo_samelr', 'rloo', 'cfrloo', 'x',
                                                            'cfx'])]
  assert got == [('cfppo', 'ppo'), ('cfppo_samelr', 'ppo'), ('cfppo', 'cfppo_samelr'), ('cfrloo', 'rloo'),
                 ('cfx', 'x')]
  assert ss.comparisons(['grpo', 'ppo']) == []
