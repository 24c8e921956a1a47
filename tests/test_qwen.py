"""The Qwen2/Qwen3 model (cfrl_jax/models/qwen.py) against transformers (torch float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cfrl_jax.models import hf, qwen

# One compiled forward per (config, shapes), shared by all tests in this file.
_forward = jax.jit(qwen.forward, static_argnums=0)


def _left_padded_batch(vocab, seed=0, length=11):
  """(4, length) tokens; rows padded on the left by 0, 4, length - 1 and 2 positions."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (4, length)).astype(np.int32)
  mask = np.ones((4, length), np.int32)
  for row, pad in enumerate((0, 4, length - 1, 2)):
    mask[row, :pad] = 0
    tokens[row, :pad] = 0
  return tokens, mask


def _hf_logits(model, tokens, mask):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()


def test_logits_match_transformers_with_left_padding(tiny_checkpoint_dir, load_hf_model):
  cfg, params = hf.load_pretrained(tiny_checkpoint_dir)
  tokens, mask = _left_padded_batch(cfg.vocab_size)
  ref = _hf_logits(load_hf_model(tiny_checkpoint_dir), tokens, mask)
  ours, _ = _forward(cfg, params, tokens, mask)
  real = mask == 1
  assert np.abs(ref[real]).max() > 1.0  # logits with spread: a mapping error would show
  np.testing.assert_allclose(np.asarray(ours)[real], ref[real], rtol=0, atol=1e-5)


def test_token_logprobs_match_transformers_log_softmax(tiny_qwen3_dir, load_hf_model):
  cfg, params = hf.load_pretrained(tiny_qwen3_dir)
  tokens, mask = _left_padded_batch(cfg.vocab_size, seed=1)
  ref = torch.log_softmax(torch.from_numpy(_hf_logits(load_hf_model(tiny_qwen3_dir), tokens, mask)), -1)
  ref_logp = torch.gather(ref[:, :-1], -1, torch.from_numpy(tokens[:, 1:, None].astype(np.int64)))[..., 0]
  ref_entropy = -(ref.exp() * ref).sum(-1)[:, :-1]
  logp, entropy = qwen.token_logprobs(cfg, params, tokens, mask)
  real = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
  np.testing.assert_allclose(np.asarray(logp)[real], ref_logp.numpy()[real], atol=1e-5)
  np.testing.assert_allclose(np.asarray(entropy)[real], ref_entropy.numpy()[real], atol=1e-5)


def test_kv_cache_decoding_equals_the_full_forward(tiny_checkpoint_dir):
  chunks = (1, 1, 3)  # one-token decode steps, then a multi-token chunk
  cfg, params = hf.load_pretrained(tiny_checkpoint_dir)
  prompt, prompt_mask = _left_padded_batch(cfg.vocab_size, seed=2, length=7)
  extra = np.random.RandomState(3).randint(0, cfg.vocab_size, (4, sum(chunks))).astype(np.int32)
  tokens = np.concatenate([prompt, extra], 1)
  mask = np.concatenate([prompt_mask, np.ones_like(extra)], 1)
  full, _ = _forward(cfg, params, tokens, mask)
  step = lambda p, t, m, c: _forward(cfg, p, t, m, None, c)
  cache = qwen.init_cache(cfg, 4, tokens.shape[1] + 3)  # spare slots stay masked out
  z, cache = step(params, prompt, prompt_mask, cache)
  pieces, start = [z], prompt.shape[1]
  for n in chunks:
    z, cache = step(params, tokens[:, start:start + n], mask[:, start:start + n], cache)
    pieces.append(z)
    start += n
  assert int(cache.index) == tokens.shape[1]
  incremental = np.concatenate([np.asarray(p) for p in pieces], 1)
  real = mask == 1
  np.testing.assert_allclose(incremental[real], np.asarray(full)[real], rtol=0, atol=1e-5)


def test_logits_ignore_the_content_of_padding(tiny_qwen2_dir):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  tokens, mask = _left_padded_batch(cfg.vocab_size, seed=4)
  other = np.where(mask == 1, tokens, (tokens + 7) % cfg.vocab_size)
  a, _ = _forward(cfg, params, tokens, mask)
  b, _ = _forward(cfg, params, other, mask)
  real = mask == 1
  np.testing.assert_array_equal(np.asarray(a)[real], np.asarray(b)[real])
  assert np.all(np.isfinite(np.asarray(a)))


def test_bfloat16_compute_stays_close_to_float32(tiny_qwen2_dir):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  cfg16, params16 = hf.load_pretrained(tiny_qwen2_dir, dtype='bfloat16', param_dtype='bfloat16')
  tokens, mask = _left_padded_batch(cfg.vocab_size, seed=5)
  z32, _ = _forward(cfg, params, tokens, mask)
  z16, _ = _forward(cfg16, params16, tokens, mask)
  assert z16.dtype == jnp.float32
  real = mask == 1
  err = np.abs(np.asarray(z16) - np.asarray(z32))[real]
  assert 0 < err.max() < 0.25 * np.abs(np.asarray(z32)[real]).max()


@pytest.mark.slow
def test_training_gradients_equal_torch_autograd(tiny_checkpoint_dir, load_hf_model):
  """The gradient the learner follows (NLL of completion tokens through completion_stats, left padding)
  equals torch autograd through the transformers model, for every parameter."""
  import torch
  from cfrl_jax.models import hf
  from cfrl_jax.train import rollout
  cfg, params = hf.load_pretrained(tiny_checkpoint_dir, tie='auto')
  model = load_hf_model(tiny_checkpoint_dir)
  rng = np.random.RandomState(0)
  B, T, P = 3, 12, 5
  tokens = rng.randint(1, cfg.vocab_size, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[0, :3] = 0
  mask[1, -2:] = 0
  tokens[mask == 0] = 0
  target_mask = mask[:, P:].astype(np.float32)

  def loss(p):
    logp = rollout.completion_stats(cfg, p, jnp.asarray(tokens), jnp.asarray(mask), P)[0]
    return -jnp.sum(logp * target_mask) / target_mask.sum()

  grads = jax.grad(loss)(params)
  model.zero_grad()
  ids = torch.tensor(tokens, dtype=torch.long)
  am = torch.tensor(mask, dtype=torch.long)
  pos = torch.clamp(am.cumsum(-1) - 1, min=0)
  logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
  logp = torch.log_softmax(logits[:, P - 1:-1], -1).gather(-1, ids[:, P:, None])[..., 0]
  tm = torch.tensor(target_mask)
  (-(logp * tm).sum() / tm.sum()).backward()
  theirs = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
  ours = {}
  for name, slot in hf.hf_tensor_map(cfg, with_head=cfg.tie == 'untied').items():
    node = grads
    for key in slot.path:
      node = node[key]
    x = np.asarray(node if slot.layer is None else node[slot.layer])
    ours[name] = x.T if slot.transpose else x
  assert set(theirs) <= set(ours)
  for name, g in theirs.items():
    np.testing.assert_allclose(ours[name], g, rtol=1e-4, atol=1e-6, err_msg=name)


_TINY = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=4)
_ARCHS = {'qwen2_untied': dict(), 'qwen3_tied_biases': dict(model_type='qwen3', tie='tied', qk_norm=True,
                                                              attention_bias=True, o_bias=True)}


@pytest.mark.parametrize('arch', sorted(_ARCHS))
def test_modules_build_the_init_params_tree_with_logical_axes(arch):
  import flax.linen as nn
  cfg = qwen.QwenConfig(**_TINY, **_ARCHS[arch])
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jnp.zeros((1, 3), jnp.int32)
  boxed = {'backbone': qwen.Backbone(cfg).init(jax.random.PRNGKey(1), tokens)['params']}
  if cfg.tie == 'untied':
    boxed['head'] = qwen.Head(cfg).init(jax.random.PRNGKey(2), jnp.zeros((1, cfg.hidden_size)))['params']
  else:
    boxed['head'] = {}
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert jax.tree_util.tree_structure(nn.unbox(boxed)) == jax.tree_util.tree_structure(params)
  assert shapes(nn.unbox(boxed)) == shapes(params)
  # the stacked layer axis is named 'layers' (nn.scan's metadata), every dimension has a name
  names = {qwen.sharding.path_str(p): tuple(s) for p, s in jax.tree_util.tree_flatten_with_path(
      nn.get_partition_spec(boxed), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0]}
  assert names == {k: v for k, v in qwen.param_axes(cfg).items() if k in names}
  assert names['backbone/layers/q_proj/kernel'] == ('layers', 'embed', 'heads')
  assert names['backbone/embed'] == ('vocab', 'embed')


def test_remat_gives_the_same_logits_and_gradients():
  cfg = qwen.QwenConfig(**_TINY, **_ARCHS['qwen3_tied_biases'])
  params = qwen.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
  tokens, mask = _left_padded_batch(cfg.vocab_size, seed=6, length=7)
  loss = lambda c: jax.jit(jax.value_and_grad(lambda p: jnp.sum(qwen.token_logprobs(c, p, tokens, mask)[0])))
  (v0, g0), (v1, g1) = loss(cfg)(params), loss(cfg.replace(remat=True))(params)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  # Recomputation may fuse differently: float32 rounding of gradients up to ~25 in size.
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_residual_stream_is_constrained_under_a_mesh():
  cfg = qwen.QwenConfig(**_TINY)
  params = qwen.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jnp.zeros((2, 3), jnp.int32)
  count = lambda: str(jax.make_jaxpr(lambda b: qwen.features(cfg, b, tokens)[0])(params['backbone'])).count(
      'sharding_constraint')
  assert count() == 0                                   # no mesh: no constraint
  with jax.sharding.set_mesh(qwen.sharding.make_mesh((1, -1, 1))):
    # the table before the (vocab-parallel) gather, the gathered embeddings and the scanned layer output
    assert count() == 3


def test_float64_model_is_float64_end_to_end():
  """dtype='float64' under x64: every intermediate stays float64 (the upcasts promote), so a central
  finite difference of the summed log-probs matches the gradient to ~1e-10 relative; one float32
  rounding anywhere would leave ~1e-7 relative noise in the loss and errors of ~1e-1 here."""
  with jax.enable_x64(True):
    cfg = qwen.QwenConfig(**_TINY, **_ARCHS['qwen3_tied_biases'], dtype='float64', param_dtype='float64')
    params = qwen.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype('float64')}
    tokens, mask = _left_padded_batch(cfg.vocab_size, seed=7, length=6)
    phi, _ = qwen.features(cfg, params['backbone'], tokens, mask)
    z, _ = qwen.forward(cfg, params, tokens, mask)
    assert phi.dtype == z.dtype == jnp.float64
    loss = jax.jit(lambda p: jnp.sum(qwen.token_logprobs(cfg, p, tokens, mask)[0] * mask[:, 1:]))
    grad = jax.jit(jax.grad(loss))(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(params)))
    direction = jax.tree.unflatten(jax.tree.structure(params), [
        jax.random.normal(k, x.shape, jnp.float64) for k, x in zip(keys, jax.tree.leaves(params))])
    h = 1e-4   # the 4-point central difference: truncation O(h^4), float64 rounding ~1e-14 / h
    f = lambda s: loss(jax.tree.map(lambda p, d: p + s * h * d, params, direction))
    fd = (8 * (f(1.0) - f(-1.0)) - (f(2.0) - f(-2.0))) / (12 * h)
    exact = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    assert abs(float(fd - exact)) <= 1e-8 * max(1.0, abs(float(exact)))
