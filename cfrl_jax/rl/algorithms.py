"""The algorithms a run can name in config.rl.algorithm: one table of what each one is made of.

Each row says which step of the trainer runs it, how sequence rewards become advantages, which
loss the learner minimises, and what it supports. The trainer (train/trainer.py), the config
checks (config.py) and the study's built-in arms (arms.py) read this table instead of switching on
the name.

    algorithm(name).advantages(rewards (B,), rl) -> (B,) advantages   (None: PPO's GAE from a critic)
    algorithm(name).loss(logp (B, N), batch, rl) -> (loss, metrics)   (the learner's objective on the
        completion tokens; train/objectives.py adds the forward pass; batch keys as listed there)

rl is config.rl. The functions are pure and use the rl/ maths only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from cfrl_jax.rl import advantages as adv
from cfrl_jax.rl import grpo, ppo, reinforce, sft

POLICY_GRADIENT, EXPERT_ITERATION, SFT = 'policy_gradient', 'expert_iteration', 'sft'


def _never(rl) -> bool:
  del rl
  return False


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One row of the table.

  step: which trainer step runs it: POLICY_GRADIENT (sample, score, advantages, learner minibatches),
    EXPERT_ITERATION (sample, keep the correct completions, SFT on them) or SFT (reference solutions).
  advantages: (rewards (B,), rl) -> (B,) sequence advantages, computed over the whole batch (every
    process's rows); None when they come from elsewhere (PPO: GAE over a critic's values) or the
    step has none.
  loss: (logp (B, N), batch, rl) -> (loss, metrics), the learner's objective.
  per_host: with several processes and config.mesh.data_loading='per_host', each process loads,
    samples and scores only its share of the prompts (Expert Iteration and SFT build the whole
    batch on every process).
  critic: trains a value critic beside the policy (PPO).
  group_baseline(rl): the advantages take a baseline from the other samples of a prompt's group
    under these settings, so a group of one has none.
  kl_in_returns(rl): the KL to the reference goes into whitened token returns, not the loss (the
    Echo Chamber's REINFORCE).
  cfrl_arms: the study has CF-RL variants and controls of it among its built-in arms (arms.py).
  """
  name: str
  step: str
  advantages: Callable[[Any, Any], Any] | None
  loss: Callable[[Any, dict, Any], tuple]
  per_host: bool
  critic: bool = False
  group_baseline: Callable[[Any], bool] = _never
  kl_in_returns: Callable[[Any], bool] = _never
  cfrl_arms: bool = False

  @property
  def samples(self) -> bool:
    """Its step samples completions from the policy (SFT trains on reference solutions instead)."""
    return self.step != SFT

  def rows_per_prompt(self, rl) -> int:
    """Rows each prompt puts into a step's batch: rl.group_size samples (policy gradient),
    rl.ei.samples_per_prompt (Expert Iteration, before filtering) or its one reference solution (SFT)."""
    return {POLICY_GRADIENT: rl.group_size, EXPERT_ITERATION: rl.ei.samples_per_prompt, SFT: 1}[self.step]

  def loss_takes_reference(self, rl) -> bool:
    """The learner's batch carries the reference policy's log-probs (B, N) for a KL term in the loss.
    PPO and the Echo Chamber's REINFORCE fold the KL into token rewards / returns instead."""
    return self.step == POLICY_GRADIENT and rl.kl_coef > 0 and not self.critic and not self.kl_in_returns(rl)

  def token_advantages(self, rl) -> bool:
    """The learner's advantages are per token, (B, N) (GAE over the critic's values, or whitened
    KL-penalised returns), rather than one per sequence, (B,)."""
    return self.critic or self.kl_in_returns(rl)


# --- advantages ---------------------------------------------------------------------
def _group_normalized(rewards, rl):
  return adv.group_normalized(rewards, rl.group_size, scale_by_std=rl.scale_by_std)


def _rloo(rewards, rl):
  return adv.rloo(rewards, rl.group_size)


def _reinforce(rewards, rl):
  return reinforce.reinforce_advantages(rewards, rl.baseline, rl.group_size)


# --- losses ------------------------------------------------------------------------------
def _clipped_surrogate_loss(logp, batch, rl, kl_coef):
  return grpo.grpo_loss(
      logp, batch['old_logp'], batch.get('ref_logp'), batch['advantages'], batch['completion_mask'],
      clip_low=rl.clip_low, clip_high=rl.clip_high, kl_coef=kl_coef, kl_estimator=rl.kl_estimator,
      aggregation=rl.aggregation, max_tokens=rl.max_new_tokens)


def grpo_loss(logp, batch, rl):
  """GRPO / DAPO / Dr. GRPO clipped surrogate with an optional KL to the reference."""
  return _clipped_surrogate_loss(logp, batch, rl, rl.kl_coef)


def rloo_loss(logp, batch, rl):
  """REINFORCE on the advantages the trainer computed (the baseline, e.g. RLOO's leave-one-out mean,
  already subtracted), with an optional KL term."""
  return reinforce.reinforce_loss(
      logp, batch['advantages'], batch['completion_mask'], baseline='none', aggregation=rl.aggregation,
      max_tokens=rl.max_new_tokens, ref_logp=batch.get('ref_logp'), kl_coef=rl.kl_coef,
      kl_estimator=rl.kl_estimator)


def reinforce_loss(logp, batch, rl):
  """rloo_loss; in the Echo Chamber style (rl.reinforce_style) PPO's clipped surrogate on the token
  advantages without a KL term instead (the KL is already in the advantages)."""
  if rl.reinforce_style == 'echo_chamber':
    return _clipped_surrogate_loss(logp, batch, rl, 0.0)
  return rloo_loss(logp, batch, rl)


def ppo_loss(logp, batch, rl):
  """PPO's clipped policy loss on GAE token advantages; a KL penalty, if any, is already in the token
  rewards behind them (the classic PPO-RLHF placement). The critic has its own loss."""
  return ppo.ppo_policy_loss(logp, batch['old_logp'], batch['advantages'], batch['completion_mask'],
                             clip_low=rl.clip_low, clip_high=rl.clip_high, aggregation=rl.aggregation,
                             max_tokens=rl.max_new_tokens)


def sft_loss(logp, batch, rl=None, aggregation: str = 'token_mean'):
  """Cross-entropy on the completion tokens (Expert Iteration, SFT / LP-FT, pretraining)."""
  del rl
  return sft.sft_loss(logp, batch['completion_mask'], aggregation=aggregation)


TABLE: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm('grpo', POLICY_GRADIENT, _group_normalized, grpo_loss, per_host=True,
              group_baseline=lambda rl: True, cfrl_arms=True),
    Algorithm('reinforce', POLICY_GRADIENT, _reinforce, reinforce_loss, per_host=True,
              group_baseline=lambda rl: rl.baseline in ('group_mean', 'rloo'),
              kl_in_returns=lambda rl: rl.reinforce_style == 'echo_chamber'),
    Algorithm('rloo', POLICY_GRADIENT, _rloo, rloo_loss, per_host=True,
              group_baseline=lambda rl: True, cfrl_arms=True),
    Algorithm('ppo', POLICY_GRADIENT, None, ppo_loss, per_host=True, critic=True, cfrl_arms=True),
    Algorithm('expert_iteration', EXPERT_ITERATION, None, sft_loss, per_host=False),
    Algorithm('sft', SFT, None, sft_loss, per_host=False),
)}
ALGORITHMS = tuple(TABLE)


def algorithm(name: str) -> Algorithm:
  """The table's row for config.rl.algorithm, or a ValueError naming the valid ones."""
  if name not in TABLE:
    raise ValueError(f'config.rl.algorithm={name!r}; expected one of {ALGORITHMS}.')
  return TABLE[name]
