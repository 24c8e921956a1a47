"""What a run is set up from: its policy and weights, its evaluation and probe functions, its config file.

experiment.py (one run or a study) and alpharl.py (the AlphaRL mode) build their runs from these,
and analyze.py scores checkpoints with evaluator_for_run; this module sits below all three and
above the pretraining recipe (train/pretrain.py), which load_policy calls for
config.model.source='pretrain'.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from cfrl_jax import evaluate as evaluate_lib
from cfrl_jax import tokenization
from cfrl_jax.config import parse_list
from cfrl_jax.dynamics import probes
from cfrl_jax.models import hf, qwen
from cfrl_jax.policy import Policy, arch_config, make_policy
from cfrl_jax.tasks import build_task
from cfrl_jax.train import pretrain


def load_policy(config, task=None) -> tuple[Policy, Any]:
  """(policy, params) as `config.model.source` says.

  'pretrained'  an HF directory or hub id (`config.model.path`), e.g. Qwen2.5-1.5B-Instruct;
  'pretrain'    a tiny Qwen2-architecture model pretrained from scratch on the task's
                multi-format corpus (the Echo Chamber recipe), cached by its config;
  'init'        random weights of `config.model.arch` (tests, smoke runs).
  """
  source = config.model.source
  if source == 'pretrained':
    if not config.model.path:
      raise ValueError("config.model.source='pretrained' needs config.model.path (an HF directory or hub id).")
    cfg, params = hf.load_pretrained(config.model.path, tie=config.model.tie, dtype=config.model.dtype,
                                     param_dtype=config.model.param_dtype)
    cfg = cfg.replace(remat=config.model.remat)
    tokenizer = tokenization.load_tokenizer(config.tokenizer.path or config.model.path)
    return make_policy(cfg, tokenizer, task), params
  if source == 'pretrain':
    if task is None:
      raise ValueError("config.model.source='pretrain' needs the task whose corpus it pretrains on.")
    path = pretrain.pretrained_base(config, task)
    cfg, params = hf.load_pretrained(path, tie=config.model.tie, dtype=config.model.dtype,
                                     param_dtype=config.model.param_dtype)
    cfg = cfg.replace(remat=config.model.remat)
    return make_policy(cfg, tokenization.load_tokenizer(path), task), params
  if source == 'init':
    if not config.tokenizer.path:
      raise ValueError("config.model.source='init' needs config.tokenizer.path (a tokenizer directory).")
    tokenizer = tokenization.load_tokenizer(config.tokenizer.path)
    cfg = arch_config(config, len(tokenizer), tokenization.stop_ids(tokenizer, None),
                      tokenization.pad_id(tokenizer))
    params = qwen.init_params(cfg, jax.random.PRNGKey(config.seed))
    if config.model.tie == 'untie':
      cfg, params = qwen.untie(cfg, params)
    return make_policy(cfg, tokenizer, task), params
  raise ValueError(f"config.model.source={source!r}; expected 'pretrained', 'pretrain' or 'init'.")


def make_eval_fn(config, policy, task, *, num_problems: int | None = None, greedy: bool = True,
                 sampled: bool = True):
  """eval_fn(params, step) -> the run's held-out metrics (evaluate_lib.evaluate) under config.eval.

  greedy / sampled: whether the greedy pass and the config.eval.samples sampled pass run (a caller
  that needs one metric skips the other); num_problems overrides config.eval.num_problems.
  """
  ec = config.eval
  rows = task.eval[:num_problems or ec.num_problems]
  temperature = ec.temperature if ec.temperature >= 0 else config.rl.temperature
  # The same evaluation randomness for every arm and step: differences are the model's.
  key = jax.random.PRNGKey(10_000 + config.seed)

  def eval_fn(params, step):
    return evaluate_lib.evaluate(policy, params, rows, task, key, samples=ec.samples if sampled else 0,
                                 temperature=temperature, max_new_tokens=config.rl.max_new_tokens,
                                 pass_k=parse_list(ec.pass_k, int), batch_size=ec.batch_size, greedy=greedy)

  return eval_fn


def write_run_config(config, run_dir: str) -> None:
  """<run_dir>/config.json (process 0 only): what evaluation and analysis of the run read back."""
  if jax.process_index() == 0:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))


def make_probe_fn(config, policy, task):
  """probe_fn(params_before, params_after, ctx, step) -> the training probe's metrics on the task's first
  config.probe.num_sequences probe sequences (probes.training_probe), or None when config.probe.every <= 0."""
  if config.probe.every <= 0:
    return None
  pc = config.probe
  names = probes.solution_formats(task.train[:pc.num_sequences]) if pc.formats == 'all' else []
  # num_sequences counts probe sequences: with every format probed, fewer prompts keep the cost.
  rows = task.train[:-(-pc.num_sequences // len(names)) if names else pc.num_sequences]
  probe = probes.build_probe_set(policy, rows, task, positions=pc.positions,
                                 max_new_tokens=config.rl.max_new_tokens, formats=pc.formats)

  def probe_fn(params_before, params_after, ctx, step):
    return probes.training_probe(policy.cfg, params_before, params_after, probe, group_names=names)

  return probe_fn


def make_head_share_fn(config, policy, task):
  """head_share_fn for cfrl.switch_on='head_share': a cheap probe (one sequence per probe prompt, two
  positions each) on which the trainer measures the head's share every cfrl.switch_every steps."""
  if not (config.cfrl.enabled and config.cfrl.switch_on == 'head_share'):
    return None
  probe = probes.build_probe_set(policy, task.train[:config.probe.num_sequences], task, positions=2,
                                 max_new_tokens=config.rl.max_new_tokens)
  return lambda before, after, backbone_step: probes.head_share(policy.cfg, before, after, backbone_step, probe)


def evaluator_for_run(run_dir: str, *, metric: str = 'auto', num_problems: int | None = None):
  """params -> held-out `metric` for the run's own task, tokenizer and eval settings (cfrl_jax.analyze).

  metric: 'greedy_accuracy', any sampled key of `evaluate` ('pass@1', 'pass@4', 'majority@4', ...),
  or 'auto': pass@1 when the run evaluates samples (config.eval.samples > 0), else greedy accuracy.
  Sampled metrics use the run's eval key, samples and temperature (make_eval_fn), so the
  base and final checkpoints score exactly what the run's own eval logged for them.
  """
  path = os.path.join(run_dir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: evaluation needs the config.json that cfrl_jax.main writes into a run.')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  ec = config.eval
  if metric == 'auto':
    metric = 'pass@1' if ec.samples > 0 else 'greedy_accuracy'
  greedy = metric == 'greedy_accuracy'
  if not greedy and ec.samples < 1:
    raise ValueError(f'metric={metric!r} needs sampled evaluation, but the run at {run_dir} has eval.samples='
                     f"{ec.samples}; use metric 'greedy_accuracy'.")
  task = build_task(config.task)
  policy, _ = load_policy(config, task)
  eval_fn = make_eval_fn(config, policy, task, num_problems=num_problems, greedy=greedy, sampled=not greedy)

  def evaluate_params(params) -> float:
    out = eval_fn(jax.tree_util.tree_map(jax.numpy.asarray, params), None)
    if metric not in out:
      raise ValueError(f'metric={metric!r} is not computed by the eval of {run_dir}; it gives {sorted(out)}.')
    return out[metric]

  evaluate_params.metric = metric
  return evaluate_params
