"""A rehearsal of the paper-scale command: `python -m cfrl_jax.main --config=configs/qwen_cfrl.py` (and
configs/qwen_grpo.py) as a subprocess on 8 simulated CPU devices with mesh (2, 2, 2), with only size and
data overridden.

What stays as the config file has it: the pretrained source with tie='untie' (the checkpoint is a tied
Qwen2 in the transformers layout, conftest's tiny_qwen2_tied_dir, so loading must untie it), the chat
template (the tokenizer beside the checkpoint has one), bfloat16 compute over float32 parameters with
remat, recompute_old_logp, the k3 KL against a reference policy, 4 minibatches, GRPO with seq_mean, the
CF-RL stage-one head lr, probes, evaluation and the report. What shrinks: the model, the data (GSM8K
rows with '#### N' answers in local JSONL through task.source='files'), prompts per step, new tokens,
steps, evaluation size, the stage-one length, and the mesh.

Each config runs STEPS steps with a checkpoint every step; the process is SIGKILLed once the
checkpoint of KILL_AFTER is on disk (while it works on the next step), then resumed to the end. The
test then reads what the run left: the report, finite metrics, the CF-RL stage per step (the switch
after cfrl.stage1_steps steps), and metrics.jsonl as one history. tests/test_kill_resume.py checks
that a resumed run's parameters equal an uninterrupted run's; here the point is that the real
command, at the real config's settings, runs end to end on a mesh with every axis split.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
STAGE1_STEPS = 1     # CF-RL: step 1 trains the head alone, step 2 everything
KILL_AFTER = 1       # SIGKILL once this step's checkpoint (written after the switch) is complete
TIMEOUT_S = 3600     # a guard against a hang: on a loaded 2-core machine a run can take many minutes

GSM8K_TRAIN = [
    {'question': 'Tom has 3 boxes with 4 pens each. How many pens does he have?',
     'answer': 'Tom has 3*4 = <<3*4=12>>12 pens.\n#### 12'},
    {'question': 'A shirt costs $1,200 and is 25% off. What does it cost?',
     'answer': 'The discount is 1200*25/100 = <<1200*25/100=300>>300 dollars.\n1200-300 = <<1200-300=900>>900\n#### 900'},
    {'question': 'Mia reads 10 pages a day for 12 days. How many pages?',
     'answer': '10*12 = <<10*12=120>>120\n#### 120'},
    {'question': 'Sam has 7 apples and eats 2. How many are left?', 'answer': '7-2 = <<7-2=5>>5\n#### 5'},
    {'question': 'A bus holds 40 people. How many people do 3 buses hold?', 'answer': '3*40 = <<3*40=120>>120\n#### 120'},
    {'question': 'Ann saves $5 a week for 9 weeks. How much does she save?', 'answer': '5*9 = <<5*9=45>>45\n#### 45'},
]
GSM8K_TEST = [
    {'question': 'Sam buys 2 apples at $3 each. How much does he spend?', 'answer': '2*3 = <<2*3=6>>6\n#### 6'},
    {'question': 'There are 8 birds and 3 fly away. How many remain?', 'answer': '8-3 = <<8-3=5>>5\n#### 5'},
]


def write_jsonl(path, rows):
  with open(path, 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  return str(path)


@pytest.fixture(scope='module')
def assets(tmp_path_factory, tiny_qwen2_tied_dir):
  d = tmp_path_factory.mktemp('rehearsal')
  return {'dir': d, 'model': tiny_qwen2_tied_dir, 'train': write_jsonl(d / 'train.jsonl', GSM8K_TRAIN),
          'eval': write_jsonl(d / 'test.jsonl', GSM8K_TEST),
          # conftest's session cache, which later tests and processes share
          'jit_cache': os.environ.get('JAX_COMPILATION_CACHE_DIR') or str(d / 'jax')}


def command(assets, config_file, run_dir, *extra):
  return [sys.executable, '-m', 'cfrl_jax.main', f'--config={config_file}',
          # the model and its tokenizer (tie, dtype, param_dtype and remat stay the config's)
          f'--config.model.path={assets["model"]}',
          # GSM8K-format rows from local files
          '--config.task.source=files', f'--config.task.train_files={assets["train"]}',
          f'--config.task.eval_files={assets["eval"]}',
          # sizes: 2 prompts x the config's 8 samples = 16 rows, 4 minibatches of 4 (one per data x fsdp shard)
          f'--config.rl.steps={STEPS}', '--config.rl.prompts_per_step=2', '--config.rl.max_new_tokens=16',
          f'--config.cfrl.stage1_steps={STAGE1_STEPS}',
          # evaluation (steps 0 and STEPS) and the NTK probe (step 1) at the config's every
          '--config.eval.num_problems=2', '--config.eval.samples=2', '--config.eval.pass_k=1,2',
          '--config.eval.batch_size=4', '--config.probe.num_sequences=2', '--config.checkpoint.every=1',
          # A random tiny model never writes '#### N': without another reward every group's advantages
          # are 0 and the learner sees no policy gradient. A format reward for any digit (about half of
          # its completions) gives every step mixed groups.
          '--config.task.rewards.format=1.0', r'--config.task.formats.patterns.text=\d',
          '--config.mesh.shape=(2,2,2)',
          f'--config.run_dir={run_dir}', f'--config.compile_cache_dir={assets["jit_cache"]}',
          '--config.log.progress=False', *extra]


def environment():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count=8'.strip()
  return env


def checkpoint_steps(run_dir):
  """Steps whose checkpoint is complete: orbax renames a step's temporary directory to '<step>' last."""
  d = os.path.join(run_dir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def run_killed_after(assets, config_file, run_dir, step):
  """Starts the run and SIGKILLs it as soon as the checkpoint of `step` is complete."""
  log = open(os.path.join(assets['dir'], f'{os.path.basename(run_dir)}-killed.log'), 'w')
  p = subprocess.Popen(command(assets, config_file, run_dir), cwd=REPO, env=environment(), stdout=log,
                       stderr=subprocess.STDOUT)
  deadline = time.time() + TIMEOUT_S
  try:
    while step not in checkpoint_steps(run_dir):
      if p.poll() is not None:
        log.close()
        with open(log.name) as f:
          raise AssertionError(f'the run ended (rc {p.returncode}) before its step-{step} checkpoint:\n'
                               f'{f.read()[-4000:]}')
      assert time.time() < deadline, f'no step-{step} checkpoint within {TIMEOUT_S} s'
      time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
  finally:
    if p.poll() is None:
      p.kill()
      p.wait()
    log.close()
  assert p.returncode == -signal.SIGKILL, f'the run exited by itself (rc {p.returncode}) before the kill'


def resume(assets, config_file, run_dir):
  p = subprocess.run(command(assets, config_file, run_dir, '--config.resume=True'), cwd=REPO, env=environment(),
                     capture_output=True, text=True, timeout=TIMEOUT_S)
  assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
  return p


def records(run_dir):
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module', params=['qwen_cfrl', 'qwen_grpo'])
def rehearsal(request, assets):
  name = request.param
  config_file = f'configs/{name}.py'
  run_dir = str(assets['dir'] / name)
  run_killed_after(assets, config_file, run_dir, KILL_AFTER)
  killed = {'checkpoints': checkpoint_steps(run_dir), 'records': records(run_dir)}
  resumed = resume(assets, config_file, run_dir)
  return {'name': name, 'run_dir': run_dir, 'killed': killed, 'resumed': resumed, 'records': records(run_dir)}


def test_killed_after_a_checkpoint_and_resumed_to_the_end(rehearsal):
  killed = rehearsal['killed']['checkpoints']
  assert KILL_AFTER in killed and max(killed) < STEPS, killed
  assert checkpoint_steps(rehearsal['run_dir']) == list(range(STEPS + 1))


def test_metrics_are_one_finite_history(rehearsal):
  recs = rehearsal['records']
  # The killed run's records up to its checkpoint are kept as written (the resumed run did not start
  # over), and the resumed run adds each later step once.
  before = [r for r in rehearsal['killed']['records'] if r['step'] <= KILL_AFTER]
  assert before and recs[:len(before)] == before
  assert [r['step'] for r in recs if r['kind'] == 'train'] == list(range(1, STEPS + 1))
  assert [r['step'] for r in recs if r['kind'] == 'eval'] == [0, STEPS]
  assert [r['step'] for r in recs if r['kind'] == 'probe'] == [1]
  for r in recs:
    bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad, (r['kind'], r['step'], bad)
  for r in recs:
    if r['kind'] == 'train':   # a policy gradient from mixed groups, a KL against the reference
      assert r['reward_std'] > 0 and r['grad_norm_head'] > 0 and 'kl' in r, r


def test_cfrl_stage_switches_at_the_configured_step(rehearsal):
  train = [r for r in rehearsal['records'] if r['kind'] == 'train']
  stages = [int(r['stage']) for r in train]
  backbone = [(r['lr_backbone'], r['grad_norm_backbone']) for r in train]
  if rehearsal['name'] == 'qwen_cfrl':
    # Stage one trains the head alone: no backbone lr and no backward pass through the backbone.
    assert stages == [1] * STAGE1_STEPS + [2] * (STEPS - STAGE1_STEPS)
    assert all(lr == 0.0 and g == 0.0 for lr, g in backbone[:STAGE1_STEPS]), backbone
    assert all(lr > 0 and g > 0 for lr, g in backbone[STAGE1_STEPS:]), backbone
  else:
    assert stages == [0] * STEPS
    assert all(lr > 0 and g > 0 for lr, g in backbone), backbone


def test_report_is_written(rehearsal):
  path = os.path.join(rehearsal['run_dir'], 'report.md')
  assert f'Report: {path}' in rehearsal['resumed'].stdout
  with open(path) as f:
    text = f.read()
  assert 'with CF-RL' in text if rehearsal['name'] == 'qwen_cfrl' else 'with CF-RL' not in text
