"""Shared by test_micro_batching and test_pretrain: one optimizer step on a whole batch next to the
accumulating step on its micro-batches, from the same parameters and optimizer state."""
import jax
import jax.numpy as jnp
import numpy as np

from cfrl_jax.train import learner


def whole_and_accumulated_steps(cfg, loss_fn, params, batch, chunks, weights, combine=None):
  """Returns (whole, micro) learner results; run inside `jax.enable_x64` for a float64 model.

  batch: {name: [B, ...] array}; chunks: its micro-batches; weights: their loss weights (sum 1).
  """
  lrs = {'head': jnp.float64(1e-2), 'backbone': jnp.float64(1e-2)}
  copy = lambda t: jax.tree_util.tree_map(jnp.array, t)
  tx, opt = learner.init_stage(cfg, params, 0, learner.OptimConfig(grad_clip=1.0))
  whole = learner.make_update(cfg, loss_fn, tx, 0)(copy(params), copy(opt),
                                                   {k: jnp.asarray(v) for k, v in batch.items()}, lrs)
  tx, opt = learner.init_stage(cfg, params, 0, learner.OptimConfig(grad_clip=1.0))
  micro = learner.make_accumulating_update(cfg, loss_fn, tx, 0)(
      copy(params), copy(opt), [{k: jnp.asarray(v) for k, v in c.items()} for c in chunks], weights, lrs,
      combine=combine)
  return whole, micro


def assert_same_step(whole, micro, params, atol=1e-12):
  """The two steps agree in loss and parameters, and the step moved the parameters at all."""
  assert abs(float(micro.loss) - float(whole.loss)) < atol
  for a, b in zip(jax.tree_util.tree_leaves(micro.params), jax.tree_util.tree_leaves(whole.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree_util.tree_leaves(micro.params), jax.tree_util.tree_leaves(params)))
  assert moved > 1e-4   # the step did something
