"""An experiment: one training run, or a study of arms x seeds from the same base, then a report.

Arms are named variations of the config (below). Every arm of a study starts
from the same base weights with the same seeds and rollout budget, so their
curves differ only by the algorithm.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time

import jax
import numpy as np

from cfrl_jax import evaluate as evaluate_lib
from cfrl_jax.config import parse_list
from cfrl_jax.policy import load_policy
from cfrl_jax.tasks import build_task
from cfrl_jax.train import trainer

# arm name -> overrides of the study config
ARMS = {
    'grpo': {'rl.algorithm': 'grpo', 'cfrl.enabled': False},
    'cfgrpo': {'rl.algorithm': 'grpo', 'cfrl.enabled': True},
    'ppo': {'rl.algorithm': 'ppo', 'cfrl.enabled': False},
    'cfppo': {'rl.algorithm': 'ppo', 'cfrl.enabled': True},
    'rloo': {'rl.algorithm': 'rloo', 'cfrl.enabled': False},
    'cfrloo': {'rl.algorithm': 'rloo', 'cfrl.enabled': True},
    'reinforce': {'rl.algorithm': 'reinforce', 'cfrl.enabled': False},
    'expert_iteration': {'rl.algorithm': 'expert_iteration', 'cfrl.enabled': False},
    'sft': {'rl.algorithm': 'sft', 'cfrl.enabled': False},
    'lpft': {'rl.algorithm': 'sft', 'cfrl.enabled': True},   # linear probing, then full fine-tuning
}


def arm_config(config, arm: str, seed: int):
  if arm not in ARMS:
    raise ValueError(f'Unknown arm {arm!r} in config.arms; valid arms: {sorted(ARMS)}.')
  c = copy.deepcopy(config)
  with c.unlocked():
    for path, value in ARMS[arm].items():
      section, field = path.split('.')
      c[section][field] = value
    c.seed = seed
    c.arms = ''
  return c


def make_eval_fn(config, policy, task):
  ec = config.eval
  rows = task.eval[:ec.num_problems]
  temperature = ec.temperature if ec.temperature >= 0 else config.rl.temperature
  # The same evaluation randomness for every arm and step: differences are the model's.
  key = jax.random.PRNGKey(10_000 + config.seed)

  def eval_fn(params, step):
    return evaluate_lib.evaluate(policy, params, rows, task, key, samples=ec.samples, temperature=temperature,
                                 max_new_tokens=config.rl.max_new_tokens, pass_k=parse_list(ec.pass_k, int),
                                 batch_size=ec.batch_size)

  return eval_fn


def make_probe_fn(config, policy, task):
  from cfrl_jax.dynamics import probes
  if config.probe.every <= 0:
    return None
  probe = probes.build_probe_set(policy, task.train[:config.probe.num_sequences], task,
                                 positions=config.probe.positions, max_new_tokens=config.rl.max_new_tokens)

  def probe_fn(params_before, params_after, ctx, step):
    return probes.training_probe(policy.cfg, params_before, params_after, probe)

  return probe_fn


def run_single(config, run_dir: str, task=None, *, progress: bool | None = None) -> trainer.TrainResult:
  task = task or build_task(config.task)
  policy, params = load_policy(config, task)
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=1))
  eval_fn = make_eval_fn(config, policy, task) if config.eval.every > 0 else None
  probe_fn = make_probe_fn(config, policy, task)
  progress = config.log.progress if progress is None else progress
  return trainer.train(config, policy, params, task, run_dir, eval_fn=eval_fn, probe_fn=probe_fn, progress=progress)


def run(config) -> str:
  """Runs the experiment the config describes; returns the run (or study) directory."""
  run_dir = config.run_dir or os.path.join('runs', config.name)
  task = build_task(config.task)
  t0 = time.time()
  if not config.arms:
    run_single(config, run_dir, task)
    if config.report and jax.process_index() == 0:
      from cfrl_jax import report
      print(f'Report: {report.write_report(run_dir, title=config.name)}')
    return run_dir
  arms = parse_list(config.arms)
  seeds = parse_list(config.seeds, int) or [config.seed]
  for arm in arms:
    arm_config(config, arm, seeds[0])   # fail on a bad arm name before any work
  base_summary = {}
  if config.model.source == 'pretrain':
    from cfrl_jax.train import pretrain
    t_base = time.time()
    path = pretrain.pretrained_base(config, task)
    with open(os.path.join(path, 'pretrain.json')) as f:
      base_summary = dict(json.load(f), path=path, seconds_this_run=time.time() - t_base)
  timings = {}
  for seed in seeds:
    for arm in arms:
      c = arm_config(config, arm, seed)
      t_arm = time.time()
      print(f'== arm {arm}, seed {seed}')
      run_single(c, os.path.join(run_dir, arm, f'seed{seed}'), task)
      timings[f'{arm}/seed{seed}'] = time.time() - t_arm
  timings['total'] = time.time() - t0
  with open(os.path.join(run_dir, 'study.json'), 'w') as f:
    json.dump({'arms': arms, 'seeds': seeds, 'config': json.loads(config.to_json_best_effort()),
               'base': base_summary, 'timings': timings}, f, indent=1)
  if config.report and jax.process_index() == 0:
    from cfrl_jax import report
    print(f'Report: {report.write_report(run_dir, title=config.name)}')
  return run_dir
