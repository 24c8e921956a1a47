"""Weight-space dynamics of RL post-training: rank-1 dominance, linear dynamics, extrapolation, ExPO, RELEX.

What is analysed. The "2-D weights of the attention and MLP blocks" of a cfrl_jax
parameter tree, i.e. backbone/layers/{q,k,v,o,gate,up,down}_proj/kernel, stored
stacked as (L, in, out); the matrix of layer l is kernel[l]. Every function here
is batched over leading axes (the layer axis, and a time axis where stated), so a
stacked kernel is decomposed with one batched SVD. The base checkpoint W_0 is the
reference of every update dW_t = W_t - W_0.

Definitions (s_i, u_i, v_i: singular triplets of dW, descending):
  top-k share         sum_{i<=k} s_i^2 / sum_i s_i^2              (NaN when dW == 0)
  rank-k model        W_0 + ||dW||_F * P_k / ||P_k||_F, P_k = U_k S_k V_k^T
                      (the rescaling of the released eval/upd_rank.py; rescale=False
                      gives the plain truncated SVD W_0 + P_k)
  rank-1 coefficient  c_t = <s1_t u1_t v1_t^T, u_ref v_ref^T>_F = s1_t (u1_t.u_ref)(v1_t.v_ref):
                      the rank-1 update projected on a fixed unit direction (the final
                      checkpoint's by default). It is invariant to SVD sign flips.
  R^2                 1 - SS_res / SS_tot of an ordinary least-squares line (intercept
                      and slope); "pooled" R^2 sums both over all coordinates of a
                      vectorised trajectory and is computed from its Gram matrix
                      G_ij = <X_i, X_j>_F without materialising the stack. NaN with
                      fewer than 3 points (a line through 2 points proves nothing)
                      or when the target is constant.

Rank-1 step-line extrapolation (fit_rank1_extrapolation / predict_rank1_update): this
project's rule, in the rank-1 sufficiency convention of the released eval/upd_rank.py
(W_0 + ||dW||_F u1 v1^T, everything else at base); it is NOT the released AlphaRL
predictor, which is the PLS procedure further below. Given
the base step t_0 and window checkpoints t_0 < t_1 < ... < t_m, for each matrix:
  1. (u, v) = top singular pair of dW_{t_m} (the last window checkpoint);
  2. c_i = s1(t_i) (u1(t_i).u) (v1(t_i).v): each window checkpoint's rank-1 update
     projected on u v^T (so c_m = s1(t_m));
  3. c(t) = a + b t fitted by least squares to the points (t_i, c_i), plus the
     point (t_0, 0) (dW_{t_0} = 0 exactly) when include_origin=True (default);
  4. rho = ||dW_{t_m}||_F / s1(t_m) (the rank-1 model's norm matching; 1 when
     rescale=False; 0 when the matrix did not move);
  5. W(tau) = W_0 + rho c(tau) u v^T.
With only the window's last checkpoint and the origin, this is the line through
both, i.e. the rescaled rank-1 model of dW_{t_m} multiplied by (tau-t_0)/(t_m-t_0).
ExPO baseline: theta(tau) = theta_0 + alpha (theta_{t_m} - theta_0) on every leaf,
alpha = (tau - t_0)/(t_m - t_0) by default; select_expo_alpha picks ExPO's own
extrapolation strength on held-out data instead.

Released AlphaRL procedure (caiyuchen-ustc/AlphaRL; fit_released / released_params).
Per matrix, with checkpoints t_1 < ... < t_m of the window (base excluded):
  1. a_t = s1(t) * (output-side top singular vector of dW_t). The released code holds
     torch (out, in) weights, whose u1 is the output side; a cfrl_jax kernel is (in, out),
     so that side is our v1, and the input side kept fixed is our u1;
  2. signs chained backwards from the window end: a_t is flipped when it has a negative
     dot product with the already aligned a_{t+1} (a_{t_m} kept);
  3. a one-component PLS regression (PLS1, sklearn PLSRegression's conventions:
     coordinates centred and, with scale=True, divided by their standard deviation)
     of the vectors a_t against held-out accuracy y_t, then y = mean(y) + b * score;
  4. inverted at a target accuracy y*: score* = (y* - mean(y)) / b, mapped back to the
     vector space (pls1_invert), giving pred_a;
  5. the model: the WINDOW-END checkpoint (full-rank update, head, embeddings, norms
     kept) plus u1(t_m) pred_a^T on every kernel. No norm rescale, no origin point.

RELEX: per matrix, stack the T deltas as rows of D (T x numel), take the SVD over
time D = A S B^T; the leading temporal coefficient a_t = A_{t1} S_1 (sign: a_T >= 0)
is fitted linearly against step. Computed from the T x T Gram D D^T.

Everything is numpy in float64 (pass dtype=np.float32 to halve memory); SVDs go through
the Gram matrix's eigendecomposition by default (factorize's method='gram'; 'svd' for
LAPACK's SVD). Outputs
that are parameter trees keep the input leaves' dtypes.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

MATRIX_NAMES = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
# Groups of the remaining leaves that a rank-k / extrapolated model may keep updated
# (instead of at base). 'head' is the output classifier: head/w, or backbone/embed when tied.
KEEP_GROUPS = ('head', 'embed', 'norms', 'biases', 'other')
VARIANT_A = ()           # eval/upd_rank.py's convention: embeddings, head, norms and biases at base
VARIANT_B = ('head',)    # CF-RL moves the head first: keep its full update

Path = tuple[str, ...]
Params = dict[str, Any]


# --- parameter trees ------------------------------------------------------------
def flatten(tree: Mapping) -> dict[Path, Any]:
  """{path: leaf} of a nested dict (paths as tuples of keys, in sorted key order)."""
  out = {}
  def walk(node, prefix):
    if isinstance(node, Mapping):
      for key in sorted(node):
        walk(node[key], prefix + (str(key),))
    else:
      out[prefix] = node
  walk(tree, ())
  return out


def unflatten(leaves: Mapping[Path, Any], like: Mapping) -> Params:
  """The nested dict with the structure of `like` (empty dicts included) and the given leaves."""
  def build(node, prefix):
    if isinstance(node, Mapping):
      return {key: build(node[key], prefix + (str(key),)) for key in node}
    return leaves[prefix]
  return build(like, ())


def path_name(path: Path) -> str:
  return '/'.join(path)


def is_tied(params: Mapping) -> bool:
  """True for a tied model: its head subtree is empty and logits use backbone/embed."""
  if 'backbone' not in params or 'head' not in params:
    raise ValueError(f"Expected a cfrl_jax parameter tree {{'backbone', 'head'}}; got keys {sorted(params)}.")
  return not flatten(params['head'])


def matrix_paths(params: Mapping) -> list[Path]:
  """Paths of the stacked attention/MLP kernels (L, in, out), in MATRIX_NAMES order."""
  layers = params.get('backbone', {}).get('layers', {})
  paths = [('backbone', 'layers', name, 'kernel') for name in MATRIX_NAMES
           if isinstance(layers.get(name), Mapping) and 'kernel' in layers[name]]
  if not paths:
    raise ValueError('No backbone/layers/<q,k,v,o,gate,up,down>_proj/kernel in the parameter tree: '
                     'rank-1 analysis needs a cfrl_jax Qwen tree (models/qwen.py).')
  for p in paths:
    shape = np.shape(flatten(params)[p])
    if len(shape) != 3:
      raise ValueError(f'{path_name(p)} has shape {shape}; expected stacked (L, in, out).')
  return paths


def leaf_group(path: Path, tied: bool) -> str:
  """'matrix' for an analysed kernel, else the KEEP_GROUPS group of the leaf."""
  if len(path) == 4 and path[:2] == ('backbone', 'layers') and path[2] in MATRIX_NAMES \
      and path[3] == 'kernel':
    return 'matrix'
  if path == ('head', 'w'):
    return 'head'
  if path == ('backbone', 'embed'):
    return 'head' if tied else 'embed'
  if path[-1] == 'bias':
    return 'biases'
  if path[-1].endswith('_norm'):
    return 'norms'
  return 'other'


def check_keep(keep: Iterable[str]) -> frozenset:
  """The keep groups as a frozenset; ValueError for a name outside KEEP_GROUPS."""
  keep = frozenset(keep)
  bad = keep - set(KEEP_GROUPS)
  if bad:
    raise ValueError(f'Unknown keep group(s) {sorted(bad)}; choose from {KEEP_GROUPS}.')
  return keep


def check_same_structure(a: Mapping, b: Mapping, what: str) -> None:
  """ValueError naming the first differences when two trees differ in paths or shapes."""
  fa, fb = flatten(a), flatten(b)
  if fa.keys() != fb.keys():
    raise ValueError(f'{what}: parameter trees differ: only in one: '
                     f'{sorted(path_name(p) for p in fa.keys() ^ fb.keys())[:5]}.')
  for p in fa:
    if np.shape(fa[p]) != np.shape(fb[p]):
      raise ValueError(f'{what}: {path_name(p)} has shapes {np.shape(fa[p])} and {np.shape(fb[p])}.')


# --- SVD of updates ----------------------------------------------------------------
class UpdateFactors(NamedTuple):
  """Truncated SVD of updates dW (..., m, n), r = min(m, n), K <= r kept pairs.

  s:   (..., r)     ALL singular values, descending
  u:   (..., m, K)  top-K left singular vectors
  vt:  (..., K, n)  top-K right singular vectors (rows)
  fro: (...)        ||dW||_F, computed from dW directly
  """
  s: np.ndarray
  u: np.ndarray
  vt: np.ndarray
  fro: np.ndarray


SVD_METHODS = ('gram', 'svd')


def factorize(dw, rank: int | None = None, dtype=np.float64, method: str = 'gram') -> UpdateFactors:
  """Batched SVD of dw (..., m, n), keeping `rank` singular pairs (all when None).

  method='svd': LAPACK's SVD (np.linalg.svd). method='gram' (default): the symmetric
  eigendecomposition of the smaller Gram matrix (dw dw^T or dw^T dw), s = sqrt(eigenvalues),
  and the other side's vectors dw^T u_k (or dw v_k) normalised. Same decomposition, ~10x
  faster on (896 x 4864) kernels; the squared conditioning costs absolute accuracy
  ~eps * s_1 on s_i (shares and the top pairs of updates are unaffected in float64).
  """
  dw = np.asarray(dw, dtype)
  if dw.ndim < 2:
    raise ValueError(f'factorize needs matrices (..., m, n); got shape {dw.shape}.')
  m, n = dw.shape[-2:]
  r = min(m, n)
  k = r if rank is None else min(int(rank), r)
  if k < 1:
    raise ValueError(f'rank={rank}; expected >= 1.')
  fro = np.sqrt(np.sum(dw * dw, axis=(-2, -1)))
  if method == 'svd':
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    return UpdateFactors(s=s, u=u[..., :, :k], vt=vt[..., :k, :], fro=fro)
  if method != 'gram':
    raise ValueError(f'method={method!r}; expected one of {SVD_METHODS}.')
  wide = m <= n
  dwt = np.swapaxes(dw, -1, -2)
  gram = dw @ dwt if wide else dwt @ dw                   # (..., r, r)
  evals, evecs = np.linalg.eigh(gram)
  s = np.sqrt(np.maximum(evals[..., ::-1], 0.0))
  side = evecs[..., :, ::-1][..., :, :k]                 # unit vectors of the smaller side
  other = (dwt @ side) if wide else (dw @ side)         # (..., n or m, k), norms s_k
  norms = np.linalg.norm(other, axis=-2, keepdims=True)
  other = np.where(norms > 0, other / np.where(norms > 0, norms, 1.0), 0.0)
  if wide:
    return UpdateFactors(s=s, u=side, vt=np.swapaxes(other, -1, -2), fro=fro)
  return UpdateFactors(s=s, u=other, vt=np.swapaxes(side, -1, -2), fro=fro)


def factorize_update(w0, wt, rank: int | None = None, dtype=np.float64, method: str = 'gram') -> UpdateFactors:
  """factorize(W_t - W_0), the difference taken in `dtype` (exact for float32/bf16 inputs in float64)."""
  if np.shape(w0) != np.shape(wt):
    raise ValueError(f'Base and updated weights have shapes {np.shape(w0)} and {np.shape(wt)}.')
  return factorize(np.asarray(wt, dtype) - np.asarray(w0, dtype), rank, dtype, method)


def energy_share(s, k: int | None) -> np.ndarray:
  """sum_{i<=k} s_i^2 / sum s_i^2 over the last axis of s (..., r); k=None -> 1. NaN where s == 0."""
  s = np.asarray(s, np.float64)
  e = s * s
  total = e.sum(-1)
  top = total if k is None else e[..., :int(k)].sum(-1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(total > 0, top / np.where(total > 0, total, 1.0), np.nan)


def low_rank_update(f: UpdateFactors, k: int, rescale: bool = True) -> np.ndarray:
  """P_k = U_k S_k V_k^T (..., m, n), times ||dW||_F / ||P_k||_F when rescale (0 where dW == 0)."""
  k = int(k)
  if k < 1 or k > f.u.shape[-1]:
    raise ValueError(f'k={k} but the factors keep {f.u.shape[-1]} singular pairs; '
                     'factorize with rank >= k (or use the full update for k = full).')
  s = f.s[..., :k]
  p = np.einsum('...mk,...k,...kn->...mn', f.u[..., :, :k], s, f.vt[..., :k, :])
  if not rescale:
    return p
  pk = np.sqrt(np.sum(s * s, axis=-1))
  scale = np.where(pk > 0, f.fro / np.where(pk > 0, pk, 1.0), 0.0)
  return p * scale[..., None, None]


def rank_k_weight(w0, wt, k: int | None, rescale: bool = True, dtype=np.float64,
                  method: str = 'gram') -> np.ndarray:
  """W_0 + rescaled rank-k part of W_t - W_0 (k=None: W_t itself), shape of w0, in `dtype`."""
  if k is None:
    return np.asarray(wt, dtype)
  return np.asarray(w0, dtype) + low_rank_update(factorize_update(w0, wt, k, dtype, method), k, rescale)


def update_factors(base: Mapping, params: Mapping, rank: int | None, dtype=np.float64,
                   method: str = 'gram') -> dict[Path, UpdateFactors]:
  """{path: factors of params - base} for every analysed kernel (batched over the layer axis)."""
  check_same_structure(base, params, 'update_factors')
  fb, fp = flatten(base), flatten(params)
  return {p: factorize_update(fb[p], fp[p], rank, dtype, method) for p in matrix_paths(base)}


def rank_k_params(base: Mapping, final: Mapping, k: int | None, *, keep: Iterable[str] = VARIANT_A,
                  rescale: bool = True, factors: Mapping[Path, UpdateFactors] | None = None) -> Params:
  """The rank-k model: every analysed kernel W_0 + rescaled rank-k part of its update.

  k=None is the full update (the final kernels). Leaves outside the kernels stay at
  base unless their group is in `keep` (KEEP_GROUPS; VARIANT_A = () as eval/upd_rank.py,
  VARIANT_B = ('head',)), then they take the final value. `factors` (from
  update_factors with rank >= k) avoids recomputing the SVDs. Dtypes follow `base`.
  """
  keep = check_keep(keep)
  check_same_structure(base, final, 'rank_k_params')
  fb, ff = flatten(base), flatten(final)
  tied = is_tied(base)
  out = {}
  for p, w0 in fb.items():
    group = leaf_group(p, tied)
    dt = np.asarray(w0).dtype
    if group == 'matrix':
      if k is None:
        out[p] = np.asarray(ff[p]).astype(dt)
      else:
        f = factors[p] if factors is not None else factorize_update(w0, ff[p], k)
        out[p] = (np.asarray(w0, np.float64) + low_rank_update(f, k, rescale)).astype(dt)
    else:
      out[p] = np.asarray(ff[p] if group in keep else w0).astype(dt)
  return unflatten(out, base)


# --- linear fits ------------------------------------------------------------------
class LinearFit(NamedTuple):
  """y ~ intercept + slope * x per trailing coordinate; r2 = 1 - SS_res/SS_tot (NaN: < 3 points or constant y)."""
  slope: np.ndarray
  intercept: np.ndarray
  r2: np.ndarray


def linear_fit(x, y) -> LinearFit:
  """Least-squares line of y (T, ...) against x (T,), independently for each trailing coordinate."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 1 or y.shape[:1] != x.shape:
    raise ValueError(f'linear_fit needs x (T,) and y (T, ...); got {x.shape} and {y.shape}.')
  if len(x) < 2 or np.ptp(x) == 0:
    raise ValueError(f'A line needs at least two distinct x values; got x={x.tolist()}.')
  xc = x - x.mean()
  yc = y - y.mean(0)
  sxx = np.sum(xc * xc)
  slope = np.tensordot(xc, yc, axes=(0, 0)) / sxx
  intercept = y.mean(0) - slope * x.mean()
  resid = y - (intercept + slope * x.reshape((-1,) + (1,) * (y.ndim - 1)))
  return LinearFit(slope, intercept,
                   _r2(np.sum(resid * resid, 0), np.sum(yc * yc, 0), np.sum(y * y, 0), len(x)))


def _r2(ss_res, ss_tot, ss_raw, n):
  ss_res, ss_tot = np.asarray(ss_res, np.float64), np.asarray(ss_tot, np.float64)
  # Relative tolerance: a constant target leaves SS_tot at rounding level (the mean of
  # equal floats is not always exact), which would make R^2 meaningless noise.
  ok = (ss_tot > 1e-12 * np.asarray(ss_raw, np.float64)) & (ss_tot > 0) & (n >= 3)
  with np.errstate(invalid='ignore', divide='ignore'):
    r2 = 1.0 - ss_res / np.where(ok, ss_tot, 1.0)
  return np.where(ok, r2, np.nan)


def pooled_linear_r2(gram, x) -> np.ndarray:
  """R^2 of a least-squares line against x (T,) fitted to every coordinate of vectors X_t.

  gram (..., T, T) holds <X_i, X_j>; SS_res = tr((I - H) G), SS_tot = tr((I - 11^T/T) G)
  with H the hat matrix of the design [1, x]. Returns (...).
  """
  g = np.asarray(gram, np.float64)
  x = np.asarray(x, np.float64)
  t = len(x)
  if g.shape[-2:] != (t, t):
    raise ValueError(f'gram has shape {g.shape}; expected (..., {t}, {t}) for {t} points.')
  if t < 2 or np.ptp(x) == 0:
    raise ValueError(f'A line needs at least two distinct x values; got x={x.tolist()}.')
  design = np.stack([np.ones(t), x], 1)
  hat = design @ np.linalg.pinv(design)
  center = np.eye(t) - 1.0 / t
  ss_res = np.einsum('ij,...ji->...', np.eye(t) - hat, g)
  ss_tot = np.einsum('ij,...ji->...', center, g)
  return _r2(np.maximum(ss_res, 0.0), ss_tot, np.einsum('...ii->...', g), t)


def with_origin(x, y, x0):
  """Prepends the point (x0, 0) to x (T,) and y (T, ...)."""
  y = np.asarray(y, np.float64)
  return (np.concatenate([[float(x0)], np.asarray(x, np.float64)]),
          np.concatenate([np.zeros((1,) + y.shape[1:]), y], 0))


def gram_with_origin(g):
  g = np.asarray(g, np.float64)
  pad = [(0, 0)] * (g.ndim - 2) + [(1, 0), (1, 0)]
  return np.pad(g, pad)


# --- rank-1 linear dynamics --------------------------------------------------------
def align_signs(u, v, reference: str = 'final'):
  """Resolves the SVD sign ambiguity of top singular pairs over checkpoints.

  u (T, ..., m), v (T, ..., n): the top pair (u1, v1) of each checkpoint's update.
  Each (u_t, v_t) is flipped jointly (so u_t v_t^T is unchanged) to make
  <u_t, u_ref> >= 0, falling back to <v_t, v_ref> when u_t is orthogonal to u_ref.
  reference='final': u_ref = u_{T-1}; 'previous': u_ref = the aligned u_{t-1}
  (u_0 kept as is). Returns (u, v, signs (T, ...)).
  """
  u = np.asarray(u, np.float64)
  v = np.asarray(v, np.float64)
  if u.shape[:-1] != v.shape[:-1]:
    raise ValueError(f'u {u.shape} and v {v.shape} must share their leading axes (T, ...).')
  def sign_to(ut, vt, ur, vr):
    du = np.sum(ut * ur, -1)
    dv = np.sum(vt * vr, -1)
    ref = np.where(du != 0, du, dv)
    return np.where(ref < 0, -1.0, 1.0)
  if reference == 'final':
    signs = sign_to(u, v, u[-1:], v[-1:])
  elif reference == 'previous':
    signs = np.ones(u.shape[:-1])
    for t in range(1, len(u)):
      signs[t] = sign_to(u[t], v[t], u[t - 1] * signs[t - 1][..., None], v[t - 1] * signs[t - 1][..., None])
  else:
    raise ValueError(f"reference={reference!r}; expected 'final' or 'previous'.")
  return u * signs[..., None], v * signs[..., None], signs


def rank1_coefficients(s1, u1, v1, ref_u, ref_v) -> np.ndarray:
  """c_t = <s1_t u1_t v1_t^T, u_ref v_ref^T>_F = s1_t (u1_t.u_ref)(v1_t.v_ref), shape (T, ...).

  s1 (T, ...), u1 (T, ..., m), v1 (T, ..., n); ref_u (..., m), ref_v (..., n) unit vectors.
  """
  s1 = np.asarray(s1, np.float64)
  return s1 * np.sum(np.asarray(u1) * ref_u, -1) * np.sum(np.asarray(v1) * ref_v, -1)


def rank1_gram(s1, u1, v1) -> np.ndarray:
  """<R_i, R_j>_F of the rank-1 updates R_t = s1_t u1_t v1_t^T: (..., T, T) from s1 (T, ...), u1, v1."""
  s1 = np.asarray(s1, np.float64)
  uu = np.einsum('i...m,j...m->...ij', u1, u1)
  vv = np.einsum('i...n,j...n->...ij', v1, v1)
  ss = np.einsum('i...,j...->...ij', s1, s1)
  return ss * uu * vv


def update_gram(deltas) -> np.ndarray:
  """<dW_i, dW_j>_F of stacked updates deltas (T, ..., m, n): (..., T, T)."""
  d = np.asarray(deltas, np.float64)
  return np.einsum('i...mn,j...mn->...ij', d, d)


def top_pair(f: UpdateFactors):
  """(s1 (...), u1 (..., m), v1 (..., n)) of factors."""
  return f.s[..., 0], f.u[..., :, 0], f.vt[..., 0, :]


def stack_factors(factors: Sequence[UpdateFactors]) -> UpdateFactors:
  """Stacks per-checkpoint factors on a new leading time axis (T, ...)."""
  if not factors:
    raise ValueError('stack_factors needs at least one checkpoint.')
  k = min(f.u.shape[-1] for f in factors)
  return UpdateFactors(s=np.stack([f.s for f in factors]),
                       u=np.stack([f.u[..., :, :k] for f in factors]),
                       vt=np.stack([f.vt[..., :k, :] for f in factors]),
                       fro=np.stack([f.fro for f in factors]))


class Rank1Dynamics(NamedTuple):
  """Rank-1 linear dynamics of one stacked kernel over T checkpoints (base excluded); (...) = layers.

  steps (T,); share1 (T, ...) top-1 share; coefficient (T, ...) c_t on the reference
  (final) direction; cos_u, cos_v (T, ...) sign-aligned <u1_t, u_ref>, <v1_t, v_ref> (NaN
  where the update is 0);
  fit_step: line of c_t against step (r2 (...)); r2_pooled (...) R^2 of the line fitted to
  the vectorised rank-1 update s1 u1 v1^T; fit_accuracy / r2_pooled_accuracy: the same
  against held-out accuracy (None when not given).
  """
  steps: np.ndarray
  share1: np.ndarray
  coefficient: np.ndarray
  cos_u: np.ndarray
  cos_v: np.ndarray
  fit_step: LinearFit
  r2_pooled: np.ndarray
  fit_accuracy: LinearFit | None
  r2_pooled_accuracy: np.ndarray | None


def rank1_dynamics(steps, factors: UpdateFactors, *, base_step: int | None = None,
                   accuracy=None, base_accuracy: float | None = None,
                   reference: str = 'final') -> Rank1Dynamics:
  """Linear dynamics of the rank-1 update from stacked factors (T, ...) of checkpoints `steps`.

  base_step, when given, adds the point (base_step, 0) to the fits against step
  (the update is exactly 0 there); base_accuracy likewise for fits against accuracy.
  The coefficient is measured on the final checkpoint's top direction.
  """
  steps = np.asarray(steps, np.float64)
  if factors.s.shape[0] != len(steps):
    raise ValueError(f'{len(steps)} steps but factors for {factors.s.shape[0]} checkpoints.')
  s1, u1, v1 = top_pair(factors)
  au, av, _ = align_signs(u1, v1, reference)
  # A zero update has no direction (its SVD vectors are arbitrary): NaN, not a number.
  moved = s1 > 0
  cos_u = np.where(moved, np.sum(au * au[-1:], -1), np.nan)
  cos_v = np.where(moved, np.sum(av * av[-1:], -1), np.nan)
  coef = rank1_coefficients(s1, u1, v1, u1[-1], v1[-1])
  gram = rank1_gram(s1, u1, v1)

  def fits(x, x0):
    if x0 is None:
      return linear_fit(x, coef), pooled_linear_r2(gram, x)
    xo, co = with_origin(x, coef, x0)
    return linear_fit(xo, co), pooled_linear_r2(gram_with_origin(gram), xo)

  fit_step, r2_pooled = fits(steps, base_step)
  fit_acc = r2_acc = None
  if accuracy is not None:
    acc = np.asarray(accuracy, np.float64)
    if acc.shape != steps.shape:
      raise ValueError(f'accuracy has shape {acc.shape}; expected one value per step {steps.shape}.')
    if np.ptp(np.concatenate([acc, [] if base_accuracy is None else [base_accuracy]])) > 0:
      fit_acc, r2_acc = fits(acc, base_accuracy)
  return Rank1Dynamics(steps, energy_share(factors.s, 1), coef, cos_u, cos_v, fit_step, r2_pooled,
                       fit_acc, r2_acc)


# --- RELEX: SVD over time --------------------------------------------------------------
class TemporalComponents(NamedTuple):
  """SVD over time of stacked deltas D (T x numel) = A S B^T, from the Gram D D^T (..., T, T).

  coefficients (..., T, r): A S (column j: the j-th temporal coefficient; sign: last entry >= 0);
  share (..., r): S_j^2 / sum S^2 (NaN for an all-zero stack).
  """
  coefficients: np.ndarray
  share: np.ndarray


def temporal_svd(gram) -> TemporalComponents:
  g = np.asarray(gram, np.float64)
  g = 0.5 * (g + np.swapaxes(g, -1, -2))
  evals, evecs = np.linalg.eigh(g)
  evals, evecs = evals[..., ::-1], evecs[..., :, ::-1]
  evals = np.maximum(evals, 0.0)
  coef = evecs * np.sqrt(evals)[..., None, :]
  sign = np.where(coef[..., -1:, :] < 0, -1.0, 1.0)
  return TemporalComponents(coef * sign, _shares(evals))


def _shares(evals):
  total = evals.sum(-1, keepdims=True)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(total > 0, evals / np.where(total > 0, total, 1.0), np.nan)


class RelexFit(NamedTuple):
  """Leading temporal coefficient (..., T) of RELEX, its energy share (...) and its line against step."""
  coefficient: np.ndarray
  share: np.ndarray
  fit: LinearFit


def relex(gram, steps) -> RelexFit:
  """RELEX on the Gram (..., T, T) of a tensor's deltas at `steps` (T,) (base excluded)."""
  comps = temporal_svd(gram)
  lead = np.moveaxis(comps.coefficients[..., 0], -1, 0)   # (T, ...)
  return RelexFit(np.moveaxis(lead, 0, -1), comps.share[..., 0], linear_fit(steps, lead))


# --- rank-1 step-line extrapolation and ExPO ----------------------------------------------
class Rank1Extrapolation(NamedTuple):
  """Per matrix (...): W(t) = W_0 + scale * (intercept + slope * t) * u v^T (see module docstring).

  u (..., m), v (..., n): top pair of the last window checkpoint's update; scale (...):
  rho; slope, intercept (...): the line fitted to the window coefficients; r2 (...);
  window_steps (m,), base_step.
  """
  u: np.ndarray
  v: np.ndarray
  scale: np.ndarray
  slope: np.ndarray
  intercept: np.ndarray
  r2: np.ndarray
  window_steps: np.ndarray
  base_step: float


def fit_rank1_extrapolation(window_steps, factors: UpdateFactors, base_step: float, *,
                            include_origin: bool = True, rescale: bool = True) -> Rank1Extrapolation:
  """Fits the rank-1 step line on window checkpoints (factors stacked (m, ...), steps (m,))."""
  steps = np.asarray(window_steps, np.float64)
  if steps.ndim != 1 or factors.s.shape[0] != len(steps):
    raise ValueError(f'window_steps {steps.shape} must match the factors\' time axis {factors.s.shape[:1]}.')
  if len(steps) == 0 or np.any(np.diff(steps) <= 0) or steps[0] <= base_step:
    raise ValueError(f'Window steps must be increasing and after base_step={base_step}; got {steps.tolist()}.')
  if not include_origin and len(steps) < 2:
    raise ValueError('include_origin=False needs at least two window checkpoints to fit a line.')
  s1, u1, v1 = top_pair(factors)
  u, v = u1[-1], v1[-1]
  coef = rank1_coefficients(s1, u1, v1, u, v)
  x, y = (steps, coef) if not include_origin else with_origin(steps, coef, base_step)
  fit = linear_fit(x, y)
  if rescale:
    scale = np.where(s1[-1] > 0, factors.fro[-1] / np.where(s1[-1] > 0, s1[-1], 1.0), 0.0)
  else:
    scale = np.ones_like(s1[-1])
  return Rank1Extrapolation(u, v, scale, fit.slope, fit.intercept, fit.r2, steps, float(base_step))


def predicted_coefficient(fit: Rank1Extrapolation, step: float) -> np.ndarray:
  """rho * c(step): the predicted update's Frobenius norm (signed), shape (...)."""
  return fit.scale * (fit.intercept + fit.slope * float(step))


def predict_rank1_update(fit: Rank1Extrapolation, step: float) -> np.ndarray:
  """The predicted update W(step) - W_0, (..., m, n)."""
  c = predicted_coefficient(fit, step)
  return c[..., None, None] * fit.u[..., :, None] * fit.v[..., None, :]


def fit_params_extrapolation(base: Mapping, window: Sequence[tuple[int, Mapping]], base_step: int, *,
                             include_origin: bool = True, rescale: bool = True,
                             dtype=np.float64, method: str = 'gram') -> dict[Path, Rank1Extrapolation]:
  """{path: Rank1Extrapolation} for every analysed kernel from window checkpoints [(step, params)]."""
  if not window:
    raise ValueError('The extrapolation window holds no checkpoint after the base.')
  steps = [s for s, _ in window]
  per_step = [update_factors(base, p, 1, dtype, method) for _, p in window]
  return {path: fit_rank1_extrapolation(steps, stack_factors([f[path] for f in per_step]), base_step,
                                        include_origin=include_origin, rescale=rescale)
          for path in matrix_paths(base)}


def _kernels_moved(params: Mapping, fits: Mapping[Path, Any], increment: Callable[[Any], np.ndarray], what: str,
                   other: Callable[[Path, Any], Any] = lambda path, leaf: leaf) -> Params:
  """`params` with increment(fits[p]) (shaped like the kernel) added in float64 to every analysed
  kernel p, and other(p, leaf) for every other leaf; each leaf keeps its dtype in `params`. A
  ValueError names the kernels that have no `what` fit."""
  kernels = matrix_paths(params)
  missing = [path_name(p) for p in kernels if p not in fits]
  if missing:
    raise ValueError(f'No {what} fit for {missing}.')
  out = {}
  for p, w in flatten(params).items():
    dt = np.asarray(w).dtype
    if p in kernels:
      out[p] = (np.asarray(w, np.float64) + increment(fits[p])).astype(dt)
    else:
      out[p] = np.asarray(other(p, w)).astype(dt)
  return unflatten(out, params)


def alpharl_params(base: Mapping, fits: Mapping[Path, Rank1Extrapolation], step: float, *,
                   keep: Iterable[str] = VARIANT_A, kept_from: Mapping | None = None) -> Params:
  """The rank-1 step-line model at `step`: every analysed kernel W_0 + predicted rank-1 update.

  Leaves in the `keep` groups take their value in `kept_from` (e.g. the last window
  checkpoint; required when keep is non-empty), all others stay at base.
  """
  keep = check_keep(keep)
  if keep and kept_from is None:
    raise ValueError(f'keep={sorted(keep)} needs kept_from (the parameters to take those groups from).')
  fk = flatten(kept_from) if kept_from is not None else {}
  tied = is_tied(base)
  return _kernels_moved(base, fits, lambda fit: predict_rank1_update(fit, step), 'extrapolation',
                        other=lambda p, w0: fk[p] if leaf_group(p, tied) in keep else w0)


def expo_alpha(base_step: float, window_step: float, target_step: float) -> float:
  """(target - base) / (window - base): ExPO's alpha that extends the update linearly in step."""
  if window_step <= base_step:
    raise ValueError(f'window_step={window_step} must be after base_step={base_step}.')
  return (float(target_step) - float(base_step)) / (float(window_step) - float(base_step))


def expo_params(base: Mapping, params: Mapping, alpha: float) -> Params:
  """ExPO: theta_0 + alpha (theta_t - theta_0) on every leaf (dtypes of base)."""
  check_same_structure(base, params, 'expo_params')
  fb, fp = flatten(base), flatten(params)
  out = {p: (np.asarray(w0, np.float64) + alpha * (np.asarray(fp[p], np.float64) - np.asarray(w0, np.float64))
             ).astype(np.asarray(w0).dtype) for p, w0 in fb.items()}
  return unflatten(out, base)


def select_expo_alpha(alphas: Iterable[float], score: Callable[[float], float]) -> tuple[float, dict[float, float]]:
  """(alpha with the highest score(alpha), {alpha: score}) over the grid; ties go to the smaller alpha.

  ExPO's own parameterisation: theta = theta_W + alpha (theta_W - theta_0) =
  expo_params(base, window, 1 + alpha). `score` should be held-out accuracy on problems
  disjoint from those reported (picking on the reported ones would tune on the test).
  """
  grid = sorted({float(a) for a in alphas})
  if not grid:
    raise ValueError('select_expo_alpha needs at least one candidate alpha.')
  bad = [a for a in grid if not math.isfinite(a)]
  if bad:
    raise ValueError(f'ExPO alphas must be finite numbers; got {bad}.')
  scores = {}
  for a in grid:
    value = score(a)
    try:
      scores[a] = float(value)
    except (TypeError, ValueError):
      raise TypeError(f'score(alpha) must return a float; got {value!r} for alpha={a}.') from None
  if not any(math.isfinite(v) for v in scores.values()):
    raise ValueError(f'Every ExPO candidate scored NaN ({scores}); the selection problems gave no metric.')
  best = max((v, -a) for a, v in scores.items() if math.isfinite(v))
  return -best[1], scores


# --- the released AlphaRL procedure (module docstring) ------------------------------------------
def chain_signs_backward(x) -> tuple[np.ndarray, np.ndarray]:
  """Aligns vectors x (T, ..., n) backwards in time: x_{T-1} kept, then each x_t flipped when
  <x_t, aligned x_{t+1}> < 0 (a zero dot product keeps the sign). Returns (aligned, signs (T, ...))."""
  x = np.asarray(x, np.float64)
  if x.ndim < 2 or len(x) < 1:
    raise ValueError(f'chain_signs_backward needs vectors (T, ..., n) with T >= 1; got shape {x.shape}.')
  signs = np.ones(x.shape[:-1])
  for t in range(len(x) - 2, -1, -1):
    dot = np.sum(x[t] * x[t + 1] * signs[t + 1][..., None], -1)
    signs[t] = np.where(dot < 0, -1.0, 1.0)
  return x * signs[..., None], signs


class PLS1(NamedTuple):
  """One-component PLS regression of vectors X (T, ..., n) on a scalar y (T,), batched over (...).

  x_mean, x_scale (..., n): the centring and scaling of the coordinates (x_scale = 1 without
  scaling, and where a coordinate is constant); weights (..., n): unit PLS direction w in the
  scaled space; loadings (..., n): p = Xs^T t / t^T t; scores (T, ...): t = Xs w;
  y_mean; slope (...): b of y ~ y_mean + b t (t is centred); r2 (...): of that line;
  flat (...): True where X^T y = 0 (the vectors do not vary with y; inversion returns x_mean).
  """
  x_mean: np.ndarray
  x_scale: np.ndarray
  weights: np.ndarray
  loadings: np.ndarray
  scores: np.ndarray
  y_mean: float
  slope: np.ndarray
  r2: np.ndarray
  flat: np.ndarray


def pls1(x, y, *, scale: bool = True) -> PLS1:
  """PLS1 by NIPALS for one component (which converges in one pass for a single response).

  scale=True follows sklearn's PLSRegression default (coordinates divided by their
  standard deviation, ddof=1; a constant coordinate by 1). ValueError with fewer than 2
  points or a constant y (nothing to regress on).
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if y.ndim != 1 or x.ndim < 2 or x.shape[0] != y.shape[0]:
    raise ValueError(f'pls1 needs vectors x (T, ..., n) and targets y (T,); got {x.shape} and {y.shape}.')
  if len(y) < 2:
    raise ValueError(f'PLS needs at least 2 points (checkpoints); got {len(y)}.')
  if not np.all(np.isfinite(y)) or not np.all(np.isfinite(x)):
    raise ValueError('pls1 got non-finite vectors or targets.')
  yc = y - y.mean()
  if np.all(np.abs(yc) <= 1e-12 * max(1.0, float(np.max(np.abs(y))))):
    raise ValueError(f'PLS against a constant target y={y.tolist()} is undefined: the held-out accuracy did '
                     'not change over the fitted checkpoints.')
  mean = x.mean(0)
  xc = x - mean
  if scale:
    sd = xc.std(0, ddof=1)
    sd = np.where(sd > 0, sd, 1.0)
  else:
    sd = np.ones_like(mean)
  xs = xc / sd
  cov = np.tensordot(yc, xs, axes=(0, 0))                      # X^T y, (..., n)
  norm = np.linalg.norm(cov, axis=-1, keepdims=True)
  flat = norm[..., 0] <= 0
  w = cov / np.where(norm > 0, norm, 1.0)
  t = np.sum(xs * w, -1)                                        # (T, ...)
  tt = np.sum(t * t, 0)
  safe = np.where(tt > 0, tt, 1.0)
  p = np.tensordot(t, xs, axes=(0, 0)) if t.ndim == 1 else np.einsum('t...,t...n->...n', t, xs)
  p = p / safe[..., None]
  b = np.tensordot(yc, t, axes=(0, 0)) / safe
  resid = yc.reshape((-1,) + (1,) * (t.ndim - 1)) - b * t
  ss_tot = float(np.sum(yc * yc))
  r2 = np.where(flat, np.nan, 1.0 - np.sum(resid * resid, 0) / ss_tot)
  return PLS1(mean, sd, w, p, t, float(y.mean()), np.where(flat, 0.0, b), r2, flat)


def pls1_invert(fit: PLS1, y_target: float) -> np.ndarray:
  """The vector (..., n) whose predicted y is y_target: x_mean + x_scale p (y_target - y_mean) / b.

  This is sklearn's inverse_transform of the score that LinearRegression(score -> y) maps to
  y_target; where fit.flat, x_mean.
  """
  b = np.where(fit.flat, 1.0, fit.slope)
  score = np.where(fit.flat, 0.0, (float(y_target) - fit.y_mean) / b)
  return fit.x_mean + fit.x_scale * fit.loadings * score[..., None]


def extrapolated_accuracy(steps, accuracy, step: float, *, cap: float = 1.0) -> float:
  """The least-squares line of accuracy against step, evaluated at `step`, clipped to [0, cap].

  The rule for a target accuracy chosen from the window alone.
  """
  fit = linear_fit(np.asarray(steps, np.float64), np.asarray(accuracy, np.float64))
  return float(min(max(float(fit.intercept + fit.slope * float(step)), 0.0), cap))


class ReleasedFit(NamedTuple):
  """The released AlphaRL fit of one stacked kernel (...) = layers, over window checkpoints `steps` (T,).

  u (..., m): input-side top singular vector of the window end's update (the fixed factor);
  vectors (T, ..., n): sign-chained a_t = s1 * output-side vector; signs (T, ...); pls: PLS1
  of the vectors against `accuracy` (T,).
  """
  u: np.ndarray
  vectors: np.ndarray
  signs: np.ndarray
  pls: PLS1
  steps: np.ndarray
  accuracy: np.ndarray


def fit_released(steps, factors: UpdateFactors, accuracy, *, scale: bool = True) -> ReleasedFit:
  """The released procedure's fit from stacked rank-1 factors (T, ...) of the window checkpoints.

  steps (T,) increasing, the last being the window end; accuracy (T,) held-out accuracy of each.
  """
  steps = np.asarray(steps, np.float64)
  acc = np.asarray(accuracy, np.float64)
  if steps.ndim != 1 or factors.s.shape[0] != len(steps) or acc.shape != steps.shape:
    raise ValueError(f'steps {steps.shape}, accuracy {acc.shape} and the factors\' time axis '
                     f'{factors.s.shape[:1]} must agree.')
  if np.any(np.diff(steps) <= 0):
    raise ValueError(f'Window steps must be increasing; got {steps.tolist()}.')
  s1, u1, v1 = top_pair(factors)
  vectors, signs = chain_signs_backward(s1[..., None] * v1)
  return ReleasedFit(u1[-1], vectors, signs, pls1(vectors, acc, scale=scale), steps, acc)


def fit_params_released(base: Mapping, window: Sequence[tuple[int, Mapping]], accuracy, *, scale: bool = True,
                        dtype=np.float64, method: str = 'gram') -> dict[Path, ReleasedFit]:
  """{path: ReleasedFit} for every analysed kernel from window checkpoints [(step, params)] (last = window end)."""
  if not window:
    raise ValueError('The released AlphaRL fit needs window checkpoints after the base.')
  per_step = [update_factors(base, p, 1, dtype, method) for _, p in window]
  steps = [s for s, _ in window]
  return {path: fit_released(steps, stack_factors([f[path] for f in per_step]), accuracy, scale=scale)
          for path in matrix_paths(base)}


def released_update(fit: ReleasedFit, target: float) -> np.ndarray:
  """u1(window end) pred_a^T, (..., m, n): the increment added to the window-end kernel."""
  return fit.u[..., :, None] * pls1_invert(fit.pls, target)[..., None, :]


def released_params(window_params: Mapping, fits: Mapping[Path, ReleasedFit], target: float) -> Params:
  """The released AlphaRL model: the window-end checkpoint, each analysed kernel plus released_update.

  Every other leaf (head, embeddings, norms, biases) keeps its window-end value; dtypes follow it.
  """
  return _kernels_moved(window_params, fits, lambda fit: released_update(fit, target), 'released AlphaRL')


# --- evaluation --------------------------------------------------------------------------
def recovered_gain(acc_model: float, acc_base: float, acc_final: float, *, min_gain: float = 1e-6) -> float:
  """(acc(model) - acc(base)) / (acc(final) - acc(base)); NaN with a warning when |gain| < min_gain."""
  gain = float(acc_final) - float(acc_base)
  if not math.isfinite(gain) or abs(gain) < min_gain:
    warnings.warn(f'The RL gain acc(final) - acc(base) = {gain:.3g} is below min_gain={min_gain:g}: '
                  'the share of the gain recovered is undefined (NaN). Evaluate on more held-out '
                  'problems or use a run that improved.', RuntimeWarning, stacklevel=2)
    return float('nan')
  return (float(acc_model) - float(acc_base)) / gain


def evaluate_models(models: Mapping[str, Mapping], evaluate: Callable[[Mapping], float]) -> dict[str, float]:
  """{name: float(evaluate(params))}, raising a clear error when evaluate returns a non-number."""
  out = {}
  for name, params in models.items():
    value = evaluate(params)
    try:
      out[name] = float(value)
    except (TypeError, ValueError):
      raise TypeError(f'evaluate(params) must return a float (held-out accuracy); got {value!r} '
                      f'for model {name!r}.') from None
  return out
