"""Answer extraction, normalisation and comparison (cfrl_jax/tasks/answers.py)."""
from fractions import Fraction
import time

from hypothesis import given, settings, strategies as st
import pytest

from cfrl_jax.tasks import answers

EXTRACTION_TABLE = [
    # (text, extractors, kwargs, expected)
    ('7 + 5 = 12. 12 - 3 = 9. The answer is 9.', answers.EXTRACTORS, {}, '9'),
    ('<<7+5=12>><<12-3=9>> #### 9', answers.EXTRACTORS, {}, '9'),
    (' #### 9', answers.EXTRACTORS, {}, '9'),
    ('Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72', answers.EXTRACTORS, {}, '72'),
    ('#### $1,000.00', answers.EXTRACTORS, {}, '$1,000.00'),
    ('####1000', answers.EXTRACTORS, {}, '1000'),
    ('#### 72 apples', answers.EXTRACTORS, {}, '72'),
    ('#### -3/4', answers.EXTRACTORS, {}, '-3/4'),
    ('#### 50%', answers.EXTRACTORS, {}, '50%'),
    ('#### Paris\nmore text', answers.EXTRACTORS, {}, 'Paris'),
    ('#### 1 #### 2', answers.EXTRACTORS, {}, '1'),
    ('#### 1 #### 2', answers.EXTRACTORS, {'occurrence': 'last'}, '2'),
    ('The final answer is: 42 apples.', answers.EXTRACTORS, {}, '42'),
    ('so THE ANSWER IS 3.5.', answers.EXTRACTORS, {}, '3.5'),
    ('The answer is Paris. Then more.', answers.EXTRACTORS, {}, 'Paris'),
    ('the answer is \\boxed{7}', answers.EXTRACTORS, {}, '7'),
    ('The answer is $\\boxed{7}$.', answers.EXTRACTORS, {}, '7'),
    ('The answer is \\(\\boxed{\\frac{1}{2}}\\).', answers.EXTRACTORS, {}, '\\frac{1}{2}'),
    ('#### 1,2345', answers.EXTRACTORS, {}, '1,2345'),                  # broken grouping: not a number
    ('Theanswer is 5', answers.EXTRACTORS, {}, None),                 # no word boundary
    ('the answer isn\'t 5', answers.EXTRACTORS, {}, None),
    ('\\boxed{\\frac{3}{4}}', answers.EXTRACTORS, {}, '\\frac{3}{4}'),
    ('\\boxed{a{b{c}}d}', answers.EXTRACTORS, {}, 'a{b{c}}d'),            # nested braces
    ('\\boxed{1} and then \\boxed{2}', answers.EXTRACTORS, {}, '2'),     # last box by default
    ('\\boxed{1} and then \\boxed{2}', answers.EXTRACTORS, {'boxed_occurrence': 'first'}, '1'),
    ('\\boxed{unclosed {', answers.EXTRACTORS, {}, None),
    # An unclosed final box: cut off inside the answer, so no answer (not the superseded box).
    ('\\boxed{ok} \\boxed{unclosed', answers.EXTRACTORS, {}, None),
    ('\\boxed{ok} \\boxed{unclosed', answers.EXTRACTORS, {'boxed_occurrence': 'first'}, 'ok'),
    ('$\\boxed 5$', answers.EXTRACTORS, {}, '5'),
    ('\\fbox{12}', answers.EXTRACTORS, {}, '12'),
    ('\\boxed{}', answers.EXTRACTORS, {}, None),                         # empty box is no answer
    ('#### 3\n\\boxed{4}', ('boxed', 'hash'), {}, '4'),                   # extractor order counts
    ('I think 3 then 4,000 dogs', answers.EXTRACTORS, {}, None),
    ('I think 3 then 4,000 dogs', answers.EXTRACTORS, {'last_number_fallback': True}, '4,000'),
    ('negative -2.5 end', answers.EXTRACTORS, {'last_number_fallback': True}, '-2.5'),
    ('1,000 and 2,000, then', answers.EXTRACTORS, {'last_number_fallback': True}, '2,000'),
    ('v1.2.3', answers.EXTRACTORS, {'last_number_fallback': True}, '1.2'),
    ('', answers.EXTRACTORS, {'last_number_fallback': True}, None),
    ('The answer is 7', ('hash',), {}, None),                            # extractor not enabled
]


@pytest.mark.parametrize('text,extractors,kwargs,expected', EXTRACTION_TABLE)
def test_extract_answer_table(text, extractors, kwargs, expected):
  assert answers.extract_answer(text, extractors, **kwargs) == expected


NUMBER_TABLE = [
    ('$1,000.00', Fraction(1000)), ('1000', Fraction(1000)), ('1,000', Fraction(1000)),
    ('3/4', Fraction(3, 4)), ('0.75', Fraction(3, 4)), ('\\frac{3}{4}', Fraction(3, 4)),
    ('\\dfrac{3}{4}', Fraction(3, 4)), ('-\\frac{1}{2}', Fraction(-1, 2)), ('50%', Fraction(50)),
    ('50\\%', Fraction(50)), ('12.', Fraction(12)), ('-2.5', Fraction(-5, 2)), ('.5', Fraction(1, 2)),
    ('+7', Fraction(7)), ('\u22127', Fraction(-7)), ('\\$ 5', Fraction(5)), ('€12', Fraction(12)),
    ('\\text{5}', Fraction(5)), (' 42 ', Fraction(42)), ('1/0', None), ('1e5', None), ('2+3', None),
    ('x', None), ('', None), ('1,00', None), ('1,2345', None), ('1/2/3', None), ('9' * 100, None), ('\u0663', None),
]


@pytest.mark.parametrize('text,expected', NUMBER_TABLE)
def test_parse_number_table(text, expected):
  assert answers.parse_number(text) == expected


@pytest.mark.parametrize('a,b,equal', [
    ('$1,000.00', '1000', True), ('3/4', '0.75', True), ('50%', '50', True), ('9.', '9', True),
    ('\\frac{1}{2}', '0.5', True), ('0.333', '1/3', False), ('10', '100', False), ('Paris.', 'paris', True),
    ('Paris', '3', False), (None, '3', False), ('', '', False), ('-0', '0', True),
])
def test_answers_match(a, b, equal):
  assert answers.answers_match(a, b) is equal


@pytest.mark.parametrize('text,canonical', [
    ('$1,000.00', '1000'), ('3/4', '0.75'), ('0.75', '0.75'), ('1/3', '1/3'), ('-0.125', '-0.125'),
    ('-3/4', '-0.75'), ('\\text{Paris}', 'paris'), (None, None), ('2.50', '2.5'), ('7/1', '7'),
])
def test_canonical_answer(text, canonical):
  assert answers.canonical_answer(text) == canonical


def test_canonical_answer_groups_equal_numbers():
  values = ['1000', '$1,000', '1,000.0', '1000.', '\\frac{2000}{2}']
  assert {answers.canonical_answer(v) for v in values} == {'1000'}


# --- unclosed boxes: a cut-off completion has no answer ------------------------------------
@pytest.mark.parametrize('text,occurrence,expected', [
    ('The area is \\boxed{12}. Wait, it is \\boxed{\\frac{3', 'last', None),
    ('The area is \\boxed{12}. Wait, it is \\boxed{\\frac{3', 'first', '12'),
    ('\\boxed{1} then \\boxed{ \\boxed{2}', 'last', None),       # '\\boxed{2}' is inside the cut-off box
    ('\\boxed{ \\boxed{2}', 'first', None),                      # the first box itself is cut off
    ('\\boxed{1} \\boxed{2} \\boxed{', 'first', '1'),
    ('\\boxed{7} and some text after }', 'last', '7'),            # a stray '}' closes nothing
    # Escaped braces are literal: '\\left\\{' does not leave the box open.
    ('\\boxed{1} \\boxed{\\left\\{ x \\right.}', 'last', '\\left\\{ x \\right.'),
    ('\\boxed{\\{1, 2\\}}', 'last', '\\{1, 2\\}'),
    ('\\boxed{a\\\\{b}}', 'last', 'a\\\\{b}'),                    # '\\\\' is a line break; '{b}' a group
])
def test_unclosed_box_rule(text, occurrence, expected):
  assert answers.extract_boxed(text, occurrence) == expected


def test_cut_off_box_scores_zero_not_the_earlier_box():
  # The model boxed 12, reconsidered, and was cut off while boxing its new answer.
  completion = 'So \\boxed{12}. Hmm, that is wrong; the answer is \\boxed{\\frac{3'
  assert answers.extract_answer(completion) is None
  assert not answers.answers_match(answers.extract_answer(completion), '12')


# --- reference answers: the leading number ---------------------------------------------------
@pytest.mark.parametrize('text,expected', [
    ('1,000.5 dollars', '1000.5'), ('1000.5', '1000.5'), ('$1,000.00', '1000'), ('-5', '-5'),
    ('-$5 (a loss)', '-5'), ('$-5', '-5'), ('\u22123 degrees', '-3'), ('72.', '72'), ('72. That is it.', '72'),
    ('0.50 kg', '0.5'), ('.5', '0.5'), ('3/4 of a pie', '0.75'), ('1/3', '1/3'), ('50%', '50'),
    ('25 \\%', '25'), ('\\boxed{7}', '7'), ('12 apples and 3 pears', '12'), ('1,234,567', '1234567'),
    ('Paris', None), ('about 5', None), ('1,2345', None), ('', None), ('five', None), ('5/0', None),
])
def test_leading_number_rule(text, expected):
  assert answers.leading_number(text) == expected


@pytest.mark.parametrize('completion', ['#### 1000.5', '#### 1,000.5', 'The answer is $1,000.50.',
                                        '#### 1,000.5 dollars', '\\boxed{1000.5}', 'The answer is 2001/2.'])
def test_completions_match_a_reference_with_units(completion):
  reference = answers.leading_number('1,000.5 dollars')
  assert answers.answers_match(answers.extract_answer(completion), reference)
  assert reference == '1000.5'
  assert not answers.answers_match(answers.extract_answer(completion), '1000.6')


def test_negative_currency_completion_is_a_number():
  assert answers.extract_answer('#### -$5 overall') == '-$5'
  assert answers.answers_match(answers.extract_answer('#### -$5 overall'), '-5')


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match='unknown answer extractor'):
    answers.extract_answer('x', ('hash', 'nope'))
  with pytest.raises(ValueError, match='occurrence'):
    answers.extract_hash('#### 1', occurrence='middle')
  with pytest.raises(TypeError, match='str'):
    answers.extract_answer(b'#### 1')


# --- robustness: arbitrary strings -----------------------------------------------------
_ALPHABET = st.sampled_from(list('0123456789 ,.$%/-+{}\\#\n') + ['####', '\\boxed{', '\\frac{', 'The answer is ',
                                                                  '}', '<<', '>>', 'abc', '€', '\u2212'])
_TEXTS = st.one_of(st.text(max_size=300), st.lists(_ALPHABET, max_size=120).map(''.join))
_FNS = [answers.extract_hash, answers.extract_answer_is, answers.extract_boxed, answers.extract_last_number,
        lambda t: answers.extract_answer(t, last_number_fallback=True), answers.parse_number,
        answers.canonical_answer, answers.normalize_text_answer, lambda t: answers.answers_match(t, '5')]


@settings(max_examples=200, deadline=500)
@given(_TEXTS)
def test_extractors_never_raise_on_arbitrary_text(text):
  for fn in _FNS:
    out = fn(text)
    assert out is None or isinstance(out, (str, bool, Fraction))


@settings(max_examples=200, deadline=500)
@given(_TEXTS)
def test_extracted_answers_are_substrings_of_the_text(text):
  for fn in (answers.extract_hash, answers.extract_answer_is, answers.extract_last_number):
    out = fn(text)
    assert out is None or out in text


@settings(max_examples=200, deadline=500)
@given(st.integers(-10**12, 10**12), st.sampled_from(['{:,}', '{}', '${:,}.00', '{}.0']))
def test_formatted_integers_parse_to_their_value(n, fmt):
  text = fmt.format(n)
  assert answers.parse_number(text) == n
  assert answers.extract_answer(f'#### {text}') is not None
  assert answers.answers_match(answers.extract_answer(f'so #### {text}'), str(n))


@pytest.mark.parametrize('text', [
    '\\boxed{' * 20_000,                                    # unbalanced: one-pass brace matching
    '{' * 50_000 + '\\boxed{1}' + '}' * 50_000,
    '9' * 200_000,                                          # a huge number is not parsed
    '1,' * 50_000,
    'The answer is ' * 10_000,
    '#### ' * 20_000 + 'x',
    ' ' * 100_000 + 'the answer',
    '1e' + '9' * 10_000,
    '1' * 100_000 + ',5',                                   # no quadratic backtracking
    '1,000' * 20_000,
    '-' * 50_000 + '1',
])
def test_adversarial_inputs_run_in_linear_time(text):
  start = time.perf_counter()
  for fn in _FNS:
    fn(text)
  assert time.perf_counter() - start < 2.0
