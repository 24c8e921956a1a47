"""The update-dynamics analysis (update_dynamics.analyze_run) rendered and written:

    OUT/analysis.json   every number (NaN written as null)
    OUT/*.png           singular-value shares, R^2 of the linear fits, recovered gain vs k, extrapolation
    OUT/analysis.md     a Markdown section for the run's report (links the PNGs relatively)
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from cfrl_jax.analysis.update_dynamics import nanmean_rows, summarize, to_jsonable


PNG_SHARES = 'rank_share.png'
PNG_R2 = 'linear_r2.png'
PNG_GAIN = 'recovered_gain.png'
PNG_EXTRAPOLATION = 'extrapolation.png'
PNG_NAMES = (PNG_SHARES, PNG_R2, PNG_GAIN, PNG_EXTRAPOLATION)   # every figure write_plots may draw


def _arr(x):
  """JSON lists (None for NaN) back to a float array."""
  def nan_for_none(v):
    if isinstance(v, (list, tuple)):
      return [nan_for_none(w) for w in v]
    return np.nan if v is None else v
  return np.asarray(nan_for_none(x), np.float64)


def write_plots(analysis: Mapping, out_dir: str) -> list[str]:
  """Writes the PNGs into out_dir (Agg canvas, no pyplot state); returns their file names."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator
  os.makedirs(out_dir, exist_ok=True)
  a = to_jsonable(analysis)
  names = list(a['matrices'])
  written = []

  # 1. Top-k share of the final update per layer, and top-1 share over training.
  ks = sorted(int(k) for k in a['config']['ks'])
  fig = Figure(figsize=(4.2 * (len(ks) + 1), 3.6), layout='constrained')
  axes = fig.subplots(1, len(ks) + 1, squeeze=False)[0]
  for ax, k in zip(axes, ks):
    for name in names:
      share = _arr(a['matrices'][name]['share'][str(k)])[-1]
      ax.plot(np.arange(len(share)), share, marker='o', ms=3, label=name)
    ax.set(title=f'top-{k} share of ||dW||$_F^2$ (step {a["final_step"]})', xlabel='layer', ylim=(0, 1.02))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax = axes[-1]
  for name in names:
    ax.plot(a['steps'], nanmean_rows(_arr(a['matrices'][name]['share']['1'])), marker='o', ms=3, label=name)
  ax.set(title='top-1 share over training (layer mean)', xlabel='step', ylim=(0, 1.02))
  axes[0].legend(fontsize=7)
  fig.savefig(os.path.join(out_dir, PNG_SHARES), dpi=110)
  written.append(PNG_SHARES)

  # 2. R^2 of the linear fits per layer.
  panels = [('r2_step', 'rank-1 coefficient vs step'), ('r2_pooled', 'rank-1 update (pooled) vs step')]
  if a['relex_computed']:
    panels += [('relex', 'RELEX leading coefficient vs step'), ('r2_full_pooled', 'full update (pooled) vs step')]
  if any(m['r2_accuracy'] is not None for m in a['matrices'].values()):
    panels.append(('r2_accuracy', 'rank-1 coefficient vs accuracy'))
  fig = Figure(figsize=(4.2 * len(panels), 3.6), layout='constrained')
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (key, title) in zip(axes, panels):
    for name in names:
      m = a['matrices'][name]
      vals = m['relex']['r2'] if key == 'relex' else m[key]
      if vals is not None:
        vals = _arr(vals)
        ax.plot(np.arange(len(vals)), vals, marker='o', ms=3, label=name)
    ax.set(title=f'R$^2$: {title}', xlabel='layer', ylim=(-0.05, 1.05))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  axes[0].legend(fontsize=7)
  fig.savefig(os.path.join(out_dir, PNG_R2), dpi=110)
  written.append(PNG_R2)

  # 3. Share of the RL gain recovered vs k (needs evaluation).
  ev = a.get('evaluation')
  if ev:
    fig = Figure(figsize=(5, 3.6), layout='constrained')
    ax = fig.subplots()
    labels = [str(k) for k in ks] + ['full']
    for variant in ('A', 'B'):
      g = [ev['recovered_gain'].get(f'rank{k}_{variant}') for k in ks] + [ev['recovered_gain'].get(f'full_{variant}')]
      ax.plot(labels, _arr(g), marker='o', label=f'variant {variant}')
    ax.axhline(1.0, color='gray', lw=0.8, ls=':')
    ax.set(title='share of the RL gain recovered by rank-k models', xlabel='k', ylabel='recovered gain')
    ax.legend(fontsize=8)
    fig.savefig(os.path.join(out_dir, PNG_GAIN), dpi=110)
    written.append(PNG_GAIN)

  # 4. Extrapolation: coefficient trajectories vs the first window's line, and quality per window.
  curve, ext = a.get('extrapolation_curve'), a.get('extrapolation') or []
  if curve:
    has_acc = any('recovered_gain' in e for e in ext)
    fig = Figure(figsize=(4.6 * (3 if has_acc else 2), 3.6), layout='constrained')
    axes = fig.subplots(1, 3 if has_acc else 2, squeeze=False)[0]
    ax = axes[0]
    for i, name in enumerate(curve['types']):
      color = f'C{i}'
      ax.plot(curve['steps'], _arr(curve['types'][name]['actual']), color=color, marker='o', ms=3, label=name)
      ax.plot(curve['steps'], _arr(curve['types'][name]['predicted']), color=color, ls='--', lw=1)
    ax.axvline(curve['window_steps'][-1], color='gray', lw=0.8, ls=':')
    ax.set(title=f'rank-1 coefficient / final ||dW||$_F$\n(dashed: line fitted up to step {curve["window_steps"][-1]})',
           xlabel='step')
    ax.legend(fontsize=7)
    ax = axes[1]
    ends = [e['window_end'] for e in ext]
    ax.plot(ends, _arr([e['alpharl']['cosine'] for e in ext]), marker='o', label='AlphaRL (rank-1) cosine')
    ax.plot(ends, _arr([e['expo']['cosine'] for e in ext]), marker='s', label='ExPO cosine')
    ax.plot(ends, _arr([e['alpharl']['relative_error'] for e in ext]), marker='o', ls='--',
            label='AlphaRL relative error')
    ax.plot(ends, _arr([e['expo']['relative_error'] for e in ext]), marker='s', ls='--', label='ExPO relative error')
    ax.set(title=f'predicted vs actual update at step {a["final_step"]}', xlabel='window end step')
    ax.legend(fontsize=7)
    if has_acc:
      ax = axes[2]
      for name, marker in (('alpharl_A', 'o'), ('alpharl_B', 'v'), ('expo', 's'), ('window', 'x')):
        ax.plot(ends, _arr([e.get('recovered_gain', {}).get(name) for e in ext]), marker=marker, label=name)
      ax.axhline(1.0, color='gray', lw=0.8, ls=':')
      ax.set(title='share of the RL gain recovered', xlabel='window end step')
      ax.legend(fontsize=7)
    fig.savefig(os.path.join(out_dir, PNG_EXTRAPOLATION), dpi=110)
    written.append(PNG_EXTRAPOLATION)
  return written


def fmt(x, digits=3):
  """A table cell: floats to `digits` decimals, None / NaN / inf as 'n/a', anything else str()."""
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return 'n/a'
  if isinstance(x, float):
    return f'{x:.{digits}f}'
  return str(x)


def markdown_section(analysis: Mapping, image_dir: str = '.', images: Sequence[str] | None = None,
                     heading_level: int = 2) -> str:
  """The Markdown section of a run's report; images are linked as image_dir/<name>."""
  a = to_jsonable(analysis)
  summary = summarize(analysis)
  ks = sorted(int(k) for k in a['config']['ks'])
  lines = ['#' * heading_level + ' Update dynamics: rank-1 dominance and linear dynamics', '']
  stages = {s: v for s, v in a['stages'].items() if v is not None}
  lines += [f'Run `{a["run_dir"]}`: base W_0 = step {a["base_step"]}, {len(a["steps"])} later checkpoints '
            f'(steps {a["steps"][0]}..{a["final_step"]}); {"tied" if a["tied"] else "untied"} head.'
            + (f' Stages: {_stage_ranges(stages)}.' if stages else ''), '']
  distinct = sorted(set(stages.values()), key=lambda v: min(int(s) for s in stages if stages[s] == v))
  if len(distinct) > 1:
    last_start = min(int(s) for s, v in stages.items() if v == distinct[-1])
    lines += [f'The run has several stages; with CF-RL the backbone is frozen in stage 1, so fits against step '
              f'mix two regimes. `--base_step={last_start}` analyses the last stage alone.', '']
  lines += ['Per kernel type (layers aggregated) for the final update dW = W_final - W_0: relative size '
            '‖dW‖/‖W_0‖ (mean), top-k share of ‖dW‖_F² (mean over layers), and R^2 of linear fits '
            'against step (median over layers; the point (base step, 0) included): the rank-1 coefficient '
            'on the final direction, the whole rank-1 update s1 u1 v1^T (pooled over its entries), RELEX\'s '
            'leading temporal coefficient and the whole update (pooled).', '']
  head = ['kernel', '‖dW‖/‖W_0‖'] + [f'top-{k} share' for k in ks] + \
         ['R^2 coef', 'R^2 rank-1', 'R^2 RELEX', 'RELEX share', 'R^2 full']
  if any(math.isfinite(r['r2_accuracy_median']) for r in summary.values()):
    head.append('R^2 coef vs acc')
  lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, r in summary.items():
    row = [name, fmt(r['relative_update'], 4)] + [fmt(r[f'share{k}_mean']) for k in ks] + [
        fmt(r['r2_step_median']), fmt(r['r2_pooled_median']), fmt(r.get('relex_r2_median')),
        fmt(r.get('relex_share_median')), fmt(r['r2_full_pooled_median'])]
    if 'R^2 coef vs acc' in head:
      row.append(fmt(r['r2_accuracy_median']))
    lines.append('| ' + ' | '.join(row) + ' |')
  lines.append('')
  if not a['relex_computed']:
    lines += ['RELEX and the full-update R^2 were skipped: the stacked updates exceed --relex_max_gb.', '']
  other = a['other_updates']
  if other:
    lines += ['Other parameters at the final step (kept at base in variant A): ' + '; '.join(
        f'{g} ‖Δ‖ = {fmt(v["update_norm"][-1], 4)} (‖base‖ = {fmt(v["base_norm"], 3)})'
        for g, v in other.items()) + '.', '']
  ev = a.get('evaluation')
  if ev:
    acc = ev['accuracy']
    lines += [f'Held-out {ev.get("metric", "accuracy")}: base {fmt(acc["base"])}, final {fmt(acc["final"])} '
              f'(gain {fmt(ev["gain"])}). Share of the gain recovered, (acc(model) - acc(base)) / '
              '(acc(final) - acc(base)), by rank-k models (variant A: embeddings, head, norms and biases at base '
              f'as in AlphaRL; variant B: also the full update of {", ".join(a["config"]["variant_b_keep"])}):', '']
    cols = [str(k) for k in ks] + ['full']
    lines += ['| variant | ' + ' | '.join(f'k={c}' for c in cols) + ' |', '|---|' + '---|' * len(cols)]
    for v in ('A', 'B'):
      cells = [fmt(ev['recovered_gain'].get(f'rank{k}_{v}')) for k in ks] + [fmt(ev['recovered_gain'].get(f'full_{v}'))]
      lines.append(f'| {v} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    if ev.get('warning'):
      lines += [f'Warning: {ev["warning"]}', '']
  ext = a.get('extrapolation') or []
  if ext:
    lines += [f'Extrapolation to step {a["final_step"]} from early windows (AlphaRL: per kernel, the last window '
              'checkpoint\'s top singular pair, its coefficient fitted linearly in step over the window and the '
              'origin, rescaled to the full update\'s norm; ExPO: theta_0 + alpha (theta_w - theta_0), alpha = '
              '(final - base) / (window end - base)). Cosine and relative error of the predicted update against '
              'the actual one, all kernels pooled:', '']
    has_acc = any('recovered_gain' in e for e in ext)
    head = ['window end', 'speed-up', 'AlphaRL cos', 'AlphaRL rel. err', 'ExPO cos', 'ExPO rel. err']
    if has_acc:
      head += ['gain AlphaRL A', 'gain AlphaRL B', 'gain ExPO', 'gain window ckpt']
    lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for e in ext:
      row = [str(e['window_end']), f'{fmt(e["speedup"], 2)}x', fmt(e['alpharl']['cosine']),
             fmt(e['alpharl']['relative_error']), fmt(e['expo']['cosine']), fmt(e['expo']['relative_error'])]
      if has_acc:
        g = e.get('recovered_gain', {})
        row += [fmt(g.get('alpharl_A')), fmt(g.get('alpharl_B')), fmt(g.get('expo')), fmt(g.get('window'))]
      lines.append('| ' + ' | '.join(row) + ' |')
    lines.append('')
  for name in (images if images is not None else []):
    lines += [f'![{os.path.splitext(name)[0]}]({image_dir.rstrip("/")}/{name})', '']
  return '\n'.join(lines)


def _stage_ranges(stages: Mapping[str, Any]) -> str:
  items = sorted((int(s), v) for s, v in stages.items())
  parts, start, prev, current = [], None, None, None
  for step, value in items:
    if value != current:
      if current is not None:
        parts.append(f'{current} {start}..{prev}')
      start, current = step, value
    prev = step
  parts.append(f'{current} {start}..{prev}')
  return ', '.join(parts)


def write_report(analysis: Mapping, out_dir: str) -> dict[str, str]:
  """Writes analysis.json, the PNGs and analysis.md into out_dir; returns {kind: path}."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, 'analysis.json')
  with open(json_path, 'w') as f:
    json.dump(to_jsonable(analysis), f, indent=1, allow_nan=False)
  pngs = write_plots(analysis, out_dir)
  md_path = os.path.join(out_dir, 'analysis.md')
  with open(md_path, 'w') as f:
    f.write(markdown_section(analysis, '.', pngs) + '\n')
  return {'json': json_path, 'markdown': md_path, **{name: os.path.join(out_dir, name) for name in pngs}}
