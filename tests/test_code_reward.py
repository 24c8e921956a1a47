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
