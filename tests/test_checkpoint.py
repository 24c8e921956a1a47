"""Checkpoints: params / optimizer state / metadata round-trip exactly; params restore without the optimizer."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax.models import qwen
from cfrl_jax.train import checkpoint, learner


def setup(tmp_path):
  cfg = qwen.QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, eos_token_id=(3, 5))
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  tx, opt = learner.init_stage(cfg, params, 1, learner.OptimConfig())
  state = {'opt_state': opt, 'critic': None, 'critic_opt': None, 'rng': jax.random.PRNGKey(7)}
  meta = {'stage': 1, 'data_position': 48, 'model_config': dataclasses.asdict(cfg)}
  return cfg, params, state, meta


def test_round_trip_is_exact_and_keeps_structure(tmp_path):
  cfg, params, state, meta = setup(tmp_path)
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(3, params, state, meta)
  ck.wait()
  abstract = lambda t: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
  p2, s2, m2 = ck.restore(3, abstract(params), abstract(state))
  ck.close()
  assert jax.tree_util.tree_structure(s2) == jax.tree_util.tree_structure(state)
  for a, b in zip(jax.tree_util.tree_leaves((params, state)), jax.tree_util.tree_leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert m2['stage'] == 1 and m2['data_position'] == 48 and m2['step'] == 3


def test_params_and_config_restore_without_optimizer(tmp_path):
  cfg, params, state, meta = setup(tmp_path)
  ck = checkpoint.Checkpointer(str(tmp_path))
  for step in (2, 4):
    ck.save(step, params, state, meta)
  ck.close()
  assert checkpoint.available_steps(str(tmp_path)) == [2, 4]
  p = checkpoint.restore_params(str(tmp_path), 4)
  np.testing.assert_array_equal(p['head']['w'], np.asarray(params['head']['w']))
  assert checkpoint.restore_model_config(str(tmp_path)) == cfg


def test_missing_step_and_mismatched_structure_are_clear_errors(tmp_path):
  cfg, params, state, meta = setup(tmp_path)
  with pytest.raises(FileNotFoundError, match='available steps'):
    checkpoint.restore_params(str(tmp_path), 9)
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(1, params, state, meta)
  ck.wait()
  abstract = lambda t: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
  _, stage2 = learner.init_stage(cfg, params, 2, learner.OptimConfig())
  wrong = dict(state, opt_state=stage2)
  with pytest.raises(Exception):
    ck.restore(1, abstract(params), abstract(wrong))
  ck.close()
