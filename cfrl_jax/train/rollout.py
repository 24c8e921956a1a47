"""Rollouts: prompts -> sampled completions -> rewards, as arrays the losses consume.

Sequences are laid out as [left-padded prompt | right-padded completion]:

    tokens (B, P + N), mask (B, P + N); completion token j sits at column P + j
    and is predicted from position P + j - 1.

Rows are group-major: prompt i's G samples are rows i*G .. i*G + G - 1.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfrl_jax import sampling, tokenization
from cfrl_jax.models import qwen
from cfrl_jax.tasks import rewards as task_rewards


class Rollout(NamedTuple):
  """One batch of experience. Arrays are numpy on the host until the learner takes them."""
  tokens: np.ndarray            # (B, P+N) int32
  mask: np.ndarray              # (B, P+N) int32
  completion_mask: np.ndarray   # (B, N) float32: 1 on generated tokens (stop token included)
  old_logp: np.ndarray          # (B, N) float32: log pi_old(token) at temperature 1
  rewards: np.ndarray           # (B,) float32, weighted sum of the reward functions
  reward_parts: dict            # name -> (B,) float32, each reward function separately
  prompts: list                 # B prompt strings (each repeated G times)
  completions: list             # B decoded completions
  rows: list                    # B task rows (the columns reward functions saw)


@jax.custom_vjp
def logp_and_lse(z, targets):
  """log softmax(z)[targets] and logsumexp(z): both (B, N), from logits z (B, N, V), targets (B, N) int."""
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  lse = m[..., 0] + jnp.log(jnp.sum(jnp.exp(z - m), axis=-1))
  return jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0] - lse, lse


def _logp_and_lse_fwd(z, targets):
  out = logp_and_lse(z, targets)
  return out, (z, targets, out[1])


def _logp_and_lse_bwd(res, g):
  # d logp/dz = onehot - softmax, d lse/dz = softmax: one pass over the (B, N, V) logits with the
  # softmax recomputed from lse (autodiff of log_softmax keeps and re-reads several such arrays).
  z, targets, lse = res
  g_logp, g_lse = g
  probs = jnp.exp(z - lse[..., None])
  onehot = jnp.arange(z.shape[-1]) == targets[..., None]
  gz = jnp.where(onehot, g_logp[..., None], 0.0) + (g_lse - g_logp)[..., None] * probs
  return gz.astype(z.dtype), None


logp_and_lse.defvjp(_logp_and_lse_fwd, _logp_and_lse_bwd)


def completion_stats(cfg: qwen.QwenConfig, params, tokens, mask, prompt_len: int):
  """Per-token statistics of the completion part of [prompt | completion] sequences.

  Only the N completion positions go through the head, which at real vocabulary
  sizes is most of the cost. Returns logp, entropy, max_prob (all (B, N) float32; float64 for a float64 model)
  and phi (B, P+N, d). Only logp carries a gradient: entropy and max_prob are
  metrics, computed from the same exp pass (the learner step is ~1.2x faster than
  with autodiff through log_softmax; bench/bench_learner.py).
  """
  phi, _ = qwen.features(cfg, params['backbone'], tokens, mask)
  z = qwen.logits(cfg, qwen.head_params(cfg, params), phi[:, prompt_len - 1:-1])
  z = z.astype(qwen.promoted(z.dtype))
  logp, lse = logp_and_lse(z, tokens[:, prompt_len:])
  zs, lses = jax.lax.stop_gradient(z), jax.lax.stop_gradient(lse)
  probs = jnp.exp(zs - lses[..., None])
  entropy = lses - jnp.sum(probs * zs, axis=-1)
  max_prob = jnp.exp(jnp.max(zs, axis=-1) - lses)
  return logp, entropy, max_prob, phi


def collect(policy, params, rows: list[dict[str, Any]], reward_fns, key, *, group_size: int,
            max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
            greedy: bool = False, sample_fn=None, prompt_width: Callable[[int], int] | None = None) -> Rollout:
  """Samples `group_size` completions for each row's prompt and scores them.

  sample_fn: a drop-in for sampling.sample (the trainer passes the mesh-sharded sampler).
  prompt_width: maps the width P of these prompts (the longest) to the width to left-pad them to;
    with per-host loading the trainer passes the maximum over processes, so that every process's
    rows have the layout they would have in one global batch.
  """
  rep_rows = [r for r in rows for _ in range(group_size)]
  prompts = [r['prompt'] for r in rep_rows]
  p_tokens, p_mask = tokenization.encode_prompts(
      policy.tokenizer, prompts, chat_template=policy.chat_template, system_prompt=policy.system_prompt)
  if prompt_width is not None:
    extra = prompt_width(p_tokens.shape[1]) - p_tokens.shape[1]
    if extra < 0:
      raise ValueError(f'prompt_width gave {p_tokens.shape[1] + extra} for prompts {p_tokens.shape[1]} tokens wide.')
    p_tokens = np.pad(p_tokens, ((0, 0), (extra, 0)), constant_values=tokenization.pad_id(policy.tokenizer))
    p_mask = np.pad(p_mask, ((0, 0), (extra, 0)))
  out = (sample_fn or sampling.sample)(
      policy.cfg, params, p_tokens, p_mask, key, max_new_tokens=max_new_tokens,
      temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
      stop_token_ids=policy.stop_ids, pad_id=policy.pad_id)
  c_tokens, c_mask = np.asarray(out.tokens), np.asarray(out.mask)
  completions = tokenization.decode_completions(policy.tokenizer, c_tokens, c_mask, stop_token_ids=policy.stop_ids)
  columns = {k: [r.get(k) for r in rep_rows] for k in rep_rows[0] if k != 'prompt'}
  total, parts = task_rewards.combine_rewards(reward_fns, prompts, completions, columns)
  return Rollout(
      tokens=np.concatenate([p_tokens, c_tokens], axis=1).astype(np.int32),
      mask=np.concatenate([p_mask, c_mask], axis=1).astype(np.int32),
      completion_mask=c_mask.astype(np.float32),
      old_logp=np.asarray(out.logprobs, np.float32),
      rewards=np.asarray(total, np.float32),
      reward_parts={k: np.asarray(v, np.float32) for k, v in parts.items()},
      prompts=prompts, completions=completions, rows=rep_rows)
