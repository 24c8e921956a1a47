"""The report's text: report.md (tables, findings, figure captions, the analyses found beside the
runs) and the README's results block."""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

from cfrl_jax import machine
from cfrl_jax.analysis import study_stats
from cfrl_jax.analysis.report_figures import ECHO_CHAMBER_FIGURE, FIGURES, pass1_band
from cfrl_jax.analysis.report_findings import findings
from cfrl_jax.analysis.report_numbers import (COLLAPSE_SHARE, NOISE_SIGMAS, SMOOTH_WINDOW, TRAIN_WINDOW,
                                              ReportNumbers, collapse_and_gain, echo_chamber_panels,
                                              eval_format_endpoints, eval_temperature, is_echo_chamber)
from cfrl_jax.analysis.report_runs import Study, arm_label, config_field, is_number


def _fmt(x: float | None, digits: int = 3) -> str:
  return '—' if x is None or not math.isfinite(x) else f'{x:.{digits}f}'


def _duration(seconds: float) -> str:
  return f'{seconds:.0f} s' if seconds < 120 else f'{seconds / 60:.1f} min' if seconds < 7200 else \
      f'{seconds / 3600:.1f} h'


def _pm(x: float | None, pm: float | None) -> str:
  return _fmt(x) if pm is None or x is None or not math.isfinite(pm) else f'{x:.3f} ± {pm:.3f}'


def _arrow(a: float | None, b: float | None) -> str:
  return '—' if a is None and b is None else f'{_fmt(a)} → {_fmt(b)}'


def _what_was_run(study: Study) -> list[str]:
  cfg, info = study.config, study.info
  lines = []
  arms = ', '.join(f'{arm_label(a)} (`{a}`)' for a in study.arms)
  if study.single:
    seed = study.arms[next(iter(study.arms))][0].seed
    lines.append(f'- A single run: {arms}' + (f', seed {seed}' if seed is not None else '') + '.')
  else:
    seeds = info.get('seeds') or sorted({r.seed for runs in study.arms.values() for r in runs if r.seed is not None})
    lines.append(f'- Arms: {arms}; seeds: {", ".join(map(str, seeds)) or "one per arm"}.')
  if study.missing:
    lines.append(f'- **Missing runs** (named in study.json, no metrics.jsonl): {", ".join(study.missing)}.')
  last = [int(r.records['train'][-1]['step']) for runs in study.arms.values() for r in runs if r.records.get('train')]
  planned = config_field(cfg, 'rl.steps')
  if last:
    logged = f'{min(last)}' if min(last) == max(last) else f'{min(last)}–{max(last)}'
    lines.append(f'- RL steps: {planned if planned is not None else "?"} planned (config.rl.steps); '
                 f'last training step logged: {logged}.')
  if cfg:
    algo = config_field(cfg, 'rl.algorithm')
    if study.single and algo is not None:
      cf = config_field(cfg, 'cfrl.enabled')
      lines.append(f'- Algorithm: {algo}' + (' with CF-RL' if cf else '') + '.')
    rl = [f'{n} {v}' for n, v in (('prompts/step', config_field(cfg, 'rl.prompts_per_step')),
                                  ('group size', config_field(cfg, 'rl.group_size')), ('lr', config_field(cfg, 'rl.lr')),
                                  ('temperature', config_field(cfg, 'rl.temperature')), ('KL coef', config_field(cfg, 'rl.kl_coef')))
          if v is not None]
    if rl:
      lines.append(f'- RL settings: {", ".join(rl)}.')
    if any(a.startswith('cf') for a in study.arms) or (study.single and config_field(cfg, 'cfrl.enabled')):
      s1, hlr = config_field(cfg, 'cfrl.stage1_steps'), config_field(cfg, 'cfrl.stage1_head_lr')
      how = config_field(cfg, 'cfrl.switch_on')
      if s1 is not None:
        lines.append(f'- CF-RL stage 1 (head only): {s1} steps, head lr {hlr}, switch on {how}.')
  model = []
  source = config_field(cfg, 'model.source')
  if source:
    model.append(f'source {source}' + (f' `{config_field(cfg, "model.path")}`' if config_field(cfg, 'model.path') else ''))
  base = info.get('base') or {}
  if base.get('num_params'):
    model.append(f'{base["num_params"] / 1e6:.2f}M parameters')
  elif source in ('pretrain', 'init') and config_field(cfg, 'model.arch.hidden_size'):
    model.append(f'hidden {config_field(cfg, "model.arch.hidden_size")}, {config_field(cfg, "model.arch.num_layers")} layers')
  if base.get('steps') is not None:
    model.append(f'pretrained {base["steps"]} steps' +
                 (f' to loss {base["final_loss"]:.3f}' if is_number(base.get('final_loss')) else '') +
                 (f' in {_duration(base["seconds"])}' if is_number(base.get('seconds')) else ''))
  if model:
    lines.append(f'- Model: {", ".join(model)}.')
  n_problems = config_field(cfg, 'eval.num_problems')
  for runs in study.arms.values():
    s, v = runs[0].series('eval', 'num_problems')
    if len(v):
      n_problems = int(v[-1])
  ev = [f'{n_problems} held-out problems' if n_problems is not None else None,
        f'{config_field(cfg, "eval.samples")} samples each' if config_field(cfg, 'eval.samples') is not None else None,
        f'every {config_field(cfg, "eval.every")} steps' if config_field(cfg, 'eval.every') is not None else None]
  if any(ev):
    lines.append(f'- Evaluation: {", ".join(e for e in ev if e)}.')
  timings = info.get('timings') or {}
  if timings:
    per_arm = []
    for arm in study.arms:
      t = [v for k, v in timings.items() if k.split('/')[0] == arm and is_number(v)]
      if t:
        per_arm.append(f'{arm_label(arm)} {_duration(float(np.mean(t)))}')
    total = timings.get('total')
    lines.append('- Timings: ' + (f'total {_duration(total)}' if is_number(total) else '') +
                 (('; ' if is_number(total) else '') + 'mean per run: ' + ', '.join(per_arm) if per_arm else '') + '.')
  return lines


def results_table(nums: ReportNumbers) -> list[str]:
  multi = any(s.num_seeds > 1 for s in nums.arms.values())
  pm = 's.d. over seeds' if multi else 's.e.'
  out = [f'| arm | seeds | pass@1 base | pass@1 final (± {pm}) | Δ pass@1 | final step '
         '| greedy acc. base → final | train reward first → last | confidence first → last '
         '| entropy first → last | dominant format base → final |',
         '|' + '---|' * 11]
  for s in nums.arms.values():
    steps = '—' if not s.final_steps else (str(s.final_steps[0]) if len(set(s.final_steps)) == 1 else
                                           f'{min(s.final_steps)}–{max(s.final_steps)}')
    fmt = '—'
    if s.final_format is not None:
      b = f'{s.base_format[0]} ({s.base_format[1]:.2f})' if s.base_format else '—'
      fmt = f'{b} → {s.final_format[0]} ({s.final_format[1]:.2f})'
      fmt += ' [train]' if s.format_source == 'train' else ''
    pm_value = s.final_pm if (s.num_seeds > 1 or not multi) else None   # match the column's header
    gain = '—' if s.gain is None else f'{s.gain:+.3f}'
    out.append(f'| {s.label} | {s.num_seeds} | {_fmt(s.base_pass1)} | {_pm(s.final_pass1, pm_value)} | '
               f'{gain} | {steps} | {_arrow(s.base_greedy, s.final_greedy)} | '
               f'{_arrow(s.reward_first, s.reward_last)} | {_arrow(s.confidence_first, s.confidence_last)} | '
               f'{_arrow(s.entropy_first, s.entropy_last)} | {fmt} |')
  return out


def target_table(nums: ReportNumbers) -> list[str]:
  if nums.target is None:
    return [f'Not computed: {nums.target_note}. Pass target_accuracy (--target_accuracy) to set one.']
  out = [f'Target pass@1: **{nums.target:.3f}** ({nums.target_note}).', '',
         '| arm | first eval step with seed-mean pass@1 ≥ target | per seed | last eval step |', '|---|---|---|---|']
  for s in nums.arms.values():
    per_seed = ', '.join('not reached' if x is None else str(x) for x in s.steps_to_target_per_seed)
    out.append(f'| {s.label} | {"not reached" if s.steps_to_target is None else s.steps_to_target} | '
               f'{per_seed or "—"} | {"—" if s.last_eval_step is None else s.last_eval_step} |')
  for comp in nums.comparisons:
    out += ['', f'Steps-to-target ratio {arm_label(comp.cf)} / {arm_label(comp.rl)}: **{comp.text}** '
                '(seed-mean curves; below 1: CF-RL got there in fewer steps; whether that is more than seed '
                'noise is in the paired comparisons).']
  return out


def per_seed_table(nums: ReportNumbers) -> list[str]:
  out = ['| arm | seed | pass@1 base | pass@1 final | last eval step | steps to target | AUC (mean pass@1) '
         '| stage 2 from |', '|' + '---|' * 8]
  for arm, rows in nums.per_seed.items():
    for x in rows:
      out.append(f'| {arm_label(arm)} | {"—" if x.seed is None else x.seed} | {_fmt(x.base_pass1)} | '
                 f'{_fmt(x.final_pass1)} | {"—" if x.last_eval_step is None else x.last_eval_step} | '
                 f'{"—" if x.steps is None else x.steps} | {_fmt(x.auc)} | '
                 f'{"—" if x.stage2_step is None else x.stage2_step} |')
  return out


def _mean_sd_text(values: Sequence[float], digits: int = 3) -> str:
  mean, sd = study_stats.mean_sd(values)
  if mean is None:
    return '—'
  return f'{mean:.{digits}f}' if sd is None else f'{mean:.{digits}f} ± {sd:.{digits}f}'


def across_seed_table(nums: ReportNumbers) -> list[str]:
  out = ['| arm | seeds | pass@1 final | AUC (mean pass@1) | steps to target | seeds not reaching the target |',
         '|' + '---|' * 6]
  for arm, rows in nums.per_seed.items():
    steps = [x.steps for x in rows if x.steps is not None]
    censored = sum(s.censored for s in steps)
    out.append(f'| {arm_label(arm)} | {len(rows)} | '
               f'{_mean_sd_text([x.final_pass1 for x in rows if x.final_pass1 is not None])} | '
               f'{_mean_sd_text([x.auc for x in rows if x.auc is not None])} | '
               f'{_mean_sd_text([s.steps for s in steps], 1)}{" (bound)" if censored else ""} | '
               f'{f"{censored} of {len(steps)}" if steps else "—"} |')
  return out


PAIRED_METRICS = {'steps': 'steps to target', 'auc': 'AUC (mean pass@1)', 'final': 'final pass@1'}


def paired_table(nums: ReportNumbers) -> list[str]:
  if not nums.paired:
    return ['No comparisons: the study has no pair of arms from the comparison table '
            '(cfrl_jax.analysis.study_stats.COMPARISONS, or cf<X> against <X>).']
  out = ['| treatment − control | isolates | metric | seeds | treatment | control | difference [95% interval] '
         '| verdict |', '|' + '---|' * 8]
  for r in nums.paired:
    digits = 1 if r.metric == 'steps' else 3
    verdict = {None: 'not distinguishable', 'better': 'faster' if r.metric == 'steps' else 'higher',
               'worse': 'slower' if r.metric == 'steps' else 'lower'}[r.verdict]
    note = f' ({r.censored} censored)' if r.censored else ''
    out.append(f'| {arm_label(r.comparison.treatment)} − {arm_label(r.comparison.control)} | {r.comparison.isolates} '
               f'| {PAIRED_METRICS[r.metric]} | {r.interval.n}{note} | {np.mean(r.treatment):.{digits}f} | '
               f'{np.mean(r.control):.{digits}f} | {r.interval.text(digits)} | {verdict} |')
  return out


METHOD_LINES = (
    study_stats.METHOD,
    'Steps to target: the first eval step with pass@1 ≥ the target, per seed; "N+" marks a seed that never reached '
    'it, counted at its last eval step N (a lower bound on its steps, so its arm\'s mean is a bound too); a seed in '
    'which neither arm of a comparison reached it is left out of that comparison.',
    'AUC: the trapezoid area under the held-out pass@1 curve over eval steps divided by the step span, i.e. the '
    'mean pass@1 over training; it uses every eval, so it depends less on the eval grid than steps to target. '
    'A paired comparison uses the step span both runs logged. Across seeds: mean ± sample standard deviation.',
)


def seed_statistics_section(nums: ReportNumbers) -> list[str]:
  """The per-seed table, the across-seed table, the paired comparisons and the method, as markdown lines."""
  return ['Per seed:', '', *per_seed_table(nums), '', 'Across seeds (mean ± s.d.; one seed: the value):', '',
          *across_seed_table(nums), '', 'Paired comparisons (treatment − control, per RL seed):', '',
          *paired_table(nums), '',
          *[x for line in METHOD_LINES + ((nums.base_note,) if nums.base_note else ()) for x in (line, '')]][:-1]


def echo_chamber_format_table(study: Study) -> list[str]:
  """Markdown: per arm and format, the sampled and greedy eval fractions at the base and at the end."""
  t = eval_temperature(study.config)
  sampled = f'sampled (T = {t:g})' if t is not None else 'sampled'
  rows = []
  for arm, runs in study.arms.items():
    for name, v in eval_format_endpoints(runs).items():
      if not any(x for x in v.values()):   # never produced, by either decoding
        continue
      rows.append(f'| {arm_label(arm)} | {name} | {_arrow(v["sampled_base"], v["sampled_end"])} | '
                  f'{_arrow(v["greedy_base"], v["greedy_end"])} |')
  if not rows:
    return ['No eval format fractions logged (eval format_<name> / greedy_format_<name>).']
  return [f'| arm | format | {sampled}: base → end | greedy: base → end |', '|---|---|---|---|', *rows]


def collapse_table(study: Study, window: int = SMOOTH_WINDOW) -> list[str]:
  """Markdown: per arm, the dominant training format, when it reached COLLAPSE_SHARE, and the largest gain."""
  rows = []
  for p in echo_chamber_panels(study, window):
    c = collapse_and_gain(p)
    gain = 'no rise' if c.gain is None else f'{c.gain_from} → {c.gain_to} ({c.gain:+.3f})'
    coincide = {None: '—', True: 'yes', False: 'no'}[c.coincides]
    dominant = ('none (every named format ends at 0)' if c.dominant is None else
                f'{c.dominant} ({c.first_share:.2f} → {c.last_share:.2f})')
    collapse = ('—' if c.dominant is None else f'already at the first step' if c.already else
                'not reached' if c.collapse_step is None else str(c.collapse_step))
    rows.append(f'| {arm_label(c.arm)} | {dominant} | {collapse} | {gain} | {coincide} |')
  if not rows:
    return []
  return [f'| arm | dominant training format at the end (share first → last step) | first step with share '
          f'≥ {COLLAPSE_SHARE:g} | largest pass@1 rise between evals (steps, change) | collapse within it |',
          '|---|---|---|---|---|', *rows]


def echo_chamber_section(study: Study, figure: str | None) -> list[str]:
  """The report's Echo Chamber section: format tables (greedy and sampled), the collapse vs gain table
  with its rule, and the figure."""
  md = ['## Echo Chamber: solution formats and accuracy', '',
        'Fraction of held-out completions in each solution format at the base (step 0) and at the end (each '
        "seed's last eval), among the sampled completions (the eval temperature) and the greedy ones; means over "
        'seeds. Formats that neither decoding produced are left out.', '', *echo_chamber_format_table(study), '']
  collapse = collapse_table(study)
  if collapse:
    md += ['Collapse vs gain. Dominant format: the named format (not "unknown") with the largest share of '
           f'training samples at the last step ({SMOOTH_WINDOW}-step centred moving average of the seed mean); its '
           f'collapse step: the first training step at which that share reaches {COLLAPSE_SHARE:g}, having started '
           'below it ("already at the first step": no collapse during training). Largest gain: the pair of '
           'consecutive evals with the largest rise of seed-mean held-out pass@1 ("no rise": none rose). '
           '"Collapse within it": the collapse step lies after the first of those evals and at or before the '
           'second.', '', *collapse, '']
  if figure:
    md += [f'Per arm: the share of training samples in each format over RL steps ({SMOOTH_WINDOW}-step moving '
           'average, the raw per-step seed mean faint' +
           (', band: min–max over seeds of each seed\'s moving average' if any(len(r) > 1 for r in study.arms.values())
            else '') + '); right axis: held-out pass@1 (solid, band: ' + pass1_band(study) + ') and greedy '
           'accuracy (dashed). Formats never sampled in training are not drawn.', '',
           f'![Echo Chamber formats and accuracy]({figure})', '']
  return md


FIGURE_CAPTIONS = {   # name -> (heading, caption)
    'accuracy': ('Accuracy', 'Held-out pass@1 (sampled) and greedy accuracy, and the training reward, per RL step. '
                 'Band of pass@1: {band}. Training reward: centered moving average over {window} steps, the raw '
                 'per-step curve faint. Dotted vertical lines: the first step of CF-RL stage 2 (per seed).'),
    'confidence': ('Confidence and entropy', 'Confidence (mean probability of sampled tokens), mean max-probability '
                   'and entropy on training samples; dotted vertical lines: the first step of CF-RL stage 2.'),
    'passk': ('pass@k and diversity', 'pass@k of the base model (dashed) and at the last eval (solid), and distinct '
              'final answers per problem.'),
    'formats': ('Solution formats', 'Fraction of samples in each solution format, one panel per arm.'),
    'ntk': ('Empirical NTK', 'Empirical NTK components from the probes: R (head/feature part), G (backbone part), '
            'cross terms and total (log scale when positive and spanning a wide range); the R share on the '
            'diagonal (a sample on itself) and off it (|R| / (|R| + |G|) between different contexts: the '
            'paper\'s mechanism); the mean cosine between features of different contexts at the last prompt '
            'token and at the response positions.'),
    'logprob_split': ('Who moves the log-probs', 'The first-order change of the probe log-probs caused by each '
                      'probed update, split into the head\'s and the backbone\'s parts (exact JVPs along the '
                      'AdamW update actually applied), with the actual change.'),
    'norms': ('Norms', 'Classifier norm and gradient norms of the head and the backbone.'),
}
FIGURE_NEEDS = {
    'accuracy': 'eval pass@1 / greedy_accuracy or train reward_mean / accuracy',
    'confidence': 'train mean_prob/max_prob/entropy',
    'passk': 'eval pass@k or distinct_answers', 'formats': 'eval or train format_<name>',
    'ntk': 'probe ntk_<R|G|cross|total>_<diag|offdiag>, ntk_R_share(_offdiag) or phi_cosine(_response)',
    'logprob_split': 'probe logprob_change_linear_head / _backbone / logprob_change_actual',
    'norms': 'head_norm or train grad_norm_head/grad_norm_backbone',
}


def report_markdown(study: Study, nums: ReportNumbers, figures: dict[str, str | None], *,
                    title: str | None = None, analysis_md: str | None = None) -> str:
  """The text of report.md. figures: name (FIGURES) -> PNG file name relative to the report, None if not drawn."""
  title = title or config_field(study.config, 'name') or os.path.basename(study.path)
  md = [f'# {title}', '',
        f'Generated by `cfrl_jax.report` from `{study.path}`.', '',
        '## What was run', '', *_what_was_run(study), '',
        '## Results', '', *results_table(nums), '',
        f'Base: the eval at step 0; final: each seed\'s last eval; Δ: mean over seeds of final − base. '
        f'Training metrics are means over the first/last {TRAIN_WINDOW} training steps. '
        'Confidence: mean probability of the sampled tokens. Values are means over seeds.', '',
        '## Steps to target accuracy', '', *target_table(nums), '',
        '## Seeds and paired comparisons', '', *seed_statistics_section(nums), '',
        '## Findings', '', *[f'- {f}' for f in findings(nums)], '',
        'Comparisons between arms use the paired 95% intervals above. An arm\'s change from its own base is called '
        f'real only beyond {NOISE_SIGMAS:g} standard errors (per seed: pass@1_stderr over problems; over seeds: the '
        'larger of that and the seed-to-seed standard error).', '',
        *(echo_chamber_section(study, figures.get(ECHO_CHAMBER_FIGURE)) if is_echo_chamber(study) else []),
        '## Figures', '']
  for name in FIGURES:
    if figures.get(name):
      heading, caption = FIGURE_CAPTIONS[name]
      caption = caption.format(band=pass1_band(study), window=SMOOTH_WINDOW)
      md += [f'### {heading}', '', caption, '', f'![{name}]({figures[name]})', '']
  skipped = [f'`{n}.png` (needs {FIGURE_NEEDS[n]})' for n in FIGURES if not figures.get(n)]
  if skipped:
    md += ['Not drawn, no data logged: ' + '; '.join(skipped) + '.', '']
  if analysis_md:
    md += ['## Analysis', '', analysis_md.strip(), '']
  return '\n'.join(md)


def found_analyses(study: Study) -> str | None:
  """Markdown of the analyses written next to the study's runs, images linked relative to the report.

  Picked up: <run>/analysis/analysis.json (python -m cfrl_jax.analyze) for every run, and
  <study>/alpharl/[<arm>/seed<k>/]alpharl.json (the AlphaRL run mode). Each is re-rendered from its
  JSON (not its .md), so its image links point from report.md to the PNGs beside the JSON.
  """
  # Imported here: both read checkpoints (jax, orbax), which a report of metrics alone never loads.
  from cfrl_jax.analysis import alpharl_report, update_dynamics_report
  sections = []
  for runs in study.arms.values():
    for run in runs:
      adir = os.path.join(os.path.dirname(run.path), 'analysis')   # run.path is the run's metrics.jsonl
      if os.path.exists(os.path.join(adir, 'analysis.json')):
        with open(os.path.join(adir, 'analysis.json')) as f:
          loaded = json.load(f)
        pngs = [n for n in update_dynamics_report.PNG_NAMES if os.path.exists(os.path.join(adir, n))]
        section = update_dynamics_report.markdown_section(loaded, os.path.relpath(adir, study.path), pngs,
                                                          heading_level=3)
        sections.append(section.replace('### Update dynamics', f'### Update dynamics of {run.arm}'
                                        + (f' seed {run.seed}' if run.seed is not None else ''), 1))
  # A study's AlphaRL runs sit in <study>/alpharl/; a report of that directory itself finds them too.
  here = os.path.basename(os.path.normpath(study.path)) == alpharl_report.SUBDIR
  root = study.path if here else os.path.join(study.path, alpharl_report.SUBDIR)
  if os.path.isdir(root):
    for dirpath, _, files in sorted(os.walk(root)):
      if alpharl_report.JSON_NAME in files:
        with open(os.path.join(dirpath, alpharl_report.JSON_NAME)) as f:
          result = json.load(f)
        image = os.path.join(dirpath, alpharl_report.PNG_NAME)
        sections.append(alpharl_report.markdown_section(
            result, os.path.relpath(image, study.path) if os.path.exists(image) else None, heading_level=3))
  return '\n\n'.join(s.strip() for s in sections) if sections else None


README_BEGIN, README_END = '<!-- demo-results -->', '<!-- /demo-results -->'


def _readme_comparisons(nums: ReportNumbers, path: str) -> list[str]:
  """A study with paired comparisons: their table and its method line in the README; the per-seed
  tables and every arm's findings stay in report.md, so the README keeps to one screen of results."""
  return ['Paired comparisons (treatment − control, per RL seed):', '', *paired_table(nums), '',
          METHOD_LINES[0], '', f'Per-seed tables, every finding and every figure: `{os.path.join(path, "report.md")}`.']


ECHO_README_BEGIN, ECHO_README_END = '<!-- echo-chamber-results -->', '<!-- /echo-chamber-results -->'


def _took(study: Study) -> list[str]:
  timings = study.info.get('timings') or {}
  base = study.info.get('base') or {}
  took = []
  if is_number(timings.get('total')):
    took.append(f'{_duration(timings["total"])} in all')
  if is_number(base.get('seconds')):
    fresh = is_number(base.get('seconds_this_run')) and base['seconds_this_run'] > 0.5 * base['seconds']
    took.append(f'of which pretraining the base {_duration(base["seconds"])}' if fresh else
                f'base model from the cache (pretraining it took {_duration(base["seconds"])} once)')
  return took


def _real_run(study: Study, command: str, path: str, readme: str, extra: str, where: str) -> str:
  """The first line of a README results block: the command, its time and machine, and how to regenerate it."""
  what = '; '.join(x for x in (', '.join(_took(study)) or 'timings not recorded', f'on {machine.describe()}', extra)
                   if x)
  return (f'**A real run** (`{command}`; {what}). Generated by '
          f'`python -m cfrl_jax.report --run={path} --readme={readme}`; {where}.')


def echo_chamber_readme_block(study: Study, nums: ReportNumbers, *, path: str, readme: str, image: str,
                              command: str = '') -> str:
  """The README's Echo Chamber block, between ECHO_README_BEGIN and ECHO_README_END: how the study was run,
  the collapse-vs-gain table and the Echo Chamber figure (`image`, relative to the README). The format
  tables and every other figure stay in the report, so the README keeps to one screen."""
  collapse = collapse_table(study)
  report = os.path.join(path, 'report.md')
  seeds = sorted({r.seed for runs in study.arms.values() for r in runs if r.seed is not None})
  block = [ECHO_README_BEGIN, '',
           _real_run(study, command or 'python -m cfrl_jax.main --config=configs/echo_chamber.py', path, readme,
                     f'seeds {", ".join(str(s) for s in seeds) or "not recorded"}',
                     f'the format tables (sampled and greedy, base → end) and every figure are in `{report}`'), '',
           *([f'Collapse vs gain: the dominant training format, the first step its smoothed share reaches '
              f'{COLLAPSE_SHARE:g}, and whether that falls between the two evals with the largest pass@1 rise.',
              '', *collapse, ''] if collapse else ['No training format fractions were logged.', '']),
           f'![Echo Chamber formats and accuracy]({image})', '', ECHO_README_END]
  return '\n'.join(block)


def readme_block(study: Study, nums: ReportNumbers, *, path: str, readme: str, image: str, command: str = '') -> str:
  """The README's results block, between README_BEGIN and README_END: how the run was made and how long it
  took, the results and steps-to-target tables, the seed statistics, the findings and the accuracy plot
  (`image`, a path relative to the README). path: the run or study dir; readme: the README's path."""
  block = [README_BEGIN, '',
           _real_run(study, command or 'python -m cfrl_jax.main --config=configs/demo.py', path, readme, '',
                     f'the full report with every figure is `{os.path.join(path, "report.md")}`'), '',
           *_what_was_run(study), '', *results_table(nums), '', *target_table(nums), '',
           *(_readme_comparisons(nums, path) if nums.paired else
             [*seed_statistics_section(nums), '', *[f'- {f}' for f in findings(nums)]]), '',
           f'![held-out accuracy and reward per arm]({image})', '', README_END]
  return '\n'.join(block)
