"""Shared fixtures: tiny random Qwen checkpoints and a tiny tokenizer, built offline in tmp dirs.

Every checkpoint directory is a complete transformers model directory (config.json,
model.safetensors, tokenizer files) written by transformers itself, so
`AutoModelForCausalLM.from_pretrained(d)` and `AutoTokenizer.from_pretrained(d)` both work
without network access. Weights are re-drawn at std 0.2 (norm weights 1 + 0.2 N(0,1)):
HF's default std 0.02 gives near-uniform logits that hide mapping errors.

    tiny_tokenizer_dir    byte-level BPE, 320 tokens, eos = pad = '<|endoftext|>' (id 0),
                          '<|im_start|>' (1), '<|im_end|>' (2), a Qwen-style chat template
    tiny_qwen2_dir        Qwen2, untied head (tie_word_embeddings=false)
    tiny_qwen2_tied_dir   Qwen2, tied head
    tiny_qwen3_dir        Qwen3 (q/k RMSNorm), tied, head_dim 12 != hidden 32 / heads 4
    load_hf_model         dir -> transformers model (torch float32, eager attention, eval mode)

All models: vocab 384 (> the tokenizer's 320, padded as real Qwen vocabularies are), hidden 32,
FFN 64, 2 layers, 4 query heads / 2 KV heads, eos_token_id 0, rope_theta 10000.

    smoke_pretrain_cache  one pretrain cache dir for the session: the demo smoke config's base is
                          pretrained once, by whichever smoke test runs first
    cpu_kernels           the compiled CPU decode kernels (skips where they cannot or may not run)

The session runs with a persistent XLA compilation cache in a temporary directory (unless
JAX_COMPILATION_CACHE_DIR is set already), exported through the environment so that the
subprocesses the tests start (parallel workers, the command line) share it: a program compiled
once is loaded, not recompiled, by every later test and process that builds the same one.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Set before jax is imported (by this module's fixtures or the test modules), so jax reads them.
_OWN_JIT_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_JIT_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='cfrl_jax_test_jit_')
# Every program, however quick to compile: the tests' are small, and many are built several times.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def pytest_configure(config):
  import jax
  # In case a plugin imported jax before the variables above were set.
  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
  jax.config.update('jax_persistent_cache_min_entry_size_bytes',
                    int(os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES']))


def pytest_unconfigure(config):
  if _OWN_JIT_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

TINY_VOCAB = 384
TINY_TOKENIZER_VOCAB = 320
EOS_TOKEN = '<|endoftext|>'
EOS_ID = 0
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = [
    'The quick brown fox jumps over the lazy dog.',
    'What is 12 + 34? The answer is 46.',
    'Hello world! hello there, general reasoning.',
    'Let us think step by step: 3 * 7 = 21, so the answer is 21.',
] * 25


def build_tiny_tokenizer():
  """A transformers fast tokenizer trained in memory (deterministic)."""
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=TINY_TOKENIZER_VOCAB, special_tokens=[EOS_TOKEN, '<|im_start|>', '<|im_end|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(_CORPUS, trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN,
                                              pad_token=EOS_TOKEN)
  fast.chat_template = CHAT_TEMPLATE
  assert fast.eos_token_id == EOS_ID
  return fast


def build_tiny_hf_model(model_type: str, tied: bool, seed: int = 0, std: float = 0.2, **overrides):
  """A transformers Qwen2/Qwen3 CausalLM with random weights at `std` (torch float32)."""
  import torch
  import transformers
  kw = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
            max_position_embeddings=512, rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0},
            eos_token_id=EOS_ID, pad_token_id=EOS_ID, bos_token_id=None)
  if model_type == 'qwen2':
    config = transformers.Qwen2Config(**{**kw, **overrides})
  elif model_type == 'qwen3':
    config = transformers.Qwen3Config(**{**kw, 'head_dim': 12, **overrides})
  else:
    raise ValueError(model_type)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * std
      p.copy_(1.0 + noise if name.endswith('norm.weight') else noise)
  return model.eval()


def _save_checkpoint(tmp_path_factory, name, model_type, tied, seed):
  path = str(tmp_path_factory.mktemp(name))
  build_tiny_hf_model(model_type, tied, seed).save_pretrained(path)
  build_tiny_tokenizer().save_pretrained(path)
  return path


@pytest.fixture(scope='session')
def tiny_tokenizer_dir(tmp_path_factory):
  """Directory with the tiny tokenizer alone (AutoTokenizer.from_pretrained works offline)."""
  path = str(tmp_path_factory.mktemp('tiny_tokenizer'))
  build_tiny_tokenizer().save_pretrained(path)
  return path


@pytest.fixture(scope='session')
def tiny_qwen2_dir(tmp_path_factory):
  """Qwen2 checkpoint with an untied lm_head, plus the tiny tokenizer."""
  return _save_checkpoint(tmp_path_factory, 'tiny_qwen2', 'qwen2', tied=False, seed=1)


@pytest.fixture(scope='session')
def tiny_qwen2_tied_dir(tmp_path_factory):
  """Qwen2 checkpoint with tie_word_embeddings=true (no lm_head tensor), plus the tiny tokenizer."""
  return _save_checkpoint(tmp_path_factory, 'tiny_qwen2_tied', 'qwen2', tied=True, seed=2)


@pytest.fixture(scope='session')
def tiny_qwen3_dir(tmp_path_factory):
  """Qwen3 checkpoint (q/k norms, head_dim 12 != 32/4), tied, plus the tiny tokenizer."""
  return _save_checkpoint(tmp_path_factory, 'tiny_qwen3', 'qwen3', tied=True, seed=3)


@pytest.fixture(params=['tiny_qwen2_dir', 'tiny_qwen2_tied_dir', 'tiny_qwen3_dir'])
def tiny_checkpoint_dir(request):
  """Each of the three tiny checkpoints in turn (parametrised by fixture name)."""
  return request.getfixturevalue(request.param)


@pytest.fixture(scope='session')
def load_hf_model():
  """Callable dir -> transformers CausalLM in torch float32, eager attention, eval mode (cached)."""
  import torch
  import transformers
  cache = {}

  def load(path):
    path = os.fspath(path)
    if path not in cache:
      cache[path] = transformers.AutoModelForCausalLM.from_pretrained(
          path, dtype=torch.float32, attn_implementation='eager').eval()
    return cache[path]

  return load


@pytest.fixture(scope='session')
def smoke_pretrain_cache(tmp_path_factory):
  """pretrain.cache_dir for the tests that run configs/demo.py:smoke end to end: they share its base."""
  return str(tmp_path_factory.mktemp('smoke_pretrain_cache'))


@pytest.fixture
def cpu_kernels():
  """The compiled CPU decode kernels (cfrl_jax.kernels.cpu_decode), built on first use. Skips only
  where no C++ compiler exists at all or CFRL_JAX_CPU_KERNELS=0 switches them off; a failed build on
  a machine with a compiler fails the test."""
  from cfrl_jax.kernels import cpu_decode
  if cpu_decode.compiler() is None:
    pytest.skip('no C++ compiler on this machine: the CPU decode kernels cannot be built')
  reason = cpu_decode.unavailable_reason()
  if reason is not None and reason.startswith('switched off'):
    pytest.skip(f'the CPU decode kernels are {reason}')
  assert reason is None, reason
  return cpu_decode
