"""RL losses over a group-major rollout batch: pure, jit-able functions of (B, T) arrays.

Conventions shared by every module: per-token arrays are (B, T) aligned with the
completion tokens; loss_mask (B, T) is 1 on tokens that count; logp are the current
params' log-probs, old_logp the sampling-time ones, ref_logp the frozen reference's;
prompt p's G samples are rows p*G .. p*G+G-1. Each loss returns (loss, metrics).
"""
from cfrl_jax.rl.advantages import (batch_mean_baseline, gae, group_mean_baseline, group_normalized,
                                    masked_whiten, rloo, terminal_token_rewards)
from cfrl_jax.rl.aggregate import AGGREGATION_MODES, aggregate
from cfrl_jax.rl.expert_iteration import normalise_whitespace, select_for_sft, select_rows
from cfrl_jax.rl.grpo import grpo_loss
from cfrl_jax.rl.kl import KL_ESTIMATORS, kl_penalty, kl_per_token
from cfrl_jax.rl.ppo import (clipped_surrogate, init_value_head, ppo_loss, ppo_policy_loss,
                             token_rewards_with_kl_penalty, value_head, value_loss)
from cfrl_jax.rl.reinforce import BASELINES, reinforce_advantages, reinforce_loss
from cfrl_jax.rl.sft import sft_loss
