"""Expert Iteration's selection: correct samples, whitespace-normalised de-duplication per prompt."""
import numpy as np
import pytest

from cfrl_jax.rl.expert_iteration import normalise_whitespace, select_for_sft, select_rows

PROMPTS = ['What is 2+3?', 'What is 4*5?']
COMPLETIONS = [
    'x = 2 + 3\nprint(x)',        # p0, correct
    'x = 2 +  3\n\nprint(x)  ',   # p0, correct, same after whitespace normalisation
    'The answer is 6.',           # p0, wrong
    'The answer is 20.',          # p1, correct
    'the answer is 20.',          # p1, correct, differs in case: kept
    'The answer is 20.',          # p1, wrong reward (0.5 < threshold)
]
REWARDS = [1.0, 1.0, 0.0, 1.0, 1.0, 0.5]


def test_normalise_whitespace():
  assert normalise_whitespace('  a\t b\n\n c  ') == 'a b c'
  assert normalise_whitespace('x = 2 +  3\n\nprint(x)  ') == normalise_whitespace('x = 2 + 3\nprint(x)')


def test_keeps_correct_unique_samples_per_prompt():
  pairs, stats = select_for_sft(PROMPTS, COMPLETIONS, REWARDS, group_size=3)
  assert pairs == [(PROMPTS[0], COMPLETIONS[0]), (PROMPTS[1], COMPLETIONS[3]), (PROMPTS[1], COMPLETIONS[4])]
  assert stats == {'samples': 6, 'prompts': 2, 'correct': 4, 'unique': 3, 'kept': 3,
                   'prompts_covered': 2, 'duplicates': 1}


def test_without_dedupe_and_with_a_lower_threshold():
  pairs, stats = select_for_sft(PROMPTS, COMPLETIONS, REWARDS, group_size=3, dedupe=False)
  assert [c for _, c in pairs] == [COMPLETIONS[i] for i in (0, 1, 3, 4)]
  assert stats['kept'] == 4 and stats['unique'] == 3
  # threshold 0.5 admits row 5, which duplicates row 3 exactly.
  rows, stats = select_rows(COMPLETIONS, REWARDS, group_size=3, threshold=0.5)
  assert rows == [0, 3, 4] and stats['correct'] == 5 and stats['duplicates'] == 2


def test_duplicates_across_prompts_are_kept_and_coverage_counts():
  comps = ['42', '42', 'no', 'no', '42', ' 42 ']
  rewards = [1, 1, 0, 0, 1, 1]
  pairs, stats = select_for_sft(['a', 'b', 'c'], comps, rewards, group_size=2)
  assert pairs == [('a', '42'), ('c', '42')]
  assert stats['prompts_covered'] == 2 and stats['prompts'] == 3 and stats['duplicates'] == 2


def test_prompts_per_row_and_errors():
  per_row = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
  assert select_for_sft(per_row, COMPLETIONS, np.asarray(REWARDS), group_size=3) == \
      select_for_sft(PROMPTS, COMPLETIONS, REWARDS, group_size=3)
  with pytest.raises(ValueError, match='differ within group 1'):
    select_for_sft(per_row[:-1] + ['other'], COMPLETIONS, REWARDS, group_size=3)
  with pytest.raises(ValueError, match='prompts'):
    select_for_sft(PROMPTS + ['x'], COMPLETIONS, REWARDS, group_size=3)
  with pytest.raises(ValueError, match='groups of 4'):
    select_for_sft(PROMPTS, COMPLETIONS, REWARDS, group_size=4)
  with pytest.raises(ValueError, match='one reward per completion'):
    select_for_sft(PROMPTS, COMPLETIONS, REWARDS[:5], group_size=3)
  with pytest.raises(ValueError, match='not finite'):
    select_for_sft(PROMPTS, COMPLETIONS, REWARDS[:5] + [float('nan')], group_size=3)
  with pytest.raises(ValueError, match='group_size'):
    select_for_sft(PROMPTS, COMPLETIONS, REWARDS, group_size=0)
