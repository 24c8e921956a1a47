"""Reward functions and their combination (cfrl_jax/tasks/rewards.py)."""
import re

import numpy as np
import pytest

from cfrl_jax.tasks import formats
from cfrl_jax.tasks.code_reward import CodeRunner
from cfrl_jax.tasks.formats import FormatDetector
from cfrl_jax.tasks.math_equivalence import MathVerifier
from cfrl_jax.tasks.rewards import (CorrectnessReward, FormatReward, MathCorrectnessReward,
                                    RewardFunctionError, combine_rewards, correctness_reward)


def test_correctness_reward_table():
  completions = [' 7 + 5 = 12. The answer is 12.', ' <<7+5=12>> #### 12', ' #### 12.0', ' #### 13',
                 ' 12', 'The answer is $1,000.00.', '\\boxed{3/4}', '#### 50%']
  answer = ['12', '12', '12', '12', '12', '1000', '0.75', '50']
  got = correctness_reward(['p'] * len(completions), completions, answer=answer, other=[None] * 8)
  assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_correctness_options():
  fallback = CorrectnessReward(last_number_fallback=True)
  assert fallback(['p'], [' 12'], answer=['12']) == [1.0]
  last = CorrectnessReward(occurrence='last')
  assert last(['p', 'p'], ['#### 1 then #### 2', '#### 1 then #### 2'], answer=['1', '2']) == [0.0, 1.0]
  assert correctness_reward(['p', 'p'], ['#### 1 then #### 2'] * 2, answer=['1', '2']) == [1.0, 0.0]
  with pytest.raises(ValueError, match='unknown answer extractor'):
    CorrectnessReward(extractors=('hash', 'regex'))


def test_correctness_reward_needs_answers():
  with pytest.raises(ValueError, match="'answer' column"):
    correctness_reward(['p'], ['#### 1'], solution=['x'])
  with pytest.raises(ValueError, match='2 answers for 1'):
    correctness_reward(['p'], ['#### 1'], answer=['1', '2'])
  with pytest.raises(TypeError, match='conversational'):
    correctness_reward(['p'], [[{'role': 'assistant', 'content': '#### 1'}]], answer=['1'])


def test_correctness_with_program_execution():
  reward = CorrectnessReward(code_runner=CodeRunner(timeout_s=2.0, memory_mb=256))
  completions = ['def solution():\n    return 7 + 5', '```python\ndef f():\n    return 11\n```',
                 'def solution():\n    return 1/0', '#### 12']
  assert reward(['p'] * 4, completions, answer=['12'] * 4) == [1.0, 0.0, 0.0, 1.0]
  assert reward.answer_key(completions[0]) == '12'


def test_format_reward():
  detector = FormatDetector(formats.ARITHMETIC_PATTERNS, formats.ARITHMETIC_ORDER)
  completions = [' 1 + 1 = 2. The answer is 2.', ' #### 2', 'two']
  assert FormatReward(detector)(['p'] * 3, completions) == [1.0, 1.0, 0.0]
  assert FormatReward(detector, formats=('direct',))(['p'] * 3, completions) == [0.0, 1.0, 0.0]
  with pytest.raises(ValueError, match='not detector formats'):
    FormatReward(detector, formats=('prose',))


def test_math_correctness_reward():
  reward = MathCorrectnessReward(MathVerifier(timeout_s=2))
  completions = [r'so $\boxed{\dfrac{14}{3}}$', r'it is 14/3', r'\boxed{5}']
  assert reward(['p'] * 3, completions, answer=[r'\frac{14}{3}'] * 3) == [1.0, 1.0, 0.0]
  strict = MathCorrectnessReward(MathVerifier(timeout_s=2), require_boxed=True)
  assert strict(['p'] * 3, completions, answer=[r'\frac{14}{3}'] * 3) == [1.0, 0.0, 0.0]
  assert reward.answer_key(completions[0]) == normalize(r'\dfrac{14}{3}')


def normalize(text):
  from cfrl_jax.tasks.answers import canonical_answer  # pylint: disable=import-outside-toplevel
  return canonical_answer(text)


# --- combine_rewards ----------------------------------------------------------------------
def length_reward(prompts, completions, **_):
  return [len(c) / 10 for c in completions]


def test_combine_weights_and_parts():
  prompts = ['a', 'b', 'c']
  completions = [' #### 1', ' #### 2', 'nothing!!']
  columns = {'answer': ['1', '5', '0'], 'num_ops': [1, 2, 3]}
  total, parts = combine_rewards([(correctness_reward, 2.0), (length_reward, -0.5)], prompts, completions, columns)
  np.testing.assert_allclose(parts['correctness'], [1.0, 0.0, 0.0])
  np.testing.assert_allclose(parts['length_reward'], [0.7, 0.7, 0.9], rtol=1e-6)
  np.testing.assert_allclose(total, [2.0 - 0.35, -0.35, -0.45], rtol=1e-6)
  assert total.dtype == np.float32 and total.shape == (3,)


def test_combine_duplicate_names_get_suffixes():
  _, parts = combine_rewards([(length_reward, 1.0), (length_reward, 1.0)], ['p'], ['x'], {})
  assert sorted(parts) == ['length_reward', 'length_reward_1']


def test_none_means_not_applicable():
  def only_first(prompts, completions, **_):
    return [1.0] + [None] * (len(completions) - 1)
  total, parts = combine_rewards([(only_first, 1.0), (length_reward, 1.0)], ['p', 'q'], ['x' * 10, 'y' * 20], {})
  np.testing.assert_allclose(total, [2.0, 2.0])
  assert np.isnan(parts['only_first'][1])
  with pytest.raises(RewardFunctionError, match='every reward function returned None on sample 1'):
    combine_rewards([(only_first, 1.0)], ['p', 'q'], ['x', 'y'], {})


def test_failing_function_is_named_with_the_offending_sample():
  def picky(prompts, completions, answer, **_):
    return [float(int(a)) for a in answer]
  with pytest.raises(RewardFunctionError) as info:
    combine_rewards([(length_reward, 1.0), (picky, 1.0)], ['p0', 'p1', 'p2'],
                    ['c0', 'the bad completion', 'c2'], {'answer': ['1', 'seven', '3']})
  message = str(info.value)
  assert "'picky'" in message and 'ValueError' in message
  assert 'sample 1' in message and "'p1'" in message and "'the bad completion'" in message
  assert "answer='seven'" in message
  assert isinstance(info.value.__cause__, ValueError)


def test_batch_only_failure_is_reported():
  def needs_two(prompts, completions, **_):
    if len(completions) < 2:
      return [0.0] * len(completions)
    raise KeyError('batch')
  with pytest.raises(RewardFunctionError, match="'needs_two'.*not on any sample alone"):
    combine_rewards([(needs_two, 1.0)], ['p', 'q'], ['x', 'y'], {})


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), 'high', [1.0]])
def test_non_numbers_are_errors(bad):
  def weird(prompts, completions, **_):
    return [0.0, bad]
  with pytest.raises(RewardFunctionError, match=r"'weird' returned .* on sample 1"):
    combine_rewards([(weird, 1.0)], ['p', 'q'], ['x', 'y'], {})


def test_shape_errors():
  with pytest.raises(RewardFunctionError, match='returned 1 values for 2'):
    combine_rewards([(lambda p, c, **_: [1.0], 1.0)], ['p', 'q'], ['x', 'y'], {})
  with pytest.raises(ValueError, match="column 'answer' has 1 values for 2"):
    combine_rewards([(length_reward, 1.0)], ['p', 'q'], ['x', 'y'], {'answer': ['1']})
  with pytest.raises(ValueError, match='2 prompts but 1'):
    combine_rewards([(length_reward, 1.0)], ['p', 'q'], ['x'], {})
  with pytest.raises(ValueError, match='no reward functions'):
    combine_rewards([], ['p'], ['x'], {})


# --- the reward-function contract: fn(prompts, completions, **columns) -> list[float] ---------
def mean_length(prompts, completions, **_):
  return sum(len(c) for c in completions) / len(completions)  # one number, not one per completion


@pytest.mark.parametrize('returned,shown', [
    (0.5, r'returned 0\.5 \(float\)'), (None, r'returned None \(NoneType\)'), ('1.0', r"returned '1\.0' \(str\)"),
    ({'x': 1.0, 'y': 1.0}, r'\(dict\)'), ({1.0, 2.0}, r'\(set\)'), (np.float32(1.0), r'\(float32 of shape \(\)\)'),
    (np.ones((2, 1)), r'\(ndarray of shape \(2, 1\)\)'), ((v for v in [1.0, 1.0]), r'\(generator\)'),
])
def test_a_reward_function_must_return_a_list(returned, shown):
  def summary_reward(prompts, completions, **_):
    return returned
  with pytest.raises(RewardFunctionError) as info:
    combine_rewards([(length_reward, 1.0), (summary_reward, 1.0)], ['p', 'q'], ['x', 'y'], {})
  message = str(info.value)
  assert "reward function 'summary_reward'" in message
  assert re.search(shown, message), message
  assert 'fn(prompts, completions, **columns) -> list[float]' in message
  assert 'len(completions) = 2' in message


def test_one_number_names_the_function_not_a_bare_type_error():
  with pytest.raises(RewardFunctionError, match=r"'mean_length' returned 1\.5 \(float\) for a batch of 2"):
    combine_rewards([(mean_length, 1.0)], ['p', 'q'], ['a', 'bb'], {})


def test_tuples_and_flat_arrays_are_accepted():
  total, parts = combine_rewards([(lambda p, c, **_: (1.0, 2.0), 1.0), (lambda p, c, **_: np.array([0.5, None]), 2.0)],
                                 ['p', 'q'], ['x', 'y'], {})
  np.testing.assert_allclose(total, [2.0, 2.0])
  assert np.isnan(parts['<lambda>_1'][1])


def test_wrong_length_names_the_signature():
  with pytest.raises(RewardFunctionError, match=r"'<lambda>' returned 3 values for 2 completions.*-> list\[float\]"):
    combine_rewards([(lambda p, c, **_: [1.0, 1.0, 1.0], 1.0)], ['p', 'q'], ['x', 'y'], {})


# --- float32: rewards and the weighted total must fit -------------------------------------------
def big(prompts, completions, **_):
  return [3.0e38] * len(completions)


def test_weighted_total_overflowing_float32_is_an_error():
  # 3e38 fits float32 (max 3.4028e38); 3e38 + 2 * 3e38 = 9e38 does not: it would become inf.
  assert 3.0e38 < float(np.finfo(np.float32).max) < 9.0e38
  with pytest.raises(RewardFunctionError) as info:
    combine_rewards([(big, 1.0), (length_reward, 1.0), (big, 2.0)], ['p'], ['x' * 10], {})
  message = str(info.value)
  assert 'overflows float32' in message and 'sample 0' in message
  assert "1.0 * 3e+38 ('big')" in message and "1.0 * 1.0 ('length_reward')" in message
  assert "2.0 * 3e+38 ('big_1')" in message


def test_negative_overflow_and_a_safe_sum_of_big_rewards():
  with pytest.raises(RewardFunctionError, match='overflows float32'):
    combine_rewards([(big, -2.0)], ['p'], ['x'], {})
  total, _ = combine_rewards([(big, 1.0), (big, -1.0)], ['p'], ['x'], {})  # cancels: fine
  np.testing.assert_array_equal(total, [0.0])


@pytest.mark.parametrize('value', [1e39, -1e39, 1e300])
def test_a_reward_beyond_float32_is_an_error(value):
  def huge(prompts, completions, **_):
    return [0.0, value]
  with pytest.raises(RewardFunctionError, match=r"'huge' returned .*beyond float32.*sample 1"):
    combine_rewards([(huge, 1e-3)], ['p', 'q'], ['x', 'y'], {})


@pytest.mark.parametrize('weight', [float('inf'), float('nan'), 'heavy', None])
def test_non_finite_weight_is_an_error(weight):
  with pytest.raises(RewardFunctionError, match=r"'length_reward' has weight .*finite number"):
    combine_rewards([(length_reward, weight)], ['p'], ['x'], {})
