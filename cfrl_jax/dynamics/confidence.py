"""Confidence and diversity measures of a policy's outputs.

Token-level measures (jax, jit-friendly) take the logits that produced each token and
a mask of the tokens to average over (usually the completion tokens); they average
over tokens (a token-weighted mean over the whole batch, not a mean of per-sequence
means) and return NaN when the mask is empty. Log-probabilities work wherever logits
do (log_softmax is idempotent).

Group-level measures (numpy / Python) take G groups of n samples for one prompt each:
pass@k (unbiased, Chen et al. 2021), majority@k, distinct final answers, output formats.

Representation measures: feature norm and mean pairwise cosine of phi across prompts,
head norm ||W||_F.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# --- token-level ------------------------------------------------------------
def masked_mean(x, mask):
  """Sum(x * mask) / sum(mask) over all axes; NaN when the mask is empty. x, mask: same shape."""
  x = jnp.asarray(x)
  if jnp.shape(mask) != x.shape:
    raise ValueError(f'mask shape {jnp.shape(mask)} != values shape {x.shape}.')
  m = jnp.asarray(mask).astype(x.dtype)
  count = jnp.sum(m)
  return jnp.where(count > 0, jnp.sum(x * m) / jnp.maximum(count, 1), jnp.nan)


def mean_sampled_prob(token_logp, mask):
  """Mean probability pi(y_t | c_t) of the sampled tokens. token_logp, mask: (B, T)."""
  return masked_mean(jnp.exp(token_logp), mask)


def mean_max_prob(logits, mask):
  """Mean of max_v pi(v | c_t) over the masked positions. logits: (B, T, V) (or log-probs); mask: (B, T)."""
  logp = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
  return masked_mean(jnp.exp(jnp.max(logp, axis=-1)), mask)


def token_entropy(logits):
  """-sum_v pi log pi per position. logits: (..., V) (or log-probs) -> (...)."""
  logp = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def mean_entropy(logits, mask):
  """Mean token entropy (nats) over the masked positions. logits: (B, T, V); mask: (B, T)."""
  return masked_mean(token_entropy(logits), mask)


def token_confidence(logits, targets, mask) -> dict[str, jax.Array]:
  """All three token-level measures at once.

  logits: (B, T, V), logits[b, t] being the distribution targets[b, t] was drawn from
  (for a model's forward pass over tokens: logits[:, :-1] with targets tokens[:, 1:]);
  targets, mask: (B, T). Returns {'sampled_prob', 'max_prob', 'entropy'} scalars.
  """
  logits = jnp.asarray(logits)
  if logits.shape[:-1] != jnp.shape(targets):
    raise ValueError(f'logits {logits.shape} and targets {jnp.shape(targets)} do not align: '
                     'expected logits (B, T, V) and targets (B, T).')
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
  tok = jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
  return {'sampled_prob': mean_sampled_prob(tok, mask),
          'max_prob': mean_max_prob(logp, mask),
          'entropy': mean_entropy(logp, mask)}


# --- group-level ------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

  Evaluated as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which avoids huge binomials.
  """
  n, c, k = int(n), int(c), int(k)
  if not 0 <= c <= n:
    raise ValueError(f'pass_at_k needs 0 <= c <= n; got n={n}, c={c}.')
  if not 1 <= k <= n:
    raise ValueError(f'pass_at_k needs 1 <= k <= n; got k={k}, n={n} (draw at least k samples).')
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_ks(correct, ks: Sequence[int]) -> dict[int, float]:
  """Mean unbiased pass@k over groups. correct: (G, n) bool, sample j of prompt g correct. -> {k: value}."""
  correct = np.asarray(correct, dtype=bool)
  if correct.ndim != 2:
    raise ValueError(f'correct must be (groups, samples); got shape {correct.shape}.')
  n = correct.shape[1]
  counts = correct.sum(axis=1)
  return {int(k): float(np.mean([pass_at_k(n, c, k) for c in counts])) for k in ks}


def majority_vote(answers: Sequence[Hashable | None]) -> Hashable | None:
  """Most frequent non-None answer; ties go to the answer that appears FIRST in `answers`.

  None (no extractable answer) does not vote; returns None if nothing voted.
  """
  votes = Counter(a for a in answers if a is not None)
  if not votes:
    return None
  best = max(votes.values())
  return next(a for a in answers if a is not None and votes[a] == best)


def majority_at_k(answers: Sequence[Sequence[Hashable | None]], targets: Sequence[Any], k: int,
                  is_correct: Callable[[Any, Any], bool] | None = None) -> float:
  """Fraction of groups whose majority answer among their FIRST k samples is correct.

  answers: G lists of n >= k extracted answers (None when extraction failed);
  targets: G reference answers; is_correct(answer, target), default equality.
  Ties: see `majority_vote` (first occurrence wins, so the order of samples decides).
  """
  if len(answers) != len(targets):
    raise ValueError(f'{len(answers)} answer groups but {len(targets)} targets.')
  if k < 1:
    raise ValueError(f'k must be >= 1; got {k}.')
  eq = is_correct or (lambda a, t: a == t)
  hits = []
  for group, target in zip(answers, targets):
    if len(group) < k:
      raise ValueError(f'majority@{k} needs at least {k} samples per group; a group has {len(group)}.')
    m = majority_vote(list(group)[:k])
    hits.append(m is not None and bool(eq(m, target)))
  return float(np.mean(hits)) if hits else float('nan')


def distinct_answers(group: Sequence[Hashable | None]) -> int:
  """Number of distinct final answers among one group's samples (None, i.e. no answer, is not counted)."""
  return len({a for a in group if a is not None})


def format_fractions(completions: Sequence[str], detector: Callable[[str], str],
                     formats: Sequence[str] = ()) -> dict[str, float]:
  """Fraction of completions in each output format: detector(completion) -> format name.

  Every name in `formats` appears in the result (0.0 if unseen), plus any other name the
  detector returns. Fractions sum to 1 over the returned names.
  """
  names = [detector(c) for c in completions]
  for n in names:
    if not isinstance(n, str):
      raise TypeError(f'the format detector must return a format name (str); got {n!r}.')
  counts = Counter(names)
  total = len(names)
  keys = list(dict.fromkeys(list(formats) + sorted(counts)))
  return {k: (counts.get(k, 0) / total if total else float('nan')) for k in keys}


# --- representations --------------------------------------------------------
def feature_stats(phi) -> dict[str, jax.Array]:
  """Norm and similarity of features across prompts. phi: (n, d), one row per prompt, n >= 2.

  Returns {'norm': mean ||phi_i||, 'mean_cos': mean over i != j of cos(phi_i, phi_j)}.
  """
  phi = jnp.asarray(phi)
  if phi.ndim != 2 or phi.shape[0] < 2:
    raise ValueError(f'phi must be (n >= 2, d); got shape {phi.shape}.')
  phi = phi.astype(jnp.promote_types(phi.dtype, jnp.float32))
  norms = jnp.linalg.norm(phi, axis=-1)
  unit = phi / jnp.maximum(norms, jnp.finfo(phi.dtype).tiny)[:, None]
  cos = unit @ unit.T
  n = phi.shape[0]
  off = (jnp.sum(cos) - jnp.trace(cos)) / (n * (n - 1))
  return {'norm': jnp.mean(norms), 'mean_cos': off}


def head_norm(head_w):
  """||W||_F of the (V, d) head (for a tied model pass the embedding: qwen.head_params(...)['w'])."""
  w = jnp.asarray(head_w)
  return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.promote_types(w.dtype, jnp.float32)))))
