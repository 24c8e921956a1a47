"""The report's figures (PNG), drawn from report_numbers' series.

Figures are drawn on matplotlib Figure objects with the Agg canvas (no pyplot, no global
backend switch), so importing this module changes nothing for an interactive session; matplotlib
itself is imported only when a figure is drawn.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Sequence

import numpy as np

from cfrl_jax.analysis import study_stats
from cfrl_jax.analysis.report_numbers import (SMOOTH_WINDOW, Curve, arm_curve, echo_chamber_panels, eval_endpoint,
                                              format_names, is_echo_chamber, stage2_starts, with_se_band)
from cfrl_jax.analysis.report_runs import Study, arm_label


DPI = 120
PANEL_SIZE = (4.6, 3.9)     # inches per subplot; a single-panel figure is 7 x 4
LOG_SCALE_SPAN = 20.0       # positive panels spanning more than this ratio get a log y axis
NTK_KEY = re.compile(r'^ntk_(R|G|cross|total)_(diag|offdiag)$')
PASS_K_KEY = re.compile(r'^pass@(\d+)$')
FIGURES = ('accuracy', 'confidence', 'passk', 'formats', 'ntk', 'logprob_split', 'norms')
ECHO_CHAMBER_FIGURE = 'echo_chamber'


@dataclasses.dataclass(frozen=True)
class Line:
  """One metric drawn for every arm in a panel; style tells lines of the same arm apart."""
  kind: str
  key: str
  style: str = '-'
  name: str = ''


@dataclasses.dataclass(frozen=True)
class Panel:
  title: str
  ylabel: str
  lines: tuple[Line, ...]
  log_if_positive: bool = False
  stage_switch: bool = False
  hline: float | None = None
  hline_label: str = ''
  se_key: str | None = None    # an arm with one seed gets the band value +- this logged standard error
  smooth: bool = False         # moving average over SMOOTH_WINDOW steps over the raw curve, faint; no band


def _colors(arms: Sequence[str]) -> dict[str, Any]:
  from matplotlib import colormaps
  cmap = colormaps['tab10']
  return {arm: cmap(i % 10) for i, arm in enumerate(arms)}


def _new_figure(n_panels: int, max_cols: int = 3):
  from matplotlib.figure import Figure
  ncols = 2 if n_panels == 4 else min(n_panels, max_cols)
  nrows = math.ceil(n_panels / ncols)
  size = (7.0, 4.0) if n_panels == 1 else (PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows)
  fig = Figure(figsize=size, dpi=DPI, layout='constrained')
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax in axes[n_panels:]:
    ax.set_visible(False)
  return fig, list(axes[:n_panels])


def _save(fig, out_dir: str, name: str) -> str:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  FigureCanvasAgg(fig)
  fig.savefig(os.path.join(out_dir, f'{name}.png'), dpi=DPI)
  return f'{name}.png'


def _band_note(study: Study) -> str:
  seeds = max(len(r) for r in study.arms.values())
  return f'; shaded: min–max over {seeds} seeds' if seeds > 1 else ''


def _draw_curve(ax, curve: Curve, color, style: str, label: str | None = None, smooth: bool = False):
  if smooth:
    ax.plot(curve.steps, curve.mean, style, color=color, lw=0.8, alpha=0.25)
    ax.plot(curve.steps, study_stats.moving_average(curve.mean, SMOOTH_WINDOW), style, color=color, lw=1.6,
            label=label)
    return
  ax.plot(curve.steps, curve.mean, style, color=color, lw=1.6, label=label,
          marker='o' if len(curve.steps) == 1 else None)
  if curve.num_seeds > 1 or curve.se_band:
    ax.fill_between(curve.steps, curve.low, curve.high, color=color, alpha=0.18, lw=0)


def _legend(ax, colors: dict[str, Any], arms: Sequence[str], styles: Sequence[tuple[str, str]], extra=()):
  from matplotlib.lines import Line2D
  handles = [Line2D([], [], color=colors[a], lw=2, label=arm_label(a)) for a in arms]
  if len(styles) > 1:
    handles += [Line2D([], [], color='0.3', ls=s, lw=1.6, label=n) for s, n in styles]
  handles += list(extra)
  ax.legend(handles=handles, fontsize=7, loc='best', framealpha=0.8)


def _draw_panels(study: Study, panels: Sequence[Panel], out_dir: str, name: str, suptitle: str,
                 band_note: str | None = None) -> str | None:
  """Draws the panels that have data (arms as colours, Line.style per metric); None if none has."""
  curves = {}
  for p in panels:
    for ln in p.lines:
      for arm, runs in study.arms.items():
        c = arm_curve(runs, ln.kind, ln.key)
        if c is not None:
          curves[(p.title, ln, arm)] = with_se_band(c, runs, ln.kind, p.se_key) if p.se_key else c
  drawn = [p for p in panels if any((p.title, ln, a) in curves for ln in p.lines for a in study.arms)]
  if not drawn:
    return None
  colors = _colors(list(study.arms))
  fig, axes = _new_figure(len(drawn))
  for ax, p in zip(axes, drawn):
    present_arms = [a for a in study.arms if any((p.title, ln, a) in curves for ln in p.lines)]
    present_lines = [ln for ln in p.lines if any((p.title, ln, a) in curves for a in study.arms)]
    values = []
    for ln in present_lines:
      for arm in present_arms:
        c = curves.get((p.title, ln, arm))
        if c is not None:
          _draw_curve(ax, c, colors[arm], ln.style, smooth=p.smooth)
          values.append(c.low)
    lo, hi = np.min(np.concatenate(values)), np.max(np.concatenate(values))
    if p.log_if_positive and lo > 0 and hi / lo >= LOG_SCALE_SPAN:
      ax.set_yscale('log')
    extra = []
    if p.stage_switch:
      from matplotlib.lines import Line2D
      for arm in present_arms:
        for step in sorted(set(stage2_starts(study.arms[arm]))):
          ax.axvline(step, color=colors[arm], ls=':', lw=1.2)
      if any(stage2_starts(study.arms[a]) for a in present_arms):
        extra.append(Line2D([], [], color='0.3', ls=':', lw=1.2, label='CF-RL stage 2 starts'))
    if p.hline is not None:
      from matplotlib.lines import Line2D
      ax.axhline(p.hline, color='0.5', ls='--', lw=1)
      extra.append(Line2D([], [], color='0.5', ls='--', lw=1, label=p.hline_label))
    ax.set_title(p.title, fontsize=10)
    ax.set_xlabel('RL step')
    ax.set_ylabel(p.ylabel)
    ax.grid(alpha=0.3)
    _legend(ax, colors, present_arms, [(ln.style, ln.name or ln.key) for ln in present_lines], extra)
  fig.suptitle(suptitle + (_band_note(study) if band_note is None else band_note), fontsize=11)
  return _save(fig, out_dir, name)


def pass1_band(study: Study) -> str:
  """What the shaded band of the held-out pass@1 is, for the seed counts present."""
  counts = {len(runs) for runs in study.arms.values()}
  bands = ([f'min–max over seeds ({"/".join(str(c) for c in sorted(counts) if c > 1)} seeds)']
           if any(c > 1 for c in counts) else [])
  bands += ["± the eval's own s.e. of pass@1 (one seed)"] if 1 in counts else []
  return ' or '.join(bands)


def figure_accuracy(study: Study, out_dir: str, target: float | None = None) -> str | None:
  return _draw_panels(study, [
      Panel('Held-out pass@1 (sampled)', 'pass@1', (Line('eval', 'pass@1'),), stage_switch=True,
            hline=target, hline_label=f'target {target:.3f}' if target is not None else '', se_key='pass@1_stderr'),
      Panel('Held-out greedy accuracy', 'accuracy', (Line('eval', 'greedy_accuracy'),)),
      Panel(f'Training reward (batch mean, {SMOOTH_WINDOW}-step moving average)', 'reward',
            (Line('train', 'reward_mean', '-', 'reward'), Line('train', 'accuracy', '--', 'correctness part')),
            stage_switch=True, smooth=True),
  ], out_dir, 'accuracy', 'Accuracy', band_note=f'; pass@1 band: {pass1_band(study)}')


def figure_confidence(study: Study, out_dir: str) -> str | None:
  return _draw_panels(study, [
      Panel('Confidence: mean prob. of sampled tokens', 'probability', (Line('train', 'mean_prob'),),
            stage_switch=True),
      Panel('Mean max-probability', 'probability', (Line('train', 'max_prob'),), stage_switch=True),
      Panel('Mean token entropy', 'entropy (nats)', (Line('train', 'entropy'),), stage_switch=True),
  ], out_dir, 'confidence', 'Confidence and entropy on training samples')


def figure_norms(study: Study, out_dir: str) -> str | None:
  head_kind = 'train' if 'head_norm' in study.keys('train') else 'probe'
  return _draw_panels(study, [
      Panel('Classifier (head) norm ||W||_F', 'norm', (Line(head_kind, 'head_norm'),)),
      Panel('Gradient norms', 'norm', (Line('train', 'grad_norm_head', '-', 'head'),
                                       Line('train', 'grad_norm_backbone', '--', 'backbone')),
            log_if_positive=True),
  ], out_dir, 'norms', 'Head and gradient norms')


def figure_ntk(study: Study, out_dir: str) -> str | None:
  keys = [k for k in study.keys('probe') if NTK_KEY.match(k)]
  styles = {'R': '-', 'G': '--', 'cross': ':', 'total': '-.'}
  panels = []
  for part in ('diag', 'offdiag'):
    lines = tuple(Line('probe', k, styles[NTK_KEY.match(k).group(1)], NTK_KEY.match(k).group(1))
                  for k in sorted(keys, key=lambda k: list(styles).index(NTK_KEY.match(k).group(1)))
                  if NTK_KEY.match(k).group(2) == part)
    if lines:
      where = 'same context (diagonal)' if part == 'diag' else 'across contexts (off-diagonal)'
      panels.append(Panel(f'eNTK components, {where}', 'kernel value', lines, log_if_positive=True))
  probe_keys = study.keys('probe')
  shares = tuple(Line('probe', k, style, name) for k, style, name in (
      ('ntk_R_share', '-', 'diagonal R/(R+G)'), ('ntk_R_share_offdiag', '--', 'off-diagonal |R|/(|R|+|G|)'))
      if k in probe_keys)
  if shares:
    panels.append(Panel('R share of the eNTK', 'share', shares))
  cosines = tuple(Line('probe', k, style, name) for k, style, name in (
      ('phi_cosine', '-', 'last prompt token'), ('phi_cosine_response', '--', 'response positions'))
      if k in probe_keys)
  if cosines:
    panels.append(Panel('Feature similarity: mean cos(phi, phi\') across contexts', 'cosine', cosines))
  return _draw_panels(study, panels, out_dir, 'ntk', 'Empirical NTK probes (R: from the head, G: from the backbone)')


def figure_logprob_split(study: Study, out_dir: str) -> str | None:
  """Who moves the log-probs: the first-order change of the probe log-probs per update, split into the
  head's and the backbone's parts for the optimizer actually used (AdamW), next to the actual change."""
  return _draw_panels(study, [
      Panel('First-order change of probe log-probs per update', 'mean Δ log π',
            (Line('probe', 'logprob_change_linear_head', '-', 'head part'),
             Line('probe', 'logprob_change_linear_backbone', '--', 'backbone part'),
             Line('probe', 'logprob_change_actual', ':', 'actual')), stage_switch=True),
  ], out_dir, 'logprob_split', 'Who moves the log-probs (head vs backbone, first order)')


def figure_passk(study: Study, out_dir: str) -> str | None:
  ks = sorted(int(m.group(1)) for k in study.keys('eval') for m in [PASS_K_KEY.match(k)] if m)
  if len(ks) < 2:   # pass@1 alone is already in accuracy.png
    ks = []
  colors = _colors(list(study.arms))
  per_arm = {}
  for arm, runs in study.arms.items():
    pts = {}
    for which in ('base', 'final'):
      xs, ys = [], []
      for k in ks:
        ends = eval_endpoint(runs, f'pass@{k}', which)
        if ends is not None:
          xs.append(k)
          ys.append(float(np.mean([v for _, v in ends])))
      if xs:
        pts[which] = (xs, ys)
    if pts:
      per_arm[arm] = pts
  distinct = [a for a, runs in study.arms.items() if arm_curve(runs, 'eval', 'distinct_answers') is not None]
  n = bool(per_arm) + bool(distinct)
  if not n:
    return None
  from matplotlib.lines import Line2D
  fig, axes = _new_figure(n)
  axes = iter(axes)
  if per_arm:
    ax = next(axes)
    for arm, pts in per_arm.items():
      for which, style, marker in (('base', '--', 's'), ('final', '-', 'o')):
        if which in pts:
          ax.plot(*pts[which], style, marker=marker, color=colors[arm], lw=1.5, ms=4)
    if len(ks) > 1:
      ax.set_xscale('log', base=2)
      ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_title('pass@k: base (step 0) vs last eval', fontsize=10)
    ax.set_xlabel('k (samples per problem)')
    ax.set_ylabel('pass@k')
    ax.grid(alpha=0.3)
    _legend(ax, colors, list(per_arm), [], [Line2D([], [], color='0.3', ls='--', marker='s', ms=4, label='base'),
                                            Line2D([], [], color='0.3', ls='-', marker='o', ms=4, label='last eval')])
  if distinct:
    ax = next(axes)
    for arm in distinct:
      _draw_curve(ax, arm_curve(study.arms[arm], 'eval', 'distinct_answers'), colors[arm], '-')
    ax.set_title('Distinct final answers per problem', fontsize=10)
    ax.set_xlabel('RL step')
    ax.set_ylabel('distinct answers')
    ax.grid(alpha=0.3)
    _legend(ax, colors, distinct, [])
  fig.suptitle('Diversity: pass@k and distinct answers (held-out)' + _band_note(study), fontsize=11)
  return _save(fig, out_dir, 'passk')


def figure_formats(study: Study, out_dir: str) -> str | None:
  every_run = [r for runs in study.arms.values() for r in runs]
  source = 'eval' if format_names(every_run, 'eval') else 'train'
  names = format_names(every_run, source)
  arms = [a for a in study.arms if any(arm_curve(study.arms[a], source, f'format_{n}') is not None for n in names)]
  if not arms:
    return None
  from matplotlib import colormaps
  cmap = colormaps['Dark2']
  fig, axes = _new_figure(len(arms))
  for ax, arm in zip(axes, arms):
    for i, name in enumerate(names):
      c = arm_curve(study.arms[arm], source, f'format_{name}')
      if c is not None:
        _draw_curve(ax, c, cmap(i % 8), '-', label=name)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(arm_label(arm), fontsize=10)
    ax.set_xlabel('RL step')
    ax.set_ylabel('fraction of samples')
    ax.grid(alpha=0.3)
    ax.legend(title='format', fontsize=7, title_fontsize=7, loc='best', framealpha=0.8)
  where = 'held-out samples' if source == 'eval' else 'training samples'
  fig.suptitle(f'Solution formats over training ({where})' + _band_note(study), fontsize=11)
  return _save(fig, out_dir, 'formats')


def figure_echo_chamber(study: Study, out_dir: str) -> str | None:
  """Per arm: the share of training samples in each format over RL steps (moving average over SMOOTH_WINDOW
  steps, raw faint, min-max band over seeds) and, on a second axis, held-out pass@1 and greedy accuracy."""
  panels = echo_chamber_panels(study)
  if not panels:
    return None
  from matplotlib import colormaps
  from matplotlib.lines import Line2D
  from matplotlib.ticker import MaxNLocator
  cmap = colormaps['Dark2']
  names = list(dict.fromkeys(t.name for p in panels for t in p.formats))
  colors = {n: cmap(i % 8) for i, n in enumerate(names)}
  fig, axes = _new_figure(len(panels), max_cols=2)
  for ax, p in zip(axes, panels):
    handles = []
    for t in p.formats:
      if not np.any(t.raw > 0):   # never sampled: a line on 0 adds nothing
        continue
      ax.plot(t.steps, t.raw, color=colors[t.name], lw=0.8, alpha=0.25)
      ax.plot(t.steps, t.smooth, color=colors[t.name], lw=1.8)
      if t.num_seeds > 1:
        ax.fill_between(t.steps, t.low, t.high, color=colors[t.name], alpha=0.15, lw=0)
      handles.append(Line2D([], [], color=colors[t.name], lw=1.8, label=f'format: {t.name}'))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel('RL step')
    ax.set_ylabel('fraction of training samples')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # RL steps / EI rounds
    ax.set_title(arm_label(p.arm), fontsize=10)
    ax.grid(alpha=0.3)
    acc = ax.twinx()
    for curve, style, color, label in ((p.pass1, '-', 'black', 'held-out pass@1'),
                                       (p.greedy, '--', '0.45', 'held-out greedy accuracy')):
      if curve is None:
        continue
      acc.plot(curve.steps, curve.mean, style, color=color, lw=1.4, marker='o', ms=3)
      if curve.num_seeds > 1 or curve.se_band:
        acc.fill_between(curve.steps, curve.low, curve.high, color=color, alpha=0.10, lw=0)
      handles.append(Line2D([], [], color=color, ls=style, marker='o', ms=3, lw=1.4, label=label))
    acc.set_ylabel('held-out accuracy')
    acc.set_ylim(bottom=0)
    ax.legend(handles=handles, fontsize=7, loc='best', framealpha=0.8)
  fig.suptitle(f'Echo Chamber: formats of training samples ({SMOOTH_WINDOW}-step moving average, raw faint)\n'
               'and held-out accuracy (right axis)' + _band_note(study), fontsize=11)
  return _save(fig, out_dir, ECHO_CHAMBER_FIGURE)


def write_figures(study: Study, out_dir: str, target: float | None = None) -> dict[str, str | None]:
  """Draws every figure that has data into out_dir; name -> PNG file name (None: nothing to draw)."""
  figures = {
      'accuracy': figure_accuracy(study, out_dir, target),
      'confidence': figure_confidence(study, out_dir),
      'passk': figure_passk(study, out_dir),
      'formats': figure_formats(study, out_dir),
      'ntk': figure_ntk(study, out_dir),
      'logprob_split': figure_logprob_split(study, out_dir),
      'norms': figure_norms(study, out_dir),
  }
  if is_echo_chamber(study):   # drawn only for configs/echo_chamber.py studies; its own report section
    figures[ECHO_CHAMBER_FIGURE] = figure_echo_chamber(study, out_dir)
  return figures
