"""Which solution format a completion is written in: explicit, configurable regex detectors.

    detector = FormatDetector.from_config(config.formats)    # or FormatDetector(patterns, order)
    detector(' 7 + 5 = 12. 12 - 3 = 9. The answer is 9.')    -> 'steps'
    detector('I do not know')                                -> 'unknown'
    detector.fractions(completions)                          -> {'steps': .5, ..., 'unknown': .1}

Each format is a Python regular expression searched in the completion (re.search); the
first format in `order` whose pattern matches wins, and 'unknown' means none did. A
pattern that must describe the whole completion anchors itself (\\A ... \\Z), as the
synthetic task's do, so a detector checks structure rather than the presence of a
substring. The Echo Chamber paper tracked its formats with substring tests; here the
detectors are data in the config and are tested for 100% accuracy on generated text.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import ml_collections

from cfrl_jax.tasks.code_reward import CodeRunner

UNKNOWN = 'unknown'
SCHEMES = ('patterns', 'substring')

# The synthetic arithmetic task's three formats (A, B, C in CALIBRATION.md). Each pattern
# describes the whole completion, so a text that mixes formats is 'unknown'.
ARITHMETIC_PATTERNS = {
    # A: ' 7 + 5 = 12. 12 - 3 = 9. The answer is 9.'
    'steps': r'\A\s*(?:-?[0-9]+ [-+] [0-9]+ = -?[0-9]+\. )+The answer is -?[0-9]+\.\s*\Z',
    # B: ' <<7+5=12>><<12-3=9>> #### 9'
    'compact': r'\A\s*(?:<<-?[0-9]+[-+][0-9]+=-?[0-9]+>>)+ #### -?[0-9]+\s*\Z',
    # C: ' #### 9'
    'direct': r'\A\s*#### -?[0-9]+\s*\Z',
}
ARITHMETIC_ORDER = ('steps', 'compact', 'direct')

# The Echo Chamber paper's three pretraining formats, for real math data:
#   TinyGSM: a Python function ('def simple_math_problem() -> int: ... return result');
#   OpenMathInstruct-1: code between <llm-code> tags; OpenMathInstruct-2: natural language.
# Order matters: <llm-code> blocks contain Python too.
ECHO_CHAMBER_PATTERNS = {
    'llm_code': r'<llm-code>[\s\S]*?</llm-code>',
    'code': r'(?m)^[ \t]*def [A-Za-z_][A-Za-z0-9_]*\([^)\n]*\)[^:\n]*:',
    'text': r'####|\\boxed\{|(?i:\bthe (?:final )?answer is\b)',
}
ECHO_CHAMBER_ORDER = ('llm_code', 'code', 'text')


def label_fractions(labels: Sequence[str], names: Sequence[str]) -> dict[str, float]:
  """Fraction of labels equal to each name, plus 'unknown' (a detector's fractions())."""
  if not labels:
    raise ValueError('fractions() of an empty list of completions is undefined.')
  return {name: list(labels).count(name) / len(labels) for name in tuple(names) + (UNKNOWN,)}


@dataclasses.dataclass(frozen=True)
class FormatDetector:
  """Classifies completions into named formats, or 'unknown'.

  patterns: format name -> regular expression (searched with re.search).
  order: the names in priority order (the first match wins); every pattern name exactly once.
  """
  patterns: Mapping[str, str]
  order: tuple[str, ...]

  def __post_init__(self):
    order = tuple(self.order)
    object.__setattr__(self, 'order', order)
    object.__setattr__(self, 'patterns', dict(self.patterns))
    if not order:
      raise ValueError('a FormatDetector needs at least one format.')
    if sorted(order) != sorted(self.patterns) or len(set(order)) != len(order):
      raise ValueError(f'formats.order {order} must list each format of formats.patterns '
                       f'{sorted(self.patterns)} exactly once.')
    if UNKNOWN in order:
      raise ValueError(f"'{UNKNOWN}' is reserved for completions that match no format.")
    compiled = {}
    for name in order:
      try:
        compiled[name] = re.compile(self.patterns[name])
      except re.error as e:
        raise ValueError(f'formats.patterns.{name}={self.patterns[name]!r} is not a valid '
                         f'regular expression: {e}.') from e
    object.__setattr__(self, '_compiled', compiled)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | Mapping):
    """From a config with fields `patterns` (name -> regex), `order` (tuple of names) and optionally
    `scheme`: 'patterns' (this class) or 'substring' (a SubstringFormatDetector; patterns unused)."""
    scheme = config.get('scheme', 'patterns')
    if scheme not in SCHEMES:
      raise ValueError(f'formats.scheme={scheme!r} is unknown; expected one of {SCHEMES}.')
    if scheme == 'substring':
      return SubstringFormatDetector()
    patterns = config['patterns']
    patterns = patterns.to_dict() if isinstance(patterns, ml_collections.ConfigDict) else dict(patterns)
    return cls(patterns=patterns, order=tuple(config['order']))

  @property
  def names(self) -> tuple[str, ...]:
    """The format names in priority order ('unknown' excluded)."""
    return self.order

  def __call__(self, completion: str) -> str:
    """The first format (in `order`) whose pattern matches the completion, else 'unknown'."""
    if not isinstance(completion, str):
      raise TypeError(f'FormatDetector takes a str completion, got {type(completion).__name__}.')
    for name in self.order:
      if self._compiled[name].search(completion):
        return name
    return UNKNOWN

  def classify(self, completions: Sequence[str]) -> list[str]:
    """The format of each completion."""
    return [self(c) for c in completions]

  def fractions(self, completions: Sequence[str]) -> dict[str, float]:
    """Fraction of completions in each format, 'unknown' included (sums to 1)."""
    return label_fractions(self.classify(completions), self.order)


def formats_config(patterns: Mapping[str, str], order: Sequence[str]) -> ml_collections.ConfigDict:
  """The config block a task embeds as config.formats (fields: scheme, patterns, order)."""
  return ml_collections.ConfigDict({'scheme': 'patterns', 'patterns': dict(patterns), 'order': tuple(order)})


# --- Echo Chamber's own labelling (openrlhf/utils/math_verifier.py, get_llm_answer) -------------------
SUBSTRING_ORDER = ('llm_code', 'code', 'text')
_LLM_CODE_BLOCK = re.compile(r'<llm-code>(.*?)</llm-code>', re.DOTALL)


def llm_code_runs(code: str, runner: CodeRunner | None = None) -> bool:
  """Whether an <llm-code> block runs as the original runs it: execute the block, then evaluate its
  last line as an expression. Here: the block with its last line wrapped in print(), in the sandboxed
  CodeRunner (never in this process); a statement or indented last line fails, as eval() would."""
  lines = code.split('\n')
  program = '\n'.join(lines[:-1] + [f'print({lines[-1]})'])
  return (runner or CodeRunner(timeout_s=3.0)).answer(program) is not None


def substring_format(completion: str, code_runs=llm_code_runs) -> str:
  """The original's label, in its precedence:

    '<llm-code>' present and its first closed block runs     -> 'llm_code'
    else the substring 'def' anywhere (also inside 'undefined') -> 'code' (TinyGSM), run or not
    else '<llm-code>' present (its code did not run)           -> 'llm_code'
    else                                                       -> 'text' (the catch-all)
  """
  label = 'text'
  if '<llm-code>' in completion:
    label = 'llm_code'
    block = _LLM_CODE_BLOCK.search(completion)
    if block is not None and code_runs(block.group(1).strip()):
      return 'llm_code'
  if 'def' in completion:
    return 'code'
  return label


@dataclasses.dataclass(frozen=True)
class SubstringFormatDetector:
  """Echo Chamber's format labels (formats.scheme='substring'), with FormatDetector's interface.
  Every completion gets one of SUBSTRING_ORDER: 'text' is a catch-all, so 'unknown' never occurs.
  code_runs(code) -> bool decides whether an <llm-code> block runs (default: the sandbox)."""
  code_runs: object = llm_code_runs

  @property
  def names(self) -> tuple[str, ...]:
    return SUBSTRING_ORDER

  def __call__(self, completion: str) -> str:
    if not isinstance(completion, str):
      raise TypeError(f'SubstringFormatDetector takes a str completion, got {type(completion).__name__}.')
    return substring_format(completion, self.code_runs)

  def classify(self, completions: Sequence[str]) -> list[str]:
    return [self(c) for c in completions]

  def fractions(self, completions: Sequence[str]) -> dict[str, float]:
    """Fraction of completions with each label ('unknown' included, always 0, for FormatDetector's keys)."""
    return label_fractions(self.classify(completions), SUBSTRING_ORDER)
