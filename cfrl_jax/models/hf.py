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

Saving is atomic. save_pretrained writes the whole new checkpoint into `<path>.tmp-<hex>` beside
the target (same filesystem), fsyncs every file, copies over (hard links) the target's other files
(tokenizer, generation config, ...), and only then swaps the two directories with one
renameat2(RENAME_EXCHANGE): at every instant `path` holds either the complete old checkpoint or
the complete new one, so neither an error (bad params, disk full) nor a kill (SIGKILL, power loss
after the fsyncs) can leave a mixed or half-written directory. The old files, now in the temporary
directory, are deleted last. Where the filesystem cannot exchange (non-Linux, some network
filesystems) the swap is two renames, `path` -> `<path>.old-<hex>` and the new one -> `path`; a kill
between them leaves no `path` but the complete old checkpoint in `<path>.old-<hex>`, which the
next save_pretrained moves back before it starts and load_pretrained names in its error. A killed
save can leave a `<path>.tmp-<hex>` directory; the next save to the same path removes it (so: one
writer per path at a time).

Unreadable input is an error that names the file: a truncated or empty *.safetensors file, a
config.json or index that is not JSON, a config.json without a field the architecture needs.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import secrets
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from cfrl_jax.models.qwen import Params, QwenConfig

CONFIG_FILE = 'config.json'
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
TIE_MODES = ('auto', 'tied', 'untie')
# Non-parameter buffers that some older exports still carry; HF ignores them too.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)
# Beside the target: `<path>.tmp-<hex>` holds a save in progress, `<path>.old-<hex>` the old checkpoint
# during the two-rename fallback swap.
TMP_INFIX, OLD_INFIX = '.tmp-', '.old-'
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
  aside = _aside_dirs(path)
  if aside:
    raise FileNotFoundError(
        f'{path} does not exist, but {aside[-1]} does: a save_pretrained into {path} was killed in '
        f'the middle of its two-rename swap, and {aside[-1]} is the complete previous checkpoint. '
        f'Rename it back (mv {aside[-1]} {path}) or save into {path} again (which does that first).')
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
    index = _read_json(index_path, 'the shard index of a sharded checkpoint')
    weight_map = index.get('weight_map') if isinstance(index, dict) else None
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
    with _open_safetensors(single_path) as f:
      return {name: single_path for name in f.keys()}
  found = sorted(os.listdir(ckpt_dir))
  raise ValueError(
      f'{ckpt_dir} has neither {SINGLE_FILE} nor {INDEX_FILE} (found: {found}). cfrl_jax reads '
      'safetensors only; convert *.bin checkpoints with transformers (save_pretrained) first.')


def _read_json(path: str, what: str):
  """json.load of `path`; an unreadable or non-JSON file is a ValueError that names it."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
    raise ValueError(f'{path} is not valid JSON ({e}); it should hold {what}. The file is truncated or '
                     'was edited by hand: restore it from the original checkpoint.') from None


@contextlib.contextmanager
def _open_safetensors(path: str):
  """safe_open(path) whose errors (truncated, empty, not safetensors) name the file."""
  try:
    with safe_open(path, framework='np') as f:
      yield f
  except SafetensorError as e:
    raise _unreadable(path, e) from None


def _unreadable(path: str, e: Exception) -> ValueError:
  size = os.path.getsize(path) if os.path.exists(path) else 'no'
  return ValueError(f'{path} ({size} bytes) is not a readable safetensors file ({e}); it is truncated, '
                    'empty or corrupt (an interrupted download or copy?). Download or save the checkpoint again.')


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
  cfg = _config_from_file(config_path, dtype=dtype, param_dtype=param_dtype)
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
    with _open_safetensors(fpath) as f:
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


def _config_from_file(config_path: str, **overrides) -> QwenConfig:
  """QwenConfig of a config.json; every problem with the file is a ValueError that names it."""
  d = _read_json(config_path, 'a transformers model config')
  if not isinstance(d, dict):
    raise ValueError(f'{config_path} holds a JSON {type(d).__name__}, not the object of a transformers '
                     'model config.')
  try:
    return QwenConfig.from_hf_dict(d, **overrides)
  except KeyError as e:
    raise ValueError(f'{config_path} has no {e.args[0]!r} field, which a {d.get("model_type", "Qwen")} '
                     'config needs; restore the config.json that came with the checkpoint.') from None
  except (TypeError, ValueError, ZeroDivisionError) as e:
    raise ValueError(f'{config_path}: {e}' if isinstance(e, ValueError) else
                     f'{config_path} has a field of the wrong type or value ({type(e).__name__}: {e}); '
                     'compare it with the config.json that came with the checkpoint.') from None


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
  Atomic (see the module docstring): everything is written and checked in `<path>.tmp-<hex>`, then
  swapped in; on any error, or a kill, `path` still holds its old checkpoint, untouched. Other files
  in `path` (tokenizer, ...) are kept; old weight files and index are replaced.
  """
  path = os.path.realpath(os.fspath(path))
  if cfg.tie == 'tied' and params.get('head'):
    raise ValueError('cfg.tie="tied" but params["head"] is not empty; a tied model has no head of its '
                     'own. Save with cfg.replace(tie="untied") to keep the separate head.')
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'{path} is a file; save_pretrained writes a checkpoint directory. Pass a directory path.')
  if path == os.path.realpath(os.getcwd()):
    # The swap would leave this process in the old, deleted directory.
    raise ValueError(f'{path} is the working directory; save into a subdirectory of it instead.')
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

  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  _recover_interrupted_swap(path)
  tmp = f'{path}{TMP_INFIX}{secrets.token_hex(4)}'
  os.mkdir(tmp)   # mode from the umask, as a directory made by os.makedirs would get
  try:
    metadata = {'format': 'pt'}
    if len(shards) == 1:
      _write_tensors({n: hf_tensor(n) for n in shards[0]}, os.path.join(tmp, SINGLE_FILE), metadata)
    else:
      weight_map = {}
      for k, names in enumerate(shards):
        fname = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
        _write_tensors({n: hf_tensor(n) for n in names}, os.path.join(tmp, fname), metadata)
        weight_map.update({n: fname for n in names})
      _write_json({'metadata': {'total_size': sum(sizes.values())}, 'weight_map': weight_map},
                  os.path.join(tmp, INDEX_FILE))
    _write_json(cfg.to_hf_dict(), os.path.join(tmp, CONFIG_FILE))
    if os.path.isdir(path):
      _carry_other_files(path, tmp)
      os.chmod(tmp, os.stat(path).st_mode & 0o7777)
    _fsync(tmp)
    _swap_into_place(tmp, path)
  finally:
    # After the swap `tmp` holds the old checkpoint; before it (an error), the unfinished new one.
    shutil.rmtree(tmp, ignore_errors=True)


def _is_weight_file(fname: str) -> bool:
  return (fname.startswith('model') and fname.endswith('.safetensors')) or fname in (INDEX_FILE, CONFIG_FILE)


def _write_tensors(tensors: dict[str, np.ndarray], fpath: str, metadata: dict) -> None:
  save_file(tensors, fpath, metadata)
  _fsync(fpath)


def _write_json(obj, fpath: str) -> None:
  with open(fpath, 'w') as f:
    json.dump(obj, f, indent=2)
    f.flush()
    os.fsync(f.fileno())


def _fsync(path: str) -> None:
  """Flushes a file's data, or a directory's entries, to the disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _carry_other_files(old: str, new: str) -> None:
  """Hard-links (or copies) what `old` holds besides weights, index and config.json into `new`."""
  for fname in os.listdir(old):
    if _is_weight_file(fname):
      continue
    src, dst = os.path.join(old, fname), os.path.join(new, fname)
    if os.path.isdir(src) and not os.path.islink(src):
      shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
      _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
  if os.path.islink(src):
    os.symlink(os.readlink(src), dst)
    return
  try:
    os.link(src, dst)
  except OSError:   # another filesystem, or one without hard links
    shutil.copy2(src, dst)


def _swap_into_place(new: str, path: str) -> None:
  """Puts directory `new` at `path`; afterwards `new` holds what `path` held, or is gone if nothing."""
  parent = os.path.dirname(path)
  if not os.path.exists(path):
    os.rename(new, path)
  elif not _exchange(new, path):
    aside = f'{path}{OLD_INFIX}{secrets.token_hex(4)}'
    os.rename(path, aside)
    try:
      os.rename(new, path)
    except BaseException:
      os.rename(aside, path)
      raise
    os.rename(aside, new)
  _fsync(parent)


_HEX8 = '[0-9a-f]' * 8


def _aside_dirs(path: str) -> list[str]:
  """`<path>.old-<hex>` directories, oldest first."""
  return sorted(glob.glob(glob.escape(path) + OLD_INFIX + _HEX8), key=os.path.getmtime)


def _recover_interrupted_swap(path: str) -> None:
  """Undoes what a save killed inside the fallback swap left behind, and removes stale temporaries."""
  aside = _aside_dirs(path)
  if aside and not os.path.exists(path):
    os.rename(aside.pop(), path)   # the complete old checkpoint, taken aside just before the kill
  for stale in aside + glob.glob(glob.escape(path) + TMP_INFIX + _HEX8):
    shutil.rmtree(stale, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
try:
  _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (OSError, AttributeError, TypeError):   # not Linux / glibc < 2.28
  _renameat2 = None


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two existing paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
  if _renameat2 is None:
    return False
  if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), a, None, b)
