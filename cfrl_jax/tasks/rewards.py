"""Reward functions in TRL's convention, and their weighted combination.

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`columns` are the rows' other fields as lists (answer=[...], num_ops=[...], ...); a
function takes the ones it needs and ignores the rest through **kwargs. None means "not
applicable to this sample" (TRL's convention); combine_rewards skips it in the sum.
combine_rewards holds every function to that contract and raises RewardFunctionError,
naming the function, for anything else: one number instead of a list, a wrong length, a
non-number, NaN or inf, a value or weighted total beyond float32 (rewards are float32
downstream, where it would become inf), or a non-finite weight.

    correctness_reward           1.0 if the final answer ('####', 'The answer is', \\boxed) equals
                                 the `answer` column as a number or normalised string, else 0.0
    CorrectnessReward(...)       the same with configurable extraction; optionally runs
                                 program-format completions (code_reward.CodeRunner)
    MathCorrectnessReward(...)   equivalence by math-verify (MATH-style LaTeX answers)
    FormatReward(detector)       1.0 if the completion is in one of the detector's formats
    combine_rewards(reward_fns, prompts, completions, columns) -> (total (B,), {name: (B,)})
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Set
from typing import Any, Callable, Sequence

import numpy as np

from cfrl_jax.tasks import answers
from cfrl_jax.tasks.code_reward import CodeRunner, extract_code
from cfrl_jax.tasks.formats import FormatDetector
from cfrl_jax.tasks.math_equivalence import MathVerifier

_SHOW_CHARS = 500
_SIGNATURE = ('fn(prompts, completions, **columns) -> list[float] with one reward per completion '
              '(None: not applicable)')
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class RewardFunctionError(RuntimeError):
  """A reward function raised or returned something unusable; the message names it and the sample."""


def _check_batch(name: str, prompts, completions, answer=None):
  if len(prompts) != len(completions):
    raise ValueError(f'{name}: {len(prompts)} prompts but {len(completions)} completions.')
  if answer is not None and len(answer) != len(completions):
    raise ValueError(f'{name}: {len(answer)} answers for {len(completions)} completions.')
  for c in completions:
    if not isinstance(c, str):
      raise TypeError(f'{name} takes completions as strings (got {type(c).__name__}); conversational '
                      '(list of messages) completions are not supported.')


class CorrectnessReward:
  """1.0 if a completion's final answer equals the reference `answer` column, else 0.0.

  Extraction: answers.extract_answer with the given extractors / occurrences / fallback.
  Comparison: answers.answers_match (exact as numbers: '$1,000.00' == '1000', '3/4' == '0.75').
  With `code_runner`, a completion that has no extractable answer but contains a program
  (TinyGSM / OpenMathInstruct-1 formats) is run out of process and its result compared.
  """

  def __init__(self, extractors: Sequence[str] = answers.EXTRACTORS, occurrence: str = 'first',
               boxed_occurrence: str = 'last', last_number_fallback: bool = False,
               code_runner: CodeRunner | None = None, name: str = 'correctness'):
    self.extractors = answers.check_extractors(extractors)
    for o in (occurrence, boxed_occurrence):
      if o not in answers.OCCURRENCES:
        raise ValueError(f'occurrence {o!r}; expected one of {answers.OCCURRENCES}.')
    self.occurrence, self.boxed_occurrence = occurrence, boxed_occurrence
    self.last_number_fallback = last_number_fallback
    self.code_runner = code_runner
    self.__name__ = name

  def extract(self, completion: str) -> str | None:
    """The raw final answer of a completion (no program execution)."""
    return answers.extract_answer(completion, self.extractors, occurrence=self.occurrence,
                                  boxed_occurrence=self.boxed_occurrence,
                                  last_number_fallback=self.last_number_fallback)

  def final_answers(self, completions: Sequence[str]) -> list[str | None]:
    """The raw final answer of each completion, running programs when a code_runner is set."""
    found = [self.extract(c) for c in completions]
    if self.code_runner is not None:
      missing = [i for i, f in enumerate(found) if f is None]
      codes = [extract_code(completions[i]) for i in missing]
      for i, ans in zip(missing, self.code_runner.answers(codes)):
        found[i] = ans
    return found

  def answer_key(self, completion: str) -> str | None:
    """The canonical final answer (for majority votes / distinct answers)."""
    return answers.canonical_answer(self.final_answers([completion])[0])

  def is_correct(self, completion: str, answer: str) -> bool:
    return answers.answers_match(self.final_answers([completion])[0], answer)

  def __call__(self, prompts: list[str], completions: list[str], answer: list[str] | None = None,
               **columns: Any) -> list[float]:
    if answer is None:
      raise ValueError(f"{self.__name__} needs the 'answer' column (the reference answers); the rows "
                       f'have only {sorted(columns)}.')
    _check_batch(self.__name__, prompts, completions, answer)
    found = self.final_answers(completions)
    return [1.0 if answers.answers_match(f, str(a)) else 0.0 for f, a in zip(found, answer)]


correctness_reward = CorrectnessReward()


class MathCorrectnessReward:
  """1.0 if math-verify finds the completion's answer equivalent to the `answer` column.

  With require_boxed, a completion without a \\boxed{} answer scores 0 (math-verify would
  otherwise take the last expression it finds).
  """

  def __init__(self, verifier: MathVerifier | None = None, require_boxed: bool = False,
               name: str = 'math_correctness'):
    self.verifier = verifier or MathVerifier()
    self.require_boxed = require_boxed
    self.__name__ = name

  def answer_key(self, completion: str) -> str | None:
    return answers.canonical_answer(answers.extract_boxed(completion))

  def is_correct(self, completion: str, answer: str) -> bool:
    if self.require_boxed and answers.extract_boxed(completion) is None:
      return False
    return self.verifier(completion, str(answer))

  def __call__(self, prompts: list[str], completions: list[str], answer: list[str] | None = None,
               **columns: Any) -> list[float]:
    if answer is None:
      raise ValueError(f"{self.__name__} needs the 'answer' column; the rows have only {sorted(columns)}.")
    _check_batch(self.__name__, prompts, completions, answer)
    return [1.0 if self.is_correct(c, a) else 0.0 for c, a in zip(completions, answer)]


class FormatReward:
  """1.0 if the detector puts the completion in one of `formats` (default: any known format)."""

  def __init__(self, detector: FormatDetector, formats: Sequence[str] | None = None, name: str = 'format'):
    self.detector = detector
    self.formats = tuple(detector.names if formats is None else formats)
    unknown = [f for f in self.formats if f not in detector.names]
    if unknown:
      raise ValueError(f'FormatReward formats {unknown} are not detector formats {detector.names}.')
    self.__name__ = name

  def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    _check_batch(self.__name__, prompts, completions)
    return [1.0 if self.detector(c) in self.formats else 0.0 for c in completions]


# --- combination ------------------------------------------------------------------------
def reward_name(fn: Callable) -> str:
  return getattr(fn, '__name__', None) or type(fn).__name__


def _clip(x: Any) -> str:
  s = repr(x)
  return s if len(s) <= _SHOW_CHARS else s[:_SHOW_CHARS] + f'... ({len(s)} chars)'


def _describe_sample(i: int, prompts, completions, columns) -> str:
  cols = ', '.join(f'{k}={_clip(v[i])}' for k, v in columns.items())
  return (f'sample {i}:\n  prompt: {_clip(prompts[i])}\n  completion: {_clip(completions[i])}'
          + (f'\n  columns: {cols}' if cols else ''))


def _find_failing_sample(fn, prompts, completions, columns) -> tuple[int, BaseException] | None:
  for i in range(len(completions)):
    try:
      fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()})
    except Exception as e:  # pylint: disable=broad-except
      return i, e
  return None


def _reward_values(name: str, values: Any, B: int) -> Sequence:
  """`values` as returned by a reward function, checked to be a flat sequence of B items."""
  shape = getattr(values, 'shape', None)
  flat = (values is not None and hasattr(values, '__len__') and hasattr(values, '__getitem__')
          and not isinstance(values, (str, bytes, Mapping, Set)) and (shape is None or len(shape) == 1))
  if not flat:
    kind = type(values).__name__ + (f' of shape {tuple(shape)}' if shape is not None else '')
    raise RewardFunctionError(
        f'reward function {name!r} returned {_clip(values)} ({kind}) for a batch of {B} completions; a '
        f'reward function must be {_SIGNATURE}, a list of length len(completions) = {B}.')
  if len(values) != B:
    raise RewardFunctionError(
        f'reward function {name!r} returned {len(values)} values for {B} completions; a reward function '
        f'must be {_SIGNATURE}, a list of length len(completions).')
  return values


def combine_rewards(reward_fns: Sequence[tuple[Callable, float]], prompts: Sequence[str],
                    completions: Sequence[str], columns: dict[str, Sequence]
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Calls every reward function on the batch and sums their weighted values.

  Returns (total (B,) float32, {name: (B,) float32 rewards of that function, NaN where it
  returned None}). The total skips None (not applicable) values; a sample where every
  function returned None is an error. When a function raises, it is called again sample by
  sample to find the offending one, and a RewardFunctionError names the function and shows
  that sample's prompt, completion and columns. Also RewardFunctionErrors: a return value
  that is not a flat sequence (one number, a string, a dict, a (B, 1) array) or has the
  wrong length; a value that is not a number, is NaN or inf, or exceeds float32's range; a
  non-finite weight; and a weighted total that overflows float32 (the message lists each
  function's weight and value for that sample). Duplicate function names get suffixes
  '_1', '_2', ...
  """
  B = len(completions)
  if len(prompts) != B:
    raise ValueError(f'combine_rewards: {len(prompts)} prompts but {B} completions.')
  for k, v in columns.items():
    if len(v) != B:
      raise ValueError(f'combine_rewards: column {k!r} has {len(v)} values for {B} completions.')
  if not reward_fns:
    raise ValueError('combine_rewards: no reward functions.')
  prompts, completions = list(prompts), list(completions)
  columns = {k: list(v) for k, v in columns.items()}
  parts: dict[str, np.ndarray] = {}
  terms: dict[str, tuple[float, np.ndarray]] = {}   # name -> (weight, (B,) float64 rewards)
  total = np.zeros(B, np.float64)
  applicable = np.zeros(B, bool)
  for fn, weight in reward_fns:
    name = reward_name(fn)
    if name in parts:
      name = next(f'{name}_{j}' for j in range(1, len(reward_fns) + 1) if f'{name}_{j}' not in parts)
    try:
      weight = float(weight)
    except (TypeError, ValueError):
      weight = math.nan
    if not math.isfinite(weight):
      raise RewardFunctionError(f'reward function {name!r} has weight {_clip(weight)}; a weight must be a '
                                'finite number (config.task.rewards maps a reward name to its weight).')
    try:
      values = fn(prompts, completions, **columns)
    except Exception as e:  # pylint: disable=broad-except
      failing = _find_failing_sample(fn, prompts, completions, columns)
      if failing is None:
        raise RewardFunctionError(
            f'reward function {name!r} raised {type(e).__name__}: {e} on the batch of {B}, but not on '
            'any sample alone (it depends on the batch).') from e
      i, err = failing
      raise RewardFunctionError(
          f'reward function {name!r} raised {type(err).__name__}: {err} on '
          f'{_describe_sample(i, prompts, completions, columns)}') from err
    values = _reward_values(name, values, B)
    row = np.full(B, np.nan, np.float64)
    for i, v in enumerate(values):
      if v is None:
        continue
      try:
        fv = float(v)
      except (TypeError, ValueError):
        fv = None
      if fv is None or isinstance(v, (str, bytes)) or not math.isfinite(fv):
        raise RewardFunctionError(
            f'reward function {name!r} returned {_clip(v)} (not a finite number; use None for "not '
            f'applicable") on {_describe_sample(i, prompts, completions, columns)}')
      if abs(fv) > _FLOAT32_MAX:  # rewards are float32 downstream: this would become inf there
        raise RewardFunctionError(
            f'reward function {name!r} returned {fv!r}, beyond float32 (|r| <= {_FLOAT32_MAX:.4g}); scale '
            f'it down, on {_describe_sample(i, prompts, completions, columns)}')
      row[i] = fv
    ok = ~np.isnan(row)
    total[ok] += weight * row[ok]
    applicable |= ok
    parts[name] = row.astype(np.float32)
    terms[name] = (weight, row)
  overflow = np.flatnonzero(~(np.abs(total) <= _FLOAT32_MAX))
  if overflow.size:
    i = int(overflow[0])
    sum_text = ' + '.join(f'{w!r} * {float(r[i])!r} ({n!r})' for n, (w, r) in terms.items()
                          if not np.isnan(r[i]))
    raise RewardFunctionError(
        f'the weighted reward total {float(total[i])!r} = {sum_text} (weight * reward) overflows float32 (|total| <= '
        f'{_FLOAT32_MAX:.4g}); scale those reward functions or their weights down, on '
        f'{_describe_sample(i, prompts, completions, columns)}')
  if not applicable.all():
    i = int(np.flatnonzero(~applicable)[0])
    raise RewardFunctionError(
        f'every reward function returned None on {_describe_sample(i, prompts, completions, columns)}')
  return total.astype(np.float32), parts
