"""completion_stats: values and gradients equal plain autodiff through log_softmax; collect pads prompts as told."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax.models import qwen
from cfrl_jax.train import rollout


def test_logp_and_lse_values_and_gradients_match_autodiff():
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 11)) * 3.0
  y = jax.random.randint(jax.random.PRNGKey(1), (3, 5), 0, 11)
  gl, gs = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 5))

  def ours(z):
    logp, lse = rollout.logp_and_lse(z, y)
    return jnp.sum(gl * logp + gs * lse), (logp, lse)

  def plain(z):
    logp = jnp.take_along_axis(jax.nn.log_softmax(z), y[..., None], axis=-1)[..., 0]
    lse = jax.nn.logsumexp(z, axis=-1)
    return jnp.sum(gl * logp + gs * lse), (logp, lse)

  (_, a), ga = jax.value_and_grad(ours, has_aux=True)(z)
  (_, b), gb = jax.value_and_grad(plain, has_aux=True)(z)
  for u, v in zip(a, b):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_completion_stats_match_a_full_forward():
  cfg = qwen.QwenConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=4)
  params = qwen.init_params(cfg, jax.random.PRNGKey(0), std=0.5)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 9), 1, 37)
  mask = jnp.ones((2, 9), jnp.int32).at[0, :2].set(0)
  P = 4
  logp, ent, maxp, _ = rollout.completion_stats(cfg, params, tokens, mask, P)
  z, _ = qwen.forward(cfg, params, tokens, mask)
  ls = jax.nn.log_softmax(z[:, P - 1:-1])
  np.testing.assert_allclose(logp, jnp.take_along_axis(ls, tokens[:, P:, None], -1)[..., 0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, -jnp.sum(jnp.exp(ls) * ls, -1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(maxp, jnp.exp(ls).max(-1), rtol=1e-5, atol=1e-6)
  # only logp is differentiated: the entropy is a metric
  g = jax.grad(lambda p: jnp.sum(rollout.completion_stats(cfg, p, tokens, mask, P)[1]))(params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(g))


@pytest.mark.slow
def test_collect_pads_prompts_to_the_width_it_is_given(tiny_tokenizer_dir):
  """prompt_width (per-host loading's cross-process maximum) only adds left padding: same samples."""
  import transformers
  from cfrl_jax import policy as policy_lib
  from cfrl_jax import tokenization
  tok = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
  cfg = qwen.QwenConfig(vocab_size=384, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=4)
  policy = policy_lib.make_policy(cfg, tok)
  params = qwen.init_params(cfg, jax.random.PRNGKey(0), std=0.5)
  rows = [{'prompt': 'Hello world!', 'k': 1}, {'prompt': 'The quick brown fox jumps.', 'k': 2}]
  seen = []
  reward = lambda prompts, completions, k, **_: seen.append(list(k)) or [float(len(c)) for c in completions]
  kw = dict(group_size=2, max_new_tokens=5, temperature=1.0)
  key = jax.random.PRNGKey(4)
  plain = rollout.collect(policy, params, rows, [(reward, 1.0)], key, **kw)
  P = plain.tokens.shape[1] - 5
  widths = []
  wide = rollout.collect(policy, params, rows, [(reward, 1.0)], key,
                         prompt_width=lambda p: widths.append(p) or p + 3, **kw)
  assert widths == [P] and wide.tokens.shape == (4, P + 3 + 5)
  pad = tokenization.pad_id(tok)
  np.testing.assert_array_equal(wide.tokens[:, :3], pad)
  np.testing.assert_array_equal(wide.mask[:, :3], 0)
  np.testing.assert_array_equal(wide.tokens[:, 3:], plain.tokens)
  np.testing.assert_array_equal(wide.mask[:, 3:], plain.mask)
  assert wide.completions == plain.completions and wide.prompts == plain.prompts
  np.testing.assert_array_equal(wide.rewards, plain.rewards)
  np.testing.assert_allclose(wide.old_logp, plain.old_logp, atol=1e-5)
  assert seen == [[1, 1, 2, 2]] * 2                  # group-major rows, extra columns passed through
  with pytest.raises(ValueError, match='prompt_width'):
    rollout.collect(policy, params, rows, [(reward, 1.0)], key, prompt_width=lambda p: p - 1, **kw)
