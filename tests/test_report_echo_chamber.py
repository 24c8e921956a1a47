"""The Echo Chamber part of cfrl_jax.report on a synthetic study with hand-computed numbers.

Study 'echo_chamber' (eval temperature from rl.temperature 0.7): arm ppo x seeds 0, 1 and arm grpo x seed 0;
training steps 1..6 (ppo seed 1 also logs a step 7, which the seed mean leaves out), evals at 0, 3, 6.
  ppo train format_code   seed 0  0.2 0.4 0.6 0.8 1.0 1.0      seed 1  0.0 0.2 0.6 1.0 1.0 1.0
      seed mean                   0.1 0.3 0.6 0.9 1.0 1.0
      3-step centred average      0.1 1.0/3 0.6 2.5/3 2.9/3 1.0   (the window shrinks to 1 point at the ends)
      per seed                    0.2 0.4 0.6 0.8 2.8/3 1.0    /   0.0 0.8/3 0.6 2.6/3 1.0 1.0
      -> first step with share >= 0.9: step 5
  ppo pass@1 seed mean            0.10 0.25 0.50 at steps 0 3 6 -> largest rise 3 -> 6 (+0.25), holding step 5
  grpo format_code 0.4, format_text 0.6 every step: text dominates, never reaches 0.9.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cfrl_jax import report
from cfrl_jax.analysis import report_markdown, report_numbers, report_runs

CODE = {('ppo', 0): [0.2, 0.4, 0.6, 0.8, 1.0, 1.0], ('ppo', 1): [0.0, 0.2, 0.6, 1.0, 1.0, 1.0, 1.0],
        ('grpo', 0): [0.4] * 6}
PASS1 = {('ppo', 0): [0.1, 0.2, 0.5], ('ppo', 1): [0.1, 0.3, 0.5], ('grpo', 0): [0.2, 0.2, 0.2]}
# (sampled code at step 0, at step 6); greedy: code 0 -> 1 for ppo, 0 throughout for grpo
EVAL_CODE = {('ppo', 0): (0.1, 1.0), ('ppo', 1): (0.3, 0.8), ('grpo', 0): (0.4, 0.4)}


def _records(arm, seed):
  recs = [{'step': i + 1, 'kind': 'train', 'format_code': c, 'format_text': 1 - c, 'format_unknown': 0.0,
           'reward_mean': 0.1} for i, c in enumerate(CODE[(arm, seed)])]
  first, last = EVAL_CODE[(arm, seed)]
  for i, step in enumerate((0, 3, 6)):
    code = first if step == 0 else last
    greedy = 1.0 if arm == 'ppo' and step > 0 else 0.0
    recs.append({'step': step, 'kind': 'eval', 'pass@1': PASS1[(arm, seed)][i], 'pass@1_stderr': 0.05,
                 'greedy_accuracy': 0.1 * i, 'format_code': code, 'format_text': 1 - code, 'format_unknown': 0.0,
                 'greedy_format_code': greedy, 'greedy_format_text': 1 - greedy, 'greedy_format_unknown': 0.0})
  return recs


def _study(root, name='echo_chamber', **rl):
  for (arm, seed) in CODE:
    d = os.path.join(root, arm, f'seed{seed}')
    os.makedirs(d)
    with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
      for r in _records(arm, seed):
        f.write(json.dumps(r) + '\n')
  config = {'name': name, 'rl': {'temperature': 0.7, 'steps': 6, **rl}, 'eval': {'temperature': -1.0}}
  with open(os.path.join(root, 'study.json'), 'w') as f:
    json.dump({'arms': ['ppo', 'grpo'], 'seeds': [0, 1], 'config': config}, f)
  return report_runs.load_study(str(root))


def test_format_series_equal_the_input_and_its_moving_average(tmp_path):
  panels = {p.arm: p for p in report_numbers.echo_chamber_panels(_study(tmp_path), window=3)}
  ppo = {t.name: t for t in panels['ppo'].formats}
  assert list(ppo) == ['code', 'text', 'unknown']
  code = ppo['code']
  assert code.num_seeds == 2 and list(code.steps) == [1, 2, 3, 4, 5, 6]    # step 7: seed 1 only
  np.testing.assert_allclose(code.raw, [0.1, 0.3, 0.6, 0.9, 1.0, 1.0])
  np.testing.assert_allclose(code.smooth, [0.1, 1.0 / 3, 0.6, 2.5 / 3, 2.9 / 3, 1.0])
  np.testing.assert_allclose(code.low, [0.0, 0.8 / 3, 0.6, 0.8, 2.8 / 3, 1.0])
  np.testing.assert_allclose(code.high, [0.2, 0.4, 0.6, 2.6 / 3, 1.0, 1.0])
  np.testing.assert_allclose(ppo['text'].raw, 1 - code.raw)
  np.testing.assert_allclose(ppo['unknown'].raw, 0.0)
  p1 = panels['ppo'].pass1
  np.testing.assert_allclose(p1.mean, [0.1, 0.25, 0.5])
  np.testing.assert_allclose(p1.low, [0.1, 0.2, 0.5])           # min-max over the two seeds
  np.testing.assert_allclose(panels['ppo'].greedy.mean, [0.0, 0.1, 0.2])
  # One seed: no seed band on the formats; pass@1's band is +- its logged s.e.
  g = panels['grpo']
  assert g.formats[0].num_seeds == 1
  np.testing.assert_allclose(g.formats[0].low, g.formats[0].smooth)
  assert g.pass1.se_band
  np.testing.assert_allclose(g.pass1.high - g.pass1.mean, 0.05)


def test_collapse_coincides_with_the_largest_gain(tmp_path):
  panels = {p.arm: p for p in report_numbers.echo_chamber_panels(_study(tmp_path), window=3)}
  ppo = report_numbers.collapse_and_gain(panels['ppo'])
  assert (ppo.dominant, ppo.collapse_step, ppo.gain_from, ppo.gain_to, ppo.coincides) == ('code', 5, 3, 6, True)
  assert ppo.gain == pytest.approx(0.25)
  assert ppo.first_share == pytest.approx(0.1) and ppo.last_share == pytest.approx(1.0)
  grpo = report_numbers.collapse_and_gain(panels['grpo'])
  assert (grpo.dominant, grpo.collapse_step, grpo.coincides) == ('text', None, None)
  assert grpo.last_share == pytest.approx(0.6)
  # A lower threshold moves the collapse to step 3 (share 0.6), at the first eval of the largest rise: not within.
  assert report_numbers.collapse_and_gain(panels['ppo'], share=0.6).coincides is False


def _panel(shares, pass1):
  """An EchoChamberPanel over steps 1..n whose smoothed format shares are `shares` {name: (n,)}."""
  def track(name, v):
    v = np.asarray(v, float)
    return report_numbers.FormatTrack(name, np.arange(1, len(v) + 1), v, v, v, v, 1)
  p = np.asarray(pass1, float)
  curve = report_numbers.Curve(np.arange(len(p)) * 2, p, p, p, 1)
  return report_numbers.EchoChamberPanel('x', [track(n, v) for n, v in shares.items()], curve, None)


def test_collapse_ignores_unknown_and_formats_dominant_from_the_start():
  # 'unknown' at 1.0 is no format; the named ones all end at 0: no dominant format, no collapse.
  c = report_numbers.collapse_and_gain(_panel({'a': [0, 0, 0], 'unknown': [1, 1, 1]}, [0.1, 0.3, 0.2]))
  assert (c.dominant, c.already, c.collapse_step, c.coincides) == (None, False, None, None)
  assert (c.gain_from, c.gain_to) == (0, 2) and c.gain == pytest.approx(0.2)
  # Already at 0.95 at the first step: no collapse during training, whatever the gain.
  c = report_numbers.collapse_and_gain(_panel({'a': [0.95, 1, 1], 'b': [0.05, 0, 0]}, [0.1, 0.3, 0.5]))
  assert (c.dominant, c.already, c.collapse_step, c.coincides) == ('a', True, None, None)
  # pass@1 never rises: no gain interval.
  c = report_numbers.collapse_and_gain(_panel({'a': [0.5, 0.9, 1]}, [0.3, 0.3, 0.2]))
  assert (c.collapse_step, c.gain_from, c.gain, c.coincides) == (2, None, None, None)


def test_greedy_and_sampled_format_table(tmp_path):
  study = _study(tmp_path)
  ends = report_numbers.eval_format_endpoints(study.arms['ppo'])
  assert ends['code'] == pytest.approx({'sampled_base': 0.2, 'sampled_end': 0.9, 'greedy_base': 0.0,
                                        'greedy_end': 1.0})
  assert ends['text'] == pytest.approx({'sampled_base': 0.8, 'sampled_end': 0.1, 'greedy_base': 1.0,
                                        'greedy_end': 0.0})
  table = '\n'.join(report_markdown.echo_chamber_format_table(study))
  assert '| arm | format | sampled (T = 0.7): base → end | greedy: base → end |' in table
  assert '| PPO | code | 0.200 → 0.900 | 0.000 → 1.000 |' in table
  assert '| PPO | text | 0.800 → 0.100 | 1.000 → 0.000 |' in table
  assert '| GRPO | code | 0.400 → 0.400 | 0.000 → 0.000 |' in table
  assert 'unknown' not in table                               # never produced


def test_report_draws_the_figure_and_names_it(tmp_path):
  _study(tmp_path)
  path = report.write_report(str(tmp_path))
  assert os.path.getsize(tmp_path / 'echo_chamber.png') > 10_000
  md = open(path).read()
  assert '## Echo Chamber: solution formats and accuracy' in md
  assert '![Echo Chamber formats and accuracy](echo_chamber.png)' in md
  # The report's own 9-step window (0.1, 1/3, 0.58, 0.76, 2.9/3, 1.0 on 6 steps): 0.9 first at step 5 too.
  assert '| PPO | code (0.10 → 1.00) | 5 | 3 → 6 (+0.250) | yes |' in md
  assert '| GRPO | text (0.60 → 0.60) | not reached | no rise | — |' in md


def test_other_studies_get_no_echo_chamber_section(tmp_path):
  plain = tmp_path / 'plain'
  study = _study(plain, name='demo')
  assert not report_numbers.is_echo_chamber(study)
  path = report.write_report(str(plain))
  assert not os.path.exists(plain / 'echo_chamber.png')
  assert 'Echo Chamber' not in open(path).read()
  # Echo Chamber's REINFORCE marks a study as one even under another name.
  assert report_numbers.is_echo_chamber(_study(tmp_path / 'renamed', name='mine', reinforce_style='echo_chamber'))


def test_readme_gets_the_echo_chamber_block_and_leaves_the_demo_block_alone(tmp_path):
  study_dir = tmp_path / 'echo_chamber'
  _study(study_dir)
  readme = tmp_path / 'README.md'
  readme.write_text('# x\n\n<!-- demo-results -->\nDEMO\n<!-- /demo-results -->\n\n'
                    '<!-- echo-chamber-results -->\nold\n<!-- /echo-chamber-results -->\ntail\n')
  image = report.update_readme(str(study_dir), str(readme), image_dir=str(tmp_path / 'docs'),
                               command='python -m cfrl_jax.main --config=configs/echo_chamber.py')
  assert image.endswith('echo_chamber_echo_chamber.png') and os.path.getsize(image) > 10_000
  text = readme.read_text()
  assert 'DEMO' in text and 'old' not in text and text.endswith('tail\n')
  block = text.split('<!-- echo-chamber-results -->')[1].split('<!-- /echo-chamber-results -->')[0]
  assert '`python -m cfrl_jax.main --config=configs/echo_chamber.py`' in block
  assert f'`{study_dir}/report.md`' in block
  assert '| PPO | code (0.10 → 1.00) | 5 | 3 → 6 (+0.250) | yes |' in block
  assert f'![Echo Chamber formats and accuracy]({image})' in block
  # A README without the markers: a clear error naming them.
  bare = tmp_path / 'bare.md'
  bare.write_text('# nothing\n')
  with pytest.raises(ValueError, match='echo-chamber-results'):
    report.update_readme(str(study_dir), str(bare), image_dir=str(tmp_path / 'docs'))
