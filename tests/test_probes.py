"""cfrl_jax.dynamics.probes: probe sets, probe metrics against numpy, and the predicted /
linearised change of the probe log-probs against the actual change after an update (float64).

float64: as in test_ntk.py, a module fixture enters jax.enable_x64 for this module only, and the
models are built with dtype='float64'.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfrl_jax.dynamics import ntk, probes
from cfrl_jax.models import qwen

OPTS = {'xla_backend_optimization_level': 0}   # faster compiles; float64 numerics unchanged here


@pytest.fixture(scope='module', autouse=True)
def float64_model():
  with jax.enable_x64(True):
    yield


ARCH = {'qwen3_tied': dict(model_type='qwen3', tie='tied', qk_norm=True, attention_bias=False),
        'qwen2_untied': dict(model_type='qwen2', tie='untied')}


@functools.cache
def make_model(name):
  cfg = qwen.QwenConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                        num_kv_heads=1, head_dim=8, dtype='float64', param_dtype='float64', **ARCH[name])
  params = qwen.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return cfg, jax.tree_util.tree_unflatten(
      tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(params=['qwen3_tied', pytest.param('qwen2_untied', marks=pytest.mark.slow)])
def model(request):
  return make_model(request.param)


def jit(fn, *static, **kw):
  return jax.jit(functools.partial(fn, *static, **kw), compiler_options=OPTS)


def probe_arrays():
  """3 sequences [left-padded prompt | right-padded completion], T = 8."""
  tokens = np.random.RandomState(0).randint(1, 48, (3, 8))
  mask = np.array([[1, 1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]])
  cm = np.array([[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0]])
  return tokens, mask, cm


def test_make_probe_set_spreads_positions():
  tokens, mask, cm = probe_arrays()
  p = probes.make_probe_set(tokens, mask, cm, positions=3)
  # Seq 0: completion columns 3..6 -> 3 spread: 3, 5, 6 -> contexts end at 2, 4, 5.
  # Seq 1: columns 4..7 -> 4, 6, 7; seq 2: columns 4, 5 (only 2).
  np.testing.assert_array_equal(p.seq, [0, 0, 0, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(p.pos, [2, 4, 5, 3, 5, 6, 3, 4])
  np.testing.assert_array_equal(p.prompt_last, [2, 3, 3])
  assert probes.make_probe_set(tokens, mask, cm).seq.shape == (10,)        # all completion tokens
  with pytest.raises(ValueError, match='padding'):
    probes.make_probe_set(tokens, mask, np.ones_like(cm) * (1 - np.eye(3, 8, dtype=int)))
  with pytest.raises(ValueError, match='no completion'):
    probes.make_probe_set(tokens, mask, cm * np.array([[1], [1], [0]]))
  with pytest.raises(ValueError, match='positions'):
    probes.make_probe_set(tokens, mask, cm, positions=0)


def test_build_probe_set_from_rows(tiny_tokenizer_dir):
  from cfrl_jax import tokenization
  from cfrl_jax.policy import Policy
  tok = tokenization.load_tokenizer(tiny_tokenizer_dir)
  cfg, _ = make_model('qwen3_tied')
  policy = Policy(cfg=cfg, tokenizer=tok, stop_ids=(0,), pad_id=0)
  rows = [{'prompt': 'What is 12 + 34?', 'answer': '46', 'solution': 'The answer is 46.'},
          {'prompt': 'Hello', 'answer': '7', 'solutions': {'A': '3 * 7 = 21', 'B': 'x'}},
          {'prompt': 'The quick brown fox', 'answer': '21'}]
  p = probes.build_probe_set(policy, rows, None, positions=2, max_new_tokens=3)
  tokens, mask = np.asarray(p.tokens), np.asarray(p.mask)
  for i, (row, completion) in enumerate(zip(rows, ['The answer is 46.', '3 * 7 = 21', '21'])):
    prompt_ids = tok(row['prompt'])['input_ids']
    comp_ids = tok(completion, add_special_tokens=False)['input_ids'][:3]
    real = list(tokens[i][mask[i] > 0])
    assert real == list(prompt_ids) + list(comp_ids)
    assert p.prompt_last[i] == np.nonzero(mask[i])[0][0] + len(prompt_ids) - 1
  # Every entry's target is a completion token.
  assert (np.asarray(p.pos)[:, None] + 1 > np.asarray(p.prompt_last)[np.asarray(p.seq)][:, None]).all()
  with pytest.raises(ValueError, match='reference completion'):
    probes.build_probe_set(policy, [{'prompt': 'x'}], None)


def probed(cfg, params):
  """The probe metrics on probe_arrays() (2 positions per sequence) with what numpy checks them against:
  (probe, metrics, the log-prob kernel (E, E) parts, other (E, E): entry pairs from different sequences,
  phi (B, T, H): the backbone's features)."""
  probe = probes.make_probe_set(*probe_arrays(), positions=2)
  m = jit(probes.probe_metrics, cfg)(params, probe)
  k = jit(ntk.logprob_kernel, cfg)(params, probe.points)
  seq = np.asarray(probe.seq)
  other = seq[:, None] != seq[None, :]
  phi = np.asarray(qwen.features(cfg, params['backbone'], probe.tokens, probe.mask)[0])
  return probe, m, k, other, phi


@pytest.mark.slow
def test_probe_metrics_against_numpy(model):
  cfg, params = model
  probe, m, k, other, phi = probed(cfg, params)
  for name, kk in zip(('R', 'G', 'cross', 'total'), k):
    kk = np.asarray(kk)
    np.testing.assert_allclose(m[f'ntk_{name}_diag'], np.mean(np.diag(kk)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m[f'ntk_{name}_offdiag'], kk[other].mean(), rtol=1e-12, atol=1e-12)
  r, g = np.mean(np.diag(np.asarray(k.r))), np.mean(np.diag(np.asarray(k.g)))
  np.testing.assert_allclose(m['ntk_R_share'], r / (r + g), rtol=1e-12)
  np.testing.assert_allclose(m['ntk_reach'], m['ntk_total_offdiag'] / m['ntk_total_diag'], rtol=1e-12)
  phi = phi[np.arange(3), np.asarray(probe.prompt_last)]
  norms = np.linalg.norm(phi, axis=1)
  cos = (phi @ phi.T) / np.outer(norms, norms)
  np.testing.assert_allclose(m['phi_norm'], norms.mean(), rtol=1e-12)
  np.testing.assert_allclose(m['phi_cosine'], cos[~np.eye(3, dtype=bool)].mean(), rtol=1e-12)
  np.testing.assert_allclose(m['head_norm'], np.linalg.norm(np.asarray(qwen.head_params(cfg, params)['w'])),
                             rtol=1e-12)
  if cfg.tie == 'untied':
    assert m['ntk_cross_diag'] == 0


def pg_setup(cfg, params):
  """A policy-gradient batch: loss -1/N sum_i r_i sum_l log pi(y_il), and dL/dz (B, T, V)."""
  tokens, mask, cm = probe_arrays()
  batch_tokens = jnp.asarray(np.random.RandomState(5).randint(1, 48, (2, 8)))
  batch_mask = jnp.asarray(mask[:2])
  loss_mask = jnp.asarray(cm[:2, 1:])                 # positions t predicting token t + 1
  r_hat = jnp.asarray([1.0, -0.7])

  def loss_of_logits(z):
    logp = jnp.take_along_axis(jax.nn.log_softmax(z[:, :-1]), batch_tokens[:, 1:, None], -1)[..., 0]
    return -jnp.sum(r_hat[:, None] * logp * loss_mask) / 2

  def loss(p):
    return loss_of_logits(qwen.forward(cfg, p, batch_tokens, batch_mask)[0])

  @functools.partial(jax.jit, compiler_options=OPTS)
  def grads(p):
    z = qwen.forward(cfg, p, batch_tokens, batch_mask)[0]
    return jax.grad(loss)(p), jax.grad(loss_of_logits)(z)

  g, dz = grads(params)
  return batch_tokens, batch_mask, g, dz


@pytest.mark.slow
def test_predicted_and_linearized_change_are_first_order(model):
  cfg, params = model
  probe = probes.make_probe_set(*probe_arrays(), positions=2)
  batch_tokens, batch_mask, grad, dz = pg_setup(cfg, params)
  logp = jit(probes.probe_logprobs, cfg)
  base = logp(params, probe)
  pred = jit(probes.predict_logprob_change, cfg)(params, probe, batch_tokens, batch_mask, dz, 1.0)
  linearized = jit(probes.linearized_logprob_change, cfg)
  np.testing.assert_allclose(pred.r + pred.g + pred.cross, pred.total, rtol=1e-12, atol=1e-12)
  # The NTK prediction of an SGD step equals the JVP along -grad (two independent routes).
  lin_sgd = linearized(params, probe, jax.tree_util.tree_map(lambda g: -g, grad))
  np.testing.assert_allclose(pred.total, lin_sgd.total, rtol=1e-10, atol=1e-10)
  # Adam's first step is eta * sign(grad): not the gradient, yet the JVP is still first-order exact.
  adam_dir = jax.tree_util.tree_map(lambda g: -jnp.sign(g), grad)
  lin_adam = linearized(params, probe, adam_dir)
  errors = {'sgd': [], 'adam': []}
  for eta in (4e-4, 2e-4, 1e-4):
    sgd = jax.tree_util.tree_map(lambda p, g, e=eta: p - e * g, params, grad)
    errors['sgd'].append(float(jnp.max(jnp.abs(logp(sgd, probe) - base - eta * pred.total))))
    adam = jax.tree_util.tree_map(lambda p, d, e=eta: p + e * d, params, adam_dir)
    errors['adam'].append(float(jnp.max(jnp.abs(logp(adam, probe) - base - eta * lin_adam.total))))
  for errs in errors.values():
    for big, small in zip(errs, errs[1:]):
      assert 3.0 <= big / small <= 5.0, errors


@pytest.mark.slow
def test_training_probe_reports_floats_the_report_reads(model):
  cfg, params = model
  probe = probes.make_probe_set(*probe_arrays(), positions=2)
  _, _, grad, _ = pg_setup(cfg, params)
  after = jax.tree_util.tree_map(lambda p, g: p - 1e-4 * g, params, grad)
  out = probes.training_probe(cfg, params, after, probe)
  assert all(isinstance(v, float) for v in out.values())
  ntk_keys = [k for k in out if re.fullmatch(r'ntk_(R|G|cross|total)_(diag|offdiag)', k)]
  assert len(ntk_keys) == 8
  for k in ('ntk_R_share', 'phi_cosine', 'phi_norm', 'head_norm', 'logprob_change_actual',
            'logprob_change_linear', 'logprob_change_linear_rel_error'):
    assert np.isfinite(out[k]), k
  logp = jit(probes.probe_logprobs, cfg)
  np.testing.assert_allclose(out['logprob_change_actual'],
                             float(jnp.mean(logp(after, probe) - logp(params, probe))), rtol=1e-10)
  np.testing.assert_allclose(out['logprob_change_linear_head'] + out['logprob_change_linear_backbone'],
                             out['logprob_change_linear'], rtol=1e-10)
  assert out['logprob_change_linear_rel_error'] < 0.05     # a small step is nearly linear


def test_offdiagonal_r_share_on_a_hand_built_kernel():
  # Entries 0, 1 in sequence 0 and entry 2 in sequence 1: the cross-sequence pairs are (0,2), (1,2)
  # and their mirrors. |R| there: 2, 4 -> mean 3; |G|: 1, 3 (signs mixed) -> mean 2; share 3 / 5.
  r = np.array([[9., 7., 2.], [7., 9., -4.], [2., -4., 9.]])
  g = np.array([[5., 8., -1.], [8., 5., 3.], [-1., 3., 5.]])
  share = probes.r_share_offdiag(jnp.asarray(r), jnp.asarray(g), jnp.asarray([0, 0, 1]))
  np.testing.assert_allclose(float(share), 3 / 5, rtol=1e-12)
  # A signed ratio R_off / (R_off + G_off) would leave [0, 1] here: (-2/4) / (-2/4 + 2/4) divides by 0.
  assert 0 <= float(share) <= 1


@pytest.mark.slow
def test_response_feature_cosine_and_offdiagonal_share_against_numpy(model):
  cfg, params = model
  probe, m, k, other, phi = probed(cfg, params)
  r_abs, g_abs = np.abs(np.asarray(k.r))[other].mean(), np.abs(np.asarray(k.g))[other].mean()
  np.testing.assert_allclose(m['ntk_R_share_offdiag'], r_abs / (r_abs + g_abs), rtol=1e-12)
  entries = phi[np.asarray(probe.seq), np.asarray(probe.pos)]
  unit = entries / np.linalg.norm(entries, axis=1, keepdims=True)
  np.testing.assert_allclose(m['phi_cosine_response'], (unit @ unit.T)[other].mean(), rtol=1e-12)


@pytest.mark.slow
def test_probe_set_with_every_format_and_per_format_changes(tiny_tokenizer_dir, model):
  from cfrl_jax.policy import make_policy
  from cfrl_jax.tokenization import load_tokenizer
  cfg, params = model
  tok = load_tokenizer(tiny_tokenizer_dir)
  policy = make_policy(cfg.replace(vocab_size=max(cfg.vocab_size, len(tok))), tok)
  rows = [{'prompt': 'What is 1 + 2?', 'solutions': {'steps': ' 1 + 2 = 3. The answer is 3.', 'direct': ' #### 3'}},
          {'prompt': 'What is 4 - 1?', 'solutions': {'steps': ' 4 - 1 = 3. The answer is 3.', 'direct': ' #### 3'}}]
  assert probes.solution_formats(rows) == ['steps', 'direct']
  p = probes.build_probe_set(policy, rows, positions=2, max_new_tokens=6, formats='all')
  np.testing.assert_array_equal(p.group, [0, 1, 0, 1])   # row-major: each prompt with every format
  first = probes.build_probe_set(policy, rows, positions=2, max_new_tokens=6)
  np.testing.assert_array_equal(first.group, [0, 0])
  np.testing.assert_array_equal(first.tokens[1, -6:], p.tokens[2, -6:])   # row 1's first format
  p = p._replace(tokens=p.tokens % cfg.vocab_size)
  grad = jax.tree_util.tree_map(lambda x: 1e-4 * jnp.ones_like(x), params)
  after = jax.tree_util.tree_map(lambda a, d: a + d, params, grad)
  out = probes.training_probe(cfg, params, after, p, group_names=('steps', 'direct'))
  actual = np.asarray(jit(probes.probe_logprobs, cfg)(after, p) - jit(probes.probe_logprobs, cfg)(params, p))
  entry_fmt = np.asarray(p.group)[np.asarray(p.seq)]
  for g, name in enumerate(('steps', 'direct')):
    np.testing.assert_allclose(out[f'logprob_change_actual_{name}'], actual[entry_fmt == g].mean(), rtol=1e-9)
    np.testing.assert_allclose(out[f'logprob_change_linear_head_{name}'] + out[f'logprob_change_linear_backbone_{name}'],
                               out[f'logprob_change_linear_{name}'], rtol=1e-9)


def test_head_share_against_jvps_of_the_probe_logprobs(model):
  cfg, params = model
  if cfg.tie == 'tied':
    pytest.skip('a tied head lives in the backbone: CF-RL unties it first')
  probe = probes.make_probe_set(*probe_arrays(), positions=2)
  keys = iter(jax.random.split(jax.random.PRNGKey(7), 64))
  noise = lambda tree: jax.tree_util.tree_map(lambda x: 1e-3 * jax.random.normal(next(keys), x.shape, x.dtype), tree)
  after = dict(params, head=jax.tree_util.tree_map(lambda a, d: a + d, params['head'], noise(params['head'])))
  step = noise(params['backbone'])
  logp = functools.partial(probes.probe_logprobs, cfg, probe=probe)
  zeros = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)
  head_delta = jax.tree_util.tree_map(lambda a, b: a - b, after['head'], params['head'])
  _, h = jax.jvp(logp, (params,), ({'head': head_delta, 'backbone': zeros(params['backbone'])},))
  _, b = jax.jvp(logp, (params,), ({'head': zeros(params['head']), 'backbone': step},))
  expected = abs(float(jnp.mean(h))) / (abs(float(jnp.mean(h))) + abs(float(jnp.mean(b))))
  np.testing.assert_allclose(float(probes.head_share(cfg, params, after, step, probe)), expected, rtol=1e-9)
