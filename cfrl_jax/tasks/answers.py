"""Final answers in model output: extraction, normalisation and numeric comparison.

    extract_answer('12 - 3 = 9. The answer is 9.')            -> '9'
    extract_answer('<<7+5=12>> #### $1,000.00')                -> '$1,000.00'
    extract_answer(r'so \\boxed{\\frac{3}{4}}')                  -> '\\frac{3}{4}'
    parse_number('$1,000.00') == parse_number('1000')          -> True (Fraction(1000))
    answers_match('3/4', '0.75'), answers_match('50%', '50')   -> True, True
    canonical_answer('$1,000.00')                              -> '1000'   (for majority votes)
    leading_number('1,000.5 dollars')                          -> '1000.5' (reference answers)

Extractors (names usable in configs):

    'hash'       GSM8K's '#### N' (the rest of the line, or the number that starts it)
    'answer_is'  'The answer is N' / 'The final answer is: N' (case-insensitive)
    'boxed'      \\boxed{...} / \\fbox{...} with nested braces (or '\\boxed 5')
    fallback     the last number in the text, only when asked for (last_number_fallback=True)

Rules for edge cases (docs/answers.md has the full list):

  * An unclosed box ends the search. A '\\boxed{' whose brace never closes swallows the
    rest of the text: the completion was cut off inside its answer. When the last box is
    asked for (boxed_occurrence='last', the default) that is "no answer" (None), never an
    earlier, superseded box; with 'first', a complete box before it still counts. Escaped braces '\\{' '\\}' are
    literal characters in LaTeX and do not open or close anything.
  * Reference numbers: leading_number('1,000.5 dollars') -> '1000.5'. A reference is the
    number that starts it (an optional sign and currency, thousands commas dropped, a
    fraction or percent sign kept with it), in canonical form; units, words and a final
    period after it are ignored. Text that does not start with a number gives None, and
    the task that reads the reference turns that into an error naming the row.

Every function here takes arbitrary text and runs in time linear in its length: no
regular expression with nested quantifiers, brace matching in one pass, and numbers
longer than MAX_NUMBER_CHARS are not parsed (a 10**6-digit integer or '1e999999999'
would otherwise cost seconds to build). Nothing here evaluates text as code.
"""
from __future__ import annotations

import bisect
import re
from fractions import Fraction
from typing import Sequence

EXTRACTORS = ('hash', 'answer_is', 'boxed')
OCCURRENCES = ('first', 'last')
MAX_NUMBER_CHARS = 64
MAX_ANSWER_CHARS = 200

# A number as people write it: optional sign, digits with optional thousands commas,
# optional decimal part; or a bare decimal '.5'. It never starts inside a digit run, and
# the atomic group keeps a failed match from retrying shorter prefixes, which keeps
# scanning linear; '1,2345' (a broken grouping) is not read as '1,234' or '1'.
_NUMBER = r'(?<![\d.])[-+\u2212]?(?:(?>\d{1,3}(?:,\d{3})+|\d+)(?!,?\d)(?:\.\d+)?|\.\d+)'
_NUMBER_RE = re.compile(_NUMBER, re.ASCII)
# A number with what commonly surrounds it in a final answer: currency, a fraction bar, percent.
_LEADING_ANSWER_RE = re.compile(
    r'(?:[-\u2212]?(?:\\?\$|USD|EUR|GBP|£|€))?\s?' + _NUMBER + r'(?:\s?/\s?' + _NUMBER + r')?(?:\s?\\?%)?', re.ASCII)
_HASH_RE = re.compile(r'####')
_ANSWER_IS_RE = re.compile(r'\bthe\s+(?:final\s+)?answer\s+is\b[ \t]*:?', re.IGNORECASE)
_BOX_RE = re.compile(r'\\(?:boxed|fbox)')
_FRAC_RE = re.compile(r'\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}')
_TEXT_RE = re.compile(r'\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}')
_CURRENCY = ('\\$', '$', 'USD', 'EUR', 'GBP', '£', '€')


# --- extraction ---------------------------------------------------------------
def _leading_answer(rest: str) -> str | None:
  """The answer that a marker introduces: the number starting `rest`, else the rest up to a sentence end."""
  rest = rest.strip()
  if not rest:
    return None
  box = _BOX_RE.search(rest, 0, 8)  # 'The answer is \boxed{5}' / '$\boxed{5}$' / '\(\boxed{5}\)'
  if box:
    return extract_boxed(rest[box.start():], occurrence='first')
  m = _LEADING_ANSWER_RE.match(rest)
  if m:
    return m.group(0).strip()
  end = re.search(r'\.(?:\s|$)', rest)
  text = (rest[:end.start()] if end else rest).strip()
  return text[:MAX_ANSWER_CHARS] or None


def _pick(values: list[str | None], occurrence: str) -> str | None:
  values = [v for v in values if v]
  if not values:
    return None
  return values[0] if occurrence == 'first' else values[-1]


def _check_occurrence(occurrence: str):
  if occurrence not in OCCURRENCES:
    raise ValueError(f'occurrence={occurrence!r}; expected one of {OCCURRENCES}.')


def _marker_segments(marker: re.Pattern, text: str) -> list[str]:
  """For each marker: the text after it, up to the next marker or the end of the line."""
  found = list(marker.finditer(text))
  if not found:
    return []
  newlines = [m.start() for m in re.finditer('\n', text)] + [len(text)]
  segments = []
  for m, nxt in zip(found, found[1:] + [None]):
    end = newlines[bisect.bisect_left(newlines, m.end())]
    if nxt is not None:
      end = min(end, nxt.start())
    segments.append(text[m.end():end])
  return segments


def extract_hash(text: str, occurrence: str = 'first') -> str | None:
  """The answer after GSM8K's '####' marker, or None."""
  _check_occurrence(occurrence)
  return _pick([_leading_answer(s) for s in _marker_segments(_HASH_RE, text)], occurrence)


def extract_answer_is(text: str, occurrence: str = 'first') -> str | None:
  """The answer in 'The (final) answer is N', or None."""
  _check_occurrence(occurrence)
  return _pick([_leading_answer(s) for s in _marker_segments(_ANSWER_IS_RE, text)], occurrence)


def _matching_braces(text: str) -> dict[int, int]:
  """Index of each '{' -> index of its matching '}' (unmatched braces are absent). One pass.

  A backslash escapes the next character, as in LaTeX: '\\{' and '\\}' are literal braces
  ('\\left\\{ x \\right.' opens nothing) and '\\\\{' is a line break followed by a group.
  """
  stack, match = [], {}
  i, n = 0, len(text)
  while i < n:
    ch = text[i]
    if ch == '\\':
      i += 2
      continue
    if ch == '{':
      stack.append(i)
    elif ch == '}' and stack:
      match[stack.pop()] = i
    i += 1
  return match


def extract_boxed(text: str, occurrence: str = 'last') -> str | None:
  """The content of \\boxed{...} or \\fbox{...} (braces may nest), or of '\\boxed 5'; None if absent.

  `occurrence='last'` follows the MATH convention that the final box holds the answer.
  A box whose brace never closes holds the rest of the text, so it is the last box: the
  completion was cut off inside its answer, and 'last' gives None rather than an earlier
  box the model had moved past ('first' still gives a complete box before it).
  """
  _check_occurrence(occurrence)
  starts = list(_BOX_RE.finditer(text))
  if not starts:
    return None
  match = _matching_braces(text)
  found = []
  for m in starts:
    i = m.end()
    if i < len(text) and text[i] == '{':
      if i not in match:  # cut off inside this box: every later box is inside it too
        if occurrence == 'last':
          return None
        break
      found.append(text[i + 1:match[i]].strip())
    elif i < len(text) and text[i] == ' ':
      # '\boxed 5': the token after the space, up to whitespace or '$'.
      token = re.match(r' +([^\s$]+)', text[i:i + MAX_ANSWER_CHARS])
      if token:
        found.append(token.group(1))
  return _pick(found, occurrence)


def extract_last_number(text: str) -> str | None:
  """The last number in the text ('1,000' and '-2.5' count as numbers), or None."""
  last = None
  for last in _NUMBER_RE.finditer(text):
    pass
  return last.group(0) if last else None


_EXTRACTOR_FNS = {'hash': extract_hash, 'answer_is': extract_answer_is, 'boxed': extract_boxed}


def check_extractors(extractors: Sequence[str]) -> tuple[str, ...]:
  """Validates a list of extractor names (configs give them as tuples)."""
  if isinstance(extractors, str):
    extractors = (extractors,)
  unknown = [e for e in extractors if e not in _EXTRACTOR_FNS]
  if unknown:
    raise ValueError(f'unknown answer extractor(s) {unknown}; valid: {EXTRACTORS}.')
  if not extractors:
    raise ValueError(f'at least one answer extractor is needed; valid: {EXTRACTORS}.')
  return tuple(extractors)


def extract_answer(text: str, extractors: Sequence[str] = EXTRACTORS, *, occurrence: str = 'first',
                   boxed_occurrence: str = 'last', last_number_fallback: bool = False) -> str | None:
  """The raw final answer in `text`: the first extractor (in the given order) that finds one.

  `occurrence` picks among several '####' / 'The answer is' markers; `boxed_occurrence`
  among several boxes. Returns None when nothing is found (and the fallback is off).
  """
  if not isinstance(text, str):
    raise TypeError(f'extract_answer takes a str, got {type(text).__name__}.')
  for name in check_extractors(extractors):
    found = _EXTRACTOR_FNS[name](text, boxed_occurrence if name == 'boxed' else occurrence)
    if found:
      return found
  return extract_last_number(text) if last_number_fallback else None


# --- normalisation ------------------------------------------------------------
def _strip_decorations(s: str) -> str:
  s = s.strip()
  s = _TEXT_RE.sub(r'\1', s)
  s = s.replace('\\!', '').replace('\\,', '').replace('{,}', ',').replace('\u2212', '-')
  s = s.strip().strip('$').strip()
  for c in _CURRENCY:
    s = s.replace(c, '')
  s = s.strip()
  while s.endswith(('.', '%')) or s.endswith('\\%'):
    s = s[:-2] if s.endswith('\\%') else s[:-1]
    s = s.strip()
  return s


def _parse_plain_number(s: str) -> Fraction | None:
  s = s.strip().replace(' ', '')
  m = _NUMBER_RE.fullmatch(s)
  if not m:
    return None
  return Fraction(s.replace(',', '').replace('\u2212', '-'))


def parse_number(text: str) -> Fraction | None:
  """The exact value of a numeric answer, or None if it is not a plain number.

  Accepts '$1,000.00', '-2.5', '50%' (-> 50), '3/4', '\\frac{3}{4}', '\\dfrac{3}{4}', '12.', '1,000';
  rejects anything longer than MAX_NUMBER_CHARS and expressions ('2+3', '1e5', 'x').
  Percent signs are dropped, as GSM8K writes '50%' answers as 50.
  """
  if not isinstance(text, str) or len(text) > 4 * MAX_NUMBER_CHARS:
    return None
  s = _strip_decorations(text)
  if len(s) > MAX_NUMBER_CHARS or not s:
    return None
  sign = 1
  if s.startswith('-') and _FRAC_RE.fullmatch(s[1:]):
    sign, s = -1, s[1:]
  frac = _FRAC_RE.fullmatch(s)
  if frac:
    num, den = _parse_plain_number(frac.group(1)), _parse_plain_number(frac.group(2))
    return None if num is None or not den else sign * num / den
  if '/' in s:
    parts = s.split('/')
    if len(parts) != 2:
      return None
    num, den = _parse_plain_number(parts[0]), _parse_plain_number(parts[1])
    return None if num is None or not den else num / den
  return _parse_plain_number(s)


def normalize_text_answer(text: str) -> str:
  """A non-numeric answer in comparable form: decorations stripped, lower case, no inner spaces."""
  return re.sub(r'\s+', '', _strip_decorations(text[:4 * MAX_ANSWER_CHARS])).lower()


def _format_fraction(x: Fraction) -> str:
  if x.denominator == 1:
    return str(x.numerator)
  d = x.denominator
  while d % 2 == 0:
    d //= 2
  while d % 5 == 0:
    d //= 5
  if d == 1:  # terminating decimal: write it as one
    digits = 0
    while (x * 10**digits).denominator != 1:
      digits += 1
    scaled = abs(x.numerator * 10**digits // x.denominator)
    whole, frac = divmod(scaled, 10**digits)
    return f"{'-' if x < 0 else ''}{whole}.{frac:0{digits}d}"
  return f'{x.numerator}/{x.denominator}'


def canonical_answer(text: str | None) -> str | None:
  """One string per answer value (for majority votes and distinct-answer counts).

  Numbers become their exact value ('$1,000.00' -> '1000', '3/4' and '0.75' -> '0.75',
  '1/3' -> '1/3'); other answers go through normalize_text_answer; None stays None.
  """
  if text is None:
    return None
  value = parse_number(text)
  if value is not None:
    return _format_fraction(value)
  return normalize_text_answer(text) or None


def leading_number(text: str) -> str | None:
  """The canonical value of the number that starts `text`, or None: the rule for reference answers.

  '1,000.5 dollars' -> '1000.5', '$1,000' -> '1000', '-$5' -> '-5', '72.' -> '72', '3/4' -> '0.75',
  '50%' -> '50', '\\boxed{7}' -> '7'; 'Paris', 'about 5', '1,2345' -> None. Thousands commas are
  dropped and what follows the number (units, words, a sentence's final period) is ignored,
  so the reference is what answers_match compares a completion's number with: a completion
  answering '1000.5' or '1,000.5' matches '#### 1,000.5 dollars'.
  """
  found = _leading_answer(text) if isinstance(text, str) else None
  value = parse_number(found) if found else None
  return None if value is None else _format_fraction(value)


def answers_match(predicted: str | None, reference: str) -> bool:
  """Whether a predicted answer equals the reference: exactly as numbers if both are numbers,
  otherwise as normalised strings. A missing prediction never matches."""
  if predicted is None:
    return False
  p, r = parse_number(predicted), parse_number(reference)
  if p is not None and r is not None:
    return p == r
  if p is not None or r is not None:
    return False
  p, r = normalize_text_answer(predicted), normalize_text_answer(reference)
  return bool(p) and p == r
