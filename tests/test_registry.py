"""task_config / build_task: configs as data, errors that list the valid choices (tasks/registry.py)."""
import ml_collections
import pytest

from cfrl_jax.tasks import TASK_NAMES, Task, build_task, task_config
from cfrl_jax.tasks.formats import FormatDetector


@pytest.mark.parametrize('name', ['arithmetic', 'gsm8k', 'math'])
def test_every_task_config_has_the_common_fields(name):
  config = task_config(name)
  assert config.name == name
  for field in ('seed', 'prompt_template', 'use_chat_template', 'system_prompt', 'formats', 'rewards', 'answer'):
    assert field in config
  assert '{question}' in config.prompt_template
  FormatDetector.from_config(config.formats)


def test_unknown_task_lists_valid_names():
  with pytest.raises(ValueError, match=r"unknown task 'gsm9k'; valid tasks: \('arithmetic', 'gsm8k', 'math'\)"):
    task_config('gsm9k')
  with pytest.raises(ValueError, match='valid tasks'):
    build_task({'name': 'mbpp'})
  assert TASK_NAMES == ('arithmetic', 'gsm8k', 'math')


def test_config_is_locked_against_typos_but_formats_stay_open():
  config = task_config('arithmetic')
  with pytest.raises(AttributeError, match='max_opz'):
    config.max_opz = 2
  config.max_ops = 2                                   # existing fields change freely
  config.formats.patterns.other = r'\A\?\Z'           # user-named mappings stay open
  config.mixture.steps = 0.65
  with pytest.raises(TypeError):
    config.max_ops = 'two'


def test_unknown_fields_are_named_with_the_valid_ones():
  with pytest.raises(ValueError, match=r"unknown field config.task.max_opz for task 'arithmetic'; valid fields: \[.*'max_ops'"):
    build_task({'name': 'arithmetic', 'max_opz': 2})
  with pytest.raises(ValueError, match=r"config.task.answer.occurence; valid fields: \['boxed_occurrence'"):
    build_task({'name': 'arithmetic', 'answer': {'occurence': 'last'}})
  config = task_config('arithmetic').to_dict()
  config['name'] = 'gsm8k'
  with pytest.raises(ValueError, match=r"unknown field config.task.add_verbs for task 'gsm8k'.*task_config\('gsm8k'\)"):
    build_task(config)
  with pytest.raises(ValueError, match=r"unknown field config.task.rewards.length; valid fields: \['correctness', 'format'\]"):
    build_task({'name': 'arithmetic', 'rewards': ml_collections.ConfigDict({'length': 1.0})})


def test_partial_configs_take_defaults_and_the_task_records_its_config():
  task = build_task({'name': 'arithmetic', 'num_train': 10, 'num_eval': 5, 'answer': {'occurrence': 'last'}})
  assert isinstance(task, Task) and len(task.train) == 10 and len(task.eval) == 5
  assert task.config.answer.occurrence == 'last' and task.config.answer.extractors == ('hash', 'answer_is')
  assert task.config.max_ops == task_config('arithmetic').max_ops
  assert task.reward_fns[0][0].occurrence == 'last'
  assert task.prompt_template == task.config.prompt_template and task.use_chat_template is False
  assert task.formats.names == ('steps', 'compact', 'direct')


def test_columns_are_the_rows_other_fields():
  task = build_task({'name': 'arithmetic', 'num_train': 3, 'num_eval': 3})
  columns = task.columns(task.train)
  assert 'prompt' not in columns and columns['answer'] == [r['answer'] for r in task.train]
  assert set(columns) == {'answer', 'question', 'num_ops', 'expression', 'solutions'}


def test_zero_rewards_and_wrong_format_order_are_errors():
  with pytest.raises(ValueError, match='every weight in config.task.rewards is 0'):
    build_task({'name': 'arithmetic', 'num_train': 3, 'num_eval': 3, 'rewards': {'correctness': 0.0}})
  config = task_config('arithmetic')
  config.formats.order = ('direct', 'compact', 'steps')
  with pytest.raises(ValueError, match='generates formats'):
    build_task(config)


def test_chat_template_fields_pass_through():
  config = task_config('arithmetic')
  config.num_train = config.num_eval = 3
  config.use_chat_template, config.system_prompt = True, 'You are a careful solver.'
  task = build_task(config)
  assert task.use_chat_template and task.system_prompt == 'You are a careful solver.'
  assert task.train[0]['prompt'].startswith('Question: ')  # rows stay template-free
