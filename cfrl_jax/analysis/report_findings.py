"""The report's findings: plain sentences, each stating only what report_numbers' numbers show.

A comparison between arms says faster / higher / ... only when its paired 95% interval excludes 0;
an arm's change from its own base is called real only beyond NOISE_SIGMAS standard errors.
"""
from __future__ import annotations

import math

import numpy as np

from cfrl_jax.analysis import study_stats
from cfrl_jax.analysis.report_numbers import NOISE_SIGMAS, TRAIN_WINDOW, ArmSummary, PairedResult, ReportNumbers
from cfrl_jax.analysis.report_runs import arm_label


def _direction(a: float, b: float, up: str = 'rose', down: str = 'fell') -> str:
  if round(a, 3) == round(b, 3):
    return 'stayed at'
  return up if b > a else down


def _noise_clause(diff: float, se: float | None) -> str:
  if se is None:
    return 'no standard error was logged, so noise cannot be judged'
  if abs(diff) > NOISE_SIGMAS * se:
    return f'beyond noise ({NOISE_SIGMAS:g} s.e. = {NOISE_SIGMAS * se:.3f})'
  return f'within noise ({NOISE_SIGMAS:g} s.e. = {NOISE_SIGMAS * se:.3f})'


def _seeds(n: int) -> str:
  return f'{n} seed' + ('' if n == 1 else 's')


def _paired_sentence(r: PairedResult, target: float | None) -> str:
  """One comparison on one metric; says faster/higher/... only when the 95% interval excludes 0."""
  t, c = arm_label(r.comparison.treatment), arm_label(r.comparison.control)
  n = r.interval.n
  digits = 1 if r.metric == 'steps' else 3
  vals = f'{np.mean(r.treatment):.{digits}f} vs {np.mean(r.control):.{digits}f}'
  diff = f'paired difference {r.interval.text(digits)}'
  what = (f'steps to the target pass@1 of {target:.3f}' if r.metric == 'steps' else
          {'auc': 'mean held-out pass@1 over training (AUC)', 'final': 'final held-out pass@1'}[r.metric])
  if r.verdict is None:
    out = f'{t} vs {c}, {what}: {vals} ({diff}); not distinguishable from {c} with {_seeds(n)}.'
  elif r.metric == 'steps':
    word = 'faster' if r.verdict == 'better' else 'slower'
    out = (f'{t} reached the target pass@1 of {target:.3f} {word} than {c}: {vals} steps, mean over '
           f'{_seeds(n)} ({diff}, 95% interval excludes 0).')
  else:
    word = 'higher' if r.verdict == 'better' else 'lower'
    out = f"{t}'s {what} is {word} than {c}'s: {vals}, mean over {_seeds(n)} ({diff}, 95% interval excludes 0)."
  if r.censored:
    out += (f' In {r.censored} of the {n} pairs a run never reached the target and is counted at its last eval '
            'step (a lower bound on its steps).')
  if r.dropped:
    out += f' Left out: {_seeds(r.dropped)} in which neither arm reached it.'
  return out


def _final_sentence(a: ArmSummary, b: ArmSummary) -> str:
  """Compares final pass@1 of arm `a` (the CF-RL arm, or the best arm) with `b`."""
  diff = a.final_pass1 - b.final_pass1
  se = None if a.final_se is None or b.final_se is None else math.hypot(a.final_se, b.final_se)
  noise = _noise_clause(diff, se)
  vals = f'{a.final_pass1:.3f} vs {b.final_pass1:.3f} ({diff:+.3f})'
  real = se is not None and abs(diff) > NOISE_SIGMAS * se
  if real and diff > 0:
    return f'Final pass@1: {a.label} beat {b.label}, {vals}, {noise}.'
  if real:
    return f'Final pass@1: {a.label} did not beat {b.label}, {vals}; {b.label} is higher {noise}.'
  if diff <= 0:
    return f'Final pass@1: {a.label} did not beat {b.label}, {vals}, {noise}.'
  return f'Final pass@1: {a.label} did not clearly beat {b.label}, {vals}, {noise}.'


def findings(nums: ReportNumbers) -> list[str]:
  """Plain sentences, each stating only what the numbers in the tables show."""
  out = []
  arms = nums.arms
  if nums.target is None:
    out.append(f'Steps to target were not computed: {nums.target_note}.')
  pairs = study_stats.comparisons(list(arms))
  for comp in pairs:
    results = [r for r in nums.paired if r.comparison == comp]
    if nums.target is not None and not any(r.metric == 'steps' for r in results):
      out.append(f'Neither {arm_label(comp.treatment)} nor {arm_label(comp.control)} reached the target pass@1 '
                 f'of {nums.target:.3f} in any seed both ran.')
    out += [_paired_sentence(r, nums.target) for r in results]
  if any(r.metric == 'steps' for r in nums.paired) and nums.eval_interval:
    out.append(f'Steps to target are resolved to the eval interval ({nums.eval_interval} steps).')
  with_final = [s for s in arms.values() if s.final_pass1 is not None]
  if not pairs and len(with_final) > 1:
    ranked = sorted(with_final, key=lambda s: -s.final_pass1)
    out.append(_final_sentence(ranked[0], ranked[1]))
  for s in arms.values():
    if s.gain is not None:
      verb = 'rose' if s.gain > 0 else 'fell' if s.gain < 0 else 'did not change'
      out.append(f'{s.label}: pass@1 {verb} from {s.base_pass1:.3f} to {s.final_pass1:.3f} ({s.gain:+.3f}), '
                 f'{_noise_clause(s.gain, s.gain_se)}.')
    if s.base_greedy is not None and s.final_greedy is not None:
      out.append(f'{s.label}: greedy accuracy {_direction(s.base_greedy, s.final_greedy)} '
                 f'{_from_to(s.base_greedy, s.final_greedy)}.')
    parts = []
    if s.entropy_first is not None:
      parts.append(f'entropy {_direction(s.entropy_first, s.entropy_last)} {_from_to(s.entropy_first, s.entropy_last)}')
    if s.confidence_first is not None:
      parts.append(f'confidence (mean sampled-token probability) {_direction(s.confidence_first, s.confidence_last)} '
                   f'{_from_to(s.confidence_first, s.confidence_last)}')
    if parts:
      out.append(f'{s.label}: ' + '; '.join(parts) + f' (means over the first/last {TRAIN_WINDOW} training steps).')
    if s.base_format is not None and s.final_format is not None:
      (b, bf), (f, ff) = s.base_format, s.final_format
      src = 'held-out samples' if s.format_source == 'eval' else 'training samples (no eval formats logged)'
      if b == f:
        out.append(f'{s.label}: the dominant format stayed {f} ({bf:.2f} → {ff:.2f} of {src}).')
      else:
        out.append(f'{s.label}: the dominant format shifted from {b} ({bf:.2f}) to {f} ({ff:.2f} of {src}).')
    if s.stage2_steps:
      out.append(f'{s.label}: CF-RL stage 2 (all parameters) started at step '
                 f'{", ".join(map(str, s.stage2_steps))}' + (' (per seed).' if s.num_seeds > 1 else '.'))
    if s.r_share_first is not None:
      out.append(f'{s.label}: the diagonal R (feature) share of the NTK {_direction(s.r_share_first, s.r_share_last)} '
                 f'{_from_to(s.r_share_first, s.r_share_last)} between the first and last probe.')
    if s.r_share_off_first is not None:
      out.append(f'{s.label}: across contexts (off-diagonal, |R| / (|R| + |G|)) the R share '
                 f'{_direction(s.r_share_off_first, s.r_share_off_last)} {_from_to(s.r_share_off_first, s.r_share_off_last)}.')
    if s.head_part_share is not None:
      out.append(f'{s.label}: over the probed updates the head moved {s.head_part_share:.0%} of the first-order '
                 'change of the probe log-probs, the backbone the rest (|head| / (|head| + |backbone|), summed '
                 'over probes).')
  return out


def _from_to(a: float, b: float) -> str:
  return f'{a:.3f}' if round(a, 3) == round(b, 3) else f'from {a:.3f} to {b:.3f}'
