"""Echo Chamber's RL settings on a tiny model: clipping with several minibatches, REINFORCE-baseline
with KL-in-reward and whitening in the loop, Expert Iteration rounds over the whole training set."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax.config import base_config, validate
from cfrl_jax.run_setup import load_policy
from cfrl_jax.train import learner, objectives, trainer
from cfrl_jax.train.rollout import completion_stats

# test_trainer's toy task (reward 1 when the completion contains an 'e') and tiny-model config.
from test_trainer import toy_config as trainer_toy_config, toy_task


def toy_config(tokenizer_dir, run_dir, **rl):
  """test_trainer's toy config with 2 RL steps (unless given) and no checkpoints, validated."""
  c = trainer_toy_config(tokenizer_dir, run_dir, **{'steps': 2, **rl})
  c.checkpoint.every = 0
  validate(c)
  return c


def abs_sum(params):
  return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree_util.tree_leaves(params)))


@pytest.mark.slow
def test_second_minibatch_is_off_policy_and_clipped(tiny_tokenizer_dir, tmp_path):
  """One rollout, two minibatch updates: the first moves the policy, so on the second the ratio is
  not 1 and the clip acts (clip fraction > 0, and the loss differs from the unclipped one)."""
  c = toy_config(tiny_tokenizer_dir, str(tmp_path), clip_low=0.2, clip_high=0.2)
  policy, params = load_policy(c, toy_task())
  cfg, P, N, B = policy.cfg, 4, 4, 8
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(3, 60, size=(B, P + N)), jnp.int32)
  mask = jnp.ones((B, P + N), jnp.int32)
  old_logp = completion_stats(cfg, params, tokens, mask, P)[0]
  batch = {'tokens': tokens, 'mask': mask, 'completion_mask': jnp.ones((B, N), jnp.float32),
           'old_logp': old_logp, 'advantages': jnp.asarray([1., -1.] * (B // 2), jnp.float32)}
      # rows 0-3 and 4-7 are the two minibatches of the rollout
  first = {k: v[:4] for k, v in batch.items()}
  second = {k: v[4:] for k, v in batch.items()}
  loss_fn = objectives.grpo_objective(cfg, P, c.rl)
  _, m0 = loss_fn(params, second)
  assert float(m0['clip_fraction']) == 0.0 and float(m0['ratio_max']) == pytest.approx(1.0, abs=1e-5)
  tx, opt = learner.init_stage(cfg, params, 0, learner.OptimConfig(grad_clip=0.0))
  update = learner.make_update(cfg, loss_fn, tx, 0)
  res = update(params, opt, first, {'head': jnp.float32(0.05), 'backbone': jnp.float32(0.05)})
  loss, m = loss_fn(res.params, second)
  assert float(m['clip_fraction']) > 0.0
  assert abs(float(m['ratio_max']) - 1.0) > 0.2 or float(m['clip_fraction_low']) > 0.0
  c.rl.clip_low, c.rl.clip_high = 0.99, 1e6      # effectively unclipped
  loss_unclipped, m_u = objectives.grpo_objective(cfg, P, c.rl)(res.params, second)
  assert float(m_u['clip_fraction']) == 0.0
  assert abs(float(loss) - float(loss_unclipped)) > 1e-4


@pytest.mark.slow
def test_echo_chamber_reinforce_step_whitens_token_advantages(tiny_tokenizer_dir, tmp_path):
  c = toy_config(tiny_tokenizer_dir, str(tmp_path), algorithm='reinforce', reinforce_style='echo_chamber',
                 baseline='group_mean', kl_coef=1e-3, kl_estimator='k1', minibatches=2)
  task = toy_task()
  policy, params = load_policy(c, task)
  t = trainer.Trainer(c, policy, params, task, c.run_dir, progress=False)
  out, (_, batch, _) = t._policy_gradient_step(jax.random.PRNGKey(0))
  t.close()
  a, m = batch['advantages'], batch['completion_mask']
  assert a.shape == m.shape                       # token-level, not one number per sequence
  n = m.sum()
  mean = (a * m).sum() / n
  assert mean == pytest.approx(0.0, abs=1e-5)
  assert ((a - mean) ** 2 * m).sum() / n == pytest.approx(1.0, abs=1e-3)
  assert 'ref_logp' not in batch                  # the KL is in the reward, not in the loss
  assert 'clip_fraction' in out and np.isfinite(out['loss'])


@pytest.mark.slow
@pytest.mark.parametrize('from_base', [True, False])
def test_expert_iteration_round_covers_the_training_set(tiny_tokenizer_dir, tmp_path, from_base):
  c = toy_config(tiny_tokenizer_dir, str(tmp_path), algorithm='expert_iteration', steps=2, prompts_per_step=4)
  c.rl.ei.update(scope='epoch', samples_per_prompt=2, temperature=1.0, top_p=0.95, lr=1e-2, sft_epochs=2,
                 batch_size=4, from_base=from_base, threshold=0.0)   # threshold 0: every sample is kept
  validate(c)
  task = toy_task(12)
  policy, params = load_policy(c, task)
  base = abs_sum(params)
  t = trainer.Trainer(c, policy, params, task, c.run_dir, progress=False)
  sampled, seen = [], []
  rollout, apply = t._rollout, t._apply
  t._rollout = lambda key, rows, g, **kw: (sampled.append((len(rows), g, kw)), rollout(key, rows, g, **kw))[1]
  t._apply = lambda kind, P, b, lrs=None: (seen.append((abs_sum(t.params), lrs)), apply(kind, P, b, lrs=lrs))[1]
  outs = []
  for step in range(2):
    out, _ = t._expert_iteration_step(jax.random.PRNGKey(step))
    outs.append(out)
    t.step += 1
  t.close()
  # each round samples all 12 prompts (3 chunks of prompts_per_step = 4) at T=1.0, top_p=0.95
  assert [s[0] for s in sampled] == [4, 4, 4] * 2
  assert all(s[1] == 2 and s[2] == {'temperature': 1.0, 'top_p': 0.95} for s in sampled)
  assert [o['ei_samples'] for o in outs] == [24, 24]
  assert all(o['ei_prompts'] == 12 for o in outs)
  # SFT: unique kept samples padded to whole batches of 4, 2 epochs, at rl.ei.lr (constant schedule)
  per_round = [2 * -(-int(o['ei_kept']) // 4) for o in outs]
  assert len(seen) == sum(per_round)
  assert all(lrs == {'head': 1e-2, 'backbone': 1e-2} for _, lrs in seen)
  first_of_round_two = seen[per_round[0]][0]
  assert seen[0][0] == pytest.approx(base)
  if from_base:      # offline: round two starts again from the base
    assert first_of_round_two == pytest.approx(base)
  else:              # online: from the model round one produced
    assert first_of_round_two != pytest.approx(base)


def test_ei_from_base_needs_epoch_scope():
  c = base_config()
  c.rl.algorithm, c.rl.ei.from_base = 'expert_iteration', True
  with pytest.raises(ValueError, match="scope='epoch'"):
    validate(c)
  c = base_config()
  c.rl.algorithm, c.rl.reinforce_style, c.rl.baseline = 'reinforce', 'echo_chamber', 'batch_mean'
  with pytest.raises(ValueError, match='group_mean'):
    validate(c)
