"""Pretraining a tiny Qwen2-architecture model from scratch on a task's multi-format corpus.

This is the Echo Chamber recipe at toy scale: the base model learns every
solution format of the task's pretraining mixture, so that RL afterwards can be
seen to select among them. The result is a real HF checkpoint directory
(config.json, model.safetensors, tokenizer files) cached under
`config.pretrain.cache_dir/base-<hash>`, the hash covering everything that
changes the base (task, mixture, architecture, tokenizer size, pretraining
settings, config.pretrain.seed), so only the first run pays for it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from cfrl_jax import evaluate, tokenization
from cfrl_jax.models import hf, qwen
from cfrl_jax.policy import arch_config, make_policy
from cfrl_jax.tasks import tokenizer_training
from cfrl_jax.tasks.registry import task_config
from cfrl_jax.train import learner, objectives, sft_data


def cache_key(config) -> str:
  task = config.task.to_dict()
  # How many RL and held-out rows the task draws changes neither the corpus nor the validation rows
  # (each has its own stream), so those counts enter the key at the task's defaults: configs that
  # differ only there (configs/echo_chamber.py's 512 RL prompts) share the demo's base.
  defaults = task_config(task['name']).to_dict() if task.get('name') else {}
  for k in ('num_train', 'num_eval'):
    if k in task and k in defaults:
      task[k] = defaults[k]
  parts = {
      'task': task, 'arch': config.model.arch.to_dict(),
      # The base's seed is pretrain.seed alone: RL seeds share one base. Kept under the old 'seed' key
      # (out of the pretrain section) so that bases cached before pretrain.seed existed stay valid.
      'vocab': config.tokenizer.vocab_size, 'seed': config.pretrain.seed,
      # micro_batches changes only the order of float sums (like another CPU), not the recipe.
      'pretrain': {k: v for k, v in config.pretrain.to_dict().items()
                   if k not in ('cache_dir', 'seed', 'micro_batches')},
      'version': 1,
  }
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_complete(path: str) -> bool:
  return all(os.path.exists(os.path.join(path, f)) for f in ('config.json', 'model.safetensors', 'tokenizer.json',
                                                             'pretrain.json'))


def pretrained_base(config, task, *, progress: bool | None = None) -> str:
  """Directory of the cached base model for this config, pretraining it first if needed."""
  path = os.path.join(config.pretrain.cache_dir, f'base-{cache_key(config)}')
  if is_complete(path):
    return path
  progress = config.log.progress if progress is None else progress
  # Every process pretrains the same (deterministic) base, so none waits long at the barrier
  # below. Process 0 publishes its copy; on a shared filesystem the others then find the entry
  # complete and drop theirs, otherwise each publishes its own.
  tmp = path + f'.partial{jax.process_index()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  summary = pretrain(config, task, tmp, progress=progress and jax.process_index() == 0)
  with open(os.path.join(tmp, 'pretrain.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  if jax.process_index() == 0:
    _publish(tmp, path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('cfrl_jax: pretrained base published by process 0')
    if jax.process_index() != 0:
      if is_complete(path):
        shutil.rmtree(tmp, ignore_errors=True)
      else:
        _publish(tmp, path)
  return path


def _publish(tmp: str, path: str) -> None:
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)   # the cache entry appears only once it is complete


def _length_sorted_batches(lengths: np.ndarray, batch_size: int, rng: np.random.RandomState) -> list[np.ndarray]:
  """Batches of similar-length examples in random order (saves ~1.3x of padding)."""
  order = np.argsort(lengths + rng.uniform(0, 1, len(lengths)), kind='stable')
  batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
  rng.shuffle(batches)
  return batches


def _random_batches(n: int, batch_size: int, rng: np.random.RandomState) -> list[np.ndarray]:
  order = rng.permutation(n)
  return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def micro_batches(data: dict, prompt_len: int, n: int, bucket: int, *, whole_text: bool) -> tuple[list, list]:
  """One step's batch as n micro-batches of rows of similar length, each cut to its longest row.

  data: tokens, mask (B, P+N) (prompts left-padded to P, completions right-padded to N) and
  completion_mask (B, N). whole_text (the loss on every real token): rows are left-aligned and cut to
  the micro-batch's longest text; otherwise the prompt columns stay and the completion columns are cut
  to its longest completion. Widths round up to a multiple of `bucket` (one compile per width).
  Returns (micro_batches, weights): weights n_i / sum n, n_i the tokens the token-mean loss averages
  over in micro-batch i, so sum_i w_i * loss_i is the whole batch's token mean. Positions come from the
  mask, so cutting padding changes no real token's position, attention or target.
  """
  tokens, mask, cmask = data['tokens'], data['mask'], data['completion_mask']
  B, T = tokens.shape
  if whole_text:
    lengths = mask.sum(1)
    # A row's real tokens are contiguous (left-padded prompt, then its completion): roll them to column 0.
    start = np.argmax(mask > 0, axis=1)
    cols = (start[:, None] + np.arange(T)[None]) % T
    tokens, mask = np.take_along_axis(tokens, cols, 1), np.take_along_axis(mask, cols, 1)
    counts = (mask[:, 1:] * mask[:, :-1]).sum(1)
  else:
    lengths = cmask.sum(1)
    counts = lengths
  total = counts.sum()
  if total <= 0:
    raise ValueError('micro_batches: the batch has no token to learn from (every mask is empty).')
  out, weights = [], []
  for idx in np.array_split(np.argsort(lengths, kind='stable'), min(n, B)):
    width = max(bucket, int(math.ceil(lengths[idx].max() / bucket) * bucket))
    if whole_text:
      w = min(width, T)
      out.append({'tokens': tokens[idx, :w], 'mask': mask[idx, :w]})
    else:
      w = min(width, T - prompt_len)
      out.append({'tokens': tokens[idx, :prompt_len + w], 'mask': mask[idx, :prompt_len + w],
                  'completion_mask': cmask[idx, :w]})
    weights.append(float(counts[idx].sum()) / float(total))
  return out, weights


def pretrain(config, task, out_dir: str, *, progress: bool = True) -> dict:
  """Trains tokenizer + model from scratch on task.pretraining_corpus; writes an HF dir. Returns a summary."""
  pc = config.pretrain
  t0 = time.time()
  pairs = task.pretraining_corpus(pc.num_examples, pc.seed)   # errors for tasks without a corpus
  texts = [p + c for p, c in pairs]
  tokenizer_training.train_tokenizer(texts, out_dir, vocab_size=config.tokenizer.vocab_size)
  tok = tokenization.load_tokenizer(out_dir)   # through transformers, exactly as a user loads it
  cfg = arch_config(config, len(tok), tokenization.stop_ids(tok), tokenization.pad_id(tok))
  params = qwen.init_params(cfg, jax.random.PRNGKey(pc.seed))
  policy = make_policy(cfg, tok, None)   # pretraining text is plain, never chat-formatted

  completion_lengths = np.array([len(tok(c, add_special_tokens=False)['input_ids']) + 1 for _, c in pairs])
  rng = np.random.RandomState(pc.seed)
  batches = []
  if pc.batching not in ('random', 'length_sorted'):
    raise ValueError(f"config.pretrain.batching={pc.batching!r}; expected 'random' or 'length_sorted'.")
  while len(batches) < pc.steps + pc.cooldown_steps:
    # Measured on the demo (200 steps): random batches reach ~0.5 loss where length-sorted ones,
    # each holding one solution format, are still at ~0.7.
    batches += (_random_batches(len(pairs), pc.batch_size, rng) if pc.batching == 'random' else
                _length_sorted_batches(completion_lengths, pc.batch_size, rng))

  ocfg = learner.OptimConfig(b2=pc.b2, weight_decay=pc.weight_decay, grad_clip=1.0)
  tx, opt_state = learner.init_stage(cfg, params, 0, ocfg)
  updates = {}
  losses = []
  validation, readings, stopped_at = None, [], None
  if pc.stop_accuracy > 0:
    validation = task.validation_rows(pc.validation_problems)
  read = lambda: validation_accuracy(policy, params, validation, task, config.rl.max_new_tokens)
  cooldown = None   # (first cooldown step, the learning rate it decays from) once the main phase ended
  end = pc.steps    # becomes the trigger step + cooldown_steps once the band (or the cap) ends the main phase
  bar = tqdm(total=pc.steps + pc.cooldown_steps, desc='pretrain', disable=not progress, dynamic_ncols=True)
  step = 0
  while step < end:
    idx = batches[step]
    n_new = int(math.ceil(completion_lengths[idx].max() / pc.length_bucket) * pc.length_bucket)
    data = sft_data.encode_pairs(policy, [pairs[i] for i in idx], max_new_tokens=n_new)
    P = data.pop('prompt_len')
    key = None if pc.loss_on_prompt else P   # the whole-text loss ignores P: one compile per width
    if key not in updates:
      # loss_on_prompt: language modelling on the whole text, as pretraining on a corpus does (the
      # prompts' numbers and names teach copying); otherwise completion tokens only.
      loss_fn = objectives.lm_objective(cfg) if pc.loss_on_prompt else objectives.sft_objective(cfg, P)
      updates[key] = learner.make_accumulating_update(cfg, loss_fn, tx, 0)
    lr = learning_rate(pc, step, cooldown)
    chunks, weights = micro_batches(data, P, pc.micro_batches, pc.length_bucket, whole_text=pc.loss_on_prompt)
    res = updates[key](params, opt_state, [{k: jnp.asarray(v) for k, v in c.items()} for c in chunks], weights,
                     {'head': jnp.float32(lr), 'backbone': jnp.float32(lr)})
    if not bool(res.finite):
      raise FloatingPointError(f'Pretraining step {step}: non-finite loss; lower config.pretrain.lr (now {pc.lr}).')
    params, opt_state = res.params, res.opt_state
    losses.append(float(res.loss))
    bar.update(1)
    bar.set_postfix(loss=f'{np.mean(losses[-10:]):.3f}')
    step += 1
    if cooldown is not None:
      continue
    if validation is not None and step >= pc.eval_from and step % pc.eval_every == 0:
      acc = read()
      readings.append({'step': step, 'validation_greedy_accuracy': acc, 'loss': float(np.mean(losses[-10:]))})
      # The band is met by the mean of the last stop_window readings: one reading moves by up to 0.1
      # between neighbouring steps, and its first excursion above the band would stop at a lucky point.
      window = [r['validation_greedy_accuracy'] for r in readings[-pc.stop_window:]]
      bar.set_postfix(loss=f'{np.mean(losses[-10:]):.3f}', val_acc=f'{acc:.3f}')
      if len(window) == pc.stop_window and np.mean(window) >= pc.stop_accuracy:
        stopped_at = step
    if stopped_at is not None or step == pc.steps:
      # The cooldown anneals the learning rate linearly to zero, so that the saved base is a settled
      # point rather than one sample of the main phase's step-to-step jitter.
      cooldown, end = (step, lr), step + pc.cooldown_steps
      bar.total = end
      bar.refresh()
  bar.close()
  if validation is not None and stopped_at is None:
    print(f'cfrl_jax: pretraining reached its cap config.pretrain.steps={pc.steps} before validation greedy '
          f'accuracy {pc.stop_accuracy} (mean of the last {pc.stop_window} readings; last reading '
          f'{readings[-1]["validation_greedy_accuracy"] if readings else "none"}); the base lies outside its '
          'stated band. Raise config.pretrain.steps or lower config.pretrain.stop_accuracy.', flush=True)
  final = None
  if validation is not None:   # the saved base's own reading (the last one already is, without a cooldown)
    final = readings[-1]['validation_greedy_accuracy'] if readings and readings[-1]['step'] == step else read()
  hf.save_pretrained(cfg, params, out_dir)
  return {'steps': step, 'examples': step * pc.batch_size, 'final_loss': float(np.mean(losses[-10:])),
          'seconds': time.time() - t0, 'num_params': qwen.count_params(params), 'cache_key': cache_key(config),
          'stop_accuracy': pc.stop_accuracy, 'stop_window': pc.stop_window, 'stopped_at': stopped_at,
          'cooldown_steps': step - cooldown[0] if cooldown else 0, 'validation': readings,
          'final_validation_greedy_accuracy': final}


def learning_rate(pc, step: int, cooldown: tuple[int, float] | None = None) -> float:
  """The pretraining learning rate of 0-based `step`.

  Main phase: linear warmup over warmup_steps, then cosine decay to 10% of pc.lr at the cap pc.steps
  (a from-scratch run needs the decay to settle). Cooldown (from step `start`, the main phase's last
  rate `lr0`): linear to zero over pc.cooldown_steps, lr0 * (start + cooldown_steps - step) / cooldown_steps.
  """
  if cooldown is not None:
    start, lr0 = cooldown
    return lr0 * (start + pc.cooldown_steps - step) / pc.cooldown_steps
  frac = min(1.0, (step + 1) / max(pc.warmup_steps, 1))
  return pc.lr * frac * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / pc.steps)))


def validation_accuracy(policy, params, rows, task, max_new_tokens: int) -> float:
  """Greedy accuracy of `params` on `rows` (the stop rule's reading: no sampling noise)."""
  out = evaluate.evaluate(policy, params, rows, task, jax.random.PRNGKey(0), samples=0, temperature=1.0,
                          max_new_tokens=max_new_tokens, batch_size=len(rows), greedy=True)
  return out['greedy_accuracy']
