"""PPO for LMs: the clipped surrogate, the clipped value loss and a linear value head.

Token t of a completion is one action; its state is the context before it. With
ratio_t = pi(y_t) / pi_old(y_t) = exp(logp - old_logp) and advantage A_t, the
per-token policy loss is

    -min(ratio_t * A_t, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A_t)

(asymmetric bounds as in DAPO's clip-higher; clip_low = clip_high = 0.2 is PPO). The
clip only ever removes gradient: a token is "clipped low" when A < 0 and
ratio < 1 - clip_low, "clipped high" when A > 0 and ratio > 1 + clip_high, and such
tokens contribute a constant. GRPO (grpo.py) reuses clipped_surrogate.

The critic's architecture (its own backbone copy, or a head on the policy's
backbone) is the trainer's choice; this module provides the head and the losses.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cfrl_jax.rl.advantages import terminal_token_rewards
from cfrl_jax.rl.aggregate import aggregate, as_mask, check_aggregation, check_per_token, masked, token_mean, wide
from cfrl_jax.rl.kl import kl_penalty, kl_per_token


def _check_clip(clip_low, clip_high) -> None:
  if isinstance(clip_low, (int, float)) and not 0 <= clip_low < 1:
    raise ValueError(f'clip_low={clip_low!r}; expected 0 <= clip_low < 1 (the ratio is clipped '
                     'below at 1 - clip_low, which must stay positive).')
  if isinstance(clip_high, (int, float)) and not clip_high >= 0:
    raise ValueError(f'clip_high={clip_high!r}; expected clip_high >= 0.')


def _token_advantages(advantages, mask):
  """(B,) or (B, T) -> (B, T) broadcast over tokens, held constant."""
  advantages = jax.lax.stop_gradient(wide(advantages))
  B, T = mask.shape
  if advantages.shape == (B,):
    return jnp.broadcast_to(advantages[:, None], (B, T))
  if advantages.shape == (B, T):
    return advantages
  raise ValueError(f'advantages has shape {advantages.shape}; expected ({B},) (one per sequence) or '
                   f'({B}, {T}) (one per token), matching loss_mask {mask.shape}.')


def clipped_surrogate(logp, old_logp, advantages, loss_mask, *, clip_low=0.2, clip_high=0.2):
  """Per-token clipped policy loss and its diagnostics.

  Args:
    logp: (B, T) log-probs of the sampled tokens under the current params.
    old_logp: (B, T) log-probs at sampling time (behaviour policy, temperature 1).
    advantages: (B,) or (B, T), held constant.
    loss_mask: (B, T).
    clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].

  Returns:
    (per_token_loss (B, T) with 0 at masked-out tokens, metrics dict of scalars:
     clip_fraction_low, clip_fraction_high, clip_fraction, ratio_mean, ratio_max,
     kl_old (k3 estimate of KL(pi_old || pi), how far this update has moved), neg_logp
     (mean -log pi of the sampled tokens: an entropy estimate when on-policy)).
  """
  _check_clip(clip_low, clip_high)
  mask = as_mask(loss_mask)
  logp = wide(logp)
  check_per_token('logp', logp, mask)
  check_per_token('old_logp', jnp.asarray(old_logp), mask)
  old_logp = jax.lax.stop_gradient(wide(old_logp))
  A = _token_advantages(advantages, mask)
  # Masking the log-ratio (not the ratio) keeps exp() finite at padding positions.
  log_ratio = masked(logp - old_logp, mask)
  ratio = jnp.exp(log_ratio)
  clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  per_token = masked(-jnp.minimum(ratio * A, clipped_ratio * A), mask)

  sg = jax.lax.stop_gradient
  low = ((ratio < 1.0 - clip_low) & (A < 0)).astype(jnp.float32)
  high = ((ratio > 1.0 + clip_high) & (A > 0)).astype(jnp.float32)
  metrics = {
      'clip_fraction_low': token_mean(low, mask),
      'clip_fraction_high': token_mean(high, mask),
      'clip_fraction': token_mean(low + high, mask),
      'ratio_mean': token_mean(ratio, mask),
      'ratio_max': jnp.max(masked(ratio, mask)),
      'kl_old': token_mean(jnp.expm1(log_ratio) - log_ratio, mask),
      'neg_logp': token_mean(-masked(logp, mask), mask),
  }
  return per_token, {k: sg(v) for k, v in metrics.items()}


def ppo_policy_loss(logp, old_logp, advantages, loss_mask, *, clip_low=0.2, clip_high=0.2,
                    aggregation: str = 'token_mean', max_tokens: int | None = None,
                    entropy=None):
  """PPO clipped policy loss with token-level advantages (e.g. from advantages.gae).

  Args:
    logp, old_logp: (B, T). advantages: (B, T) (a (B,) vector is broadcast). loss_mask: (B, T).
    clip_low, clip_high: ratio clip bounds (PPO: 0.2 / 0.2).
    aggregation, max_tokens: see aggregate.aggregate (default token_mean).
    entropy: optional (B, T) per-position entropy, reported as metrics['entropy'].

  Returns:
    (loss scalar, metrics): pg_loss plus everything clipped_surrogate reports.
  """
  check_aggregation(aggregation, max_tokens)
  mask = as_mask(loss_mask)
  per_token, metrics = clipped_surrogate(logp, old_logp, advantages, mask,
                                         clip_low=clip_low, clip_high=clip_high)
  loss = aggregate(per_token, mask, aggregation, max_tokens)
  metrics['pg_loss'] = jax.lax.stop_gradient(loss)
  if entropy is not None:
    check_per_token('entropy', jnp.asarray(entropy), mask)
    metrics['entropy'] = jax.lax.stop_gradient(token_mean(entropy, mask))
  return loss, metrics


def value_loss(values, old_values, returns, loss_mask, clip: float | None = 0.2,
               aggregation: str = 'token_mean', max_tokens: int | None = None):
  """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-clip).

  Args:
    values: (B, T) critic values under the current params (differentiated).
    old_values: (B, T) critic values at rollout time (held constant).
    returns: (B, T) targets, e.g. from advantages.gae (held constant).
    loss_mask: (B, T).
    clip: the value clip range, or None for the plain 0.5 * (V - R)^2.
    aggregation, max_tokens: see aggregate.aggregate.

  Returns:
    (loss, metrics): value_loss, value_clip_fraction (tokens where the clipped error
    is the larger, so the gradient is 0), value_mean, return_mean, explained_variance
    (1 - Var[R - V] / Var[R] over counted tokens).
  """
  check_aggregation(aggregation, max_tokens)
  if clip is not None and not clip > 0:
    raise ValueError(f'clip={clip!r}; expected a positive value clip range, or None for no clipping.')
  mask = as_mask(loss_mask)
  for name, x in (('values', values), ('old_values', old_values), ('returns', returns)):
    check_per_token(name, jnp.asarray(x), mask)
  values = masked(jnp.asarray(values, jnp.float32), mask)
  old_values = jax.lax.stop_gradient(masked(jnp.asarray(old_values, jnp.float32), mask))
  returns = jax.lax.stop_gradient(masked(jnp.asarray(returns, jnp.float32), mask))
  unclipped = jnp.square(values - returns)
  if clip is None:
    per_token = 0.5 * unclipped
    clipped_frac = jnp.zeros((), jnp.float32)
  else:
    v_clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    clipped = jnp.square(v_clipped - returns)
    per_token = 0.5 * jnp.maximum(unclipped, clipped)
    clipped_frac = token_mean((clipped > unclipped).astype(jnp.float32), mask)
  loss = aggregate(per_token, mask, aggregation, max_tokens)
  sg = jax.lax.stop_gradient
  ret_mean = token_mean(returns, mask)
  ret_var = token_mean(jnp.square(returns - ret_mean), mask)
  err = returns - values
  err_var = token_mean(jnp.square(err - token_mean(err, mask)), mask)
  explained = jnp.where(ret_var > 0, 1.0 - err_var / jnp.where(ret_var > 0, ret_var, 1.0), 0.0)
  metrics = {'value_loss': sg(loss), 'value_clip_fraction': sg(clipped_frac),
             'value_mean': sg(token_mean(values, mask)), 'return_mean': sg(ret_mean),
             'explained_variance': sg(explained)}
  return loss, metrics


def ppo_loss(logp, old_logp, advantages, values, old_values, returns, loss_mask, *,
             clip_low=0.2, clip_high=0.2, value_clip: float | None = 0.2, vf_coef=0.5,
             ref_logp=None, kl_coef=0.0, kl_estimator: str = 'k3',
             aggregation: str = 'token_mean', max_tokens: int | None = None, entropy=None):
  """pg_loss + vf_coef * value_loss (+ kl_coef * KL loss, if a KL *loss* is wanted).

  PPO-RLHF usually puts the KL into the reward instead (token_rewards_with_kl_penalty,
  then gae); both are available and can be combined.

  Args:
    logp, old_logp, advantages (B, T): as ppo_policy_loss.
    values, old_values, returns (B, T): as value_loss.
    loss_mask: (B, T).
    value_clip: value_loss's clip. vf_coef: weight of the value loss (0.5 by default;
      irrelevant when the critic has its own parameters and optimizer).
    ref_logp, kl_coef, kl_estimator: optional KL loss term (see kl.kl_penalty).
    aggregation, max_tokens: used for all terms.

  Returns:
    (loss, metrics): loss, pg_loss, value_loss, kl (when ref_logp is given) and the
    diagnostics of the parts.
  """
  pg, metrics = ppo_policy_loss(logp, old_logp, advantages, loss_mask, clip_low=clip_low,
                                clip_high=clip_high, aggregation=aggregation,
                                max_tokens=max_tokens, entropy=entropy)
  vf, vf_metrics = value_loss(values, old_values, returns, loss_mask, clip=value_clip,
                              aggregation=aggregation, max_tokens=max_tokens)
  kl, kl_metrics = kl_penalty(logp, ref_logp, loss_mask, kl_coef=kl_coef, estimator=kl_estimator,
                              aggregation=aggregation, max_tokens=max_tokens)
  loss = pg + vf_coef * vf + kl
  metrics.update(vf_metrics)
  metrics.update(kl_metrics)
  metrics['loss'] = jax.lax.stop_gradient(loss)
  return loss, metrics


def token_rewards_with_kl_penalty(rewards, old_logp, ref_logp, loss_mask, kl_coef,
                                  estimator: str = 'k1'):
  """PPO-RLHF per-token rewards: -kl_coef * KL_t on every token, plus the outcome reward on the last.

  Args:
    rewards: (B,) outcome rewards. old_logp, ref_logp: (B, T) rollout-time and
      reference log-probs. loss_mask: (B, T). kl_coef: float.
    estimator: per-token KL estimator ('k1' is the InstructGPT/OpenRLHF convention).

  Returns:
    (B, T) float32 token rewards for advantages.gae, 0 at masked-out positions.
  """
  mask = as_mask(loss_mask)
  check_per_token('old_logp', jnp.asarray(old_logp), mask)
  check_per_token('ref_logp', jnp.asarray(ref_logp), mask)
  kl = kl_per_token(masked(jnp.asarray(old_logp, jnp.float32), mask),
                    masked(jnp.asarray(ref_logp, jnp.float32), mask), estimator)
  return jax.lax.stop_gradient(terminal_token_rewards(rewards, mask) - kl_coef * masked(kl, mask))


def init_value_head(d: int, key, scale: float = 0.1, dtype=jnp.float32):
  """A linear value head {'w': (d,), 'b': ()}: w ~ N(0, scale^2 / d), b = 0.

  With RMS-normalised features phi (|phi| ~ sqrt(d)), initial values have std ~ scale,
  small next to 0/1 outcome rewards, so the first value errors do not swamp a shared
  backbone's gradients.
  """
  if not isinstance(d, int) or d <= 0:
    raise ValueError(f'd={d!r}; expected the positive feature width (QwenConfig.hidden_size).')
  w = (scale / math.sqrt(d)) * jax.random.normal(key, (d,), jnp.float32)
  return {'w': w.astype(dtype), 'b': jnp.zeros((), dtype)}


def value_head(params, phi):
  """V = phi @ w + b: params {'w': (d,), 'b': ()}, phi (B, T, d) (qwen.features) -> (B, T) float32.

  phi[:, t] is the state before token t + 1 is emitted, so the values aligned with
  qwen.token_logprobs (which scores tokens[:, 1:]) are value_head(params, phi)[:, :-1].
  """
  phi = jnp.asarray(phi)
  if phi.ndim != 3 or phi.shape[-1] != params['w'].shape[0]:
    raise ValueError(f'phi has shape {phi.shape}; expected (B, T, {params["w"].shape[0]}) to match '
                     f"the value head's w {params['w'].shape}.")
  return (jnp.einsum('btd,d->bt', phi.astype(jnp.float32), params['w'].astype(jnp.float32))
          + params['b'].astype(jnp.float32))
