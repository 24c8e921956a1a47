"""What every task provides: the Task record, prompt rendering and config checking.

A task is data plus scoring:

    task.train, task.eval       lists of rows, each a plain dict {'prompt': str, 'answer': str, ...}
    task.reward_fns             [(fn, weight)], fn(prompts, completions, **columns) -> list[float]
                                (TRL's convention; columns are the rows' other fields as lists)
    task.formats                a FormatDetector (completion -> format name) or None
    task.answer_key(c)          the canonical final answer of a completion (majority votes), or None
    task.is_correct(c, answer)  whether a completion's final answer equals the reference
    task.pretraining_corpus(n, seed)   [(prompt, completion)] to pretrain on (synthetic tasks)

Prompts are plain text (prompt_template with {question} filled in). When
use_chat_template is set, the consumer applies the tokenizer's chat template (with
system_prompt) at tokenisation time; rows stay template-free so they can be re-used with
any tokenizer.
"""
from __future__ import annotations

import dataclasses
import string
from typing import Any, Callable, Mapping

import ml_collections

Row = dict[str, Any]
RewardFn = Callable[..., list]


@dataclasses.dataclass
class Task:
  name: str
  train: list[Row]
  eval: list[Row]
  reward_fns: list[tuple[RewardFn, float]]
  formats: Any  # FormatDetector | None
  prompt_template: str
  use_chat_template: bool
  system_prompt: str
  answer_key: Callable[[str], str | None]
  is_correct: Callable[[str, str], bool]
  config: ml_collections.ConfigDict | None = None
  corpus_fn: Callable[[int, int], list[tuple[str, str]]] | None = None  # (n, seed) -> pairs
  validation_fn: Callable[[int], list[Row]] | None = None  # n -> rows of train patterns, outside train/eval

  def pretraining_corpus(self, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (prompt, completion) pairs for pretraining from scratch (synthetic tasks only)."""
    if self.corpus_fn is None:
      raise ValueError(f'task {self.name!r} has no synthetic pretraining corpus; pretrain from scratch '
                       "on the 'arithmetic' task, or start from a pretrained model (model.source).")
    return self.corpus_fn(n, seed)

  def validation_rows(self, n: int) -> list[Row]:
    """n problems for measuring a from-scratch base during pretraining (synthetic tasks only): drawn
    from the train patterns in their own stream, so stopping on them never looks at the eval set."""
    if self.validation_fn is None:
      raise ValueError(f'task {self.name!r} has no validation problems for config.pretrain.stop_accuracy; '
                       'set --config.pretrain.stop_accuracy=0 (pretrain for config.pretrain.steps).')
    return self.validation_fn(n)

  def columns(self, rows: list[Row]) -> dict[str, list]:
    """The reward functions' keyword columns for `rows`: every field but 'prompt', as lists."""
    keys = [k for k in rows[0] if k != 'prompt'] if rows else []
    return {k: [r.get(k) for r in rows] for k in keys}


def check_prompt_template(template: str) -> str:
  """Validates a plain-text prompt template: exactly one field, '{question}'."""
  if not isinstance(template, str):
    raise TypeError(f'prompt_template must be a str, got {type(template).__name__}.')
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:
    raise ValueError(f'prompt_template {template!r} is not a valid format string ({e}); '
                     "write literal braces as '{{' and '}}'.") from e
  if fields != ['question']:
    raise ValueError(f"prompt_template {template!r} must contain '{{question}}' exactly once and "
                     f'no other fields (found {fields}).')
  return template


def render_prompt(template: str, question: str) -> str:
  """The prompt text of one question."""
  return template.format(question=question)


def check_config_fields(config: ml_collections.ConfigDict | Mapping, defaults: ml_collections.ConfigDict,
                        where: str = 'config.task') -> None:
  """Raises ValueError naming any field of `config` that `defaults` lacks (recursively)."""
  def keys(c):
    return c.keys() if hasattr(c, 'keys') else []
  for key in keys(config):
    if key not in defaults:
      raise ValueError(f'unknown field {where}.{key}; valid fields: {sorted(defaults.keys())}.')
    value, default = config[key], defaults[key]
    if isinstance(default, (ml_collections.ConfigDict, dict)) and hasattr(value, 'keys') \
        and not _is_free_mapping(where, key):
      check_config_fields(value, default, f'{where}.{key}')


def _is_free_mapping(where: str, key: str) -> bool:
  # Mappings whose keys are user-chosen names (format name -> regex / weight), not fields.
  return (where.endswith('.formats') and key == 'patterns') or key == 'mixture'


def merged_config(defaults: ml_collections.ConfigDict,
                  config: ml_collections.ConfigDict | Mapping) -> ml_collections.ConfigDict:
  """The defaults overridden by `config` (after check_config_fields), as an unlocked ConfigDict."""
  out = ml_collections.ConfigDict(defaults.to_dict())
  def assign(dst, src):
    for key in src.keys():
      value = src[key]
      if hasattr(value, 'keys') and isinstance(dst.get(key), ml_collections.ConfigDict) \
          and key not in ('patterns', 'mixture'):
        assign(dst[key], value)
      else:
        dst[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  assign(out, config)
  return out
