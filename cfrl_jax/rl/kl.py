"""Per-token estimators of KL(pi || pi_ref) from sampled tokens' log-probabilities.

Direction. The KL-regularised RL objective is E_pi[reward] - beta KL(pi || pi_ref):
the *reverse* KL, with the expectation under the policy being trained. That is the
direction the tokens let us estimate, since they were sampled from the policy
(temperature 1), and it is the one GRPO (DeepSeekMath), PPO-RLHF and TRL/tunix use.
It is mode-seeking: pi is penalised for putting mass where pi_ref has little.

With x = logp - ref_logp = log pi(y)/pi_ref(y) and y ~ pi (Schulman, "Approximating
KL divergence", 2020):

  'k1'  x                       unbiased, high variance, can be negative per token
  'k2'  x^2 / 2                 biased, low variance, >= 0 (its gradient is that of the
                                 reverse KL when used as a loss, on-policy)
  'k3'  exp(-x) + x - 1         unbiased, low variance, >= 0 (GRPO's "KL loss")

For a small difference k3 ~ k2 = k1^2 / 2. Summed against pi(y) over the whole
vocabulary, k1 and k3 give KL(pi || pi_ref) exactly (tests check this).

As loss terms, these are differentiated directly (the GRPO / TRL convention). Note
that d k1/d logp = 1 is a constant push down on every sampled token (like an entropy
bonus), and that differentiating k3 does not give an unbiased gradient of the KL;
the estimator choice therefore matters for the gradient, not only for the value.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cfrl_jax.rl.aggregate import aggregate, as_mask, check_per_token, masked, token_mean, wide

KL_ESTIMATORS = ('k1', 'k2', 'k3')


def check_estimator(estimator: str) -> None:
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f'KL estimator {estimator!r} is unknown; valid estimators are {KL_ESTIMATORS} '
                     "('k1': log-ratio, 'k2': half squared log-ratio, 'k3': Schulman's low-variance "
                     'estimator used by GRPO).')


def kl_per_token(logp, ref_logp, estimator: str = 'k3', clip: float | None = None):
  """Per-token estimate of KL(pi || pi_ref) at the sampled tokens.

  Args:
    logp: (...) log pi(y_t | context) under the policy (the current params in a loss).
    ref_logp: (...) same shape, log pi_ref(y_t | context) under the frozen reference.
    estimator: 'k1' | 'k2' | 'k3'.
    clip: optional bound c; the estimate is clipped to [-c, c] so that one token with
      a huge log-ratio (exp overflow in k3) cannot produce an inf loss. None: no clip.

  Returns:
    (...) float32 per-token estimates (no masking: pair with aggregate()).
  """
  check_estimator(estimator)
  if clip is not None and not clip > 0:
    raise ValueError(f'clip={clip!r}; expected a positive bound or None.')
  logp = wide(logp)
  ref_logp = wide(ref_logp)
  if logp.shape != ref_logp.shape:
    raise ValueError(f'logp has shape {logp.shape} but ref_logp has shape {ref_logp.shape}.')
  x = logp - ref_logp
  if estimator == 'k1':
    kl = x
  elif estimator == 'k2':
    kl = 0.5 * jnp.square(x)
  else:
    # expm1 keeps exp(-x) - 1 accurate for small x, where k3 ~ x^2/2 is the difference
    # of two O(1) terms and would otherwise lose its digits to cancellation.
    kl = jnp.expm1(-x) + x
  if clip is not None:
    kl = jnp.clip(kl, -clip, clip)
  return kl


def kl_penalty(logp, ref_logp, loss_mask, *, kl_coef=0.0, estimator: str = 'k3',
               aggregation: str = 'token_mean', max_tokens: int | None = None):
  """The KL loss term kl_coef * aggregate(KL per token), shared by GRPO, PPO and REINFORCE.

  Args:
    logp: (B, T) current log-probs (differentiated).
    ref_logp: (B, T) reference log-probs (held constant), or None: allowed only when
      kl_coef is the Python number 0, and then nothing about the reference is needed.
    loss_mask: (B, T).
    kl_coef: Python float or scalar array (an array needs ref_logp).
    estimator, aggregation, max_tokens: see kl_per_token and aggregate.

  Returns:
    (penalty scalar, metrics): metrics has 'kl' (token mean of the estimate) and
    'kl_penalty' when ref_logp is given, and is empty otherwise.
  """
  check_estimator(estimator)
  if ref_logp is None:
    if isinstance(kl_coef, (int, float)) and kl_coef == 0:
      return jnp.zeros((), jnp.float32), {}
    raise ValueError(f'kl_coef={kl_coef!r} needs ref_logp (the frozen reference policy\'s log-probs '
                     'of the sampled tokens); pass ref_logp or set kl_coef=0.0.')
  mask = as_mask(loss_mask)
  check_per_token('logp', jnp.asarray(logp), mask)
  check_per_token('ref_logp', jnp.asarray(ref_logp), mask)
  ref_logp = jax.lax.stop_gradient(wide(ref_logp))
  kl = kl_per_token(masked(wide(logp), mask), masked(ref_logp, mask), estimator)
  penalty = kl_coef * aggregate(kl, mask, aggregation, max_tokens)
  metrics = {'kl': jax.lax.stop_gradient(token_mean(kl, mask)),
             'kl_penalty': jax.lax.stop_gradient(penalty)}
  return penalty, metrics
