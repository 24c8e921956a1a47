"""Format detectors (cfrl_jax/tasks/formats.py)."""
from hypothesis import given, settings, strategies as st
import pytest

from cfrl_jax.tasks import arithmetic, formats, task_config
from cfrl_jax.tasks.formats import FormatDetector


@pytest.fixture(scope='module')
def detector():
  return FormatDetector(formats.ARITHMETIC_PATTERNS, formats.ARITHMETIC_ORDER)


@pytest.mark.parametrize('max_ops,seed', [(3, 0), (1, 1), (6, 2)])
def test_detector_is_exact_on_generated_solutions(detector, max_ops, seed):
  config = task_config('arithmetic')
  config.max_ops, config.seed = max_ops, seed
  config.answer_max = 200 if max_ops > 3 else 99
  rows = arithmetic.generate_rows(config, 'train', 300, 'train')
  labels = [(detector(text), fmt) for r in rows for fmt, text in r['solutions'].items()]
  assert len(labels) == 900
  assert all(got == want for got, want in labels)


@pytest.mark.parametrize('text,label', [
    (' 7 + 5 = 12. 12 - 3 = 9. The answer is 9.', 'steps'),
    ('7 + 5 = 12. The answer is 12.\n', 'steps'),          # whitespace around is allowed
    (' <<7+5=12>><<12-3=9>> #### 9', 'compact'),
    (' #### 9', 'direct'),
    (' #### 9 ', 'direct'),
    # Structure, not substrings: anything extra, missing or mixed is unknown.
    (' The answer is 9.', 'unknown'),                        # steps need at least one step
    (' 7 + 5 = 12. The answer is 12. Question: Ann has', 'unknown'),
    (' 7 + 5 = 12. #### 12', 'unknown'),
    (' <<7+5=12>> The answer is 12.', 'unknown'),
    (' <<7+5=12>>#### 12', 'unknown'),
    (' #### 9 #### 9', 'unknown'),
    (' #### nine', 'unknown'),
    ('I think 9', 'unknown'),
    ('', 'unknown'),
    (' 7 * 5 = 35. The answer is 35.', 'unknown'),
])
def test_detector_table(detector, text, label):
  assert detector(text) == label


@settings(max_examples=200, deadline=500)
@given(st.lists(st.sampled_from(list('0123456789 +-=.<>#') + ['The answer is ', '####', '<<']),
                max_size=100).map(''.join))
def test_detector_total_on_arbitrary_text(detector, text):
  assert detector(text) in detector.names + (formats.UNKNOWN,)


def test_fractions(detector):
  completions = [' #### 1', ' #### 2', ' <<1+1=2>> #### 2', 'junk']
  assert detector.fractions(completions) == {'steps': 0.0, 'compact': 0.25, 'direct': 0.5, 'unknown': 0.25}
  assert detector.classify(completions) == ['direct', 'direct', 'compact', 'unknown']
  with pytest.raises(ValueError, match='empty'):
    detector.fractions([])


def test_order_decides_between_overlapping_formats():
  patterns = {'boxed': r'\\boxed\{', 'any_number': r'[0-9]'}
  text = r'\boxed{3}'
  assert FormatDetector(patterns, ('boxed', 'any_number'))(text) == 'boxed'
  assert FormatDetector(patterns, ('any_number', 'boxed'))(text) == 'any_number'


@pytest.mark.parametrize('text,label', [
    ('def simple_math_problem() -> int:\n    """..."""\n    return 3', 'code'),
    ('Let me write:\ndef solution():\n    return 3', 'code'),
    ('<llm-code>\ndef f():\n    return 3\nprint(f())\n</llm-code>', 'llm_code'),
    ('She has 3 + 4 = 7 apples. The answer is 7.', 'text'),
    ('So $\\boxed{7}$.', 'text'),
    ('... #### 7', 'text'),
    ('undefined behaviour', 'unknown'),                      # 'def' inside a word is not code
    ('<llm-code> never closed', 'unknown'),
])
def test_echo_chamber_detectors(text, label):
  detector = FormatDetector.from_config(task_config('gsm8k').formats)
  assert detector.names == ('llm_code', 'code', 'text')
  assert detector(text) == label


def test_from_config_with_added_format():
  config = task_config('gsm8k')
  config.formats.patterns.latex_only = r'\A\s*\$[^$]*\$\s*\Z'
  config.formats.order = ('latex_only',) + tuple(config.formats.order)
  detector = FormatDetector.from_config(config.formats)
  assert detector(' $x^2$ ') == 'latex_only'


@pytest.mark.parametrize('patterns,order,match', [
    ({'a': 'x'}, ('a', 'b'), 'exactly once'),
    ({'a': 'x', 'b': 'y'}, ('a',), 'exactly once'),
    ({'a': 'x'}, ('a', 'a'), 'exactly once'),
    ({'a': '('}, ('a',), 'not a valid regular expression'),
    ({'unknown': 'x'}, ('unknown',), 'reserved'),
    ({}, (), 'at least one'),
])
def test_bad_detectors(patterns, order, match):
  with pytest.raises(ValueError, match=match):
    FormatDetector(patterns, order)


def test_non_string_completion(detector):
  with pytest.raises(TypeError, match='str'):
    detector(['not', 'a', 'string'])


# --- formats.scheme='substring': Echo Chamber's math_verifier.py labels -------------------------------

LLM_CODE_OK = ("Let's solve this problem using Python code.\n<llm-code>\neggs = 16 - 3 - 4\neggs * 2\n</llm-code>\n"
               "<llm-code-output>\n18\n</llm-code-output>\nThus she earns \\boxed{18} dollars.")
TINYGSM = "\n\ndef simple_math_problem() -> int:\n    eggs = 16 - 3 - 4\n    result = eggs * 2\n    return result\n"


def test_substring_precedence_with_a_stub_runner():
  runs = lambda code: 'boom' not in code
  label = lambda text: formats.substring_format(text, runs)
  assert label(LLM_CODE_OK) == 'llm_code'
  assert label(TINYGSM) == 'code'
  assert label('She makes 9 * 2 = 18 dollars. #### 18') == 'text'
  assert label('no answer at all') == 'text'                       # the catch-all: never 'unknown'
  # 'def' inside a word counts as code, exactly as the original's `'def' in text`
  assert label('The result is undefined, so the answer is 4.') == 'code'
  assert label('By definition she earns 18.') == 'code'
  # <llm-code> whose code does not run: still llm_code ... unless 'def' appears anywhere
  broken = '<llm-code>\nx = 1 +\nboom\n</llm-code>\nThe answer is 3.'
  assert label(broken) == 'llm_code'
  assert label(broken + ' It is undefined.') == 'code'
  # an unclosed block is not run, and is still labelled llm_code
  assert label('<llm-code>\n2 + 2\n') == 'llm_code'
  # a running block wins over 'def' elsewhere
  assert label(LLM_CODE_OK + ' By definition.') == 'llm_code'


def test_substring_detector_interface_and_config():
  d = FormatDetector.from_config({'scheme': 'substring', 'patterns': {}, 'order': ()})
  assert isinstance(d, formats.SubstringFormatDetector) and d.names == ('llm_code', 'code', 'text')
  d = formats.SubstringFormatDetector(code_runs=lambda code: True)
  assert d.fractions([TINYGSM, 'text', LLM_CODE_OK, 'undefined']) == {
      'llm_code': 0.25, 'code': 0.5, 'text': 0.25, 'unknown': 0.0}
  with pytest.raises(ValueError, match='scheme'):
    FormatDetector.from_config({'scheme': 'regex', 'patterns': {}, 'order': ()})


def test_llm_code_runs_in_the_sandbox():
  """The default runner: the original's own llm-code example runs; a block whose last line is a
  statement (eval() fails on it) or that raises does not."""
  assert formats.substring_format(LLM_CODE_OK) == 'llm_code'
  assert formats.substring_format('<llm-code>\nx = 1 / 0\nx\n</llm-code> The answer is 3.') == 'llm_code'
  assert formats.llm_code_runs('eggs = 16 - 3 - 4\neggs * 2')
  assert not formats.llm_code_runs('x = 1 / 0\nx')
  assert not formats.llm_code_runs('x = 3')
