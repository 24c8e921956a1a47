"""The RL loop on a tiny model: reward rises on a learnable task, resume is exact, bad input fails clearly."""
import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest

from cfrl_jax import metrics as metrics_lib
from cfrl_jax.config import base_config
from cfrl_jax.run_setup import load_policy
from cfrl_jax.tasks.base import Task
from cfrl_jax.train import checkpoint, placement, trainer


def contains_e(prompts, completions, **_):
  """Learnable from scratch in a few steps: does the completion contain the letter 'e'?"""
  return [1.0 if 'e' in c else 0.0 for c in completions]


def toy_task(n=16):
  """n prompts 'Hello <i>' whose reward is contains_e (the first 4 are the eval set)."""
  rows = [{'prompt': f'Hello {i}', 'answer': 'e'} for i in range(n)]
  return Task(name='toy', train=rows, eval=rows[:4], reward_fns=[(contains_e, 1.0)], formats=None,
              prompt_template='{question}', use_chat_template=False, system_prompt='',
              answer_key=lambda c: c, is_correct=lambda c, a: a in c)


def toy_config(tokenizer_dir, run_dir, **rl):
  c = base_config('arithmetic')
  c.model.source = 'init'
  c.model.tie = 'untie'
  c.tokenizer.path = tokenizer_dir
  c.model.arch.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
  c.rl.update(dict(algorithm='grpo', steps=4, prompts_per_step=4, group_size=4, max_new_tokens=4,
                   lr=3e-3, temperature=1.0), **rl)
  c.cfrl.enabled = False
  c.eval.every = 0
  c.probe.every = 0
  c.checkpoint.every = 1
  c.log.update(progress=False, tensorboard=False)
  c.run_dir = run_dir
  return c


def run(config, task=None, **kw):
  task = task or toy_task()
  policy, params = load_policy(config, task)
  return trainer.train(config, policy, params, task, config.run_dir, progress=False, **kw)


def param_eval(params, step):
  """A deterministic stand-in for an eval: the parameters' absolute sum (moves with every update)."""
  return {'abs_sum': float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree_util.tree_leaves(params)))}


def without_timings(records):
  return [{k: v for k, v in r.items() if k != 'step_time'} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize('algorithm', ['grpo', 'rloo', 'reinforce', 'ppo'])
def test_reward_rises_on_a_learnable_task(tiny_tokenizer_dir, tmp_path, algorithm):
  # PPO follows rl.aggregation since it became configurable; this toy task was tuned on its token mean.
  extra = {'grpo': dict(lr=1e-2), 'ppo': dict(aggregation='token_mean')}.get(algorithm, {})
  c = toy_config(tiny_tokenizer_dir, str(tmp_path), steps=14, prompts_per_step=8, **extra)
  c.rl.algorithm = algorithm
  c.rl.ppo.critic_lr = 1e-3
  c.checkpoint.every = 0
  run(c)
  rec = metrics_lib.read_metrics(str(tmp_path), 'train')
  rewards = [r['reward_mean'] for r in rec]
  assert len(rewards) == 14 and all(np.isfinite(rewards))
  first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
  assert last > first + 0.15, (algorithm, [round(r, 3) for r in rewards])


def test_expert_iteration_runs_and_selects(tiny_tokenizer_dir, tmp_path):
  c = toy_config(tiny_tokenizer_dir, str(tmp_path), algorithm='expert_iteration', steps=3, lr=3e-3)
  c.rl.ei.samples_per_prompt = 4
  c.rl.ei.sft_epochs = 1
  c.rl.ei.batch_size = 8
  c.checkpoint.every = 0
  run(c)
  rec = metrics_lib.read_metrics(str(tmp_path), 'train')
  assert len(rec) == 3
  assert all('ei_kept' in r for r in rec)
  assert any(r.get('loss') is not None for r in rec)


def test_metrics_cover_the_trainer_contract(tiny_tokenizer_dir, tmp_path):
  c = toy_config(tiny_tokenizer_dir, str(tmp_path), steps=2)
  c.cfrl.enabled = True
  c.cfrl.stage1_steps = 1
  c.cfrl.stage1_head_lr = 1e-2
  run(c)
  rec = metrics_lib.read_metrics(str(tmp_path), 'train')
  for key in ('reward_mean', 'reward_std', 'response_length', 'clip_fraction', 'kl', 'entropy', 'mean_prob',
              'max_prob', 'grad_norm_head', 'grad_norm_backbone', 'head_norm', 'stage', 'loss'):
    assert any(k.startswith(key) for k in rec[0]), key
  assert [r['stage'] for r in rec] == [1, 2]
  assert rec[0]['grad_norm_backbone'] == 0.0 and rec[1]['grad_norm_backbone'] > 0.0
  assert os.path.exists(os.path.join(str(tmp_path), 'metrics.jsonl'))


@pytest.mark.slow
def test_resume_continues_exactly(tiny_tokenizer_dir, tmp_path):
  """4 steps straight == 1 step + kill + resume for 3 more (crossing the CF-RL stage switch)."""
  def cfg(run_dir, steps, resume=False):
    c = toy_config(tiny_tokenizer_dir, run_dir, steps=steps, kl_coef=0.1)
    c.cfrl.enabled = True
    c.cfrl.stage1_steps = 2
    c.cfrl.stage1_head_lr = 1e-2
    c.resume = resume
    return c

  straight = str(tmp_path / 'straight')
  run(cfg(straight, 4))
  split = str(tmp_path / 'split')
  run(cfg(split, 1))
  run(cfg(split, 3, resume=True))   # resumes at step 1, stops at 3 (stage 2 by then)
  run(cfg(split, 4, resume=True))   # resumes at step 3, in stage two
  for step in (1, 2, 3, 4):
    a = checkpoint.restore_params(straight, step)
    b = checkpoint.restore_params(split, step)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(x, y)
  ma = metrics_lib.read_metrics(straight, 'train')
  mb = metrics_lib.read_metrics(split, 'train')
  drop = lambda r: {k: v for k, v in r.items() if k != 'step_time'}
  assert [drop(r) for r in ma] == [drop(r) for r in mb]


@pytest.mark.parametrize('damage', [pytest.param('step0_checkpoint', marks=pytest.mark.slow),
                                    'no_checkpoint', 'cut_last_line'])
def test_resumed_metrics_stream_is_one_history(tiny_tokenizer_dir, tmp_path, damage):
  """A run killed at three awkward points, resumed: metrics.jsonl equals the uninterrupted run's.

  step0_checkpoint: only the step-0 checkpoint survived (its eval must not be logged twice);
  no_checkpoint: killed before any checkpoint (no second history appended);
  cut_last_line: killed while writing the step-2 eval, after step 1's checkpoint (no 'malformed line').
  """
  def cfg(run_dir, resume=False):
    c = toy_config(tiny_tokenizer_dir, run_dir, steps=2)
    c.eval.every = 1
    c.checkpoint.max_to_keep = 0 if damage == 'step0_checkpoint' else 2
    c.resume = resume
    return c

  straight = str(tmp_path / 'straight')
  run(cfg(straight), eval_fn=param_eval)
  split = str(tmp_path / 'split')
  run(cfg(split), eval_fn=param_eval)
  ckpts, stream = checkpoint.checkpoint_dir(split), os.path.join(split, 'metrics.jsonl')
  if damage == 'step0_checkpoint':
    assert checkpoint.available_steps(split) == [0, 1, 2]
    for s in (1, 2):
      shutil.rmtree(os.path.join(ckpts, str(s)))
  elif damage == 'no_checkpoint':
    shutil.rmtree(ckpts)
  else:
    shutil.rmtree(os.path.join(ckpts, '2'))
    text = open(stream).read()
    assert text.endswith('"kind": "eval", "abs_sum": %r}\n' % metrics_lib.read_metrics(stream)[-1]['abs_sum'])
    with open(stream, 'w') as f:
      f.write(text[:-20])   # the step-2 eval cut inside its number
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    run(cfg(split, resume=True), eval_fn=param_eval)
  ma, mb = metrics_lib.read_metrics(straight), metrics_lib.read_metrics(split)
  assert [(r['step'], r['kind']) for r in mb] == [(0, 'eval'), (1, 'train'), (1, 'eval'), (2, 'train'), (2, 'eval')]
  assert without_timings(ma) == without_timings(mb)
  for x, y in zip(jax.tree_util.tree_leaves(checkpoint.restore_params(straight, 2)),
                  jax.tree_util.tree_leaves(checkpoint.restore_params(split, 2))):
    np.testing.assert_array_equal(x, y)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(run_dir, cache, steps, resume=False):
  """The demo's smoke config, CF-GRPO arm (stage switch after step 1), a checkpoint every step."""
  from cfrl_jax import experiment
  from cfrl_jax.main import load_config_file
  c = experiment.arm_config(load_config_file(os.path.join(REPO, 'configs', 'demo.py') + ':smoke'), 'cfgrpo', 0)
  with c.unlocked():
    c.run_dir = run_dir
    c.pretrain.cache_dir = cache
    c.rl.steps = steps
    c.checkpoint.every = 1
    c.log.update(progress=False, tensorboard=False)
    c.resume = resume
  return c


def run_smoke(c):
  from cfrl_jax import experiment
  from cfrl_jax.tasks.registry import build_task
  return experiment.run_single(c, c.run_dir, build_task(c.task), progress=False)


@pytest.fixture(scope='module')
def smoke_straight(tmp_path_factory, smoke_pretrain_cache):
  c = smoke_config(str(tmp_path_factory.mktemp('smoke') / 'straight'), smoke_pretrain_cache, 3)
  run_smoke(c)
  return c


@pytest.mark.slow
def test_smoke_config_rewards_vary_and_parameters_move(smoke_straight):
  """The smoke run's RL updates are not no-ops: rewards differ within groups, and every step moves the weights."""
  run_dir = smoke_straight.run_dir
  train = metrics_lib.read_metrics(run_dir, 'train')
  print('smoke train reward_mean/std per step:', [(r['reward_mean'], r['reward_std']) for r in train])
  assert [r['step'] for r in train] == [1, 2, 3]
  assert any(r['reward_std'] > 0 for r in train)
  assert any(r['grad_norm_head'] > 0 for r in train)
  for s in range(3):
    before = jax.tree_util.tree_leaves(checkpoint.restore_params(run_dir, s))
    after = jax.tree_util.tree_leaves(checkpoint.restore_params(run_dir, s + 1))
    assert any(not np.array_equal(x, y) for x, y in zip(before, after)), f'step {s + 1} changed nothing'


@pytest.mark.slow
def test_resume_continues_exactly_on_the_smoke_config(smoke_straight, tmp_path):
  """Smoke config: 3 steps straight == 1 step + resume for 2 more (across the CF-RL switch, with eval and probes)."""
  straight = smoke_straight.run_dir
  split = str(tmp_path / 'split')
  cache = smoke_straight.pretrain.cache_dir
  run_smoke(smoke_config(split, cache, 1))
  run_smoke(smoke_config(split, cache, 3, resume=True))
  for step in (1, 2, 3):
    for x, y in zip(jax.tree_util.tree_leaves(checkpoint.restore_params(straight, step)),
                    jax.tree_util.tree_leaves(checkpoint.restore_params(split, step))):
      np.testing.assert_array_equal(x, y)
  ma, mb = metrics_lib.read_metrics(straight), metrics_lib.read_metrics(split)
  # The split run's first leg also evaluated at its last step (1); everything else is the same stream.
  mb = [r for r in mb if (r['step'], r['kind']) != (1, 'eval')]
  assert [(r['step'], r['kind']) for r in ma] == [(0, 'eval'), (1, 'probe'), (1, 'train'), (2, 'probe'),
                                                 (2, 'train'), (3, 'train'), (3, 'eval')]
  assert without_timings(ma) == without_timings(mb)


def test_nan_reward_stops_with_saved_state(tiny_tokenizer_dir, tmp_path):
  def nan_reward(prompts, completions, **_):
    return [float('nan')] * len(completions)

  task = toy_task()
  task.reward_fns = [(nan_reward, 1.0)]
  c = toy_config(tiny_tokenizer_dir, str(tmp_path), steps=3)
  with pytest.raises(Exception, match='(?i)nan|finite'):
    run(c, task)


def test_prompt_rows_are_deterministic_and_cover_each_epoch():
  rows = list(range(10))
  a = [trainer.prompt_rows(rows, s, 4, seed=3) for s in range(5)]
  b = [trainer.prompt_rows(rows, s, 4, seed=3) for s in range(5)]
  assert a == b
  flat = sum(a, [])
  assert sorted(flat[:10]) == rows and sorted(flat[10:20]) == rows


def test_unknown_algorithm_is_an_error(tiny_tokenizer_dir, tmp_path):
  c = toy_config(tiny_tokenizer_dir, str(tmp_path), algorithm='dpo')
  with pytest.raises(ValueError, match='grpo'):
    run(c)


@pytest.mark.slow
def test_sft_and_lpft_fit_reference_solutions(tiny_tokenizer_dir, tmp_path):
  """LP-FT = SFT with the CF-RL stages: the head alone first, then everything; the NLL falls."""
  task = toy_task()
  for r in task.train:
    r['solution'] = 'The answer is 46.'
  c = toy_config(tiny_tokenizer_dir, str(tmp_path), algorithm='sft', steps=8, lr=3e-3, max_new_tokens=16)
  c.cfrl.enabled = True
  c.cfrl.stage1_steps = 3
  c.cfrl.stage1_head_lr = 3e-3
  c.checkpoint.every = 3
  run(c, task)
  rec = metrics_lib.read_metrics(str(tmp_path), 'train')
  assert [r['stage'] for r in rec] == [1, 1, 1, 2, 2, 2, 2, 2]
  assert rec[-1]['nll'] < rec[0]['nll'] - 0.5
  base = load_policy(c, task)[1]
  after_stage1 = checkpoint.restore_params(str(tmp_path), 3)
  for x, y in zip(jax.tree_util.tree_leaves(base['backbone']), jax.tree_util.tree_leaves(after_stage1['backbone'])):
    np.testing.assert_array_equal(np.asarray(x), y)
  assert trainer.sft_target({'solutions': {'steps': ' 1 + 1 = 2.'}}, 'steps') == ' 1 + 1 = 2.'
  with pytest.raises(ValueError, match='sft_format'):
    trainer.sft_target({'solutions': {'steps': 'x'}}, 'compact')


def test_a_finished_run_is_not_silently_extended(tiny_tokenizer_dir, tmp_path):
  """Training again into a run dir without resume stops before any work with the three ways out."""
  c = toy_config(tiny_tokenizer_dir, str(tmp_path), steps=1)
  run(c)
  before = open(tmp_path / 'metrics.jsonl').read()
  with pytest.raises(ValueError, match=r'already holds a run \(checkpoints at steps \[0, 1\]\).*'
                                       r'--config.resume=True.*--config.run_dir'):
    run(c)
  assert open(tmp_path / 'metrics.jsonl').read() == before   # nothing appended
  c.resume = True
  run(c)   # a finished run resumed is a no-op
  assert open(tmp_path / 'metrics.jsonl').read() == before


def test_row_chunked_keeps_row_order_and_rejects_uneven_chunks():
  tokens = np.arange(24, dtype=np.int32).reshape(12, 2)
  rowwise = lambda scale, t, m: {'a': t * scale + m, 'b': t[:, 0]}   # any per-row function, pytree out
  out = trainer.row_chunked(rowwise, 4)(3, tokens, np.ones_like(tokens))
  np.testing.assert_array_equal(out['a'], tokens * 3 + 1)
  np.testing.assert_array_equal(out['b'], tokens[:, 0])
  with pytest.raises(ValueError, match='12 rows do not split into 5'):
    trainer.row_chunked(rowwise, 5)(3, tokens, tokens)
  rl = base_config().rl
  rl.minibatches = 4
  assert trainer.logp_chunks(rl, 16) == 4 and trainer.logp_chunks(rl, 10) == 1
  rl.minibatches = 1
  assert trainer.logp_chunks(rl, 16) == 1


def test_chunked_log_prob_pass_equals_the_whole_batch_pass():
  """The old-policy / reference pass in minibatch-sized row chunks gives the one-pass log-probs (float32)."""
  from cfrl_jax.models import qwen
  from cfrl_jax.train import rollout
  cfg = qwen.QwenConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, tie='untied')
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  P, N, B = 8, 6, 16
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (B, P + N), 1, 96), np.int32)
  mask = np.ones_like(tokens)
  mask[::3, :P // 2] = 0   # some left-padded prompts
  logp = lambda p, t, m: rollout.completion_stats(cfg, p, t, m, P)[0]
  whole = np.asarray(jax.jit(logp)(params, tokens, mask))
  chunked = np.asarray(jax.jit(trainer.row_chunked(logp, 4))(params, tokens, mask))
  assert whole.shape == chunked.shape == (B, N)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_micro_batched_learner_takes_the_same_steps(tiny_tokenizer_dir, tmp_path):
  # rl.micro_batches cuts padding, not maths: across the CF-RL switch, with a KL reference and two
  # minibatches, the records and parameters equal the whole-minibatch run's up to float32 order.
  results = {}
  for n in (1, 3):
    c = toy_config(tiny_tokenizer_dir, str(tmp_path / f'micro{n}'), steps=2, max_new_tokens=12, kl_coef=0.05,
                   minibatches=2, micro_batches=n, aggregation='seq_mean')
    c.cfrl.enabled = True
    c.cfrl.stage1_steps = 1
    c.cfrl.stage1_head_lr = 1e-2
    res = run(c)
    results[n] = (metrics_lib.read_metrics(c.run_dir, 'train'), res.params)
  (rec1, p1), (rec3, p3) = results[1], results[3]
  assert [r['stage'] for r in rec3] == [1, 2]
  for a, b in zip(rec1, rec3):
    assert set(a) == set(b)
    for k in ('loss', 'pg_loss', 'kl', 'clip_fraction', 'entropy', 'reward_mean', 'grad_norm_head',
              'grad_norm_backbone', 'num_tokens'):
      np.testing.assert_allclose(b[k], a[k], rtol=2e-4, atol=1e-6, err_msg=k)
  # Adam divides by sqrt(v): where a gradient is ~0 (embedding rows of tokens no rollout used), float
  # order alone changes its update by up to ~lr. So: all but 0.1% of entries to 1e-5, every entry within
  # two steps of lr.
  diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                         for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p3))])
  assert np.mean(diff > 1e-5) < 1e-3 and diff.max() < 2 * 3e-3, (np.mean(diff > 1e-5), diff.max())


def test_micro_batches_on_a_mesh_is_a_clear_error(tiny_tokenizer_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(placement.Placement, 'sharded', property(lambda self: True))
  c = toy_config(tiny_tokenizer_dir, str(tmp_path), micro_batches=2)
  with pytest.raises(ValueError, match=r'config\.rl\.micro_batches=2 runs on one device only.*set it to 1'):
    run(c)
