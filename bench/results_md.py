"""What every bench script shares: a description of the host, and its section of bench/RESULTS.md."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # scripts run from bench/
# host() -> 'x86_64, 2 cores, <CPU model>': the machine a figure was measured on (the README's results
# block describes its machine with the same function).
from cfrl_jax.machine import describe as host  # noqa: E402,F401

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'RESULTS.md')
HEADER = '# Benchmarks\n\nWritten by the scripts in bench/; do not edit figures by hand.\n'


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
