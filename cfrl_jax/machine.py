"""The machine this process runs on, in words, for the figures that depend on it (bench/RESULTS.md,
the README's results block).

    describe() -> 'x86_64, 2 cores, AMD EPYC 7B13'   (architecture, os.cpu_count(), the CPU's model name)
"""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else what platform.processor() says."""
  try:
    with open('/proc/cpuinfo') as f:
      return next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or 'unknown CPU'


def describe() -> str:
  return f'{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}'
