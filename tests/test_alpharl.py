"""The AlphaRL run mode: exact extrapolation of a rank-1 linear window, gain arithmetic, config checks, and
the demo's smoke config end to end through experiment.run.

The synthetic window follows W_t = W_0 + max(t - t_0, 0) c u v^T for every kernel (k_proj frozen) and a
head moving linearly from step 0, saved with the trainer's Checkpointer, so every extrapolated model has a
hand-written value at the target step.
"""
import copy
import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest

from cfrl_jax import alpharl, experiment, report
from cfrl_jax.analysis import alpharl_fit, rank1
from cfrl_jax.config import base_config
from cfrl_jax.main import load_config_file
from cfrl_jax.models import qwen
from cfrl_jax.run_setup import evaluator_for_run
from cfrl_jax.train import checkpoint
from test_rank1 import unit_rank1   # per-layer unit u v^T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = qwen.QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
FROZEN = 'k_proj'
WINDOW = (0, 2, 4, 6, 8)
TARGET = 20


def _trajectory(origin):
  """(base, at(t)): kernels linear in max(t - origin, 0) along one rank-1 direction per layer, head in t."""
  shapes = jax.eval_shape(lambda key: qwen.init_params(CFG, key), jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  base = jax.tree_util.tree_map(lambda s: (0.02 * rng.normal(size=s.shape)).astype(np.float32), shapes)
  fb = rank1.flatten(base)
  directions = {}
  for p in rank1.matrix_paths(base):
    L, m, n = fb[p].shape
    uv = unit_rank1(rng, L, m, n)
    c = 0.002 * rng.uniform(1, 2, size=L) * rng.choice([-1, 1], size=L)
    directions[p] = np.zeros((L, m, n)) if p[2] == FROZEN else c[:, None, None] * uv
  head_dir = 0.001 * rng.normal(size=fb[('head', 'w')].shape)

  def at(t):
    leaves = {p: np.asarray(w, np.float64) for p, w in fb.items()}
    for p, d in directions.items():
      leaves[p] = leaves[p] + max(t - origin, 0) * d
    leaves[('head', 'w')] = leaves[('head', 'w')] + t * head_dir
    return rank1.unflatten({p: w.astype(np.float32) for p, w in leaves.items()}, base)
  return base, at


def _save_window(run_dir, at, origin):
  ckpt = checkpoint.Checkpointer(run_dir)
  for t in WINDOW:
    stage = 0 if origin == 0 else (1 if t < origin else 2)
    ckpt.save(t, at(t), {'opt': np.zeros(3, np.float32)},
              {'model_config': dataclasses.asdict(CFG), 'stage': stage, 'stage_start': origin if stage == 2 else 0})
  ckpt.close()


def _assert_trees_close(a, b, atol):
  fa, fb = rank1.flatten(a), rank1.flatten(b)
  assert fa.keys() == fb.keys()
  for p in fa:
    np.testing.assert_allclose(np.asarray(fa[p], np.float64), np.asarray(fb[p], np.float64), rtol=0, atol=atol,
                               err_msg=rank1.path_name(p))


@pytest.mark.parametrize('origin', [0, 2])   # plain RL; CF-RL whose stage 2 starts at step 2
def test_exact_rank1_linear_window_extrapolates_to_the_analytic_final_params(tmp_path, origin):
  _, at = _trajectory(origin)
  _save_window(str(tmp_path), at, origin)
  fit = alpharl_fit.fit_window(str(tmp_path), WINDOW[-1], TARGET, keep=('head',))
  assert fit.origin == origin and fit.fit_steps == [s for s in WINDOW if s > origin]
  final, base, window = at(TARGET), at(0), at(WINDOW[-1])
  fb, ff, fw = rank1.flatten(base), rank1.flatten(final), rank1.flatten(window)
  kernels = {p for p in ff if rank1.leaf_group(p, False) == 'matrix'}
  # A: the analytic kernels at step 20, everything else at base; B: the head of the window end.
  expect_a = rank1.unflatten({p: ff[p] if p in kernels else fb[p] for p in fb}, base)
  expect_b = rank1.unflatten({p: ff[p] if p in kernels else fw[p] if p == ('head', 'w') else fb[p] for p in fb}, base)
  # float32 storage of 2e-2 weights: ~2e-9 rounding, amplified by the extrapolation factor.
  _assert_trees_close(fit.models['alpharl_A'], expect_a, atol=5e-8)
  _assert_trees_close(fit.models['alpharl_B'], expect_b, atol=5e-8)
  # ExPO extends every leaf linearly from step 0: exact for the head, and for the kernels when they start at 0.
  expo = rank1.flatten(fit.models['expo'])
  np.testing.assert_allclose(expo[('head', 'w')], ff[('head', 'w')], atol=5e-8)
  q = ('backbone', 'layers', 'q_proj', 'kernel')
  expo_q = fb[q] + TARGET / WINDOW[-1] * (fw[q].astype(np.float64) - fb[q])
  np.testing.assert_allclose(expo[q], expo_q, atol=5e-8)
  assert (origin == 0) == np.allclose(expo[q], ff[q], atol=5e-8)
  np.testing.assert_allclose(fit.diagnostics['r2_median'], 1.0, atol=1e-6)
  # The checkpoint-streaming fit is rank1.fit_params_extrapolation's.
  fits = rank1.fit_params_extrapolation(base, [(s, at(s)) for s in fit.fit_steps], origin)
  _assert_trees_close(rank1.alpharl_params(base, fits, TARGET), fit.models['alpharl_A'], atol=1e-9)


def test_a_window_still_in_cfrl_stage_one_cannot_be_fitted(tmp_path):
  _, at = _trajectory(10)
  _save_window(str(tmp_path), at, 10)
  with pytest.raises(ValueError, match='head-only stage'):
    alpharl_fit.fit_window(str(tmp_path), WINDOW[-1], TARGET)


def test_share_of_gain_and_verdicts_against_hand_computed_values():
  share, se = alpharl_fit.share_of_gain(0.46, 0.01, 0.40, 0.012, 0.48, 0.013)
  assert share == pytest.approx(0.75, abs=1e-12)
  # se^2 gain^2 = 0.01^2 + 0.75^2 0.013^2 + 0.25^2 0.012^2 = 1e-4 + 9.50625e-5 + 9e-6 = 2.040625e-4
  assert se == pytest.approx(math.sqrt(2.040625e-4) / 0.08, rel=1e-12)
  assert alpharl_fit.share_of_gain(0.40, 0.0, 0.40, 0.0, 0.48, 0.0) == (0.0, 0.0)
  assert alpharl_fit.share_of_gain(0.52, 0.0, 0.40, 0.0, 0.48, 0.0)[0] == pytest.approx(1.5)
  with pytest.warns(RuntimeWarning, match='min_gain'):
    share, se = alpharl_fit.share_of_gain(0.5, 0.01, 0.4, 0.01, 0.4, 0.01)
  assert math.isnan(share) and math.isnan(se)
  assert alpharl_fit.target_verdict(0.97, 0.005, 0.4) == 'met'
  assert alpharl_fit.target_verdict(0.90, 0.01, 0.4) == 'not met'
  assert alpharl_fit.target_verdict(0.90, 0.05, 0.4) == 'within noise'
  assert alpharl_fit.target_verdict(0.99, 0.001, 0.5) == 'not met'     # too many steps
  assert alpharl_fit.target_verdict(float('nan'), 0.1, 0.4) == 'n/a'
  # greedy accuracy: a mean of 0/1 over n problems, s.e. sqrt(p (1 - p) / (n - 1)).
  value, se = alpharl_fit.metric_value({'greedy_accuracy': 0.75, 'num_problems': 17.0}, 'greedy_accuracy', 'x')
  assert (value, se) == (0.75, pytest.approx(math.sqrt(0.75 * 0.25 / 16)))
  assert alpharl_fit.metric_value({'pass@1': 0.5, 'pass@1_stderr': 0.02}, 'pass@1', 'x') == (0.5, 0.02)
  with pytest.raises(ValueError, match="'pass@1'.*greedy_accuracy"):
    alpharl_fit.metric_value({'step': 0, 'greedy_accuracy': 0.5}, 'pass@1', 'step 0')


def _config(**alpharl_values):
  c = base_config('arithmetic')
  c.rl.steps = 100
  c.cfrl.enabled = False
  c.alpharl.update(alpharl_values)
  return c


@pytest.mark.parametrize('values, match', [
    (dict(window=0.0), 'window=0.0'), (dict(window=1.5), r'\(0, 1\]'), (dict(window=0.004), 'rounds to 0'),
    (dict(fit_every=0), 'fit_every=0'), (dict(window=0.1, fit_every=20), 'fit_every=20 exceeds'),
    (dict(continue_steps=-2), 'continue_steps=-2'), (dict(continue_from='C'), 'continue_from'),
    (dict(keep='heads'), 'heads'), (dict(keep=''), 'keep is empty'), (dict(metric=''), 'metric is empty'),
])
def test_bad_settings_are_clear_errors(values, match):
  with pytest.raises(ValueError, match=match):
    alpharl.check_config(_config(**values))


def test_settings_resolve_and_cross_checks():
  s = alpharl.check_config(_config(window=0.4, fit_every=5, continue_steps=-1))
  assert (s.planned_steps, s.window_steps, s.continue_steps, s.keep) == (100, 40, 60, ('head',))
  c = _config()
  c.eval.samples = 0
  with pytest.raises(ValueError, match='eval.samples'):
    alpharl.check_config(c)
  c = _config(window=0.1)
  c.cfrl.enabled, c.cfrl.stage1_steps = True, 10
  with pytest.raises(ValueError, match='stage1_steps=10'):
    alpharl.check_config(c)
  w = alpharl.window_config(_config(fit_every=4), s)
  assert (w.rl.steps, w.checkpoint.every, w.checkpoint.max_to_keep) == (40, 5, 0)
  assert alpharl.resolve_reference('runs/x/{arm}/seed{seed}', 'grpo', 3) == 'runs/x/grpo/seed3'
  with pytest.raises(ValueError, match='single run'):
    alpharl.resolve_reference('runs/x/{arm}', None, 0)


def test_reference_run_checks(tmp_path):
  config = _config()
  ref = tmp_path / 'ref'
  ref.mkdir()
  with pytest.raises(FileNotFoundError, match='config.json'):
    alpharl.load_reference(str(ref), config, 'pass@1')
  other = copy.deepcopy(config)
  other.rl.lr = 1e-3
  (ref / 'config.json').write_text(other.to_json_best_effort())
  with pytest.raises(ValueError, match='rl.lr'):
    alpharl.load_reference(str(ref), config, 'pass@1')
  (ref / 'config.json').write_text(config.to_json_best_effort())
  records = [{'step': 0, 'kind': 'eval', 'pass@1': 0.4, 'pass@1_stderr': 0.01},
             {'step': 60, 'kind': 'eval', 'pass@1': 0.45, 'pass@1_stderr': 0.01}]
  (ref / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  with pytest.raises(ValueError, match='did not finish'):
    alpharl.load_reference(str(ref), config, 'pass@1')
  records.append({'step': 100, 'kind': 'eval', 'pass@1': 0.5, 'pass@1_stderr': 0.02})
  (ref / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  out = alpharl.load_reference(str(ref), config, 'pass@1')
  assert (out['accuracy'], out['stderr'], out['base_accuracy'], out['final_step']) == (0.5, 0.02, 0.4, 100)
  assert alpharl.reference_mismatches(config, json.loads(config.to_json_best_effort())) == []


@pytest.mark.slow      # an AlphaRL study end to end: window, fits, seven models' evals, continuation
def test_demo_smoke_runs_end_to_end_through_experiment(tmp_path, smoke_pretrain_cache):
  """AlphaRL for the CF-GRPO arm of the demo's smoke config: window of 2 of 5 steps, fit, evals, continuation."""
  c = load_config_file(os.path.join(REPO, 'configs', 'demo.py') + ':smoke')
  study = tmp_path / 'run'
  c.run_dir = str(study)
  c.pretrain.cache_dir = smoke_pretrain_cache       # the session's smoke base (tests/conftest.py)
  c.log.progress = False
  c.log.tensorboard = False
  c.probe.every = 0          # the eNTK probes' compiles would double the test's time; they are not AlphaRL's
  c.arms = 'cfgrpo'
  c.rl.steps = 5
  c.alpharl.enabled = True
  c.alpharl.fit_every = 1
  c.alpharl.continue_steps = 1
  # A finished reference study with hand-written evals; AlphaRL finds <study>/cfgrpo/seed0 in it.
  ref = tmp_path / 'ref' / 'cfgrpo' / 'seed0'
  ref.mkdir(parents=True)
  (ref / 'config.json').write_text(experiment.arm_config(c, 'cfgrpo', 0).to_json_best_effort())
  c.alpharl.reference_run = str(tmp_path / 'ref')
  records = [{'step': 0, 'kind': 'eval', 'pass@1': 0.0, 'pass@1_stderr': 0.0},
             {'step': 5, 'kind': 'eval', 'pass@1': 0.25, 'pass@1_stderr': 0.05}]
  (ref / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))

  out = experiment.run(c)
  run_dir = os.path.join(out, 'cfgrpo', 'seed0')
  assert out == os.path.join(str(study), 'alpharl')
  for name in ('alpharl.json', 'alpharl.md', 'alpharl.png', 'config.json'):
    assert os.path.exists(os.path.join(run_dir, name)), name
  assert os.path.exists(os.path.join(out, 'alpharl.md'))
  assert not os.path.exists(os.path.join(str(study), 'study.json'))   # a normal study's files are not written
  r = json.load(open(os.path.join(run_dir, 'alpharl.json')))
  assert (r['planned_steps'], r['window_steps'], r['step_fraction']) == (5, 2, 0.4)
  assert checkpoint.available_steps(run_dir) == [0, 1, 2]
  assert r['fit_origin'] == 1 and r['fit_steps'] == [2]      # CF-RL: stage 2 starts after stage1_steps=1
  # The released (PLS) variants need 2 checkpoints after CF-RL's stage-2 start; this window has one.
  assert set(r['models']) == {'base', 'window', 'alpharl_A', 'alpharl_B', 'expo', 'expo_tuned', 'continued',
                              'reference'}
  assert not r['released']['fitted'] and 'at least 2' in r['released']['reason']
  assert r['expo_selection']['split'].startswith('eval problems 16..31')
  base = r['models']['base']
  for name, m in r['models'].items():
    assert 0.0 <= m['accuracy'] <= 1.0
    if name != 'base':
      assert m['share'] == pytest.approx((m['accuracy'] - base['accuracy']) / (0.25 - base['accuracy']))
  assert r['models']['reference']['share'] == pytest.approx(1.0)
  assert r['reference']['run'] == str(ref)
  # The continuation starts from variant B at data step 2 and trains steps 3 .. 3.
  cdir = os.path.join(run_dir, 'continued')
  train_steps = [json.loads(line)['step'] for line in open(os.path.join(cdir, 'metrics.jsonl'))
                 if json.loads(line)['kind'] == 'train']
  assert train_steps == [3] and checkpoint.available_steps(cdir) == [2, 3]
  start = rank1.flatten(checkpoint.restore_params(cdir, 2))
  b = rank1.flatten(alpharl_fit.fit_window(run_dir, 2, 5).models['alpharl_B'])
  for p in b:
    np.testing.assert_array_equal(start[p], b[p])
  md = open(os.path.join(run_dir, 'alpharl.md')).read()
  assert 'share of the gain' in md and 'B: rank-1 step line' in md and '](alpharl.png)' in md
  assert "the paper's AlphaRL" not in md and 'Released AlphaRL (PLS) not fitted' in md
  with pytest.raises(ValueError, match='resume'):   # a second run would mix two histories
    experiment.run(c)
  # The report of the AlphaRL directory carries the AlphaRL section, its plot linked from report.md.
  report_md = open(report.write_report(out)).read()
  assert '### AlphaRL: demo_smoke (grpo, CF-RL, seed 0)' in report_md
  link = 'cfgrpo/seed0/alpharl.png'
  assert f']({link})' in report_md and os.path.exists(os.path.join(out, link))
  # cfrl_jax.analyze --evaluate=task on this run scores checkpoints exactly as the run's own eval did.
  logged = alpharl.eval_records(run_dir)[0]
  base_params = checkpoint.restore_params(run_dir, 0)
  auto = evaluator_for_run(run_dir)
  assert auto.metric == 'pass@1'
  assert auto(base_params) == pytest.approx(logged['pass@1'], abs=1e-9)
  assert evaluator_for_run(run_dir, metric='greedy_accuracy')(base_params) == pytest.approx(
      logged['greedy_accuracy'], abs=1e-9)
  with pytest.raises(ValueError, match='not computed'):
    evaluator_for_run(run_dir, metric='pass@64')(base_params)
