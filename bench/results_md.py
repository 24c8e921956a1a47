"""What every bench script shares: a description of the host, and its section of bench/RESULTS.md."""
from __future__ import annotations

import os
import platform

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'RESULTS.md')
HEADER = '# Benchmarks\n\nWritten by the scripts in bench/; do not edit figures by hand.\n'


def host() -> str:
  """'x86_64, nproc 2, <CPU model>': the machine a figure was measured on."""
  cpu = 'unknown CPU'
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{platform.machine()}, nproc {os.cpu_count()}, {cpu}'


def write_section(name: str, title: str, desc: str, lines: list[str]) -> None:
  """Replaces (or appends) the block between <!-- name --> and <!-- /name --> in RESULTS.md."""
  begin, end = f'<!-- {name} -->', f'<!-- /{name} -->'
  body = '\n'.join([begin, f'## {title}', '', f'Machine: {desc}.', '', *lines, end])
  text = open(RESULTS).read() if os.path.exists(RESULTS) else HEADER
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    text = head + body + rest.split(end, 1)[1]
  else:
    text = text.rstrip('\n') + '\n\n' + body + '\n'
  with open(RESULTS, 'w') as f:
    f.write(text)
  print(f'wrote the {name} section of {RESULTS}')
