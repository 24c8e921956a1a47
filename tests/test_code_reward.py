"""Program-format answers run out of process with limits (cfrl_jax/tasks/code_reward.py)."""
import os
import time

from hypothesis import given, settings, strategies as st
import pytest

from cfrl_jax.tasks.code_reward import CodeRunner, extract_code


@pytest.fixture(scope='module')
def runner():
  return CodeRunner(timeout_s=2.0, memory_mb=256)


@pytest.mark.parametrize('code,answer', [
    ('def solution():\n    a = 7 + 5\n    return a - 3', '9'),
    ('def simple_math_problem() -> int:\n    """Ann has 7 apples."""\n    return 7 * 2\n', '14'),
    ('def helper(x):\n    return x + 1\ndef solution():\n    return helper(4) / 2', '2.5'),
    ('x = 3\nprint("thinking")\nprint(x + 4)', '7'),                       # OpenMathInstruct-1 style
    ('print("{\\"answer\\": \\"5\\"}")\ndef solution():\n    return 2', '2'),  # printed fakes do not count
])
def test_answers_of_programs(runner, code, answer):
  result = runner.run(code)
  assert result.answer == answer, result


@pytest.mark.parametrize('code,reason', [
    ('def solution():\n    return 1/0', 'ZeroDivisionError'),
    ('import sys\nsys.exit(3)', 'SystemExit'),
    ('def solution():\n    a = bytearray(10**9)\n    return 1', 'MemoryError'),
    ('import socket\ndef solution():\n    return socket.socket()', 'blocked'),
    ('import os\ndef solution():\n    return os.system("true")', 'blocked'),
    ('import subprocess\ndef solution():\n    return subprocess.run(["true"])', 'blocked'),
    ('import os\ndef solution():\n    return os.fork()', 'blocked'),
    ('def solution(:\n', 'SyntaxError'),
    ('x = 1', 'prints nothing'),
])
def test_failures_give_no_answer_and_a_reason(runner, code, reason):
  result = runner.run(code)
  assert result.answer is None
  assert reason in result.error, result


def test_no_file_writes(runner, tmp_path):
  target = tmp_path / 'written_by_sandbox'
  for code in (f'def solution():\n    open({str(target)!r}, "w").write("x")\n    return 1',
               f'import os\ndef solution():\n    os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)\n    return 1'):
    result = runner.run(code)
    assert result.answer is None and 'blocked' in result.error
  assert not target.exists()


def test_time_limit_kills_the_process(runner):
  start = time.perf_counter()
  result = runner.run('def solution():\n    while True:\n        pass')
  assert result.answer is None and 'time limit' in result.error
  assert time.perf_counter() - start < runner.timeout_s + 2


def test_network_namespace_when_available(runner):
  result = runner.run('def solution():\n    return 1')
  assert result.answer == '1'
  if not result.net_isolated:
    pytest.skip('this kernel refuses unprivileged network namespaces; the audit hook still blocks sockets')
  # In its own network namespace the child has no interface but the loopback device.
  result = runner.run('def solution():\n    lines = open("/proc/net/dev").read().splitlines()[2:]\n'
                      '    return [l.split(":")[0].strip() for l in lines]')
  assert result.answer == "['lo']", result


def test_batch_in_parallel_keeps_order(runner):
  codes = [f'def solution():\n    return {i} * 2' for i in range(6)] + [None]
  assert runner.answers(codes) == [str(2 * i) for i in range(6)] + [None]


@pytest.mark.parametrize('completion,code', [
    ('Let me code.\n```python\ndef solution():\n    return 2\n```\nDone.', 'def solution():\n    return 2\n'),
    ('<llm-code>\nprint(2)\n</llm-code>\n<llm-code-output>\n2\n</llm-code-output>', '\nprint(2)\n'),
    ('Reasoning...\ndef solution():\n    return 3', 'def solution():\n    return 3'),
    ('The answer is 3.', None),
])
def test_extract_code(completion, code):
  assert extract_code(completion) == code


def test_this_process_is_untouched(runner):
  before = dict(os.environ)
  runner.run('import os\nos.environ["X"] = "1"\ndef solution():\n    return 1')
  assert dict(os.environ) == before


def test_bad_limits():
  with pytest.raises(ValueError, match='memory_mb'):
    CodeRunner(memory_mb=1)
  with pytest.raises(ValueError, match='timeout_s'):
    CodeRunner(timeout_s=0)


@settings(max_examples=200, deadline=500)
@given(st.lists(st.sampled_from(['def ', 'solution', '():', '\n', '    ', 'return 1', '```python\n', '```',
                                 '<llm-code>', '</llm-code>', 'x', ' ']), max_size=60).map(''.join))
def test_extract_code_on_arbitrary_text(text):
  code = extract_code(text)
  assert code is None or isinstance(code, str)


# --- The sandbox against a hostile program (issue 26, item 2) ---------------------------------
# Each program first disables the checks of the old runner (which read `_BLOCKED` and `isinstance`
# from globals the program could rebind), then tries to damage a canary file or leave a process.

_DISARM = ('import builtins, sys\n'
           'sys.modules["__main__"]._BLOCKED = ("x",)\n'
           'builtins.isinstance = lambda *a: False\n'
           'builtins.PermissionError = ArithmeticError\n')


@pytest.fixture
def canary(tmp_path):
  path = tmp_path / 'canary.txt'
  path.write_text('precious')
  return path


def _untouched(path):
  return path.exists() and path.read_text() == 'precious'


def _without_hook(runner):
  unhooked = CodeRunner(timeout_s=runner.timeout_s, memory_mb=runner.memory_mb)
  unhooked._audit_hook = False
  return unhooked


_ATTACKS = {
    'remove': 'import os\nos.remove({path!r})',
    'remove_rebound_type': 'import builtins, os\nbuiltins.type = builtins.str = builtins.len = None\nos.remove({path!r})',
    'unlink': 'import os\nos.unlink({path!r})',
    'rename': 'import os\nos.rename({path!r}, {path!r} + ".moved")',
    'open_w': 'open({path!r}, "w").close()',
    'open_a': 'open({path!r}, "a").write("x")',
    'os_open_trunc': 'import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_TRUNC))',
    'truncate': 'import os\nos.truncate({path!r}, 0)',
    'chmod': 'import os\nos.chmod({path!r}, 0)',
    'pathlib': 'import pathlib\np = pathlib.Path({path!r})\n{disarm}p.open("w").close()',   # Path() needs isinstance
    'shutil': 'import shutil\nshutil.rmtree({dir!r})',
}


@pytest.mark.parametrize('attack', sorted(_ATTACKS))
def test_rebinding_globals_and_builtins_does_not_open_the_hook(runner, canary, attack):
  attack = _ATTACKS[attack]
  code = ('' if '{disarm}' in attack else _DISARM) + attack.format(
      path=str(canary), dir=str(canary.parent), disarm=_DISARM) + '\nprint("done")'
  result = runner.run(code)
  assert result.answer is None, result
  # The audit hook refused it (its message), before the kernel layers were even asked.
  assert 'blocked in the code sandbox' in result.error, result
  assert _untouched(canary) and os.stat(canary).st_mode & 0o777 != 0


@pytest.mark.parametrize('attack', sorted(_ATTACKS))
def test_kernel_layers_hold_without_the_hook(runner, canary, attack):
  unhooked = _without_hook(runner)
  probe = unhooked.run('def solution():\n    return 1')
  if not any(l.startswith(('landlock', 'uid')) for l in probe.layers):
    pytest.skip(f'neither Landlock nor a root-to-uid drop here (layers {probe.layers})')
  result = unhooked.run(_ATTACKS[attack].format(path=str(canary), dir=str(canary.parent), disarm='') + '\nprint("done")')
  assert result.answer is None and 'PermissionError' in result.error, result   # EACCES or EPERM
  assert _untouched(canary) and os.stat(canary).st_mode & 0o777 != 0


def _marker_processes(marker):
  found = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        if marker.encode() in f.read():
          found.append(int(pid))
    except OSError:
      pass
  return found


def _spawn_attempts(marker):
  """A program that tries every way to leave `sleep <marker>` running in its own session."""
  return 'import os, subprocess\n' + _DISARM + f'''
ok = []
def attempt(name, fn):
  try:
    fn()
    ok.append(name)
  except BaseException as e:
    pass
def fork_setsid(unused=None):   # not zero-argument, or the runner would call it for the answer
  if os.fork() == 0:
    os.setsid()
    os.execv('/bin/sleep', ['sleep', {marker!r}])
attempt('fork', fork_setsid)
attempt('popen', lambda: subprocess.Popen(['sleep', {marker!r}], start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
attempt('spawn', lambda: os.posix_spawn('/bin/sleep', ['sleep', {marker!r}], {{}}, setsid=True))
attempt('system', lambda: 1 / (os.system('setsid sleep {marker} >/dev/null 2>&1 &') == 0))
print('started: ' + ','.join(ok))
'''


@pytest.mark.parametrize('hooked', [True, False])
def test_no_process_outlives_the_program(runner, hooked):
  marker = f'{40 + int.from_bytes(os.urandom(3), "big") / 2**24:.7f}'   # a unique `sleep` argument
  try:
    result = (runner if hooked else _without_hook(runner)).run(_spawn_attempts(marker))
    time.sleep(0.2)
    assert _marker_processes(marker) == [], result
    assert result.answer == 'started:', result        # every attempt failed
  finally:
    for pid in _marker_processes(marker):
      os.kill(pid, 9)


def test_sweep_kills_a_grandchild_that_left_the_session():
  from cfrl_jax.tasks import code_reward
  marker = f'{50 + int.from_bytes(os.urandom(3), "big") / 2**24:.7f}'
  script = ('import os, time\n'
            f'if os.fork() == 0:\n    os.setsid()\n    os.execv("/bin/sleep", ["sleep", {marker!r}])\n'
            'time.sleep(30)\n')
  import subprocess, sys
  proc = subprocess.Popen([sys.executable, '-c', script], start_new_session=True)
  try:
    for _ in range(200):
      if _marker_processes(marker):
        break
      time.sleep(0.01)
    assert _marker_processes(marker), 'the test could not start its grandchild'
    code_reward._kill_everything(proc, None)
    time.sleep(0.1)
    assert _marker_processes(marker) == []
    assert proc.returncode == -9
  finally:
    for pid in _marker_processes(marker):
      os.kill(pid, 9)


def test_sweep_kills_every_process_of_the_run_uid():
  if os.geteuid() != 0:
    pytest.skip('only a root parent gives each run its own uid')
  from cfrl_jax.tasks import code_reward
  import subprocess, sys
  first, count = code_reward._unprivileged_id_range()
  uid = first + count - 1
  marker = f'{60 + int.from_bytes(os.urandom(3), "big") / 2**24:.7f}'
  proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'], start_new_session=True)
  # Orphaned, in its own session, unrelated by ancestry: found only by its uid.
  stray = subprocess.Popen(['/bin/sleep', marker], user=uid, group=uid, extra_groups=[], start_new_session=True)
  try:
    code_reward._kill_everything(proc, uid)
    assert stray.wait(timeout=5) == -9
  finally:
    if stray.poll() is None:
      stray.kill()


def test_program_runs_unprivileged_in_a_fresh_directory(runner, tmp_path):
  result = runner.run('import os\ndef solution():\n    st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())\n'
                      '    return [os.getcwd(), os.listdir("."), st["Uid"].split()[0], int(st["CapEff"], 16)]')
  cwd, listing, uid, cap_eff = eval(result.answer)
  assert os.path.basename(cwd).startswith('cfrl_code_') and listing == []
  assert not os.path.exists(cwd), 'the temporary directory must be removed afterwards'
  if os.geteuid() == 0:
    assert int(uid) != 0 and cap_eff in (0, 1 << 2)      # at most CAP_DAC_READ_SEARCH
    assert any(l.startswith('uid ') for l in result.layers)


def test_output_flood_is_cut_off(runner):
  result = runner.run('import os\nfor _ in range(64):\n    os.write(1, b"x" * 65536)\nprint(1)')
  assert result.answer is None and 'more than 1048576 bytes' in result.error, result


@pytest.mark.parametrize('code', [
    'import signal\nsignal.pidfd_send_signal',
    'import os\nos.mkfifo',
    'import os\nos.mknod',
    'import sys\ndel sys.modules["posix"]\nimport posix',   # a fresh copy would bring them back
    'import cffi',
    'import gc\ngc.get_referrers(1)',
    'import sys\nsys.settrace(None)',
])
def test_unaudited_or_introspecting_routes_are_closed(runner, code):
  result = runner.run(code + '\nprint("open")')
  assert result.answer is None and ('blocked' in result.error or 'AttributeError' in result.error), result


def test_numerical_libraries_still_import():
  # numpy imports ctypes (as sympy does); generous time: the import alone takes a while on a busy CPU.
  result = CodeRunner(timeout_s=20.0, memory_mb=1024).run(
      'import math, fractions, itertools\nimport numpy as np\n'
      'def solution():\n    return int(np.arange(4).sum()) + math.comb(3, 1)')
  if result.error and 'ctypes' in result.error and 'landlock' not in ' '.join(result.layers):
    pytest.skip('without Landlock and a pid namespace ctypes (needed by numpy) is refused')
  assert result.answer == '9', result
