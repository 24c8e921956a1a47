"""math-verify equivalence with time limits in and out of the main thread (tasks/math_equivalence.py)."""
import threading
import time

from hypothesis import given, settings, strategies as st
import pytest

from cfrl_jax.tasks.math_equivalence import MathVerifier

CASES = [
    # (completion, reference, equivalent)
    (r'so the answer is $\boxed{\dfrac{14}{3}}$.', r'\frac{14}{3}', True),
    (r'$\boxed{\left(3, \frac{\pi}{2}\right)}$', r'(3, \frac{\pi}{2})', True),
    (r'The answer is $\sqrt{2}/2$', r'\frac{\sqrt{2}}{2}', True),
    (r'\boxed{x(x+2)}', r'x^2+2x', True),
    (r'\boxed{0.5}', r'\frac{1}{2}', True),
    (r'\boxed{\text{(C)}}', r'\text{(C)}', True),
    (r'\boxed{3}', r'4', False),
    (r'\boxed{x^2}', r'x^3', False),
    (r'\boxed{(1, 2)}', r'(2, 1)', False),
    ('no answer at all', r'\frac{14}{3}', False),
]


@pytest.fixture(scope='module')
def verifier():
  v = MathVerifier(timeout_s=2)
  yield v
  v.close()


@pytest.mark.parametrize('completion,reference,equal', CASES)
def test_main_thread_equivalence(verifier, completion, reference, equal):
  assert verifier(completion, reference) is equal


def _in_thread(fn):
  out = {}
  def run():
    try:
      out['value'] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      out['error'] = e
  t = threading.Thread(target=run)
  t.start()
  t.join(120)
  return out


def test_other_threads_use_the_worker_process_and_agree(verifier):
  out = _in_thread(lambda: [verifier(c, r) for c, r, _ in CASES])
  assert out.get('value') == [e for _, _, e in CASES], out
  assert verifier._worker is not None  # pylint: disable=protected-access


def test_pathological_inputs_are_cut_off_in_both_backends(verifier):
  slow = r'\boxed{9^{9^{9^{9}}}}'
  start = time.perf_counter()
  assert verifier(slow, '5') is False
  assert time.perf_counter() - start < 3 * verifier.timeout_s + 2
  start = time.perf_counter()
  out = _in_thread(lambda: verifier(slow, '5'))
  assert out.get('value') is False, out
  assert time.perf_counter() - start < 3 * verifier.timeout_s + 4


def test_in_process_backend_refuses_other_threads():
  v = MathVerifier(timeout_s=1, backend='in_process')
  out = _in_thread(lambda: v(r'\boxed{1}', '1'))
  assert isinstance(out.get('error'), RuntimeError)
  assert 'main thread' in str(out['error'])


def test_hung_worker_is_killed_and_restarted():
  v = MathVerifier(timeout_s=1, backend='subprocess')
  try:
    assert v(r'\boxed{1}', '1') is True
    v._worker.send_signal(19)  # SIGSTOP: the worker stops answering  # pylint: disable=protected-access
    start = time.perf_counter()
    assert v(r'\boxed{2}', '2') is False
    assert time.perf_counter() - start < 3 * v.timeout_s + 4
    assert v.timeouts == 1
    assert v(r'\boxed{2}', '2') is True  # a fresh worker
  finally:
    v.close()


def test_bad_arguments():
  with pytest.raises(ValueError, match='backend'):
    MathVerifier(backend='threads')
  with pytest.raises(ValueError, match='whole seconds'):
    MathVerifier(timeout_s=0)
  with pytest.raises(TypeError, match='two strings'):
    MathVerifier()(None, '1')


_IN_PROCESS = MathVerifier(timeout_s=1, backend='in_process')  # no worker process to clean up
_LATEX = st.lists(st.sampled_from(list('0123456789xy+-*/^_()[]{}$., ') + [
    '\\boxed{', '\\frac{', '\\sqrt{', '\\pi', '\\infty', '\\left(', '\\right)', '\\text{', '=', '\\le ']),
    max_size=40).map(''.join)


@settings(max_examples=25, deadline=None)
@given(st.one_of(_LATEX, st.text(max_size=60)), st.one_of(_LATEX, st.sampled_from(['1', '\\frac{1}{2}', 'x'])))
def test_arbitrary_text_gives_a_bool_in_bounded_time(completion, reference):
  verifier = _IN_PROCESS
  start = time.perf_counter()
  assert verifier(completion, reference) in (True, False)
  assert time.perf_counter() - start < 3 * verifier.timeout_s + 1

