"""Held-out evaluation: accuracy three ways plus diversity.

  greedy_accuracy     one greedy completion per problem
  pass@1              mean correctness of `samples` completions per problem at the sampling temperature
  pass@k, majority@k  unbiased pass@k (Chen et al. 2021) and majority vote over the k samples
  distinct_answers    mean number of distinct final answers among a problem's samples
  format_<name>       fraction of sampled completions in each solution format
  greedy_format_<name>  the same fraction among the greedy completions (Echo Chamber reports both)

The standard error of pass@1 over problems is reported too, so a report can say
whether a change is beyond noise.
"""
from __future__ import annotations

import jax
import numpy as np

from cfrl_jax import sampling, tokenization
from cfrl_jax.dynamics import confidence
from cfrl_jax.tasks import formats as formats_lib


def _generate(policy, params, prompts, key, *, n_per_prompt, greedy, temperature, max_new_tokens,
              batch_size):
  """Completions for each prompt repeated n_per_prompt times (group-major), in batches."""
  rep = [p for p in prompts for _ in range(n_per_prompt)]
  texts, lengths = [], []
  # Every batch samples from the same params: lay the decode weights out once, not per batch.
  model = sampling.sampler_model(policy.cfg, params, sampling.unroll_layers_default())
  for i, start in enumerate(range(0, len(rep), batch_size)):
    chunk = rep[start:start + batch_size]
    toks, mask = tokenization.encode_prompts(policy.tokenizer, chunk, chat_template=policy.chat_template,
                                             system_prompt=policy.system_prompt)
    out = sampling.sample(policy.cfg, model, toks, mask, jax.random.fold_in(key, i),
                          max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                          stop_token_ids=policy.stop_ids, pad_id=policy.pad_id)
    m = np.asarray(out.mask)
    texts += tokenization.decode_completions(policy.tokenizer, np.asarray(out.tokens), m,
                                             stop_token_ids=policy.stop_ids)
    lengths += list(m.sum(axis=1))
  return texts, np.asarray(lengths, float)


def evaluate(policy, params, rows: list[dict], task, key, *, samples: int, temperature: float,
             max_new_tokens: int, pass_k=(1,), batch_size: int = 256, greedy: bool = True) -> dict:
  """Metrics of `params` on held-out rows (each with 'prompt' and 'answer')."""
  if not rows:
    raise ValueError('evaluate() got no held-out rows.')
  prompts = [r['prompt'] for r in rows]
  out: dict[str, float] = {'num_problems': float(len(rows))}
  if greedy:
    texts, _ = _generate(policy, params, prompts, jax.random.fold_in(key, 0), n_per_prompt=1, greedy=True,
                         temperature=1.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out['greedy_accuracy'] = float(np.mean([task.is_correct(t, r['answer']) for t, r in zip(texts, rows)]))
    if task.formats is not None:
      out.update(format_fractions([task.formats(t) for t in texts], task.formats.names, 'greedy_format_'))
  if samples > 0:
    texts, lengths = _generate(policy, params, prompts, jax.random.fold_in(key, 1), n_per_prompt=samples,
                               greedy=False, temperature=temperature, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    correct = np.array([task.is_correct(t, rows[i // samples]['answer']) for i, t in enumerate(texts)], float)
    per_problem = correct.reshape(len(rows), samples)
    p1 = per_problem.mean(axis=1)
    out['pass@1'] = float(p1.mean())
    out['pass@1_stderr'] = float(p1.std(ddof=1) / np.sqrt(len(rows))) if len(rows) > 1 else float('nan')
    n_correct = per_problem.sum(axis=1)
    answers = [task.answer_key(t) for t in texts]
    for k in pass_k:
      if k <= samples:
        out[f'pass@{k}'] = float(np.mean([confidence.pass_at_k(samples, int(c), k) for c in n_correct]))
    groups = [answers[i * samples:(i + 1) * samples] for i in range(len(rows))]
    maj_correct = []
    for i, g in enumerate(groups):
      winner = confidence.majority_vote(g)
      # Score the vote through one completion that gave the winning answer, so the task's own
      # equivalence (numeric, or math-verify for MATH) decides, not string equality.
      maj_correct.append(winner is not None and bool(correct[i * samples + g.index(winner)]))
    out[f'majority@{samples}'] = float(np.mean(maj_correct))
    out['distinct_answers'] = float(np.mean([confidence.distinct_answers(g) for g in groups]))
    out['response_length'] = float(lengths.mean())
    if task.formats is not None:
      fmts = [task.formats(t) for t in texts]
      for name in tuple(task.formats.names) + ('unknown',):
        out[f'format_{name}'] = fmts.count(name) / len(fmts)
        sel = [c for c, f in zip(correct, fmts) if f == name]
        if sel:
          out[f'accuracy_{name}'] = float(np.mean(sel))
  return out


def format_fractions(labels: list[str], names, prefix: str) -> dict[str, float]:
  """{prefix + name: fraction of `labels` equal to name} for every format name and 'unknown'."""
  return {prefix + name: frac for name, frac in formats_lib.label_fractions(labels, names).items()}
