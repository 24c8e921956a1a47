"""A study's arms: overrides applied as declared, config-defined arms, the lr-matched controls."""
import jax
import numpy as np
import pytest

from cfrl_jax import arms
from cfrl_jax.config import base_config, validate
from cfrl_jax.train.trainer import learning_rates


def study_config():
  c = base_config('arithmetic')
  c.arms = 'grpo,cfgrpo'
  c.rl.lr, c.rl.head_lr, c.rl.warmup_steps = 1e-5, 1e-4, 2
  c.cfrl.stage1_steps, c.cfrl.stage1_head_lr = 3, 1e-3
  return c


@pytest.mark.parametrize('arm, algorithm, cf, schedule, stage1_lr', [
    ('grpo', 'grpo', False, 'constant', 1e-3),
    ('cfgrpo', 'grpo', True, 'constant', 1e-3),
    ('grpo_headlr', 'grpo', False, 'cfrl_stage1', 1e-3),
    ('cfgrpo_samelr', 'grpo', True, 'constant', -1.0),
    ('ppo_headlr', 'ppo', False, 'cfrl_stage1', 1e-3),
    ('cfppo_samelr', 'ppo', True, 'constant', -1.0),
    ('cfrloo', 'rloo', True, 'constant', 1e-3),
    ('rloo_headlr', 'rloo', False, 'cfrl_stage1', 1e-3),
])
def test_builtin_arms_apply_their_overrides(arm, algorithm, cf, schedule, stage1_lr):
  c = arms.arm_config(study_config(), arm, seed=3)
  assert (c.rl.algorithm, c.cfrl.enabled, c.rl.head_lr_schedule, c.cfrl.stage1_head_lr) == \
      (algorithm, cf, schedule, stage1_lr)
  assert c.seed == 3 and c.arms == ''
  assert c.pretrain.seed == 0    # one shared base by default
  validate(c)


def test_config_defined_arm_and_its_errors():
  c = study_config()
  c.study.arms = {'slow_grpo': {'rl': {'algorithm': 'grpo', 'lr': 2e-6}, 'cfrl': {'enabled': False}}}
  a = arms.arm_config(c, 'slow_grpo', seed=1)
  assert (a.rl.algorithm, a.rl.lr, a.cfrl.enabled) == ('grpo', 2e-6, False)
  assert a.rl.head_lr == 1e-4   # untouched fields keep the study's value
  with pytest.raises(ValueError, match=r"Unknown arm 'slwo_grpo'.*'slow_grpo'"):
    arms.arm_config(c, 'slwo_grpo', seed=1)
  c.study.arms = {'typo': {'rl': {'lrr': 1.0}}}
  with pytest.raises(ValueError, match=r"Arm 'typo' overrides unknown key 'rl.lrr'.*'lr'"):
    arms.arm_config(c, 'typo', seed=0)
  c.study.arms = {'reseed': {'seed': 5}}
  with pytest.raises(ValueError, match=r"'seed', which defines the study"):
    arms.arm_config(c, 'reseed', seed=0)


def test_an_arm_may_not_overwrite_an_explicit_setting():
  c = study_config()
  with pytest.raises(ValueError, match=r"--config.rl.algorithm is set explicitly, but arm 'grpo'.*ppo,cfppo"):
    arms.check_explicit_overrides(c, ['grpo', 'cfgrpo'], {'rl.algorithm', 'rl.lr'})
  with pytest.raises(ValueError, match=r"cfrl.stage1_head_lr"):
    arms.check_explicit_overrides(c, ['cfgrpo_samelr'], {'cfrl.stage1_head_lr'})
  arms.check_explicit_overrides(c, ['grpo', 'cfgrpo'], {'rl.lr', 'cfrl.stage1_head_lr'})


def test_vary_base_moves_the_pretraining_seed_with_the_rl_seed():
  c = study_config()
  c.pretrain.seed = 10
  assert [arms.arm_config(c, 'grpo', s).pretrain.seed for s in (0, 1, 2)] == [10, 10, 10]
  c.study.vary_base = True
  assert [arms.arm_config(c, 'grpo', s).pretrain.seed for s in (0, 1, 2)] == [10, 11, 12]


def schedule(config, steps: int):
  """(head, backbone) lr per step as the trainer runs it, stage switch included (switch_on='steps')."""
  stage, start, out = (1 if config.cfrl.enabled else 0), 0, []
  for step in range(steps):
    lrs = learning_rates(config.rl, config.cfrl, stage, step, start)
    out.append((lrs['head'], lrs['backbone']))
    if stage == 1 and step + 1 - start >= config.cfrl.stage1_steps:
      stage, start = 2, step + 1
  return np.array(out)


def test_headlr_control_follows_cfgrpo_head_schedule_while_the_backbone_trains():
  c = study_config()   # warmup 2, stage one 3 steps at 1e-3, then head 1e-4, backbone 1e-5
  cf = schedule(arms.arm_config(c, 'cfgrpo', 0), 6)
  headlr = schedule(arms.arm_config(c, 'grpo_headlr', 0), 6)
  plain = schedule(arms.arm_config(c, 'grpo', 0), 6)
  # Hand-computed: warmup (s - start + 1) / 2, capped at 1.
  expected_head = [5e-4, 1e-3, 1e-3, 5e-5, 1e-4, 1e-4]
  np.testing.assert_allclose(cf[:, 0], expected_head, rtol=1e-12)
  np.testing.assert_allclose(headlr[:, 0], expected_head, rtol=1e-12)
  np.testing.assert_allclose(cf[:, 1], [0, 0, 0, 5e-6, 1e-5, 1e-5], rtol=1e-12)
  np.testing.assert_allclose(headlr[:, 1], [5e-6, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5], rtol=1e-12)
  np.testing.assert_allclose(plain[:, 0], [5e-5, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4], rtol=1e-12)
  samelr = schedule(arms.arm_config(c, 'cfgrpo_samelr', 0), 6)
  np.testing.assert_allclose(samelr[:, 0], [5e-5, 1e-4, 1e-4, 5e-5, 1e-4, 1e-4], rtol=1e-12)


def test_headlr_schedule_needs_a_fixed_stage_one():
  c = arms.arm_config(study_config(), 'grpo_headlr', 0)
  with c.unlocked():
    c.cfrl.switch_on = 'reward'
  with pytest.raises(ValueError, match=r"rl.head_lr_schedule.*switch_on='steps'"):
    validate(c)


def trained(tiny_tokenizer_dir, run_dir, arm, **cfrl):
  """A 3-step run of an arm on test_trainer's toy task; returns (train records, final params, base params)."""
  from test_trainer import toy_config, toy_task
  from cfrl_jax import metrics
  from cfrl_jax.run_setup import load_policy, make_head_share_fn
  from cfrl_jax.train import trainer
  c = toy_config(tiny_tokenizer_dir, str(run_dir), steps=3, lr=1e-3, head_lr=1e-3)
  c.checkpoint.every = 0
  c.cfrl.update(dict(stage1_steps=2, stage1_head_lr=1e-2, **cfrl))
  c.probe.num_sequences = 2
  c = arms.arm_config(c, arm, 0)
  task = toy_task()
  policy, params = load_policy(c, task)
  base = jax.tree_util.tree_map(np.asarray, params)
  out = trainer.train(c, policy, params, task, str(run_dir), progress=False,
                      head_share_fn=make_head_share_fn(c, policy, task))
  return metrics.read_metrics(str(run_dir), 'train'), out.params, base


def moved(a, b):
  return any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.slow
def test_headlr_arm_trains_the_backbone_from_step_one_with_cfgrpos_head_lrs(tiny_tokenizer_dir, tmp_path):
  cf, _, _ = trained(tiny_tokenizer_dir, tmp_path / 'cf', 'cfgrpo')
  hl, params, base = trained(tiny_tokenizer_dir, tmp_path / 'hl', 'grpo_headlr')
  assert [r['lr_head'] for r in hl] == [r['lr_head'] for r in cf] == [1e-2, 1e-2, 1e-3]
  assert [r['lr_backbone'] for r in cf] == [0.0, 0.0, 1e-3]
  assert [r['lr_backbone'] for r in hl] == [1e-3] * 3
  assert [r['stage'] for r in hl] == [0] * 3 and [r['stage'] for r in cf] == [1, 1, 2]
  assert moved(params['backbone'], base['backbone'])



@pytest.mark.slow
@pytest.mark.parametrize('threshold, stages', [(0.999, [1, 2, 2]), (1e-9, [1, 1, 2])])
def test_adaptive_arm_switches_when_the_head_share_falls_below_the_threshold(
    tiny_tokenizer_dir, tmp_path, threshold, stages):
  records, _, _ = trained(tiny_tokenizer_dir, tmp_path, 'cfgrpo_adaptive', switch_threshold=threshold,
                          max_stage1_steps=2)
  assert [r['stage'] for r in records] == stages   # 1e-9: never below, so the cap of 2 steps ends it
  shares = [r['head_share'] for r in records if 'head_share' in r]
  assert len(shares) == stages.count(1) and all(0 <= s <= 1 for s in shares)


def test_a_study_needs_one_base_unless_the_base_varies_with_the_seed():
  from cfrl_jax.experiment import study_jobs
  from cfrl_jax.train.pretrain import cache_key
  c = study_config()
  c.model.source = 'pretrain'
  c.arms, c.seeds = 'grpo,cfgrpo,grpo_headlr,cfgrpo_samelr', '1,2'
  jobs = study_jobs(c)
  assert [(a, s) for a, s, _ in jobs] == [(a, s) for s in (1, 2) for a in c.arms.split(',')]
  assert {cache_key(jc) for _, _, jc in jobs} == {cache_key(c)}   # RL seeds share the study's base
  c.study.vary_base = True
  keys = {s: {cache_key(jc) for _, seed, jc in study_jobs(c) if seed == s} for s in (1, 2)}
  assert all(len(k) == 1 for k in keys.values()) and keys[1] != keys[2]
  assert cache_key(c) not in keys[1] | keys[2]   # no base for the top-level config.seed, which no run uses
