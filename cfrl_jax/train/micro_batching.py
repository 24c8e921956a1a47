"""A policy-gradient minibatch as length-sorted micro-batches, each cut to its longest completion.

A rollout's completions are right-padded to rl.max_new_tokens, but most finish well before it, so a
whole-minibatch learner step spends much of its time on padding. `split` sorts the rows by completion
length into n micro-batches and cuts each one's completion columns (and the per-token arrays) to its
longest completion, rounded up to `bucket` (one compile per width). The prompt columns stay: they are
left-padded to a shared bucket already.

The learner then takes one optimizer step on sum_i w_i * loss_i (learner.make_accumulating_update).
Every policy loss here is a sum of `rl/aggregate.py` reductions in one mode, so the weights that make
that sum the whole minibatch's loss are, per mode:

  'token_mean'  w_i = n_i / N   (n_i: counted completion tokens of micro-batch i, N: of all)
  'seq_mean'    w_i = s_i / S   (s_i: rows with at least one counted token)
  'constant'    w_i = B_i / B   (rows; the denominator B * max_tokens is linear in B)

and the step equals the whole minibatch's up to float summation order (tests/test_micro_batching.py,
float64). `combine_metrics` merges the micro-batches' diagnostics the same way: loss parts with w_i,
token means with n_i / N, counts summed, maxima maxed.
"""
from __future__ import annotations

import math

import numpy as np

from cfrl_jax.rl.aggregate import check_aggregation

# Metrics that are parts of the loss (weighted like it), counts (summed) and maxima (maxed); every other
# metric of the policy losses is a token mean over counted completion tokens (weighted by n_i / N).
LOSS_METRICS = ('loss', 'pg_loss', 'kl_penalty')
SUM_METRICS = ('num_tokens',)


def split(batch: dict, prompt_len: int, n: int, bucket: int, aggregation: str,
          max_tokens: int | None = None) -> tuple[list[dict], list[float], list[float]]:
  """(micro_batches, loss_weights, token_weights) of one learner minibatch.

  batch: numpy arrays with rows first: tokens, mask (B, P+N); completion_mask and any other (B, N)
  per-token array (old_logp, ref_logp, returns, old_values, token advantages); (B,) arrays such as
  sequence advantages. prompt_len: P. Rows keep their order within a micro-batch.
  """
  check_aggregation(aggregation, max_tokens)
  if n < 1:
    raise ValueError(f'micro_batching.split: n={n}; expected at least 1 micro-batch.')
  cmask = np.asarray(batch['completion_mask'])
  B, N = cmask.shape
  if batch['tokens'].shape[1] != prompt_len + N:
    raise ValueError(f"micro_batching.split: tokens have {batch['tokens'].shape[1]} columns, expected prompt_len "
                     f'{prompt_len} + {N} completion columns.')
  lengths = (cmask > 0).sum(1)
  total_tokens = lengths.sum()
  if total_tokens <= 0:
    raise ValueError('micro_batching.split: the minibatch has no completion token to learn from.')
  rows_with_tokens = (lengths > 0).sum()
  chunks, loss_w, token_w = [], [], []
  # Sorted by length, so each micro-batch's widest row is close to its others; stable, so ties keep order.
  for idx in np.array_split(np.argsort(lengths, kind='stable'), min(n, B)):
    idx = np.sort(idx)
    width = min(N, max(bucket, int(math.ceil(lengths[idx].max() / bucket) * bucket)))
    chunk = {}
    for k, v in batch.items():
      v = np.asarray(v)
      if k in ('tokens', 'mask'):
        chunk[k] = v[idx, :prompt_len + width]
      elif v.ndim == 2 and v.shape == (B, N):
        chunk[k] = v[idx, :width]
      elif v.shape[:1] == (B,):
        chunk[k] = v[idx]
      else:
        raise ValueError(f'micro_batching.split: {k} has shape {v.shape}; expected rows first ({B}, ...).')
    chunks.append(chunk)
    n_i = lengths[idx].sum()
    token_w.append(float(n_i) / float(total_tokens))
    if aggregation == 'token_mean':
      loss_w.append(float(n_i) / float(total_tokens))
    elif aggregation == 'seq_mean':
      loss_w.append(float((lengths[idx] > 0).sum()) / float(max(rows_with_tokens, 1)))
    else:
      loss_w.append(len(idx) / B)
  return chunks, loss_w, token_w


def combine_metrics(metrics: list[dict], loss_weights: list[float], token_weights: list[float]) -> dict:
  """The whole minibatch's metrics from its micro-batches' (host floats)."""
  out = {}
  for k in metrics[0]:
    values = [float(m[k]) for m in metrics]
    if k in SUM_METRICS:
      out[k] = sum(values)
    elif k.endswith('_max'):
      out[k] = max(values)
    elif k in LOSS_METRICS:
      out[k] = sum(w * v for w, v in zip(loss_weights, values))
    else:
      out[k] = sum(w * v for w, v in zip(token_weights, values))
  return out
