"""Where the demo's time goes: one RL step's parts, one held-out eval, one pretraining step.

RL: runs `configs/demo.py`'s GRPO arm for a few steps from its cached base (pretraining it first if
the cache lacks it) with timers around the trainer's parts: the rollout (sampling 16 prompts x 8
completions and scoring them), the learner update (forward + backward over the padded 128 x (P + 48)
batch, clip, AdamW), the eval (512 problems: greedy, then 4 samples each) and the NTK probe. Each
part's median over its calls after the first (the first compiles).

The RL part runs twice: with the whole minibatch in one learner update, and with it split into
`--rl_micro_batches` length-sorted micro-batches cut to their longest completion (`rl.micro_batches`).

Pretraining: the same demo batches through the whole-batch update (`learner.make_update`, every row
padded to the batch's width) and through the micro-batched one the pretrainer runs
(`pretrain.micro_batches`: rows sorted by length into micro-batches cut to their longest row). Both
are warmed on every batch first, then timed in alternating rounds so load hits both alike.

  python bench/bench_step_profile.py                  # about 5 minutes on 2 cores
  python bench/bench_step_profile.py --isa_note=AVX2  # label the run (set XLA_FLAGS yourself)
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import results_md  # bench/results_md.py: this directory is on sys.path when a script runs

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cfrl_jax import arms, experiment, run_setup, tokenization  # noqa: E402
from cfrl_jax.dynamics import probes  # noqa: E402
from cfrl_jax.models import hf  # noqa: E402
from cfrl_jax.policy import make_policy  # noqa: E402
from cfrl_jax.tasks import build_task  # noqa: E402
from cfrl_jax.train import learner, objectives, pretrain, sft_data, trainer  # noqa: E402
from configs import demo  # noqa: E402


def timed(record: list, fn):
  def wrapper(*a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    jax.block_until_ready(jax.tree_util.tree_leaves(out))
    record.append(time.perf_counter() - t)
    return out
  return wrapper


def after_first(xs: list) -> float:
  return statistics.median(xs[1:]) if len(xs) > 1 else float('nan')


def rl_parts(config, steps: int) -> dict:
  parts = {'rollout': [], 'learner update': [], 'eval': [], 'probe': []}
  originals = (trainer.Trainer._rollout, trainer.Trainer._apply, run_setup.evaluate_lib.evaluate,
               probes.training_probe)
  trainer.Trainer._rollout = timed(parts['rollout'], originals[0])
  trainer.Trainer._apply = timed(parts['learner update'], originals[1])
  run_setup.evaluate_lib.evaluate = timed(parts['eval'], originals[2])
  probes.training_probe = timed(parts['probe'], originals[3])
  try:
    c = arms.arm_config(config, 'grpo', 0)
    with tempfile.TemporaryDirectory() as d:
      experiment.run_single(c, os.path.join(d, 'grpo'), progress=False)
  finally:
    (trainer.Trainer._rollout, trainer.Trainer._apply, run_setup.evaluate_lib.evaluate,
     probes.training_probe) = originals
  return parts


def pretrain_steps(config, batches: int, rounds: int) -> dict:
  pc = config.pretrain
  task = build_task(config.task)
  base = pretrain.pretrained_base(config, task)
  cfg, params = hf.load_pretrained(base, tie=config.model.tie)
  policy = make_policy(cfg, tokenization.load_tokenizer(base), None)
  pairs = task.pretraining_corpus(pc.num_examples, pc.seed)
  rng = np.random.RandomState(0)
  tx, opt = learner.init_stage(cfg, params, 0, learner.OptimConfig(b2=pc.b2, grad_clip=1.0))
  whole = learner.make_update(cfg, objectives.lm_objective(cfg), tx, 0)
  micro = learner.make_accumulating_update(cfg, objectives.lm_objective(cfg), tx, 0)
  lrs = {'head': jnp.float32(0.0), 'backbone': jnp.float32(0.0)}   # lr 0: every call sees the same params
  data = []
  tokens_whole = tokens_micro = 0
  for _ in range(batches):
    idx = rng.choice(len(pairs), pc.batch_size, replace=False)
    lengths = [len(policy.tokenizer(pairs[i][1], add_special_tokens=False)['input_ids']) + 1 for i in idx]
    n_new = int(math.ceil(max(lengths) / pc.length_bucket) * pc.length_bucket)
    d = sft_data.encode_pairs(policy, [pairs[i] for i in idx], max_new_tokens=n_new)
    P = d.pop('prompt_len')
    chunks, weights = pretrain.micro_batches(d, P, pc.micro_batches, pc.length_bucket, whole_text=True)
    data.append(({k: jnp.asarray(v) for k, v in d.items()},
                 [{k: jnp.asarray(v) for k, v in c.items()} for c in chunks], weights))
    tokens_whole += d['tokens'].size
    tokens_micro += sum(c['tokens'].size for c in chunks)

  def copies():
    return jax.tree_util.tree_map(jnp.array, params), jax.tree_util.tree_map(jnp.array, opt)

  times = {'whole batch': [], 'micro-batched': []}
  for r in range(rounds + 1):   # round 0 compiles every shape
    for name in times:
      for full, chunks, weights in data:
        p, o = copies()
        t = time.perf_counter()
        res = whole(p, o, full, lrs) if name == 'whole batch' else micro(p, o, chunks, weights, lrs)
        jax.block_until_ready(res.params)
        if r:
          times[name].append(time.perf_counter() - t)
  return {'times': times, 'tokens_whole': tokens_whole, 'tokens_micro': tokens_micro}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--steps', type=int, default=8)
  ap.add_argument('--pretrain_batches', type=int, default=6)
  ap.add_argument('--rounds', type=int, default=2)
  ap.add_argument('--rl_micro_batches', type=int, default=4)
  ap.add_argument('--isa_note', default='native', help='the XLA code path, as you set it (label only)')
  ap.add_argument('--cache_dir', default='cache', help="where the demo's base is cached (config.pretrain.cache_dir)")
  args = ap.parse_args()
  config = demo.get_config('')
  config.unlock()
  config.pretrain.cache_dir = args.cache_dir
  config.rl.steps = args.steps
  config.eval.every = max(1, args.steps // 2)
  config.probe.every = max(1, args.steps // 4)
  config.checkpoint.every = 10 ** 6

  pre = pretrain_steps(config, args.pretrain_batches, args.rounds)
  config.rl.micro_batches = 1
  parts = rl_parts(config, args.steps)
  # The same arm with the learner's minibatch split into length-sorted micro-batches (rl.micro_batches).
  config.rl.micro_batches = args.rl_micro_batches
  micro_parts = rl_parts(config, args.steps)

  step = after_first(parts['rollout']) + after_first(parts['learner update'])
  lines = [f'Config: configs/demo.py (1.64M parameters, 128 rows per step); XLA code path: {args.isa_note}. '
           'Medians, first (compiling) call excluded.', '',
           '| part | calls timed | median s | share of an RL step |', '|---|---|---|---|']
  for name in ('rollout', 'learner update'):
    lines.append(f'| RL {name} | {len(parts[name]) - 1} | {after_first(parts[name]):.2f} | '
                 f'{after_first(parts[name]) / step:.0%} |')
  for name in ('eval', 'probe'):
    lines.append(f'| {name} (per call) | {len(parts[name]) - 1} | {after_first(parts[name]):.2f} | - |')
  w_rl, m_rl = after_first(parts['learner update']), after_first(micro_parts['learner update'])
  lines += ['', f'RL learner update, whole minibatch {w_rl:.2f} s vs rl.micro_batches={args.rl_micro_batches} '
            f'{m_rl:.2f} s: **{w_rl / m_rl:.2f}x** (medians over {len(micro_parts["learner update"]) - 1} steps, '
            'first excluded; a step whose micro-batch widths are new also compiles).']
  w, m = (statistics.median(pre['times'][k]) for k in ('whole batch', 'micro-batched'))
  lines += ['', f'Pretraining step ({args.pretrain_batches} demo batches x {args.rounds} rounds): whole batch '
            f'{w:.2f} s, micro-batched ({config.pretrain.micro_batches}) {m:.2f} s: **{w / m:.2f}x**; padded '
            f'tokens computed {pre["tokens_micro"] / pre["tokens_whole"]:.0%} of the whole batch\'s.']
  for line in lines:
    print(line)
  results_md.write_section('bench_step_profile', "Where the demo's time goes (bench/bench_step_profile.py)",
                           results_md.host(), lines)


if __name__ == '__main__':
  main()
