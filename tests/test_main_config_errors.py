"""The command line refuses, before any work, what would otherwise run something else than asked."""
import os
import subprocess
import sys

import pytest

from cfrl_jax.main import command_line_problem, load_config_file, override_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, 'configs', 'demo.py')


def run_main(*args):
  return subprocess.run([sys.executable, '-m', 'cfrl_jax.main', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize('algorithm, message', [
    ('foo', "config.rl.algorithm='foo': expected one of"),
    ('ppo', "--config.rl.algorithm is set explicitly, but arm 'grpo'"),
])
def test_an_algorithm_on_the_command_line_is_never_silently_replaced(tmp_path, algorithm, message):
  run_dir = tmp_path / 'x'
  p = run_main('--config=configs/demo.py:smoke', '--config.arms=grpo', '--config.rl.steps=1',
               f'--config.rl.algorithm={algorithm}', f'--config.run_dir={run_dir}',
               f'--config.pretrain.cache_dir={tmp_path / "cache"}')
  assert p.returncode != 0
  assert message in p.stderr
  assert not run_dir.exists() and not (tmp_path / 'cache').exists()   # nothing ran


def test_an_unknown_config_argument_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r'configs/demo.py:smok is not a variant.*configs/demo.py:smoke'):
    load_config_file(DEMO + ':smok')


def test_fields_read_inside_get_config_are_refused_on_the_command_line():
  problem = command_line_problem([f'--config={DEMO}', '--config.smoke=True'])
  assert problem.startswith('--config.smoke cannot be set on the command line')
  assert f'--config={DEMO}:smoke' in problem
  assert command_line_problem([f'--config={DEMO}:smoke', '--config.rl.lr=1e-4']) is None


def test_override_paths_reads_both_flag_forms():
  assert override_paths(['--config=c.py', '--config.rl.lr=1', '--config.arms', 'grpo', '-v']) == ['rl.lr', 'arms']
