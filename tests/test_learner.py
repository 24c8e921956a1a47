"""CF-RL stages: what is frozen, what moves, and what happens to optimizer state at the switch."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cfrl_jax.models import qwen
from cfrl_jax.train import learner

LRS = {'head': jnp.float32(1e-2), 'backbone': jnp.float32(1e-2)}


def tiny(tie):
  return qwen.QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, tie=tie)


def nll(cfg):
  def loss_fn(params, tokens):
    logp, _ = qwen.token_logprobs(cfg, params, tokens, jnp.ones_like(tokens))
    return -logp.mean(), {}
  return loss_fn


def host(tree):
  return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)


def equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def run_steps(cfg, params, stage, n, opt_state=None, tx=None):
  if tx is None:
    tx, opt_state = learner.init_stage(cfg, params, stage, learner.OptimConfig())
  update = learner.make_update(cfg, nll(cfg), tx, stage)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 12), 0, cfg.vocab_size)
  for _ in range(n):
    res = update(params, opt_state, tokens, LRS)
    params, opt_state = res.params, res.opt_state
  return params, opt_state, tx, res


@pytest.mark.parametrize('n', [1, 3])
def test_stage_one_freezes_backbone_bit_identically_and_moves_head(n):
  cfg = tiny('untied')
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  before = host(params)
  after, opt_state, _, res = run_steps(cfg, params, 1, n)
  assert equal(after['backbone'], before['backbone'])
  assert not np.allclose(np.asarray(after['head']['w']), before['head']['w'])
  assert float(res.metrics['grad_norm_backbone']) == 0.0
  assert float(res.metrics['grad_norm_head']) > 0.0
  # set_to_zero allocates no optimizer state for the backbone
  backbone_state = opt_state[1].inner_states['backbone']
  assert jax.tree_util.tree_leaves(backbone_state) == []


@pytest.mark.slow
def test_stage_two_moves_both_and_keeps_head_state_at_switch():
  cfg = tiny('untied')
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  params, opt1, _, _ = run_steps(cfg, params, 1, 2)
  head_state = host(opt1[1].inner_states['head'])
  before = host(params)
  tx2, opt2 = learner.init_stage(cfg, params, 2, learner.OptimConfig(), previous_state=opt1)
  # The head's AdamW moments and step count carry over unchanged...
  assert equal(opt2[1].inner_states['head'], head_state)
  count = opt2[1].inner_states['head'].inner_state.inner_state[0].count
  assert int(count) == 2
  # ...and the backbone starts fresh.
  assert int(opt2[1].inner_states['backbone'].inner_state.inner_state[0].count) == 0
  after, opt3, _, _ = run_steps(cfg, params, 2, 1, opt_state=opt2, tx=tx2)
  assert not np.allclose(np.asarray(after['backbone']['layers']['q_proj']['kernel']),
                         before['backbone']['layers']['q_proj']['kernel'])
  assert not np.allclose(np.asarray(after['head']['w']), before['head']['w'])
  assert int(opt3[1].inner_states['head'].inner_state.inner_state[0].count) == 3


def test_head_moments_after_switch_match_an_uninterrupted_head_optimizer():
  """Carrying the head state means the head's Adam sees one continuous history."""
  cfg = tiny('untied')
  p0 = qwen.init_params(cfg, jax.random.PRNGKey(0))
  p1, opt1, _, _ = run_steps(cfg, jax.tree_util.tree_map(jnp.array, p0), 1, 2)
  tx2, opt2 = learner.init_stage(cfg, p1, 2, learner.OptimConfig(), previous_state=opt1)
  mu = opt2[1].inner_states['head'].inner_state.inner_state[0].mu
  assert float(jnp.abs(mu['head']['w']).sum()) > 0.0


def test_tied_stage_one_trains_the_shared_embedding_only():
  cfg = tiny('tied')
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  assert params['head'] == {}
  before = host(params)
  after, _, _, _ = run_steps(cfg, params, 1, 2)
  # The tied head IS the embedding: stage one changes it (and thereby the inputs) but nothing else.
  assert not np.allclose(np.asarray(after['backbone']['embed']), before['backbone']['embed'])
  rest = lambda p: {k: v for k, v in p['backbone'].items() if k != 'embed'}
  assert equal(rest(after), rest(before))
  labels = learner.param_labels(cfg, params)
  assert labels['backbone']['embed'] == 'head'


def test_labels_split_head_from_backbone():
  cfg = tiny('untied')
  labels = learner.param_labels(cfg, qwen.init_params(cfg, jax.random.PRNGKey(0)))
  assert labels['head']['w'] == 'head'
  assert set(jax.tree_util.tree_leaves(labels['backbone'])) == {'backbone'}


def test_non_finite_loss_skips_update_and_reports():
  cfg = tiny('untied')
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  before = host(params)
  tx, opt = learner.init_stage(cfg, params, 0, learner.OptimConfig())
  update = learner.make_update(cfg, lambda p, b: (jnp.sum(p['head']['w']) * jnp.nan, {}), tx, 0)
  res = update(params, opt, jnp.zeros((1,)), LRS)
  assert not bool(res.finite)
  assert equal(res.params, before)


def test_learning_rates_are_written_per_group():
  cfg = tiny('untied')
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  tx, opt = learner.init_stage(cfg, params, 0, learner.OptimConfig())
  opt = learner.with_learning_rates(opt, {'head': 0.5, 'backbone': 0.25})
  assert float(opt[1].inner_states['head'].inner_state.hyperparams['learning_rate']) == 0.5
  assert float(opt[1].inner_states['backbone'].inner_state.hyperparams['learning_rate']) == 0.25


def test_bad_stage_is_an_error():
  cfg = tiny('untied')
  with pytest.raises(ValueError, match='stage'):
    learner.make_optimizer(cfg, qwen.init_params(cfg, jax.random.PRNGKey(0)), 3, learner.OptimConfig())
