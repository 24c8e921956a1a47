"""HF checkpoints <-> param trees (cfrl_jax/models/hf.py), checked against transformers itself."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from cfrl_jax.models import hf, qwen


def _batch(vocab, seed=0):
  """Tokens (3, 9) with left padding of 0, 3 and 8 positions."""
  tokens = np.random.RandomState(seed).randint(0, vocab, (3, 9)).astype(np.int32)
  mask = np.ones((3, 9), np.int32)
  mask[1, :3] = 0
  mask[2, :8] = 0
  return tokens, mask


def _hf_logits(model, tokens, mask):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()


def _our_logits(cfg, params, tokens, mask):
  z, _ = qwen.forward(cfg, params, tokens, mask)
  return np.asarray(z)


def _copy_checkpoint(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _rewrite_tensors(path, edit):
  """Applies edit(dict name -> array) to model.safetensors in place."""
  f = os.path.join(path, 'model.safetensors')
  tensors = dict(load_file(f))
  edit(tensors)
  save_file(tensors, f, metadata={'format': 'pt'})


def test_loaded_config_matches_the_checkpoint(tiny_qwen2_dir, tiny_qwen2_tied_dir, tiny_qwen3_dir):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  assert (cfg.model_type, cfg.tie, cfg.attention_bias, cfg.qk_norm) == ('qwen2', 'untied', True, False)
  assert params['head']['w'].shape == (cfg.vocab_size, cfg.hidden_size)
  assert params['backbone']['layers']['q_proj']['kernel'].shape == (2, 32, 32)
  assert params['backbone']['layers']['q_proj']['bias'].shape == (2, 32)
  cfg, params = hf.load_pretrained(tiny_qwen2_tied_dir)
  assert cfg.tie == 'tied' and params['head'] == {}
  cfg, params = hf.load_pretrained(tiny_qwen3_dir)
  assert (cfg.model_type, cfg.head_dim, cfg.qk_norm, cfg.attention_bias) == ('qwen3', 12, True, False)
  assert params['backbone']['layers']['q_proj']['kernel'].shape == (2, 32, 48)
  assert params['backbone']['layers']['k_norm'].shape == (2, 12)
  assert 'bias' not in params['backbone']['layers']['q_proj']


def test_kernels_are_transposed_and_stacked(tiny_qwen2_dir):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  raw = load_file(os.path.join(tiny_qwen2_dir, 'model.safetensors'))
  layers = params['backbone']['layers']
  np.testing.assert_array_equal(layers['down_proj']['kernel'][1], raw['model.layers.1.mlp.down_proj.weight'].T)
  np.testing.assert_array_equal(layers['k_proj']['bias'][0], raw['model.layers.0.self_attn.k_proj.bias'])
  np.testing.assert_array_equal(layers['post_attn_norm'][1], raw['model.layers.1.post_attention_layernorm.weight'])
  np.testing.assert_array_equal(params['head']['w'], raw['lm_head.weight'])


def test_round_trip_through_transformers_gives_identical_logits(tiny_checkpoint_dir, load_hf_model, tmp_path):
  cfg, params = hf.load_pretrained(tiny_checkpoint_dir)
  hf.save_pretrained(cfg, params, tmp_path)
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['tie_word_embeddings'] == (cfg.tie == 'tied')
  assert ('lm_head.weight' in load_file(tmp_path / 'model.safetensors')) == (cfg.tie == 'untied')
  tokens, mask = _batch(cfg.vocab_size)
  original = _hf_logits(load_hf_model(tiny_checkpoint_dir), tokens, mask)
  reloaded = _hf_logits(load_hf_model(tmp_path), tokens, mask)
  real = mask == 1
  np.testing.assert_array_equal(reloaded[real], original[real])
  cfg2, params2 = hf.load_pretrained(tmp_path)
  assert cfg2 == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_untie_gives_identical_logits_and_a_separate_head(tiny_qwen2_tied_dir, load_hf_model, tmp_path):
  cfg, params = hf.load_pretrained(tiny_qwen2_tied_dir, tie='untie')
  assert cfg.tie == 'untied' and cfg.untied_from_tied
  w, embed = params['head']['w'], params['backbone']['embed']
  np.testing.assert_array_equal(w, embed)
  assert w.unsafe_buffer_pointer() != embed.unsafe_buffer_pointer()
  tokens, mask = _batch(cfg.vocab_size, seed=1)
  tied_cfg, tied_params = hf.load_pretrained(tiny_qwen2_tied_dir)
  np.testing.assert_array_equal(_our_logits(cfg, params, tokens, mask),
                                _our_logits(tied_cfg, tied_params, tokens, mask))
  # Saved untied, transformers sees two matrices; the logits are still those of the original.
  hf.save_pretrained(cfg, params, tmp_path)
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['tie_word_embeddings'] is False and saved['cfrl_untied_from_tied'] is True
  model = load_hf_model(tmp_path)
  assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
  real = mask == 1
  np.testing.assert_allclose(_hf_logits(model, tokens, mask)[real],
                             _hf_logits(load_hf_model(tiny_qwen2_tied_dir), tokens, mask)[real], atol=0)
  assert hf.load_pretrained(tmp_path)[0].untied_from_tied


def test_auto_keeps_an_untied_checkpoint_and_tied_rejects_it(tiny_qwen2_dir, tiny_qwen3_dir):
  assert hf.load_pretrained(tiny_qwen2_dir, tie='untie')[0].tie == 'untied'
  assert not hf.load_pretrained(tiny_qwen2_dir, tie='untie')[0].untied_from_tied
  assert hf.load_pretrained(tiny_qwen3_dir, tie='tied')[0].tie == 'tied'
  with pytest.raises(ValueError, match='tie_word_embeddings=false'):
    hf.load_pretrained(tiny_qwen2_dir, tie='tied')
  with pytest.raises(ValueError, match='tie='):
    hf.load_pretrained(tiny_qwen2_dir, tie='yes')


def test_bfloat16_params_are_saved_as_bfloat16_and_load_in_transformers(tiny_qwen3_dir, load_hf_model, tmp_path):
  cfg, params = hf.load_pretrained(tiny_qwen3_dir, param_dtype='bfloat16')
  assert params['backbone']['embed'].dtype == np.dtype('bfloat16')
  hf.save_pretrained(cfg, params, tmp_path)
  from safetensors import safe_open
  with safe_open(str(tmp_path / 'model.safetensors'), framework='np') as f:
    assert {f.get_slice(n).get_dtype() for n in f.keys()} == {'BF16'}
  model = load_hf_model(tmp_path)  # upcast to float32 by the fixture: the values are the bf16 ones
  ref = load_hf_model(tiny_qwen3_dir).model.embed_tokens.weight.detach().to(torch.bfloat16).float()
  torch.testing.assert_close(model.model.embed_tokens.weight.detach(), ref, atol=0, rtol=0)


def test_sharded_checkpoint_with_index_loads(tiny_qwen2_dir, load_hf_model, tmp_path):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  hf.save_pretrained(cfg, params, tmp_path, max_shard_bytes=40_000)
  files = sorted(os.listdir(tmp_path))
  shards = [f for f in files if f.endswith('.safetensors')]
  assert len(shards) > 2 and 'model.safetensors' not in files and hf.INDEX_FILE in files
  index = json.load(open(tmp_path / hf.INDEX_FILE))
  assert set(index['weight_map']) == set(hf.hf_tensor_map(cfg, with_head=True))
  cfg2, params2 = hf.load_pretrained(tmp_path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
  tokens, mask = _batch(cfg.vocab_size, seed=2)
  real = mask == 1
  np.testing.assert_array_equal(_hf_logits(load_hf_model(tmp_path), tokens, mask)[real],
                                _hf_logits(load_hf_model(tiny_qwen2_dir), tokens, mask)[real])
  # Saving again unsharded removes the stale shards and index.
  hf.save_pretrained(cfg, params, tmp_path)
  assert sorted(f for f in os.listdir(tmp_path) if 'safetensors' in f) == ['model.safetensors']


def test_missing_tensor_is_named(tiny_qwen2_dir, tmp_path):
  path = _copy_checkpoint(tiny_qwen2_dir, tmp_path / 'ck')
  _rewrite_tensors(path, lambda t: t.pop('model.layers.1.self_attn.v_proj.bias'))
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.self_attn\.v_proj\.bias'.*\(16,\).*model\.safetensors"):
    hf.load_pretrained(path)


def test_wrong_shape_is_named_with_both_shapes(tiny_qwen2_dir, tmp_path):
  path = _copy_checkpoint(tiny_qwen2_dir, tmp_path / 'ck')
  _rewrite_tensors(path, lambda t: t.update({'model.layers.0.mlp.up_proj.weight': np.zeros((65, 32), np.float32)}))
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' in .*model\.safetensors has shape \(65, 32\).*\(64, 32\)"):
    hf.load_pretrained(path)


def test_extra_tensor_is_named(tiny_qwen2_dir, tmp_path):
  path = _copy_checkpoint(tiny_qwen2_dir, tmp_path / 'ck')
  name = 'model.layers.0.mlp.experts.0.gate_proj.weight'
  _rewrite_tensors(path, lambda t: t.update({name: np.zeros((64, 32), np.float32)}))
  with pytest.raises(ValueError, match=rf"unexpected tensor.*'{name}'.*model\.safetensors"):
    hf.load_pretrained(path)


def test_tied_checkpoint_with_a_different_lm_head_is_an_error(tiny_qwen2_tied_dir, tmp_path):
  path = _copy_checkpoint(tiny_qwen2_tied_dir, tmp_path / 'ck')
  same = lambda t: t.update({'lm_head.weight': t['model.embed_tokens.weight'].copy()})
  _rewrite_tensors(path, same)
  hf.load_pretrained(path)  # a redundant copy of the embedding is accepted, as transformers does
  _rewrite_tensors(path, lambda t: t.update({'lm_head.weight': t['lm_head.weight'] + 1}))
  with pytest.raises(ValueError, match='lm_head.weight.*differs'):
    hf.load_pretrained(path)


@pytest.mark.parametrize('config_cls,model_type', [('LlamaConfig', 'llama'), ('Qwen2MoeConfig', 'qwen2_moe')])
def test_unknown_architecture_is_an_error(config_cls, model_type, tiny_qwen2_dir, tmp_path):
  import transformers
  path = _copy_checkpoint(tiny_qwen2_dir, tmp_path / 'ck')
  getattr(transformers, config_cls)(vocab_size=384, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4).save_pretrained(path)
  with pytest.raises(ValueError, match=rf"model_type='{model_type}'.*Qwen2/Qwen2.5/Qwen3"):
    hf.load_pretrained(path)


def test_nonexistent_path_is_neither_local_nor_hub(tmp_path, monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  with pytest.raises(FileNotFoundError, match='neither a local directory nor a reachable Hugging Face hub id'):
    hf.load_pretrained(str(tmp_path / 'no_such_model'))


def test_directory_without_weights_is_an_error(tiny_qwen2_dir, tmp_path):
  shutil.copy(os.path.join(tiny_qwen2_dir, 'config.json'), tmp_path / 'config.json')
  with pytest.raises(ValueError, match='neither model.safetensors nor model.safetensors.index.json'):
    hf.load_pretrained(tmp_path)


def test_save_rejects_params_that_do_not_match_the_config(tiny_qwen2_dir, tmp_path):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  with pytest.raises(ValueError, match="'model.layers.0.mlp.gate_proj.weight' shape"):
    hf.save_pretrained(cfg.replace(intermediate_size=48), params, tmp_path)
  with pytest.raises(ValueError, match='tied'):
    hf.save_pretrained(cfg.replace(tie='tied'), params, tmp_path)


# --- atomic save: an error or a kill leaves the old checkpoint as it was ---------------------
def _tree_bytes(path):
  """relative file path -> bytes, for every file under path."""
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      full = os.path.join(root, f)
      out[os.path.relpath(full, path)] = open(full, 'rb').read()
  return out


def _siblings(path):
  return sorted(f for f in os.listdir(os.path.dirname(path)) if f != os.path.basename(path))


def test_failed_save_leaves_the_old_checkpoint_untouched(tiny_qwen2_dir, tmp_path):
  target = _copy_checkpoint(tiny_qwen2_dir, tmp_path / 'ck')
  before = _tree_bytes(target)
  cfg, params = hf.load_pretrained(target)
  with pytest.raises(ValueError, match="'model.layers.0.mlp.gate_proj.weight' shape"):
    hf.save_pretrained(cfg.replace(intermediate_size=48), params, target)
  # The last shard is the one that fails: the earlier shards were written, into the temporary.
  short_head = {'backbone': params['backbone'], 'head': {'w': params['head']['w'][:-1]}}
  with pytest.raises(ValueError, match="'lm_head.weight' shape"):
    hf.save_pretrained(cfg, short_head, target, max_shard_bytes=40_000)
  assert _tree_bytes(target) == before and _siblings(target) == []
  raw = load_file(os.path.join(tiny_qwen2_dir, 'model.safetensors'))
  _, again = hf.load_pretrained(target)
  np.testing.assert_array_equal(again['backbone']['layers']['up_proj']['kernel'][1],
                                raw['model.layers.1.mlp.up_proj.weight'].T)


def test_save_replaces_weights_and_keeps_the_other_files(tiny_qwen2_dir, tmp_path):
  target = _copy_checkpoint(tiny_qwen2_dir, tmp_path / 'ck')
  before = _tree_bytes(target)
  others = {f for f in before if f not in ('config.json', 'model.safetensors')}
  assert 'tokenizer.json' in others
  mode = os.stat(target).st_mode
  cfg, params = hf.load_pretrained(target)
  doubled = jax.tree_util.tree_map(lambda x: np.asarray(x) * 2, params)
  hf.save_pretrained(cfg, doubled, target, max_shard_bytes=40_000)
  after = _tree_bytes(target)
  assert {f: after[f] for f in others} == {f: before[f] for f in others}
  assert 'model.safetensors' not in after and hf.INDEX_FILE in after
  assert os.stat(target).st_mode == mode and _siblings(target) == []
  raw = load_file(os.path.join(tiny_qwen2_dir, 'model.safetensors'))
  _, loaded = hf.load_pretrained(target)
  np.testing.assert_array_equal(loaded['head']['w'], raw['lm_head.weight'] * 2)


_KILLED_SAVE = r'''
import os, signal, sys, time
import jax, numpy as np
from cfrl_jax.models import hf
mode, target = sys.argv[1:]
cfg, params = hf.load_pretrained(target)
doubled = jax.tree_util.tree_map(lambda x: np.asarray(x) * 2, params)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if mode == 'during_write':    # the parent kills us once the first shard is in the temporary directory
  write = hf._write_tensors
  def slow(*a):
    write(*a)
    print('wrote', flush=True)
    time.sleep(120)
  hf._write_tensors = slow
elif mode == 'after_exchange':   # new checkpoint in place, old one not yet deleted
  exchange = hf._exchange
  def exchange_then_die(a, b):
    assert exchange(a, b)
    die()
  hf._exchange = exchange_then_die
elif mode == 'between_renames':   # the fallback swap: old taken aside, new not yet in place
  hf._exchange = lambda a, b: False
  rename, calls = os.rename, []
  def rename_then_die(a, b):
    calls.append(a)
    if len(calls) == 2:
      die()
    rename(a, b)
  os.rename = rename_then_die
print('saving', flush=True)
hf.save_pretrained(cfg, doubled, target, max_shard_bytes=40_000)
'''


def test_killed_save_leaves_a_loadable_checkpoint(tiny_qwen2_dir, tmp_path):
  """SIGKILL during the write or the swap: the old checkpoint (or, after the swap, the new one) loads."""
  import signal
  import subprocess
  import sys
  script = tmp_path / 'killed_save.py'
  script.write_text(_KILLED_SAVE)
  modes = ('during_write', 'after_exchange', 'between_renames')
  targets = {m: _copy_checkpoint(tiny_qwen2_dir, tmp_path / m / 'ck') for m in modes}
  before = _tree_bytes(targets['during_write'])
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_PLATFORMS='cpu')
  procs = {m: subprocess.Popen([sys.executable, str(script), m, targets[m]], stdout=subprocess.PIPE,
                               text=True, env=env) for m in modes}
  assert procs['during_write'].stdout.readline() == 'saving\n'
  assert procs['during_write'].stdout.readline() == 'wrote\n'
  assert any('.tmp-' in f for f in _siblings(targets['during_write']))   # killed mid-save, for sure
  procs['during_write'].kill()
  for m, p in procs.items():
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL, m

  raw = load_file(os.path.join(tiny_qwen2_dir, 'model.safetensors'))
  embed = raw['model.embed_tokens.weight']
  # Killed while writing: the old checkpoint, byte for byte; the next save clears the leftover.
  target = targets['during_write']
  assert _tree_bytes(target) == before
  assert [f.split('.tmp-')[0] for f in _siblings(target)] == ['ck']
  np.testing.assert_array_equal(hf.load_pretrained(target)[1]['backbone']['embed'], embed)
  # Killed after the exchange: the new checkpoint is complete; the old one waits in the temporary.
  target = targets['after_exchange']
  np.testing.assert_array_equal(hf.load_pretrained(target)[1]['backbone']['embed'], embed * 2)
  assert _tree_bytes(target)['tokenizer.json'] == before['tokenizer.json']
  # Killed between the fallback's two renames: no `ck`, the old checkpoint whole in ck.old-<hex>.
  target = targets['between_renames']
  assert not os.path.exists(target)
  with pytest.raises(FileNotFoundError, match=r'ck\.old-[0-9a-f]{8} is the complete previous checkpoint'):
    hf.load_pretrained(target)
  (aside,) = [os.path.join(os.path.dirname(target), f) for f in _siblings(target) if '.old-' in f]
  assert _tree_bytes(aside) == before
  # The next save puts the old one back first, then replaces it; nothing is left beside it.
  cfg, params = hf.load_pretrained(aside)
  for target in targets.values():
    hf.save_pretrained(cfg, jax.tree_util.tree_map(lambda x: np.asarray(x) * 3, params), target)
    assert _siblings(target) == []
    np.testing.assert_array_equal(hf.load_pretrained(target)[1]['backbone']['embed'], embed * 3)
    assert _tree_bytes(target)['tokenizer.json'] == before['tokenizer.json']


# --- unreadable files are errors that name the file -----------------------------------------
@pytest.mark.parametrize('keep', [0, 20, 0.5])
def test_truncated_or_empty_safetensors_names_the_file(keep, tiny_qwen2_dir, tmp_path):
  path = _copy_checkpoint(tiny_qwen2_dir, tmp_path / 'ck')
  f = os.path.join(path, 'model.safetensors')
  data = open(f, 'rb').read()
  open(f, 'wb').write(data[:int(keep * len(data)) if isinstance(keep, float) else keep])
  with pytest.raises(ValueError, match=rf'{f} \(\d+ bytes\) is not a readable safetensors file.*truncated'):
    hf.load_pretrained(path)


def test_truncated_shard_names_the_shard(tiny_qwen2_dir, tmp_path):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  hf.save_pretrained(cfg, params, tmp_path, max_shard_bytes=40_000)
  shard = str(tmp_path / 'model-00002-of-00004.safetensors')
  data = open(shard, 'rb').read()
  open(shard, 'wb').write(data[:-100])
  with pytest.raises(ValueError, match=rf'{shard} .* not a readable safetensors file'):
    hf.load_pretrained(tmp_path)


@pytest.mark.parametrize('fname', ['config.json', hf.INDEX_FILE])
def test_invalid_json_names_the_file(fname, tiny_qwen2_dir, tmp_path):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  hf.save_pretrained(cfg, params, tmp_path, max_shard_bytes=40_000)
  f = str(tmp_path / fname)
  text = open(f).read()
  open(f, 'w').write(text[:len(text) // 2])
  with pytest.raises(ValueError, match=rf'{f} is not valid JSON \(.*line \d+'):
    hf.load_pretrained(tmp_path)


def test_config_without_a_needed_field_names_field_and_file(tiny_qwen2_dir, tmp_path):
  path = _copy_checkpoint(tiny_qwen2_dir, tmp_path / 'ck')
  config = os.path.join(path, 'config.json')
  d = json.load(open(config))
  del d['num_attention_heads']
  json.dump(d, open(config, 'w'))
  with pytest.raises(ValueError, match=rf"{config} has no 'num_attention_heads' field"):
    hf.load_pretrained(path)
  d['num_attention_heads'] = 'four'
  json.dump(d, open(config, 'w'))
  with pytest.raises(ValueError, match=rf'{config} has a field of the wrong type'):
    hf.load_pretrained(path)


def test_save_into_the_working_directory_is_refused(tiny_qwen2_dir, tmp_path, monkeypatch):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match='is the working directory; save into a subdirectory'):
    hf.save_pretrained(cfg, params, '.')
  assert os.listdir(tmp_path) == []
