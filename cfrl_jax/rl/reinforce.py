"""REINFORCE with a baseline (and RLOO) on sequence-level rewards.

    loss = aggregate( -(r_i - b_i) * logp_t ) + kl_coef * aggregate(KL_t)

The gradient is the score-function estimator -(r_i - b_i) * d logp_t, averaged as the
aggregation mode says. The textbook estimator sums over a sequence's tokens
(d log pi(y_i) = sum_t d logp_t); that is 'constant' up to the factor 1 / max_tokens.
There is no importance ratio: the loss assumes on-policy tokens (one update per
rollout batch); use grpo_loss / ppo_policy_loss for several updates per batch.

Baselines (advantages.py):
  'none'        b = 0 (rewards are used as given: pass precomputed advantages this way)
  'batch_mean'  b = mean reward of the whole batch
  'group_mean'  b = mean reward of the sample's group (includes the sample itself)
  'rloo'        b = mean reward of the OTHER samples of its group (unbiased; Ahmadian et al. 2024)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cfrl_jax.rl import advantages as adv
from cfrl_jax.rl.aggregate import aggregate, as_mask, check_aggregation, check_per_token, masked, token_mean, wide
from cfrl_jax.rl.kl import kl_penalty

BASELINES = ('none', 'batch_mean', 'group_mean', 'rloo')


def reinforce_advantages(rewards, baseline: str = 'batch_mean', group_size: int | None = None):
  """(B,) rewards -> (B,) advantages r - b for the named baseline."""
  if baseline not in BASELINES:
    raise ValueError(f'baseline {baseline!r} is unknown; valid baselines are {BASELINES}.')
  if baseline in ('group_mean', 'rloo') and group_size is None:
    raise ValueError(f"baseline={baseline!r} needs group_size (samples per prompt, rows group-major).")
  if baseline == 'none':
    rewards = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
    if rewards.ndim != 1:
      raise ValueError(f'rewards has shape {rewards.shape}; expected (B,).')
    return rewards
  if baseline == 'batch_mean':
    return adv.batch_mean_baseline(rewards)
  if baseline == 'group_mean':
    return adv.group_mean_baseline(rewards, group_size)
  return adv.rloo(rewards, group_size)


def reinforce_loss(logp, rewards, loss_mask, *, baseline: str = 'batch_mean',
                   group_size: int | None = None, ref_logp=None, kl_coef=0.0,
                   kl_estimator: str = 'k3', aggregation: str = 'seq_mean',
                   max_tokens: int | None = None, entropy=None):
  """REINFORCE loss.

  Args:
    logp: (B, T) log-probs of the sampled tokens under the current params.
    rewards: (B,) sequence rewards (or advantages, with baseline='none'), held constant.
    loss_mask: (B, T).
    baseline: 'none' | 'batch_mean' | 'group_mean' | 'rloo' (the last two need group_size).
    group_size: G, samples per prompt (rows group-major).
    ref_logp, kl_coef, kl_estimator: optional KL loss term (kl.kl_penalty).
    aggregation, max_tokens: see aggregate.aggregate.
    entropy: optional (B, T) per-position entropy, reported only.

  Returns:
    (loss, metrics): loss, pg_loss, advantage_mean, advantage_std, neg_logp,
    num_tokens; reward_mean unless baseline='none'; kl and kl_penalty when ref_logp is
    given; entropy when given.
  """
  check_aggregation(aggregation, max_tokens)
  mask = as_mask(loss_mask)
  logp = wide(logp)
  check_per_token('logp', logp, mask)
  A = reinforce_advantages(rewards, baseline, group_size)
  if A.shape != (mask.shape[0],):
    raise ValueError(f'rewards has shape {A.shape} but loss_mask has {mask.shape[0]} rows.')
  logp = masked(logp, mask)
  pg_loss = aggregate(-A[:, None] * logp, mask, aggregation, max_tokens)
  kl, kl_metrics = kl_penalty(logp, ref_logp, mask, kl_coef=kl_coef, estimator=kl_estimator,
                              aggregation=aggregation, max_tokens=max_tokens)
  loss = pg_loss + kl
  sg = jax.lax.stop_gradient
  metrics = {'loss': sg(loss), 'pg_loss': sg(pg_loss),
             'advantage_mean': jnp.mean(A), 'advantage_std': jnp.std(A),
             'neg_logp': sg(token_mean(-logp, mask)), 'num_tokens': jnp.sum(mask)}
  if baseline != 'none':   # with 'none' the argument may already be advantages
    metrics['reward_mean'] = jnp.mean(sg(jnp.asarray(rewards, jnp.float32)))
  metrics.update(kl_metrics)
  if entropy is not None:
    check_per_token('entropy', jnp.asarray(entropy), mask)
    metrics['entropy'] = sg(token_mean(entropy, mask))
  return loss, metrics
