"""Subprocess side of tests/test_parallel.py: runs sharded steps on simulated CPU devices.

JAX fixes the CPU device count when its backend starts, so the sharded checks run here, started
by the test with XLA_FLAGS=--xla_force_host_platform_device_count=N (and, for the multi-host case,
two copies joined by jax.distributed over loopback). Results go to an .npz/.json the test compares
with its own single-device run, so the reference is computed by a separate process.

    python tests/parallel_worker.py meshes OUT_DIR 8,1,1 2,4,1 2,2,2
    python tests/parallel_worker.py checkpoint OUT_DIR
    python tests/parallel_worker.py multihost OUT_DIR COORDINATOR NUM_PROCESSES PROCESS_ID
    python tests/parallel_worker.py trainer OUT_DIR TOKENIZER_DIR ALGORITHM MESH
    python tests/parallel_worker.py trainer_per_host OUT_DIR TOKENIZER_DIR MESH COORDINATOR NPROC PID [global]

The problem (tiny untied Qwen2, GRPO objective, stage-two AdamW, a fixed batch and greedy prompts)
is defined once below and imported by the test.
"""
from __future__ import annotations

import json
import os
import sys
import types

import numpy as np

STEPS_MULTIHOST = 2
LRS = {'head': 1e-3, 'backbone': 1e-3}


def tiny_config():
  from cfrl_jax.models import qwen
  # hidden 64 / 4 heads of 16 / 2 KV heads: every sharded dim divides by tensor=2 and fsdp<=4.
  return qwen.QwenConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0)


def default_rules():
  """The trainer's default partition rules (generated from the model's logical axes)."""
  from cfrl_jax import sharding
  from cfrl_jax.models import qwen
  return sharding.MeshConfig().all_rules(qwen.param_axes())


def tiny_params(cfg):
  import jax
  from cfrl_jax.models import qwen
  # std 0.3: peaked logits, so greedy argmax is far from ties and must match exactly.
  return qwen.init_params(cfg, jax.random.PRNGKey(0), std=0.3)


def rl_settings():
  return types.SimpleNamespace(clip_low=0.2, clip_high=0.2, kl_coef=0.0, kl_estimator='k3',
                               aggregation='seq_mean', max_new_tokens=6)


PROMPT_LEN, COMPLETION_LEN, ROWS = 5, 6, 8


def tiny_batch(cfg, step: int = 0) -> dict:
  """A GRPO batch (8 rows = 2 prompts x 4 samples) of [left-padded prompt | completion]."""
  rng = np.random.RandomState(100 + step)
  T = PROMPT_LEN + COMPLETION_LEN
  tokens = rng.randint(1, cfg.vocab_size, size=(ROWS, T)).astype(np.int32)
  mask = np.ones((ROWS, T), np.int32)
  mask[::3, :2] = 0                      # some prompts left-padded
  tokens[mask == 0] = 0
  completion_mask = np.ones((ROWS, COMPLETION_LEN), np.float32)
  completion_mask[1::2, 4:] = 0          # some completions stop early
  mask[:, PROMPT_LEN:] = completion_mask.astype(np.int32)
  old_logp = (-2.0 + 0.1 * rng.randn(ROWS, COMPLETION_LEN)).astype(np.float32) * completion_mask
  advantages = rng.randn(ROWS).astype(np.float32)
  return {'tokens': tokens, 'mask': mask, 'completion_mask': completion_mask, 'old_logp': old_logp,
          'advantages': advantages}


def tiny_prompts(cfg):
  rng = np.random.RandomState(7)
  tokens = rng.randint(1, cfg.vocab_size, size=(ROWS, 7)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[::2, :3] = 0
  tokens[mask == 0] = 0
  return tokens, mask


def update_fn(cfg, tx):
  from cfrl_jax.train import learner, objectives
  loss_fn = objectives.grpo_objective(cfg, PROMPT_LEN, rl_settings())
  return learner.make_update(cfg, loss_fn, tx, stage=2)


def optimizer(cfg, params):
  from cfrl_jax.train import learner
  # Adam's first step is lr * g / (|g| + eps): with the default eps=1e-8 a gradient entry near zero
  # turns float32 reduction-order noise (~1e-5 of the largest gradient) into an O(lr) difference.
  # eps=1e-3 (gradients here are ~1e-3) keeps that amplification bounded, so params can be compared tightly.
  return learner.make_optimizer(cfg, params, 2, learner.OptimConfig(eps=1e-3))


def flat(tree) -> dict:
  import jax
  from cfrl_jax import sharding
  return {sharding.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def spec_report(tree) -> dict:
  """path -> {'spec': [...], 'shards': sorted distinct per-device shard shapes, 'devices': count}."""
  import jax
  from cfrl_jax import sharding
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    spec = [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]
    shapes = sorted({tuple(s.data.shape) for s in x.addressable_shards})
    out[sharding.path_str(path)] = {'spec': spec, 'shards': [list(s) for s in shapes],
                                    'devices': len(x.sharding.device_set)}
  return out


def run_meshes(out_dir: str, shapes: list[tuple[int, ...]]):
  import jax
  from jax.sharding import PartitionSpec as P
  from cfrl_jax import sampling, sharding
  from cfrl_jax.train import placement
  cfg = tiny_config()
  report = {'device_count': jax.device_count(), 'meshes': {}}
  for shape in shapes:
    name = 'x'.join(map(str, shape))
    mesh = sharding.make_mesh(shape)
    params = tiny_params(cfg)
    specs = sharding.partition_specs(params, default_rules(), mesh)
    params = sharding.shard(params, mesh, specs)
    tx = optimizer(cfg, params)
    opt_state, opt_specs = sharding.init_opt_state(tx, params, mesh, specs)
    step = placement.sharded_update(update_fn(cfg, tx), mesh, specs, opt_specs)
    placed = spec_report(params)
    res = step(params, opt_state, tiny_batch(cfg), LRS)
    tokens, mask = tiny_prompts(cfg)
    sample = sampling.sample(cfg, res.params, tokens, mask, jax.random.PRNGKey(1), mesh=mesh,
                             max_new_tokens=6, greedy=True)
    np.savez(os.path.join(out_dir, f'mesh_{name}.npz'),
             loss=np.asarray(res.loss), sample_tokens=sample.tokens, sample_logprobs=sample.logprobs,
             **{f'param:{k}': v for k, v in flat(res.params).items()})
    opt_leaves = jax.tree_util.tree_leaves(res.opt_state)
    # constrain_batch inside a jit_sharded function: the output takes the constrained (batch) sharding.
    act = sharding.jit_sharded(lambda x: sharding.constrain_batch(x * 2.0), mesh, (P(),), None)(np.ones((8, 4, 6)))
    report['meshes'][name] = {
        'params_in': placed, 'params_out': spec_report(res.params),
        'opt_out': {k: v for k, v in spec_report(res.opt_state).items() if '/mu/' in k or '/nu/' in k},
        'opt_leaves': len(opt_leaves), 'finite': bool(res.finite),
        'constrained_shards': sorted({tuple(sh.data.shape) for sh in act.addressable_shards}),
        'mesh_axes': dict(mesh.shape)}
  with open(os.path.join(out_dir, 'meshes.json'), 'w') as f:
    json.dump(report, f)


def run_checkpoint(out_dir: str):
  """Save params + optimizer state under (8,1,1), restore under (2,2,2) with abstract sharded targets."""
  import jax
  from cfrl_jax import sharding
  from cfrl_jax.train import placement
  from cfrl_jax.train.checkpoint import Checkpointer
  cfg = tiny_config()
  mesh_a, mesh_b = sharding.make_mesh((8, 1, 1)), sharding.make_mesh((2, 2, 2))
  params = tiny_params(cfg)
  specs_a = sharding.partition_specs(params, default_rules(), mesh_a)
  params_a = sharding.shard(params, mesh_a, specs_a)
  tx = optimizer(cfg, params)
  opt_a, opt_specs_a = sharding.init_opt_state(tx, params_a, mesh_a, specs_a)
  res = placement.sharded_update(update_fn(cfg, tx), mesh_a, specs_a, opt_specs_a)(
      params_a, opt_a, tiny_batch(cfg), LRS)
  saved_params, saved_opt = flat(res.params), flat(res.opt_state)
  ckpt = Checkpointer(os.path.join(out_dir, 'run'))
  ckpt.save(1, res.params, {'opt_state': res.opt_state}, {'stage': 2})
  ckpt.wait()

  specs_b = sharding.partition_specs(params, default_rules(), mesh_b)
  opt_specs_b = sharding.opt_state_specs(jax.eval_shape(tx.init, params), params, specs_b)
  target_params = sharding.abstract_sharded(params, mesh_b, specs_b)
  target_train = {'opt_state': sharding.abstract_sharded(jax.eval_shape(tx.init, params), mesh_b, opt_specs_b)}
  params_b, train_b, meta = ckpt.restore(1, target_params, target_train)
  ckpt.close()
  same = all(np.array_equal(saved_params[k], v) for k, v in flat(params_b).items()) and \
      all(np.array_equal(saved_opt[k], v) for k, v in flat(train_b['opt_state']).items())
  report = {'values_equal': bool(same), 'meta_stage': meta['stage'],
            'restored': spec_report(params_b),
            'restored_opt': {k: v for k, v in spec_report(train_b['opt_state']).items() if '/mu/' in k}}
  # The restored state must train on in the new mesh (the step donates params_b and its state).
  res_b = placement.sharded_update(update_fn(cfg, tx), mesh_b, specs_b, opt_specs_b)(
      params_b, train_b['opt_state'], tiny_batch(cfg, 1), LRS)
  report.update(continued_finite=bool(res_b.finite), continued_out=spec_report(res_b.params))
  with open(os.path.join(out_dir, 'checkpoint.json'), 'w') as f:
    json.dump(report, f)


def run_multihost(out_dir: str, coordinator: str, num_processes: int, process_id: int):
  from cfrl_jax import distributed, sharding
  from cfrl_jax.train import placement
  assert distributed.initialize_distributed(coordinator, num_processes, process_id)
  import jax
  cfg = tiny_config()
  mesh = sharding.make_mesh((2, 2, 2))
  params = tiny_params(cfg)
  specs = sharding.partition_specs(params, default_rules(), mesh)
  params = sharding.shard(params, mesh, specs)
  tx = optimizer(cfg, params)
  opt_state, opt_specs = sharding.init_opt_state(tx, params, mesh, specs)
  step = placement.sharded_update(update_fn(cfg, tx), mesh, specs, opt_specs)
  losses = []
  for i in range(STEPS_MULTIHOST):
    res = step(params, opt_state, tiny_batch(cfg, i), LRS)
    params, opt_state = res.params, res.opt_state
    losses.append(float(res.loss))
  rows = sharding.host_rows(ROWS, mesh)
  host = sharding.to_host(params)       # a collective: every process takes part
  if distributed.is_main_process():
    np.savez(os.path.join(out_dir, 'multihost.npz'), losses=np.asarray(losses), **{
        f'param:{k}': v for k, v in flat(host).items()})
  with open(os.path.join(out_dir, f'multihost_{process_id}.json'), 'w') as f:
    json.dump({'process_count': jax.process_count(), 'process_index': jax.process_index(),
               'local_devices': jax.local_device_count(), 'devices': jax.device_count(),
               'host_rows': [rows.start, rows.stop], 'is_main': distributed.is_main_process(),
               'fully_addressable': bool(jax.tree_util.tree_leaves(params)[0].is_fully_addressable)}, f)
  jax.distributed.shutdown()


def trainer_config(tokenizer_dir: str, run_dir: str, algorithm: str, mesh_shape=(1, -1, 1)):
  """The whole RL loop (tests/test_trainer.py's toy task) for two steps, KL reference on."""
  import test_trainer
  c = test_trainer.toy_config(tokenizer_dir, run_dir, algorithm=algorithm, steps=2, prompts_per_step=4,
                              group_size=4, kl_coef=0.05, lr=1e-2)
  c.rl.ppo.critic_lr = 1e-3
  # As in optimizer(): Adam's step lr * m / (sqrt(v) + eps) moves an entry whose gradient is ~0 by up to
  # ~lr on float32 reduction-order noise when eps is 1e-8, so a mesh run and a one-device run differ
  # there by an amount the CPU's vector width decides. eps=1e-3 bounds the step's sensitivity to its
  # gradient by lr / eps, which test_parallel's tolerances rest on.
  c.rl.eps = 1e-3
  c.checkpoint.every = 2
  c.mesh.shape = tuple(mesh_shape)
  return c


def run_trainer(out_dir: str, tokenizer_dir: str, algorithm: str, mesh_shape):
  import jax
  import test_trainer
  c = trainer_config(tokenizer_dir, out_dir, algorithm, mesh_shape)
  result = test_trainer.run(c)
  leaves = jax.tree_util.tree_flatten_with_path(result.params)[0]
  np.savez(os.path.join(out_dir, 'params.npz'), **{f'param:{k}': v for k, v in flat(result.params).items()})
  with open(os.path.join(out_dir, 'placement.json'), 'w') as f:
    json.dump({'devices': jax.device_count(),
               'mesh': dict(leaves[0][1].sharding.mesh.shape),
               'specs': {k: v['spec'] for k, v in spec_report(result.params).items()}}, f)


def per_host_config(tokenizer_dir: str, run_dir: str, mesh_shape=(1, -1, 1), data_loading: str = 'per_host'):
  """trainer_config's GRPO run (KL reference on) in two minibatches, so the learner's rows are
  gathered across processes, with checkpoints written collectively by both processes."""
  c = trainer_config(tokenizer_dir, run_dir, 'grpo', mesh_shape)
  c.mesh.data_loading = data_loading
  c.rl.minibatches = 2
  c.checkpoint.every = 2
  return c


def recording_task(seen: list):
  """test_trainer's toy task whose reward function also records the prompts it scores (in `seen`)."""
  import test_trainer
  task = test_trainer.toy_task()

  def contains_e_recorded(prompts, completions, **kw):
    seen.append(list(prompts))
    return test_trainer.contains_e(prompts, completions, **kw)

  task.reward_fns = [(contains_e_recorded, 1.0)]
  return task


def run_trainer_per_host(out_dir: str, tokenizer_dir: str, mesh_shape, coordinator: str, num_processes: int,
                         process_id: int, data_loading: str = 'per_host'):
  """GRPO for two steps on a mesh spanning the processes, each loading only its share of the prompts
  (data_loading 'global', for comparison: every process the whole batch).

  Writes per process: the prompts its reward function scored per step, every metrics record it
  logged (enabled or not), and what the per-host checks raised; process 0 also the final params."""
  from cfrl_jax import distributed, sharding
  assert distributed.initialize_distributed(coordinator, num_processes, process_id)
  import jax
  from cfrl_jax.run_setup import load_policy
  from cfrl_jax.train import trainer
  c = per_host_config(tokenizer_dir, out_dir, mesh_shape, data_loading)
  seen: list = []
  task = recording_task(seen)
  policy, params = load_policy(c, task)
  t = trainer.Trainer(c, policy, params, task, out_dir, progress=False)
  logged = []
  write = t.writer.write
  t.writer.write = lambda step, kind, values: logged.append(write(step, kind, values)) or logged[-1]
  try:
    result = t.run()
  finally:
    t.close()
  host = sharding.to_host(result.params)   # a collective: every process takes part
  mesh = t.place.mesh
  B = c.rl.prompts_per_step * c.rl.group_size
  block = sharding.process_block(B, mesh)
  gathered = sharding.gather_rows({'x': np.arange(B)[block] * 10}, mesh)['x']
  errors = {}
  for name, check in (('odd_rows', lambda: sharding.process_block(B + 1, mesh)),
                      ('unsplit_rows', lambda: sharding.process_block(2, mesh)),
                      ('prompts_per_step', lambda: (t.rl.update(prompts_per_step=3), t._step_prompts(4)))):
    try:
      check()
      errors[name] = None
    except ValueError as e:
      errors[name] = str(e)
  if distributed.is_main_process():
    np.savez(os.path.join(out_dir, 'params.npz'), **{f'param:{k}': v for k, v in flat(host).items()})
  with open(os.path.join(out_dir, f'per_host_{process_id}.json'), 'w') as f:
    json.dump({'prompts': seen, 'logged': logged, 'block': [block.start, block.stop],
               'gathered': gathered.tolist(), 'errors': errors, 'per_host': t.place.per_host,
               'mesh': dict(mesh.shape), 'devices': jax.device_count()}, f)
  jax.distributed.shutdown()


def main(argv):
  mode, out_dir = argv[1], argv[2]
  if mode == 'meshes':
    run_meshes(out_dir, [tuple(int(s) for s in a.split(',')) for a in argv[3:]])
  elif mode == 'checkpoint':
    run_checkpoint(out_dir)
  elif mode == 'multihost':
    run_multihost(out_dir, argv[3], int(argv[4]), int(argv[5]))
  elif mode == 'trainer':
    run_trainer(out_dir, argv[3], argv[4], tuple(int(s) for s in argv[5].split(',')))
  elif mode == 'trainer_per_host':
    run_trainer_per_host(out_dir, argv[3], tuple(int(s) for s in argv[4].split(',')), argv[5], int(argv[6]),
                         int(argv[7]), *argv[8:])
  else:
    raise SystemExit(f'unknown mode {mode!r}')


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main(sys.argv)
