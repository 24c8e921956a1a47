"""A policy = model config + tokenizer + how to stop; and how a run obtains one.

`config.model.source` chooses where the weights come from:
  'pretrained'  an HF directory or hub id (`config.model.path`), e.g. Qwen2.5-1.5B-Instruct;
  'pretrain'    a tiny Qwen2-architecture model pretrained from scratch on the task's
                multi-format corpus (the Echo Chamber recipe), cached by its config;
  'init'        random weights of `config.model.arch` (tests, smoke runs).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from cfrl_jax import tokenization
from cfrl_jax.models import hf, qwen


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


def load_policy(config, task=None) -> tuple[Policy, Any]:
  """(policy, params) as `config.model.source` says; see the module docstring."""
  source = config.model.source
  if source == 'pretrained':
    if not config.model.path:
      raise ValueError("config.model.source='pretrained' needs config.model.path (an HF directory or hub id).")
    cfg, params = hf.load_pretrained(config.model.path, tie=config.model.tie, dtype=config.model.dtype,
                                     param_dtype=config.model.param_dtype)
    cfg = cfg.replace(remat=config.model.remat)
    tokenizer = tokenization.load_tokenizer(config.tokenizer.path or config.model.path)
    return make_policy(cfg, tokenizer, task), params
  if source == 'pretrain':
    from cfrl_jax.train import pretrain  # the from-scratch recipe needs the task
    if task is None:
      raise ValueError("config.model.source='pretrain' needs the task whose corpus it pretrains on.")
    path = pretrain.pretrained_base(config, task)
    cfg, params = hf.load_pretrained(path, tie=config.model.tie, dtype=config.model.dtype,
                                     param_dtype=config.model.param_dtype)
    cfg = cfg.replace(remat=config.model.remat)
    return make_policy(cfg, tokenization.load_tokenizer(path), task), params
  if source == 'init':
    if not config.tokenizer.path:
      raise ValueError("config.model.source='init' needs config.tokenizer.path (a tokenizer directory).")
    tokenizer = tokenization.load_tokenizer(config.tokenizer.path)
    cfg = arch_config(config, len(tokenizer), tokenization.stop_ids(tokenizer, None),
                      tokenization.pad_id(tokenizer))
    params = qwen.init_params(cfg, jax.random.PRNGKey(config.seed))
    if config.model.tie == 'untie':
      cfg, params = qwen.untie(cfg, params)
    return make_policy(cfg, tokenizer, task), params
  raise ValueError(f"config.model.source={source!r}; expected 'pretrained', 'pretrain' or 'init'.")
