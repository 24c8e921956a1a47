"""MATH-style answer equivalence through math-verify, with time limits that work in any thread.

    verifier = MathVerifier(timeout_s=5)
    verifier(r'... so the answer is $\\boxed{\\dfrac{14}{3}}$.', r'\\frac{14}{3}')   -> True
    verifier.close()

math-verify (parse / verify) turns LaTeX into sympy and compares symbolically and
numerically; sympy can take unbounded time on inputs such as '9^{9^{9^{9}}}', so every
call needs a time limit. math-verify's own limit is signal.alarm, which Python allows
only in the main thread of the main interpreter. Hence two backends:

    'in_process'  parse / verify here with math-verify's alarm-based limits (main thread only)
    'subprocess'  a persistent worker process (python -c ..., its own main thread) runs them
                  with the same limits, and the caller also enforces a wall-clock limit: a
                  worker that overruns it is killed and restarted, and that answer counts as
                  not equivalent
    'auto'        (default) 'in_process' in the main thread, 'subprocess' elsewhere

math-verify only parses text into sympy objects; it never executes the text.
"""
from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading

from cfrl_jax.tasks import answers

BACKENDS = ('auto', 'in_process', 'subprocess')
_STARTUP_LIMIT_S = 120.0  # importing sympy on a loaded 2-core machine can take tens of seconds

log = logging.getLogger(__name__)


def verify_in_process(completion: str, reference: str, timeout_s: int) -> bool:
  """math-verify on (completion, reference) in this thread, which must be the main thread.

  The reference is a bare LaTeX answer ('\\frac{14}{3}'); it is parsed as '$reference$'.
  A reference that math-verify cannot parse falls back to comparing the completion's last
  \\boxed{} content with it as normalised strings.
  """
  import math_verify  # pylint: disable=import-outside-toplevel
  timeout_s = max(1, int(timeout_s))
  gold = math_verify.parse(f'${reference}$', parsing_timeout=timeout_s)
  if not gold:
    return answers.answers_match(answers.extract_boxed(completion), reference)
  pred = math_verify.parse(completion, parsing_timeout=timeout_s)
  if not pred:
    return False
  return bool(math_verify.verify(gold, pred, timeout_seconds=timeout_s))


def worker_main():
  """The subprocess backend's loop: one JSON request per stdin line, one JSON reply per stdout line."""
  logging.basicConfig(level=logging.ERROR)
  out = sys.stdout
  sys.stdout = sys.stderr  # anything sympy or math-verify might print must not reach the protocol
  out.write(json.dumps({'ready': True}) + '\n')
  out.flush()
  for line in sys.stdin:
    try:
      req = json.loads(line)
      reply = {'equal': verify_in_process(req['completion'], req['reference'], req['timeout_s'])}
    except Exception as e:  # pylint: disable=broad-except
      reply = {'error': f'{type(e).__name__}: {e}'}
    out.write(json.dumps(reply) + '\n')
    out.flush()


class MathVerifier:
  """Callable (completion, reference) -> bool, equivalence by math-verify with time limits.

  Attributes `timeouts` and `worker_restarts` count calls that hit the wall-clock limit.
  Safe to call from several threads (the worker serves one request at a time).
  """

  def __init__(self, timeout_s: int = 5, backend: str = 'auto'):
    if backend not in BACKENDS:
      raise ValueError(f'backend={backend!r}; expected one of {BACKENDS}.')
    if int(timeout_s) < 1:
      raise ValueError(f'timeout_s={timeout_s}; math-verify limits are whole seconds >= 1.')
    self.timeout_s = int(timeout_s)
    self.backend = backend
    self.timeouts = 0
    self.worker_restarts = 0
    self._worker: subprocess.Popen | None = None
    self._lock = threading.Lock()

  def __call__(self, completion: str, reference: str) -> bool:
    if not isinstance(completion, str) or not isinstance(reference, str):
      raise TypeError(f'MathVerifier takes two strings, got {type(completion).__name__} and '
                      f'{type(reference).__name__}.')
    in_main = threading.current_thread() is threading.main_thread()
    if self.backend == 'in_process' or (self.backend == 'auto' and in_main):
      if not in_main:
        raise RuntimeError(
            "MathVerifier(backend='in_process') was called outside the main thread; math-verify's "
            "signal-based time limits only work there. Use backend='auto' or 'subprocess'.")
      return verify_in_process(completion, reference, self.timeout_s)
    return self._verify_in_worker(completion, reference)

  # --- the subprocess backend ---------------------------------------------------
  def _start_worker(self) -> subprocess.Popen:
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env['PYTHONPATH'] = package_root + os.pathsep + env.get('PYTHONPATH', '')
    proc = subprocess.Popen(
        [sys.executable, '-c', 'from cfrl_jax.tasks.math_equivalence import worker_main; worker_main()'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, encoding='utf-8',
        errors='replace', bufsize=1)
    if self._read_reply(proc, _STARTUP_LIMIT_S) != {'ready': True}:
      self._kill(proc)
      raise RuntimeError('the math-verify worker process did not start (see its stderr above).')
    return proc

  @staticmethod
  def _read_reply(proc: subprocess.Popen, limit_s: float) -> dict | None:
    ready, _, _ = select.select([proc.stdout], [], [], limit_s)
    if not ready:
      return None
    line = proc.stdout.readline()
    try:
      reply = json.loads(line) if line else None
    except json.JSONDecodeError:
      return None
    return reply if isinstance(reply, dict) else None

  @staticmethod
  def _kill(proc: subprocess.Popen):
    proc.kill()
    proc.wait()

  def _verify_in_worker(self, completion: str, reference: str) -> bool:
    with self._lock:
      if self._worker is None or self._worker.poll() is not None:
        self._worker = self._start_worker()
      request = {'completion': completion, 'reference': reference, 'timeout_s': self.timeout_s}
      try:
        self._worker.stdin.write(json.dumps(request) + '\n')
        self._worker.stdin.flush()
      except BrokenPipeError:
        reply = None
      else:
        # Two parses and a comparison, each limited to timeout_s inside the worker, plus slack.
        reply = self._read_reply(self._worker, 3 * self.timeout_s + 2.0)
      if reply is None:
        self.timeouts += 1
        self.worker_restarts += 1
        self._kill(self._worker)
        self._worker = None
        log.warning('math-verify worker gave no valid answer within %ds (%d times so far); killed it '
                    'and counted the answer as wrong.', 3 * self.timeout_s + 2, self.timeouts)
        return False
      if 'error' in reply:
        raise RuntimeError(f'math-verify failed inside the worker: {reply["error"]}')
      return bool(reply['equal'])

  def close(self):
    """Stops the worker process, if one was started."""
    with self._lock:
      if self._worker is not None:
        self._worker.stdin.close()
        self._kill(self._worker)
        self._worker = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass

  def __getstate__(self):
    raise TypeError('MathVerifier holds a worker process and cannot be pickled; build one per process.')
