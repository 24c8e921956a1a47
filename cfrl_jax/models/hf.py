"""Hugging Face checkpoints <-> cfrl_jax parameter trees (safetensors, no torch at run time).

    cfg, params = load_pretrained('Qwen/Qwen2.5-0.5B-Instruct', tie='untie')   # or a local directory
    save_pretrained(cfg, params, 'runs/x/hf')   # transformers.AutoModelForCausalLM.from_pretrained loads it

Name map (torch kernels are (out, in); ours are (in, out), stacked over layers on axis 0):

    model.embed_tokens.weight                        backbone/embed (V, d)
    model.norm.weight                                backbone/final_norm (d,)
    model.layers.{i}.input_layernorm.weight          backbone/layers/input_norm[i]
    model.layers.{i}.post_attention_layernorm.weight backbone/layers/post_attn_norm[i]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight backbone/layers/{q,k,v,o}_proj/kernel[i]  (transposed)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.bias   backbone/layers/{q,k,v,o}_proj/bias[i]
    model.layers.{i}.self_attn.{q,k}_norm.weight     backbone/layers/{q,k}_norm[i]             (Qwen3)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight  backbone/layers/{gate,up,down}_proj/kernel[i] (transposed)
    lm_head.weight                                   head/w (V, d)                              (untied only)
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from cfrl_jax.models.qwen import Params, QwenConfig

CONFIG_FILE = 'config.json'
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
TIE_MODES = ('auto', 'tied', 'untie')
# Non-parameter buffers that some older exports still carry; HF ignores them too.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)
_NUMPY_DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16,
                 'float16': np.float16, 'float64': np.float64}


class _Slot(NamedTuple):
  """Where one HF tensor goes: tree path, layer index (None if not stacked), transpose?, HF shape."""
  path: tuple[str, ...]
  layer: int | None
  transpose: bool
  shape: tuple[int, ...]


def _layer_tensors(cfg: QwenConfig) -> list[tuple[str, tuple[str, ...], bool, tuple[int, ...]]]:
  """(HF suffix after 'model.layers.{i}.', tree path under layers, transpose, HF shape) for one layer."""
  d, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  qd, kvd = cfg.num_heads * hd, cfg.num_kv_heads * hd
  out = [
      ('input_layernorm.weight', ('input_norm',), False, (d,)),
      ('post_attention_layernorm.weight', ('post_attn_norm',), False, (d,)),
      ('self_attn.q_proj.weight', ('q_proj', 'kernel'), True, (qd, d)),
      ('self_attn.k_proj.weight', ('k_proj', 'kernel'), True, (kvd, d)),
      ('self_attn.v_proj.weight', ('v_proj', 'kernel'), True, (kvd, d)),
      ('self_attn.o_proj.weight', ('o_proj', 'kernel'), True, (d, qd)),
      ('mlp.gate_proj.weight', ('gate_proj', 'kernel'), True, (F, d)),
      ('mlp.up_proj.weight', ('up_proj', 'kernel'), True, (F, d)),
      ('mlp.down_proj.weight', ('down_proj', 'kernel'), True, (d, F)),
  ]
  if cfg.attention_bias:
    out += [('self_attn.q_proj.bias', ('q_proj', 'bias'), False, (qd,)),
            ('self_attn.k_proj.bias', ('k_proj', 'bias'), False, (kvd,)),
            ('self_attn.v_proj.bias', ('v_proj', 'bias'), False, (kvd,))]
  if cfg.o_bias:
    out.append(('self_attn.o_proj.bias', ('o_proj', 'bias'), False, (d,)))
  if cfg.qk_norm:
    out += [('self_attn.q_norm.weight', ('q_norm',), False, (hd,)),
            ('self_attn.k_norm.weight', ('k_norm',), False, (hd,))]
  return out


def hf_tensor_map(cfg: QwenConfig, with_head: bool) -> dict[str, _Slot]:
  """Every HF tensor name the architecture has -> where it lives in our tree."""
  V, d = cfg.vocab_size, cfg.hidden_size
  slots = {
      'model.embed_tokens.weight': _Slot(('backbone', 'embed'), None, False, (V, d)),
      'model.norm.weight': _Slot(('backbone', 'final_norm'), None, False, (d,)),
  }
  for i in range(cfg.num_layers):
    for suffix, path, transpose, shape in _layer_tensors(cfg):
      slots[f'model.layers.{i}.{suffix}'] = _Slot(('backbone', 'layers') + path, i, transpose, shape)
  if with_head:
    slots['lm_head.weight'] = _Slot(('head', 'w'), None, False, (V, d))
  return slots


# --- locating a checkpoint ----------------------------------------------------
def resolve_checkpoint_dir(path: str | os.PathLike) -> str:
  """A local directory as is; anything else is tried as a Hugging Face hub id (snapshot_download)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise ValueError(f'{path!r} is a file; pass the checkpoint directory that holds config.json '
                     'and the *.safetensors files.')
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(
        path, allow_patterns=['*.json', '*.safetensors', '*.jinja', '*.txt', '*.model'])
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f'{path!r} is neither a local directory nor a reachable Hugging Face hub id '
        f'({type(e).__name__}: {e}). Pass a directory holding config.json + model.safetensors, '
        'or a hub id such as "Qwen/Qwen2.5-0.5B-Instruct" on a machine with network access '
        '(or with the model in the local HF cache).') from e


def _tensor_files(ckpt_dir: str) -> dict[str, str]:
  """HF tensor name -> file (absolute path) for a single-file or an indexed (sharded) checkpoint."""
  index_path = os.path.join(ckpt_dir, INDEX_FILE)
  single_path = os.path.join(ckpt_dir, SINGLE_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index_path} has no "weight_map" object.')
    out = {}
    for name, fname in weight_map.items():
      fpath = os.path.join(ckpt_dir, fname)
      if not os.path.exists(fpath):
        raise ValueError(f'{index_path} maps {name!r} to {fname!r}, which does not exist in {ckpt_dir}.')
      out[name] = fpath
    return out
  if os.path.exists(single_path):
    with safe_open(single_path, framework='np') as f:
      return {name: single_path for name in f.keys()}
  found = sorted(os.listdir(ckpt_dir))
  raise ValueError(
      f'{ckpt_dir} has neither {SINGLE_FILE} nor {INDEX_FILE} (found: {found}). cfrl_jax reads '
      'safetensors only; convert *.bin checkpoints with transformers (save_pretrained) first.')


# --- loading ------------------------------------------------------------------
def load_pretrained(path: str | os.PathLike, *, tie: str = 'auto', dtype: str = 'float32',
                    param_dtype: str = 'float32') -> tuple[QwenConfig, Params]:
  """Reads a Qwen2/2.5/3 HF checkpoint into (QwenConfig, params).

  path: a local directory (config.json + model.safetensors, or shards + model.safetensors.index.json)
    or a hub id (downloaded with huggingface_hub where the network allows).
  tie: 'auto' keeps the checkpoint's tie_word_embeddings; 'untie' gives a tied checkpoint its own
    head {'w': copy of the embedding} (cfg.untied_from_tied=True, same logits); 'tied' requires a
    tied checkpoint.
  dtype / param_dtype: compute and storage dtypes of the returned config / arrays.
  Every tensor is checked: a missing, unexpected or mis-shaped one raises ValueError naming it.
  """
  if tie not in TIE_MODES:
    raise ValueError(f'tie={tie!r}; expected one of {TIE_MODES}.')
  ckpt_dir = resolve_checkpoint_dir(path)
  config_path = os.path.join(ckpt_dir, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise ValueError(f'{ckpt_dir} has no {CONFIG_FILE}; it is not a transformers checkpoint directory.')
  with open(config_path) as f:
    cfg = QwenConfig.from_hf_dict(json.load(f), dtype=dtype, param_dtype=param_dtype)
  if tie == 'tied' and cfg.tie != 'tied':
    raise ValueError(f'tie="tied" but {config_path} has tie_word_embeddings=false (an untied head); '
                     'load it with tie="auto".')

  files = _tensor_files(ckpt_dir)
  slots = hf_tensor_map(cfg, with_head=cfg.tie == 'untied')
  unexpected = sorted(n for n in files if n not in slots and not n.endswith(_IGNORED_SUFFIXES)
                      and not (cfg.tie == 'tied' and n == 'lm_head.weight'))
  if unexpected:
    raise ValueError(
        f'{len(unexpected)} unexpected tensor(s) for a dense {cfg.model_type} model, e.g. '
        f'{unexpected[0]!r} in {files[unexpected[0]]} (all: {unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}). '
        'MoE experts, vision towers or other extras are not supported.')
  missing = [n for n in slots if n not in files]
  if missing:
    where = sorted(set(files.values())) or [ckpt_dir]
    raise ValueError(f'missing tensor {missing[0]!r} (expected shape {slots[missing[0]].shape}) in '
                     f'{", ".join(where)} ({len(missing)} missing in all: {missing[:8]}).')

  np_dtype = _NUMPY_DTYPES[param_dtype]
  tree: dict[str, Any] = {}
  by_file: dict[str, list[str]] = {}
  for name, fpath in files.items():
    by_file.setdefault(fpath, []).append(name)
  tied_head = None
  for fpath, names in by_file.items():
    with safe_open(fpath, framework='np') as f:
      for name in names:
        if name.endswith(_IGNORED_SUFFIXES):
          continue
        found = tuple(f.get_slice(name).get_shape())
        if name == 'lm_head.weight' and cfg.tie == 'tied':
          tied_head = (f.get_tensor(name), fpath)
          continue
        slot = slots[name]
        if found != slot.shape:
          raise ValueError(f'tensor {name!r} in {fpath} has shape {found}; the config in {config_path} '
                           f'implies {slot.shape}.')
        _place(tree, cfg, slot, f.get_tensor(name), np_dtype)

  backbone = tree['backbone']
  if tied_head is not None:
    # Some exports store lm_head even when tied; HF ignores it, and so do we, unless it disagrees.
    head_w, fpath = tied_head
    if head_w.shape != backbone['embed'].shape or not np.array_equal(
        head_w.astype(np_dtype), backbone['embed']):
      raise ValueError(f'{config_path} says tie_word_embeddings=true but lm_head.weight in {fpath} '
                       'differs from model.embed_tokens.weight; fix the config (set it to false).')
  params = {'backbone': backbone, 'head': tree.get('head', {})}
  params = jax.tree_util.tree_map(jnp.asarray, params)
  if tie == 'untie' and cfg.tie == 'tied':
    params = {'backbone': params['backbone'], 'head': {'w': jnp.array(params['backbone']['embed'], copy=True)}}
    cfg = cfg.replace(tie='untied', untied_from_tied=True)
  return cfg, params


def _place(tree: dict, cfg: QwenConfig, slot: _Slot, value: np.ndarray, np_dtype) -> None:
  """Writes one HF tensor into the nested numpy tree, allocating stacked (L, ...) arrays lazily."""
  node = tree
  for key in slot.path[:-1]:
    node = node.setdefault(key, {})
  value = value.T if slot.transpose else value
  if slot.layer is None:
    node[slot.path[-1]] = np.ascontiguousarray(value, dtype=np_dtype)
    return
  leaf = node.get(slot.path[-1])
  if leaf is None:
    leaf = node[slot.path[-1]] = np.empty((cfg.num_layers,) + value.shape, np_dtype)
  leaf[slot.layer] = value


# --- saving -------------------------------------------------------------------
def save_pretrained(cfg: QwenConfig, params: Params, path: str | os.PathLike, *,
                    max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes config.json + model.safetensors (or shards + index) that transformers loads.

  Tied models store no lm_head (tie_word_embeddings=true); untied ones store lm_head.weight.
  Tensors are written in cfg.param_dtype. Checkpoints larger than max_shard_bytes are split
  into model-0000k-of-0000n.safetensors files with a model.safetensors.index.json.
  """
  path = os.fspath(path)
  if cfg.tie == 'tied' and params.get('head'):
    raise ValueError('cfg.tie="tied" but params["head"] is not empty; a tied model has no head of its '
                     'own. Save with cfg.replace(tie="untied") to keep the separate head.')
  os.makedirs(path, exist_ok=True)
  np_dtype = _NUMPY_DTYPES[cfg.param_dtype]
  slots = hf_tensor_map(cfg, with_head=cfg.tie == 'untied')

  def hf_tensor(name: str) -> np.ndarray:
    slot = slots[name]
    node = params
    try:
      for key in slot.path:
        node = node[key]
    except (KeyError, TypeError) as e:
      raise ValueError(f'params has no {"/".join(slot.path)} (needed for {name!r}); the params do '
                       'not belong to this config.') from e
    x = node if slot.layer is None else node[slot.layer]
    x = np.asarray(jax.device_get(x)).astype(np_dtype, copy=False)
    x = x.T if slot.transpose else x
    if x.shape != slot.shape:
      raise ValueError(f'parameter {"/".join(slot.path)} gives {name!r} shape {x.shape}; cfg implies '
                       f'{slot.shape}. The params do not belong to this config.')
    return np.ascontiguousarray(x)

  sizes = {name: int(np.prod(s.shape)) * np.dtype(np_dtype).itemsize for name, s in slots.items()}
  shards: list[list[str]] = [[]]
  shard_bytes = 0
  for name in slots:
    if shards[-1] and shard_bytes + sizes[name] > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(name)
    shard_bytes += sizes[name]

  # Remove stale weights of an earlier save with a different sharding.
  for fname in os.listdir(path):
    if (fname.startswith('model') and fname.endswith('.safetensors')) or fname == INDEX_FILE:
      os.remove(os.path.join(path, fname))
  metadata = {'format': 'pt'}
  if len(shards) == 1:
    save_file({n: hf_tensor(n) for n in shards[0]}, os.path.join(path, SINGLE_FILE), metadata)
  else:
    weight_map = {}
    for k, names in enumerate(shards):
      fname = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
      save_file({n: hf_tensor(n) for n in names}, os.path.join(path, fname), metadata)
      weight_map.update({n: fname for n in names})
    with open(os.path.join(path, INDEX_FILE), 'w') as f:
      json.dump({'metadata': {'total_size': sum(sizes.values())}, 'weight_map': weight_map}, f, indent=2)
  with open(os.path.join(path, CONFIG_FILE), 'w') as f:
    json.dump(cfg.to_hf_dict(), f, indent=2)
