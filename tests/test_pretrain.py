"""Pretraining from scratch stops at a validation-accuracy band (config.pretrain.stop_accuracy), not a step."""
import json

import ml_collections
import jax
import numpy as np
import pytest

from cfrl_jax import tokenization
from cfrl_jax.config import validate
from cfrl_jax.models import hf, qwen
from cfrl_jax.policy import make_policy
from cfrl_jax.tasks import build_task
from cfrl_jax.train import learner, objectives, pretrain
from configs import demo

import accumulation_check


def _smoke(**pretrain_fields):
  c = ml_collections.ConfigDict(demo.get_config('smoke').to_dict())
  c.pretrain.steps = 20
  c.pretrain.eval_from = 5
  c.pretrain.eval_every = 5
  c.pretrain.validation_problems = 16
  c.pretrain.update(pretrain_fields)
  return c


def test_stops_at_the_first_reading_at_or_above_the_band(tmp_path, monkeypatch):
  readings = iter([0.10, 0.45, 0.50, 0.90])
  seen = []

  def scripted(policy, params, rows, task, max_new_tokens):
    seen.append(len(rows))
    return next(readings)

  monkeypatch.setattr(pretrain, 'validation_accuracy', scripted)
  c = _smoke(stop_accuracy=0.5)
  summary = pretrain.pretrain(c, build_task(c.task), str(tmp_path), progress=False)
  assert summary['stopped_at'] == 15 and summary['steps'] == 15
  assert [r['step'] for r in summary['validation']] == [5, 10, 15]
  assert seen == [16, 16, 16]


def test_the_band_is_met_by_the_mean_of_the_last_stop_window_readings(tmp_path, monkeypatch):
  # One reading of 0.7 would stop a single-reading rule at step 10; the mean of two first reaches 0.5 at 15.
  readings = iter([0.1, 0.7, 0.4, 0.9])
  monkeypatch.setattr(pretrain, 'validation_accuracy', lambda *a: next(readings))
  c = _smoke(stop_accuracy=0.5, stop_window=2)
  summary = pretrain.pretrain(c, build_task(c.task), str(tmp_path), progress=False)
  assert summary['stopped_at'] == 15 and summary['steps'] == 15 and summary['stop_window'] == 2
  assert summary['final_validation_greedy_accuracy'] == 0.4   # the last reading is of the saved step


def test_the_cooldown_follows_the_band_reads_the_saved_base_and_decays_to_zero(tmp_path, monkeypatch):
  readings = iter([0.1, 0.9, 0.77])   # two in the main phase, then one of the cooled-down base
  seen, lrs = [], []
  monkeypatch.setattr(pretrain, 'validation_accuracy', lambda *a: seen.append(1) or next(readings))
  real = learner.make_accumulating_update

  def recording(*a, **k):
    update = real(*a, **k)

    def update_recording(params, opt_state, chunks, weights, step_lrs):
      lrs.append(float(step_lrs['head']))
      return update(params, opt_state, chunks, weights, step_lrs)

    return update_recording

  monkeypatch.setattr(learner, 'make_accumulating_update', recording)
  c = _smoke(stop_accuracy=0.5, cooldown_steps=4)
  summary = pretrain.pretrain(c, build_task(c.task), str(tmp_path), progress=False)
  assert summary['stopped_at'] == 10 and summary['steps'] == 14 and summary['cooldown_steps'] == 4
  assert [r['step'] for r in summary['validation']] == [5, 10] and len(seen) == 3
  assert summary['final_validation_greedy_accuracy'] == 0.77
  # Main phase: the warmup-cosine schedule; cooldown: from the trigger step's rate linearly to zero.
  main = [pretrain.learning_rate(c.pretrain, s) for s in range(10)]
  np.testing.assert_allclose(lrs[:10], main, rtol=1e-6)
  np.testing.assert_allclose(lrs[10:], [main[-1] * f for f in (1.0, 0.75, 0.5, 0.25)], rtol=1e-6)


def test_the_saved_base_is_the_one_that_was_read(tmp_path):
  # A reading of 0 is enough to stop; the accuracy of the saved checkpoint, loaded back as a user would,
  # must equal its recorded final reading: the trigger's own without a cooldown, a fresh one after it.
  for cooldown in (0, 3):
    c = _smoke(stop_accuracy=1e-6, eval_from=10, eval_every=10, cooldown_steps=cooldown)
    task = build_task(c.task)
    out = tmp_path / f'cooldown{cooldown}'
    out.mkdir()
    summary = pretrain.pretrain(c, task, str(out), progress=False)
    tok = tokenization.load_tokenizer(str(out))
    cfg, params = hf.load_pretrained(str(out), tie='untie')
    policy = make_policy(cfg, tok, None)
    again = pretrain.validation_accuracy(policy, params, task.validation_rows(16), task, c.rl.max_new_tokens)
    assert again == summary['final_validation_greedy_accuracy']
    if summary['stopped_at'] is None:   # every reading was 0: it ran to the cap (then the cooldown)
      assert summary['steps'] == 20 + cooldown
    else:
      assert summary['steps'] == summary['stopped_at'] + cooldown
      if not cooldown:
        assert again == summary['validation'][-1]['validation_greedy_accuracy'] > 0


def test_an_unreached_band_runs_to_the_cap_and_says_so(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(pretrain, 'validation_accuracy', lambda *a: 0.2)
  c = _smoke(stop_accuracy=0.9)
  summary = pretrain.pretrain(c, build_task(c.task), str(tmp_path), progress=False)
  assert summary['stopped_at'] is None and summary['steps'] == 20
  assert summary['final_validation_greedy_accuracy'] == 0.2
  assert [r['step'] for r in summary['validation']] == [5, 10, 15, 20]
  out = capsys.readouterr().out
  assert 'config.pretrain.steps=20' in out and 'lower config.pretrain.stop_accuracy' in out
  json.dumps(summary)   # pretrain.json is written from it


def test_validation_problems_come_from_train_patterns_and_miss_the_eval_set():
  c = _smoke()
  task = build_task(c.task)
  rows = task.validation_rows(64)
  held_out = {r['expression'] for r in task.eval}
  assert len(rows) == 64 and not held_out & {r['expression'] for r in rows}


def test_out_of_range_band_and_a_task_without_validation_are_clear_errors():
  c = _smoke(stop_accuracy=1.5)
  with pytest.raises(ValueError, match=r'config\.pretrain\.stop_accuracy=1\.5.*\[0, 1\]'):
    validate(c)
  with pytest.raises(ValueError, match=r'config\.pretrain\.stop_window=0.*>= 1'):
    validate(_smoke(stop_window=0))
  with pytest.raises(ValueError, match=r'config\.pretrain\.cooldown_steps=-1.*>= 0'):
    validate(_smoke(cooldown_steps=-1))
  task = build_task(c.task)
  task.validation_fn = None
  with pytest.raises(ValueError, match='stop_accuracy=0'):
    task.validation_rows(4)


def _ragged_batch(rng, B, P, N, vocab):
  """[prompt left-padded to P | completion right-padded to N] rows of random lengths, pad id 0."""
  tokens = np.zeros((B, P + N), np.int32)
  mask = np.zeros((B, P + N), np.int32)
  cmask = np.zeros((B, N), np.float32)
  for i in range(B):
    lp, lc = rng.randint(2, P + 1), rng.randint(1, N + 1)
    tokens[i, P - lp:P + lc] = rng.randint(1, vocab, lp + lc)
    mask[i, P - lp:P + lc] = 1
    cmask[i, :lc] = 1
  return {'tokens': tokens, 'mask': mask, 'completion_mask': cmask}


@pytest.mark.parametrize('whole_text', [True, False])
def test_micro_batched_step_equals_the_whole_batch_step_in_float64(whole_text):
  with jax.enable_x64(True):
    cfg = qwen.QwenConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=4, tie='untied', dtype='float64', param_dtype='float64')
    params = qwen.init_params(cfg, jax.random.PRNGKey(0))
    P, N = 8, 10
    data = _ragged_batch(np.random.RandomState(1), 12, P, N, cfg.vocab_size)
    loss_fn = objectives.lm_objective(cfg) if whole_text else objectives.sft_objective(cfg, P)
    chunks, weights = pretrain.micro_batches(data, P, 3, 4, whole_text=whole_text)
    # padding was cut: no micro-batch is as wide as the batch, and every real token is kept
    assert all(c['tokens'].shape[1] < P + N for c in chunks[:1])
    assert sum(int(c['mask'].sum()) for c in chunks) == int(data['mask'].sum())
    assert abs(sum(weights) - 1) < 1e-12
    whole, micro = accumulation_check.whole_and_accumulated_steps(cfg, loss_fn, params, data, chunks,
                                                                  weights)
    accumulation_check.assert_same_step(whole, micro, params)
    for key in ('grad_norm_head', 'grad_norm_backbone'):
      assert abs(float(micro.metrics[key]) - float(whole.metrics[key])) < 1e-10


def test_micro_batches_rejects_a_batch_with_nothing_to_learn():
  data = _ragged_batch(np.random.RandomState(0), 4, 4, 4, 10)
  data['completion_mask'][:] = 0
  with pytest.raises(ValueError, match='no token to learn from'):
    pretrain.micro_batches(data, 4, 2, 4, whole_text=False)


def test_the_echo_chamber_config_shares_the_demos_base_but_a_corpus_change_does_not():
  from configs import echo_chamber
  demo_key = pretrain.cache_key(demo.get_config(''))
  # 512 instead of 2048 RL prompts: the corpus and validation rows are the same, so is the base
  assert pretrain.cache_key(echo_chamber.get_config('')) == demo_key
  assert pretrain.cache_key(demo.get_config('study')) == demo_key
  changed = demo.get_config('')
  changed.unlock()
  changed.task.operand_max = 8   # other problems in the corpus: another base
  assert pretrain.cache_key(changed) != demo_key
  micro = demo.get_config('')
  micro.unlock()
  micro.pretrain.micro_batches = 1   # float order only
  assert pretrain.cache_key(micro) == demo_key
