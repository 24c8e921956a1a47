"""Tests of the run analysis command on a tiny run saved with the trainer's Checkpointer.

The run's kernels follow W_t = W_0 + t c u v^T exactly (k_proj frozen), the head moves
linearly, norms and biases stay put; the evaluate function is linear in the parameters,
so every statistic and recovered gain has a hand-computed value.
"""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from cfrl_jax import analyze
from cfrl_jax.analysis import rank1, update_dynamics, update_dynamics_report
from cfrl_jax.models import qwen
from cfrl_jax.train import checkpoint
from test_rank1 import unit_rank1   # per-layer unit u v^T

STEPS = (0, 2, 4, 6, 8, 10, 12)
FROZEN = 'k_proj'
HEAD_WEIGHT = 0.25        # share of the evaluate score carried by the head
CFG = qwen.QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trajectory():
  # The real tree layout (eval_shape: no compilation), filled with numpy numbers.
  shapes = jax.eval_shape(lambda key: qwen.init_params(CFG, key), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  base = jax.tree_util.tree_map(lambda s: (0.02 * rng.normal(size=s.shape)).astype(np.float32), shapes)
  fb = rank1.flatten(base)
  for p in fb:
    if p[-1] == 'bias':
      fb[p][...] = 0.0
    elif p[-1].endswith('_norm'):
      fb[p][...] = 1.0
  directions = {}
  for p in rank1.matrix_paths(base):
    L, m, n = fb[p].shape
    uv = unit_rank1(rng, L, m, n)
    c = 0.002 * rng.uniform(1, 2, size=L)
    directions[p] = 0.0 if p[2] == FROZEN else c[:, None, None] * uv
  head_dir = 0.001 * rng.normal(size=fb[('head', 'w')].shape)

  def at(t):
    leaves = dict(fb)
    for p, d in directions.items():
      leaves[p] = (fb[p] + t * d).astype(np.float32)
    leaves[('head', 'w')] = (fb[('head', 'w')] + t * head_dir).astype(np.float32)
    return rank1.unflatten(leaves, base)
  return base, at, directions, head_dir


def _linear_evaluate(base, directions, head_dir, final_step):
  """acc(params) = (1 - HEAD_WEIGHT) * kernel progress + HEAD_WEIGHT * head progress, in [0, 1] on the run."""
  fb = rank1.flatten(base)
  total = sum(float(np.sum((final_step * d) ** 2)) for d in directions.values() if np.ndim(d))

  def evaluate(params):
    fp = rank1.flatten(params)
    kern = sum(float(np.sum((fp[p].astype(np.float64) - fb[p]) * final_step * d))
               for p, d in directions.items() if np.ndim(d)) / total
    head = float(np.sum((fp[('head', 'w')].astype(np.float64) - fb[('head', 'w')]) * final_step * head_dir)
                 ) / float(np.sum((final_step * head_dir) ** 2))
    return (1 - HEAD_WEIGHT) * kern + HEAD_WEIGHT * head
  return evaluate


def _save_run(run_dir, at, steps):
  ckpt = checkpoint.Checkpointer(run_dir)
  for t in steps:
    ckpt.save(t, at(t), {'opt': np.zeros(3, np.float32)},
              {'model_config': dataclasses.asdict(CFG), 'stage': 'classifier' if t < 4 else 'full'})
  ckpt.close()


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  run_dir = str(tmp_path_factory.mktemp('run'))
  base, at, directions, head_dir = _trajectory()
  _save_run(run_dir, at, STEPS)
  evaluate = _linear_evaluate(base, directions, head_dir, STEPS[-1])
  config = update_dynamics.AnalysisConfig(ks=(1, 2), windows=(1 / 3, 0.5))
  analysis = update_dynamics.analyze_run(run_dir, config, evaluate)
  out = os.path.join(run_dir, 'analysis')
  files = update_dynamics_report.write_report(analysis, out)
  return run_dir, analysis, files


def test_weight_statistics_of_an_exact_rank1_linear_run(run):
  _, analysis, _ = run
  assert analysis['base_step'] == 0 and analysis['steps'] == list(STEPS[1:])
  assert set(analysis['matrices']) == set(rank1.MATRIX_NAMES)
  for name, m in analysis['matrices'].items():
    if name == FROZEN:
      assert np.all(np.isnan(m['share']['1'])) and np.all(np.isnan(m['r2_step']))
      assert np.all(np.isnan(m['cos_u'])) and np.all(np.isnan(m['relex']['r2']))
      np.testing.assert_array_equal(m['update_norm'], 0.0)
      continue
    # float32 storage rounds the kernels (~1e-9 absolute on 2e-2 updates).
    np.testing.assert_allclose(m['share']['1'], 1.0, atol=1e-6)
    np.testing.assert_allclose(m['r2_step'], 1.0, atol=1e-6)
    np.testing.assert_allclose(m['r2_pooled'], 1.0, atol=1e-6)
    np.testing.assert_allclose(m['relex']['share'], 1.0, atol=1e-6)
    np.testing.assert_allclose(m['relex']['r2'], 1.0, atol=1e-6)
    np.testing.assert_allclose(m['r2_full_pooled'], 1.0, atol=1e-6)
    np.testing.assert_allclose(m['cos_u'], 1.0, atol=1e-6)
    # The coefficient on the final direction is ||dW_t||_F = t * c.
    np.testing.assert_allclose(m['coefficient'], m['update_norm'], rtol=1e-5)
    # The checkpoint accuracies are linear in step, so the coefficient fits them exactly too.
    np.testing.assert_allclose(m['r2_accuracy'], 1.0, atol=1e-6)
  other = analysis['other_updates']
  assert other['norms']['update_norm'][-1] == 0 and other['biases']['update_norm'][-1] == 0
  assert other['head']['update_norm'][-1] > 0
  assert analysis['stages'] == {'0': 'classifier', '2': 'classifier', '4': 'full', '6': 'full', '8': 'full',
                                '10': 'full', '12': 'full'}


def test_recovered_gains_and_extrapolation(run):
  _, analysis, _ = run
  ev = analysis['evaluation']
  assert ev['accuracy']['base'] == pytest.approx(0.0, abs=1e-6)
  assert ev['accuracy']['final'] == pytest.approx(1.0, abs=1e-5)
  gains = ev['recovered_gain']
  for k in ('rank1', 'rank2', 'full'):
    assert gains[f'{k}_A'] == pytest.approx(1 - HEAD_WEIGHT, abs=1e-5)   # head kept at base
    assert gains[f'{k}_B'] == pytest.approx(1.0, abs=1e-5)
  windows = {e['window_end']: e for e in analysis['extrapolation']}
  assert sorted(windows) == [4, 6]
  for end, e in windows.items():
    assert e['speedup'] == pytest.approx(12 / end)
    assert e['alpharl']['cosine'] == pytest.approx(1.0, abs=1e-6)
    assert e['alpharl']['relative_error'] == pytest.approx(0.0, abs=1e-5)
    assert e['expo']['cosine'] == pytest.approx(1.0, abs=1e-6)
    g = e['recovered_gain']
    assert g['alpharl_A'] == pytest.approx(1 - HEAD_WEIGHT, abs=1e-5)
    # Variant B takes the head of the window's last checkpoint, which is end/12 of the way.
    assert g['alpharl_B'] == pytest.approx(1 - HEAD_WEIGHT + HEAD_WEIGHT * end / 12, abs=1e-5)
    assert g['expo'] == pytest.approx(1.0, abs=1e-5)
    assert g['window'] == pytest.approx(end / 12, abs=1e-5)
  curve = analysis['extrapolation_curve']
  for name, c in curve['types'].items():
    if name != FROZEN:
      np.testing.assert_allclose(c['actual'], np.array(curve['steps']) / 12, atol=1e-5)
      np.testing.assert_allclose(c['predicted'], c['actual'], atol=1e-5)


def test_report_files(run):
  _, analysis, files = run
  for name in ('analysis.json', 'analysis.md', update_dynamics_report.PNG_SHARES, update_dynamics_report.PNG_R2,
               update_dynamics_report.PNG_GAIN,
               update_dynamics_report.PNG_EXTRAPOLATION):
    path = os.path.join(os.path.dirname(files['json']), name)
    assert os.path.getsize(path) > 0, name
  with open(files['json']) as f:
    loaded = json.load(f)           # strict JSON: NaN written as null
  assert loaded['matrices'][FROZEN]['share']['1'][0] == [None, None]
  md = open(files['markdown']).read()
  assert '## Update dynamics' in md and '| q_proj |' in md and 'gain AlphaRL A' in md
  assert f'![rank_share](./{update_dynamics_report.PNG_SHARES})' in md
  assert 'classifier 0..2, full 4..12' in md and '`--base_step=4`' in md


def test_command_end_to_end(run, tmp_path):
  run_dir, _, _ = run
  out = str(tmp_path / 'out')
  proc = subprocess.run([sys.executable, '-m', 'cfrl_jax.analyze', f'--run={run_dir}', f'--out={out}', '--ks=1',
                         '--windows=0.5'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert os.path.abspath(out) in proc.stdout
  loaded = json.load(open(os.path.join(out, 'analysis.json')))
  assert loaded['evaluation'] is None and list(loaded['matrices']['q_proj']['share']) == ['1']
  assert sorted(os.listdir(out)) == sorted(['analysis.json', 'analysis.md', update_dynamics_report.PNG_SHARES,
                                           update_dynamics_report.PNG_R2, update_dynamics_report.PNG_EXTRAPOLATION])


def test_command_errors(tmp_path, capsys):
  assert analyze.main(['analyze', f'--run={tmp_path / "missing"}']) == 1
  assert 'does not exist' in capsys.readouterr().err
  assert analyze.main(['analyze', f'--run={tmp_path}']) == 1
  assert 'No checkpoints' in capsys.readouterr().err
  one = tmp_path / 'one'
  _save_run(str(one), _trajectory()[1], (0,))
  assert analyze.main(['analyze', f'--run={one}']) == 1
  assert 'at least 2 checkpoints' in capsys.readouterr().err
  assert analyze.main(['analyze']) == 2
  assert '--run' in capsys.readouterr().err
  with pytest.raises(ValueError, match='windows'):
    update_dynamics.AnalysisConfig(windows=(1.5,))


def test_evaluator_specs(tmp_path, monkeypatch):
  assert analyze.make_evaluator('none', 'x') is None
  with pytest.raises(ValueError, match="expected 'none', 'task'"):
    analyze.make_evaluator('accuracy', 'x')
  (tmp_path / 'my_eval.py').write_text(textwrap.dedent('''
      def factory(run_dir):
        return lambda params: len(run_dir)
      def not_callable(run_dir):
        return 3
  '''))
  monkeypatch.syspath_prepend(str(tmp_path))
  assert analyze.make_evaluator('my_eval:factory', 'abcd')({}) == 4
  with pytest.raises(ValueError, match='--metric'):   # a custom factory picks its own metric
    analyze.make_evaluator('my_eval:factory', 'abcd', 'pass@1')
  with pytest.raises(ValueError, match='returned int'):
    analyze.make_evaluator('my_eval:not_callable', 'abcd')
  with pytest.raises(ValueError, match='no callable'):
    analyze.make_evaluator('my_eval:nothing', 'abcd')
  try:
    from cfrl_jax import run_setup as task_evaluate
  except ImportError:
    task_evaluate = None
  if task_evaluate is None or not hasattr(task_evaluate, 'evaluator_for_run'):
    with pytest.raises(ValueError, match='--evaluate=none'):
      analyze.make_evaluator('task', 'abcd')


def test_a_run_that_made_the_metric_worse_gets_a_warning_not_silent_shares(run):
  _, analysis, _ = run
  acc = {'base': 0.66, 'final': 0.65, 'rank1_A': 0.60}
  with pytest.warns(RuntimeWarning, match='did not improve'):
    ev = update_dynamics._gains(acc, {}, update_dynamics.AnalysisConfig(), {'extrapolation': []}, 'greedy_accuracy')
  assert ev['recovered_gain']['rank1_A'] == pytest.approx(6.0)     # (0.60 - 0.66) / (0.65 - 0.66)
  assert 'did not improve' in ev['warning'] and ev['metric'] == 'greedy_accuracy'
  md = update_dynamics_report.markdown_section({**analysis, 'evaluation': ev}, '.', [])
  assert 'Held-out greedy_accuracy: base 0.660' in md and 'Warning: The final checkpoint scores below' in md


def test_the_runs_report_picks_up_the_analysis_with_working_image_links(run):
  from cfrl_jax import report
  run_dir, _, _ = run
  with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
    for step, acc in ((0, 0.25), (12, 0.5)):
      f.write(json.dumps({'step': step, 'kind': 'eval', 'pass@1': acc, 'pass@1_stderr': 0.01}) + '\n')
  md = open(report.write_report(run_dir)).read()
  section = md.split('## Analysis', 1)[1]
  assert '### Update dynamics' in section and '| q_proj |' in section
  links = [line.split('](', 1)[1].rstrip(')') for line in section.splitlines() if line.startswith('![')]
  assert len(links) == 4
  for link in links:
    assert os.path.exists(os.path.join(run_dir, link)), link
