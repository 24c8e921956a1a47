"""Token choice: one next token per row from its logits, greedy or sampled.

sampling_logits applies temperature, top-k and top-p (nucleus) to (B, V) logits; draw samples
from the result by inverting its CDF with one uniform per row; first_argmax is the greedy pick.
choose combines them into the decode loop's (tokens, raw log-probs, sampling log-probs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sampling_logits(logits, temperature=1.0, top_k: int = 0, top_p=1.0, *,
                    use_top_p: bool | None = None, top_p_candidates: int = 64):
  """The logits of the sampling distribution: z / T, then top-k, then top-p (HF's order).

  logits: (..., V). Tokens outside the kept set get -inf; softmax of the result is the
  distribution sampled from. top_k: static int, 0 = off (ties with the k-th value are kept).
  top_p: nucleus mass in (0, 1] (may be traced); keeps the smallest set of most likely tokens
  whose mass reaches top_p, after top-k (ties with the last kept value are kept). use_top_p:
  static switch; default (top_p < 1) needs a concrete top_p. top_p_candidates: the nucleus is
  first looked for among this many top tokens (a cheap top-k instead of a sort of the whole
  vocabulary); rows whose nucleus is larger fall back to an exact bisection on the threshold.
  """
  z = logits.astype(jnp.float32) / temperature
  V = z.shape[-1]
  if use_top_p is None:
    use_top_p = float(top_p) < 1.0
  neg_inf = jnp.array(-jnp.inf, z.dtype)
  if 0 < top_k < V:
    candidates = jax.lax.top_k(z, top_k)[0]          # (..., k), descending
    z = jnp.where(z < candidates[..., -1:], neg_inf, z)
    exhaustive = True                                # the k values hold all the remaining mass
  else:
    candidates = None
    exhaustive = False
  if not use_top_p:
    return z
  lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
  if candidates is None:
    k = min(V, max(1, int(top_p_candidates)))
    candidates = jax.lax.top_k(z, k)[0]
    exhaustive = k == V
  probs = jnp.exp(candidates - lse)
  mass_through = jnp.cumsum(probs, axis=-1)
  # Keep a token while the mass strictly above it is < top_p; the top token is always kept.
  n_keep = jnp.maximum(jnp.sum(mass_through - probs < top_p, axis=-1, keepdims=True), 1)
  cutoff = jnp.take_along_axis(candidates, n_keep - 1, axis=-1)
  if not exhaustive:
    covered = jnp.all(mass_through[..., -1] >= top_p)
    cutoff = jax.lax.cond(covered, lambda: cutoff, lambda: _nucleus_cutoff_bisection(z, lse, top_p))
  return jnp.where(z < cutoff, neg_inf, z)


def _nucleus_cutoff_bisection(z, lse, top_p, iterations: int = 40):
  """The largest logit value t with mass(z >= t) >= top_p, per row: z (..., V) -> (..., 1).

  Bisection keeps mass(z >= lo) >= top_p > mass(z >= hi); 40 halvings bring lo and hi to
  neighbouring float32 values, so {z >= lo} is exactly the nucleus.
  """
  probs = jnp.exp(z - lse)
  mass_at = lambda t: jnp.sum(jnp.where(z >= t, probs, 0.0), axis=-1, keepdims=True)
  lo = jnp.min(jnp.where(jnp.isfinite(z), z, jnp.inf), axis=-1, keepdims=True)
  top = jnp.max(z, axis=-1, keepdims=True)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) / 2
    ok = mass_at(mid) >= top_p
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, iterations, halve, (lo, top))
  return jnp.where(mass_at(top) >= top_p, top, lo)


def first_argmax(z):
  """jnp.argmax(z, axis=-1) (the first index of the maximum), z (..., V) -> (...,) int32.

  A max and a min reduction: XLA:CPU lowers jnp.argmax to a variadic (value, index) reduction
  that a profile of the decode step showed far slower than these two plain ones. A row holding
  NaN yields index V - 1 (jnp.argmax would point at the NaN).
  """
  V = z.shape[-1]
  top = jnp.max(z, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(z == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
  return jnp.minimum(first, V - 1)


def logprob_of(z, tokens):
  """log softmax(z)[tokens] without materialising the (B, V) log-softmax. z (B, V), tokens (B,)."""
  return jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(z, axis=-1)


def _last_with_mass(p):
  """Index of the last entry > 0 along the last axis, -1 if none. p (..., n) -> (...,) int32."""
  return jnp.max(jnp.where(p > 0, jnp.arange(p.shape[-1], dtype=jnp.int32), -1), axis=-1)


def draw(key, z, block: int = 256):
  """One token per row from softmax(z), z (B, V) (-inf allowed), by inverting the CDF.

  key: one PRNG key for the whole batch (row r uses fold_in(key, r)).

  One uniform per row instead of jax.random.categorical's V Gumbel draws (the per-step cost
  that dominated sampling on CPU). The CDF is inverted in two levels, over per-block masses of
  `block` tokens and then inside the chosen block: a cumulative sum over all V tokens cost a
  decode step more than its attention (XLA:CPU's reduce-window). Tokens of probability 0 are
  never drawn.
  """
  B, V = z.shape
  probs = jax.nn.softmax(z, axis=-1)
  K = min(block, V)
  nb = -(-V // K)
  blocks = jnp.pad(probs, ((0, 0), (0, nb * K - V))).reshape(B, nb, K)
  mass = jnp.sum(blocks, axis=-1)                          # (B, nb)
  cdf = jnp.cumsum(mass, axis=-1)
  # Row r's uniform comes from fold_in(key, r): a row's draw does not depend on the batch size,
  # so bucketing (dummy rows) leaves the samples unchanged.
  rows = jnp.arange(B)
  u = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), ()))(rows) * cdf[:, -1]
  # Rounding can put u at or past the top of a CDF: fall back to the last block / token with mass.
  b = jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), _last_with_mass(mass))
  inside = jnp.take_along_axis(blocks, b[:, None, None], axis=1)[:, 0]           # (B, K)
  below = jnp.take_along_axis(cdf - mass, b[:, None], axis=1)[:, 0]
  j = jnp.minimum(jnp.sum(jnp.cumsum(inside, axis=-1) <= (u - below)[:, None], axis=-1),
                  _last_with_mass(inside))
  return (b * K + j).astype(jnp.int32)


def choose(z, key, temperature, top_p, *, greedy, top_k, use_top_p):
  """Next tokens (B,) from logits z (B, V) plus their raw and sampling log-probs."""
  if greedy:
    tokens = first_argmax(z)
    return tokens, logprob_of(z, tokens), jnp.zeros(tokens.shape, jnp.float32)
  zf = sampling_logits(z, temperature, top_k, top_p, use_top_p=use_top_p)
  tokens = draw(key, zf)
  return tokens, logprob_of(z, tokens), logprob_of(zf, tokens)
