"""How per-token losses become one scalar: the three GRPO-family normalisations.

Every RL loss in cfrl_jax produces a per-token array (B, T) aligned with the
completion tokens, plus a loss_mask (B, T) that is 1 on the tokens that count.
The choice of denominator is not cosmetic: it decides how much each token's
gradient weighs relative to the others, and the GRPO variants differ exactly here.

  'seq_mean'    (1/S) sum_i (1/|o_i|) sum_t x_it        original GRPO (DeepSeekMath); TRL loss_type='grpo'
  'token_mean'  (1/sum_i |o_i|) sum_i sum_t x_it         DAPO's token-level loss; TRL 'bnpo'/'dapo'
  'constant'    (1/(B * max_tokens)) sum_i sum_t x_it    Dr. GRPO; TRL 'dr_grpo'

|o_i| = sum_t loss_mask[i, t]. S in 'seq_mean' is the number of rows with at least
one counted token, so all-masked padding rows (e.g. rows added to reach a fixed
batch size) neither contribute nor dilute; TRL divides by B instead, which is the
same whenever no row is empty. In 'constant', B is the number of rows (padding
rows included) and max_tokens is the generation budget: a fixed constant that does
not depend on the batch's lengths, which removes the length bias of the other two.

Note for micro-batched trainers: 'seq_mean' and 'token_mean' normalise by counts of
the arrays they are given, so averaging micro-batch losses is not the loss of the
whole batch unless all micro-batches have equal counts. 'constant' has no such issue.
"""
from __future__ import annotations

import jax.numpy as jnp

AGGREGATION_MODES = ('seq_mean', 'token_mean', 'constant')


def check_aggregation(mode: str, max_tokens: int | None = None) -> None:
  """Raises ValueError for an unknown mode, or for 'constant' without a positive max_tokens."""
  if mode not in AGGREGATION_MODES:
    raise ValueError(f'aggregation mode {mode!r} is unknown; valid modes are {AGGREGATION_MODES} '
                     "('seq_mean': original GRPO, 'token_mean': DAPO, 'constant': Dr. GRPO).")
  if mode == 'constant':
    if max_tokens is None:
      raise ValueError("aggregation='constant' (Dr. GRPO) needs max_tokens, the fixed per-sequence "
                       'token budget (e.g. the max_new_tokens used for sampling).')
    if not isinstance(max_tokens, (int, float)) or max_tokens <= 0:
      raise ValueError(f'max_tokens={max_tokens!r}; expected a positive Python number.')


def check_per_token(name: str, x, loss_mask) -> None:
  """Raises ValueError unless x has loss_mask's (B, T) shape."""
  if loss_mask.ndim != 2:
    raise ValueError(f'loss_mask has shape {loss_mask.shape}; expected (B, T) aligned with the '
                     'completion tokens.')
  if x.shape != loss_mask.shape:
    raise ValueError(f'{name} has shape {x.shape} but loss_mask has shape {loss_mask.shape}; '
                     'per-token arrays must be (B, T) and aligned with loss_mask.')


def wide(x):
  """x as an array of at least float32: 16-bit inputs are promoted, float64 stays float64 (never a downcast)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def as_mask(loss_mask):
  """loss_mask as float32 (accepts bool or integer masks)."""
  return jnp.asarray(loss_mask).astype(jnp.float32)


def masked(x, loss_mask):
  """x with every masked-out entry replaced by 0.

  A `where`, not a product, so that inf/NaN at padding positions (e.g. log-probs of
  pad tokens) cannot leak into sums: 0 * inf is NaN, where(False, inf, 0) is 0.
  """
  return jnp.where(loss_mask > 0, x, jnp.zeros_like(x))


def aggregate(per_token, loss_mask, mode: str = 'token_mean', max_tokens: int | None = None):
  """Reduces a per-token quantity to a scalar.

  Args:
    per_token: (B, T) values; entries where loss_mask == 0 are ignored (even inf/NaN).
    loss_mask: (B, T) float/bool, 1 on counted completion tokens.
    mode: 'seq_mean' | 'token_mean' | 'constant' (see the module docstring).
    max_tokens: Python number, required for 'constant': the denominator is B * max_tokens.

  Returns:
    Scalar float32. An all-masked batch gives 0, not NaN.
  """
  check_aggregation(mode, max_tokens)
  per_token = jnp.asarray(per_token)
  mask = as_mask(loss_mask)
  check_per_token('per_token', per_token, mask)
  x = masked(per_token.astype(jnp.promote_types(per_token.dtype, jnp.float32)), mask) * mask
  if mode == 'token_mean':
    return jnp.sum(x) / jnp.maximum(jnp.sum(mask), 1.0)
  if mode == 'seq_mean':
    lengths = jnp.sum(mask, axis=1)
    seq_means = jnp.sum(x, axis=1) / jnp.maximum(lengths, 1.0)
    num_sequences = jnp.sum((lengths > 0).astype(jnp.float32))
    return jnp.sum(seq_means) / jnp.maximum(num_sequences, 1.0)
  return jnp.sum(x) / (per_token.shape[0] * float(max_tokens))


def token_mean(per_token, loss_mask):
  """Mean over counted tokens; the reduction used for diagnostics (metrics) everywhere."""
  return aggregate(per_token, loss_mask, 'token_mean')
