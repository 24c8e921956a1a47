"""evaluate(): its metrics against hand-computed values on scripted completions.

The sampler is replaced by a script (completion texts in the order evaluate asks for them), so
every metric is known in closed form; the decode weights must be laid out once per _generate
call and handed to each batch's sample call.
"""
import types

import jax
import numpy as np
import pytest
import transformers

from cfrl_jax import evaluate as evaluate_lib
from cfrl_jax import sampling
from cfrl_jax.models import hf


class _LastNumberTask:
  """A task whose answer is the completion's last whitespace-separated word."""
  formats = None

  @staticmethod
  def answer_key(text):
    words = text.split()
    return words[-1] if words else None

  def is_correct(self, text, answer):
    return self.answer_key(text) == answer


def _scripted_sampler(tokenizer, script, seen):
  """sampling.sample stand-in: the next len(batch) texts of `script`, right-padded, no stop."""
  def sample(cfg, model, tokens, mask, key, *, max_new_tokens, **kw):
    seen.append(model)
    texts = [script.pop(0) for _ in range(len(tokens))]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    out = np.zeros((len(ids), max_new_tokens), np.int32)
    m = np.zeros_like(out)
    for i, row in enumerate(ids):
      out[i, :len(row)], m[i, :len(row)] = row, 1
    return sampling.SampleOutput(out, m, np.zeros(out.shape, np.float32), np.zeros(out.shape, np.float32))
  return sample


def test_evaluate_metrics_equal_hand_computed_values(tiny_qwen2_dir, monkeypatch):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_dir)
  policy = types.SimpleNamespace(cfg=cfg, tokenizer=tokenizer, chat_template=False, system_prompt=None,
                                 stop_ids=(0,), pad_id=0)
  rows = [{'prompt': 'What is 3 + 4?', 'answer': '7'}, {'prompt': 'What is 1 + 1?', 'answer': '2'}]
  # Greedy: one per problem. Then 4 samples per problem, problem-major.
  script = ['so 7', 'so 5',
            'the answer is 7', 'is 7', 'is 3', 'is 5',
            'is 4', 'is 4', 'is 2', 'is 4']
  seen = []
  monkeypatch.setattr(sampling, 'sample', _scripted_sampler(tokenizer, script, seen))
  out = evaluate_lib.evaluate(policy, params, rows, _LastNumberTask(), jax.random.PRNGKey(0), samples=4,
                              temperature=1.0, max_new_tokens=8, pass_k=(1, 2, 4), batch_size=3)
  assert not script                                                 # every scripted text was asked for
  # Correct: problem 0 [1, 1, 0, 0], problem 1 [0, 0, 1, 0].
  assert out['greedy_accuracy'] == 0.5
  assert out['pass@1'] == pytest.approx((0.5 + 0.25) / 2)
  assert out['pass@1_stderr'] == pytest.approx(np.std([0.5, 0.25], ddof=1) / np.sqrt(2))
  # Unbiased pass@2 = 1 - C(n-c, 2) / C(n, 2): 1 - 1/6 and 1 - 3/6.
  assert out['pass@2'] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6)) / 2)
  assert out['pass@4'] == 1.0
  assert out['majority@4'] == 0.5                                   # '7' wins (right), '4' wins (wrong)
  assert out['distinct_answers'] == 2.5                             # {7, 3, 5} and {4, 2}
  assert out['num_problems'] == 2.0
  # 1 greedy batch + 3 sampled batches (8 rows by 3), each given the weights laid out once per pass.
  assert len(seen) == 4
  if sampling.unroll_layers_default():
    assert all(isinstance(m, sampling.DecodeParams) for m in seen)
    assert seen[1] is seen[2] is seen[3]
  else:
    assert all(m is params for m in seen)


class _FormattedTask(_LastNumberTask):
  """_LastNumberTask with two formats: 'so' (contains 'so ') and 'is' (contains 'is '); else 'unknown'."""
  def __init__(self):
    from cfrl_jax.tasks import formats
    self.formats = formats.FormatDetector({'so': r'so ', 'is': r'is '}, ('so', 'is'))


def test_greedy_and_sampled_format_fractions(tiny_qwen2_dir, monkeypatch):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen2_dir)
  policy = types.SimpleNamespace(cfg=cfg, tokenizer=tokenizer, chat_template=False, system_prompt=None,
                                 stop_ids=(0,), pad_id=0)
  rows = [{'prompt': 'What is 3 + 4?', 'answer': '7'}, {'prompt': 'What is 1 + 1?', 'answer': '2'},
          {'prompt': 'What is 2 + 2?', 'answer': '4'}, {'prompt': 'What is 0 + 1?', 'answer': '1'}]
  # Greedy (one per problem): so, so, is, unknown. Sampled (2 per problem): is x5, so x2, unknown x1.
  script = ['so 7', 'so 5', 'is 4', '1',
            'is 7', 'is 3', 'so 2', 'is 2', 'is 4', 'is 4', 'so 1', '0']
  monkeypatch.setattr(sampling, 'sample', _scripted_sampler(tokenizer, script, []))
  out = evaluate_lib.evaluate(policy, params, rows, _FormattedTask(), jax.random.PRNGKey(0), samples=2,
                              temperature=0.7, max_new_tokens=8, pass_k=(1,), batch_size=4)
  assert not script
  assert {k: out[k] for k in out if k.startswith('greedy_format_')} == {
      'greedy_format_so': 0.5, 'greedy_format_is': 0.25, 'greedy_format_unknown': 0.25}
  assert {k: out[k] for k in out if k.startswith('format_')} == {
      'format_so': 2 / 8, 'format_is': 5 / 8, 'format_unknown': 1 / 8}
  assert out['greedy_accuracy'] == 0.75                             # 'so 7', 'is 4' and '1' are right
  assert out['accuracy_so'] == 1.0                                  # 'so 2', 'so 1'
  assert out['accuracy_is'] == pytest.approx(4 / 5)                 # all but 'is 3'


def test_format_fractions_names_every_format_and_unknown():
  got = evaluate_lib.format_fractions(['a', 'b', 'a', 'unknown'], ('a', 'b', 'c'), 'greedy_format_')
  assert got == {'greedy_format_a': 0.5, 'greedy_format_b': 0.25, 'greedy_format_c': 0.0,
                 'greedy_format_unknown': 0.25}
  with pytest.raises(ValueError, match='empty'):
    evaluate_lib.format_fractions([], ('a',), 'greedy_format_')
