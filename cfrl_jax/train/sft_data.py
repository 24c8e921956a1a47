"""(prompt, completion) text pairs -> the [prompt | completion] arrays the SFT loss takes.

Used by Expert Iteration (its kept samples), LP-FT and the from-scratch
pretraining of the demo. Completions end with the tokenizer's EOS so that the
model learns to stop; a completion longer than `max_new_tokens` is an error
(truncating it would teach the model an unfinished answer).
"""
from __future__ import annotations

import numpy as np

from cfrl_jax import tokenization


def encode_pairs(policy, pairs, *, max_new_tokens: int, prompt_bucket: int = 16, add_eos: bool = True) -> dict:
  """pairs: [(prompt, completion)] -> dict of numpy arrays and the prompt length.

  Returns tokens (B, P+N) int32, mask (B, P+N) int32, completion_mask (B, N) float32,
  prompt_len P (a multiple of prompt_bucket), with N = max_new_tokens.
  """
  if not pairs:
    raise ValueError('encode_pairs needs at least one (prompt, completion) pair.')
  tok = policy.tokenizer
  prompts = [p for p, _ in pairs]
  p_tokens, p_mask = tokenization.encode_prompts(
      tok, prompts, chat_template=policy.chat_template, system_prompt=policy.system_prompt)
  P = max(prompt_bucket, -(-p_tokens.shape[1] // prompt_bucket) * prompt_bucket)
  lp = P - p_tokens.shape[1]
  p_tokens = np.pad(p_tokens, ((0, 0), (lp, 0)), constant_values=policy.pad_id)
  p_mask = np.pad(p_mask, ((0, 0), (lp, 0)))
  eos = policy.stop_ids[0] if policy.stop_ids else None
  if add_eos and eos is None:
    raise ValueError('The tokenizer has no EOS token; SFT completions need one to teach stopping.')
  N = max_new_tokens
  c_tokens = np.full((len(pairs), N), policy.pad_id, np.int32)
  c_mask = np.zeros((len(pairs), N), np.float32)
  for i, (_, completion) in enumerate(pairs):
    ids = list(tok(completion, add_special_tokens=False)['input_ids'])
    if add_eos:
      ids.append(eos)
    if len(ids) > N:
      raise ValueError(f'Completion {i} has {len(ids)} tokens (EOS included), more than max_new_tokens={N}: '
                       f'{completion[:80]!r}... Raise max_new_tokens.')
    c_tokens[i, :len(ids)] = ids
    c_mask[i, :len(ids)] = 1.0
  return {'tokens': np.concatenate([p_tokens, c_tokens], 1).astype(np.int32),
          'mask': np.concatenate([p_mask, c_mask.astype(np.int32)], 1).astype(np.int32),
          'completion_mask': c_mask, 'prompt_len': P}
