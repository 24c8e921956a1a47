"""The fit-before-launch planner (cfrl_jax/plan.py) and the model presets, on CPU only.

The whole planner runs in a subprocess on 8 simulated CPU devices (cpu:8) with a tiny model; its
FLOPs are checked against hand counts of the model's matrix products. The does-not-fit path runs
in-process on however many CPU devices this process has.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax import plan
from cfrl_jax.config import base_config
from cfrl_jax.models import presets

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Tiny Qwen2 shape: d 64, FFN 128, 2 layers, 4 query / 2 KV heads of 16, vocab 512 (tied, untied by
# configs/qwen_cfrl.py's tie='untie'); 4 prompts x 4 samples, prompt 16 + 16 new tokens, 2 minibatches.
D, F, L, HQ, HKV, HD, V = 64, 128, 2, 4, 2, 16, 512
PROMPTS, GROUP, P, N, MINIBATCHES = 4, 4, 16, 16, 2
TINY = ['--config.model.source=init', f'--config.model.arch.hidden_size={D}',
        f'--config.model.arch.intermediate_size={F}', f'--config.model.arch.num_layers={L}',
        f'--config.model.arch.num_heads={HQ}', f'--config.model.arch.num_kv_heads={HKV}',
        '--config.model.arch.tied=True', f'--vocab_size={V}', f'--config.rl.prompts_per_step={PROMPTS}',
        f'--config.rl.group_size={GROUP}', f'--config.rl.max_new_tokens={N}',
        f'--config.rl.minibatches={MINIBATCHES}', f'--prompt_len={P}']


def _layer_params():
  """Hand count of one Qwen2 layer's matrix parameters (biases and norms do no products)."""
  q, kv = HQ * HD, HKV * HD
  return D * (q + 2 * kv) + q * D + 3 * D * F


@pytest.fixture(scope='module')
def cpu8_plan(tmp_path_factory):
  out = tmp_path_factory.mktemp('plan') / 'plan.md'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  res = subprocess.run([sys.executable, '-m', 'cfrl_jax.plan', '--config=configs/qwen_cfrl.py', '--topology=cpu:8',
                        f'--out={out}'] + TINY, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  return res, out.read_text(), json.loads(out.with_suffix('.json').read_text())


@pytest.mark.slow
def test_cpu8_plan_compiles_every_program_of_a_cfrl_step(cpu8_plan):
  res, md, summary = cpu8_plan
  assert summary['devices'] == 8 and summary['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  names = [p['name'] for p in summary['programs']]
  assert names == ['sampler', 'log-probs', 'learner update, CF-RL stage 1', 'learner update, CF-RL stage 2']
  for p in summary['programs']:
    assert p['fits_compiler'] and p['argument_bytes'] > 0 and p['flops'] > 0 and p['hbm_bytes'] > 0
    assert p['bound'] in ('compute', 'memory')
    assert f"| {p['name']} |" in md
  calls = {p['name']: p['calls'] for p in summary['programs']}
  assert calls['log-probs'] == 2           # recompute_old_logp and a KL reference
  assert calls['learner update, CF-RL stage 2'] == MINIBATCHES
  assert summary['shapes']['minibatch_rows'] == PROMPTS * GROUP // MINIBATCHES
  assert md in res.stdout


@pytest.mark.slow
def test_stage_one_has_no_backbone_optimizer_state(cpu8_plan):
  _, _, summary = cpu8_plan
  opt = summary['optimizer_state_bytes']
  head = V * D                              # the untied head (V, d)
  backbone = V * D + L * (_layer_params() + (HQ + 2 * HKV) * HD + 2 * D) + D
  # Adam's two float32 moments per parameter, split over 8 devices (every leaf here divides by 8 or is tiny)
  assert opt['1']['backbone'] == 0
  assert opt['1']['head'] == pytest.approx(2 * 4 * head / 8, rel=0.01)
  assert opt['2']['backbone'] == pytest.approx(2 * 4 * backbone / 8, rel=0.05)


@pytest.mark.slow
def test_learner_flops_match_a_hand_count(cpu8_plan):
  _, _, summary = cpu8_plan
  by = {p['name']: p for p in summary['programs']}
  rows, T = PROMPTS * GROUP // MINIBATCHES, P + N
  layers = L * _layer_params() * rows * T                 # multiply-adds of the layers' products
  attention = L * rows * 2 * T * T * HQ * HD              # QK^T and PV, full T x T
  head = V * D * rows * N                                 # the head runs on the N completion positions
  # Stage 2 with remat: forward, recomputed forward, backward (twice the forward) = 4 forwards;
  # the head is not rematerialised: forward + backward = 3 forwards. 2 FLOPs per multiply-add.
  stage2 = 2 * (4 * (layers + attention) + 3 * head) / 8
  # Stage 1: the backbone is frozen (no backward, no recompute), the head trains.
  stage1 = 2 * ((layers + attention) + 3 * head) / 8
  assert by['learner update, CF-RL stage 2']['flops'] == pytest.approx(stage2, rel=0.25)
  assert by['learner update, CF-RL stage 1']['flops'] == pytest.approx(stage1, rel=0.25)
  # the 6 N tokens rule (no attention, no remat) is within a factor of it
  six_n = 6 * (L * _layer_params() + V * D) * rows * T / 8
  assert 0.5 < by['learner update, CF-RL stage 2']['flops'] / six_n < 2
  # XLA's own cost analysis counts the scanned layers once: fewer FLOPs than the loop-aware count
  assert by['learner update, CF-RL stage 2']['xla_cost_analysis_flops'] < by['learner update, CF-RL stage 2']['flops']


@pytest.mark.slow
def test_plan_exits_nonzero_naming_fields_when_it_does_not_fit(tmp_path, monkeypatch, capsys):
  n = len(jax.devices('cpu'))
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))   # plan.topology edits it
  out = tmp_path / 'plan.md'
  rc = plan.main(['plan', '--config=configs/qwen_grpo.py', f'--topology=cpu:{n}', '--hbm_gib=0.00001',
                  f'--out={out}', '--config.rl.algorithm=ppo', '--config.rl.recompute_old_logp=False',
                  '--config.rl.kl_coef=0.0'] + TINY)
  err = capsys.readouterr()
  assert rc == plan.EXIT_DOES_NOT_FIT
  text = out.read_text()
  assert '## Does not fit' in text and 'does not fit in 1e-05 GiB' in text
  for field in ('rl.minibatches=4', 'mesh.shape=', "model.param_dtype='bfloat16'", 'largest buffers'):
    assert field in text, field
  assert 'critic update' in text and 'critic values' in text and 'log-probs' not in text.split('## Does')[0]
  assert 'does not fit' in err.err


def test_hlo_counter_counts_scanned_layers_by_trip_count():
  layers, rows, k = 5, 8, 32
  w = jnp.ones((layers, k, k), jnp.float32)
  x = jnp.ones((rows, k), jnp.float32)
  f = jax.jit(lambda w, x: jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0])
  compiled = f.lower(w, x).compile()
  counter = plan.HloCounter(compiled.as_text())
  assert counter.flops() == 2 * rows * k * k * layers
  # per layer: its (k, k) slice copied out of the stacked w (read + write) and read by the product,
  # the (rows, k) activations in and out of the product and the tanh; not the whole stacked w per layer
  per_layer = 3 * k * k * 4 + 4 * rows * k * 4
  assert layers * per_layer <= counter.bytes() < layers * (per_layer + k * k * 4)


def test_hlo_counter_counts_a_decode_like_loop_by_its_bound():
  # A while loop whose exit also depends on data (as the sampler's decode loop, t = 1 .. 7) around a
  # scan over 5 layers: XLA knows no trip count for the outer loop; its condition's bound gives 7.
  layers, rows, k, steps = 5, 8, 32, 7
  w, x = jnp.ones((layers, k, k), jnp.float32), jnp.ones((rows, k), jnp.float32)

  def f(w, x):
    def body(c):
      t, h = c
      return t + 1, jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), h, w)[0]
    return jax.lax.while_loop(lambda c: (c[0] <= steps) & (c[1].sum() < 1e30), body, (1, x))[1]

  counter = plan.HloCounter(jax.jit(f).lower(w, x).compile().as_text())
  assert counter.flops() == 2 * rows * k * k * layers * steps
  assert counter.unknown_loops == 0


def test_convolution_flops_count_only_taps_on_real_inputs():
  # XLA:TPU writes matrix products as convolutions: (8, 32) x (32, 16) is 8 * 16 * 32 multiply-adds.
  hlo = '''ENTRY %main (a: f32[8,32], b: f32[32,16]) -> f32[8,16] {
  %a = f32[8,32]{1,0} parameter(0)
  %b = f32[32,16]{1,0} parameter(1)
  ROOT %c = f32[8,16]{1,0} convolution(%a, %b), dim_labels=bf_io->bf
}'''
  assert plan.HloCounter(hlo).flops() == 2 * 8 * 16 * 32
  # A width-3 window over 10 positions padded by 1 each side: 10 * 3 taps less the 2 on padding;
  # batch 2, 4 input and 5 output features.
  hlo = '''ENTRY %main (a: f32[2,10,4], b: f32[3,4,5]) -> f32[2,10,5] {
  %a = f32[2,10,4]{2,1,0} parameter(0)
  %b = f32[3,4,5]{2,1,0} parameter(1)
  ROOT %c = f32[2,10,5]{2,1,0} convolution(%a, %b), window={size=3 pad=1_1}, dim_labels=b0f_0io->b0f
}'''
  assert plan.HloCounter(hlo).flops() == 2 * 2 * 5 * 4 * (10 * 3 - 2)


def test_loop_stepping_its_counter_by_two_runs_half_its_bound():
  # XLA:TPU's collective-matmul loops over FSDP shards read `i < 16` but step i by 2: 8 iterations.
  hlo = '''%body (p: (s32[], f32[8,32])) -> (s32[], f32[8,32]) {
  %p = (s32[], f32[8,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,32]{1,0} get-tuple-element(%p), index=1
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  %w = f32[32,32]{1,0} constant({...})
  %y = f32[8,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[8,32]{1,0}) tuple(%next, %y)
}

%cond (q: (s32[], f32[8,32])) -> pred[] {
  %q = (s32[], f32[8,32]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %bound = s32[] constant(16)
  ROOT %lt = pred[] compare(%j, %bound), direction=LT
}

ENTRY %main (a: (s32[], f32[8,32])) -> (s32[], f32[8,32]) {
  %a = (s32[], f32[8,32]{1,0}) parameter(0)
  ROOT %loop = (s32[], f32[8,32]{1,0}) while(%a), condition=%cond, body=%body
}'''
  assert plan.HloCounter(hlo).flops() == 8 * 2 * 8 * 32 * 32


def test_topology_names():
  assert plan.parse_topology('v5e-32') == ('tpu', 'v5e', 'v5e:4x8')
  assert plan.parse_topology('v4-32') == ('tpu', 'v4', 'v4:2x2x4')
  assert plan.parse_topology('v5p-64') == ('tpu', 'v5p', 'v5p:2x4x4')
  assert plan.parse_topology('v6e:4x4') == ('tpu', 'v6e', 'v6e:4x4')
  assert plan.parse_topology('cpu:8') == ('cpu', '', '8')
  with pytest.raises(ValueError, match='cpu:N'):
    plan.parse_topology('tpu7:2x2')


def test_presets_have_the_public_parameter_counts():
  # Total parameters as published (tied models count the embedding once).
  published = {'qwen2.5-0.5b': 0.49e9, 'qwen2.5-1.5b': 1.54e9, 'qwen2.5-7b': 7.61e9, 'qwen3-0.6b': 0.6e9,
               'qwen3-1.7b': 1.7e9, 'qwen3-4b': 4.0e9, 'qwen3-8b': 8.2e9}
  for name, count in published.items():
    cfg = presets.config(name)
    params = jax.eval_shape(lambda cfg=cfg: plan.qwen.init_params(cfg, jax.random.PRNGKey(0)))
    total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    assert total == pytest.approx(count, rel=0.02), name
  assert presets.resolve('Qwen/Qwen2.5-1.5B-Instruct') == 'qwen2.5-1.5b'
  assert presets.resolve('Qwen/Qwen3-8B-Base') == 'qwen3-8b'
  assert presets.resolve('/data/my-finetune') is None
  with pytest.raises(ValueError, match='qwen2.5-7b'):
    presets.resolve('preset:qwen9')


def _tiny_config(algorithm: str, **rl):
  c = base_config('arithmetic')
  c.model.source = 'init'
  a = c.model.arch
  a.hidden_size, a.intermediate_size, a.num_layers, a.num_heads, a.num_kv_heads, a.tied = D, F, L, HQ, HKV, True
  c.rl.algorithm, c.rl.prompts_per_step, c.rl.group_size = algorithm, PROMPTS, GROUP
  c.rl.max_new_tokens, c.rl.minibatches, c.rl.epochs = N, MINIBATCHES, 2
  c.rl.kl_coef, c.rl.recompute_old_logp = 0.05, True
  c.rl.ei.samples_per_prompt, c.rl.ei.batch_size, c.rl.ei.sft_epochs = 3, 5, 2
  c.rl.update(rl)
  return c


# Per algorithm (and rl settings), as the trainer runs its step (4 prompts, group 4, 2 minibatches, 2 epochs, KL on,
# old log-probs recomputed; EI: 3 samples a prompt, SFT batches of 5 rows, 2 SFT epochs): the programs
# and their calls per step, the learner minibatch's rows, and the keys the trainer puts in it beyond
# tokens / mask / completion_mask with their trailing shape. The Echo Chamber's REINFORCE puts the
# KL into whitened token returns, so its batch has token advantages and no reference log-probs.
_STEPS = {
    'grpo': ({'sampler': 1, 'log-probs': 2, 'learner update': 4}, 8,
             {'old_logp': (N,), 'ref_logp': (N,), 'advantages': ()}),
    'ppo': ({'sampler': 1, 'log-probs': 2, 'critic values': 1, 'critic update': 4, 'learner update': 4}, 8,
            {'old_logp': (N,), 'returns': (N,), 'old_values': (N,), 'advantages': (N,)}),
    'expert_iteration': ({'sampler': 1, 'learner update': 2 * 3}, 5, {}),   # 12 samples: at most 3 batches of 5
    'sft': ({'learner update': 1}, PROMPTS, {}),
    'reinforce echo_chamber': ({'sampler': 1, 'log-probs': 2, 'learner update': 4}, 8,
                               {'old_logp': (N,), 'advantages': (N,)}),
}


@pytest.mark.parametrize('algorithm', sorted(_STEPS))
def test_programs_and_learner_batch_follow_the_algorithm(algorithm):
  calls, rows, extra = _STEPS[algorithm]
  name, *style = algorithm.split()
  config = _tiny_config(name, **(dict(reinforce_style=style[0], baseline='group_mean') if style else {}))
  cfg, _ = plan.model_config(config, V)
  mesh = plan.sharding.MeshConfig.from_config(config.mesh).make_mesh(jax.devices()[:1])
  built = plan.build_programs(config, cfg, mesh, P, 'cpu')
  assert {p.name: p.calls for p in built.programs} == calls
  learner_update, = [p for p in built.programs if p.name == 'learner update']
  batch = learner_update.args[2]
  assert {k: v.shape for k, v in batch.items()} == {
      'tokens': (rows, P + N), 'mask': (rows, P + N), 'completion_mask': (rows, N),
      **{k: (rows,) + tail for k, tail in extra.items()}}


def _written_summary(totals_gib, refused=(), hbm_gib=16.0):
  """plan.summary() of a synthetic plan on v5e:4x8: one program per total (GiB; all temporaries), the
  names in `refused` refused by XLA. Goes through the writer the planner uses, so a change of its
  keys breaks this test rather than the README table."""
  cfg = presets.config('qwen2.5-0.5b', dtype='bfloat16')
  mesh = jax.make_mesh((1, 1, 1), ('data', 'fsdp', 'tensor'), devices=jax.devices()[:1])
  shapes = plan.Shapes(rows=8, prompt_len=16, sampler_rows=8, sampler_prompt_len=16, minibatch_rows=2, new_tokens=8)
  the_plan = plan.Plan(cfg, 'preset qwen2.5-0.5b', mesh, shapes, [], {}, {}, {})
  results = []
  for name, total in totals_gib.items():
    program = plan.Program(name, 1, None, (), {}, (), 'logp')
    if name in refused:
      results.append(plan.Result(program, False, error='RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm'))
    else:
      results.append(plan.Result(program, True, temp=int(total * plan.GIB), flops=1e12, hbm_bytes=1e9))
  target = plan.Target('v5e:4x8', 'tpu', plan.CHIPS['v5e'], tuple(range(32)))
  return json.loads(json.dumps(plan.summary(the_plan, results, target, hbm_gib, 'configs/qwen_cfrl.py',
                                            ['--config.rl.minibatches=8']), default=str))


def test_readme_row_names_the_largest_program_and_its_share_of_hbm():
  row = plan.readme_row(_written_summary({'sampler': 2.0, 'log-probs': 12.0, 'learner update': 4.0}))
  assert row == {'config': '`configs/qwen_cfrl.py --config.rl.minibatches=8`',
                 'topology': 'v5e:4x8 (32 x TPU v5e, mesh 1x1x1)',
                 'model': 'preset qwen2.5-0.5b, 0.49B params',   # 494,032,768 as published (tied)
                 'largest': 'log-probs', 'peak': '12 / 16 GiB (75%)', 'fits': 'yes'}


def test_readme_row_says_no_when_a_program_exceeds_hbm_or_xla_refuses_it():
  over = plan.readme_row(_written_summary({'sampler': 2.0, 'log-probs': 20.0}))
  assert (over['largest'], over['peak'], over['fits']) == ('log-probs', '20 / 16 GiB (125%)', 'no')
  refused = plan.readme_row(_written_summary({'sampler': 2.0, 'log-probs': 0.0}, refused=('log-probs',)))
  assert (refused['largest'], refused['peak'], refused['fits']) == ('log-probs (XLA: out of memory)', '> 16 GiB', 'no')


def test_readme_table_from_the_command_line(tmp_path, capsys):
  paths = []
  for i, totals in enumerate(({'sampler': 2.0, 'log-probs': 8.0}, {'sampler': 3.0})):
    paths.append(tmp_path / f'plan-{i}.json')
    paths[-1].write_text(json.dumps(_written_summary(totals)))
  assert plan.main(['plan', '--readme_table'] + [str(p) for p in paths]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0] == '| config | topology | model | largest program | peak HBM per chip / HBM | fits |'
  assert len(lines) == 4 and '| log-probs | 8 / 16 GiB (50%) | yes |' in lines[2] and '| sampler | 3 / 16' in lines[3]
  assert plan.main(['plan', '--readme_table']) == 1
  assert 'needs the plan .json files' in capsys.readouterr().err


def test_readme_row_of_an_older_plan_reads_config_and_model_from_its_markdown(tmp_path):
  summary = _written_summary({'log-probs': 8.0})
  for key in ('config', 'overrides', 'model_origin', 'parameters'):
    del summary[key]
  (tmp_path / 'old.md').write_text('# Plan: configs/qwen_cfrl.py on v5e:4x8\n\n- devices: 32 x TPU v5 lite (tpu)\n'
                                   '- model: preset qwen2.5-1.5b, 1,777,088,000 parameters, tie=untied\n')
  row = plan.readme_row(summary, str(tmp_path / 'old.json'))
  assert row['config'] == '`configs/qwen_cfrl.py`' and row['model'] == 'preset qwen2.5-1.5b, 1.78B params'
  with pytest.raises(ValueError, match='regenerate the plan'):
    (tmp_path / 'old.md').write_text('something else\n')
    plan.readme_row(summary, str(tmp_path / 'old.json'))
