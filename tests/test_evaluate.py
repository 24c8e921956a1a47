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
