"""Learning-rate schedules of the RL trainer, one lr per trainer step (every update of a rollout uses it).

    lr_at(base, step, start=s0, warmup=W, schedule='constant')                    # warmup, then base
    lr_at(base, step, start=s0, warmup=W, schedule='cosine', total=N, min_ratio=m)

Both warm up linearly from `start`: the lr of the k-th step after start (k = step - start, from 0)
is base * (k + 1) / W while k < W, so the first step already moves (no zero-lr step). 'cosine' then
decays from base to min_ratio * base over the remaining N - W steps:

    lr = base * (m + (1 - m) * (1 + cos(pi * (k - W) / (N - W))) / 2)

which is the cosine-with-floor schedule Echo Chamber's code runs (3% warmup, floor 0.1 * lr), counted
here in trainer steps rather than optimizer updates. Steps past start + N stay at the floor.
"""
from __future__ import annotations

import math

SCHEDULES = ('constant', 'cosine')


def warmup_steps(warmup_steps_: int, warmup_ratio: float, total: int) -> int:
  """warmup_steps when > 0, else ceil(warmup_ratio * total) (the original's 3% is ratio 0.03)."""
  if warmup_steps_ > 0:
    return int(warmup_steps_)
  return int(math.ceil(warmup_ratio * max(total, 0)))


def lr_at(base: float, step: int, *, start: int = 0, warmup: int = 0, schedule: str = 'constant',
          total: int = 0, min_ratio: float = 0.0) -> float:
  """The learning rate of `step` for a schedule that (re)starts at `start`.

  Args:
    base: peak learning rate.
    step, start: the trainer step, and the step the schedule starts at (CF-RL's stage two restarts).
    warmup: linear-warmup steps (0: none).
    schedule: 'constant' (warmup, then base) | 'cosine' (warmup, then cosine decay to min_ratio * base).
    total: 'cosine' only: steps from start to the end of the decay.
    min_ratio: 'cosine' only: the floor as a fraction of base, in [0, 1].
  """
  if schedule not in SCHEDULES:
    raise ValueError(f'lr schedule {schedule!r} is unknown; expected one of {SCHEDULES} (config.rl.lr_schedule).')
  k = step - start
  if warmup > 0 and k < warmup:
    return base * (k + 1) / warmup
  if schedule == 'constant':
    return base
  if not 0.0 <= min_ratio <= 1.0:
    raise ValueError(f'min_ratio={min_ratio} must lie in [0, 1] (config.rl.min_lr_ratio).')
  # A schedule restarted near the end (CF-RL's stage two) may have total <= warmup: it then sits at
  # the floor after its warmup instead of failing mid-run; config.validate checks rl.steps itself.
  progress = min(1.0, max(0.0, (k - warmup) / max(total - warmup, 1)))
  return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
