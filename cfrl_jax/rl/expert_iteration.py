"""Expert Iteration's data step: keep the correct samples, de-duplicated per prompt.

One round (Echo Chamber: k = 64 samples per prompt at temperature 1.0, keep the
correct ones, SFT for 2 epochs, repeat) is: the trainer samples, scores, calls
select_for_sft, then runs sft.sft_loss epochs on the returned pairs.

De-duplication compares completions after normalise_whitespace: leading/trailing
whitespace is dropped and every internal run of whitespace (spaces, tabs, newlines)
becomes one space. So "x = 1\\n\\nprint(x)" and "x = 1 print(x)" count as the same
sample; text otherwise differs (case, punctuation) stays distinct. The completion
kept is the first occurrence, verbatim (not the normalised text). Duplicates are
only looked for within a prompt's group: the same text for two prompts is kept twice.
"""
from __future__ import annotations

import operator
from typing import Sequence

import numpy as np


def normalise_whitespace(text: str) -> str:
  """Strips the ends and collapses every run of whitespace to a single space."""
  return ' '.join(text.split())


def select_rows(completions: Sequence[str], rewards, *, group_size: int, threshold: float = 1.0,
                dedupe: bool = True) -> tuple[list[int], dict]:
  """Row indices of the completions to train on, and selection statistics.

  Args:
    completions: B strings, group-major (prompt p owns rows p*G .. p*G+G-1).
    rewards: B numbers; a sample is correct when reward >= threshold.
    group_size: G, a Python int >= 1 dividing B.
    threshold: reward needed to keep a sample (1.0 for binary exact-match rewards).
    dedupe: drop a completion whose normalised text already appeared in its group.

  Returns:
    (rows, stats): rows in increasing order; stats (Python numbers): samples, prompts,
    correct (samples with reward >= threshold), unique (distinct correct completions
    per prompt, summed), kept (= len(rows)), prompts_covered (prompts with a kept
    sample), duplicates (correct - unique).
  """
  try:
    G = operator.index(group_size)
  except TypeError:
    G = 0
  if G < 1:
    raise ValueError(f'group_size={group_size!r}; expected a positive Python int (samples per prompt).')
  rewards = np.asarray(rewards, dtype=np.float64)
  B = len(completions)
  if rewards.shape != (B,):
    raise ValueError(f'rewards has shape {rewards.shape} but there are {B} completions; expected '
                     'one reward per completion.')
  if B % G:
    raise ValueError(f'{B} completions do not split into groups of {G}: B must be '
                     'num_prompts * group_size, rows ordered group-major.')
  if not np.all(np.isfinite(rewards)):
    bad = np.flatnonzero(~np.isfinite(rewards)).tolist()
    raise ValueError(f'rewards at rows {bad[:10]} are not finite; fix the reward function (a '
                     'failed check should return 0.0, not NaN).')
  rows, correct, unique = [], 0, 0
  covered = 0
  for p in range(B // G):
    seen: set[str] = set()
    kept_here = 0
    for i in range(p * G, (p + 1) * G):
      if not rewards[i] >= threshold:
        continue
      correct += 1
      key = normalise_whitespace(completions[i])
      is_new = key not in seen
      seen.add(key)
      unique += is_new
      if is_new or not dedupe:
        rows.append(i)
        kept_here += 1
    covered += kept_here > 0
  stats = {'samples': B, 'prompts': B // G, 'correct': correct, 'unique': unique,
           'kept': len(rows), 'prompts_covered': covered, 'duplicates': correct - unique}
  return rows, stats


def select_for_sft(prompts: Sequence[str], completions: Sequence[str], rewards, *, group_size: int,
                   threshold: float = 1.0, dedupe: bool = True) -> tuple[list[tuple[str, str]], dict]:
  """(prompt, completion) pairs for the SFT step, and stats (see select_rows).

  Args:
    prompts: either B // G strings (one per prompt) or B strings (one per row, equal
      within each group).
    completions: B strings, group-major. rewards: B numbers.
    group_size, threshold, dedupe: see select_rows.

  Returns:
    (pairs, stats): pairs in row order; stats as select_rows'.
  """
  rows, stats = select_rows(completions, rewards, group_size=group_size, threshold=threshold,
                            dedupe=dedupe)
  G = operator.index(group_size)
  B = len(completions)
  if len(prompts) == B // G:
    prompt_of = lambda i: prompts[i // G]
  elif len(prompts) == B:
    for p in range(B // G):
      group = prompts[p * G:(p + 1) * G]
      if any(q != group[0] for q in group):
        raise ValueError(f'prompts given per row differ within group {p} (rows {p * G}..'
                         f'{(p + 1) * G - 1}); rows must be group-major with group_size={G}.')
    prompt_of = lambda i: prompts[i]
  else:
    raise ValueError(f'{len(prompts)} prompts for {B} completions with group_size={G}; expected '
                     f'{B // G} (one per prompt) or {B} (one per row).')
  return [(prompt_of(i), completions[i]) for i in rows], stats
