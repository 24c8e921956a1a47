"""rl.lr_schedule: linear warmup, then constant or cosine decay to a floor, against hand-computed values."""
import math

import pytest

from cfrl_jax import config as config_lib
from cfrl_jax.train import schedule
from cfrl_jax.train.trainer import learning_rates


def test_cosine_hand_values():
  # base 1, warmup 2, 10 steps, floor 0.1: decay spans steps 2..10 (8 steps)
  lr = lambda k: schedule.lr_at(1.0, k, warmup=2, schedule='cosine', total=10, min_ratio=0.1)
  assert lr(0) == pytest.approx(0.5)
  assert lr(1) == pytest.approx(1.0)
  assert lr(2) == pytest.approx(1.0)
  # progress 2/8: 0.1 + 0.9 * (1 + cos(pi/4)) / 2 = 0.1 + 0.9 * 0.8535534
  assert lr(4) == pytest.approx(0.868198, abs=1e-6)
  assert lr(6) == pytest.approx(0.55)         # progress 1/2: halfway between 1 and 0.1
  assert lr(10) == pytest.approx(0.1)
  assert lr(25) == pytest.approx(0.1)         # past the end: stays at the floor


def test_constant_keeps_todays_warmup():
  assert schedule.lr_at(2.0, 1, warmup=4) == pytest.approx(1.0)
  assert schedule.lr_at(2.0, 7, start=5, warmup=4) == pytest.approx(1.5)
  assert schedule.lr_at(2.0, 50, warmup=4) == 2.0
  assert schedule.lr_at(2.0, 0) == 2.0


def test_warmup_ratio_rounds_up_and_steps_win():
  assert schedule.warmup_steps(0, 0.03, 100) == 3
  assert schedule.warmup_steps(0, 0.03, 60) == 2      # ceil(1.8)
  assert schedule.warmup_steps(5, 0.03, 100) == 5
  assert schedule.warmup_steps(0, 0.0, 100) == 0


def test_trainer_cosine_and_stage_two_restart():
  c = config_lib.base_config()
  c.rl.lr, c.rl.steps, c.rl.warmup_ratio, c.rl.lr_schedule, c.rl.min_lr_ratio = 1e-3, 100, 0.03, 'cosine', 0.1
  config_lib.validate(c)
  at = lambda stage, step, start: learning_rates(c.rl, c.cfrl, stage, step, start)['backbone']
  assert at(0, 0, 0) == pytest.approx(1e-3 / 3)       # warmup ceil(0.03 * 100) = 3
  assert at(0, 2, 0) == pytest.approx(1e-3)
  assert at(0, 50, 0) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 47 / 97))))
  assert at(0, 99, 0) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 96 / 97))))
  # CF-RL stage two from step 40: warmup ceil(0.03 * 60) = 2 restarts there, decay over steps 42..100
  assert at(2, 40, 40) == pytest.approx(0.5e-3)
  assert at(2, 41, 40) == pytest.approx(1e-3)
  assert at(2, 71, 40) == pytest.approx(1e-3 * 0.55)   # progress (31 - 2) / 58 = 1/2


def test_default_schedule_is_unchanged():
  c = config_lib.base_config()
  c.rl.lr, c.rl.warmup_steps = 1e-3, 4
  assert learning_rates(c.rl, c.cfrl, 0, 1, 0)['backbone'] == pytest.approx(0.5e-3)
  assert learning_rates(c.rl, c.cfrl, 0, 80, 0)['backbone'] == pytest.approx(1e-3)


def test_validate_refuses_bad_schedule_fields():
  for field, value, match in (('lr_schedule', 'linear', 'lr_schedule'), ('min_lr_ratio', 1.5, 'min_lr_ratio'),
                              ('warmup_ratio', 1.0, 'warmup_ratio')):
    c = config_lib.base_config()
    c.rl[field] = value
    with pytest.raises(ValueError, match=match):
      config_lib.validate(c)
  c = config_lib.base_config()
  c.rl.lr_schedule, c.rl.steps, c.rl.warmup_steps = 'cosine', 10, 10
  with pytest.raises(ValueError, match='more steps than its warmup'):
    config_lib.validate(c)
  with pytest.raises(ValueError, match='lr_schedule'):
    schedule.lr_at(1.0, 0, schedule='step')
