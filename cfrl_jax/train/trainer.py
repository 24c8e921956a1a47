"""The RL loop: prompts -> rollout -> rewards -> advantages -> update(s) -> metrics -> eval/probe -> checkpoint.

One function, `train`, runs any algorithm of config.rl.algorithm with or without
CF-RL's head-only first stage. Everything random is derived from (seed, step),
so a run killed at any point and resumed with config.resume=True continues
with bit-identical parameters and metrics.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from cfrl_jax import metrics as metrics_lib
from cfrl_jax.models import qwen
from cfrl_jax.rl import advantages as adv_lib
from cfrl_jax.rl import expert_iteration, ppo
from cfrl_jax.rl import algorithms
from cfrl_jax.train import checkpoint as ckpt_lib
from cfrl_jax.train import learner, micro_batching, objectives, placement, rollout, schedule, sft_data

PROMPT_BUCKET = 16
MICRO_BUCKET = 16    # completion widths of rl.micro_batches, a multiple of this (one compile per width)


class NonFiniteLossError(FloatingPointError):
  pass


class TrainResult(NamedTuple):
  params: Any
  step: int
  stage: int
  last_metrics: dict


# --- small pure helpers ------------------------------------------------------
def prompt_rows(rows: list, step: int, n: int, seed: int) -> list:
  """The n prompts of a step: consecutive slices of a per-epoch permutation of the rows."""
  if not rows:
    raise ValueError('The task has no training rows.')
  out, pos = [], step * n
  while len(out) < n:
    epoch, offset = divmod(pos, len(rows))
    perm = np.random.RandomState((seed * 1_000_003 + epoch) % 2**32).permutation(len(rows))
    take = min(n - len(out), len(rows) - offset)
    out.extend(rows[i] for i in perm[offset:offset + take])
    pos += take
  return out


def pad_prompt_columns(r: rollout.Rollout, prompt_len: int, max_new_tokens: int, pad_id: int):
  """Left-pads the prompt part to `prompt_len` and right-pads completions to `max_new_tokens`,
  so the learner compiles once per prompt bucket instead of once per batch."""
  B, T = r.tokens.shape
  N = r.completion_mask.shape[1]
  P = T - N
  lp, rp = prompt_len - P, max_new_tokens - N
  if lp < 0 or rp < 0:
    raise ValueError(f'Rollout of prompt length {P} / completion {N} exceeds bucket {prompt_len} / {max_new_tokens}.')
  tokens = np.pad(r.tokens, ((0, 0), (lp, rp)), constant_values=pad_id)
  mask = np.pad(r.mask, ((0, 0), (lp, rp)))
  pad_c = lambda x: np.pad(x, ((0, 0), (0, rp)))
  return r._replace(tokens=tokens, mask=mask, completion_mask=pad_c(r.completion_mask),
                    old_logp=pad_c(r.old_logp))


def concat_rollouts(parts: list) -> rollout.Rollout:
  """One Rollout from several with the same column layout (pad_prompt_columns first)."""
  cat = lambda name: np.concatenate([getattr(r, name) for r in parts])
  join = lambda name: [x for r in parts for x in getattr(r, name)]
  return rollout.Rollout(
      tokens=cat('tokens'), mask=cat('mask'), completion_mask=cat('completion_mask'), old_logp=cat('old_logp'),
      rewards=cat('rewards'),
      reward_parts={k: np.concatenate([r.reward_parts[k] for r in parts]) for k in parts[0].reward_parts},
      prompts=join('prompts'), completions=join('completions'), rows=join('rows'))


def bucket(n: int, size: int = PROMPT_BUCKET) -> int:
  return max(size, int(math.ceil(n / size)) * size)


def learning_rate(base: float, step: int, start: int, rl) -> float:
  """rl.lr_schedule from `start`: linear warmup (rl.warmup_steps, or rl.warmup_ratio of the steps left
  until rl.steps), then constant or a cosine decay to rl.min_lr_ratio * base at rl.steps (schedule.py)."""
  total = max(rl.steps - start, 0)
  warmup = schedule.warmup_steps(rl.warmup_steps, rl.warmup_ratio, total)
  return schedule.lr_at(base, step, start=start, warmup=warmup, schedule=rl.lr_schedule, total=total,
                        min_ratio=rl.min_lr_ratio)


def learning_rates(rl, cfrl, stage: int, step: int, stage_start: int) -> dict[str, float]:
  """{'head', 'backbone'} learning rates of one step.

  stage 1 (CF-RL, head only): the stage-one head lr, warmed up from step 0. Stage 2 and plain RL
  (stage 0): rl.head_lr (rl.lr when 0) and rl.lr, warmed up from stage_start. With
  rl.head_lr_schedule='cfrl_stage1', plain RL's head follows exactly the head schedule CF-RL would
  have had (stage one of cfrl.stage1_steps, then stage two) while the backbone trains from step 0.
  """
  head_lr = rl.head_lr if rl.head_lr > 0 else rl.lr
  stage1_head_lr = cfrl.stage1_head_lr if cfrl.stage1_head_lr > 0 else head_lr
  if stage == 1:
    return {'head': learning_rate(stage1_head_lr, step, 0, rl), 'backbone': 0.0}
  if stage == 0 and rl.head_lr_schedule == 'cfrl_stage1':
    switch = min(cfrl.stage1_steps, cfrl.max_stage1_steps)
    head = (learning_rate(stage1_head_lr, step, 0, rl) if step < switch else
            learning_rate(head_lr, step, switch, rl))
    return {'head': head, 'backbone': learning_rate(rl.lr, step, stage_start, rl)}
  return {'head': learning_rate(head_lr, step, stage_start, rl),
          'backbone': learning_rate(rl.lr, step, stage_start, rl)}


def head_norm(cfg: qwen.QwenConfig, params) -> float:
  return float(jnp.linalg.norm(qwen.head_params(cfg, params)['w'].astype(jnp.float32)))


def should_switch(cfrl, step_in_stage: int, train_metrics: dict) -> bool:
  """CF-RL stage one ends after `stage1_steps`, or earlier/later by a reward, entropy or head-share
  criterion (head_share: measured on the steps that log it, see Trainer._head_share)."""
  if step_in_stage >= cfrl.max_stage1_steps:
    return True
  if cfrl.switch_on == 'steps':
    return step_in_stage >= cfrl.stage1_steps
  if cfrl.switch_on == 'reward':
    return train_metrics.get('reward_mean', -np.inf) >= cfrl.switch_threshold
  if cfrl.switch_on == 'entropy':
    return train_metrics.get('entropy', np.inf) <= cfrl.switch_threshold
  if cfrl.switch_on == 'head_share':
    return train_metrics.get('head_share', np.inf) < cfrl.switch_threshold
  raise ValueError(f"config.cfrl.switch_on={cfrl.switch_on!r}; expected 'steps', 'reward', 'entropy' or 'head_share'.")


def sft_target(row: dict, fmt: str) -> str:
  """The supervised completion of a task row: its 'solution' (GSM8K, MATH) or solutions[fmt] (arithmetic)."""
  if 'solutions' in row:
    if fmt not in row['solutions']:
      raise ValueError(f'config.rl.sft_format={fmt!r}; this task\'s solution formats are {sorted(row["solutions"])}.')
    return row['solutions'][fmt]
  if 'solution' in row:
    return ' ' + str(row['solution']).strip()
  raise ValueError(f"SFT needs a reference solution: the row has no 'solution' or 'solutions' column ({sorted(row)}).")


def row_chunked(fn: Callable, chunks: int) -> Callable:
  """fn(tree, *rows) -> per-row outputs, evaluated on `chunks` groups of rows one after another inside
  the one program (lax.map), so its temporaries are those of B / chunks rows: for a log-prob pass, the
  (rows, N, vocab) float32 logits, the largest buffer of a step (docs/plan.md).

  Chunk j holds rows j, j + chunks, j + 2 chunks, ...: rows are split over devices in contiguous
  blocks, so while B / chunks is a multiple of the batch shards every device keeps its own share of
  every chunk and no row moves between devices. Outputs come back in fn's row order; B must be a
  multiple of chunks.
  """
  if chunks <= 1:
    return fn

  def chunked(tree, *rows):
    B = rows[0].shape[0]
    if B % chunks:
      raise ValueError(f'{B} rows do not split into {chunks} equal chunks.')
    split = lambda x: jnp.swapaxes(x.reshape((B // chunks, chunks) + x.shape[1:]), 0, 1)
    out = jax.lax.map(lambda xs: fn(tree, *xs), tuple(split(x) for x in rows))
    return jax.tree_util.tree_map(lambda y: jnp.swapaxes(y, 0, 1).reshape((B,) + y.shape[2:]), out)

  return chunked


def logp_chunks(rl, rows: int) -> int:
  """Row chunks of the old-policy / reference log-prob passes: rl.minibatches when it splits the
  rows evenly (else 1, and Trainer._minibatches names the problem)."""
  return rl.minibatches if rl.minibatches > 1 and rows % rl.minibatches == 0 else 1


def check_fresh_run_dir(run_dir: str) -> None:
  """A ValueError when run_dir already holds a run (checkpoints or metrics) and config.resume is off.

  Training into it would append a second history to metrics.jsonl and stop at the first checkpoint
  step that exists (orbax never overwrites a step), after minutes of work.
  """
  steps = ckpt_lib.available_steps(run_dir)
  metrics_path = os.path.join(run_dir, 'metrics.jsonl')
  has_metrics = os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0
  if steps or has_metrics:
    held = f'checkpoints at steps {steps}' if steps else 'a metrics.jsonl'
    raise ValueError(f'{os.path.abspath(run_dir)} already holds a run ({held}). Continue it with '
                     '--config.resume=True, write elsewhere with --config.run_dir=..., or delete that '
                     'directory to start over.')


def _copy(tree):
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


# --- the loop ----------------------------------------------------------------
class Trainer:
  """Holds what one run needs between steps; `run()` executes config.rl.steps steps."""

  def __init__(self, config, policy, params, task, run_dir: str, *,
               eval_fn: Callable | None = None, probe_fn: Callable | None = None,
               head_share_fn: Callable | None = None, progress: bool = True, initial_step: int = 0):
    rl = config.rl
    self.algorithm = algorithms.algorithm(rl.algorithm)
    if not config.resume:
      check_fresh_run_dir(run_dir)
    self.config, self.rl, self.policy, self.task = config, rl, policy, task
    self.cfg = policy.cfg
    self.run_dir = run_dir
    self.eval_fn, self.probe_fn, self.progress = eval_fn, probe_fn, progress
    # head_share_fn(params_before, params_after, backbone_step) -> float, for cfrl.switch_on='head_share'.
    self.head_share_fn = head_share_fn
    if config.cfrl.enabled and config.cfrl.switch_on == 'head_share' and head_share_fn is None:
      raise ValueError("config.cfrl.switch_on='head_share' needs a probe to measure the head's share: pass "
                       'head_share_fn (run_setup.make_head_share_fn builds it from the task).')
    self.ocfg = learner.OptimConfig(b1=rl.b1, b2=rl.b2, eps=rl.eps, weight_decay=rl.weight_decay,
                                    grad_clip=rl.grad_clip)
    self.key = jax.random.PRNGKey(config.seed)
    self._updates: dict = {}    # compiled learner steps, per (kind, prompt bucket, stage)
    self._jitted: dict = {}     # compiled forward passes and the critic step
    # One device: arrays as given. Several: a mesh from config.mesh, everything below sharded by its rules.
    self.place = placement.Placement(config.mesh, params)
    if rl.micro_batches > 1 and self.place.sharded:
      raise ValueError(f'config.rl.micro_batches={rl.micro_batches} runs on one device only (its micro-batches '
                       f'have no sharding rules); on this {jax.device_count()}-device mesh set it to 1.')
    self.params = self.place.put(params, self.place.param_specs)
    self.ref_params = self.place.put(_copy(params), self.place.param_specs) if rl.kl_coef > 0 else None
    # Offline Expert Iteration fine-tunes the starting model afresh every round.
    self.base_params = (_copy(self.params) if self.algorithm.step == algorithms.EXPERT_ITERATION and rl.ei.from_base
                        else None)
    self.stage = 1 if config.cfrl.enabled else 0
    # initial_step > 0 continues another run's data order and randomness from that step with a fresh
    # optimizer (AlphaRL's continuation); the warmup restarts there.
    if initial_step < 0:
      raise ValueError(f'initial_step={initial_step}; expected >= 0.')
    self.stage_start = int(initial_step)
    self._init_stage(self.stage)
    self.critic = self.critic_tx = self.critic_opt = None
    self.critic_specs = self.critic_opt_specs = None
    if self.algorithm.critic:
      critic = {'backbone': _copy(params['backbone']),
                'value_head': ppo.init_value_head(self.cfg.hidden_size, jax.random.PRNGKey(config.seed + 1))}
      self.critic_specs = self.place.specs_of(critic) if self.place.sharded else None
      self.critic = self.place.put(critic, self.critic_specs)
      self.critic_tx = optax.chain(optax.clip_by_global_norm(rl.grad_clip) if rl.grad_clip > 0 else optax.identity(),
                                   optax.adamw(rl.ppo.critic_lr, b1=rl.b1, b2=rl.b2, eps=rl.eps))
      self.critic_opt, self.critic_opt_specs = self.place.put_opt_state(
          self.critic_tx.init(self.critic), self.critic, self.critic_specs)
    self.step = int(initial_step)
    self.writer = metrics_lib.MetricsWriter(run_dir, tensorboard=config.log.tensorboard)
    # max_to_keep == 0 means keep every checkpoint (orbax's None), which the rank-1 analysis needs.
    self.ckpt = ckpt_lib.Checkpointer(run_dir, max_to_keep=config.checkpoint.max_to_keep or None)
    self.resumed_from: int | None = None   # the checkpoint step _resume restored
    if config.resume:
      self._resume()

  # -- state ------------------------------------------------------------------
  def _init_stage(self, stage: int, previous_state=None):
    """Optimizer and its state for a stage (placed like the params); drops the stage's compiled steps."""
    self.tx, opt_state = learner.init_stage(self.cfg, self.params, stage, self.ocfg, previous_state)
    self.opt_state, self.opt_specs = self.place.put_opt_state(opt_state, self.params)
    self._updates.clear()

  def _train_state_specs(self):
    return {'opt_state': self.opt_specs, 'critic': self.critic_specs, 'critic_opt': self.critic_opt_specs,
            'rng': jax.sharding.PartitionSpec()}

  def _train_state(self):
    # The key placed replicated on the mesh: orbax refuses to save a process-local array when
    # several processes write one checkpoint together.
    return {'opt_state': self.opt_state, 'critic': self.critic, 'critic_opt': self.critic_opt,
            'rng': self.place.put(self.key, jax.sharding.PartitionSpec())}

  def _meta(self):
    return {'stage': self.stage, 'stage_start': self.stage_start, 'data_position': self.step * self.rl.prompts_per_step,
            'algorithm': self.rl.algorithm, 'model_config': dataclasses.asdict(self.cfg),
            'placement': placement.describe(self.place)}

  def save(self):
    # The reference policy is not saved: it is the base model the run (and a resumed run) starts from.
    self.ckpt.save(self.step, self.params, self._train_state(), self._meta())
    self.ckpt.wait()

  def _resume(self):
    step = self.ckpt.resume_step()   # the newest checkpoint that passes its checksums
    if step is None:
      self.writer.start_fresh()   # the run starts over at step 0: the old records would be a second history
      return
    meta = self.ckpt.restore_meta(step)
    if meta.get('algorithm') != self.rl.algorithm:
      raise ValueError(f"Cannot resume: the checkpoint at step {step} was written by algorithm "
                       f"{meta.get('algorithm')!r}, the config asks for {self.rl.algorithm!r}.")
    if meta['stage'] != self.stage:
      prev = self.opt_state if (self.stage == 1 and meta['stage'] == 2) else None
      self._init_stage(meta['stage'], prev)
    self.stage, self.stage_start = meta['stage'], meta['stage_start']
    # Restored straight into this run's shardings: a checkpoint from another mesh lands re-sharded.
    params, train_state, _ = self.ckpt.restore(
        step, self.place.restore_target(self.params, self.place.param_specs),
        self.place.restore_target(self._train_state(), self._train_state_specs()))
    self.params = jax.tree_util.tree_map(jnp.asarray, params)
    train_state = jax.tree_util.tree_map(jnp.asarray, train_state)
    self.opt_state, self.critic = train_state['opt_state'], train_state['critic']
    self.critic_opt, self.key = train_state['critic_opt'], train_state['rng']
    self.step = step
    self.resumed_from = step
    # Every record of step s precedes step s's checkpoint (run() writes a step's train, probe and
    # eval records, then saves), so records up to s are kept and the resumed run writes from s + 1.
    self.writer.truncate_after(step)

  # -- jitted pieces --------------------------------------------------------------
  def _loss_fn(self, kind: str, prompt_len: int):
    """kind: an algorithm of the table whose loss the learner minimises ('sft' for Expert Iteration's
    and SFT's cross-entropy steps)."""
    return objectives.algorithm_objective(self.cfg, prompt_len, self.rl, kind)

  def _update_fn(self, kind: str, prompt_len: int):
    k = (kind, prompt_len, self.stage)
    if k not in self._updates:
      loss_fn = self._loss_fn(kind, prompt_len)
      self._updates[k] = self.place.update(learner.make_update(self.cfg, loss_fn, self.tx, self.stage), self.opt_specs)
    return self._updates[k]

  def _head_share(self, kind: str, prompt_len: int, params_before, batch: dict) -> float:
    """The head's share of the first-order change of the probe log-probs, against what the backbone
    WOULD contribute if it trained (cfrl.switch_on='head_share', stage one).

    The would-be backbone step is the first one stage two's AdamW takes on this batch: with fresh
    moments, Adam's bias-corrected first update is -lr * g / (|g| + eps) ~ -lr * sign(g), at the
    stage-two backbone lr. head_share_fn compares it with the head update actually applied.
    """
    k = ('backbone_grad', kind, prompt_len)
    if k not in self._jitted:
      loss_fn = self._loss_fn(kind, prompt_len)
      self._jitted[k] = jax.jit(lambda p, b: jax.grad(lambda q: loss_fn(q, b)[0])(p)['backbone'])
    g = self._jitted[k](params_before, batch)
    lr = learning_rates(self.rl, self.config.cfrl, 2, self.step, self.step)['backbone']
    eps = self.rl.eps
    step = jax.tree_util.tree_map(lambda x: -lr * x / (jnp.abs(x) + eps), g)
    return float(self.head_share_fn(params_before, self.params, step))

  def _forward(self, name: str, prompt_len: int, fn, tree_specs=None):
    k = (name, prompt_len)
    if k not in self._jitted:
      self._jitted[k] = self.place.forward(fn, tree_specs)
    return self._jitted[k]

  def _logp(self, params, seq: dict, prompt_len):
    """Completion log-probs (B, N) of seq['tokens'], seq['mask'] (host rows, or global arrays per host).

    With rl.minibatches > 1, in that many row chunks (logp_chunks): the learner already holds one
    minibatch's activations, so the pass fits wherever the update does."""
    cfg = self.cfg
    chunks = logp_chunks(self.rl, len(seq['tokens']))
    f = self._forward(f'logp/{chunks}', prompt_len, row_chunked(
        lambda p, t, m: rollout.completion_stats(cfg, p, t, m, prompt_len)[0], chunks))
    return f(params, seq['tokens'], seq['mask'])

  def _critic_update(self, prompt_len):
    k = ('critic_update', prompt_len)
    if k not in self._jitted:
      loss_fn = objectives.critic_objective(self.cfg, prompt_len, self.rl)
      tx = self.critic_tx

      def step(critic, opt, batch):
        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(critic, batch)
        upd, opt = tx.update(g, opt, critic)
        return optax.apply_updates(critic, upd), opt, dict(m, value_loss=loss)

      self._jitted[k] = self.place.tree_step(step, self.critic_specs, self.critic_opt_specs)
    return self._jitted[k]

  def _lrs(self) -> dict:
    return learning_rates(self.rl, self.config.cfrl, self.stage, self.step, self.stage_start)

  def _micro_update_fn(self, kind: str, prompt_len: int):
    k = ('micro', kind, prompt_len, self.stage)
    if k not in self._updates:
      self._updates[k] = learner.make_accumulating_update(self.cfg, self._loss_fn(kind, prompt_len), self.tx,
                                                          self.stage)
    return self._updates[k]

  def _apply(self, kind, prompt_len, batch: dict, lrs: dict | None = None):
    lrs = {k: jnp.float32(v) for k, v in (self._lrs() if lrs is None else lrs).items()}
    if self.rl.micro_batches > 1 and kind == self.algorithm.name and self.algorithm.step == algorithms.POLICY_GRADIENT:
      # Length-sorted micro-batches cut to their longest completion: the same step, less padding computed.
      chunks, loss_w, token_w = micro_batching.split(
          {k: v for k, v in batch.items() if v is not None}, prompt_len, self.rl.micro_batches, MICRO_BUCKET,
          self.rl.aggregation, self.rl.max_new_tokens)
      res = self._micro_update_fn(kind, prompt_len)(
          self.params, self.opt_state, [{k: jnp.asarray(v) for k, v in c.items()} for c in chunks], loss_w, lrs,
          combine=lambda ms: micro_batching.combine_metrics(ms, loss_w, token_w))
    else:
      res = self._update_fn(kind, prompt_len)(self.params, self.opt_state, batch, lrs)
    if not bool(res.finite):
      self.params, self.opt_state = res.params, res.opt_state   # unchanged by the skipped update
      self.save()
      raise NonFiniteLossError(
          f'Step {self.step}: the {kind} loss or its gradient is not finite (loss={float(res.loss)}). '
          f'The update was skipped and the last good state is saved at {self.ckpt.directory}/{self.step}. '
          'Lower config.rl.lr / stage-one head lr, check rewards for NaN, or enable grad clipping, '
          'then resume with --config.resume=True.')
    self.params, self.opt_state = res.params, res.opt_state
    return {k: float(v) for k, v in res.metrics.items()} | {'loss': float(res.loss)}

  # -- one step of each algorithm ----------------------------------------------
  @property
  def _per_host(self) -> bool:
    """This step loads only this process's prompts (several processes, data_loading 'per_host', a
    policy-gradient algorithm). Rows are then process-local numpy and global arrays on the mesh."""
    return self.place.per_host and self.algorithm.per_host

  def _step_prompts(self, group_size: int) -> tuple[list, slice]:
    """(the prompts this process rolls out this step, its block of the step's group_size * prompts rows).

    Per-host, each process takes a contiguous share of the step's prompts, whole groups (a prompt's
    group_size samples stay on one process, so its group statistics are local); otherwise all of them.
    """
    rl = self.rl
    rows = prompt_rows(self.task.train, self.step, rl.prompts_per_step, self.config.seed)
    if not self._per_host:
      return rows, slice(0, len(rows) * group_size)
    n = jax.process_count()
    if rl.prompts_per_step % n:
      raise ValueError(f'config.rl.prompts_per_step={rl.prompts_per_step} does not divide over {n} processes: '
                       f'per-host data loading gives every process the same number of whole prompts. Make it a '
                       f"multiple of {n}, or set config.mesh.data_loading='global'.")
    block = self.place.rows_of_process(len(rows) * group_size)
    return rows[block.start // group_size:block.stop // group_size], block

  def _rollout(self, key, rows, group_size, temperature=None, top_p=None):
    rl = self.rl
    # Per-host, every process pads its prompts to the widest on any process: one global layout.
    r = rollout.collect(self.policy, self.params, rows, self.task.reward_fns, key,
                        group_size=group_size, max_new_tokens=rl.max_new_tokens,
                        temperature=rl.temperature if temperature is None else temperature,
                        top_p=rl.top_p if top_p is None else top_p, top_k=rl.top_k,
                        sample_fn=self.place.sample_fn(process_local=self._per_host),
                        prompt_width=self.place.max_over_processes if self._per_host else None)
    P = r.tokens.shape[1] - r.completion_mask.shape[1]
    prompt_len = bucket(P)
    return pad_prompt_columns(r, prompt_len, rl.max_new_tokens, self.policy.pad_id), prompt_len

  def _minibatches(self, key, batch: dict, epochs: int, num_minibatches: int):
    B = len(batch['tokens'])
    if B % num_minibatches:
      raise ValueError(f'config.rl.minibatches={num_minibatches} does not divide the rollout batch of {B} rows.')
    size = B // num_minibatches
    for e in range(epochs):
      perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, e), B)) if num_minibatches > 1 else np.arange(B)
      for i in range(num_minibatches):
        idx = perm[i * size:(i + 1) * size]
        if self._per_host:   # global arrays: the devices gather the rows, across processes
          yield batch if num_minibatches == 1 else self.place.take_rows(batch, idx)
          continue
        yield {k: (v[idx] if isinstance(v, np.ndarray) and v.shape[:1] == (B,) else v) for k, v in batch.items()}

  def _policy_gradient_step(self, key):
    rl = self.rl
    rows, own = self._step_prompts(rl.group_size)
    r, P = self._rollout(jax.random.fold_in(key, 0), rows, rl.group_size)
    # Per-host, r holds this process's rows (`own` of the batch): baselines over the batch see every
    # process's rewards (an all-gather of B floats) and each process keeps its own rows' advantages.
    rewards = r.rewards
    all_rewards = self.place.all_rows(rewards) if self._per_host else rewards
    alg = self.algorithm
    if alg.advantages is not None:
      advantages = np.asarray(alg.advantages(all_rewards, rl))[own]
    batch = {'tokens': r.tokens, 'mask': r.mask, 'completion_mask': r.completion_mask}
    # The forward passes below run on the mesh; per-host their inputs are this process's rows placed
    # as global arrays, and own_rows brings this process's rows of the result back.
    seq = self.place.to_global({'tokens': r.tokens, 'mask': r.mask}) if self._per_host else batch
    if rl.recompute_old_logp:
      batch['old_logp'] = self.place.own_rows(self._logp(self.params, seq, P))
    else:
      batch['old_logp'] = r.old_logp
    if self.ref_params is not None:
      batch['ref_logp'] = self.place.own_rows(self._logp(self.ref_params, seq, P))
    extra = {}
    if alg.critic:   # PPO: GAE token advantages over the critic's values
      values = self.place.own_rows(self._forward(
          'values', P, lambda c, t, m: objectives.critic_values(self.cfg, c, t, m, P),
          self.critic_specs)(self.critic, seq['tokens'], seq['mask']))
      if self.ref_params is not None:
        token_rewards = ppo.token_rewards_with_kl_penalty(
            rewards, batch['old_logp'], batch.pop('ref_logp'), r.completion_mask, rl.kl_coef,
            estimator=rl.kl_estimator)
      else:
        token_rewards = adv_lib.terminal_token_rewards(rewards, r.completion_mask)
      a, returns = adv_lib.gae(token_rewards, values, r.completion_mask, gamma=rl.ppo.gamma, lam=rl.ppo.lam)
      if self._per_host:   # GAE is per row; the whitening statistics are over every process's tokens
        everyone = self.place.all_rows({'a': np.asarray(a), 'mask': r.completion_mask})
        advantages = np.asarray(adv_lib.masked_whiten(everyone['a'], everyone['mask']))[own]
      else:
        advantages = np.asarray(adv_lib.masked_whiten(a, r.completion_mask))
      batch.update(returns=np.asarray(returns), old_values=values)
    if alg.kl_in_returns(rl):
      # The KL goes into the token rewards (k1, against the rollout's log-probs), not into the loss.
      returns = adv_lib.kl_penalized_returns(advantages, batch['old_logp'], batch.pop('ref_logp', None),
                                             r.completion_mask, rl.kl_coef)
      if self._per_host:   # whitening statistics over every process's tokens, as for PPO
        everyone = self.place.all_rows({'a': np.asarray(returns), 'mask': r.completion_mask})
        advantages = np.asarray(adv_lib.masked_whiten(everyone['a'], everyone['mask']))[own]
      else:
        advantages = np.asarray(adv_lib.masked_whiten(returns, r.completion_mask))
    batch['advantages'] = np.asarray(advantages, np.float32)
    kind = alg.name
    share_now = (self.stage == 1 and self.config.cfrl.switch_on == 'head_share' and
                 (self.step - self.stage_start) % self.config.cfrl.switch_every == 0)
    params_before = _copy(self.params) if (self.probe_fn is not None or share_now) else None
    sums: dict[str, list] = {}
    learner_batch = self.place.to_global(batch) if self._per_host else batch
    for mb in self._minibatches(jax.random.fold_in(key, 1), learner_batch, rl.epochs, rl.minibatches):
      m = self._apply(kind, P, mb)
      if alg.critic:
        self.critic, self.critic_opt, cm = self._critic_update(P)(self.critic, self.critic_opt, mb)
        m.update({k: float(v) for k, v in cm.items()})
      for k, v in m.items():
        sums.setdefault(k, []).append(v)
    out = {k: float(np.mean(v)) for k, v in sums.items()}
    out.update(self._rollout_metrics(r))
    if share_now:
      out['head_share'] = self._head_share(kind, P, params_before, learner_batch)
    return out, (params_before, batch, P)

  def _ei_rollout(self, key):
    """(rollout, prompt_len) of one EI step. scope 'step': prompts_per_step prompts of the step;
    'epoch': every training prompt, sampled prompts_per_step at a time and joined (one round)."""
    rl = self.rl
    kw = dict(temperature=rl.ei.temperature if rl.ei.temperature > 0 else None,
              top_p=rl.ei.top_p if rl.ei.top_p > 0 else None)
    if rl.ei.scope == 'step':
      rows = prompt_rows(self.task.train, self.step, rl.prompts_per_step, self.config.seed)
      return self._rollout(jax.random.fold_in(key, 0), rows, rl.ei.samples_per_prompt, **kw)
    rows, n = self.task.train, rl.prompts_per_step
    parts = [self._rollout(jax.random.fold_in(key, 1000 + i), rows[i:i + n], rl.ei.samples_per_prompt, **kw)
             for i in range(0, len(rows), n)]
    P = max(p for _, p in parts)
    return concat_rollouts([pad_prompt_columns(r, P, rl.max_new_tokens, self.policy.pad_id)
                            for r, _ in parts]), P

  def _expert_iteration_step(self, key):
    rl = self.rl
    r, _ = self._ei_rollout(key)
    # Train on the sampled token ids themselves: re-tokenising decoded text is not an identity
    # for byte-level BPE (a completion cut inside a multi-byte character decodes to U+FFFD).
    keep, stats = expert_iteration.select_rows(
        r.completions, r.rewards, group_size=rl.ei.samples_per_prompt, threshold=rl.ei.threshold, dedupe=True)
    out = dict(self._rollout_metrics(r), **{f'ei_{k}': float(v) for k, v in stats.items()})
    if len(keep) == 0:
      return out, None
    keep = np.asarray(keep)
    P = r.tokens.shape[1] - r.completion_mask.shape[1]
    batch = {'tokens': r.tokens[keep], 'mask': r.mask[keep], 'completion_mask': r.completion_mask[keep]}
    # Pad with fully masked rows to whole minibatches: one compiled shape however many were kept.
    n, mb = len(keep), rl.ei.batch_size
    n_pad = -(-n // mb) * mb
    batch = {k: np.concatenate([v, np.repeat(v[:1], n_pad - n, axis=0)]) for k, v in batch.items()}
    batch['completion_mask'][n:] = 0.0
    sums: dict[str, list] = {}
    if rl.ei.scope == 'epoch':   # each round is a fresh SFT run, as the original's train_ei.py
      if self.base_params is not None:
        self.params = _copy(self.base_params)
      self._init_stage(self.stage)
    updates = rl.ei.sft_epochs * (n_pad // mb)
    for e in range(rl.ei.sft_epochs):
      perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 10 + e), n_pad))
      for i in range(0, n_pad, mb):
        idx = perm[i:i + mb]
        m = self._apply('sft', P, {k: v[idx] for k, v in batch.items()},
                        lrs=self._ei_lrs(e * (n_pad // mb) + i // mb, updates))
        for k, v in m.items():
          sums.setdefault(k, []).append(v)
    out.update({k: float(np.mean(v)) for k, v in sums.items()})
    return out, None

  def _ei_lrs(self, update: int, updates: int) -> dict | None:
    """rl.ei.lr > 0: that lr on rl.lr_schedule over the round's `updates` SFT updates (warmup from
    rl.warmup_ratio), so each round is a whole SFT run as in the original; else the rl schedule (None)."""
    rl = self.rl
    if rl.ei.lr <= 0:
      return None
    lr = schedule.lr_at(rl.ei.lr, update, warmup=schedule.warmup_steps(0, rl.warmup_ratio, updates),
                        schedule=rl.lr_schedule, total=updates, min_ratio=rl.min_lr_ratio)
    return {'head': lr, 'backbone': 0.0 if self.stage == 1 else lr}

  def _sft_step(self, key):
    """Supervised fine-tuning on the rows' reference solutions (with CF-RL stages: LP-FT)."""
    rl = self.rl
    rows = prompt_rows(self.task.train, self.step, rl.prompts_per_step, self.config.seed)
    pairs = [(r['prompt'], sft_target(r, rl.sft_format)) for r in rows]
    data = sft_data.encode_pairs(self.policy, pairs, max_new_tokens=rl.max_new_tokens)
    P = data.pop('prompt_len')
    m = self._apply('sft', P, data)
    return m, None

  def _rollout_metrics(self, r: rollout.Rollout) -> dict:
    """Statistics of the whole batch; per-host from every process's rows (all-gathered), so every
    process computes, and logs, the numbers a single process would."""
    cols = {'rewards': r.rewards, 'reward_parts': r.reward_parts, 'completion_mask': r.completion_mask,
            'old_logp': r.old_logp}
    names = self.task.formats.names + ('unknown',) if self.task.formats is not None else ()
    if names:   # formats as indices into names (-1: a name outside them), so they can be gathered
      index = {name: i for i, name in enumerate(names)}
      cols['formats'] = np.asarray([index.get(self.task.formats(c), -1) for c in r.completions], np.int32)
    g = self.place.all_rows(cols) if self._per_host else cols
    lengths = g['completion_mask'].sum(axis=1)
    out = {'reward_mean': float(g['rewards'].mean()), 'reward_std': float(g['rewards'].std()),
           'response_length': float(lengths.mean())}
    for name, v in g['reward_parts'].items():
      out[f'reward_{name}'] = float(np.mean(v))
    if 'correctness' in g['reward_parts']:
      out['accuracy'] = float(np.mean(g['reward_parts']['correctness']))
    n = max(float(g['completion_mask'].sum()), 1.0)
    out['sampled_logprob'] = float((g['old_logp'] * g['completion_mask']).sum() / n)
    for i, name in enumerate(names):
      out[f'format_{name}'] = int(np.count_nonzero(g['formats'] == i)) / len(g['formats'])
    return out

  # -- the loop -------------------------------------------------------------------
  def run(self) -> TrainResult:
    rl, config = self.rl, self.config
    last: dict = {}
    # Resumed from the step-0 checkpoint, the step-0 eval is already in the stream (written before it).
    if self.step == 0 and self.resumed_from is None and self.eval_fn is not None and config.eval.every > 0:
      self.writer.write(0, 'eval', self.eval_fn(self.params, 0))
    if self.step == 0 and config.checkpoint.every > 0 and not config.checkpoint.max_to_keep and \
        self.ckpt.latest_step() is None:
      self.save()   # keeping every checkpoint is for the rank-1 analysis, whose dW_t = W_t - W_0 needs the base
    steps = {algorithms.POLICY_GRADIENT: self._policy_gradient_step,
             algorithms.EXPERT_ITERATION: self._expert_iteration_step, algorithms.SFT: self._sft_step}
    bar = tqdm(total=rl.steps, initial=self.step, disable=not self.progress or jax.process_index() != 0, desc=f'{rl.algorithm}', dynamic_ncols=True)
    try:
      while self.step < rl.steps:
        t0 = time.perf_counter()
        key = jax.random.fold_in(self.key, self.step)
        m, probe_ctx = steps[self.algorithm.step](key)
        m.update(stage=self.stage, head_norm=head_norm(self.cfg, self.params),
                 lr_head=self._lrs()['head'], lr_backbone=self._lrs()['backbone'],
                 step_time=time.perf_counter() - t0)
        self.step += 1
        if self.probe_fn is not None and config.probe.every > 0 and probe_ctx is not None and \
            (self.step % config.probe.every == 0 or self.step == 1):
          self.writer.write(self.step, 'probe', self.probe_fn(probe_ctx[0], self.params, probe_ctx[1:], self.step))
        last = self.writer.write(self.step, 'train', m)
        if self.stage == 1 and should_switch(config.cfrl, self.step - self.stage_start, m):
          self._init_stage(2, self.opt_state)
          self.stage, self.stage_start = 2, self.step
        if self.eval_fn is not None and config.eval.every > 0 and \
            (self.step % config.eval.every == 0 or self.step == rl.steps):
          self.writer.write(self.step, 'eval', self.eval_fn(self.params, self.step))
        if config.checkpoint.every > 0 and (self.step % config.checkpoint.every == 0 or self.step == rl.steps):
          self.save()
        bar.update(1)
        bar.set_postfix(stage=self.stage, reward=f"{m.get('reward_mean', float('nan')):.3f}",
                        ent=f"{m.get('entropy', float('nan')):.3f}", loss=f"{m.get('loss', float('nan')):.3g}")
    finally:
      bar.close()
      self.writer.flush()
    return TrainResult(self.params, self.step, self.stage, last)

  def close(self):
    self.ckpt.close()
    self.writer.close()


def train(config, policy, params, task, run_dir: str, **kw) -> TrainResult:
  trainer = Trainer(config, policy, params, task, run_dir, **kw)
  try:
    return trainer.run()
  finally:
    trainer.close()
