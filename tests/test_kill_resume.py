"""SIGKILL a real training process at a checkpoint boundary and in the middle of a checkpoint write,
resume it, and compare parameters (exactly) and metrics.jsonl with an uninterrupted run.

The runs are the demo's smoke config (GRPO arm, 3 steps, a checkpoint every step) through the
command line. A small driver holds the process at the chosen point (it writes a marker file and
sleeps), the test sees the marker and kills it from outside with SIGKILL, so the kill lands exactly
there: (a) right after step 1's checkpoint is complete; (b) inside step 2's checkpoint write, after
its array items were started and before orbax renamed its temporary directory into place.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from cfrl_jax.train import checkpoint

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3

DRIVER = textwrap.dedent('''
    """cfrl_jax.main, held at KILL_AT=<mode>:<step>:<marker> until the test kills it."""
    import os, sys, time
    import orbax.checkpoint as ocp
    from cfrl_jax import main
    from cfrl_jax.train import trainer

    mode, step, marker = os.environ.get('KILL_AT', '::').split(':', 2)

    def hold():
      open(marker, 'w').close()
      time.sleep(3600)

    if mode == 'boundary':   # after step's checkpoint is written and finalized
      save = trainer.Trainer.save
      def held_save(self):
        save(self)
        if self.step == int(step):
          hold()
      trainer.Trainer.save = held_save
    elif mode == 'mid_write':   # the JSON item of step's checkpoint, inside its temporary directory
      json_save = ocp.JsonCheckpointHandler.async_save
      async def held_json_save(self, directory, *args, **kwargs):
        if os.path.basename(os.path.dirname(str(directory))).split('.')[0] == step:
          hold()
        return await json_save(self, directory, *args, **kwargs)
      ocp.JsonCheckpointHandler.async_save = held_json_save
    sys.argv = ['cfrl_jax.main'] + sys.argv[1:]
    main.run()
''')


@pytest.fixture(scope='module')
def shared(tmp_path_factory, smoke_pretrain_cache):
  """A driver script and caches (pretrained base, compiled programs) shared by every run."""
  d = tmp_path_factory.mktemp('kill')
  (d / 'driver.py').write_text(DRIVER)
  (d / 'cache').symlink_to(smoke_pretrain_cache)
  return d


def command(shared, run_dir, *extra):
  return [sys.executable, str(shared / 'driver.py'), '--config=configs/demo.py:smoke', '--config.arms=grpo',
          f'--config.run_dir={run_dir}', f'--config.pretrain.cache_dir={shared}/cache',
          f'--config.compile_cache_dir={shared}/jax', f'--config.rl.steps={STEPS}', '--config.checkpoint.every=1',
          '--config.log.progress=False', '--config.log.tensorboard=False', '--config.report=False', *extra]


def env(kill_at='::'):
  return dict(os.environ, KILL_AT=kill_at, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))


def run_to_end(shared, run_dir, *extra):
  p = subprocess.run(command(shared, run_dir, *extra), cwd=REPO, env=env(), capture_output=True, text=True,
                     timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  return p


def run_and_kill(shared, run_dir, mode, step):
  """Starts a run held at (mode, step) and SIGKILLs it there."""
  marker = str(shared / f'held-{mode}')
  if os.path.exists(marker):
    os.remove(marker)
  p = subprocess.Popen(command(shared, run_dir), cwd=REPO, env=env(f'{mode}:{step}:{marker}'),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 900
  while not os.path.exists(marker):
    if p.poll() is not None:
      raise AssertionError(f'the run ended (rc {p.returncode}) before reaching {mode} {step}: '
                           f'{p.stderr.read()[-3000:]}')
    assert time.time() < deadline, 'the run did not reach the kill point'
    time.sleep(0.2)
  p.send_signal(signal.SIGKILL)
  p.wait()
  p.stderr.close()
  assert p.returncode == -signal.SIGKILL


def arm_dir(run_dir):
  return os.path.join(run_dir, 'grpo', 'seed0')


def stream(run_dir):
  """metrics.jsonl as written (every line, duplicates included), without wall-clock fields."""
  with open(os.path.join(arm_dir(run_dir), 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k != 'step_time'} for r in records]


def assert_same_params(a, b, step):
  pa, pb = checkpoint.restore_params(arm_dir(a), step), checkpoint.restore_params(arm_dir(b), step)
  la, lb = jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def straight(shared):
  run_dir = str(shared / 'straight')
  run_to_end(shared, run_dir)
  return run_dir


def test_uninterrupted_smoke_run_learns(straight):
  """The reference run is worth comparing against: its rewards vary and its parameters move every step."""
  train = [r for r in stream(straight) if r['kind'] == 'train']
  assert [r['step'] for r in train] == [1, 2, 3]
  assert any(r['reward_std'] > 0 for r in train), train
  for s in range(STEPS):
    before, after = (jax.tree_util.tree_leaves(checkpoint.restore_params(arm_dir(straight), t)) for t in (s, s + 1))
    assert any(not np.array_equal(x, y) for x, y in zip(before, after)), f'step {s + 1} left the parameters as they were'


def test_kill_at_a_checkpoint_boundary_then_resume(shared, straight):
  run_dir = str(shared / 'boundary')
  run_and_kill(shared, run_dir, 'boundary', 1)
  assert checkpoint.available_steps(arm_dir(run_dir)) == [0, 1]
  run_to_end(shared, run_dir, '--config.resume=True')
  assert checkpoint.available_steps(arm_dir(run_dir)) == list(range(STEPS + 1))
  assert_same_params(straight, run_dir, STEPS)
  assert stream(run_dir) == stream(straight)


def test_kill_during_a_checkpoint_write_then_resume(shared, straight):
  run_dir = str(shared / 'mid_write')
  run_and_kill(shared, run_dir, 'mid_write', 2)
  ckpts = checkpoint.checkpoint_dir(arm_dir(run_dir))
  leftovers = [n for n in os.listdir(ckpts) if n.startswith('2') and n != '2']
  assert leftovers and not os.path.exists(os.path.join(ckpts, '2')), os.listdir(ckpts)   # killed mid-write
  assert checkpoint.available_steps(arm_dir(run_dir)) == [0, 1]
  run_to_end(shared, run_dir, '--config.resume=True')
  assert checkpoint.available_steps(arm_dir(run_dir)) == list(range(STEPS + 1))
  assert_same_params(straight, run_dir, STEPS)
  assert stream(run_dir) == stream(straight)
