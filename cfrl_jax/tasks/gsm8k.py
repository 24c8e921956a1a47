"""GSM8K (Cobbe et al. 2021): grade-school word problems; reference answers end in '#### N'.

Schema (hub openai/gsm8k 'main', the JSONL release and TFDS 'gsm8k' alike):
    question: str; answer: str ('...<<48/2=24>>... #### 72'); TFDS also has annotation, short_answer.

Rows: {'prompt', 'answer': '72', 'question', 'solution': the full reference answer text}.
The reference 'answer' is the number that starts the text after the last '####', in
canonical form ('#### 1,000.5 dollars' -> '1000.5'; reference_answer); a row whose final
answer is not a number is an error naming the row. docs/answers.md has the rules.
The Echo Chamber paper runs RL on the GSM8K train split with a binary exact-match reward;
its formats (TinyGSM code, OpenMathInstruct-1 <llm-code>, natural language) are the
default format detectors, and config.answer.execute_code scores program-format
completions by running them out of process (code_reward).
"""
from __future__ import annotations

import ml_collections

from cfrl_jax.tasks import answers, base, formats, loading

_ANSWER_HINT = ('GSM8K rows need the question and the reference answer; set config.task.question_field '
                'and config.task.answer_field to the names your data uses.')


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      'name': 'gsm8k',
      'seed': 0,
      **loading.data_config_fields(hub_id='openai/gsm8k', hub_config='main', question_field='question',
                                   answer_field='answer', tfds_name='gsm8k', eval_split='test'),
      'prompt_template': 'Question: {question}\nAnswer:',
      'use_chat_template': False,
      'system_prompt': '',
      'formats': formats.formats_config(formats.ECHO_CHAMBER_PATTERNS, formats.ECHO_CHAMBER_ORDER),
      'answer': {
          'extractors': ('hash', 'answer_is', 'boxed'),
          'occurrence': 'first',
          'boxed_occurrence': 'last',
          'last_number_fallback': False,
          'execute_code': False,      # run program-format completions (subprocess, limits) to score them
          'code_timeout_s': 2.0,
          'code_memory_mb': 512,
          'code_function': '',        # '' -> the last zero-argument function the program defines
      },
      'rewards': {'correctness': 1.0, 'format': 0.0},
  })


def reference_answer(text: str, where: str) -> str:
  """'... #### 1,000.5 dollars' -> '1000.5': the number that starts the text after the last '####'.

  The rule (answers.leading_number): an optional sign and currency, thousands commas dropped,
  a fraction or percent kept, units and words after the number ignored; the value is written
  in canonical form ('$1,000.00' -> '1000', '3/4' -> '0.75'). A row whose final answer does not
  start with a number is an error naming the row, as no completion could be scored against it.
  """
  if '####' not in text:
    raise ValueError(f"{where}: the answer field {text[:120]!r} has no '#### N' final answer; GSM8K "
                     'reference answers end with it.')
  final = text.rsplit('####', 1)[1].strip()
  if not final:
    raise ValueError(f"{where}: nothing follows '####' in the answer field.")
  number = answers.leading_number(final)
  if number is None:
    raise ValueError(f"{where}: the final answer '#### {final[:120]}' does not start with a number "
                     "(GSM8K references are numbers, e.g. '#### 1,000.5 dollars' -> 1000.5); fix or "
                     'remove that row, or use a task whose answers are text.')
  return number


def build_splits(config) -> tuple[list[base.Row], list[base.Row]]:
  base.check_prompt_template(config.prompt_template)
  out = []
  for records in loading.load_train_eval(config):
    loading.require_fields(records, (config.question_field, config.answer_field), _ANSWER_HINT)
    rows = []
    for row, where in zip(records.rows, records.where):
      question = str(row[config.question_field]).strip()
      solution = str(row[config.answer_field])
      rows.append({
          'prompt': base.render_prompt(config.prompt_template, question),
          'answer': reference_answer(solution, where),
          'question': question,
          'solution': solution,
      })
    out.append(rows)
  return out[0], out[1]
