"""Loss functions of (params, batch) for the learner, one per algorithm.

Each builder closes over the model config and the algorithm's settings and
returns loss_fn(params, batch) -> (loss, metrics), where batch is a dict of
arrays from the rollout (see Batch keys below). The policy forward pass is
shared (`rollout.completion_stats`); the losses on its log-probs are the algorithm
table's (cfrl_jax/rl/algorithms.py), whose maths lives in cfrl_jax/rl/.

Batch keys: tokens (B, P+N), mask (B, P+N), completion_mask (B, N), old_logp (B, N),
advantages (B,) or (B, N), optionally ref_logp (B, N), returns (B, N), old_values (B, N).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cfrl_jax.models import qwen
from cfrl_jax.rl import algorithms, ppo, sft
from cfrl_jax.train.rollout import completion_stats


def _policy_metrics(logp, entropy, max_prob, mask, phi=None, prompt_len=None):
  """Confidence measures over completion tokens, and the mean norm of their features phi."""
  n = jnp.maximum(mask.sum(), 1.0)
  out = {'entropy': (entropy * mask).sum() / n, 'mean_prob': (jnp.exp(logp) * mask).sum() / n,
         'max_prob': (max_prob * mask).sum() / n}
  if phi is not None:
    norms = jnp.linalg.norm(phi[:, prompt_len - 1:-1].astype(jnp.float32), axis=-1)
    out['feature_norm'] = (norms * mask).sum() / n
  return jax.lax.stop_gradient(out)


def policy_objective(cfg: qwen.QwenConfig, prompt_len: int, rl, loss):
  """loss_fn(params, batch): the policy's forward pass over [prompt | completion], then
  loss(logp (B, N), batch, rl) -> (loss, metrics) (an rl/algorithms.py loss), plus confidence metrics."""

  def loss_fn(params, batch):
    logp, entropy, max_prob, phi = completion_stats(cfg, params, batch['tokens'], batch['mask'], prompt_len)
    value, m = loss(logp, batch, rl)
    return value, dict(m, **_policy_metrics(logp, entropy, max_prob, batch['completion_mask'], phi, prompt_len))

  return loss_fn


def algorithm_objective(cfg: qwen.QwenConfig, prompt_len: int, rl, name: str | None = None):
  """The learner's loss_fn for algorithm `name` (default rl.algorithm), from the algorithm table."""
  return policy_objective(cfg, prompt_len, rl, algorithms.algorithm(name or rl.algorithm).loss)


def grpo_objective(cfg: qwen.QwenConfig, prompt_len: int, rl):
  """GRPO / DAPO / Dr. GRPO clipped surrogate with an optional KL to the reference."""
  return policy_objective(cfg, prompt_len, rl, algorithms.grpo_loss)


def reinforce_objective(cfg: qwen.QwenConfig, prompt_len: int, rl):
  """REINFORCE with the advantages computed by the trainer (baseline or RLOO)."""
  return policy_objective(cfg, prompt_len, rl, algorithms.rloo_loss)


def ppo_policy_objective(cfg: qwen.QwenConfig, prompt_len: int, rl):
  """PPO's clipped policy loss on GAE token advantages.

  The critic is trained separately; a KL penalty, if any, is already in the token
  rewards behind the advantages (the classic PPO-RLHF placement). Tokens are aggregated by
  rl.aggregation like every other policy loss (Echo Chamber's PPO: seq_mean).
  """
  return policy_objective(cfg, prompt_len, rl, algorithms.ppo_loss)


def critic_values(cfg: qwen.QwenConfig, critic, tokens, mask, prompt_len: int):
  """V(s) before each completion token: (B, N). critic = {'backbone', 'value_head'}."""
  phi, _ = qwen.features(cfg, critic['backbone'], tokens, mask)
  return ppo.value_head(critic['value_head'], phi[:, prompt_len - 1:-1])


def critic_objective(cfg: qwen.QwenConfig, prompt_len: int, rl):
  """Clipped value loss of the critic (its own backbone copy plus a scalar head)."""

  def loss_fn(critic, batch):
    values = critic_values(cfg, critic, batch['tokens'], batch['mask'], prompt_len)
    loss, m = ppo.value_loss(values, batch['old_values'], batch['returns'], batch['completion_mask'],
                             clip=rl.ppo.value_clip)
    return loss, m

  return loss_fn


def sft_objective(cfg: qwen.QwenConfig, prompt_len: int, aggregation: str = 'token_mean'):
  """Cross-entropy on completion tokens (Expert Iteration, LP-FT, pretraining)."""
  return policy_objective(cfg, prompt_len, None,
                          lambda logp, batch, rl: algorithms.sft_loss(logp, batch, aggregation=aggregation))


def lm_objective(cfg: qwen.QwenConfig, aggregation: str = 'token_mean'):
  """Next-token cross-entropy on every real token after a sequence's first (pretraining on whole
  documents: the prompt's text is learned too, not only the completion). batch: tokens, mask (B, T)."""

  def loss_fn(params, batch):
    tokens, mask = batch['tokens'], batch['mask']
    logp, entropy, max_prob, phi = completion_stats(cfg, params, tokens, mask, 1)
    # a target counts when it is real and so is its predecessor (left padding, right padding excluded)
    loss_mask = (mask[:, 1:] * mask[:, :-1]).astype(logp.dtype)
    loss, m = sft.sft_loss(logp, loss_mask, aggregation=aggregation)
    return loss, dict(m, **_policy_metrics(logp, entropy, max_prob, loss_mask))

  return loss_fn
