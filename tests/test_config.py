"""Config values are checked at load time, each error naming the field, its value and the fix."""
import pytest

from cfrl_jax.config import base_config, check_against_schema, validate


@pytest.mark.parametrize('field, value, message', [
    ('rl.group_size', 1, r"config.rl.group_size=1: it must be >= 2 \(grpo takes its baseline"),
    ('rl.prompts_per_step', 0, r'config.rl.prompts_per_step=0: it must be >= 1'),
    ('rl.temperature', -1.0, r'config.rl.temperature=-1.0: it must be > 0'),
    ('rl.algorithm', 'foo', r"config.rl.algorithm='foo': expected one of \('grpo'"),
    ('rl.top_p', 0.0, r'config.rl.top_p=0.0: it must lie in \(0, 1\]'),
    ('rl.minibatches', 3, r'config.rl.minibatches=3: it must divide the rollout batch .* = 128 rows'),
    ('rl.kl_estimator', 'k4', r"config.rl.kl_estimator='k4'"),
    ('rl.aggregation', 'mean', r"config.rl.aggregation='mean'"),
    ('rl.b2', 1.0, r'config.rl.b2=1.0: it must lie in \[0, 1\)'),
    ('cfrl.switch_on', 'loss', r"config.cfrl.switch_on='loss'"),
    ('cfrl.stage1_head_lr', 0.0, r'config.cfrl.stage1_head_lr=0.0: stage one trains only the head'),
    ('eval.pass_k', '1,8', r"config.eval.pass_k='1,8': every k must lie in \[1, eval.samples=4\]"),
    ('eval.pass_k', '1,x', r"config.eval.pass_k='1,x': expected comma-separated integers"),
    ('seeds', '0,0', r"config.seeds='0,0': seeds must be distinct"),
    ('model.arch.num_kv_heads', 4, r'config.model.arch.num_kv_heads=4: it must divide model.arch.num_heads=6'),
    ('model.source', 'hub', r"config.model.source='hub'"),
    ('pretrain.batching', 'sorted', r"config.pretrain.batching='sorted'"),
    ('mesh.shape', (2, -1, -1), r'config.mesh.shape=\(2, -1, -1\): expected \(data, fsdp, tensor\)'),
    ('alpharl.window', 0.0, r'config.alpharl.window=0.0: it must lie in \(0, 1\]'),
])
def test_out_of_range_values_name_the_field(field, value, message):
  c = base_config('arithmetic')
  section, _, key = field.rpartition('.')
  node = c
  for part in filter(None, section.split('.')):
    node = node[part]
  node[key] = value
  with pytest.raises(ValueError, match=message) as info:
    validate(c)
  assert f'--config.{field}=' in str(info.value)   # the message says how to set it


def test_defaults_validate_and_plain_rl_is_the_default():
  c = base_config('arithmetic')
  validate(c)
  assert c.cfrl.enabled is False   # CF-RL only when a config asks for it
  c.rl.algorithm = 'ppo'
  c.rl.group_size = 1   # PPO's baseline is its critic: a group of one is fine
  validate(c)


def test_config_defined_arms_pass_the_schema_check():
  c = base_config('arithmetic')
  c.study.arms = {'mine': {'rl': {'lr': 1e-4}}}
  check_against_schema(c)
