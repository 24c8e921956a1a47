"""Length-sorted micro-batches of a policy-gradient minibatch (config.rl.micro_batches) take the whole
minibatch's optimizer step: checked in float64 against learner.make_update on the uncut batch."""
import jax
import numpy as np
import pytest

from cfrl_jax.config import base_config
from cfrl_jax.models import qwen
from cfrl_jax.train import micro_batching, objectives

import accumulation_check

P, N, B = 6, 12, 10


def _rl(**fields):
  rl = base_config('arithmetic').rl
  rl.update(dict(max_new_tokens=N, clip_low=0.2, clip_high=0.28), **fields)
  return rl


def _batch(rng, cfg, token_advantages=False, reference=False):
  """Rows of [prompt left-padded to P | completion right-padded to N] of random lengths; float32-exact
  old log-probs and advantages (the losses read them in float32), ratios away from 1 so the clip acts."""
  tokens = np.zeros((B, P + N), np.int32)
  mask = np.zeros((B, P + N), np.int32)
  cmask = np.zeros((B, N), np.float64)
  lengths = [1, 2, 3, 3, 4, 5, 7, 9, 11, 12]
  for i, lc in enumerate(rng.permutation(lengths)):
    lp = rng.randint(2, P + 1)
    tokens[i, P - lp:P + lc] = rng.randint(1, cfg.vocab_size, lp + lc)
    mask[i, P - lp:P + lc] = 1
    cmask[i, :lc] = 1
  f32 = lambda x: np.asarray(np.asarray(x, np.float32), np.float64)
  batch = {'tokens': tokens, 'mask': mask, 'completion_mask': cmask,
           'old_logp': f32(rng.uniform(-5.0, -2.0, (B, N))),
           'advantages': f32(rng.normal(size=(B, N) if token_advantages else (B,)))}
  if reference:
    batch['ref_logp'] = f32(rng.uniform(-5.0, -2.0, (B, N)))
  return batch


CASES = {
    'grpo token_mean': ('grpo', dict(aggregation='token_mean'), {}),
    'grpo seq_mean + kl': ('grpo', dict(aggregation='seq_mean', kl_coef=0.05), {'reference': True}),
    'grpo constant': ('grpo', dict(aggregation='constant'), {}),
    'ppo seq_mean, token advantages': ('ppo', dict(aggregation='seq_mean'), {'token_advantages': True}),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_micro_batched_step_equals_the_whole_minibatch_step_in_float64(case):
  name, rl_fields, batch_kw = CASES[case]
  rl = _rl(**rl_fields)
  with jax.enable_x64(True):
    cfg = qwen.QwenConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=4, tie='untied', dtype='float64', param_dtype='float64')
    params = qwen.init_params(cfg, jax.random.PRNGKey(0))
    batch = _batch(np.random.RandomState(3), cfg, **batch_kw)
    chunks, loss_w, token_w = micro_batching.split(batch, P, 3, 4, rl.aggregation, rl.max_new_tokens)
    # padding was cut (the shortest rows' micro-batch is narrower) and every row and real token is kept
    assert chunks[0]['completion_mask'].shape[1] < N
    assert sum(len(c['tokens']) for c in chunks) == B
    assert sum(float(c['completion_mask'].sum()) for c in chunks) == float(batch['completion_mask'].sum())
    assert abs(sum(loss_w) - 1) < 1e-12 and abs(sum(token_w) - 1) < 1e-12
    loss_fn = objectives.algorithm_objective(cfg, P, rl, name)
    whole, micro = accumulation_check.whole_and_accumulated_steps(
        cfg, loss_fn, params, batch, chunks, loss_w,
        combine=lambda ms: micro_batching.combine_metrics(ms, loss_w, token_w))
  accumulation_check.assert_same_step(whole, micro, params)
  assert float(whole.metrics['clip_fraction']) > 0   # and the clip acted on some tokens
  # Every metric of these losses is a loss part, a count, a maximum or a token mean: all combine exactly,
  # up to float32 rounding (the clip fractions and other diagnostics are token means of float32 masks).
  assert set(micro.metrics) == set(whole.metrics)
  for k, v in whole.metrics.items():
    np.testing.assert_allclose(float(micro.metrics[k]), float(v), rtol=1e-6, atol=1e-9, err_msg=k)


def test_split_buckets_the_widths_and_keeps_rows_in_order():
  cfg = qwen.QwenConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=4)
  batch = _batch(np.random.RandomState(0), cfg)
  batch['advantages'] = np.arange(B, dtype=np.float64)   # row ids
  chunks, _, _ = micro_batching.split(batch, P, 4, 4, 'token_mean')
  lengths = batch['completion_mask'].sum(1)
  rows = []
  for c in chunks:
    width = c['completion_mask'].shape[1]
    longest = int(c['completion_mask'].sum(1).max())
    assert width == min(N, -(-longest // 4) * 4)   # the longest completion, rounded up to the bucket
    assert c['tokens'].shape[1] == P + width and c['old_logp'].shape[1] == width
    ids = c['advantages'].astype(int)
    assert list(ids) == sorted(ids)   # rows keep their order within a micro-batch
    np.testing.assert_array_equal(c['tokens'], batch['tokens'][ids, :P + width])
    np.testing.assert_array_equal(c['completion_mask'].sum(1), lengths[ids])
    rows += list(ids)
  assert sorted(rows) == list(range(B))
  # sorted by length: every row of a micro-batch is at most as long as any row of the next one
  for a, b in zip(chunks, chunks[1:]):
    assert a['completion_mask'].sum(1).max() <= b['completion_mask'].sum(1).min()


def test_split_names_what_is_wrong():
  cfg = qwen.QwenConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=4)
  batch = _batch(np.random.RandomState(0), cfg)
  with pytest.raises(ValueError, match='max_tokens'):
    micro_batching.split(batch, P, 2, 4, 'constant')
  with pytest.raises(ValueError, match='prompt_len 5'):
    micro_batching.split(batch, P - 1, 2, 4, 'token_mean')
  empty = dict(batch, completion_mask=np.zeros_like(batch['completion_mask']))
  with pytest.raises(ValueError, match='no completion token'):
    micro_batching.split(empty, P, 2, 4, 'token_mean')
