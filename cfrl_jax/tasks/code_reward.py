"""Answers of program-format completions (TinyGSM / OpenMathInstruct-1 style), run out of process.

    runner = CodeRunner(timeout_s=2.0, memory_mb=512)
    runner.answer('def solution():\\n    return 7 + 5 - 3')   -> '9'
    runner.answers([...])                                    -> list of str | None (in parallel)

Off by default (config.task.answer.execute_code). Model output is never evaluated in this
process: each program runs in a fresh `python -I -B` subprocess which, before reading the
program, limits itself (resource.setrlimit: CPU seconds, address space, file size 0, no
core dumps, few file descriptors, no new processes), moves into new user and network
namespaces when the kernel allows it (then no network interface is up), and installs an
audit hook that refuses sockets, subprocesses, exec/fork, ctypes and file writes. The parent
kills the process group at the wall-clock limit. This is best-effort isolation for the
outputs of a model under training, not a security boundary against adversarial code: run
the whole job in a container when that matters.

The answer of a program is the return value of the function it names (config
`function_name`), or of the last zero-argument function it defines; a program without one
(OpenMathInstruct-1 style) answers with the last non-empty line it prints.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
from typing import NamedTuple, Sequence

_FENCED_RE = re.compile(r'```(?:python|py)?[ \t]*\n([\s\S]*?)```')
_LLM_CODE_RE = re.compile(r'<llm-code>([\s\S]*?)</llm-code>')
_DEF_RE = re.compile(r'(?m)^def [A-Za-z_]')

# Runs inside the child. Reads {'code', 'function', 'limits', 'nonce'} as JSON on stdin.
_RUNNER = r'''
import ctypes, io, json, os, resource, sys
req = json.loads(sys.stdin.read())
lim = req['limits']
for name, value in (('RLIMIT_CPU', lim['cpu_s']), ('RLIMIT_AS', lim['memory_bytes']),
                    ('RLIMIT_FSIZE', 0), ('RLIMIT_CORE', 0), ('RLIMIT_NOFILE', 64),
                    ('RLIMIT_NPROC', 0)):
  try:
    resource.setrlimit(getattr(resource, name), (value, value))
  except (ValueError, OSError):
    pass
net_isolated = False
try:
  libc = ctypes.CDLL(None, use_errno=True)
  net_isolated = libc.unshare(0x10000000 | 0x40000000) == 0   # CLONE_NEWUSER | CLONE_NEWNET
except Exception:
  pass
_BLOCKED = ('socket.', 'subprocess.', 'os.exec', 'os.spawn', 'os.posix_spawn', 'os.fork',
            'os.forkpty', 'os.system', 'os.kill', 'os.killpg', 'ctypes.', 'os.remove', 'os.rename',
            'os.rmdir', 'os.unlink', 'os.mkdir', 'os.chmod', 'os.chown', 'os.truncate', 'shutil.',
            'os.symlink', 'os.link', 'os.putenv', 'os.unsetenv', 'pty.', 'urllib.', 'http.', 'ftplib.',
            'smtplib.', 'webbrowser.', 'sys.addaudithook', 'signal.')
def _hook(event, args):
  if event.startswith(_BLOCKED):
    raise PermissionError(f'blocked in the code sandbox: {event}')
  if event == 'open' and len(args) > 2:
    mode, flags = args[1], args[2]
    writes = (isinstance(mode, str) and any(c in mode for c in 'wax+')) or (
        isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
    if writes:
      raise PermissionError('blocked in the code sandbox: opening files for writing')
out = sys.stdout
sys.addaudithook(_hook)
captured = io.StringIO()
sys.stdout = captured
result = {'net_isolated': net_isolated}
try:
  namespace = {'__name__': '__sandbox__'}
  exec(compile(req['code'], '<completion>', 'exec'), namespace)
  fn = namespace.get(req['function']) if req['function'] else None
  if fn is None and not req['function']:
    zero_arg = [v for v in namespace.values() if callable(v) and getattr(v, '__code__', None) is not None
                and v.__code__.co_argcount == 0 and not v.__code__.co_kwonlyargcount]
    fn = zero_arg[-1] if zero_arg else None
  if fn is not None:
    value = fn()
    result['answer'] = str(value)[:200]
  elif req['function']:
    result['error'] = f"the program defines no function {req['function']!r}"
  else:
    lines = [l.strip() for l in captured.getvalue().splitlines() if l.strip()]
    if lines:
      result['answer'] = lines[-1][:200]
    else:
      result['error'] = 'the program defines no zero-argument function and prints nothing'
except BaseException as e:
  result['error'] = f'{type(e).__name__}: {str(e)[:200]}'
sys.stdout = out
out.write('\n' + req['nonce'] + json.dumps(result) + '\n')
out.flush()
'''


class CodeResult(NamedTuple):
  answer: str | None      # str(return value) or last printed line; None on failure
  error: str | None       # why there is no answer (exception, time limit, ...)
  net_isolated: bool      # whether the child ran in its own network namespace


def extract_code(completion: str) -> str | None:
  """The program in a completion: an <llm-code> block, a ```python fence, or the text from
  the first top-level `def` on; None if there is none."""
  for pattern in (_LLM_CODE_RE, _FENCED_RE):
    blocks = pattern.findall(completion)
    if blocks:
      return '\n'.join(blocks)
  m = _DEF_RE.search(completion)
  return completion[m.start():] if m else None


class CodeRunner:
  """Runs programs in isolated subprocesses; see the module docstring for the limits."""

  def __init__(self, timeout_s: float = 2.0, memory_mb: int = 512, function_name: str = '',
               max_workers: int | None = None):
    if timeout_s <= 0 or memory_mb < 64:
      raise ValueError(f'timeout_s={timeout_s} must be > 0 and memory_mb={memory_mb} >= 64 '
                       '(the interpreter itself needs ~30 MB).')
    self.timeout_s = float(timeout_s)
    self.memory_mb = int(memory_mb)
    self.function_name = function_name
    self.max_workers = max_workers or min(8, os.cpu_count() or 1)

  def run(self, code: str) -> CodeResult:
    """Runs one program and returns its answer or the reason it has none."""
    nonce = secrets.token_hex(16)
    request = json.dumps({
        'code': code, 'function': self.function_name, 'nonce': nonce,
        'limits': {'cpu_s': int(self.timeout_s) + 1, 'memory_bytes': self.memory_mb * 2**20}})
    with tempfile.TemporaryDirectory(prefix='cfrl_code_') as cwd:
      proc = subprocess.Popen(
          [sys.executable, '-I', '-B', '-c', _RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
          stderr=subprocess.DEVNULL, cwd=cwd, env={'PATH': '/usr/bin:/bin', 'LC_ALL': 'C.UTF-8'},
          start_new_session=True, text=True, encoding='utf-8', errors='replace')
      try:
        stdout, _ = proc.communicate(request, timeout=self.timeout_s)
      except subprocess.TimeoutExpired:
        _kill_group(proc)
        return CodeResult(None, f'time limit of {self.timeout_s}s exceeded', False)
    marker = stdout.rfind(nonce)
    if marker < 0:
      return CodeResult(None, f'the program ended without a result (exit status {proc.returncode}; '
                        'out of memory or CPU time?)', False)
    result = json.loads(stdout[marker + len(nonce):].splitlines()[0])
    return CodeResult(result.get('answer'), result.get('error'), result['net_isolated'])

  def answer(self, code: str) -> str | None:
    return self.run(code).answer

  def answers(self, codes: Sequence[str | None]) -> list[str | None]:
    """The answer of each program (None entries stay None), several subprocesses at a time."""
    todo = [i for i, c in enumerate(codes) if c is not None]
    out: list[str | None] = [None] * len(codes)
    with concurrent.futures.ThreadPoolExecutor(self.max_workers) as pool:
      for i, ans in zip(todo, pool.map(self.answer, [codes[i] for i in todo])):
        out[i] = ans
    return out


def _kill_group(proc: subprocess.Popen):
  try:
    os.killpg(proc.pid, 9)
  except ProcessLookupError:
    pass
  proc.wait()
