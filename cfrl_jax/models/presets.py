"""Full shapes of public Qwen models, so a plan (cfrl_jax/plan.py) needs no download.

Each preset is the architecture part of the model's transformers config.json (the Instruct
release where there is one: the shapes are the base model's too; only max_position_embeddings of
Qwen2.5-1.5B / 7B base differs, 131072, which no compiled shape depends on). It goes through
`QwenConfig.from_hf_dict`, the same parser a real checkpoint goes through.

    cfg = presets.config('qwen2.5-1.5b', dtype='bfloat16')
    presets.resolve('Qwen/Qwen2.5-1.5B-Instruct')   # -> 'qwen2.5-1.5b' (a hub id it recognises)
    presets.resolve('preset:qwen3-8b')              # -> 'qwen3-8b'
"""
from __future__ import annotations

import re

from cfrl_jax.models.qwen import QwenConfig

PREFIX = 'preset:'


def _qwen2(hidden, intermediate, layers, heads, kv_heads, vocab, tied, max_pos=32768):
  return {'model_type': 'qwen2', 'hidden_size': hidden, 'intermediate_size': intermediate,
          'num_hidden_layers': layers, 'num_attention_heads': heads, 'num_key_value_heads': kv_heads,
          'vocab_size': vocab, 'tie_word_embeddings': tied, 'rope_theta': 1_000_000.0,
          'max_position_embeddings': max_pos, 'rms_norm_eps': 1e-6, 'hidden_act': 'silu'}


def _qwen3(hidden, intermediate, layers, heads, kv_heads, tied):
  return {'model_type': 'qwen3', 'hidden_size': hidden, 'intermediate_size': intermediate,
          'num_hidden_layers': layers, 'num_attention_heads': heads, 'num_key_value_heads': kv_heads,
          'head_dim': 128, 'vocab_size': 151936, 'tie_word_embeddings': tied, 'rope_theta': 1_000_000.0,
          'max_position_embeddings': 40960, 'rms_norm_eps': 1e-6, 'attention_bias': False,
          'hidden_act': 'silu'}


# config.json values (hidden, intermediate, layers, heads, kv heads, [vocab,] tied).
PRESETS: dict[str, dict] = {
    'qwen2.5-0.5b': _qwen2(896, 4864, 24, 14, 2, 151936, True),
    'qwen2.5-1.5b': _qwen2(1536, 8960, 28, 12, 2, 151936, True),
    'qwen2.5-7b': _qwen2(3584, 18944, 28, 28, 4, 152064, False),
    'qwen3-0.6b': _qwen3(1024, 3072, 28, 16, 8, True),
    'qwen3-1.7b': _qwen3(2048, 6144, 28, 16, 8, True),
    'qwen3-4b': _qwen3(2560, 9728, 36, 32, 8, True),
    'qwen3-8b': _qwen3(4096, 12288, 36, 32, 8, False),
}

# Hub ids map to a preset by their model name: 'Qwen/Qwen2.5-1.5B-Instruct' -> 'qwen2.5-1.5b'.
_RELEASE_SUFFIX = re.compile(r'-(instruct|base)$')


def resolve(path: str) -> str | None:
  """The preset a model path names: 'preset:<name>', a preset name, or a hub id of one of the
  presets' models (any '-Instruct' / '-Base' release); None for anything else (a local directory).
  'preset:' with an unknown name is an error listing the presets."""
  path = str(path).strip()
  if path.startswith(PREFIX):
    name = path[len(PREFIX):].lower()
    if name not in PRESETS:
      raise ValueError(f'unknown model preset {name!r}; presets: {sorted(PRESETS)}.')
    return name
  name = _RELEASE_SUFFIX.sub('', path.rsplit('/', 1)[-1].lower())
  if name in PRESETS and (path.count('/') == 0 or path.lower().startswith('qwen/')):
    return name
  return None


def config(name: str, **overrides) -> QwenConfig:
  """The preset's QwenConfig (dtype, param_dtype, remat, ... as overrides)."""
  key = resolve(name) or resolve(PREFIX + name)
  return QwenConfig.from_hf_dict(dict(PRESETS[key]), **overrides)


def non_embedding_params(cfg: QwenConfig) -> int:
  """Parameters in the decoder layers and the final norm (not the embedding nor the head)."""
  d, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  per_layer = d * (q + 2 * kv) + q * d + 3 * d * F + 2 * d
  per_layer += (q + 2 * kv) if cfg.attention_bias else 0
  per_layer += d if cfg.o_bias else 0
  per_layer += 2 * hd if cfg.qk_norm else 0
  return cfg.num_layers * per_layer + d
