"""The command line: config errors are clear; the embedded demo's smoke variant runs a study end to end
(four arms, two seeds) whose report pairs the arms by seed."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, timeout=600):
  return subprocess.run([sys.executable, '-m', 'cfrl_jax.main', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def test_unknown_key_lists_valid_keys():
  p = run_main('--config=configs/demo.py:smoke', '--config.rl.lrr=1')
  assert p.returncode != 0
  assert "'lrr' is not a field of config.rl" in p.stderr
  assert "'lr'" in p.stderr and "'group_size'" in p.stderr


def test_wrong_type_is_an_error():
  p = run_main('--config=configs/demo.py:smoke', '--config.rl.lr=abc')
  assert p.returncode != 0
  assert 'rl.lr' in p.stderr and 'abc' in p.stderr


def test_missing_config_file_is_an_error():
  p = run_main('--config=configs/does_not_exist.py')
  assert p.returncode != 0 and 'does not exist' in p.stderr


def test_every_config_builds_and_matches_the_schema():
  from cfrl_jax.config import check_against_schema
  from cfrl_jax.main import load_config_file
  for name in sorted(os.listdir(os.path.join(REPO, 'configs'))):
    if name.endswith('.py') and not name.startswith('_'):
      config = load_config_file(os.path.join(REPO, 'configs', name))
      check_against_schema(config)
      assert config.is_locked, name


# The smoke study of the default suite: configs/demo.py:smoke with the four arms that separate CF-RL's
# causes, two RL seeds, through the command line (pretraining, every arm x seed, evals, probes, report).
SMOKE_ARMS = ('grpo', 'cfgrpo', 'grpo_headlr', 'cfgrpo_samelr')
SMOKE_SEEDS = (0, 1)
# The designed comparisons among SMOKE_ARMS (treatment, control): cfrl_jax.analysis.study_stats.COMPARISONS.
DESIGNED = (('cfgrpo', 'grpo'), ('cfgrpo_samelr', 'grpo'), ('grpo_headlr', 'grpo'), ('cfgrpo', 'grpo_headlr'),
            ('cfgrpo', 'cfgrpo_samelr'))


def records_of(run_dir, arm, seed, kind):
  with open(os.path.join(run_dir, arm, f'seed{seed}', 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


@pytest.fixture(scope='module')
def smoke_study(tmp_path_factory, smoke_pretrain_cache):
  """(run dir, stdout) of the smoke study. The session's smoke base and compilation cache
  (tests/conftest.py): what other smoke runs of the session built is loaded, not built again."""
  run_dir, jit_cache = str(tmp_path_factory.mktemp('smoke_study') / 'run'), os.environ['JAX_COMPILATION_CACHE_DIR']
  p = run_main('--config=configs/demo.py:smoke', f'--config.arms={",".join(SMOKE_ARMS)}',
               f'--config.seeds={",".join(map(str, SMOKE_SEEDS))}', f'--config.run_dir={run_dir}',
               f'--config.pretrain.cache_dir={smoke_pretrain_cache}', f'--config.compile_cache_dir={jit_cache}',
               '--config.log.progress=False')
  assert p.returncode == 0, p.stderr[-3000:]
  return run_dir, p.stdout


def test_demo_smoke_study_writes_report_plots_and_finite_metrics(smoke_study):
  run_dir, stdout = smoke_study
  assert os.path.exists(os.path.join(run_dir, 'report.md'))
  assert 'Report:' in stdout
  pngs = [f for f in os.listdir(run_dir) if f.endswith('.png')]
  assert {'accuracy.png', 'confidence.png', 'formats.png'} <= set(pngs), pngs
  study = json.load(open(os.path.join(run_dir, 'study.json')))
  assert study['arms'] == list(SMOKE_ARMS) and study['seeds'] == list(SMOKE_SEEDS)
  assert len(study['bases']) == 1 and study['bases'][0]['seeds'] == list(SMOKE_SEEDS)   # one shared base
  for arm in SMOKE_ARMS:
    for seed in SMOKE_SEEDS:   # every arm x seed ran to the end, with finite metrics
      path = os.path.join(run_dir, arm, f'seed{seed}', 'metrics.jsonl')
      records = [json.loads(line) for line in open(path)]
      kinds = {r['kind'] for r in records}
      assert {'train', 'eval', 'probe'} <= kinds, (arm, seed, kinds)
      assert [r['step'] for r in records if r['kind'] == 'train'] == [1, 2, 3], (arm, seed)
      for r in records:
        for k, v in r.items():
          if isinstance(v, float) and not k.startswith('pass@1_stderr'):
            assert math.isfinite(v), (arm, seed, k, v)


def test_demo_smoke_study_headlr_arm_follows_cfgrpos_head_lr_and_trains_the_backbone(smoke_study):
  run_dir, _ = smoke_study
  for seed in SMOKE_SEEDS:
    cf, hl, plain = (records_of(run_dir, arm, seed, 'train') for arm in ('cfgrpo', 'grpo_headlr', 'grpo'))
    assert [r['lr_head'] for r in hl] == [r['lr_head'] for r in cf]
    # Step 1 is CF-GRPO's stage one: its larger head lr, which plain GRPO's head does not get.
    assert cf[0]['lr_head'] > plain[0]['lr_head'] and cf[0]['lr_backbone'] == 0.0
    assert all(r['lr_backbone'] > 0.0 for r in hl), [r['lr_backbone'] for r in hl]
    assert [r['stage'] for r in hl] == [0, 0, 0] and [r['stage'] for r in cf] == [1, 2, 2]


def test_demo_smoke_study_report_has_a_paired_interval_per_designed_comparison(smoke_study):
  from cfrl_jax.analysis import report_markdown, report_numbers, report_runs
  run_dir, _ = smoke_study
  nums = report_numbers.summarize(report_runs.load_study(run_dir))
  report = open(os.path.join(run_dir, 'report.md')).read()
  for treatment, control in DESIGNED:
    results = {r.metric: r for r in nums.paired
               if (r.comparison.treatment, r.comparison.control) == (treatment, control)}
    assert {'auc', 'final'} <= set(results), (treatment, control, sorted(results))
    for metric, r in results.items():
      assert r.interval.n == 2 and r.interval.low <= r.interval.mean <= r.interval.high, (treatment, control, metric)
      digits = 1 if metric == 'steps' else 3
      row = (f'| {report_runs.arm_label(treatment)} − {report_runs.arm_label(control)} | {r.comparison.isolates} '
             f'| {report_markdown.PAIRED_METRICS[metric]} | 2')
      assert row in report and r.interval.text(digits) in report, (row, r.interval.text(digits))
    # The final pass@1 interval by hand: per-seed last evals, t(0.975, 1) = 12.706205 for two seeds.
    final = {arm: [records_of(run_dir, arm, seed, 'eval')[-1]['pass@1'] for seed in SMOKE_SEEDS]
             for arm in (treatment, control)}
    d = np.subtract(final[treatment], final[control])
    half = 12.706205 * np.std(d, ddof=1) / np.sqrt(2)
    np.testing.assert_allclose([results['final'].interval.low, results['final'].interval.high],
                               [d.mean() - half, d.mean() + half], rtol=1e-9, atol=1e-12)
