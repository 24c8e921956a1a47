"""Checkpoints: params / optimizer state / metadata round-trip exactly; params restore without the optimizer;
damaged files are caught by the checksums, and resuming falls back to the newest good step."""
import dataclasses
import glob
import hashlib
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax import metrics as metrics_lib
from cfrl_jax.models import qwen
from cfrl_jax.train import checkpoint, learner
from test_trainer import run, toy_config   # the tiny RL run of tests/test_trainer.py


def setup(tmp_path):
  cfg = qwen.QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, eos_token_id=(3, 5))
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  tx, opt = learner.init_stage(cfg, params, 1, learner.OptimConfig())
  state = {'opt_state': opt, 'critic': None, 'critic_opt': None, 'rng': jax.random.PRNGKey(7)}
  meta = {'stage': 1, 'data_position': 48, 'model_config': dataclasses.asdict(cfg)}
  return cfg, params, state, meta


def test_round_trip_is_exact_and_keeps_structure(tmp_path):
  cfg, params, state, meta = setup(tmp_path)
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(3, params, state, meta)
  ck.wait()
  abstract = lambda t: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
  p2, s2, m2 = ck.restore(3, abstract(params), abstract(state))
  ck.close()
  assert jax.tree_util.tree_structure(s2) == jax.tree_util.tree_structure(state)
  for a, b in zip(jax.tree_util.tree_leaves((params, state)), jax.tree_util.tree_leaves((p2, s2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert m2['stage'] == 1 and m2['data_position'] == 48 and m2['step'] == 3


def test_params_and_config_restore_without_optimizer(tmp_path):
  cfg, params, state, meta = setup(tmp_path)
  ck = checkpoint.Checkpointer(str(tmp_path))
  for step in (2, 4):
    ck.save(step, params, state, meta)
  ck.close()
  assert checkpoint.available_steps(str(tmp_path)) == [2, 4]
  p = checkpoint.restore_params(str(tmp_path), 4)
  np.testing.assert_array_equal(p['head']['w'], np.asarray(params['head']['w']))
  assert checkpoint.restore_model_config(str(tmp_path)) == cfg


def test_missing_step_and_mismatched_structure_are_clear_errors(tmp_path):
  cfg, params, state, meta = setup(tmp_path)
  with pytest.raises(FileNotFoundError, match='available steps'):
    checkpoint.restore_params(str(tmp_path), 9)
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(1, params, state, meta)
  ck.wait()
  abstract = lambda t: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
  _, stage2 = learner.init_stage(cfg, params, 2, learner.OptimConfig())
  wrong = dict(state, opt_state=stage2)
  with pytest.raises(Exception):
    ck.restore(1, abstract(params), abstract(wrong))
  ck.close()


# --- integrity: checksums written at save, checked at every restore ----------------------------

def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _saved(tmp_path, steps=(1, 2), **kw):
  cfg, params, state, meta = setup(tmp_path)
  ck = checkpoint.Checkpointer(str(tmp_path), **kw)
  for step in steps:
    ck.save(step, params, state, meta)
  ck.close()
  return params, state


def _largest_params_file(run_dir, step):
  """The largest file of the params item: the one that holds the weights' bytes."""
  files = glob.glob(os.path.join(checkpoint.checkpoint_dir(run_dir), str(step), 'params', '**', '*'),
                    recursive=True)
  return max((f for f in files if os.path.isfile(f)), key=os.path.getsize)


def _flip(path, at=1000, n=8):
  data = bytearray(open(path, 'rb').read())
  for i in range(at, at + n):
    data[i] ^= 0xFF
  open(path, 'wb').write(data)


def _cut(path):
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])


def test_checksums_cover_every_file_of_every_item(tmp_path):
  _saved(tmp_path, steps=(1,))
  step_dir = os.path.join(checkpoint.checkpoint_dir(str(tmp_path)), '1')
  record = json.load(open(os.path.join(step_dir, checkpoint.CHECKSUM_FILE)))['items']
  for item in ('params', 'train', 'meta'):
    on_disk = {os.path.relpath(f, step_dir) for f in glob.glob(os.path.join(step_dir, item, '**', '*'), recursive=True)
               if os.path.isfile(f)}
    assert set(record[item]) == on_disk and on_disk
    for rel in on_disk:
      data = open(os.path.join(step_dir, rel), 'rb').read()
      assert record[item][rel] == {'size': len(data), 'sha256': hashlib.sha256(data).hexdigest()}


def test_async_save_writes_checksums_once_committed(tmp_path):
  params, state = _saved(tmp_path, steps=(1, 2), async_save=True)
  for step in (1, 2):
    assert checkpoint.verify_step(os.path.join(checkpoint.checkpoint_dir(str(tmp_path)), str(step)), step)


@pytest.mark.parametrize('damage', [_flip, _cut])
def test_damaged_file_is_an_error_naming_step_and_file(damage, tmp_path):
  params, state = _saved(tmp_path)
  run_dir = str(tmp_path)
  bad = _largest_params_file(run_dir, 2)
  damage(bad)
  problem = 'other contents' if damage is _flip else r'\d+ bytes where \d+ were written'
  ck = checkpoint.Checkpointer(run_dir)
  with pytest.raises(checkpoint.CheckpointError, match=rf'step 2 is damaged: {bad} has {problem}'):
    ck.restore(2, _abstract(params), _abstract(state))
  with pytest.raises(checkpoint.CheckpointError, match=rf'step 2 is damaged: {bad} has {problem}'):
    checkpoint.restore_params(run_dir, 2)
  p1, _, _ = ck.restore(1, _abstract(params), _abstract(state))   # the other step is untouched
  ck.close()
  np.testing.assert_array_equal(np.asarray(p1['head']['w']), np.asarray(params['head']['w']))


def test_metadata_readers_verify_the_meta_item(tmp_path):
  # read_meta / restore_model_config read the meta JSON without orbax; a changed file must not
  # hand a wrong model config (e.g. a different layer count) to the analyses silently.
  _saved(tmp_path, steps=(1, 2))
  run_dir = str(tmp_path)
  path = checkpoint._meta_path(run_dir, 2)
  meta = json.load(open(path))
  meta['model_config']['num_layers'] = 7
  json.dump(meta, open(path, 'w'))
  with pytest.raises(checkpoint.CheckpointError, match=rf'step 2 is damaged: {path} has'):
    checkpoint.read_meta(run_dir, 2)
  with pytest.raises(checkpoint.CheckpointError, match='step 2 is damaged'):
    checkpoint.restore_model_config(run_dir)
  assert checkpoint.restore_model_config(run_dir, 1).num_layers == 2   # the intact step still reads


def test_without_checksums_a_flip_goes_unnoticed_so_legacy_steps_warn_once(tmp_path):
  """What the checksums guard against: orbax alone restores flipped bytes as other weights."""
  params, _ = _saved(tmp_path)
  run_dir = str(tmp_path)
  for step in (1, 2):
    os.remove(os.path.join(checkpoint.checkpoint_dir(run_dir), str(step), checkpoint.CHECKSUM_FILE))
  _flip(_largest_params_file(run_dir, 2))
  checkpoint._UNVERIFIED_WARNED.clear()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    p2 = checkpoint.restore_params(run_dir, 2)
    p1 = checkpoint.restore_params(run_dir, 1)
  said = [str(w.message) for w in caught if w.category is checkpoint.CheckpointWarning]
  assert len(said) == 1 and 'no cfrl_checksums.json' in said[0] and 'unverified' in said[0]
  changed = sum(int(np.sum(np.asarray(a) != np.asarray(b)))
                for a, b in zip(jax.tree_util.tree_leaves(p2), jax.tree_util.tree_leaves(params)))
  assert changed > 0
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize('damage', [_flip, _cut])
def test_resume_step_skips_a_damaged_latest_step_and_says_so(damage, tmp_path):
  _saved(tmp_path, steps=(1, 2, 3))
  run_dir = str(tmp_path)
  damage(_largest_params_file(run_dir, 3))
  ck = checkpoint.Checkpointer(run_dir)
  with pytest.warns(checkpoint.CheckpointWarning, match=r'step 3: .* resuming from step 2 instead'):
    assert ck.resume_step() == 2
  # Out of orbax's way (it refuses to save a step that exists), kept for inspection.
  assert ck.all_steps() == [1, 2] and checkpoint.available_steps(run_dir) == [1, 2]
  assert os.path.isdir(os.path.join(run_dir, checkpoint.CORRUPT_SUBDIR, '3', 'params'))
  cfg, params, state, meta = setup(tmp_path)
  ck.save(3, params, state, meta)
  ck.close()
  assert checkpoint.Checkpointer(run_dir).resume_step() == 3


def test_no_good_checkpoint_is_one_clear_error(tmp_path):
  _saved(tmp_path, steps=(1, 2))
  run_dir = str(tmp_path)
  _flip(_largest_params_file(run_dir, 2))
  _cut(_largest_params_file(run_dir, 1))
  ck = checkpoint.Checkpointer(run_dir)
  with pytest.raises(checkpoint.CheckpointError) as info:
    ck.resume_step()
  message = str(info.value)
  assert '\n' not in message and 'tensorstore' not in message.lower()
  assert 'no checkpoint passes its checksums' in message and 'step 2:' in message and 'step 1:' in message
  assert 'config.resume=False' in message
  assert ck.all_steps() == [1, 2]   # nothing moved when there is nothing to resume from
  ck.close()


@pytest.mark.slow
def test_trainer_resume_falls_back_to_the_previous_good_step(tiny_tokenizer_dir, tmp_path):
  c = toy_config(tiny_tokenizer_dir, str(tmp_path), steps=2)
  run(c)
  good = checkpoint.restore_params(str(tmp_path), 1)
  _cut(_largest_params_file(str(tmp_path), 2))
  c.resume = True
  c.rl.steps = 1   # resumed at step 1, nothing left to train: the parameters are step 1's
  with pytest.warns(checkpoint.CheckpointWarning, match=r'step 2: .* resuming from step 1 instead'):
    result = run(c)
  assert result.step == 1
  for a, b in zip(jax.tree_util.tree_leaves(result.params), jax.tree_util.tree_leaves(good)):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert [r['step'] for r in metrics_lib.read_metrics(str(tmp_path), 'train')] == [1]
