"""cfrl_jax/machine.py: the machine description bench/RESULTS.md and the README's results block share."""
from __future__ import annotations

import builtins
import os
import pathlib
import platform
import subprocess
import sys

from cfrl_jax import machine

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_describe_names_architecture_cpu_count_and_model(tmp_path, monkeypatch):
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text('processor\t: 0\nvendor_id\t: Acme\nmodel name\t: Acme Z9 @ 3.00GHz\nflags\t\t: fpu\n')
  real_open = builtins.open
  monkeypatch.setattr(builtins, 'open', lambda f, *a, **k: real_open(cpuinfo if f == '/proc/cpuinfo' else f, *a, **k))
  assert machine.describe() == f'{platform.machine()}, {os.cpu_count()} cores, Acme Z9 @ 3.00GHz'


def test_cpu_model_without_proc_cpuinfo(monkeypatch):
  def no_file(*args, **kwargs):
    raise OSError('no /proc here')
  monkeypatch.setattr(builtins, 'open', no_file)
  assert machine.cpu_model() == (platform.processor() or 'unknown CPU')


def test_bench_scripts_describe_the_machine_with_it(tmp_path):
  # bench/results_md.py runs as a file from bench/ (no install): it must find cfrl_jax on its own.
  code = f'import sys; sys.path.insert(0, {str(ROOT / "bench")!r}); import results_md; print(results_md.host())'
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == machine.describe()
