"""The synthetic multi-format arithmetic task (cfrl_jax/tasks/arithmetic.py)."""
import collections
import re

import pytest

from cfrl_jax.tasks import arithmetic, build_task, task_config
from cfrl_jax.tasks.rewards import combine_rewards


def small_config(**overrides):
  config = task_config('arithmetic')
  config.num_train, config.num_eval = 300, 150
  for k, v in overrides.items():
    config[k] = v
  return config


@pytest.fixture(scope='module')
def task():
  return build_task(small_config())


def simulate(question: str) -> tuple[int, list[int]]:
  """Independent reading of a question: the start amount and the running values after each action."""
  start = int(re.match(r'\w+ has (\d+) \w+\. Then (?:she|he) ', question).group(1))
  actions = re.search(r'Then (?:she|he) (.*)\. How many', question).group(1)
  values, value = [], start
  for action in re.split(r', | and ', actions):
    n = int(re.search(r'\d+', action).group(0))
    value += n if action.endswith('more') else -n
    values.append(value)
  return start, values


def pattern_of(row) -> tuple:
  """(start, signed operands) read back from the row's expression."""
  tokens = row['expression'].split()
  return int(tokens[0]), tuple(int(tokens[i + 1]) * (1 if tokens[i] == '+' else -1)
                               for i in range(1, len(tokens), 2))


def test_answers_match_an_independent_reading_of_the_question(task):
  for row in task.train + task.eval:
    start, values = simulate(row['question'])
    assert row['answer'] == str(values[-1])
    assert row['num_ops'] == len(values)
    assert all(0 <= v <= 99 for v in [start] + values)
    assert 1 <= start <= 30
    assert row['prompt'] == f"Question: {row['question']}\nAnswer:"


def test_solutions_are_consistent_and_score_one(task):
  rows = task.train[:100]
  for fmt in arithmetic.FORMAT_NAMES:
    completions = [r['solutions'][fmt] for r in rows]
    assert all(c.startswith(' ') for c in completions)
    total, _ = combine_rewards(task.reward_fns, [r['prompt'] for r in rows], completions,
                               task.columns(rows))
    assert total.tolist() == [1.0] * len(rows)
  row = rows[0]
  start, values = simulate(row['question'])
  steps = ' '.join(f'{a} {"+" if b > a else "-"} {abs(b - a)} = {b}.' for a, b in zip([start] + values, values))
  assert row['solutions']['steps'] == f' {steps} The answer is {values[-1]}.'
  assert row['solutions']['direct'] == f' #### {values[-1]}'
  wrong = [r['solutions']['steps'].replace(f"is {r['answer']}.", f"is {int(r['answer']) + 1}.") for r in rows]
  total, _ = combine_rewards(task.reward_fns, [r['prompt'] for r in rows], wrong, task.columns(rows))
  assert total.tolist() == [0.0] * len(rows)


def test_generation_is_deterministic_in_the_seed():
  a, b = build_task(small_config()), build_task(small_config())
  assert a.train == b.train and a.eval == b.eval
  c = build_task(small_config(seed=1))
  assert [r['prompt'] for r in c.train] != [r['prompt'] for r in a.train]
  assert arithmetic.pretraining_corpus(small_config(), 50, seed=3) == \
      arithmetic.pretraining_corpus(small_config(), 50, seed=3)
  assert arithmetic.pretraining_corpus(small_config(), 50, seed=3) != \
      arithmetic.pretraining_corpus(small_config(), 50, seed=4)


@pytest.mark.parametrize('seed', [0, 7])
def test_train_pretraining_and_eval_never_share_a_numeric_pattern(seed):
  config = small_config(seed=seed, num_train=1500, num_eval=400)
  task = build_task(config)
  train = {pattern_of(r) for r in task.train}
  evaluation = {pattern_of(r) for r in task.eval}
  corpus = {pattern_of(r) for r in arithmetic.pretraining_rows(config, 3000, seed=1)}
  assert not train & evaluation
  assert not corpus & evaluation
  assert len(evaluation) > 300
  for pattern in evaluation:
    assert arithmetic.pattern_split(pattern, seed, config.eval_fraction) == 'eval'


def test_operation_counts_are_balanced_and_eval_patterns_distinct_when_possible(task):
  counts = collections.Counter(r['num_ops'] for r in task.eval)
  assert sorted(counts) == [1, 2, 3] and max(counts.values()) - min(counts.values()) <= 1
  three_ops = [pattern_of(r) for r in task.eval if r['num_ops'] == 3]
  assert len(set(three_ops)) == len(three_ops)  # a large pattern space: no repeats


def test_max_ops_override_and_ranges():
  task = build_task({'name': 'arithmetic', 'max_ops': 2, 'num_train': 200, 'num_eval': 60,
                     'start_min': 40, 'start_max': 50, 'answer_max': 60})
  for row in task.train + task.eval:
    start, values = simulate(row['question'])
    assert row['num_ops'] <= 2 and 40 <= start <= 50 and all(0 <= v <= 60 for v in values)


def test_pretraining_mixture_counts_are_exact():
  rows = arithmetic.pretraining_rows(small_config(), 1000, seed=0)
  assert collections.Counter(r['format'] for r in rows) == {'steps': 450, 'compact': 350, 'direct': 200}
  for r in rows:
    assert r['completion'] == r['solutions'][r['format']]
  rows = arithmetic.pretraining_rows(small_config(), 7, seed=0, mixture={'steps': 0.5, 'compact': 0.5})
  assert collections.Counter(r['format'] for r in rows) in ({'steps': 4, 'compact': 3}, {'steps': 3, 'compact': 4})
  # The formats are interleaved, not in blocks.
  first_half = collections.Counter(r['format'] for r in arithmetic.pretraining_rows(small_config(), 1000, 0)[:500])
  assert all(c > 50 for c in first_half.values())


def test_pretraining_corpus_from_task_or_config(task):
  corpus = arithmetic.pretraining_corpus(task, 20, seed=2)
  assert corpus == arithmetic.pretraining_corpus(small_config(), 20, seed=2)
  assert corpus == task.pretraining_corpus(20, seed=2)
  for prompt, completion in corpus:
    assert prompt.endswith('\nAnswer:') and completion.startswith(' ')
    assert task.formats(completion) in arithmetic.FORMAT_NAMES


def test_format_reward_joins_when_weighted():
  config = small_config()
  config.rewards.format = 0.5
  task = build_task(config)
  assert [getattr(fn, '__name__') for fn, _ in task.reward_fns] == ['correctness', 'format']
  rows = task.train[:2]
  completions = [rows[0]['solutions']['compact'], ' 3 apples']
  total, parts = combine_rewards(task.reward_fns, [r['prompt'] for r in rows], completions, task.columns(rows))
  assert total.tolist() == [1.5, 0.0]
  assert parts['format'].tolist() == [1.0, 0.0]


def test_answer_key_and_is_correct(task):
  row = task.train[0]
  assert task.answer_key(row['solutions']['steps']) == row['answer']
  assert task.is_correct(row['solutions']['compact'], row['answer'])
  assert not task.is_correct(' I do not know', row['answer'])


@pytest.mark.parametrize('overrides,match', [
    ({'min_ops': 3, 'max_ops': 2}, 'min_ops'),
    ({'min_ops': 0}, 'at least one'),
    ({'eval_fraction': 0.0}, 'eval_fraction'),
    ({'names': ('Ann',)}, "Name:she"),
    ({'add_verbs': ('buys more',)}, '{n}'),
    ({'answer_min': -5}, 'never negative'),
    ({'start_max': 120}, 'inside the answer range'),
    ({'prompt_template': 'Q: {q}'}, 'question'),
    ({'mixture': {'steps': 0.5, 'direct': 0.2}}, 'sum to 1'),
    ({'mixture': {'steps': 0.5, 'prose': 0.5}}, 'unknown format'),
    ({'operand_min': 90, 'operand_max': 99, 'start_min': 1, 'start_max': 5, 'answer_max': 20}, 'fits the ranges'),
])
def test_bad_configs_are_rejected(overrides, match):
  config = small_config()
  for k, v in overrides.items():
    config[k] = v
  with pytest.raises(ValueError, match=match):
    build_task(config)
