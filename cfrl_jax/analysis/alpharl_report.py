"""An AlphaRL run's result (cfrl_jax/alpharl.py's summarize) rendered: alpharl.md, alpharl.png and
alpharl.json in <run_dir>/alpharl/, and the verdicts across seeds."""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np

from cfrl_jax.analysis.alpharl_fit import (EXTRAPOLATED, TARGET_SHARE, TARGET_STEP_FRACTION, UPPER_BOUND,
                                           seed_verdicts)
from cfrl_jax.analysis.update_dynamics import to_jsonable
from cfrl_jax.analysis.update_dynamics_report import fmt


SUBDIR = 'alpharl'            # experiment.run writes AlphaRL output under <run_dir>/alpharl/
JSON_NAME, MD_NAME, PNG_NAME = 'alpharl.json', 'alpharl.md', 'alpharl.png'
MODEL_LABELS = {
    'base': 'base (step 0)',
    'window': 'window end',
    'alpharl_A': 'A: rank-1 step line, upd_rank convention (rest at base)',
    'alpharl_B': 'B: rank-1 step line, upd_rank convention + {keep} from the window end',
    'released_oracle': 'released AlphaRL (PLS), target = reference final accuracy: upper bound',
    'released_window': 'released AlphaRL (PLS), target from the window',
    'expo': 'ExPO, fixed alpha = T/W - 1',
    'expo_tuned': 'ExPO, alpha picked on selection problems',
    'continued': 'continued from {start}',
    'reference': 'reference: full run',
}
SHORT_NAMES = {'alpharl_A': 'A (step line)', 'alpharl_B': 'B (step line + kept groups)',
               'released_oracle': 'released, oracle target (upper bound)', 'released_window': 'released, window target',
               'expo': 'ExPO fixed', 'expo_tuned': 'ExPO tuned'}
WQ_NAMES = {**SHORT_NAMES, 'alpharl': SHORT_NAMES['alpharl_A']}


def _label(name: str, result: Mapping) -> str:
  start = (result.get('continued') or {}).get('start', '')
  return MODEL_LABELS[name].format(keep='+'.join(result['keep']), start=SHORT_NAMES.get(start, start))


def markdown_section(result: Mapping, image: str | None = PNG_NAME, heading_level: int = 2,
                     title: str | None = None) -> str:
  """The Markdown report of one AlphaRL run; `image` is linked relatively when given."""
  r = result
  T, W, metric = r['planned_steps'], r['window_steps'], r['metric']
  has_share = r['reference'] is not None
  lines = ['#' * heading_level + ' ' + (title or f'AlphaRL: {r["name"]} ({r["algorithm"]}'
                                        f'{", CF-RL" if r["cfrl"] else ""}, seed {r["seed"]})'), '']
  lines += [f'Trained {W} of {T} planned steps ({fmt(100 * r["step_fraction"], 0)}% of the steps, '
            f'{fmt(r["speedup"], 2)}x fewer), fitted the rank-1 linear dynamics of {r["fit"]["kernels"]} stacked '
            f'attention/MLP kernels on checkpoints {r["fit_steps"]} plus the origin (step {r["fit_origin"]}'
            f'{", the start of CF-RL stage 2" if r["fit_origin"] else ""}; median R^2 of the coefficient lines '
            f'{fmt(r["fit"]["r2_median"])}), and extrapolated the update to step {T} '
            f'(predicted kernel update norm / window update norm: {fmt(r["fit"]["norm_ratio"], 2)}). A and B are this '
            'project\'s step line in the rank-1 sufficiency convention of the released eval/upd_rank.py '
            '(W_0 + ||dW||_F u1 v1^T, the rest at base); the released AlphaRL predictor is the PLS procedure '
            '(docs/alpharl.md).', '']
  head = ['model', 'steps trained', f'{metric} ± s.e.', 'gain over base']
  if has_share:
    head += ['share of the gain ± s.e.', f'target (≥{TARGET_SHARE:.0%} at ≤{TARGET_STEP_FRACTION:.0%} steps)']
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  order = ['base', 'window', *EXTRAPOLATED, 'continued', 'reference']
  for name in order:
    m = r['models'].get(name)
    if m is None:
      continue
    row = [_label(name, r), str(m['steps_trained']), f'{fmt(m["accuracy"])} ± {fmt(m["stderr"])}',
           f'{m["gain"]:+.3f}']
    if has_share:
      share = '—' if name == 'base' else f'{fmt(m["share"])} ± {fmt(m["share_stderr"])}'
      verdict = r['target']['verdicts'].get(name, '')
      row += [share, f'{verdict} (upper bound)' if verdict and name in UPPER_BOUND else verdict]
    lines.append('| ' + ' | '.join(row) + ' |')
  lines.append('')
  if has_share:
    ref = r['reference']
    lines += [f'Share of the gain = ({metric}(model) − {metric}(base)) / ({metric}(reference) − {metric}(base)), the '
              f'reference being the last eval (step {ref["final_step"]}) of the full run `{ref["run"]}`. Its standard '
              'error propagates the three evaluations\' standard errors as if independent (they share problems and '
              'are positively correlated, so this overstates the noise). "within noise": within 2 s.e. of the '
              'target share.', '']
    if r['base_mismatch']:
      lines += [f'Note: the reference\'s own base eval ({fmt(ref["base_accuracy"])}) differs from this run\'s '
                f'({fmt(r["models"]["base"]["accuracy"])}); the gain uses this run\'s base.', '']
  if r['share_note']:
    lines += [r['share_note'], '']
  lines += _released_notes(r) + _expo_notes(r)
  wq = r.get('weight_quality')
  if wq:
    lines += [f'Predicted vs actual kernel update at step {T} (reference checkpoint, all kernels pooled): ' + '; '.join(
        f'{WQ_NAMES.get(name, name)} cosine {fmt(q["cosine"])}, relative error {fmt(q["relative_error"])}, norm ratio '
        f'{fmt(q["norm_ratio"], 2)}' for name, q in wq.items()) + '.', '']
  secs = r['seconds']
  lines += ['Wall time: ' + ', '.join(f'{k.replace("_", " ")} {v:.0f} s' for k, v in secs.items()) + '.', '']
  if image:
    lines += [f'![AlphaRL accuracy vs step]({image})', '']
  return '\n'.join(lines)


def _released_notes(r: Mapping) -> list[str]:
  rel = r.get('released')
  if rel is None:
    return []
  if not rel['fitted']:
    return [f'Released AlphaRL (PLS) not fitted: {rel["reason"]}', '']
  t = rel['targets']
  out = [f'Released AlphaRL (PLS): {rel["fit"]["matrices"]} kernel matrices, PLS of the sign-chained vectors s1 * (output-side singular vector) '
         f'against {r["metric"]} at checkpoints {rel["steps"]} ({", ".join(fmt(a) for a in rel["accuracy"])}); median '
         f'R^2 {fmt(rel["fit"]["pls_r2_median"])}; coordinates {"standardised" if rel["fit"]["scale"] else "centred"}. '
         'Each model is the window-end checkpoint plus u1 pred^T on every kernel, as released: pred is the '
         'predicted rank-1 part of the whole update W_T - W_0, added on top of W_W, which already holds W_W - W_0.']
  if 'oracle' in t:
    out.append(f'Target (oracle, UPPER BOUND: it is the reference run\'s final {r["metric"]}): {fmt(t["oracle"])}.')
  if 'window' in t:
    out.append(f'Target from the window alone: {fmt(t["window"])} (least-squares line of {r["metric"]} against step '
               f'over those checkpoints, at step {r["planned_steps"]}, clipped to [0, 1]).')
  ratios = rel['fit'].get('added_norm_ratio', {})
  if ratios:
    out.append('Added kernel norm / window kernel update norm: ' +
               ', '.join(f'{k} {fmt(v, 2)}' for k, v in ratios.items()) + '.')
  return [' '.join(out), '']


def _expo_notes(r: Mapping) -> list[str]:
  sel = r.get('expo_selection')
  if not sel:
    return []
  scores = ', '.join(f'{fmt(a, 2)}: {fmt(v)}' for a, v in sel['scores'])
  return [f'ExPO tuned: theta_W + alpha (theta_W - theta_0) with alpha = {fmt(sel["alpha"], 2)}, the best '
          f'{r["metric"]} on {sel["split"]} ({sel["problems"]} problems, disjoint from the reported ones; ties go to '
          f'the smaller alpha) among {{{scores}}}; the fixed ExPO row is alpha = T/W - 1 = '
          f'{fmt(sel["fixed_alpha"], 2)}. The table reports both on the reported problems.', '']


def write_plot(result: Mapping, path: str) -> str:
  """Accuracy vs step: reference and window curves, the extrapolated models at T, the continuation."""
  from matplotlib.figure import Figure
  r = result
  T, W, metric = r['planned_steps'], r['window_steps'], r['metric']
  fig = Figure(figsize=(7, 4.2), layout='constrained')
  ax = fig.subplots()

  def curve(points, **kw):
    if points:
      s, a, e = (np.asarray(x, np.float64) for x in zip(*points))
      ax.errorbar(s, a, yerr=np.where(np.isfinite(e), e, 0.0), capsize=2, **kw)

  if r['reference'] is not None:
    curve(r['reference']['curve'], color='gray', marker='o', ms=3, label='reference: full run')
  curve(r['window_curve'], color='C0', marker='o', ms=4, lw=2, label=f'window training ({W} steps)')
  models = r['models']
  markers = {'alpharl_A': 's', 'alpharl_B': 'D', 'released_oracle': 'P', 'released_window': 'X', 'expo': '^',
             'expo_tuned': 'v'}
  shown = [n for n in EXTRAPOLATED if n in models]
  for i, name in enumerate(shown):
    m = models[name]
    ax.errorbar([T + (i - (len(shown) - 1) / 2) * 0.01 * T], [m['accuracy']], yerr=[np.nan_to_num(m['stderr'])],
                fmt=markers[name], color=f'C{i + 1}', capsize=3, ms=7,
                label=f'{SHORT_NAMES[name]} at step {T}')
  if r['continued'] is not None:
    c = r['continued']
    start = models[c['start']]
    pts = [(W, start['accuracy'], start['stderr'])] + [p for p in c['curve'] if p[0] > W]
    curve(pts, color='C4', marker='v', ms=4, ls='--',
          label=f'continued from {c["start"].replace("_", " ")} (x: steps trained)')
  ax.axvline(W, color='gray', lw=0.8, ls=':')
  if r['reference'] is not None and math.isfinite(models['base']['accuracy']):
    b = models['base']['accuracy']
    ax.axhline(b + TARGET_SHARE * (r['reference']['accuracy'] - b), color='gray', lw=0.8, ls='--',
               label=f'{TARGET_SHARE:.0%} of the reference gain')
  ax.set(xlabel='training step', ylabel=f'{metric} (± s.e.)',
         title=f'AlphaRL: window {W}/{T} steps, predicted models at step {T}')
  ax.legend(fontsize=7)
  fig.savefig(path, dpi=110)
  return path


def write_outputs(result: Mapping, run_dir: str) -> dict[str, str]:
  """Writes alpharl.json, alpharl.png and alpharl.md into run_dir; returns {kind: path}."""
  os.makedirs(run_dir, exist_ok=True)
  paths = {'json': os.path.join(run_dir, JSON_NAME), 'png': os.path.join(run_dir, PNG_NAME),
           'markdown': os.path.join(run_dir, MD_NAME)}
  with open(paths['json'], 'w') as f:
    json.dump(to_jsonable(result), f, indent=1, allow_nan=False)
  write_plot(result, paths['png'])
  with open(paths['markdown'], 'w') as f:
    f.write(markdown_section(result) + '\n')
  return paths


VERDICT_RULE = (f'Target: ≥{TARGET_SHARE:.0%} of the reference gain at ≤{TARGET_STEP_FRACTION:.0%} of the planned '
                'steps. Share of the gain = (acc(model) − acc(base)) / (acc(reference final) − acc(base)); across '
                'seeds its mean ± standard error (seed-to-seed s.d. / √n; one seed: that run\'s delta-method s.e.). '
                f'Verdict: "not met" when more than {TARGET_STEP_FRACTION:.0%} of the steps were trained; else '
                f'"within noise" when the mean is within 2 s.e. of {TARGET_SHARE:.0%}; else "met" above it, "not met" '
                'below it; "n/a" when no seed has a share (its reference gain is 0). The oracle-target row uses the '
                'reference\'s final accuracy: an upper bound, not a prediction.')


def seeds_section(results: list[tuple[str, Mapping]], heading_level: int = 3) -> str:
  """Markdown of seed_verdicts: per arm and variant, the share of the gain +- s.e. across seeds and the
  verdict, with the rule; '' when no run has a reference."""
  rows = seed_verdicts(results)
  if not rows:
    return ''
  lines = ['#' * heading_level + ' AlphaRL verdicts across seeds', '', VERDICT_RULE, '',
           '| arm | model | seeds with a share / runs | share of the gain ± s.e. | verdict |', '|---|---|---|---|---|']
  for v in rows:
    share = (f'{fmt(v.share)} ± {fmt(v.stderr)}' if math.isfinite(v.share) else
             'n/a (reference gain 0 in every seed)')
    lines.append(f'| {v.arm} | {SHORT_NAMES.get(v.model, v.model)} | {v.with_share} / {v.runs} | {share} | '
                 f'{v.verdict} |')
  lines.append('')
  return '\n'.join(lines)
