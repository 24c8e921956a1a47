"""The sampler (cfrl_jax/sampling/) against transformers generate, full forward passes and numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cfrl_jax import sampling
from cfrl_jax.models import hf, qwen


def _prompts(vocab, lengths, seed=0):
  """Left-padded (B, max(lengths)) random prompts of the given lengths."""
  rng = np.random.RandomState(seed)
  P = max(lengths)
  tokens = np.zeros((len(lengths), P), np.int32)
  mask = np.zeros((len(lengths), P), np.int32)
  for row, n in enumerate(lengths):
    tokens[row, P - n:] = rng.randint(1, vocab, n)
    mask[row, P - n:] = 1
  return tokens, mask


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _reference_filter(z, temperature, top_k, top_p):
  """HF's warpers in numpy, one row at a time: temperature, then top-k, then top-p."""
  z = np.asarray(z, np.float64) / temperature
  out = []
  for row in z:
    if top_k:
      row = np.where(row < np.sort(row)[::-1][top_k - 1], -np.inf, row)
    if top_p < 1:
      order = np.argsort(-row, kind='stable')
      p = _softmax(row)[order]
      keep_sorted = np.cumsum(p) - p < top_p
      keep_sorted[0] = True
      keep = np.zeros(row.shape, bool)
      keep[order[keep_sorted]] = True
      row = np.where(keep, row, -np.inf)
    out.append(row)
  return np.stack(out)


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  m = np.max(z, -1, keepdims=True)
  return z - m - np.log(np.sum(np.exp(z - m), -1, keepdims=True))


# --- greedy decoding == transformers -----------------------------------------------------------
def test_greedy_matches_transformers_generate(tiny_checkpoint_dir, load_hf_model):
  cfg, params = hf.load_pretrained(tiny_checkpoint_dir)
  tokens, mask = _prompts(cfg.vocab_size, [5, 2, 7, 4, 1], seed=1)
  N = 12
  free = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=N,
                         greedy=True, pad_id=0)
  # A stop token that some rows emit part-way (and others maybe never): exercises per-row stops.
  stop = int(np.asarray(free.tokens)[0, 3])
  out = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=N,
                        greedy=True, stop_token_ids=(stop,), pad_id=0)
  model = load_hf_model(tiny_checkpoint_dir)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                         attention_mask=torch.from_numpy(mask.astype(np.int64)), max_new_tokens=N,
                         do_sample=False, eos_token_id=stop, pad_token_id=0)[:, tokens.shape[1]:].numpy()
  ours, m = np.asarray(out.tokens), np.asarray(out.mask)
  assert ref.shape[1] <= N
  np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
  assert np.all(ours[:, ref.shape[1]:] == 0) and np.all(m[:, ref.shape[1]:] == 0)
  for row in range(len(ours)):
    hits = np.flatnonzero(ours[row] == stop)
    length = hits[0] + 1 if hits.size else N
    assert m[row].tolist() == [1] * length + [0] * (N - length)
    assert np.all(ours[row, length:] == 0)
  assert 0 < m.sum() < m.size  # some rows stopped early, some did not stop at once
  # Without a stop token the same prefix comes out, to the full length.
  np.testing.assert_array_equal(np.asarray(free.tokens)[m == 1], ours[m == 1])
  assert np.all(np.asarray(free.mask) == 1)
  np.testing.assert_array_equal(np.asarray(out.sample_logprobs), 0.0)


@pytest.mark.slow
def test_scanned_and_unrolled_decoding_agree(tiny_qwen3_dir):
  cfg, params = hf.load_pretrained(tiny_qwen3_dir)
  tokens, mask = _prompts(cfg.vocab_size, [3, 6, 1], seed=5)
  # The same static arguments and shapes as the log-prob test below: one compilation fewer.
  kw = dict(max_new_tokens=10, temperature=0.8, top_k=20, stop_token_ids=(5, 7))
  a = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(4), unroll_layers=True, **kw)
  b = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(4), unroll_layers=False, **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
  np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)
  np.testing.assert_allclose(np.asarray(a.sample_logprobs), np.asarray(b.sample_logprobs), atol=1e-5)


def test_prepared_decode_weights_are_reused_across_calls(tiny_qwen3_dir, monkeypatch):
  """sample(cfg, prepare_decode(cfg, params), ...) equals sample(cfg, params, ...) and lays
  nothing out again; the scanned sampler refuses prepared weights with a clear error."""
  cfg, params = hf.load_pretrained(tiny_qwen3_dir)
  tokens, mask = _prompts(cfg.vocab_size, [3, 6, 1], seed=5)
  kw = dict(max_new_tokens=10, temperature=0.8, top_k=20, stop_token_ids=(5, 7))
  a = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(4), unroll_layers=True, **kw)
  prepared = sampling.prepare_decode(cfg, params)
  # Already in the compute dtype (float32), the embedding and head are the params' own arrays, not copies.
  assert prepared.embed is params['backbone']['embed']
  assert prepared.head['w'] is qwen.head_params(cfg, params)['w']
  calls = []
  monkeypatch.setattr(sampling.decode_layout, 'prepare_decode', lambda *args: calls.append(args))
  for _ in range(2):
    b = sampling.sample(cfg, prepared, tokens, mask, jax.random.PRNGKey(4), **kw)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not calls
  with pytest.raises(ValueError, match='unroll_layers=False'):
    sampling.sample(cfg, prepared, tokens, mask, jax.random.PRNGKey(4), unroll_layers=False, **kw)
  with pytest.raises(ValueError, match='do not match cfg'):
    sampling.sample(cfg.replace(num_layers=cfg.num_layers + 1), prepared, tokens, mask, jax.random.PRNGKey(4), **kw)


# --- log-probs == recomputation from a full forward pass ---------------------------------------
@pytest.mark.parametrize('kw,lengths', [
    (dict(temperature=0.7, top_p=0.8), [3, 6, 1]),
    (dict(temperature=1.3, top_k=20), [3, 6, 1]),
    # More rows than sampling.WEIGHT_MAJOR_MAX_ROWS: the decode step's row-major products.
    pytest.param(dict(temperature=1.3, top_k=20), [3, 6, 1, 4, 2] * 8, marks=pytest.mark.slow)])
def test_logprobs_equal_a_full_forward_recomputation(tiny_qwen3_dir, kw, lengths):
  cfg, params = hf.load_pretrained(tiny_qwen3_dir)
  assert (len(lengths) > sampling.WEIGHT_MAJOR_MAX_ROWS) == (len(lengths) == 40)
  tokens, mask = _prompts(cfg.vocab_size, lengths, seed=2)
  out = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(3), max_new_tokens=10,
                        stop_token_ids=(5, 7), pad_id=0, **kw)
  c_tokens, c_mask = np.asarray(out.tokens), np.asarray(out.mask)
  full_tokens = np.concatenate([tokens, c_tokens], 1)
  full_mask = np.concatenate([mask, c_mask], 1)
  P = tokens.shape[1]
  logp, _ = qwen.token_logprobs(cfg, params, full_tokens, full_mask)
  ref_raw = np.asarray(logp)[:, P - 1:]                      # aligned with the completion
  real = c_mask == 1
  np.testing.assert_allclose(np.asarray(out.logprobs)[real], ref_raw[real], atol=2e-5)
  assert np.all(np.asarray(out.logprobs)[~real] == 0) and np.all(np.asarray(out.sample_logprobs)[~real] == 0)

  z, _ = qwen.forward(cfg, params, full_tokens, full_mask)
  z = np.asarray(z)[:, P - 1:-1]                             # logits that produced each completion token
  filtered = _reference_filter(z.reshape(-1, z.shape[-1]), kw['temperature'], kw.get('top_k', 0),
                               kw.get('top_p', 1.0)).reshape(z.shape)
  ref_sample = np.take_along_axis(_log_softmax(filtered), c_tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.sample_logprobs)[real], ref_sample[real], atol=2e-5)
  assert np.all(np.isfinite(ref_sample[real]))              # every sampled token was in the kept set
  assert np.all(np.asarray(out.sample_logprobs)[real] >= np.asarray(out.logprobs)[real] - 1.0 / 0.7)


# --- bfloat16: the decode path's own layout (uint16 moves, float32 accumulation) ------------
_BF16_CASES = [   # (fixture, param_dtype, lengths, the decode attentions whose case is slow)
    ('tiny_qwen3_dir', 'bfloat16', [3, 6, 1], ('xla',)),
    ('tiny_qwen2_tied_dir', 'float32', [3, 6, 1], ()),
    # Over WEIGHT_MAJOR_MAX_ROWS rows: row-major products and the fused attention over uint16 caches.
    ('tiny_qwen3_dir', 'bfloat16', [3, 6, 1, 4, 2] * 8, ('xla', 'kernel')),
]


# One list (not two stacked parametrizations) so that a single (case, attention) pair can be slow.
@pytest.mark.parametrize('fixture,param_dtype,lengths,attention', [
    pytest.param(fixture, param_dtype, lengths, attention,
                 id=f'{fixture}-{param_dtype}-lengths{i}-{attention}',
                 marks=[pytest.mark.slow] if attention in slow else [])
    for i, (fixture, param_dtype, lengths, slow) in enumerate(_BF16_CASES)
    for attention in ('xla', 'kernel')])
def test_bfloat16_sampling_matches_a_float32_recomputation(fixture, param_dtype, lengths, attention, request):
  """bf16 compute (bf16 or f32 storage, Qwen3 and a tied Qwen2), with either decode attention: the
  returned log-probs equal a float32 forward over the same (bf16-rounded) weights to bf16 accuracy."""
  if attention == 'kernel':
    request.getfixturevalue('cpu_kernels')
  cfg, params = hf.load_pretrained(request.getfixturevalue(fixture), dtype='bfloat16',
                                   param_dtype=param_dtype)
  prepared = sampling.prepare_decode(cfg, params)
  assert prepared.embed.dtype == jnp.uint16                  # gathered as raw bits (see _bits)
  assert all(w['qkv'].dtype == jnp.bfloat16 for w in prepared.layers)
  form = 'kernel' if attention == 'kernel' else 'fused' if len(lengths) == 40 else 'batched'
  assert sampling.attention_form(cfg, len(lengths), attention) == form
  tokens, mask = _prompts(cfg.vocab_size, lengths, seed=2)
  kw = dict(max_new_tokens=8, temperature=1.0, stop_token_ids=(5,), pad_id=0, attention=attention)
  out = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(3), **kw)
  c_tokens, c_mask = np.asarray(out.tokens), np.asarray(out.mask)
  real = c_mask == 1
  assert real.sum() > 8 and np.all(np.isfinite(np.asarray(out.logprobs)))

  cfg32 = cfg.replace(dtype='float32', param_dtype='float32')
  params32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), params)
  full_tokens = np.concatenate([tokens, c_tokens], 1)
  full_mask = np.concatenate([mask, c_mask], 1)
  logp, _ = qwen.token_logprobs(cfg32, params32, full_tokens, full_mask)
  ref = np.asarray(logp)[:, tokens.shape[1] - 1:]
  got = np.asarray(out.logprobs)
  # The tolerance is bf16 rounding itself, measured on the same tokens: our own bf16 full forward
  # (qwen.token_logprobs, another summation order) against the same float32 reference. The
  # sampler must be about as close as that peer; a fixed bound either hides a real error or trips
  # when a change moves only the rounding. A wrong slot, position or mask is off by O(1).
  logp16, _ = qwen.token_logprobs(cfg, params, full_tokens, full_mask)
  peer = np.asarray(logp16, np.float32)[:, tokens.shape[1] - 1:]
  e_ours, e_peer = np.abs(got[real] - ref[real]), np.abs(peer[real] - ref[real])
  assert 0 < e_peer.mean() < 0.05                              # the peer is bf16-accurate, not exact
  assert e_ours.mean() <= 1.5 * e_peer.mean() + 0.005, (e_ours.mean(), e_peer.mean())
  assert np.quantile(e_ours, 0.9) <= 2 * np.quantile(e_peer, 0.9) + 0.01, (e_ours, e_peer)
  assert e_ours.max() <= 3 * e_peer.max() + 0.02, (e_ours.max(), e_peer.max())


@pytest.mark.parametrize('attention,lengths', [
    ('xla', [4, 2, 5]), ('kernel', [4, 2, 5]),
    # Over HEAD_WEIGHT_MAJOR_MAX_ROWS rows the kernel path also picks the tokens (greedy_pick).
    ('kernel', [4, 2, 5] * 7)])
def test_bfloat16_greedy_decoding_continues_a_bf16_forward(tiny_qwen2_dir, attention, lengths, request):
  """Each greedy token is the argmax of a bf16 full forward over the prefix, up to near-ties."""
  if attention == 'kernel':
    request.getfixturevalue('cpu_kernels')
  cfg, params = hf.load_pretrained(tiny_qwen2_dir, dtype='bfloat16', param_dtype='bfloat16')
  tokens, mask = _prompts(cfg.vocab_size, lengths, seed=7)
  out = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=6, greedy=True,
                        attention=attention)
  full = np.concatenate([tokens, np.asarray(out.tokens)], 1)
  full_mask = np.concatenate([mask, np.asarray(out.mask)], 1)
  z, _ = qwen.forward(cfg, params, full, full_mask)
  z = np.asarray(z, np.float64)[:, tokens.shape[1] - 1:-1]           # (B, N, V) before each token
  chosen = np.take_along_axis(z, np.asarray(out.tokens)[..., None], -1)[..., 0]
  gap = z.max(-1) - chosen                                           # 0 where the argmax agrees
  assert np.all(gap <= 0.05 * np.abs(z).max()), gap.max()
  assert (gap == 0).mean() >= 0.8
  # The log-probs are those of the chosen tokens under the same forward, to bf16 accuracy.
  ref = chosen - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) - z.max(-1)
  np.testing.assert_allclose(np.asarray(out.logprobs), ref, atol=0.1)


# --- the filtered distribution ------------------------------------------------------------------
@pytest.mark.parametrize('temperature,top_k,top_p', [
    (1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.7), (1.7, 30, 0.9), (0.9, 0, 0.95)])
def test_sampling_logits_keep_the_reference_set(temperature, top_k, top_p):
  z = np.random.RandomState(0).randn(16, 200).astype(np.float32) * 3
  ref = _reference_filter(z, temperature, top_k, top_p)
  for candidates in (64, 2, 200):  # fast path, bisection fallback, exhaustive candidates
    ours = np.asarray(sampling.sampling_logits(jnp.asarray(z), temperature, top_k, top_p,
                                               top_p_candidates=candidates))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


def test_top_p_under_jit_with_a_traced_threshold():
  z = jnp.asarray(np.random.RandomState(1).randn(4, 50).astype(np.float32))
  f = jax.jit(lambda z, p: sampling.sampling_logits(z, 1.0, 0, p, use_top_p=True, top_p_candidates=8))
  for p in (0.3, 0.9, 0.999):
    np.testing.assert_array_equal(np.isfinite(np.asarray(f(z, p))),
                                  np.isfinite(_reference_filter(np.asarray(z), 1.0, 0, p)))


def test_first_argmax_equals_argmax_with_ties():
  rng = np.random.RandomState(0)
  z = rng.randint(0, 5, size=(64, 37)).astype(np.float32)     # many ties: the first maximum wins
  z[3] = -np.inf
  z[4, 10] = np.inf
  np.testing.assert_array_equal(np.asarray(sampling.first_argmax(jnp.asarray(z))), np.argmax(z, axis=-1))


@pytest.mark.parametrize('V,block', [(50, 8), (48, 8), (37, 64), (300, 16)])
def test_two_level_draw_follows_the_distribution_and_skips_zero_mass(V, block):
  # Blocks of `block` tokens (the last one partial when block does not divide V), whole blocks
  # without mass, and zero-probability tokens inside blocks that have mass.
  rng = np.random.RandomState(V)
  p = rng.gamma(0.5, size=V)
  p[rng.rand(V) < 0.4] = 0
  p[:min(block, V // 4)] = 0          # an empty first block (when block < V / 4)
  p /= p.sum()
  n = 16384
  z = jnp.tile(jnp.log(jnp.asarray(p, jnp.float32)), (n, 1))
  tokens = np.asarray(jax.jit(lambda k, z: sampling.draw(k, z, block=block))(jax.random.PRNGKey(3), z))
  counts = np.bincount(tokens, minlength=V)
  assert np.all(counts[p == 0] == 0)
  tv = 0.5 * np.abs(counts / n - p).sum()
  # E[TV] <= 0.5 * sum sqrt(p (1-p) / n) * sqrt(2/pi) ~ 0.5 * sqrt(#support / n) * 0.8 <= 0.02 here.
  assert tv < 0.04, tv


def test_draw_at_the_top_of_the_cdf_picks_the_last_token_with_mass():
  # u lands at the very top when all the mass sits in one token; every draw must be that token,
  # even when it is the last of a block followed by empty blocks.
  V = 40
  z = np.full((256, V), -np.inf, np.float32)
  z[:, 15] = 0.0
  tokens = np.asarray(sampling.draw(jax.random.PRNGKey(1), jnp.asarray(z), block=8))
  assert np.all(tokens == 15)


def _known_logits_model(target_logits):
  """A one-layer model whose next-token logits after token 1 are target_logits (up to RMSNorm's eps).

  Attention and MLP outputs are zeroed, so phi = rmsnorm(embed[1]) = sqrt(d) e_0 and
  logits = head[:, 0] * sqrt(d).
  """
  V, d = len(target_logits), 8
  cfg = qwen.QwenConfig(vocab_size=V, hidden_size=d, intermediate_size=8, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=4)
  params = jax.tree_util.tree_map(jnp.zeros_like, qwen.init_params(cfg, jax.random.PRNGKey(0)))
  params['backbone']['layers']['input_norm'] = jnp.ones((1, d))
  params['backbone']['layers']['post_attn_norm'] = jnp.ones((1, d))
  params['backbone']['final_norm'] = jnp.ones((d,))
  params['backbone']['embed'] = jnp.zeros((V, d)).at[:, 0].set(1.0)
  params['head']['w'] = jnp.zeros((V, d)).at[:, 0].set(jnp.asarray(target_logits) / np.sqrt(d))
  return cfg, params


_PROBS = np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.03, 0.02, 0.01, 0.006, 0.004])


def _check_frequencies(tokens, target):
  counts = np.bincount(tokens, minlength=len(target))
  assert np.all(counts[target == 0] == 0)                  # nothing outside the kept set
  tv = 0.5 * np.abs(counts / len(tokens) - target).sum()
  # E[TV] ~ 0.5 * sum sqrt(2 p (1-p) / (pi n)) <= 0.015 at n = 8192; 0.03 is > 4 standard deviations.
  assert tv < 0.03, (tv, counts / len(tokens), target)


@pytest.mark.parametrize('temperature,top_k,top_p', [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7), (1.5, 6, 0.8)])
def test_draws_follow_the_filtered_distribution(temperature, top_k, top_p):
  n = 8192
  z = jnp.tile(jnp.log(jnp.asarray(_PROBS, jnp.float32)), (n, 1))
  draw = jax.jit(lambda key, z: sampling.draw(key, sampling.sampling_logits(z, temperature, top_k, top_p)))
  tokens = np.asarray(draw(jax.random.PRNGKey(7), z))
  _check_frequencies(tokens, _softmax(_reference_filter(np.log(_PROBS)[None], temperature, top_k, top_p))[0])


def test_draw_never_picks_a_zero_probability_token():
  z = jnp.asarray([[-jnp.inf, 0.0, -jnp.inf, -jnp.inf], [3.0, -jnp.inf, -jnp.inf, -jnp.inf]] * 512)
  tokens = np.asarray(sampling.draw(jax.random.PRNGKey(0), z)).reshape(-1, 2)
  assert np.all(tokens[:, 0] == 1) and np.all(tokens[:, 1] == 0)


@pytest.mark.slow
def test_sample_draws_from_temperature_top_k_top_p_of_the_model():
  temperature, top_k, top_p = 1.5, 6, 0.8
  cfg, params = _known_logits_model(np.log(_PROBS))
  n = 8192
  out = sampling.sample(cfg, params, np.ones((n, 1), np.int32), np.ones((n, 1), np.int32),
                        jax.random.PRNGKey(7), max_new_tokens=1, temperature=temperature,
                        top_k=top_k, top_p=top_p)
  z, _ = qwen.forward(cfg, params, jnp.ones((1, 1), jnp.int32))
  z = np.asarray(z)[0, 0]
  np.testing.assert_allclose(z, np.log(_PROBS), atol=1e-4)
  target = _softmax(_reference_filter(z[None], temperature, top_k, top_p))[0]
  assert 2 < np.count_nonzero(target) < top_k                # top-p cuts inside the top-k set
  toks = np.asarray(out.tokens)[:, 0]
  _check_frequencies(toks, target)
  # The reported log-probs are those of the distribution sampled from / of the raw policy.
  np.testing.assert_allclose(np.asarray(out.sample_logprobs)[:, 0], np.log(target[toks]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], _log_softmax(z)[toks], atol=1e-5)


# --- keys, buckets, compilation -----------------------------------------------------------------
def test_same_key_same_samples_and_buckets_change_nothing(tiny_qwen2_dir):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  tokens, mask = _prompts(cfg.vocab_size, [4, 3, 6], seed=4)
  kw = dict(max_new_tokens=8, temperature=1.0, stop_token_ids=(0,))
  a = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(1), **kw)
  b = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(1), bucket=False, **kw)
  c = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(2), **kw)
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  assert a.tokens.shape == (3, 8) and a.tokens.dtype == jnp.int32 and a.logprobs.dtype == jnp.float32


@pytest.mark.slow      # bf16 samplers at two bucket sizes: over 15 s of compiles on 2 cores
def test_one_bf16_prompt_decodes_two_rows_with_the_same_result(tiny_qwen2_dir, monkeypatch):
  """A single bf16 prompt runs as a 2-row bucket on the unrolled sampler (see min_batch_bucket)
  and returns what the unbucketed one-row call returns."""
  cfg, params = hf.load_pretrained(tiny_qwen2_dir, dtype='bfloat16', param_dtype='bfloat16')
  assert sampling.min_batch_bucket(cfg, True) == 2
  assert sampling.min_batch_bucket(cfg, False) == 1
  assert sampling.min_batch_bucket(cfg.replace(dtype='float32', param_dtype='float32'), True) == 1
  tokens, mask = _prompts(cfg.vocab_size, [5], seed=3)
  rows = []
  padded = sampling.decode_loop.sample_padded
  monkeypatch.setattr(sampling.decode_loop, 'sample_padded', lambda model, t, *a, **kw: (rows.append(t.shape[0]),
                                                                                        padded(model, t, *a, **kw))[1])
  kw = dict(max_new_tokens=6, temperature=1.0, unroll_layers=True)
  a = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(2), **kw)
  b = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(2), bucket=False, **kw)
  assert rows == [2, 1]
  assert a.tokens.shape == (1, 6)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  # Only bf16 rounding differs: one and two rows take different product kernels (measured 0.006).
  np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=0.02)


@pytest.mark.slow      # four sampler compiles
def test_batches_within_a_bucket_do_not_recompile(tiny_qwen2_tied_dir):
  cfg, params = hf.load_pretrained(tiny_qwen2_tied_dir)
  run = lambda lengths, **kw: sampling.sample(
      cfg, params, *_prompts(cfg.vocab_size, lengths), jax.random.PRNGKey(0), max_new_tokens=4, **kw)
  run([5, 7, 2, 6, 3])                       # B 5 -> 8, P 7 -> 8
  compiled = sampling.compile_cache_size()
  run([6, 1, 3, 8, 2, 2, 4])                 # B 7 -> 8, P 8 -> 8
  run([5, 7, 2, 6, 3], temperature=0.3)      # temperature is traced
  run([5, 7, 2, 6, 3], top_p=0.5)
  compiled_with_top_p = sampling.compile_cache_size()
  run([5, 7, 2, 6, 3], top_p=0.9)            # the top_p value is traced, only its use is static
  assert compiled_with_top_p == compiled + 1
  assert sampling.compile_cache_size() == compiled_with_top_p
  run([5, 7, 2, 6, 3, 1, 1, 1, 1])          # B 9 -> 16: a new bucket
  assert sampling.compile_cache_size() == compiled_with_top_p + 1


def test_decode_windows():
  # Steps 1..N-1; step t writes slot P + t - 1, so a segment of W slots runs the steps t <= W - P.
  assert sampling.decode_windows(8, 10, 1) == (17,)
  assert sampling.decode_windows(8, 10, 3) == (11, 14, 17)       # 9 steps: 3 + 3 + 3
  assert sampling.decode_windows(8, 11, 3) == (12, 15, 18)       # 10 steps: 4 + 3 + 3
  assert sampling.decode_windows(8, 3, 5) == (9, 10)             # at most one segment per step
  assert sampling.decode_windows(8, 1, 4) == (8,)                # prefill only
  expected = [1] * 3 + [2, 3, 4, 4] if jax.default_backend() == 'cpu' else [1] * 7
  assert [sampling.decode_segments_default(n) for n in (1, 33, 64, 65, 97, 129, 1024)] == expected


@pytest.mark.slow      # one compile per segment count
@pytest.mark.parametrize('unroll_layers', [True, False])
def test_segmented_decoding_equals_one_loop_over_the_whole_cache(tiny_qwen3_dir, unroll_layers):
  """The decode loop in segments over growing caches gives the single loop's tokens and log-probs,
  also when rows stop (EOS) inside a segment and when every row is done before the last one."""
  cfg, params = hf.load_pretrained(tiny_qwen3_dir)
  tokens, mask = _prompts(cfg.vocab_size, [3, 6, 1], seed=5)
  kw = dict(max_new_tokens=20, temperature=0.8, top_k=20, unroll_layers=unroll_layers)
  free = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(4), decode_segments=1, **kw)
  # Row r's token at step 2 + 2r as a stop id: every row ends by step 7, in the first of 3 segments.
  early_stops = tuple(int(np.asarray(free.tokens)[r, 2 + 2 * r]) for r in range(3))
  for stops in [(), early_stops]:
    one = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(4), stop_token_ids=stops,
                          decode_segments=1, **kw)
    for segments in (3, 7):
      seg = sampling.sample(cfg, params, tokens, mask, jax.random.PRNGKey(4), stop_token_ids=stops,
                            decode_segments=segments, **kw)
      np.testing.assert_array_equal(np.asarray(seg.tokens), np.asarray(one.tokens))
      np.testing.assert_array_equal(np.asarray(seg.mask), np.asarray(one.mask))
      np.testing.assert_allclose(np.asarray(seg.logprobs), np.asarray(one.logprobs), atol=1e-5)
      np.testing.assert_allclose(np.asarray(seg.sample_logprobs), np.asarray(one.sample_logprobs), atol=1e-5)
  assert np.asarray(one.mask).sum(1).max() <= 7


def test_decode_loop_gathers_rope_rows_instead_of_computing_sin_cos(tiny_qwen2_dir):
  """The unrolled decode step reads cos / sin rows from tables made once before the loop (XLA:CPU
  otherwise recomputes them inside every layer's query / key loops)."""
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  tokens, mask = _prompts(cfg.vocab_size, [3, 6], seed=1)
  jaxpr = jax.make_jaxpr(lambda t, m: sampling.decode_loop.sample_padded(
      sampling.prepare_decode(cfg, params), t, m, jnp.ones(2, bool), jax.random.PRNGKey(0), jnp.float32(1),
      jnp.float32(1), jnp.full(4, -1, jnp.int32), jnp.int32(0), cfg=cfg, max_new_tokens=5, greedy=True,
      top_k=0, use_top_p=False, unroll_layers=True))(tokens, mask)
  inner = jaxpr.eqns[-1].params['jaxpr'].jaxpr

  def primitives(jaxpr, skip_while=False):   # names in jaxpr and its sub-jaxprs (pjit, cond, ...)
    names = set()
    for e in jaxpr.eqns:
      if skip_while and e.primitive.name == 'while':
        continue
      names.add(e.primitive.name)
      for sub in jax.core.jaxprs_in_params(e.params):
        names |= primitives(sub)
    return names

  body = [e for e in inner.eqns if e.primitive.name == 'while'][0].params['body_jaxpr'].jaxpr
  assert not primitives(body) & {'sin', 'cos'} and 'gather' in primitives(body)
  assert {'sin', 'cos'} <= primitives(inner, skip_while=True)             # the tables, before the loop


def test_segmented_decoding_runs_one_loop_per_segment_over_growing_caches(tiny_qwen2_dir):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  tokens, mask = _prompts(cfg.vocab_size, [3, 6], seed=1)
  P, N = tokens.shape[1], 13

  def loops(segments):
    jaxpr = jax.make_jaxpr(lambda t, m: sampling.decode_loop.sample_padded(
        sampling.prepare_decode(cfg, params), t, m, jnp.ones(2, bool), jax.random.PRNGKey(0), jnp.float32(1),
        jnp.float32(1), jnp.full(4, -1, jnp.int32), jnp.int32(0), cfg=cfg, max_new_tokens=N, greedy=True,
        top_k=0, use_top_p=False, unroll_layers=True, segments=segments))(tokens, mask)
    inner = jaxpr.eqns[-1].params['jaxpr'].jaxpr           # the jitted sampler's body
    whiles = [e for e in inner.eqns if e.primitive.name == 'while']
    # The loop carry holds the (B, S) key mask: its S is that loop's cache length.
    return [next(v.aval.shape[1] for v in e.outvars if v.aval.ndim == 2 and v.aval.shape[0] == 2
                 and v.aval.dtype == jnp.int32 and v.aval.shape[1] >= P) for e in whiles]

  assert loops(1) == [P + N - 1]
  assert loops(3) == list(sampling.decode_windows(P, N, 3)) == [P + 4, P + 8, P + 12]


def test_bucket_sizes():
  assert [sampling.bucket_size(n, 64) for n in (1, 2, 3, 5, 64, 65, 130)] == [1, 2, 4, 8, 64, 128, 192]
  assert [sampling.bucket_size(n, 128, 8) for n in (1, 9, 128, 129)] == [8, 16, 128, 256]


def test_batch_buckets_keep_two_bf16_rows_per_shard():
  f32 = qwen.QwenConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=4)
  bf16 = f32.replace(dtype='bfloat16')
  assert [sampling.batch_bucket(f32, n, True) for n in (1, 3, 64, 65)] == [1, 4, 64, 128]
  assert [sampling.batch_bucket(bf16, n, True) for n in (1, 3, 64, 65)] == [2, 4, 64, 128]
  assert sampling.batch_bucket(bf16, 1, False) == 1                   # the scanned sampler: no minimum
  # Over 8 shards: a multiple of 8 rows, and in bf16 at least 2 per shard.
  assert [sampling.batch_bucket(f32, n, True, 8) for n in (1, 9, 17, 65)] == [8, 16, 32, 128]
  assert [sampling.batch_bucket(bf16, n, True, 8) for n in (1, 9, 17, 65)] == [16, 16, 32, 128]


def test_bad_inputs_are_errors(tiny_qwen2_dir):
  cfg, params = hf.load_pretrained(tiny_qwen2_dir)
  tokens, mask = _prompts(cfg.vocab_size, [3, 2])
  key = jax.random.PRNGKey(0)
  run = lambda t=tokens, m=mask, **kw: sampling.sample(cfg, params, t, m, key, **{'max_new_tokens': 2, **kw})
  with pytest.raises(ValueError, match='LEFT-padded'):
    run(m=mask[:, ::-1])
  with pytest.raises(ValueError, match='no real token'):
    run(m=np.zeros_like(mask))
  with pytest.raises(ValueError, match='temperature'):
    run(temperature=0.0)
  with pytest.raises(ValueError, match='top_p'):
    run(top_p=0.0)
  with pytest.raises(ValueError, match='max_new_tokens'):
    run(max_new_tokens=0)
  for bad in (0, 2.5):
    with pytest.raises(ValueError, match='decode_segments'):
      run(decode_segments=bad)
  with pytest.raises(ValueError, match=r'\[0, 384\)'):
    run(t=tokens + 1000)
  with pytest.raises(ValueError, match=r'\(B, P\)'):
    run(t=tokens[0], m=mask[0])
