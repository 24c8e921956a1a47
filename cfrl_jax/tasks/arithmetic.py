"""The synthetic multi-format arithmetic task: a CPU-sized stand-in for Echo Chamber's setting.

    Question: Ann has 7 apples. Then she buys 5 more and gives away 3. How many apples does Ann have now?
    Answer: 7 + 5 = 12. 12 - 3 = 9. The answer is 9.          (format 'steps',   A)
    Answer: <<7+5=12>><<12-3=9>> #### 9                        (format 'compact', B)
    Answer: #### 9                                             (format 'direct',  C)

A problem's numeric pattern is (start, signed operands), e.g. (7, (5, -3)). Patterns are
split between train and held-out eval by a hash of (seed, pattern), so no pattern is ever
shared between the two, however many problems are drawn from either. Every value along
the way stays within [answer_min, answer_max] (never negative by default).

    rows = generate_rows(config, 'train', n=2048, stream='train')    # deterministic in config.seed
    corpus = pretraining_corpus(config, n=43_000, seed=1)           # [(prompt, completion)]

A completion is exactly what a model should generate after the prompt and before EOS:
it starts with a space because the prompt ends in 'Answer:'.

Randomness comes from random.Random seeded with strings and read only through
random(), the one stream Python guarantees to keep across versions.
"""
from __future__ import annotations

import hashlib
import random
from typing import Sequence

import ml_collections

from cfrl_jax.tasks import base, formats

SPLITS = ('train', 'eval')
FORMAT_NAMES = formats.ARITHMETIC_ORDER
_PRONOUNS = ('she', 'he')
_MAX_PATTERN_TRIES = 10_000
_DISTINCT_TRIES = 64  # tries for an unseen pattern before a repeat is accepted


def default_config() -> ml_collections.ConfigDict:
  """Every field of the arithmetic task and its default (the figures of CALIBRATION.md)."""
  return ml_collections.ConfigDict({
      'name': 'arithmetic',
      'seed': 0,                      # problems, the train/eval pattern split and surface forms
      'num_train': 2048,              # RL prompts
      'num_eval': 512,                # held-out prompts (>= 512 to see a few points of accuracy)
      'eval_fraction': 0.2,           # share of numeric patterns reserved for eval
      'min_ops': 1,
      'max_ops': 3,
      'start_min': 1,
      'start_max': 30,
      'operand_min': 1,
      'operand_max': 12,
      'answer_min': 0,                # every intermediate value and the answer stay in range
      'answer_max': 99,
      'names': ('Ann:she', 'Ben:he', 'Cara:she', 'Dan:he', 'Eve:she', 'Finn:he'),
      'objects': ('apples', 'marbles', 'stickers', 'coins', 'books', 'cards'),
      'add_verbs': ('buys {n} more', 'finds {n} more', 'gets {n} more'),
      'sub_verbs': ('gives away {n}', 'loses {n}', 'sells {n}'),
      'prompt_template': 'Question: {question}\nAnswer:',
      'use_chat_template': False,
      'system_prompt': '',
      # Pretraining mixture over the formats: 45/35/20 kept greedy decoding off the hardest
      # format (direct) in the calibration run; an equal mix did not.
      'mixture': {'steps': 0.45, 'compact': 0.35, 'direct': 0.20},
      'formats': formats.formats_config(formats.ARITHMETIC_PATTERNS, formats.ARITHMETIC_ORDER),
      'answer': {
          'extractors': ('hash', 'answer_is'),
          'occurrence': 'first',
          'boxed_occurrence': 'last',
          'last_number_fallback': False,
      },
      'rewards': {'correctness': 1.0, 'format': 0.0},
  })


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on inconsistent ranges, names, verbs or mixture."""
  c = config
  for lo, hi in (('min_ops', 'max_ops'), ('start_min', 'start_max'),
                 ('operand_min', 'operand_max'), ('answer_min', 'answer_max')):
    if c[lo] > c[hi]:
      raise ValueError(f'config.task.{lo}={c[lo]} > config.task.{hi}={c[hi]}.')
  if c.min_ops < 1:
    raise ValueError(f'config.task.min_ops={c.min_ops}; a problem needs at least one operation.')
  if c.operand_min < 1:
    raise ValueError(f'config.task.operand_min={c.operand_min}; operands are positive amounts.')
  if c.answer_min < 0:
    raise ValueError(f'config.task.answer_min={c.answer_min}; counts of objects are never negative.')
  if not c.answer_min <= c.start_min or not c.start_max <= c.answer_max:
    raise ValueError(f'start range [{c.start_min}, {c.start_max}] must lie inside the answer range '
                     f'[{c.answer_min}, {c.answer_max}].')
  if not 0.0 < c.eval_fraction < 1.0:
    raise ValueError(f'config.task.eval_fraction={c.eval_fraction}; it must be in (0, 1) so both '
                     'train and eval have patterns.')
  for i, entry in enumerate(c.names):
    parts = entry.split(':')
    if len(parts) != 2 or not parts[0] or parts[1] not in _PRONOUNS:
      raise ValueError(f"config.task.names[{i}]={entry!r}; write each name as 'Name:she' or 'Name:he'.")
  for field in ('add_verbs', 'sub_verbs'):
    for verb in c[field]:
      if verb.count('{n}') != 1:
        raise ValueError(f"config.task.{field} entry {verb!r} must contain '{{n}}' exactly once.")
  for field in ('names', 'objects', 'add_verbs', 'sub_verbs'):
    if not c[field]:
      raise ValueError(f'config.task.{field} is empty.')
  base.check_prompt_template(c.prompt_template)
  check_mixture(dict(c.mixture))


def check_mixture(mixture: dict) -> dict[str, float]:
  """Validates a format mixture (format -> weight, weights >= 0, summing to 1 within 1e-6)."""
  unknown = sorted(set(mixture) - set(FORMAT_NAMES))
  if unknown:
    raise ValueError(f'mixture has unknown format(s) {unknown}; valid: {FORMAT_NAMES}.')
  if any(w < 0 for w in mixture.values()) or abs(sum(mixture.values()) - 1.0) > 1e-6:
    raise ValueError(f'mixture weights {mixture} must be >= 0 and sum to 1.')
  return {k: float(mixture.get(k, 0.0)) for k in FORMAT_NAMES}


# --- numeric patterns -----------------------------------------------------------------
def _randint(rng: random.Random, lo: int, hi: int) -> int:
  """Uniform integer in [lo, hi] from rng.random() only (stable across Python versions)."""
  return lo + min(int(rng.random() * (hi - lo + 1)), hi - lo)


def _choice(rng: random.Random, items: Sequence):
  return items[_randint(rng, 0, len(items) - 1)]


def sample_pattern(rng: random.Random, num_ops: int, config) -> tuple[int, tuple[int, ...]]:
  """(start, signed operands) with every running value in [answer_min, answer_max]."""
  c = config
  for _ in range(_MAX_PATTERN_TRIES):
    value = start = _randint(rng, c.start_min, c.start_max)
    ops = []
    for _ in range(num_ops):
      k = _randint(rng, c.operand_min, c.operand_max)
      signed = k if rng.random() < 0.5 else -k
      if not c.answer_min <= value + signed <= c.answer_max:
        signed = -signed  # the other direction often fits; otherwise the pattern is redrawn
      if not c.answer_min <= value + signed <= c.answer_max:
        break
      ops.append(signed)
      value += signed
    if len(ops) == num_ops:
      return start, tuple(ops)
  raise ValueError(f'no {num_ops}-operation problem fits the ranges: start [{c.start_min}, {c.start_max}], '
                   f'operands [{c.operand_min}, {c.operand_max}], answers [{c.answer_min}, {c.answer_max}].')


def pattern_split(pattern: tuple[int, tuple[int, ...]], seed: int, eval_fraction: float) -> str:
  """'eval' for a fixed, seed-dependent eval_fraction of all patterns, else 'train'."""
  start, ops = pattern
  digest = hashlib.blake2b(f'{seed}|{start}|{",".join(map(str, ops))}'.encode(), digest_size=8).digest()
  return 'eval' if int.from_bytes(digest, 'big') / 2**64 < eval_fraction else 'train'


def pattern_answer(pattern: tuple[int, tuple[int, ...]]) -> int:
  start, ops = pattern
  return start + sum(ops)


# --- surface forms and solutions ----------------------------------------------------------
def _join_actions(actions: list[str]) -> str:
  if len(actions) == 1:
    return actions[0]
  return ', '.join(actions[:-1]) + ' and ' + actions[-1]


def question_text(pattern, name: str, pronoun: str, obj: str, verbs: Sequence[str]) -> str:
  """'Ann has 7 apples. Then she buys 5 more and gives away 3. How many apples does Ann have now?'"""
  start, ops = pattern
  actions = [verb.format(n=abs(k)) for verb, k in zip(verbs, ops)]
  return (f'{name} has {start} {obj}. Then {pronoun} {_join_actions(actions)}. '
          f'How many {obj} does {name} have now?')


def solutions(pattern) -> dict[str, str]:
  """The completion in each format (leading space included: the prompt ends with 'Answer:')."""
  start, ops = pattern
  steps, compact, value = [], [], start
  for k in ops:
    sign = '+' if k > 0 else '-'
    new = value + k
    steps.append(f'{value} {sign} {abs(k)} = {new}.')
    compact.append(f'<<{value}{sign}{abs(k)}={new}>>')
    value = new
  return {
      'steps': ' ' + ' '.join(steps) + f' The answer is {value}.',
      'compact': ' ' + ''.join(compact) + f' #### {value}',
      'direct': f' #### {value}',
  }


def _make_row(pattern, rng: random.Random, config) -> base.Row:
  name, pronoun = _choice(rng, config.names).split(':')
  obj = _choice(rng, config.objects)
  verbs = [_choice(rng, config.add_verbs if k > 0 else config.sub_verbs) for k in pattern[1]]
  question = question_text(pattern, name, pronoun, obj, verbs)
  start, ops = pattern
  return {
      'prompt': base.render_prompt(config.prompt_template, question),
      'answer': str(pattern_answer(pattern)),
      'question': question,
      'num_ops': len(ops),
      'expression': str(start) + ''.join(f' {"+" if k > 0 else "-"} {abs(k)}' for k in ops),
      'solutions': solutions(pattern),
  }


def generate_rows(config, split: str, n: int, stream: str, distinct: bool = True) -> list[base.Row]:
  """n problems whose patterns all belong to `split`, deterministic in (config, stream).

  Operation counts cycle through min_ops..max_ops (balanced), then the rows are shuffled.
  With `distinct`, patterns do not repeat while the split's pattern space allows it (it may
  not, e.g. for one-operation eval problems); past that, patterns repeat with new names
  and objects. Without it, patterns are drawn independently.
  """
  if split not in SPLITS:
    raise ValueError(f'split={split!r}; expected one of {SPLITS}.')
  check_config(config)
  rng = random.Random(f'cfrl_jax.arithmetic|{config.seed}|{stream}')
  op_counts = list(range(config.min_ops, config.max_ops + 1))
  seen, rows = set(), []
  for i in range(n):
    num_ops = op_counts[i % len(op_counts)]
    chosen = None
    for attempt in range(_MAX_PATTERN_TRIES):
      pattern = sample_pattern(rng, num_ops, config)
      if pattern_split(pattern, config.seed, config.eval_fraction) != split:
        continue
      chosen = pattern
      if not distinct or pattern not in seen or attempt >= _DISTINCT_TRIES:
        break
    if chosen is None:
      raise ValueError(f'could not draw a {num_ops}-operation {split} problem; widen the ranges or '
                       f'change config.task.eval_fraction={config.eval_fraction}.')
    seen.add(chosen)
    rows.append(_make_row(chosen, rng, config))
  rng.shuffle(rows)
  return rows


def _allocate(n: int, mixture: dict[str, float]) -> list[str]:
  """Exactly round(n * weight) items per format (largest remainders), in format order."""
  raw = {k: n * w for k, w in mixture.items()}
  counts = {k: int(v) for k, v in raw.items()}
  for k in sorted(raw, key=lambda k: (counts[k] - raw[k], FORMAT_NAMES.index(k)))[:n - sum(counts.values())]:
    counts[k] += 1
  return [k for k in FORMAT_NAMES for _ in range(counts[k])]


def pretraining_rows(config, n: int, seed: int, mixture: dict | None = None) -> list[base.Row]:
  """n train-split problems, each with a 'format' drawn per the mixture and its 'completion'.

  Format counts are exact (largest-remainder rounding of n * weight), then shuffled.
  Patterns come from the train split only, so the held-out set stays unseen.
  """
  mixture = check_mixture(dict(config.mixture if mixture is None else mixture))
  rows = generate_rows(config, 'train', n, stream=f'pretrain|{seed}', distinct=False)
  labels = _allocate(n, mixture)
  random.Random(f'cfrl_jax.arithmetic.mixture|{config.seed}|{seed}').shuffle(labels)
  out = []
  for row, fmt in zip(rows, labels):
    out.append({**row, 'format': fmt, 'completion': row['solutions'][fmt]})
  return out


def pretraining_corpus(config, n: int, seed: int = 0, mixture: dict | None = None) -> list[tuple[str, str]]:
  """n (prompt, completion) pairs for pretraining from scratch (see pretraining_rows).

  `config` is the task config or a Task built from it. The completion is the text a model
  should generate after the prompt and before EOS.
  """
  config = config.config if isinstance(config, base.Task) else config
  return [(r['prompt'], r['completion']) for r in pretraining_rows(config, n, seed, mixture)]


def validation_rows(config, n: int) -> list[base.Row]:
  """n problems of train patterns in their own stream: what pretraining measures its base on."""
  return generate_rows(config, 'train', n, stream='pretrain_validation')


def build_splits(config) -> tuple[list[base.Row], list[base.Row]]:
  """(train rows, eval rows) of the task."""
  return (generate_rows(config, 'train', config.num_train, 'train'),
          generate_rows(config, 'eval', config.num_eval, 'eval'))
