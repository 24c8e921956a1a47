"""cfrl_jax.sharding, cfrl_jax.distributed and the mesh paths of sampling.sample and
train.placement.sharded_update: meshes, partition rules, sharded learner/sampler steps, checkpoints
across meshes, multi-process start.

Rule / spec / launch-environment logic is checked in this process against hand-written expectations
(AbstractMesh needs no devices). Sharded execution runs in subprocesses (tests/parallel_worker.py) with
8 simulated CPU devices, because the device count is fixed when JAX's backend starts; their numbers
are compared with a single-device run computed here, in a separate process. Those tests take a
minute or more each on 2 cores and are marked slow (`python -m pytest -m slow`, which .ci/run runs).

Tolerances (float32): loss rtol 1e-6; parameters after one AdamW step |sharded - single| <= 1e-6 +
1e-5 |single| while the step itself moves them by > 1e-4; greedy sample tokens exactly equal,
their log-probs within 1e-4. The one-device sampler runs its products in the compiled CPU kernels,
the mesh's in XLA's sharded products: two summation orders of the same float32 terms, whose results
differ by at most n u sum|terms| (n <= 128 terms, u = 2^-24, sum|terms| ~ 10 for these logits: ~1e-4),
and by ~sqrt(n) u sum|terms| ~ 1e-5 in practice, on any ISA. The whole-run comparisons at the end
switch the kernels off on both sides instead (xla_products).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from cfrl_jax import distributed, sampling, sharding
from cfrl_jax.kernels import cpu_decode
from cfrl_jax.models import presets, qwen
from cfrl_jax.train import learner, placement

import parallel_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'parallel_worker.py')
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
RULES = sharding.MeshConfig().all_rules(qwen.param_axes())   # the trainer's default rules


def abstract_mesh(data, fsdp, tensor):
  return AbstractMesh((data, fsdp, tensor), sharding.AXES)


# --- meshes --------------------------------------------------------------------
def test_resolve_mesh_shape_fills_the_rest_and_rejects_mismatches():
  assert sharding.resolve_mesh_shape((1, -1, 1), 8) == (1, 8, 1)
  assert sharding.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
  assert sharding.resolve_mesh_shape((2, 4, 1), 8) == (2, 4, 1)
  for bad in ((3, -1, 1), (2, 2, 1), (-1, -1, 1), (0, -1, 1), (2, -2, 1)):
    with pytest.raises(ValueError, match='mesh shape'):
      sharding.resolve_mesh_shape(bad, 8)


def test_make_mesh_on_this_process():
  n = jax.device_count()
  mesh = sharding.make_mesh((1, -1, 1))
  assert dict(mesh.shape) == {'data': 1, 'fsdp': n, 'tensor': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match=f'{n} are present'):
    sharding.make_mesh((n + 1, 1, 1))
  with pytest.raises(ValueError, match='axes'):
    sharding.make_mesh((1, -1), ('data', 'fsdp', 'tensor'))


def test_mesh_config_from_ml_collections():
  import ml_collections as mc
  c = mc.ConfigDict({'shape': (2, -1, 1), 'rules': (('head/w$', [None, ['data', 'fsdp']]),),
                     'logical_rules': (['mlp', None], ('embed', ['data', 'fsdp']))})
  mcfg = sharding.MeshConfig.from_config(c)
  assert mcfg.shape == (2, -1, 1)
  assert mcfg.rules == (('head/w$', (None, ('data', 'fsdp'))),)
  assert mcfg.logical_rules == (('mlp', None), ('embed', ('data', 'fsdp')))
  rules = mcfg.all_rules(qwen.param_axes())
  assert rules[0] == mcfg.rules[0] and rules[-1] == (r'.*', ())
  assert sharding.MeshConfig().all_rules(qwen.param_axes()) == RULES


# --- partition rules -----------------------------------------------------------------
QWEN3 = qwen.QwenConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=16, model_type='qwen3', qk_norm=True, attention_bias=True,
                        o_bias=True)


def _abstract_params(cfg):
  return jax.eval_shape(lambda: qwen.init_params(cfg, jax.random.PRNGKey(0)))


def test_default_rules_on_the_qwen_tree():
  specs = sharding.partition_specs(_abstract_params(QWEN3), RULES, abstract_mesh(2, 2, 2))
  got = {sharding.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda s: isinstance(s, P))[0]}
  col, row = P(None, 'fsdp', 'tensor'), P(None, 'tensor', 'fsdp')
  expected = {
      'backbone/embed': P('tensor', 'fsdp'), 'head/w': P('tensor', 'fsdp'), 'backbone/final_norm': P(),
      'backbone/layers/input_norm': P(), 'backbone/layers/post_attn_norm': P(),
      'backbone/layers/q_norm': P(), 'backbone/layers/k_norm': P(),
      'backbone/layers/q_proj/kernel': col, 'backbone/layers/k_proj/kernel': col,
      'backbone/layers/v_proj/kernel': col, 'backbone/layers/gate_proj/kernel': col,
      'backbone/layers/up_proj/kernel': col, 'backbone/layers/o_proj/kernel': row,
      'backbone/layers/down_proj/kernel': row,
      'backbone/layers/q_proj/bias': P(None, 'tensor'), 'backbone/layers/k_proj/bias': P(None, 'tensor'),
      'backbone/layers/v_proj/bias': P(None, 'tensor'), 'backbone/layers/o_proj/bias': P(),
  }
  assert got == expected


def test_tied_model_and_critic_trees():
  tied = QWEN3.replace(tie='tied')
  specs = sharding.partition_specs(_abstract_params(tied), RULES, abstract_mesh(1, 4, 2))
  assert specs['head'] == {} and specs['backbone']['embed'] == P('tensor', 'fsdp')
  critic = {'backbone': _abstract_params(QWEN3)['backbone'],
            'value_head': {'w': jax.ShapeDtypeStruct((64,), jnp.float32), 'b': jax.ShapeDtypeStruct((), jnp.float32)}}
  cs = sharding.partition_specs(critic, RULES, abstract_mesh(1, 4, 2))
  assert cs['value_head'] == {'w': P(), 'b': P()}
  assert cs['backbone']['layers']['q_proj']['kernel'] == P(None, 'fsdp', 'tensor')


# The hand-written regex table the logical rules replaced: the reference for the generated specs.
HAND_WRITTEN_RULES = (
    (r'layers/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$', (None, 'fsdp', 'tensor')),
    (r'layers/(o_proj|down_proj)/kernel$', (None, 'tensor', 'fsdp')),
    (r'layers/(q_proj|k_proj|v_proj)/bias$', (None, 'tensor')),
    (r'(^|/)embed$', ('tensor', 'fsdp')),
    (r'(^|/)head/w$', ('tensor', 'fsdp')),
    (r'.*', ()),
)
DEMO = qwen.QwenConfig(vocab_size=160, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6,
                       num_kv_heads=2, head_dim=32)   # configs/demo.py's model


@pytest.mark.parametrize('cfg', [DEMO, DEMO.replace(tie='tied'), presets.config('qwen2.5-0.5b'),
                                 presets.config('qwen2.5-0.5b', tie='untied'), QWEN3, QWEN3.replace(tie='tied')],
                         ids=['demo', 'demo_tied', 'qwen2.5-0.5b_tied', 'qwen2.5-0.5b_untied', 'qwen3', 'qwen3_tied'])
def test_logical_rules_generate_the_hand_written_specs(cfg):
  params = _abstract_params(cfg)
  critic = {'backbone': params['backbone'], 'value_head': {'w': jax.ShapeDtypeStruct((cfg.hidden_size,), jnp.float32)}}
  for shape in ((1, 8, 1), (2, 2, 2), (1, 1, 8), (1, 2, 4), (2, 4, 1), (1, 3, 1)):
    mesh = abstract_mesh(*shape)
    for tree in (params, critic):
      assert sharding.partition_specs(tree, RULES, mesh) == sharding.partition_specs(tree, HAND_WRITTEN_RULES, mesh)
  # every parameter has logical names, one per dimension
  axes = qwen.param_axes(cfg)
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    assert len(axes[sharding.path_str(path)]) == len(x.shape)


def test_logical_rule_overrides_and_errors():
  mesh = abstract_mesh(1, 2, 2)
  mcfg = sharding.MeshConfig(logical_rules=(('mlp', None), ('vocab', None)),
                             rules=((r'head/w$', (None, 'tensor')),))
  specs = sharding.partition_specs(_abstract_params(QWEN3), mcfg.all_rules(qwen.param_axes()), mesh)
  layers = specs['backbone']['layers']
  assert layers['gate_proj']['kernel'] == P(None, 'fsdp') and layers['down_proj']['kernel'] == P(None, None, 'fsdp')
  assert layers['q_proj']['kernel'] == P(None, 'fsdp', 'tensor')      # the defaults still apply elsewhere
  assert specs['backbone']['embed'] == P(None, 'fsdp')
  assert specs['head']['w'] == P(None, 'tensor')                       # a regex rule beats the logical ones
  with pytest.raises(ValueError, match=r"axes \['mpl'\] that the model does not use"):
    sharding.MeshConfig(logical_rules=(('mpl', None),)).all_rules(qwen.param_axes())
  with pytest.raises(ValueError, match='activation axes'):
    sharding.MeshConfig(logical_rules=(('batch', 'data'),))
  with pytest.raises(ValueError, match=r'expected \(logical axis name, mesh axes\)'):
    sharding.MeshConfig(logical_rules=(('mlp',),))
  with pytest.raises(ValueError, match='must be None, a mesh axis name'):
    sharding.MeshConfig(logical_rules=(('mlp', 3),))


def test_constrain_logical_names_the_batch_axis():
  x = jnp.ones((4, 3, 2))
  assert sharding.constrain_logical(x, sharding.ACTIVATION_AXES) is x   # no mesh in context: untouched
  mesh = sharding.make_mesh((1, -1, 1))
  with jax.sharding.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(lambda x: sharding.constrain_logical(x, sharding.ACTIVATION_AXES))(x)
    with pytest.raises(ValueError, match='2 names'):
      sharding.constrain_logical(x, ('batch', 'length'))
  (eqn,) = jaxpr.eqns
  assert eqn.primitive.name == 'sharding_constraint'
  rows = 4 % jax.device_count() == 0
  assert eqn.params['sharding'].spec == P(('data', 'fsdp') if rows else None, None, None)


def test_non_divisible_dims_fall_back_with_a_warning(caplog):
  cfg = QWEN3.replace(vocab_size=100)          # 100 rows over tensor=8: not divisible
  with caplog.at_level(logging.WARNING, logger='cfrl_jax.sharding'):
    specs = sharding.partition_specs(_abstract_params(cfg), RULES, abstract_mesh(1, 1, 8))
  assert specs['head']['w'] == P(None, 'fsdp') and specs['backbone']['embed'] == P(None, 'fsdp')
  # kv out = 2 heads x 16 = 32 divides by 8; q out 64 too: these stay sharded
  assert specs['backbone']['layers']['k_proj']['kernel'] == P(None, 'fsdp', 'tensor')
  assert any('head/w dim 0 (size 100)' in r.getMessage() for r in caplog.records)
  # a tuple entry keeps its longest dividing prefix of axes: 6 rows over data=2 x fsdp=4 -> data only
  rules = [(r'x$', (('data', 'fsdp'),)), (r'.*', ())]
  x = {'x': jax.ShapeDtypeStruct((6, 3), jnp.float32), 'y': jax.ShapeDtypeStruct((8,), jnp.float32)}
  got = sharding.partition_specs(x, rules, abstract_mesh(2, 4, 1))
  assert got == {'x': P(('data',)), 'y': P()}
  got = sharding.partition_specs({'x': jax.ShapeDtypeStruct((8, 3), jnp.float32)}, rules, abstract_mesh(2, 4, 1))
  assert got == {'x': P(('data', 'fsdp'))}


def test_first_matching_rule_wins_and_user_rules_go_first():
  mcfg = sharding.MeshConfig(rules=((r'head/w$', (None, 'tensor')),))
  specs = sharding.partition_specs(_abstract_params(QWEN3), mcfg.all_rules(qwen.param_axes()), abstract_mesh(1, 2, 2))
  assert specs['head']['w'] == P(None, 'tensor')
  assert specs['backbone']['embed'] == P('tensor', 'fsdp')     # default still applies elsewhere


@pytest.mark.parametrize('rule, match', [
    ((r'q_proj/kernel$', ('fsdp', None, None)), 'stacked layer axis'),
    ((r'q_proj/kernel$', (None, 'model', None)), r"names mesh axes \['model'\]"),
    ((r'q_proj/kernel$', (None, 'fsdp', 'fsdp')), 'uses a mesh axis twice'),
    ((r'final_norm$', (None, 'fsdp')), 'gives 2 dims'),
])
def test_bad_rules_are_errors(rule, match):
  with pytest.raises(ValueError, match=match):
    sharding.partition_specs(_abstract_params(QWEN3), (rule,) + RULES, abstract_mesh(1, 2, 2))


def test_rules_without_catch_all_and_malformed_rules():
  with pytest.raises(ValueError, match='no partition rule matches'):
    sharding.partition_specs({'a': jnp.zeros(3)}, [(r'^b$', ())], abstract_mesh(1, 1, 1))
  with pytest.raises(ValueError, match='does not compile'):
    sharding.normalize_rules([('(', ())])
  with pytest.raises(ValueError, match='expected \\(regex, spec\\)'):
    sharding.normalize_rules([('a',)])


@pytest.mark.parametrize('stage', [1, 2])
def test_opt_state_specs_mirror_the_params(stage):
  cfg = QWEN3
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  specs = sharding.partition_specs(params, RULES, abstract_mesh(2, 2, 2))
  _, state = learner.init_stage(cfg, params, stage, learner.OptimConfig())
  ospecs = sharding.opt_state_specs(state, params, specs)
  param_spec = {sharding.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda s: isinstance(s, P))[0]}
  moments = 0
  for path, spec in jax.tree_util.tree_flatten_with_path(ospecs, is_leaf=lambda s: isinstance(s, P))[0]:
    name = sharding.path_str(path)
    for tag in ('/mu/', '/nu/'):
      if tag in name:
        assert spec == param_spec[name.split(tag, 1)[1]], name
        moments += 1
        break
    else:
      assert spec == P(), name               # counts, hyperparameters
  n_trainable = len(param_spec) if stage == 2 else 1   # stage one: only head/w has Adam moments
  assert moments == 2 * n_trainable


def test_drop_axes_for_decoding():
  specs = {'w': P(None, 'fsdp', 'tensor'), 'e': P('tensor', ('data', 'fsdp')), 'n': P()}
  assert sharding.drop_axes(specs, ('fsdp',)) == {'w': P(None, None, 'tensor'), 'e': P('tensor', ('data',)),
                                                  'n': P()}


def test_batch_spec_and_constrain_without_mesh():
  assert sharding.batch_spec(abstract_mesh(2, 4, 1)) == P(('data', 'fsdp'))
  assert sharding.batch_spec(abstract_mesh(2, 4, 1), rows=16) == P(('data', 'fsdp'))
  assert sharding.batch_spec(abstract_mesh(2, 4, 1), rows=6) == P(('data',))
  assert sharding.batch_spec(abstract_mesh(2, 4, 1), rows=3) == P(None)
  x = jnp.ones((4, 3, 2))
  assert sharding.constrain_batch(x) is x            # no mesh in context: untouched
  assert jax.jit(sharding.constrain_batch)(x).shape == x.shape
  with pytest.raises(ValueError, match='more entries'):
    sharding.constrain(jnp.ones(3), 'data', None)


def test_shard_batch_and_host_rows_on_this_process():
  mesh = sharding.make_mesh((1, -1, 1))
  n = 4 * jax.device_count()
  batch = {'tokens': np.arange(2 * n).reshape(n, 2), 'scale': np.float32(2.0), 'ref_logp': None}
  out = sharding.shard_batch(batch, mesh)
  assert set(out) == {'tokens', 'scale'}
  np.testing.assert_array_equal(sharding.to_host(out)['tokens'], batch['tokens'])
  assert out['scale'].sharding.spec == P()
  assert sharding.host_rows(n, mesh) == slice(0, n)


@pytest.mark.slow
def test_sample_on_a_mesh_of_this_process_equals_sample_and_checks_inputs_alike(tiny_qwen2_dir):
  from cfrl_jax.models import hf
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  mesh = sharding.make_mesh((1, -1, 1))
  tokens = np.asarray([[0, 0, 5, 9], [3, 4, 8, 2], [0, 7, 1, 6]], np.int32)
  mask = (np.arange(4)[None] >= np.asarray([[2], [0], [1]])).astype(np.int32)
  kw = dict(max_new_tokens=5, temperature=0.9, top_k=7, stop_token_ids=(3,))
  ours = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(2), mesh=mesh, **kw)
  ref = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(2), **kw)
  np.testing.assert_array_equal(ours.tokens, np.asarray(ref.tokens))
  np.testing.assert_allclose(ours.logprobs, np.asarray(ref.logprobs), atol=1e-5)
  bad = [(dict(prompt_tokens=tokens + cfg.vocab_size), r'\[0, 384\)'),
         (dict(prompt_mask=mask[:, ::-1]), 'LEFT-padded'),
         (dict(temperature=0.0), 'temperature'),
         (dict(max_new_tokens=0), 'max_new_tokens'),
         (dict(decode_segments=0), 'decode_segments')]
  for change, match in bad:
    args = {'prompt_tokens': tokens, 'prompt_mask': mask, **kw, **change}
    for extra in ({'mesh': mesh}, {}):
      with pytest.raises(ValueError, match=match):
        sampling.sample(cfg, params, key=jax.random.PRNGKey(2), **args, **extra)


def test_per_host_helpers_are_identities_on_one_process():
  """With one process every row is local: the per-host helpers must not change a single-process run."""
  import ml_collections as mc
  mesh = sharding.make_mesh((1, -1, 1))
  n = 4 * jax.device_count()
  x = np.arange(3 * n, dtype=np.float32).reshape(n, 3)
  assert sharding.process_block(n, mesh) == slice(0, n)
  np.testing.assert_array_equal(sharding.gather_rows({'x': x}, mesh)['x'], x)
  np.testing.assert_array_equal(sharding.local_rows(sharding.shard_batch({'x': x}, mesh, process_local=True)['x']), x)
  assert sharding.process_max(7) == 7
  params = {'w': jnp.ones((4, 2))}
  place = placement.Placement(mc.ConfigDict({'shape': (1, -1, 1), 'rules': (), 'data_loading': 'per_host'}), params)
  assert not place.per_host and place.rows_of_process(n) == slice(0, n)
  batch = {'x': x}
  assert place.to_global(batch) is batch and place.all_rows(batch) is batch and place.max_over_processes(5) == 5
  np.testing.assert_array_equal(place.own_rows(jnp.asarray(x)), x)
  with pytest.raises(ValueError, match="data_loading='sideways'"):
    placement.Placement(mc.ConfigDict({'shape': (1, -1, 1), 'rules': (), 'data_loading': 'sideways'}), params)


# --- launch environments ---------------------------------------------------------------
def test_single_process_without_launch_environment_is_a_no_op():
  assert distributed.launch_spec({}) is None
  assert distributed.initialize_distributed(env={}) is False
  assert distributed.launch_spec({'SLURM_JOB_ID': '5', 'SLURM_NTASKS': '1', 'SLURM_PROCID': '0',
                               'SLURM_STEP_NODELIST': 'n1'}) is None       # a one-task job step
  assert distributed.launch_spec({'CFRL_DISTRIBUTED': 'off', 'CFRL_COORDINATOR': 'h:1'}) is None


def test_explicit_and_cfrl_environment_launch():
  spec = distributed.launch_spec({'CFRL_COORDINATOR': '10.0.0.1:1234', 'CFRL_NUM_PROCESSES': '4',
                               'CFRL_PROCESS_ID': '3', 'CFRL_LOCAL_DEVICE_IDS': '0,1'})
  assert (spec.coordinator, spec.num_processes, spec.process_id, spec.local_device_ids, spec.detect) == \
      ('10.0.0.1:1234', 4, 3, (0, 1), False)
  spec = distributed.launch_spec({}, coordinator='h:9', num_processes=2, process_id=0)
  assert (spec.coordinator, spec.num_processes, spec.process_id) == ('h:9', 2, 0)
  with pytest.raises(ValueError, match=r"missing \['num_processes', 'process_id'\]"):
    distributed.launch_spec({'CFRL_COORDINATOR': 'h:1'})
  with pytest.raises(ValueError, match='host:port'):
    distributed.launch_spec({}, coordinator='h', num_processes=2, process_id=0)
  with pytest.raises(ValueError, match=r'process_id=2 must lie in \[0, num_processes=2\)'):
    distributed.launch_spec({}, coordinator='h:1', num_processes=2, process_id=2)
  with pytest.raises(ValueError, match='is not an integer'):
    distributed.launch_spec({'CFRL_COORDINATOR': 'h:1', 'CFRL_NUM_PROCESSES': 'two', 'CFRL_PROCESS_ID': '0'})
  with pytest.raises(ValueError, match='CFRL_DISTRIBUTED'):
    distributed.launch_spec({'CFRL_DISTRIBUTED': 'yes'})


def test_slurm_and_tpu_environments():
  slurm = {'SLURM_JOB_ID': '4097', 'SLURM_NTASKS': '4', 'SLURM_STEP_NUM_TASKS': '4', 'SLURM_PROCID': '2',
           'SLURM_LOCALID': '0', 'SLURM_NODEID': '2', 'SLURM_STEP_NODELIST': 'gpu[007-009,012]',
           'SLURM_STEP_TASKS_PER_NODE': '1(x4)'}
  spec = distributed.launch_spec(slurm)
  assert (spec.coordinator, spec.num_processes, spec.process_id, spec.local_device_ids) == \
      ('gpu007:61097', 4, 2, None)                       # one task per node: all its GPUs
  per_gpu = dict(slurm, SLURM_STEP_NUM_TASKS='16', SLURM_STEP_TASKS_PER_NODE='8(x2)', SLURM_NODEID='1',
                 SLURM_LOCALID='5', SLURM_PROCID='13', CFRL_COORDINATOR='gpu007:5555')
  spec = distributed.launch_spec(per_gpu)
  assert (spec.coordinator, spec.num_processes, spec.process_id, spec.local_device_ids) == \
      ('gpu007:5555', 16, 13, (5,))                      # one task per GPU: pinned to its GPU
  assert distributed.first_slurm_host('node001') == 'node001'
  assert distributed.first_slurm_host('a1,b2') == 'a1'
  assert distributed.first_slurm_host('tpu-[3,5-7]') == 'tpu-3'
  assert distributed.launch_spec({'CFRL_DISTRIBUTED': 'auto'}).detect
  assert distributed.launch_spec({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}).detect
  assert distributed.launch_spec({'TPU_WORKER_HOSTNAMES': 'w0'}) is None


# --- sharded execution in subprocesses (8 simulated CPU devices) ---------------------
def _run(args, devices, kernels=True):
  """Starts tests/parallel_worker.py on `devices` simulated CPU devices; kernels=False switches the
  compiled CPU decode kernels off there (CFRL_JAX_CPU_KERNELS=0), as the xla_products fixture does here."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(('CFRL_', 'SLURM_', 'TPU_'))}
  # The caller's XLA flags too (e.g. --xla_cpu_max_isa): the worker computes as this process does.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  env.update(XLA_FLAGS=flags, JAX_PLATFORMS='cpu')
  if not kernels:
    env[cpu_decode.DISABLE_ENV] = '0'
  return subprocess.Popen([sys.executable, WORKER] + [str(a) for a in args], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout=900):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, f'worker failed ({proc.args[2:]}):\n{out[-4000:]}'
  return out


@pytest.fixture
def xla_products(monkeypatch):
  """This process's sampler on XLA's products and attention (the kernels switched off for the test).

  A single-device rollout runs its decode products in the compiled CPU kernels (cpu_decode.matvec /
  matmul), a mesh rollout in XLA's sharded products (the kernels have no partitioning rule), and the
  two sum in different orders with different vector widths per ISA (AVX-512 or AVX2 FMAs, NEON). A
  comparison of whole training runs starts both sides with the kernels off, so that what remains is the
  reduction order of one XLA product split over devices or not."""
  monkeypatch.setenv(cpu_decode.DISABLE_ENV, '0')
  cpu_decode._register.cache_clear()  # pylint: disable=protected-access
  assert not cpu_decode.available()
  yield
  monkeypatch.undo()
  cpu_decode._register.cache_clear()  # pylint: disable=protected-access


@pytest.fixture(scope='module')
def sharded_runs(tmp_path_factory):
  """Runs the mesh and checkpoint workers concurrently (one per core)."""
  out = tmp_path_factory.mktemp('parallel')
  procs = [_run(['meshes', out] + [','.join(map(str, s)) for s in MESHES], 8), _run(['checkpoint', out], 8)]
  logs = [_wait(p) for p in procs]
  (out / 'meshes.log').write_text(logs[0])
  return out


def test_sharded_programs_need_no_involuntary_rematerialization(sharded_runs):
  # XLA's SPMD partitioner logs this when it cannot reshard an op's output and replicates it instead
  # (memory and traffic of the whole tensor on every device). The embedding lookup did so on tensor=2
  # meshes until the table was given a vocab-parallel layout for the gather.
  log = (sharded_runs / 'meshes.log').read_text()
  assert 'Involuntary full rematerialization' not in log, log[-4000:]


@pytest.fixture(scope='module')
def reference():
  """The same step and sample on one device with the unsharded learner and sampler."""
  cfg = worker.tiny_config()
  params = worker.tiny_params(cfg)
  tx = worker.optimizer(cfg, params)
  update = worker.update_fn(cfg, tx)
  before = worker.flat(params)
  res = update(params, tx.init(params), {k: jnp.asarray(v) for k, v in worker.tiny_batch(cfg).items()},
               {k: jnp.float32(v) for k, v in worker.LRS.items()})
  tokens, mask = worker.tiny_prompts(cfg)
  sample = sampling.sample(cfg, res.params, tokens, mask, jax.random.PRNGKey(1), max_new_tokens=6, greedy=True)
  return types.SimpleNamespace(before=before, params=worker.flat(res.params), loss=float(res.loss),
                               tokens=np.asarray(sample.tokens), logprobs=np.asarray(sample.logprobs))


def _close_params(got: dict, ref: dict, before: dict):
  moved = max(np.max(np.abs(ref[k] - before[k])) for k in ref)
  assert moved > 1e-4, 'the reference step barely moved the parameters: the comparison would be vacuous'
  for k, v in ref.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


# Hand-computed per-device shard shapes of the tiny model (d 64, q 64, kv 32, ffn 128, vocab 128, 2 layers).
def _expected_shards(fsdp, tensor):
  f, t = fsdp, tensor
  return {
      'backbone/embed': [128 // t, 64 // f], 'head/w': [128 // t, 64 // f], 'backbone/final_norm': [64],
      'backbone/layers/input_norm': [2, 64], 'backbone/layers/post_attn_norm': [2, 64],
      'backbone/layers/q_proj/kernel': [2, 64 // f, 64 // t], 'backbone/layers/k_proj/kernel': [2, 64 // f, 32 // t],
      'backbone/layers/v_proj/kernel': [2, 64 // f, 32 // t], 'backbone/layers/o_proj/kernel': [2, 64 // t, 64 // f],
      'backbone/layers/gate_proj/kernel': [2, 64 // f, 128 // t], 'backbone/layers/up_proj/kernel': [2, 64 // f, 128 // t],
      'backbone/layers/down_proj/kernel': [2, 128 // t, 64 // f],
      'backbone/layers/q_proj/bias': [2, 64 // t], 'backbone/layers/k_proj/bias': [2, 32 // t],
      'backbone/layers/v_proj/bias': [2, 32 // t],
  }


@pytest.mark.slow      # the workers of sharded_runs: two processes, three meshes' compiles
@pytest.mark.parametrize('shape', MESHES, ids=lambda s: 'x'.join(map(str, s)))
def test_sharded_step_and_greedy_sample_match_one_device(sharded_runs, reference, shape):
  name = 'x'.join(map(str, shape))
  report = json.load(open(sharded_runs / 'meshes.json'))
  assert report['device_count'] == 8
  mesh = report['meshes'][name]
  assert mesh['mesh_axes'] == dict(zip(sharding.AXES, shape)) and mesh['finite']
  expected = _expected_shards(shape[1], shape[2])
  for placed in ('params_in', 'params_out'):
    assert {k: v['shards'] for k, v in mesh[placed].items()} == {k: [v] for k, v in expected.items()}, placed
    assert all(v['devices'] == 8 for v in mesh[placed].values())
  assert mesh['params_in']['backbone/layers/q_proj/kernel']['spec'] == [None, 'fsdp', 'tensor']
  assert mesh['params_in']['backbone/layers/down_proj/kernel']['spec'] == [None, 'tensor', 'fsdp']
  # Adam moments come out of the step sharded like their parameters
  for k, v in mesh['opt_out'].items():
    param = k.split('/mu/', 1)[-1].split('/nu/', 1)[-1]
    assert v['spec'] == mesh['params_out'][param]['spec'] and v['shards'] == mesh['params_out'][param]['shards'], k
  assert len(mesh['opt_out']) == 2 * len(expected)
  # constrain_batch split the 8 rows over data x fsdp (the tensor axis holds replicas)
  assert mesh['constrained_shards'] == [[8 // (shape[0] * shape[1]), 4, 6]]

  got = np.load(sharded_runs / f'mesh_{name}.npz')
  np.testing.assert_allclose(float(got['loss']), reference.loss, rtol=1e-6)
  _close_params({k[len('param:'):]: got[k] for k in got.files if k.startswith('param:')},
                reference.params, reference.before)
  np.testing.assert_array_equal(got['sample_tokens'], reference.tokens)
  np.testing.assert_allclose(got['sample_logprobs'], reference.logprobs, atol=1e-4)


@pytest.mark.slow
def test_checkpoint_written_under_one_mesh_restores_under_another(sharded_runs):
  report = json.load(open(sharded_runs / 'checkpoint.json'))
  assert report['values_equal'] and report['meta_stage'] == 2 and report['continued_finite']
  expected = _expected_shards(2, 2)                     # restored into (2, 2, 2), written from (8, 1, 1)
  assert {k: v['shards'] for k, v in report['restored'].items()} == {k: [v] for k, v in expected.items()}
  assert {k: v['shards'] for k, v in report['continued_out'].items()} == {k: [v] for k, v in expected.items()}
  for k, v in report['restored_opt'].items():
    assert v['shards'] == [expected[k.split('/mu/', 1)[1]]], k


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow      # multi-process runs: each process imports jax and compiles its own programs
def test_two_processes_over_loopback_match_one_process(tmp_path):
  """jax.distributed over 127.0.0.1 (gloo CPU collectives), 2 processes x 4 devices, mesh (2, 2, 2)."""
  coordinator = f'127.0.0.1:{_free_port()}'
  procs = [_run(['multihost', tmp_path, coordinator, 2, i], 4) for i in range(2)]
  for p in procs:
    _wait(p, timeout=600)
  infos = [json.load(open(tmp_path / f'multihost_{i}.json')) for i in range(2)]
  for i, info in enumerate(infos):
    assert (info['process_count'], info['process_index'], info['local_devices'], info['devices']) == (2, i, 4, 8)
    assert info['is_main'] == (i == 0) and not info['fully_addressable']
  assert [info['host_rows'] for info in infos] == [[0, 4], [4, 8]]

  cfg = worker.tiny_config()
  params = worker.tiny_params(cfg)
  before = worker.flat(params)
  tx = worker.optimizer(cfg, params)
  opt_state, update, losses = tx.init(params), worker.update_fn(cfg, tx), []
  for i in range(worker.STEPS_MULTIHOST):
    res = update(params, opt_state, {k: jnp.asarray(v) for k, v in worker.tiny_batch(cfg, i).items()},
                 {k: jnp.float32(v) for k, v in worker.LRS.items()})
    params, opt_state = res.params, res.opt_state
    losses.append(float(res.loss))
  got = np.load(tmp_path / 'multihost.npz')
  np.testing.assert_allclose(got['losses'], losses, rtol=1e-6)
  _close_params({k[len('param:'):]: got[k] for k in got.files if k.startswith('param:')},
                worker.flat(params), before)


@pytest.mark.slow
@pytest.mark.parametrize('algorithm', ['grpo', 'ppo'])
def test_trainer_on_a_mesh_matches_one_device(tmp_path, tiny_tokenizer_dir, algorithm, xla_products):
  """The whole loop (sharded sampler, reference log-probs, learner, critic, checkpoint) on a (2,2,2)
  mesh of 8 devices gives the single-device run's rewards, losses and parameters (both runs on XLA's
  products: see xla_products)."""
  from cfrl_jax import metrics as metrics_lib
  import test_trainer
  sharded, single = tmp_path / 'mesh', tmp_path / 'one'
  sharded.mkdir()
  proc = _run(['trainer', sharded, tiny_tokenizer_dir, algorithm, '2,2,2'], 8, kernels=False)
  result = test_trainer.run(worker.trainer_config(tiny_tokenizer_dir, str(single), algorithm))
  _wait(proc)
  placed = json.load(open(sharded / 'placement.json'))
  assert placed['devices'] == 8 and placed['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert placed['specs']['backbone/layers/q_proj/kernel'] == [None, 'fsdp', 'tensor']
  got, ref = (metrics_lib.read_metrics(str(d), 'train') for d in (sharded, single))
  assert len(got) == len(ref) == 2
  for g, r in zip(got, ref):
    assert g['reward_mean'] == r['reward_mean']          # same samples: threefry draws do not depend on sharding
    np.testing.assert_allclose(g['loss'], r['loss'], rtol=1e-4, atol=1e-6)
    for k in ('kl', 'value_loss', 'entropy'):
      if k in r:
        np.testing.assert_allclose(g[k], r[k], rtol=1e-3, atol=1e-6, err_msg=k)
  # Both runs use XLA's products (xla_products), summed in another order on the mesh: gradients differ by
  # float32 reduction-order noise, a few ulp of entries <= ~0.1, ~1e-8. Adam's step lr m / (sqrt(v) + eps)
  # changes by at most lr / eps (1e-2 / 1e-3 = 10, trainer_config's eps) times that, ~1e-7 per step and
  # entry over 2 steps (measured: <= 1.5e-7); 1e-6 everywhere, against steps of up to lr = 1e-2.
  params = np.load(sharded / 'params.npz')
  for k, v in worker.flat(result.params).items():
    np.testing.assert_allclose(params[f'param:{k}'], v, rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_per_host_loading_over_two_processes_matches_one_process(tmp_path, tiny_tokenizer_dir, xla_products):
  """GRPO, 2 steps of 2 minibatches, 2 processes x 2 devices over loopback, mesh (1, 4, 1) spanning
  both, data_loading 'per_host': each process rolls out and scores only its 2 of the step's 4 prompts
  (8 of 16 rows), yet both log the metrics of the whole batch, process 0 alone writes them, and the
  run matches a single-process run on one device.

  Tolerances (both runs on XLA's products, see xla_products, and Adam's eps at 1e-3, see
  parallel_worker.trainer_config): the samples are the same (each row draws its random numbers at its
  global index), so rewards, lengths and the prompts are exactly equal; learner metrics rtol 1e-4
  (atol 1e-6), the sampler's log-probs atol 1e-5; every parameter within 1e-6, as in
  test_trainer_on_a_mesh_matches_one_device.
  """
  from cfrl_jax import metrics as metrics_lib
  from cfrl_jax.run_setup import load_policy
  from cfrl_jax.train import trainer
  coordinator = f'127.0.0.1:{_free_port()}'
  run_dir, single_dir = tmp_path / 'per_host', tmp_path / 'one'
  run_dir.mkdir()
  procs = [_run(['trainer_per_host', run_dir, tiny_tokenizer_dir, '1,-1,1', coordinator, 2, i], 2, kernels=False)
           for i in range(2)]
  c = worker.per_host_config(tiny_tokenizer_dir, str(single_dir))
  seen: list = []
  task = worker.recording_task(seen)
  policy, params = load_policy(c, task)
  start = {k: np.array(v) for k, v in worker.flat(params).items()}   # before training donates params
  result = trainer.train(c, policy, params, task, c.run_dir, progress=False)
  for p in procs:
    _wait(p, timeout=600)
  infos = [json.load(open(run_dir / f'per_host_{i}.json')) for i in range(2)]

  G, n = c.rl.group_size, c.rl.prompts_per_step
  assert all(info['per_host'] and info['devices'] == 4 and info['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
             for info in infos)
  assert [info['block'] for info in infos] == [[0, 8], [8, 16]]
  for step in range(2):
    prompts = [r['prompt'] for r in trainer.prompt_rows(task.train, step, n, c.seed)]
    assert seen[step] == [p for p in prompts for _ in range(G)]           # one process: all 16 rows
    for i, info in enumerate(infos):                                      # each process: its 8 rows
      assert info['prompts'][step] == [p for p in prompts[2 * i:2 * i + 2] for _ in range(G)], (step, i)
  assert len(seen) == len(infos[0]['prompts']) == len(infos[1]['prompts']) == 2
  for info in infos:
    assert info['gathered'] == list(range(0, 160, 10))                    # gather_rows: batch order
    assert 'multiple of 2' in info['errors']['odd_rows']
    assert 'data_loading="global"' in info['errors']['unsplit_rows']
    assert 'prompts_per_step=3 does not divide over 2 processes' in info['errors']['prompts_per_step']

  drop = lambda records: [{k: v for k, v in r.items() if k != 'step_time'} for r in records if r['kind'] == 'train']
  logged = [drop(info['logged']) for info in infos]
  written = drop(metrics_lib.read_metrics(str(run_dir), 'train'))
  assert logged[0] == logged[1] == written and len(written) == 2         # same numbers; one writer
  ref = drop(metrics_lib.read_metrics(str(single_dir), 'train'))
  for got, want in zip(written, ref):
    assert set(got) == set(want)
    for k in ('reward_mean', 'reward_std', 'response_length', 'reward_contains_e_recorded', 'stage'):
      assert got[k] == want[k], k
    np.testing.assert_allclose(got['sampled_logprob'], want['sampled_logprob'], atol=1e-5)
    for k in set(want) - {'step', 'kind', 'sampled_logprob'}:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # Parameters: see test_trainer_on_a_mesh_matches_one_device (measured here: <= 1.6e-7).
  got_params = np.load(run_dir / 'params.npz')
  for k, v in worker.flat(result.params).items():
    assert np.abs(v - start[k]).max() > 1e-3, k                          # the run moved every leaf
    np.testing.assert_allclose(got_params[f'param:{k}'], v, rtol=0, atol=1e-6, err_msg=k)
