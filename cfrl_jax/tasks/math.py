"""MATH (Hendrycks et al. 2021) and MATH-500: competition problems with LaTeX answers.

Schema: problem: str; solution: str (final answer in \\boxed{...}); optionally answer
(MATH-500), level ('Level 3' or 3), type (MATH) / subject (MATH-500), unique_id.
The reference answer is the `answer` column when present, else the last \\boxed{} of the
solution. Answers are compared with math-verify (math_equivalence.MathVerifier).

Rows: {'prompt', 'answer', 'question', 'solution', and 'level' / 'type' / 'subject' /
'unique_id' when the data has them}.
"""
from __future__ import annotations

import re

import ml_collections

from cfrl_jax.tasks import answers, base, formats, loading

_EXTRA_COLUMNS = ('level', 'type', 'subject', 'unique_id')


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      'name': 'math',
      'seed': 0,
      **loading.data_config_fields(
          hub_id='DigitalLearningGmbH/MATH-lighteval', hub_config='', question_field='problem',
          answer_field='answer', tfds_name='', eval_split='test',
          eval_hub_id='HuggingFaceH4/MATH-500', eval_hub_config=''),
      'solution_field': 'solution',
      'levels': (),                  # keep only these levels (1..5); () keeps all
      'types': (),                   # keep only these types / subjects; () keeps all
      'prompt_template': 'Problem: {question}\nPut the final answer in \\boxed{{}}.\nSolution:',
      'use_chat_template': False,
      'system_prompt': '',
      'formats': formats.formats_config(formats.ECHO_CHAMBER_PATTERNS, formats.ECHO_CHAMBER_ORDER),
      'answer': {
          'timeout_s': 5,            # math-verify limit per parse / comparison (whole seconds)
          'backend': 'auto',         # 'auto' | 'in_process' (main thread only) | 'subprocess'
          'require_boxed': False,    # completions without \boxed{} score 0
      },
      'rewards': {'correctness': 1.0, 'format': 0.0},
  })


def level_number(value) -> int | None:
  """'Level 3' / 3 / '3' -> 3; None if there is no number ('Level ?' appears in MATH)."""
  m = re.search(r'\d+', str(value))
  return int(m.group(0)) if m else None


def reference_answer(row: dict, config, where: str) -> str:
  value = row.get(config.answer_field)
  if value is not None and str(value).strip():
    return str(value).strip()
  solution = row.get(config.solution_field)
  boxed = answers.extract_boxed(str(solution)) if solution is not None else None
  if not boxed:
    raise ValueError(f'{where}: no reference answer: neither a non-empty {config.answer_field!r} field '
                     f'nor a \\boxed{{}} answer in the {config.solution_field!r} field (its fields: '
                     f'{sorted(row)}).')
  return boxed


def _keep(row: dict, config) -> bool:
  if config.levels and level_number(row.get('level')) not in {int(l) for l in config.levels}:
    return False
  kind = row.get('type', row.get('subject'))
  return not config.types or kind in tuple(config.types)


def build_splits(config) -> tuple[list[base.Row], list[base.Row]]:
  base.check_prompt_template(config.prompt_template)
  out = []
  for records in loading.load_train_eval(config):
    loading.require_fields(records, (config.question_field,),
                           'MATH rows need the problem text; set config.task.question_field.')
    rows = []
    for row, where in zip(records.rows, records.where):
      if not _keep(row, config):
        continue
      question = str(row[config.question_field]).strip()
      item = {
          'prompt': base.render_prompt(config.prompt_template, question),
          'answer': reference_answer(row, config, where),
          'question': question,
          'solution': str(row.get(config.solution_field) or ''),
      }
      item.update({k: row[k] for k in _EXTRA_COLUMNS if row.get(k) is not None})
      rows.append(item)
    out.append(rows)
  return out[0], out[1]
