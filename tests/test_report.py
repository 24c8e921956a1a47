"""Tests of cfrl_jax.report on synthetic metrics streams with hand-computed numbers.

The synthetic study: arms grpo and cfgrpo x seeds 0, 1; evals at steps 0, 10, ..., 40 with
pass@1_stderr 0.01; 40 training steps. Hand-computed values used below:
  pass@1 seed means  grpo   0.20 0.23 0.26 0.31 0.35      cfgrpo  0.20 0.29 0.38 0.43 0.47
  gains              grpo   0.14, 0.16 -> 0.15             cfgrpo  0.28, 0.26 -> 0.27
  default target     cfgrpo base 0.20 + 0.27 / 2 = 0.335
  steps to target    grpo 40 (0.35), cfgrpo 20 (0.38), ratio 20 / 40 = 0.5
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cfrl_jax import report
from cfrl_jax.analysis import report_figures, report_findings, report_markdown, report_numbers, report_runs

EVAL_STEPS = [0, 10, 20, 30, 40]
PASS1 = {
    ('grpo', 0): [0.20, 0.22, 0.26, 0.30, 0.34],
    ('grpo', 1): [0.20, 0.24, 0.26, 0.32, 0.36],
    ('cfgrpo', 0): [0.20, 0.30, 0.40, 0.44, 0.48],
    ('cfgrpo', 1): [0.20, 0.28, 0.36, 0.42, 0.46],
}
TRAIN_STEPS = 40


def _write_jsonl(run_dir, records, extra_lines=()):
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
    for line in extra_lines:
      f.write(line + '\n')


def _run_records(arm, seed, pass1, *, probes=True, formats=True):
  """Train, eval and probe records of one synthetic run. Entropy falls linearly from 0.5 (faster under CF)."""
  cf = arm.startswith('cf')
  recs = []
  for i, step in enumerate(EVAL_STEPS):
    r = {'step': step, 'kind': 'eval', 'pass@1': pass1[i], 'pass@1_stderr': 0.01, 'pass@4': min(1.0, pass1[i] + 0.3),
         'greedy_accuracy': 0.25 + 0.01 * i, 'distinct_answers': 3.0 - 0.4 * i, 'num_problems': 512.0}
    if formats:
      d = (0.05 if cf else 0.025) * i
      r.update(format_A=0.45 + 2 * d, format_B=0.35 - d, format_C=0.2 - d, format_unknown=0.0)
    recs.append(r)
  for step in range(1, TRAIN_STEPS + 1):
    t = (step - 1) / (TRAIN_STEPS - 1)
    recs.append({'step': step, 'kind': 'train', 'reward_mean': 0.2 + 0.2 * t + 0.01 * seed,
                 'entropy': 0.5 - (0.45 if cf else 0.4) * t, 'mean_prob': 0.8 + 0.1 * t, 'max_prob': 0.85 + 0.1 * t,
                 'head_norm': 10.0 + t, 'grad_norm_head': 0.5, 'grad_norm_backbone': 2.0,
                 'stage': (1.0 if step <= 10 + seed else 2.0) if cf else 0.0})
  if probes:
    for step in (1, 10, 20, 30, 40):
      recs.append({'step': step, 'kind': 'probe', 'ntk_R_diag': (5.0 + step) * (3 if cf else 1),
                   'ntk_G_diag': 1.0 + 0.1 * step, 'ntk_R_offdiag': 4.0, 'ntk_G_offdiag': 0.5,
                   'ntk_R_share': 0.8 + 0.001 * step, 'phi_cosine': 0.9,
                   'logprob_change_linear_head': 0.02, 'logprob_change_linear_backbone': 0.01,
                   'logprob_change_actual': 0.03})
  return sorted(recs, key=lambda r: r['step'])


def _build_study(root, pass1=PASS1, *, study_json=True, **kw):
  arms = sorted({a for a, _ in pass1}, key=lambda a: a.startswith('cf'))
  seeds = sorted({s for _, s in pass1})
  for (arm, seed), p in pass1.items():
    _write_jsonl(os.path.join(root, arm, f'seed{seed}'), _run_records(arm, seed, p, **kw))
  if study_json:
    info = {'arms': arms, 'seeds': seeds,
            'config': {'name': 'synthetic', 'rl': {'steps': TRAIN_STEPS, 'algorithm': 'grpo', 'lr': 1e-5},
                       'cfrl': {'stage1_steps': 10, 'stage1_head_lr': 1e-4, 'switch_on': 'steps'},
                       'eval': {'num_problems': 512, 'samples': 4, 'every': 10}},
            'base': {'num_params': 1_640_000, 'steps': 300, 'final_loss': 0.912, 'seconds': 510.0},
            'timings': {f'{a}/seed{s}': 60.0 + s for a in arms for s in seeds} | {'total': 250.0}}
    with open(os.path.join(root, 'study.json'), 'w') as f:
      json.dump(info, f)
  return str(root)


def _markdown(root, target_accuracy=None):
  """report.md's text without drawing the figures (the figures have their own tests)."""
  study = report_runs.load_study(root)
  return report_markdown.report_markdown(study, report_numbers.summarize(study, target_accuracy), {})


def _section(md, heading):
  return md.split(f'## {heading}')[1].split('\n## ')[0]


def _table_row(md, label):
  rows = [ln for ln in md.splitlines() if ln.startswith(f'| {label} |')]
  assert len(rows) >= 1, f'no table row for {label}'
  return rows


@pytest.fixture(scope='module')
def study_report(tmp_path_factory):
  root = _build_study(tmp_path_factory.mktemp('study'))
  path = report.write_report(root, analysis_md='Hand-written note.')
  with open(path) as f:
    return root, path, f.read()


def test_study_numbers_match_hand_computed(study_report):
  root, _, _ = study_report
  nums = report_numbers.summarize(report_runs.load_study(root))
  g, c = nums.arms['grpo'], nums.arms['cfgrpo']
  assert g.base_pass1 == pytest.approx(0.20) and c.base_pass1 == pytest.approx(0.20)
  assert g.final_pass1 == pytest.approx(0.35) and c.final_pass1 == pytest.approx(0.47)
  assert g.gain == pytest.approx(0.15) and c.gain == pytest.approx(0.27)
  # Spread over 2 seeds: sd of (0.34, 0.36) = 0.01 * sqrt(2).
  assert g.final_pm == pytest.approx(np.std([0.34, 0.36], ddof=1))
  # Gain s.e.: eval part sqrt(mean(0.01^2 + 0.01^2) / 2) = 0.01; seed part sd(0.14, 0.16) / sqrt(2) = 0.01.
  assert g.gain_se == pytest.approx(0.01)
  assert nums.target == pytest.approx(0.335)
  assert g.steps_to_target == 40 and c.steps_to_target == 20
  assert g.steps_to_target_per_seed == [40, 40] and c.steps_to_target_per_seed == [20, 20]
  (comp,) = nums.comparisons
  assert (comp.cf, comp.rl) == ('cfgrpo', 'grpo') and comp.ratio == pytest.approx(0.5)
  # Train windows: entropy 0.5 - 0.4 t over t = (step-1)/39; first 5 steps mean t = 2/39.
  assert g.entropy_first == pytest.approx(0.5 - 0.4 * 2 / 39)
  assert g.entropy_last == pytest.approx(0.5 - 0.4 * 37 / 39)
  assert g.reward_last == pytest.approx(0.2 + 0.2 * 37 / 39 + 0.005)
  assert c.final_format == ('A', pytest.approx(0.85)) and c.base_format == ('A', pytest.approx(0.45))
  assert c.stage2_steps == [11, 12] and g.stage2_steps == []
  # Per seed AUC = trapezoid / 40: grpo (0.21 + 0.24 + 0.28 + 0.32) * 10 / 40 = 0.2625 and 1.10 / 4 = 0.275;
  # cfgrpo 1.48 / 4 = 0.37 and 1.39 / 4 = 0.3475.
  assert [x.auc for x in nums.per_seed['grpo']] == pytest.approx([0.2625, 0.275])
  assert [x.auc for x in nums.per_seed['cfgrpo']] == pytest.approx([0.37, 0.3475])
  assert [x.stage2_step for x in nums.per_seed['cfgrpo']] == [11, 12]
  assert [(x.steps.steps, x.steps.censored) for x in nums.per_seed['cfgrpo']] == [(20, False), (20, False)]
  (steps, auc, final) = nums.paired
  assert (steps.metric, auc.metric, final.metric) == ('steps', 'auc', 'final')
  assert auc.interval.mean == pytest.approx(0.09) and auc.interval.sd == pytest.approx(0.035 / np.sqrt(2))
  assert auc.interval.high - auc.interval.mean == pytest.approx(12.706205 * 0.0175)


def test_study_report_tables_and_findings(study_report):
  _, path, md = study_report
  assert path.endswith('report.md') and md.startswith('# synthetic')
  (grow,) = _table_row(_section(md, 'Results'), 'GRPO')
  (crow,) = _table_row(_section(md, 'Results'), 'CF-GRPO')
  assert '| 0.200 | 0.350 ± 0.014 | +0.150 | 40 |' in grow
  assert '| 0.200 | 0.470 ± 0.014 | +0.270 | 40 |' in crow
  assert 'A (0.45) → A (0.85)' in crow
  target = _section(md, 'Steps to target accuracy')
  assert 'Target pass@1: **0.335**' in target and "best arm's (CF-GRPO)" in target
  assert _table_row(target, 'GRPO')[0].startswith('| GRPO | 40 | 40, 40 | 40 |')
  assert _table_row(target, 'CF-GRPO')[0].startswith('| CF-GRPO | 20 | 20, 20 | 40 |')
  assert 'CF-GRPO / GRPO: **0.50**' in target
  found = _section(md, 'Findings')
  # Issue 23: comparisons are paired by seed with a 95% t interval (df 1: t = 12.706205).
  # Steps: differences -20, -20 -> sd 0, interval [-20, -20] excludes 0: "faster".
  assert ('CF-GRPO reached the target pass@1 of 0.335 faster than GRPO: 20.0 vs 40.0 steps, mean over 2 seeds '
          '(paired difference -20.0 [-20.0, -20.0], 95% interval excludes 0).') in found
  # Final pass@1: differences 0.14, 0.10 -> mean 0.12, sd 0.02 sqrt(2), half 12.706205 * 0.02 = 0.254.
  assert ('CF-GRPO vs GRPO, final held-out pass@1: 0.470 vs 0.350 (paired difference +0.120 [-0.134, +0.374]); '
          'not distinguishable from GRPO with 2 seeds.') in found
  # AUC (mean pass@1): grpo 0.2625, 0.275; cfgrpo 0.37, 0.3475 -> differences 0.1075, 0.0725,
  # mean 0.09, half 12.706205 * 0.0175 = 0.222.
  assert ('CF-GRPO vs GRPO, mean held-out pass@1 over training (AUC): 0.359 vs 0.269 (paired difference '
          '+0.090 [-0.132, +0.312]); not distinguishable from GRPO with 2 seeds.') in found
  seeds = _section(md, 'Seeds and paired comparisons')
  assert '| GRPO | 1 | 0.200 | 0.360 | 40 | 40 | 0.275 | — |' in seeds
  assert '| CF-GRPO | 0 | 0.200 | 0.480 | 40 | 20 | 0.370 | 11 |' in seeds
  assert '| CF-GRPO | 2 | 0.470 ± 0.014 | 0.359 ± 0.016 | 20.0 ± 0.0 | 0 of 2 |' in seeds
  assert ('| CF-GRPO − GRPO | CF-RL as run: head first, with its stage-one head lr | steps to target | 2 | 20.0 | '
          '40.0 | -20.0 [-20.0, -20.0] | faster |') in seeds
  assert 'Student t over the n paired seeds, n−1 degrees of freedom' in seeds
  assert 'GRPO: pass@1 rose from 0.200 to 0.350 (+0.150), beyond noise (2 s.e. = 0.020).' in found
  # Entropy windows: GRPO 0.5 - 0.4 * (2/39) = 0.479 and 0.5 - 0.4 * (37/39) = 0.121.
  assert '- GRPO: entropy fell from 0.479 to 0.121; confidence' in found
  assert '- CF-GRPO: CF-RL stage 2 (all parameters) started at step 11, 12 (per seed).' in found
  assert 'did not beat' not in found
  run = _section(md, 'What was run')
  assert 'seeds: 0, 1' in run and '1.64M parameters' in run and 'total 4.2 min' in run
  assert 'Hand-written note.' in _section(md, 'Analysis')


def test_study_figures_written_and_linked(study_report):
  root, _, md = study_report
  for name in report_figures.FIGURES:
    png = os.path.join(root, f'{name}.png')
    assert os.path.getsize(png) > 5000, name
    with open(png, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert f'![{name}]({name}.png)' in md
  assert 'Not drawn' not in md


def test_cf_arm_that_loses_is_reported_as_not_beating(tmp_path):
  pass1 = {('grpo', 0): [0.20, 0.30, 0.40, 0.44, 0.48], ('cfgrpo', 0): [0.20, 0.22, 0.26, 0.30, 0.34]}
  md = _markdown(_build_study(tmp_path, pass1, study_json=False))
  found = _section(md, 'Findings')
  # Target 0.20 + 0.28 / 2 = 0.34: grpo at step 20, cfgrpo at step 40. One seed: no interval, so no
  # direction is claimed (issue 23 replaced the one-seed "did not beat ... GRPO is higher" wording).
  assert ('CF-GRPO vs GRPO, steps to the target pass@1 of 0.340: 40.0 vs 20.0 (paired difference +20.0 '
          '(1 seed: no interval)); not distinguishable from GRPO with 1 seed.') in found
  assert ('CF-GRPO vs GRPO, final held-out pass@1: 0.340 vs 0.480 (paired difference -0.140 (1 seed: no '
          'interval)); not distinguishable from GRPO with 1 seed.') in found
  assert 'CF-GRPO reached' not in found and 'slower' not in found and 'is lower' not in found
  # One seed: the plus-minus is the eval standard error.
  assert '0.480 ± 0.010' in _table_row(_section(md, 'Results'), 'GRPO')[0]


def test_explicit_target_not_reached_gives_a_bound(tmp_path):
  root = _build_study(tmp_path)
  nums = report_numbers.summarize(report_runs.load_study(root), target_accuracy=0.45)
  assert nums.arms['grpo'].steps_to_target is None and nums.arms['cfgrpo'].steps_to_target == 40
  assert nums.arms['cfgrpo'].steps_to_target_per_seed == [40, 40]   # seed 1 reaches 0.46 at 40, seed 0 at 40
  (comp,) = nums.comparisons
  assert comp.ratio is None and comp.text.startswith('< 1.00')
  md = _markdown(root, target_accuracy=0.45)
  target = _section(md, 'Steps to target accuracy')
  assert 'given as target_accuracy' in target and _table_row(target, 'GRPO')[0].startswith('| GRPO | not reached |')
  # GRPO never reaches 0.45: counted at its last eval, 40, and flagged; CF-GRPO reaches it at 40 in both seeds.
  assert '| GRPO | 1 | 0.200 | 0.360 | 40 | 40+ |' in md
  assert '| GRPO | 2 | 0.350 ± 0.014 | 0.269 ± 0.009 | 40.0 ± 0.0 (bound) | 2 of 2 |' in md
  assert ('CF-GRPO vs GRPO, steps to the target pass@1 of 0.450: 40.0 vs 40.0 (paired difference +0.0 '
          '[+0.0, +0.0]); not distinguishable from GRPO with 2 seeds. In 2 of the 2 pairs a run never reached '
          'the target and is counted at its last eval step (a lower bound on its steps).') in md


def test_small_gain_is_within_noise(tmp_path):
  pass1 = {('grpo', 0): [0.20, 0.20, 0.21, 0.21, 0.21]}
  nums = report_numbers.summarize(report_runs.load_study(_build_study(tmp_path, pass1)))
  found = report_findings.findings(nums)
  # Gain 0.01 vs 2 * sqrt(0.01^2 + 0.01^2) = 0.028.
  assert 'GRPO: pass@1 rose from 0.200 to 0.210 (+0.010), within noise (2 s.e. = 0.028).' in found


def test_cf_lead_within_noise_is_not_called_a_win(tmp_path):
  pass1 = {('grpo', 0): [0.20, 0.25, 0.30, 0.32, 0.34], ('cfgrpo', 0): [0.20, 0.25, 0.30, 0.33, 0.35]}
  found = report_findings.findings(report_numbers.summarize(report_runs.load_study(_build_study(tmp_path, pass1))))
  assert ('CF-GRPO vs GRPO, final held-out pass@1: 0.350 vs 0.340 (paired difference +0.010 (1 seed: no '
          'interval)); not distinguishable from GRPO with 1 seed.') in found
  # Target 0.2 + 0.15 / 2 = 0.275: both first reach it at step 20.
  assert ('CF-GRPO vs GRPO, steps to the target pass@1 of 0.275: 20.0 vs 20.0 (paired difference +0.0 (1 seed: '
          'no interval)); not distinguishable from GRPO with 1 seed.') in found


def test_best_arm_named_without_a_cf_pair(tmp_path):
  pass1 = {('grpo', 0): [0.20, 0.25, 0.30, 0.32, 0.34], ('ppo', 0): [0.20, 0.30, 0.40, 0.50, 0.60]}
  found = report_findings.findings(report_numbers.summarize(report_runs.load_study(_build_study(tmp_path, pass1))))
  assert 'Final pass@1: PPO beat GRPO, 0.600 vs 0.340 (+0.260), beyond noise (2 s.e. = 0.028).' in found


def test_single_run_with_missing_keys(tmp_path):
  recs = [{'step': 0, 'kind': 'eval', 'pass@1': 0.3, 'pass@1_stderr': 0.02},
          {'step': 5, 'kind': 'eval', 'pass@1': 0.4, 'pass@1_stderr': 0.02}]
  recs += [{'step': s, 'kind': 'train', 'reward_mean': 0.1 * s, 'note': 'text', 'loss': float('nan')}
           for s in range(1, 6)]
  _write_jsonl(tmp_path / 'run', recs)
  path = report.write_report(str(tmp_path / 'run'))
  md = open(path).read()
  assert os.path.getsize(tmp_path / 'run' / 'accuracy.png') > 0
  for name in ('confidence', 'formats', 'ntk', 'norms', 'passk'):
    assert not os.path.exists(tmp_path / 'run' / f'{name}.png')
    assert f'`{name}.png`' in md.split('Not drawn')[1]
  row = _table_row(_section(md, 'Results'), 'run')[0]
  assert '| 0.300 | 0.400 ± 0.020 | +0.100 | 5 |' in row
  # Target 0.35, first reached at step 5; the only arm has no CF pair, so no ratio.
  assert _table_row(_section(md, 'Steps to target accuracy'), 'run')[0].startswith('| run | 5 |')
  assert 'ratio' not in _section(md, 'Steps to target accuracy')


def test_formats_fall_back_to_training_samples(tmp_path):
  recs = [{'step': s, 'kind': 'train', 'format_A': 0.1 * s, 'format_B': 1 - 0.1 * s} for s in range(1, 9)]
  _write_jsonl(tmp_path / 'run', recs)
  s = report_numbers.summarize(report_runs.load_study(str(tmp_path / 'run'))).arms['run']
  # First 5 steps: A 0.3, B 0.7; last 5 (4..8): A 0.6, B 0.4.
  assert s.format_source == 'train'
  assert s.base_format == ('B', pytest.approx(0.7)) and s.final_format == ('A', pytest.approx(0.6))
  assert report_figures.figure_formats(report_runs.load_study(str(tmp_path / 'run')), str(tmp_path)) == 'formats.png'
  assert os.path.getsize(tmp_path / 'formats.png') > 0


def test_no_improvement_skips_the_default_target(tmp_path):
  _write_jsonl(tmp_path / 'r', [{'step': 0, 'kind': 'eval', 'pass@1': 0.3}, {'step': 5, 'kind': 'eval', 'pass@1': 0.2}])
  md = _markdown(str(tmp_path / 'r'))
  assert 'Not computed: no arm improved pass@1' in md
  assert 'no standard error was logged' in md


def test_malformed_line_raises_clear_error(tmp_path):
  _write_jsonl(tmp_path / 'bad', [{'step': 0, 'kind': 'eval', 'pass@1': 0.3}], extra_lines=['{"step": 1, "kind":'])
  with pytest.raises(ValueError, match=r'metrics\.jsonl:2: malformed metrics line'):
    report.write_report(str(tmp_path / 'bad'))
  _write_jsonl(tmp_path / 'nostep', [{'kind': 'eval', 'pass@1': 0.3}])
  with pytest.raises(ValueError, match=r'record 1 has step=None.*integer "step"'):
    report.write_report(str(tmp_path / 'nostep'))
  _write_jsonl(tmp_path / 'list', [[1, 2]])
  with pytest.raises(ValueError, match='not a JSON object'):
    report_runs.load_study(str(tmp_path / 'list'))


def test_missing_dirs_and_partial_studies(tmp_path):
  with pytest.raises(FileNotFoundError, match='No metrics.jsonl'):
    report_runs.load_study(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='not a directory'):
    report_runs.load_study(str(tmp_path / 'absent'))
  root = _build_study(tmp_path / 's', {('grpo', 0): PASS1[('grpo', 0)]})
  info = json.load(open(os.path.join(root, 'study.json')))
  json.dump(dict(info, seeds=[0, 1]), open(os.path.join(root, 'study.json'), 'w'))
  study = report_runs.load_study(root)
  assert study.missing == ['grpo/seed1'] and len(study.arms['grpo']) == 1
  assert '**Missing runs** (named in study.json, no metrics.jsonl): grpo/seed1.' in _markdown(root)


def test_seed_curves_use_common_steps_and_last_record_wins(tmp_path):
  _write_jsonl(tmp_path / 'a' / 'seed0', [{'step': 0, 'kind': 'eval', 'pass@1': 0.1},
                                          {'step': 10, 'kind': 'eval', 'pass@1': 0.2},
                                          {'step': 10, 'kind': 'eval', 'pass@1': 0.4}])
  _write_jsonl(tmp_path / 'a' / 'seed1', [{'step': 0, 'kind': 'eval', 'pass@1': 0.3},
                                          {'step': 10, 'kind': 'eval', 'pass@1': 0.6},
                                          {'step': 20, 'kind': 'eval', 'pass@1': 0.9}])
  study = report_runs.load_study(str(tmp_path))
  curve = report_numbers.arm_curve(study.arms['a'], 'eval', 'pass@1')
  np.testing.assert_array_equal(curve.steps, [0, 10])
  np.testing.assert_allclose(curve.mean, [0.2, 0.5])
  np.testing.assert_allclose(curve.low, [0.1, 0.4])
  np.testing.assert_allclose(curve.high, [0.3, 0.6])
  # Final pass@1 is each seed's last eval: (0.4 + 0.9) / 2.
  assert report_numbers.summarize_arm(study, 'a').final_pass1 == pytest.approx(0.65)


def test_target_argument_is_checked(tmp_path):
  root = _build_study(tmp_path, {('grpo', 0): PASS1[('grpo', 0)]})
  with pytest.raises(ValueError, match='not a pass@1 in'):
    report_numbers.summarize(report_runs.load_study(root), target_accuracy=35.0)


def test_cli_prints_the_report_path(tmp_path):
  root = _build_study(tmp_path, {('grpo', 0): PASS1[('grpo', 0)]}, probes=False)
  out = subprocess.run([sys.executable, '-m', 'cfrl_jax.report', f'--run={root}', '--target_accuracy=0.3'],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(report.__file__)),
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == os.path.join(root, 'report.md')
  assert 'Target pass@1: **0.300**' in open(os.path.join(root, 'report.md')).read()


def test_update_readme_fills_the_marked_block_and_copies_the_plot(tmp_path):
  root = tmp_path / 'study'
  _build_study(root)
  readme = tmp_path / 'README.md'
  readme.write_text('# title\n\n<!-- demo-results -->\nold text\n<!-- /demo-results -->\n\n## More\n')
  image = report.update_readme(str(root), str(readme), image_dir=str(tmp_path / 'docs'))
  text = readme.read_text()
  assert os.path.exists(image) and image.endswith('study_accuracy.png')
  assert 'old text' not in text and text.startswith('# title') and text.rstrip().endswith('## More')
  block = text.split('<!-- demo-results -->')[1].split('<!-- /demo-results -->')[0]
  assert '| arm' in block.lower() and f']({image})' in block and 'cores' in block
  with pytest.raises(ValueError, match='demo-results'):
    (tmp_path / 'plain.md').write_text('no markers')
    report.update_readme(str(root), str(tmp_path / 'plain.md'), image_dir=str(tmp_path / 'docs'))


# -- issue 23: paired statistics over seeds, the designed comparisons, the accuracy figure ---------


def _reaching(step):
  """A pass@1 curve over EVAL_STEPS that first reaches 0.35 (>= the 0.30 target) at `step`."""
  return [0.20 if s < step else 0.35 for s in EVAL_STEPS]


def test_finding_switches_from_not_distinguishable_to_faster(tmp_path):
  # Control reaches the 0.30 target at step 30 in all three seeds.
  noisy = {('grpo', k): _reaching(30) for k in range(3)} | {
      ('cfgrpo', 0): _reaching(10), ('cfgrpo', 1): _reaching(40), ('cfgrpo', 2): _reaching(20)}
  steady = {('grpo', k): _reaching(30) for k in range(3)} | {
      ('cfgrpo', 0): _reaching(10), ('cfgrpo', 1): _reaching(20), ('cfgrpo', 2): _reaching(10)}
  # Noisy: differences -20, +10, -10: mean -6.667, sd 15.275, half 4.302653 * 15.275 / sqrt(3) = 37.946.
  found = report_findings.findings(
      report_numbers.summarize(report_runs.load_study(_build_study(tmp_path / 'a', noisy)), 0.30))
  assert ('CF-GRPO vs GRPO, steps to the target pass@1 of 0.300: 23.3 vs 30.0 (paired difference -6.7 '
          '[-44.6, +31.3]); not distinguishable from GRPO with 3 seeds.') in found
  assert not any('faster' in f for f in found)
  # Steady: differences -20, -10, -20: mean -16.667, sd 5.7735, half 14.342 -> [-31.0, -2.3], excludes 0.
  found = report_findings.findings(
      report_numbers.summarize(report_runs.load_study(_build_study(tmp_path / 'b', steady)), 0.30))
  assert ('CF-GRPO reached the target pass@1 of 0.300 faster than GRPO: 13.3 vs 30.0 steps, mean over 3 seeds '
          '(paired difference -16.7 [-31.0, -2.3], 95% interval excludes 0).') in found
  # AUC of steady: a curve reaching 0.35 at step k has area 0.2 * 40 + 0.15 * (40 - k + 5) for k >= 10
  # (a 10-step ramp, half of it above 0.2) -> k = 10: 13.25 / 40; 20: 11.75 / 40; 30: 10.25 / 40.
  # Differences (3, 1.5, 3) / 40 = 0.075, 0.0375, 0.075: mean 0.0625, sd 0.021651, half 0.053784.
  auc = next(r for r in report_numbers.summarize(report_runs.load_study(str(tmp_path / 'b')), 0.30).paired
             if r.metric == 'auc')
  assert auc.treatment == pytest.approx([13.25 / 40, 11.75 / 40, 13.25 / 40])
  assert auc.interval.mean == pytest.approx(0.0625)
  assert (auc.interval.low, auc.interval.high) == (pytest.approx(0.0625 - 0.053784, abs=1e-6),
                                                  pytest.approx(0.0625 + 0.053784, abs=1e-6))
  assert auc.verdict == 'better'
  # Means 38.25 / 120 = 0.319 vs 0.256; the difference 0.0625 sits on a rounding tie, so only its interval is matched.
  (sentence,) = [f for f in found if 'AUC' in f]
  assert sentence.startswith("CF-GRPO's mean held-out pass@1 over training (AUC) is higher than GRPO's: 0.319 vs "
                             '0.256, mean over 3 seeds (paired difference +0.06')
  assert sentence.endswith('[+0.009, +0.116], 95% interval excludes 0).')


def test_seeds_where_neither_arm_reaches_the_target_are_left_out(tmp_path):
  never = [0.20] * len(EVAL_STEPS)
  pass1 = {('grpo', 0): never, ('cfgrpo', 0): never, ('grpo', 1): _reaching(30), ('cfgrpo', 1): _reaching(20),
           ('grpo', 2): _reaching(30), ('cfgrpo', 2): never}
  nums = report_numbers.summarize(report_runs.load_study(_build_study(tmp_path, pass1)), 0.30)
  steps = next(r for r in nums.paired if r.metric == 'steps')
  # Seed 0 dropped; seed 1: 20 - 30; seed 2: CF-GRPO censored at 40, 40 - 30.
  assert steps.seeds == [1, 2] and steps.treatment == [20, 40] and steps.control == [30, 30]
  assert (steps.censored, steps.dropped) == (1, 1)
  sentence = report_findings._paired_sentence(steps, nums.target)
  assert 'not distinguishable from GRPO with 2 seeds' in sentence
  assert 'In 1 of the 2 pairs a run never reached the target' in sentence
  assert sentence.endswith('Left out: 1 seed in which neither arm reached it.')
  assert [str(x.steps) for x in nums.per_seed['cfgrpo']] == ['40+', '20', '40+']


def test_neither_arm_reaching_the_target_is_said_plainly(tmp_path):
  never = [0.20, 0.21, 0.22, 0.23, 0.24]
  nums = report_numbers.summarize(
      report_runs.load_study(_build_study(tmp_path, {('grpo', 0): never, ('cfgrpo', 0): never})), 0.5)
  assert not any(r.metric == 'steps' for r in nums.paired)
  assert ('Neither CF-GRPO nor GRPO reached the target pass@1 of 0.500 in any seed both ran.'
          in report_findings.findings(nums))


def test_designed_controls_are_compared_and_labelled(tmp_path):
  arms = ('grpo', 'cfgrpo', 'grpo_headlr', 'cfgrpo_samelr')
  pass1 = {(a, k): _reaching(10 + 10 * i) for i, a in enumerate(arms) for k in (0, 1)}
  md = _markdown(_build_study(tmp_path, pass1), target_accuracy=0.30)
  table = _section(md, 'Seeds and paired comparisons')
  rows = [ln for ln in table.splitlines() if ' − ' in ln and 'steps to target' in ln]
  assert [ln.split(' | ')[0] for ln in rows] == [
      '| CF-GRPO − GRPO', '| CF-GRPO (same lr) − GRPO', '| GRPO (head lr as CF) − GRPO',
      '| CF-GRPO − GRPO (head lr as CF)', '| CF-GRPO − CF-GRPO (same lr)']
  # grpo 10, cfgrpo 20, grpo_headlr 30, cfgrpo_samelr 40 in both seeds: identical differences, sd 0.
  assert '| CF-GRPO − GRPO (head lr as CF) | ordering, with the head lr schedule matched | steps to target | 2 | ' \
         '20.0 | 30.0 | -10.0 [-10.0, -10.0] | faster |' in table
  assert '| CF-GRPO (same lr) − GRPO | ordering alone (stage-one head lr = rl.head_lr) | steps to target | 2 | ' \
         '40.0 | 10.0 | +30.0 [+30.0, +30.0] | slower |' in table
  assert report_runs.arm_label('cfppo_adaptive') == 'CF-PPO (adaptive switch)'
  assert report_runs.arm_label('mine_x') == 'mine_x'


def test_paired_auc_uses_the_span_both_runs_logged(tmp_path):
  _write_jsonl(tmp_path / 'grpo' / 'seed0', [{'step': s, 'kind': 'eval', 'pass@1': 0.2 + 0.01 * s}
                                             for s in (0, 10, 20, 30, 40)])
  _write_jsonl(tmp_path / 'cfgrpo' / 'seed0', [{'step': s, 'kind': 'eval', 'pass@1': v}
                                               for s, v in ((0, 0.2), (10, 0.4), (20, 0.4))])
  nums = report_numbers.summarize(report_runs.load_study(str(tmp_path)))
  auc = next(r for r in nums.paired if r.metric == 'auc')
  # Span 0..20: cfgrpo (10 * 0.3 + 10 * 0.4) / 20 = 0.35; grpo mean of the line over 0..20 = 0.3.
  assert auc.treatment == pytest.approx([0.35]) and auc.control == pytest.approx([0.3])
  # The per-seed table keeps each run's own span: grpo over 0..40 is 0.4.
  assert nums.per_seed['grpo'][0].auc == pytest.approx(0.4)


def test_one_seed_band_is_the_eval_standard_error(tmp_path):
  root = _build_study(tmp_path, {('grpo', 0): PASS1[('grpo', 0)]})
  runs = report_runs.load_study(root).arms['grpo']
  curve = report_numbers.with_se_band(report_numbers.arm_curve(runs, 'eval', 'pass@1'), runs, 'eval', 'pass@1_stderr')
  assert curve.se_band
  np.testing.assert_allclose(curve.low, np.array(PASS1[('grpo', 0)]) - 0.01)
  np.testing.assert_allclose(curve.high, np.array(PASS1[('grpo', 0)]) + 0.01)
  two = report_runs.load_study(_build_study(tmp_path / 'two')).arms['grpo']   # several seeds: min-max unchanged
  curve = report_numbers.with_se_band(report_numbers.arm_curve(two, 'eval', 'pass@1'), two, 'eval', 'pass@1_stderr')
  assert not curve.se_band and curve.low[-1] == pytest.approx(0.34) and curve.high[-1] == pytest.approx(0.36)


def test_accuracy_figure_band_smoothing_and_stage_switch(tmp_path, monkeypatch):
  figs = []
  monkeypatch.setattr(report_figures, '_save', lambda fig, out_dir, name: figs.append(fig) or f'{name}.png')
  # One CF-GRPO seed: evals every 10 steps with s.e. 0.02, a reward alternating 0 / 1 with a step at 15, and
  # stage 2 from step 12.
  reward = [float(s % 2) + (0.5 if s >= 15 else 0.0) for s in range(1, 31)]
  recs = [{'step': s, 'kind': 'eval', 'pass@1': 0.1 + 0.01 * s, 'pass@1_stderr': 0.02} for s in (0, 10, 20, 30)]
  recs += [{'step': s, 'kind': 'train', 'reward_mean': r, 'stage': 1.0 if s < 12 else 2.0}
           for s, r in zip(range(1, 31), reward)]
  _write_jsonl(tmp_path / 'cfgrpo' / 'seed0', recs)
  study = report_runs.load_study(str(tmp_path))
  assert report_figures.figure_accuracy(study, str(tmp_path), 0.3) == 'accuracy.png'
  (fig,) = figs
  pass1_ax, reward_ax = fig.axes   # greedy accuracy is not logged, so its panel is left out
  assert "± the eval's own s.e. of pass@1 (one seed)" in fig._suptitle.get_text()
  (band,) = pass1_ax.collections
  # The band's outline spans pass@1 - 0.02 .. pass@1 + 0.02: 0.08 at step 0 up to 0.42 at step 30.
  ys = band.get_paths()[0].vertices[:, 1]
  assert ys.min() == pytest.approx(0.08) and ys.max() == pytest.approx(0.42)
  for ax in (pass1_ax, reward_ax):   # the stage switch at step 12 on both panels
    assert any(list(ln.get_xdata()) == [12, 12] for ln in ax.lines)
  raw, smooth = [ln for ln in reward_ax.lines if list(ln.get_xdata()) != [12, 12]]
  assert raw.get_alpha() == 0.25 and smooth.get_alpha() is None
  np.testing.assert_allclose(raw.get_ydata(), reward)
  # Centered 9-step average, the window shrinking symmetrically at the ends: step 1 alone (1); steps 1..3
  # (2/3); steps 1..9 (odd steps are ones: 5/9); 2..10 (4/9); 10..18 (4 ones + 0.5 x 4 steps from 15: 6/9);
  # 11..19 (5 + 0.5 x 5 = 7.5/9); step 30 alone (0.5).
  sm = np.asarray(smooth.get_ydata())
  np.testing.assert_allclose(sm[[0, 1, 4, 5, 13, 14, 29]], [1, 2 / 3, 5 / 9, 4 / 9, 6 / 9, 7.5 / 9, 0.5])


def test_method_says_whether_the_base_varies_with_the_seed(tmp_path):
  root = _build_study(tmp_path)
  assert 'shared pretrained base' not in _markdown(root) and 'own pretrained base' not in _markdown(root)
  info = json.load(open(os.path.join(root, 'study.json')))
  for varies, text in ((True, 'Each RL seed started from its own pretrained base (study.vary_base), so the '
                              'variation between seeds includes the base'),
                       (False, 'Every arm and seed started from one shared pretrained base')):
    json.dump(dict(info, base_varies_with_seed=varies), open(os.path.join(root, 'study.json'), 'w'))
    assert text in _section(_markdown(root), 'Seeds and paired comparisons')


def test_mechanism_measures_reach_findings_and_figures(tmp_path):
  """Off-diagonal R share and the head / backbone split of the probe log-prob change, hand-computed."""
  root = tmp_path / 'mech'
  recs = _run_records('cfgrpo', 0, PASS1[('cfgrpo', 0)], probes=False)
  for step, off, head, backbone in ((1, 0.6, 0.03, 0.01), (20, 0.7, 0.01, 0.02), (40, 0.9, -0.02, 0.01)):
    recs.append({'step': step, 'kind': 'probe', 'ntk_R_share': 0.5, 'ntk_R_share_offdiag': off,
                 'phi_cosine': 0.9, 'phi_cosine_response': 0.4, 'logprob_change_actual': head + backbone,
                 'logprob_change_linear_head': head, 'logprob_change_linear_backbone': backbone})
  _write_jsonl(str(root / 'cfgrpo' / 'seed0'), sorted(recs, key=lambda r: r['step']))
  study = report_runs.load_study(str(root))
  md = report_markdown.report_markdown(study, report_numbers.summarize(study), {})
  assert 'across contexts (off-diagonal, |R| / (|R| + |G|)) the R share rose from 0.600 to 0.900' in md
  # |head| summed 0.06, |backbone| 0.04 -> the head moved 60% of the first-order change.
  assert 'the head moved 60% of the first-order change' in md
  figures = report_figures.write_figures(study, str(tmp_path))
  assert figures['logprob_split'] and os.path.exists(tmp_path / figures['logprob_split'])
  assert figures['ntk'] and os.path.exists(tmp_path / figures['ntk'])
