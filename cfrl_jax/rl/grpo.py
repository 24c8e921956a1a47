"""GRPO and its loss variants (DAPO clip-higher / token-mean, Dr. GRPO) as one loss function.

    loss = aggregate( -min(ratio_t A_i, clip(ratio_t, 1 - clip_low, 1 + clip_high) A_i)
                      + kl_coef * KL_t(pi || pi_ref) )

with ratio_t = exp(logp - old_logp), A_i the group-relative advantage of sequence i
(advantages.group_normalized; Dr. GRPO: scale_by_std=False) and KL_t a per-token
estimator (kl.py; GRPO uses 'k3'). The variants are settings:

  GRPO (DeepSeekMath)  aggregation='seq_mean', clip_low=clip_high=0.2, kl_coef>0, 'k3'
  DAPO                 aggregation='token_mean', clip_high=0.28, kl_coef=0
  Dr. GRPO             aggregation='constant' with max_tokens, advantages without std scaling

With one update per batch (old_logp == logp, ratio 1) the gradient is the plain
policy gradient -A_i * d logp_t / (normaliser); the clip matters only for later
updates on the same rollouts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cfrl_jax.rl.aggregate import aggregate, as_mask, check_aggregation, check_per_token, token_mean, wide
from cfrl_jax.rl.kl import kl_penalty
from cfrl_jax.rl.ppo import clipped_surrogate


def grpo_loss(logp, old_logp, ref_logp, advantages, loss_mask, *, clip_low=0.2, clip_high=0.2,
              kl_coef=0.0, kl_estimator: str = 'k3', aggregation: str = 'seq_mean',
              max_tokens: int | None = None, entropy=None):
  """GRPO loss on a group-major rollout batch.

  Args:
    logp: (B, T) log-probs of the sampled completion tokens under the current params.
    old_logp: (B, T) log-probs at sampling time (held constant). Pass
      jax.lax.stop_gradient(logp) for a single on-policy update.
    ref_logp: (B, T) log-probs under the frozen reference policy, or None (allowed
      only with kl_coef == 0.0; then no reference is evaluated at all).
    advantages: (B,) per-sequence (GRPO) or (B, T) per-token, held constant.
    loss_mask: (B, T) 1 on completion tokens that count.
    clip_low, clip_high: ratio clip to [1 - clip_low, 1 + clip_high] (DAPO: clip_high = 0.28).
    kl_coef: weight of the KL loss (Python float or scalar array).
    kl_estimator: 'k1' | 'k2' | 'k3'.
    aggregation: 'seq_mean' (GRPO) | 'token_mean' (DAPO) | 'constant' (Dr. GRPO, needs max_tokens).
    max_tokens: Python int, the per-sequence token budget for aggregation='constant'.
    entropy: optional (B, T) per-position entropy (qwen.token_logprobs), reported only.

  Returns:
    (loss scalar, metrics dict of scalars): loss, pg_loss, clip_fraction_low,
    clip_fraction_high, clip_fraction, ratio_mean, ratio_max, kl_old, neg_logp,
    advantage_mean, num_tokens; kl and kl_penalty when ref_logp is given; entropy when given.
  """
  check_aggregation(aggregation, max_tokens)
  mask = as_mask(loss_mask)
  per_token, metrics = clipped_surrogate(logp, old_logp, advantages, mask,
                                         clip_low=clip_low, clip_high=clip_high)
  pg_loss = aggregate(per_token, mask, aggregation, max_tokens)
  kl, kl_metrics = kl_penalty(logp, ref_logp, mask, kl_coef=kl_coef, estimator=kl_estimator,
                              aggregation=aggregation, max_tokens=max_tokens)
  loss = pg_loss + kl
  sg = jax.lax.stop_gradient
  metrics.update(kl_metrics)
  metrics['pg_loss'] = sg(pg_loss)
  metrics['loss'] = sg(loss)
  advantages = wide(advantages)
  metrics['advantage_mean'] = sg(token_mean(jnp.broadcast_to(
      advantages[:, None] if advantages.ndim == 1 else advantages, mask.shape), mask))
  metrics['num_tokens'] = jnp.sum(mask)
  if entropy is not None:
    check_per_token('entropy', jnp.asarray(entropy), mask)
    metrics['entropy'] = sg(token_mean(entropy, mask))
  return loss, metrics
