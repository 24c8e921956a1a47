"""Probes of the learning dynamics during training: a fixed set of probe sequences on
which the eNTK components, the features and the change of log-probabilities are measured.

    probe = make_probe_set(tokens, mask, completion_mask, positions=4)    # host side, once
    m = probe_metrics(cfg, params, probe)                                  # dict of scalar arrays
    pred = predict_logprob_change(cfg, params, probe, tokens, mask, dL_dz, eta)   # SGD step, R/G parts
    lin = linearized_logprob_change(cfg, params, probe, new_params - params)      # any update (Adam)
    actual = probe_logprobs(cfg, new_params, probe) - probe_logprobs(cfg, params, probe)

Every function is jit-friendly: jax.jit(functools.partial(probe_metrics, cfg)) (cfg is a
frozen, hashable dataclass; ProbeSet is a pytree of arrays). `training_probe` is the
jitted, float-returning summary the trainer calls every N steps.

Conventions
  * A probe entry is a completion token y = tokens[s, p + 1] predicted from the context
    tokens[s, :p + 1]; f = log pi(y | context) is the scalar whose eNTK is measured.
  * Kernel statistics: `diag` is the mean of k(i, i) over entries; `offdiag` is the mean of
    k(i, j) over pairs of entries in DIFFERENT probe sequences (how strongly one sample's
    update reaches the others). Keys: ntk_{R,G,cross,total}_{diag,offdiag} (signed means);
    cross is 0 for an untied head. ntk_reach = total_offdiag / total_diag.
  * Two R shares, labelled by where they look. ntk_R_share (diagonal) = R_diag / (R_diag +
    G_diag): how much of a sample's own update is carried by the features. ntk_R_share_offdiag
    = mean |R_ij| / (mean |R_ij| + mean |G_ij|) over entries of different sequences: how much of
    one sample's effect on OTHER contexts is carried by R, the paper's mechanism. Off-diagonal
    entries are signed (G's mean can be negative), so a signed ratio can leave [0, 1]; the
    absolute-value share cannot, and the signed means stay beside it.
  * Feature statistics: phi_norm (mean ||phi||) and phi_cosine (mean pairwise cosine across
    probe prompts, i != j) use phi at the LAST PROMPT TOKEN of each sequence; on a templated
    task that token is the same for every prompt, which inflates the cosine, so
    phi_cosine_response is the mean cosine of phi at the scored completion positions, over
    pairs of entries of different sequences.
  * Formats: build_probe_set(..., formats='all') probes every solution format of each row
    (ProbeSet.group is the format index of each sequence); training_probe then also reports
    the log-prob changes per format, logprob_change_{actual,linear_head,linear_backbone}_<fmt>.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfrl_jax import tokenization
from cfrl_jax.dynamics import confidence, ntk
from cfrl_jax.models import qwen


class ProbeSet(NamedTuple):
  """Fixed probe sequences and the completion tokens scored on them.

  tokens, mask: (n, T) int32 left-padded [prompt | completion] sequences;
  seq, pos: (m,) int32 entries: target tokens[seq, pos + 1] given tokens[seq, :pos + 1];
  prompt_last: (n,) int32 column of each sequence's last prompt token;
  group: (n,) int32 group (solution format) index of each sequence, all 0 when ungrouped.
  """
  tokens: jax.Array
  mask: jax.Array
  seq: jax.Array
  pos: jax.Array
  prompt_last: jax.Array
  group: jax.Array

  @property
  def points(self) -> ntk.Points:
    return ntk.Points(self.tokens, self.mask, self.seq, self.pos)


def _spread(k: int, length: int) -> np.ndarray:
  """k indices spread evenly over range(length), first and last included (all if k >= length)."""
  if k >= length:
    return np.arange(length)
  return np.unique(np.round(np.linspace(0, length - 1, k)).astype(int))


def make_probe_set(tokens, mask, completion_mask, *, positions: int | None = None, group=None) -> ProbeSet:
  """A ProbeSet from [prompt | completion] arrays (host side; the entry count depends on the data).

  tokens, mask: (n, T); completion_mask: (n, T) aligned with tokens, 1 on completion tokens
  (a rollout's (n, N) completion mask must be left-padded with the P prompt columns first).
  positions: completion tokens scored per sequence, spread evenly from the first to the last
  (None: all of them). group: (n,) ints, each sequence's group (None: one group).
  """
  tokens, mask, cm = np.asarray(tokens), np.asarray(mask), np.asarray(completion_mask) > 0
  group = np.zeros(tokens.shape[:1], np.int32) if group is None else np.asarray(group)
  if group.shape != tokens.shape[:1]:
    raise ValueError(f'group has shape {group.shape}; expected one entry per sequence, {tokens.shape[:1]}.')
  if not (tokens.shape == mask.shape == cm.shape) or tokens.ndim != 2:
    raise ValueError(f'tokens {tokens.shape}, mask {mask.shape} and completion_mask {cm.shape} '
                     'must all be the same (n, T) shape.')
  if positions is not None and positions < 1:
    raise ValueError(f'positions must be >= 1 or None (all); got {positions}.')
  if (cm & (mask == 0)).any():
    raise ValueError('completion_mask marks padding tokens (mask == 0) as completion tokens.')
  seq, pos, last = [], [], []
  for s in range(tokens.shape[0]):
    cols = np.nonzero(cm[s])[0]
    if cols.size == 0:
      raise ValueError(f'probe sequence {s} has no completion token.')
    if cols[0] == 0 or mask[s, cols[0] - 1] == 0:
      raise ValueError(f'probe sequence {s} has no prompt token before its completion.')
    chosen = cols[_spread(positions or cols.size, cols.size)]
    seq += [s] * len(chosen)
    pos += list(chosen - 1)
    last.append(cols[0] - 1)
  as32 = lambda x: jnp.asarray(np.asarray(x), jnp.int32)
  return ProbeSet(as32(tokens), as32(mask), as32(seq), as32(pos), as32(last), as32(group))


def _reference_completion(row: dict) -> str:
  for key in ('completion', 'solution'):
    if row.get(key):
      return str(row[key])
  if isinstance(row.get('solutions'), dict) and row['solutions']:
    return str(next(iter(row['solutions'].values())))
  if row.get('answer') is not None:
    return str(row['answer'])
  raise ValueError(f'probe row has no reference completion (completion/solution/solutions/answer): '
                   f'{sorted(row)}.')


def solution_formats(rows: Sequence[dict]) -> list[str]:
  """The solution formats every row has (rows with a 'solutions' dict), in the first row's order."""
  if not rows or not all(isinstance(r.get('solutions'), dict) for r in rows):
    return []
  return [f for f in rows[0]['solutions'] if all(f in r['solutions'] for r in rows)]


def build_probe_set(policy, rows: Sequence[dict], task=None, *, positions: int | None = 4,
                    max_new_tokens: int = 256, formats: str = 'first') -> ProbeSet:
  """A ProbeSet from task rows: each row's prompt followed by a reference completion.

  formats='first': one sequence per row, its 'completion', else 'solution', else the first of
  'solutions', else 'answer'. formats='all': one sequence per row and solution format
  (solution_formats(rows), in that order; group = the format's index), so that every format the
  base learned is probed; rows without 'solutions' fall back to 'first'. Fixed text, so the probe
  is the same at every step; completions are truncated to max_new_tokens tokens. Prompts are
  encoded as the policy encodes them (chat template, system prompt). `task` is accepted for the
  trainer's call and not needed.
  """
  del task
  if not rows:
    raise ValueError('build_probe_set needs at least one row.')
  if formats not in ('first', 'all'):
    raise ValueError(f"formats={formats!r}; expected 'first' or 'all'.")
  names = solution_formats(rows) if formats == 'all' else []
  if names:
    pairs = [(r['prompt'], r['solutions'][f], g) for r in rows for g, f in enumerate(names)]
  else:
    pairs = [(r['prompt'], _reference_completion(r), 0) for r in rows]
  tok = policy.tokenizer
  p_tokens, p_mask = tokenization.encode_prompts(
      tok, [p for p, _, _ in pairs], chat_template=policy.chat_template,
      system_prompt=policy.system_prompt)
  comps = [list(tok(str(c), add_special_tokens=False)['input_ids'])[:max_new_tokens] for _, c, _ in pairs]
  if any(not c for c in comps):
    raise ValueError('a probe row has an empty reference completion.')
  N = max(len(c) for c in comps)
  c_tokens = np.full((len(pairs), N), policy.pad_id, np.int32)
  c_mask = np.zeros((len(pairs), N), np.int32)
  for i, c in enumerate(comps):
    c_tokens[i, :len(c)] = c
    c_mask[i, :len(c)] = 1
  tokens = np.concatenate([p_tokens, c_tokens], axis=1)
  mask = np.concatenate([p_mask, c_mask], axis=1)
  cm = np.concatenate([np.zeros_like(p_mask), c_mask], axis=1)
  return make_probe_set(tokens, mask, cm, positions=positions, group=[g for _, _, g in pairs])


def probe_logprobs(cfg: qwen.QwenConfig, params, probe: ProbeSet):
  """log pi(y | c) at the probe entries: (m,)."""
  z, _ = qwen.forward(cfg, params, probe.tokens, probe.mask)
  logp = jax.nn.log_softmax(z[probe.seq, probe.pos], axis=-1)
  return jnp.take_along_axis(logp, probe.tokens[probe.seq, probe.pos + 1][:, None], axis=-1)[:, 0]


def _offdiag_mean(k, seq):
  """Mean of k(i, j) over pairs of entries of different sequences (nan when there are none)."""
  other = (seq[:, None] != seq[None, :]).astype(k.dtype)
  n_other = jnp.sum(other)
  return jnp.where(n_other > 0, jnp.sum(k * other) / jnp.maximum(n_other, 1), jnp.nan)


def r_share_offdiag(r, g, seq):
  """mean |R_ij| / (mean |R_ij| + mean |G_ij|) over entries i, j of different sequences: in [0, 1].

  r, g: (m, m) kernel components; seq: (m,) the sequence of each entry.
  """
  r_abs, g_abs = _offdiag_mean(jnp.abs(r), seq), _offdiag_mean(jnp.abs(g), seq)
  return r_abs / (r_abs + g_abs)


def _unit_rows(x):
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), jnp.finfo(x.dtype).tiny)


def probe_metrics(cfg: qwen.QwenConfig, params, probe: ProbeSet, *,
                  chunk_size: int | None = None) -> dict[str, jax.Array]:
  """eNTK, feature and head statistics on the probe set: a dict of scalar arrays (see module doc).

  The kernel is the exact m x m log-prob eNTK of the probe entries (ntk.logprob_kernel).
  """
  parts = ntk.logprob_kernel(cfg, params, probe.points, chunk_size=chunk_size)
  out = {}
  for name, k in zip(('R', 'G', 'cross', 'total'), parts):
    out[f'ntk_{name}_diag'], out[f'ntk_{name}_offdiag'] = jnp.mean(jnp.diagonal(k)), _offdiag_mean(k, probe.seq)
  out['ntk_R_share'] = out['ntk_R_diag'] / (out['ntk_R_diag'] + out['ntk_G_diag'])
  out['ntk_R_share_offdiag'] = r_share_offdiag(parts.r, parts.g, probe.seq)
  out['ntk_reach'] = out['ntk_total_offdiag'] / out['ntk_total_diag']
  phi, _ = qwen.features(cfg, params['backbone'], probe.tokens, probe.mask)
  stats = confidence.feature_stats(phi[jnp.arange(phi.shape[0]), probe.prompt_last])
  out['phi_norm'], out['phi_cosine'] = stats['norm'], stats['mean_cos']
  unit = _unit_rows(phi[probe.seq, probe.pos])
  out['phi_cosine_response'] = _offdiag_mean(unit @ unit.T, probe.seq)
  out['head_norm'] = confidence.head_norm(qwen.head_params(cfg, params)['w'])
  return out


def predict_logprob_change(cfg: qwen.QwenConfig, params, probe: ProbeSet, batch_tokens, batch_mask,
                           batch_cotangent, eta) -> ntk.KernelParts:
  """NTK prediction of the probe log-prob change after one SGD step theta -= eta grad L.

  batch_cotangent = dL/dz: (B, T, V), the loss gradient w.r.t. the batch logits (e.g.
  -r_i/N (e_y - pi) at the loss positions for the policy-gradient loss
  -1/N sum r_i log pi(y_il); zero elsewhere). Prediction: -eta d^T K dL/dz at each probe
  entry (d = e_y - pi), split into R, G and cross parts. Returns KernelParts of (m,).
  """
  parts = ntk.logprob_kernel_vector_product(cfg, params, probe.points, batch_tokens, batch_mask,
                                            batch_cotangent)
  return ntk.KernelParts(*(-eta * p for p in parts))


def linearized_logprob_change(cfg: qwen.QwenConfig, params, probe: ProbeSet, delta_params) -> ntk.ParamSplit:
  """J_probe delta: exact first-order change of the probe log-probs for ANY parameter update.

  delta_params: same tree as params (e.g. params_after - params_before of an Adam step).
  Returns ParamSplit(head, backbone, total) of (m,) (see ntk.logprob_jvp).
  """
  return ntk.logprob_jvp(cfg, params, probe.points, delta_params)


@functools.partial(jax.jit, static_argnums=0)
def _training_probe_arrays(cfg, params_before, params_after, probe):
  out = probe_metrics(cfg, params_before, probe)
  delta = jax.tree_util.tree_map(lambda a, b: a - b, params_after, params_before)
  actual = probe_logprobs(cfg, params_after, probe) - probe_logprobs(cfg, params_before, probe)
  lin = linearized_logprob_change(cfg, params_before, probe, delta)
  out['logprob_change_linear_rel_error'] = (jnp.linalg.norm(actual - lin.total) /
                                            jnp.maximum(jnp.linalg.norm(actual), 1e-30))
  return out, {'actual': actual, 'linear': lin.total, 'linear_head': lin.head, 'linear_backbone': lin.backbone}


@functools.partial(jax.jit, static_argnums=0)
def head_share(cfg: qwen.QwenConfig, params_before, params_after, backbone_step, probe: ProbeSet):
  """|mean head part| / (|mean head part| + |mean backbone part|) of the first-order probe log-prob
  change of the update (params_after - params_before)['head'] with `backbone_step` as the backbone's
  update (CF-RL stage one: the step the backbone WOULD take). A scalar in [0, 1].
  """
  delta = {'head': jax.tree_util.tree_map(lambda a, b: a - b, params_after['head'], params_before['head']),
           'backbone': backbone_step}
  lin = linearized_logprob_change(cfg, params_before, probe, delta)
  h, b = jnp.abs(jnp.mean(lin.head)), jnp.abs(jnp.mean(lin.backbone))
  return h / jnp.maximum(h + b, jnp.finfo(h.dtype).tiny)


def training_probe(cfg: qwen.QwenConfig, params_before, params_after, probe: ProbeSet,
                   group_names: Sequence[str] = ()) -> dict[str, float]:
  """Probe metrics before an update plus how the probe log-probs moved: a dict of floats.

  probe_metrics(params_before), and the mean over probe entries of the actual change
  (logprob_change_actual), its first-order prediction J delta (logprob_change_linear, split
  into _head and _backbone: who moves the log-probs under the optimizer actually used) and the
  relative error ||actual - linear|| / ||actual||. With group_names (probe.group's names, e.g.
  solution_formats), the same means per group as logprob_change_<kind>_<name>.
  """
  scalars, per_entry = jax.device_get(_training_probe_arrays(cfg, params_before, params_after, probe))
  out = {k: float(v) for k, v in scalars.items()}
  entry_group = np.asarray(probe.group)[np.asarray(probe.seq)]
  for kind, values in per_entry.items():
    out[f'logprob_change_{kind}'] = float(np.mean(values))
    for g, name in enumerate(group_names):
      if (entry_group == g).any():
        out[f'logprob_change_{kind}_{name}'] = float(np.mean(values[entry_group == g]))
  return out
