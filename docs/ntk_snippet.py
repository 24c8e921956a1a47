# Exact eNTK probes of a Hugging Face Qwen checkpoint, in a notebook.
import functools
import os

import jax
import jax.numpy as jnp

from cfrl_jax import tokenization
from cfrl_jax.dynamics import ntk
from cfrl_jax.models import hf, qwen

checkpoint = os.environ.get('CHECKPOINT', 'Qwen/Qwen2.5-0.5B-Instruct')   # local dir or hub id
cfg, params = hf.load_pretrained(checkpoint, tie='auto')   # a tied head stays tied: its cross term is reported
tok = tokenization.load_tokenizer(checkpoint)

texts = ['What is 12 + 34? The answer is 46.', 'Hello world! hello there.',
         'Let us think step by step: 3 * 7 = 21.', 'The quick brown fox jumps.']
tokens, mask = tokenization.encode_prompts(tok, texts)     # left-padded (n, T) numpy arrays
n, T = tokens.shape
# One entry per sequence: log pi(last token | everything before it).
points = ntk.Points(jnp.asarray(tokens), jnp.asarray(mask), jnp.arange(n), jnp.full((n,), T - 2))

kernel = jax.jit(functools.partial(ntk.logprob_kernel, cfg, chunk_size=2))   # cfg is static
k = kernel(params, points)              # KernelParts(r, g, cross, total), each (n, n); r + g + cross == total
off = ~jnp.eye(n, dtype=bool)
print('R share of the diagonal:', float(jnp.trace(k.r) / jnp.trace(k.r + k.g)))
print('mean off-diagonal R, G, cross:', [float(x[off].mean()) for x in (k.r, k.g, k.cross)])
print('head norm ||W||_F:', float(jnp.linalg.norm(qwen.head_params(cfg, params)['w'])))
