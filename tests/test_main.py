"""The command line: config errors are clear; the embedded demo's smoke variant runs end to end."""
import json
import math
import os
import subprocess
import sys

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


@pytest.mark.slow      # a whole study (pretraining, two arms, evals, probes, report) in a subprocess
def test_demo_smoke_writes_report_plots_and_finite_metrics(tmp_path, smoke_pretrain_cache):
  # The session's smoke base and compilation cache (tests/conftest.py): what other smoke runs of the
  # session built is loaded, not built again.
  run_dir, jit_cache = str(tmp_path / 'run'), os.environ['JAX_COMPILATION_CACHE_DIR']
  p = run_main('--config=configs/demo.py:smoke', f'--config.run_dir={run_dir}',
               f'--config.pretrain.cache_dir={smoke_pretrain_cache}', f'--config.compile_cache_dir={jit_cache}',
               '--config.log.progress=False')
  assert p.returncode == 0, p.stderr[-3000:]
  assert os.path.exists(os.path.join(run_dir, 'report.md'))
  assert 'Report:' in p.stdout
  pngs = [f for f in os.listdir(run_dir) if f.endswith('.png')]
  assert {'accuracy.png', 'confidence.png', 'formats.png'} <= set(pngs), pngs
  study = json.load(open(os.path.join(run_dir, 'study.json')))
  assert study['arms'] == ['grpo', 'cfgrpo']
  for arm in study['arms']:
    path = os.path.join(run_dir, arm, 'seed0', 'metrics.jsonl')
    records = [json.loads(line) for line in open(path)]
    kinds = {r['kind'] for r in records}
    assert {'train', 'eval'} <= kinds, kinds
    for r in records:
      for k, v in r.items():
        if isinstance(v, float) and not k.startswith('pass@1_stderr'):
          assert math.isfinite(v), (arm, k, v)
