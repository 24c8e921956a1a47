"""Supervised cross-entropy on response tokens (Expert Iteration's SFT step, LP-FT's probe).

    loss = aggregate(-logp_t)

with logp the log-probs of the target tokens (qwen.token_logprobs on prompt +
response, loss_mask 1 on the response only). 'token_mean' is the usual mean NLL
per token; 'seq_mean' weighs every sequence equally whatever its length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cfrl_jax.rl.aggregate import aggregate, as_mask, check_aggregation, check_per_token, masked, token_mean


def sft_loss(logp, loss_mask, aggregation: str = 'token_mean', max_tokens: int | None = None):
  """Negative log-likelihood of the target tokens.

  Args:
    logp: (B, T) log-probs of the target tokens under the current params.
    loss_mask: (B, T) 1 on response tokens that count (prompt and padding 0).
    aggregation: 'token_mean' (default) | 'seq_mean' | 'constant' (needs max_tokens).

  Returns:
    (loss, metrics): loss, nll (token mean), perplexity (exp of the token-mean NLL),
    seq_nll (mean over sequences of the summed NLL, i.e. -log p(response)), num_tokens.
  """
  check_aggregation(aggregation, max_tokens)
  mask = as_mask(loss_mask)
  logp = jnp.asarray(logp)
  logp = logp.astype(jnp.promote_types(logp.dtype, jnp.float32))   # never below float32; float64 stays
  check_per_token('logp', logp, mask)
  nll = -masked(logp, mask)
  loss = aggregate(nll, mask, aggregation, max_tokens)
  sg = jax.lax.stop_gradient
  mean_nll = sg(token_mean(nll, mask))
  metrics = {'loss': sg(loss), 'nll': mean_nll, 'perplexity': jnp.exp(mean_nll),
             'seq_nll': sg(jnp.mean(jnp.sum(nll * mask, axis=1))), 'num_tokens': jnp.sum(mask)}
  return loss, metrics
