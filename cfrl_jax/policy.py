"""A policy = model config + tokenizer + how to stop.

How a run obtains one (pretrained weights, the from-scratch pretraining recipe or a random init, as
`config.model.source` says) is cfrl_jax/run_setup.py's load_policy: it sits above the pretraining
recipe, which itself builds policies with make_policy and arch_config.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from cfrl_jax import tokenization
from cfrl_jax.models import qwen


@dataclasses.dataclass(frozen=True)
class Policy:
  cfg: qwen.QwenConfig
  tokenizer: Any
  stop_ids: tuple[int, ...]
  pad_id: int
  chat_template: bool = False
  system_prompt: str | None = None


def make_policy(cfg: qwen.QwenConfig, tokenizer, task=None) -> Policy:
  """The task decides whether prompts go through the tokenizer's chat template."""
  return Policy(cfg=cfg, tokenizer=tokenizer,
                stop_ids=tuple(tokenization.stop_ids(tokenizer, cfg)),
                pad_id=int(tokenization.pad_id(tokenizer)),
                chat_template=bool(task is not None and task.use_chat_template),
                system_prompt=(task.system_prompt or None) if task is not None and task.use_chat_template else None)


def arch_config(config, vocab_size: int, eos_ids, pad_id) -> qwen.QwenConfig:
  a = config.model.arch
  return qwen.QwenConfig(
      vocab_size=vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
      num_layers=a.num_layers, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
      head_dim=a.head_dim or a.hidden_size // a.num_heads, model_type=a.model_type,
      rope_theta=a.rope_theta, qk_norm=a.model_type == 'qwen3',
      attention_bias=a.model_type == 'qwen2', tie='tied' if a.tied else 'untied',
      max_position_embeddings=a.max_position_embeddings,
      eos_token_id=tuple(eos_ids), pad_token_id=pad_id,
      dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat)
