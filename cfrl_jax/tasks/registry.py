"""Task configs and the one place that turns a config into a Task.

    config.task = task_config('arithmetic')          # every field with its default
    task = build_task(config.task)                    # e.g. after --config.task.max_ops=2

The config returned by task_config is locked (a misspelt override fails at once); the
user-named mappings (formats.patterns, mixture) stay open so formats can be added.
build_task accepts a partial config too: missing fields take their defaults.
"""
from __future__ import annotations

import functools
from typing import Mapping

import ml_collections

from cfrl_jax.tasks import arithmetic, base, gsm8k, math
from cfrl_jax.tasks.code_reward import CodeRunner
from cfrl_jax.tasks.formats import FormatDetector
from cfrl_jax.tasks.math_equivalence import MathVerifier
from cfrl_jax.tasks.rewards import CorrectnessReward, FormatReward, MathCorrectnessReward

_DEFAULTS = {
    'arithmetic': arithmetic.default_config,
    'gsm8k': gsm8k.default_config,
    'math': math.default_config,
}
TASK_NAMES = tuple(_DEFAULTS)


def task_config(name: str) -> ml_collections.ConfigDict:
  """Every field of task `name` with its default, as a locked ConfigDict."""
  if name not in _DEFAULTS:
    raise ValueError(f'unknown task {name!r}; valid tasks: {TASK_NAMES}.')
  config = _DEFAULTS[name]()
  config.lock()
  config.formats.patterns.unlock()
  if 'mixture' in config:
    config.mixture.unlock()
  return config


def _check_fields(config, name: str):
  defaults = _DEFAULTS[name]()
  for key in config.keys():
    if key not in defaults:
      owners = [t for t in TASK_NAMES if t != name and key in _DEFAULTS[t]()]
      hint = (f" It is a field of task(s) {owners}: build the experiment config with "
              f"task_config({name!r}) rather than changing config.task.name." if owners else '')
      raise ValueError(f'unknown field config.task.{key} for task {name!r}; valid fields: '
                       f'{sorted(defaults.keys())}.{hint}')
  base.check_config_fields(config, defaults)


def _reward_fns(config, correctness, detector: FormatDetector | None) -> list:
  weights = dict(config.rewards)
  unknown = sorted(set(weights) - {'correctness', 'format'})
  if unknown:
    raise ValueError(f"unknown reward(s) {unknown} in config.task.rewards; valid: ['correctness', 'format'].")
  fns = []
  if weights.get('correctness', 0.0):
    fns.append((correctness, float(weights['correctness'])))
  if weights.get('format', 0.0):
    fns.append((FormatReward(detector), float(weights['format'])))
  if not fns:
    raise ValueError('every weight in config.task.rewards is 0; the task would have no reward.')
  return fns


def _correctness(config):
  if config.name == 'math':
    a = config.answer
    return MathCorrectnessReward(MathVerifier(a.timeout_s, a.backend), require_boxed=a.require_boxed)
  a = config.answer
  runner = None
  if a.get('execute_code', False):
    runner = CodeRunner(a.code_timeout_s, a.code_memory_mb, a.code_function)
  return CorrectnessReward(a.extractors, a.occurrence, a.boxed_occurrence, a.last_number_fallback,
                           code_runner=runner)


def build_task(config: ml_collections.ConfigDict | Mapping) -> base.Task:
  """The Task named by config.name ('arithmetic', 'gsm8k' or 'math'), data loaded and checked."""
  name = config.get('name') if hasattr(config, 'get') else None
  if name not in _DEFAULTS:
    raise ValueError(f'unknown task config.task.name={name!r}; valid tasks: {TASK_NAMES}.')
  _check_fields(config, name)
  config = base.merged_config(_DEFAULTS[name](), config)
  detector = FormatDetector.from_config(config.formats)
  if name == 'arithmetic':
    arithmetic.check_config(config)
    if tuple(detector.names) != arithmetic.FORMAT_NAMES:
      raise ValueError(f'the arithmetic task generates formats {arithmetic.FORMAT_NAMES}; '
                       f'config.task.formats.order is {detector.names}.')
    train, evaluation = arithmetic.build_splits(config)
  elif name == 'gsm8k':
    train, evaluation = gsm8k.build_splits(config)
  else:
    train, evaluation = math.build_splits(config)
  correctness = _correctness(config)
  config.lock()
  return base.Task(
      name=name, train=train, eval=evaluation, reward_fns=_reward_fns(config, correctness, detector),
      formats=detector, prompt_template=config.prompt_template,
      use_chat_template=config.use_chat_template, system_prompt=config.system_prompt,
      answer_key=correctness.answer_key, is_correct=correctness.is_correct, config=config,
      corpus_fn=(functools.partial(arithmetic.pretraining_corpus, config) if name == 'arithmetic' else None),
      validation_fn=(functools.partial(arithmetic.validation_rows, config) if name == 'arithmetic' else None))
