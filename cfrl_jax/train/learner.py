"""The optimizer of both CF-RL stages and the jitted update step.

Parameters are labelled by the {'backbone','head'} split. Stage one maps the
backbone to `optax.set_to_zero()` (no optimizer state is allocated for it) and
stops gradients through it, so XLA does not even run its backward pass; stage
two gives the backbone its own AdamW. The head's AdamW is the same transform in
both stages, so at the switch its moments and step count carry over unchanged
(only its learning rate changes, as configured).

Tied heads: the head IS the input embedding, so the trainable set of stage one
is the embedding, and a stage-one step changes the model's inputs as well as its
classifier. `load_pretrained(..., tie='untie')` avoids that (the CF-RL default).

Learning rates are hyperparameters inside the optimizer state
(`optax.inject_hyperparams`), set from the trainer's schedules at every step,
so a stage switch decided at run time (by reward or entropy) needs no schedule
surgery.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cfrl_jax.models import qwen

LABELS = ('head', 'backbone')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0        # global-norm clip over all trainable parameters; 0 disables


def param_labels(cfg: qwen.QwenConfig, params) -> dict:
  """'head' or 'backbone' per leaf; a tied model's embedding is the head."""
  backbone = jax.tree_util.tree_map(lambda _: 'backbone', params['backbone'])
  if cfg.tie == 'tied':
    backbone = dict(backbone, embed='head')
  return {'backbone': backbone, 'head': jax.tree_util.tree_map(lambda _: 'head', params['head'])}


def make_optimizer(cfg: qwen.QwenConfig, params, stage: int, ocfg: OptimConfig) -> optax.GradientTransformation:
  """Stage 1: head-only AdamW, backbone set_to_zero. Stage 2 (or 0 = plain RL): AdamW on both groups."""
  if stage not in (0, 1, 2):
    raise ValueError(f'stage={stage}; expected 0 (plain), 1 (head only) or 2 (all parameters).')

  def adamw():
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=0.0, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay)

  transforms = {'head': adamw(), 'backbone': optax.set_to_zero() if stage == 1 else adamw()}
  clip = optax.clip_by_global_norm(ocfg.grad_clip) if ocfg.grad_clip > 0 else optax.identity()
  return optax.chain(clip, optax.multi_transform(transforms, param_labels(cfg, params)))


def carry_head_state(new_state, old_state):
  """Stage-two optimizer state whose head part is the stage-one head state (moments, count)."""
  clip_new, mt_new = new_state
  _, mt_old = old_state
  inner = dict(mt_new.inner_states)
  inner['head'] = mt_old.inner_states['head']
  return (clip_new, mt_new._replace(inner_states=inner))


def with_learning_rates(opt_state, lrs: dict[str, jax.Array]):
  """Writes per-group learning rates into the inject_hyperparams states."""
  clip_state, mt = opt_state
  inner = dict(mt.inner_states)
  for label, lr in lrs.items():
    masked = inner[label]
    state = masked.inner_state
    if not hasattr(state, 'hyperparams'):   # set_to_zero: frozen group, nothing to set
      continue
    hp = dict(state.hyperparams, learning_rate=jnp.asarray(lr, state.hyperparams['learning_rate'].dtype))
    inner[label] = masked._replace(inner_state=state._replace(hyperparams=hp))
  return (clip_state, mt._replace(inner_states=inner))


def freeze_backbone(cfg: qwen.QwenConfig, params):
  """Stops gradients into the backbone (but not into a tied head's embedding)."""
  backbone = jax.tree_util.tree_map(jax.lax.stop_gradient, params['backbone'])
  if cfg.tie == 'tied':
    backbone = dict(backbone, embed=params['backbone']['embed'])
  return {'backbone': backbone, 'head': params['head']}


def group_norms(cfg: qwen.QwenConfig, tree) -> dict[str, jax.Array]:
  """Global L2 norm of a params-shaped tree per label."""
  labels = param_labels(cfg, tree)
  sq = {label: jnp.zeros((), jnp.float32) for label in LABELS}
  for leaf, label in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(labels)):
    sq[label] = sq[label] + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return {label: jnp.sqrt(v) for label, v in sq.items()}


class UpdateResult(NamedTuple):
  params: Any
  opt_state: Any
  loss: jax.Array
  finite: jax.Array          # False: the loss or a gradient was NaN/inf and the update was skipped
  metrics: dict


LossFn = Callable[[Any, Any], tuple[jax.Array, dict]]


def make_update(cfg: qwen.QwenConfig, loss_fn: LossFn, tx: optax.GradientTransformation, stage: int,
                extra_trainable: bool = False):
  """A jitted step: (params, opt_state, batch, lrs[, extra]) -> UpdateResult.

  loss_fn(params, batch) -> (loss, metrics). With extra_trainable, the step also
  takes and returns `extra` (e.g. a critic) trained by `extra_tx` through the
  same loss: loss_fn((params, extra), batch).
  A non-finite loss or gradient leaves params and optimizer state untouched and
  reports finite=False, so the caller can stop with the last good state saved.
  """

  def step(params, opt_state, batch, lrs):
    def objective(p):
      p = freeze_backbone(cfg, p) if stage == 1 else p
      return loss_fn(p, batch)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return _apply_gradients(cfg, tx, params, opt_state, grads, loss, lrs, metrics)

  return jax.jit(step, donate_argnums=(0, 1))


def _apply_gradients(cfg, tx, params, opt_state, grads, loss, lrs, metrics) -> UpdateResult:
  norms = group_norms(cfg, grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(norms['head']) & jnp.isfinite(norms['backbone'])
  updates, new_opt = tx.update(grads, with_learning_rates(opt_state, lrs), params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = dict(metrics, grad_norm_head=norms['head'], grad_norm_backbone=norms['backbone'])
  return UpdateResult(keep(new_params, params), keep(new_opt, opt_state), loss, finite, metrics)


def make_accumulating_update(cfg: qwen.QwenConfig, loss_fn: LossFn, tx: optax.GradientTransformation,
                             stage: int):
  """update(params, opt_state, micro_batches, weights, lrs, combine=None) -> UpdateResult: one optimizer
  step on sum_i weights[i] * loss_fn(params, micro_batches[i]).

  Micro-batches may differ in shape (each is cut to its own longest row, so padding is not computed):
  one compiled gradient pass per shape accumulates into one gradient tree, then one jitted step clips,
  applies the optimizer and checks finiteness as `make_update` does. With weights that make the sum the
  whole batch's loss (pretrain.micro_batches, micro_batching.split) the step equals make_update's on the
  whole batch, up to floating-point summation order. Metrics: the gradient norms, plus
  combine([loss_fn's metrics of each micro-batch]) when `combine` is given.
  """

  def accumulate(params, batch, weight, grads):
    def objective(p):
      p = freeze_backbone(cfg, p) if stage == 1 else p
      loss, metrics = loss_fn(p, batch)
      return weight * loss, metrics

    (value, metrics), g = jax.value_and_grad(objective, has_aux=True)(params)
    return jax.tree_util.tree_map(jnp.add, grads, g), value, metrics

  accumulate = jax.jit(accumulate, donate_argnums=(3,))
  apply = jax.jit(lambda params, opt_state, grads, loss, lrs:
                  _apply_gradients(cfg, tx, params, opt_state, grads, loss, lrs, {}), donate_argnums=(0, 1))

  def update(params, opt_state, micro_batches, weights, lrs, combine=None) -> UpdateResult:
    if len(micro_batches) != len(weights) or not micro_batches:
      raise ValueError(f'make_accumulating_update: {len(micro_batches)} micro-batches and {len(weights)} weights; '
                       'give one weight per micro-batch, at least one.')
    # Sums and weights at least in float32 (a 16-bit sum over micro-batches would round each one away),
    # and in float64 for a float64 model (a float32 weight would round its loss).
    wide = lambda dtype: jnp.promote_types(dtype, jnp.float32)
    grads = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, wide(p.dtype)), params)
    dtype = wide(jax.tree_util.tree_leaves(params)[0].dtype)
    loss, per_micro = 0.0, []
    for batch, weight in zip(micro_batches, weights):
      grads, value, metrics = accumulate(params, batch, jnp.asarray(weight, dtype), grads)
      loss = loss + value
      per_micro.append(metrics)
    res = apply(params, opt_state, grads, loss, lrs)
    if combine is not None:
      res = res._replace(metrics=dict(res.metrics, **combine(per_micro)))
    return res

  return update


def init_stage(cfg: qwen.QwenConfig, params, stage: int, ocfg: OptimConfig, previous_state=None):
  """(tx, opt_state) for a stage; entering stage two from stage one keeps the head's state."""
  tx = make_optimizer(cfg, params, stage, ocfg)
  state = tx.init(params)
  if previous_state is not None:
    state = carry_head_state(state, previous_state)
  return tx, state
