"""Advantages: group baselines for GRPO/RLOO/REINFORCE and GAE for PPO.

Rows are ordered group-major: prompt p's G samples are rows p*G .. p*G + G - 1, so a
(B,) reward vector reshapes to (B // G, G). Every function here returns values under
stop_gradient: advantages are targets, never something to differentiate through.
"""
from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from cfrl_jax.rl.aggregate import as_mask, check_per_token, masked


def _rewards_vector(rewards):
  rewards = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
  if rewards.ndim != 1:
    raise ValueError(f'rewards has shape {rewards.shape}; expected (B,), one scalar per sampled '
                     'completion, ordered group-major.')
  return rewards


def _grouped(rewards, group_size: int, min_group: int = 1):
  """(B,) -> (B // G, G), with a clear error when B is not a multiple of G."""
  rewards = _rewards_vector(rewards)
  try:
    G = operator.index(group_size)
  except TypeError:
    G = None
  if G is None or G < min_group:
    raise ValueError(f'group_size={group_size!r}; expected a Python int >= {min_group} '
                     '(a group of one sample has no baseline besides itself).')
  if rewards.shape[0] % G:
    raise ValueError(f'{rewards.shape[0]} rewards do not split into groups of {G}: B must '
                     'be num_prompts * group_size, with rows ordered group-major '
                     '(prompt p owns rows p*G .. p*G+G-1).')
  return rewards.reshape(-1, G)


def group_normalized(rewards, group_size: int, scale_by_std: bool = True, eps: float = 1e-6,
                     ddof: int = 1):
  """GRPO advantage (r_i - mean_g r) / (std_g r + eps); Dr. GRPO: scale_by_std=False.

  Args:
    rewards: (B,) scalar rewards, group-major.
    group_size: G, a Python int >= 2 dividing B.
    scale_by_std: divide by the group's standard deviation (GRPO) or not (Dr. GRPO).
    eps: added to the std.
    ddof: 1 (default) is the sample std that TRL and tunix use; 0 the population std.

  Returns:
    (B,) float32. A group whose rewards are all equal gets exactly 0 (no NaN, and no
    rounding residue amplified by 1/eps).
  """
  grouped = _grouped(rewards, group_size, min_group=2)
  centered = grouped - jnp.mean(grouped, axis=1, keepdims=True)
  if scale_by_std:
    std = jnp.std(grouped, axis=1, ddof=ddof, keepdims=True)
    centered = centered / (std + eps)
  constant = jnp.max(grouped, axis=1, keepdims=True) == jnp.min(grouped, axis=1, keepdims=True)
  return jnp.where(constant, 0.0, centered).reshape(-1)


def group_mean_baseline(rewards, group_size: int):
  """r_i - mean of its group (the mean includes r_i). Equals group_normalized(scale_by_std=False)."""
  return group_normalized(rewards, group_size, scale_by_std=False)


def rloo(rewards, group_size: int):
  """REINFORCE leave-one-out: r_i minus the mean of the OTHER G - 1 rewards of its group.

  Args:
    rewards: (B,) group-major; group_size: G >= 2 dividing B.
  Returns:
    (B,) float32. Equals G / (G - 1) * (r_i - group mean).
  """
  grouped = _grouped(rewards, group_size, min_group=2)
  G = grouped.shape[1]
  others_mean = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (G - 1)
  return (grouped - others_mean).reshape(-1)


def batch_mean_baseline(rewards):
  """r_i - mean over the whole batch: (B,) -> (B,), float32 (REINFORCE with a mean baseline)."""
  rewards = _rewards_vector(rewards)
  return rewards - jnp.mean(rewards)


def masked_whiten(values, loss_mask, shift_mean: bool = True, eps: float = 1e-8):
  """(x - mean) / std over counted tokens (PPO's advantage normalisation). (B, T) -> (B, T).

  shift_mean=False only rescales (keeps the sign of every advantage). Masked-out
  entries are returned as 0.
  """
  mask = as_mask(loss_mask)
  values = jnp.asarray(values, jnp.float32)
  check_per_token('values', values, mask)
  x = masked(values, mask)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  mean = jnp.sum(x * mask) / n
  var = jnp.sum(jnp.square(x - mean) * mask) / n
  out = (x - mean) if shift_mean else x
  return jax.lax.stop_gradient(masked(out * jax.lax.rsqrt(var + eps), mask))


def last_token_index(loss_mask):
  """(B,) int32 index of the last counted token of each row (0 for an all-masked row)."""
  mask = as_mask(loss_mask)
  T = mask.shape[1]
  positions = jnp.arange(T)[None, :]
  return jnp.max(jnp.where(mask > 0, positions, 0), axis=1).astype(jnp.int32)


def terminal_token_rewards(rewards, loss_mask):
  """Places each sequence's scalar reward on its last counted token: (B,), (B, T) -> (B, T).

  The per-token reward layout that gae() expects for an outcome reward. All-masked
  rows get no reward at all.
  """
  rewards = _rewards_vector(rewards)
  mask = as_mask(loss_mask)
  if mask.ndim != 2 or mask.shape[0] != rewards.shape[0]:
    raise ValueError(f'rewards {rewards.shape} and loss_mask {mask.shape} disagree: expected (B,) '
                     'and (B, T).')
  onehot = jax.nn.one_hot(last_token_index(mask), mask.shape[1], dtype=jnp.float32)
  has_tokens = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
  return onehot * (rewards * has_tokens)[:, None]


def gae(token_rewards, values, loss_mask, gamma: float = 1.0, lam: float = 0.95):
  """Generalised advantage estimation over the counted tokens, as a reverse lax.scan.

  For counted tokens t < t' consecutive in the mask (masked-out positions, such as
  right padding or a left-padded start, are skipped as if absent):

    delta_t = r_t + gamma * V_t' - V_t,      A_t = delta_t + gamma * lam * A_t'

  and after the last counted token V = 0 and A = 0 (the episode ends there), so an
  outcome reward belongs on the last counted token (terminal_token_rewards). Rewards
  and values at masked-out positions are ignored.

  Args:
    token_rewards: (B, T) per-token rewards (e.g. outcome reward at the last token,
      minus a per-token KL penalty for PPO-RLHF).
    values: (B, T) critic values V(s_t) at the state before token t was emitted.
    loss_mask: (B, T).
    gamma, lam: discount and GAE lambda (Echo Chamber PPO: gamma=1, lam=0.95).

  Returns:
    (advantages (B, T), returns (B, T)) float32, returns = advantages + values, both 0
    at masked-out positions and both under stop_gradient.
  """
  mask = as_mask(loss_mask)
  token_rewards = jnp.asarray(token_rewards, jnp.float32)
  values = jnp.asarray(values, jnp.float32)
  check_per_token('token_rewards', token_rewards, mask)
  check_per_token('values', values, mask)
  rewards = jax.lax.stop_gradient(masked(token_rewards, mask))
  values = jax.lax.stop_gradient(masked(values, mask))
  B = mask.shape[0]

  def step(carry, inputs):
    next_value, next_advantage = carry
    r, v, m = inputs
    delta = r + gamma * next_value - v
    advantage = delta + gamma * lam * next_advantage
    keep = m > 0
    carry = (jnp.where(keep, v, next_value), jnp.where(keep, advantage, next_advantage))
    return carry, jnp.where(keep, advantage, 0.0)

  init = (jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.float32))
  _, advantages = jax.lax.scan(step, init, (rewards.T, values.T, mask.T), reverse=True)
  advantages = advantages.T
  returns = masked(advantages + values, mask)
  return advantages, returns


def kl_penalized_returns(seq_rewards, logp, ref_logp, loss_mask, kl_coef: float):
  """Returns-to-go (gamma = 1) of the per-token reward -kl_coef * (logp_t - ref_logp_t), plus the
  sequence reward on the last counted token: the k1 KL folded into the reward, as Echo Chamber's code
  (OpenRLHF's compute_reward + cumulative returns) does for REINFORCE-baseline. (B,), (B, T) x3 -> (B, T).

    G_t = seq_reward * [t <= last] - kl_coef * sum_{s >= t, counted} (logp_s - ref_logp_s)

  logp are the rollout policy's log-probs (held constant); ref_logp None means kl_coef is unused.
  Masked-out positions are 0.
  """
  mask = as_mask(loss_mask)
  token_rewards = terminal_token_rewards(seq_rewards, mask)
  if ref_logp is not None and kl_coef:
    logp = jnp.asarray(logp, jnp.float32)
    ref_logp = jnp.asarray(ref_logp, jnp.float32)
    check_per_token('logp', logp, mask)
    check_per_token('ref_logp', ref_logp, mask)
    token_rewards = token_rewards - kl_coef * masked(logp - ref_logp, mask)
  token_rewards = jax.lax.stop_gradient(token_rewards)
  returns = jnp.flip(jnp.cumsum(jnp.flip(token_rewards, axis=1), axis=1), axis=1)
  return masked(returns, mask)


def echo_chamber_reinforce_advantages(rewards, logp, ref_logp, loss_mask, group_size: int,
                                      kl_coef: float = 0.0):
  """Echo Chamber's REINFORCE-baseline token advantages: (B,), (B, T) x3 -> (B, T).

  Group-mean baseline on the sequence rewards, k1 KL folded into per-token rewards, returns-to-go
  (kl_penalized_returns), then whitened over every counted token of the batch (masked_whiten).
  """
  centred = group_mean_baseline(rewards, group_size)
  return masked_whiten(kl_penalized_returns(centred, logp, ref_logp, loss_mask, kl_coef), loss_mask)
