"""Exact empirical NTK of a Qwen policy, split at the backbone/head seam.

At a context c (a prompt plus a response prefix) the logits are z(c) = W phi(c),
phi(c) in R^d the final hidden state computed by the backbone parameters and W the
(V, d) head. The logit eNTK is

    K(c, c') = dz(c)/dtheta dz(c')/dtheta^T = R + G (+ cross)            (V x V)
    R = <phi(c), phi(c')> I_V                 head (classifier) component
    G = W J(c) J(c')^T W^T, J = dphi/dtheta_b  backbone component
    cross                                     only for a tied head (W IS the input
                                              embedding, so it is also an input): the
                                              products of the head-use and the
                                              embedding-input-use Jacobians.

Everything here is computed exactly with jax.vjp / jax.jvp / jax.vmap: no finite
differences, no sampling, no V x V block and no full Jacobian. Memory grows with a
chunk of per-entry gradients (each one backbone-sized), never with pairs x params.

Conventions
  * A `Points` names contexts: entry i is c_i = tokens[seq[i], :pos[i]+1] of a
    left-padded batch; its log-prob target is tokens[seq[i], pos[i]+1].
  * Every kernel function returns `KernelParts(r, g, cross, total)` with
    r + g + cross == total; `cross` is zeros for an untied head.
  * Traces over the vocabulary are SUMS over the V diagonal entries
    (tr R = V <phi, phi'>); neural-tangents' `trace_axes` divides by the axis size.
  * Quantities are computed in the model's compute dtype; contractions accumulate in
    at least float32. Use float32 (or float64) parameters for probes.
  * `cfg` is a frozen, hashable dataclass: under jax.jit pass it statically,
    e.g. jax.jit(functools.partial(logprob_kernel, cfg)) or static_argnums=0; so are
    `method`, `chunk_size` and `batch_size`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfrl_jax.models import qwen

Params = dict[str, Any]

# Budget for the per-entry gradients a chunk holds at once when chunk_size=None.
DEFAULT_CHUNK_BYTES = 1 << 30
METHODS = ('auto', 'gram', 'jvp')


class KernelParts(NamedTuple):
  """Components of a kernel quantity; r + g + cross == total (cross = 0 when untied)."""
  r: jax.Array
  g: jax.Array
  cross: jax.Array
  total: jax.Array


class ParamSplit(NamedTuple):
  """A first-order change split by the parameters that move: head use + backbone = total."""
  head: jax.Array
  backbone: jax.Array
  total: jax.Array


class Points(NamedTuple):
  """Contexts c_i = tokens[seq[i], :pos[i] + 1] (the log-prob target is tokens[seq[i], pos[i] + 1]).

  tokens, mask: (B, T) int, left-padded (mask 1 on real tokens); seq, pos: (n,) int.
  """
  tokens: jax.Array
  mask: jax.Array
  seq: jax.Array
  pos: jax.Array


def completion_points(tokens, mask, completion_mask) -> Points:
  """Points of every completion token: pos = t - 1 for each completion_mask[b, t] == 1.

  Host-side (numpy) helper: the number of points depends on the data.
  tokens, mask, completion_mask: (B, T). Returns Points with n = completion_mask.sum().
  """
  cm = np.asarray(completion_mask)
  if cm.shape != np.shape(tokens):
    raise ValueError(f'completion_mask shape {cm.shape} != tokens shape {np.shape(tokens)}.')
  if cm[:, 0].any():
    raise ValueError('completion_mask[:, 0] is set: the first token has no context to predict it from.')
  seq, t = np.nonzero(cm)
  return Points(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(seq, jnp.int32),
                jnp.asarray(t - 1, jnp.int32))


def _concrete(x):
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_points(points: Points, name: str, needs_target: bool):
  """Shape checks always; value checks when the indices are concrete (skipped under jit)."""
  if not isinstance(points, Points):
    raise TypeError(f'{name} must be ntk.Points(tokens, mask, seq, pos); got {type(points).__name__}.')
  if points.tokens.ndim != 2 or points.mask.shape != points.tokens.shape:
    raise ValueError(f'{name}: tokens {points.tokens.shape} and mask {points.mask.shape} must be the '
                     'same (B, T) shape.')
  if points.seq.ndim != 1 or points.seq.shape != points.pos.shape:
    raise ValueError(f'{name}: seq {points.seq.shape} and pos {points.pos.shape} must be (n,) vectors.')
  seq, pos, mask = _concrete(points.seq), _concrete(points.pos), _concrete(points.mask)
  if seq is None or pos is None or mask is None or seq.size == 0:
    return
  B, T = mask.shape
  last = T - 2 if needs_target else T - 1
  if seq.min() < 0 or seq.max() >= B:
    raise ValueError(f'{name}: seq must lie in [0, {B}); got range [{seq.min()}, {seq.max()}].')
  if pos.min() < 0 or pos.max() > last:
    raise ValueError(f'{name}: pos must lie in [0, {last}] (a log-prob target needs pos + 1 < T); '
                     f'got range [{pos.min()}, {pos.max()}].')
  if not mask[seq, pos].all():
    raise ValueError(f'{name}: some contexts end on a padding token (mask[seq, pos] == 0).')
  if needs_target and not mask[seq, pos + 1].all():
    raise ValueError(f'{name}: some log-prob targets are padding (mask[seq, pos + 1] == 0).')


def _split(cfg, params):
  """(W (V, d), backbone): the untied view; for a tied model W is the embedding itself."""
  return qwen.head_params(cfg, params)['w'], params['backbone']


def _acc_dtype(*xs):
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _features(cfg, backbone, tokens, mask):
  return qwen.features(cfg, backbone, tokens, mask)[0]


def _contract(ga, gb):
  """sum over leaves of <ga[i], gb[j]>: trees with leading axes n and m -> (n, m)."""
  out = 0.
  for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    dt = _acc_dtype(x, y)
    out = out + jnp.einsum('np,mp->nm', x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1),
                           preferred_element_type=dt)
  return out


def _tree_size(tree):
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def _chunk_len(chunk_size, n, backbone, copies=2):
  if chunk_size is None:
    chunk_size = max(1, DEFAULT_CHUNK_BYTES // max(1, copies * _tree_size(backbone)))
  if int(chunk_size) < 1:
    raise ValueError(f'chunk_size must be a positive int or None; got {chunk_size!r}.')
  return max(1, min(int(chunk_size), n))


def _to_chunks(tree, n, c):
  """Pads the leading axis n to a multiple of c (repeating entry 0) and reshapes to (n // c, c, ...)."""
  k = -(-n // c)

  def f(x):
    pad = k * c - n
    if pad:
      x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])], axis=0)
    return x.reshape((k, c) + x.shape[1:])

  return jax.tree_util.tree_map(f, tree)


# --- directions in logit space ----------------------------------------------
class _Entries(NamedTuple):
  """Scalar outputs f_i = d_i . z(c_i) at Points: the kernel between them is d_i^T K d_j."""
  seq: jax.Array    # (n,)
  pos: jax.Array    # (n,)
  phi: jax.Array    # (n, d)  phi(c_i)
  d: jax.Array      # (n, V)  direction in logit space
  a: jax.Array      # (n, d)  W^T d_i, the cotangent of phi


def _logprob_entries(cfg, w, backbone, points: Points) -> _Entries:
  """d_i = e_{y_i} - pi(c_i): the gradient of log pi(y_i | c_i) w.r.t. the logits."""
  phi = _features(cfg, backbone, points.tokens, points.mask)[points.seq, points.pos]
  return _logprob_entries_from_phi(cfg, w, points, phi)


def _logprob_entries_from_phi(cfg, w, points: Points, phi) -> _Entries:
  z = qwen.logits(cfg, {'w': w}, phi)
  target = points.tokens[points.seq, points.pos + 1]
  d = jax.nn.one_hot(target, z.shape[-1], dtype=z.dtype) - jax.nn.softmax(z, axis=-1)
  a = jnp.einsum('nv,vk->nk', d, w.astype(z.dtype)).astype(phi.dtype)
  return _Entries(points.seq, points.pos, phi, d, a)


def _entry_grads(cfg, backbone, tokens, mask, seq, pos, a):
  """J(c_i)^T a_i for each entry: one VJP on entry i's own sequence.

  tokens, mask: (B, T); seq, pos: (c,); a: (c, d). Returns a backbone tree with leading axis c.
  """

  def one(s, t, a_i):
    tok, msk = tokens[s][None], mask[s][None]
    _, pull = jax.vjp(lambda b: _features(cfg, b, tok, msk)[0, t], backbone)
    return pull(a_i)[0]

  return jax.vmap(one)(seq, pos, a)


def _head_entry_r(er: _Entries, ec: _Entries):
  """R_ij = <phi_i, phi_j> <d_i, d_j>: the head component of d_i^T K d_j."""
  dt = _acc_dtype(er.phi, er.d)
  pp = jnp.einsum('ik,jk->ij', er.phi, ec.phi, preferred_element_type=dt)
  dd = jnp.einsum('iv,jv->ij', er.d, ec.d, preferred_element_type=dt)
  return pp * dd


def _tied_cross_from_grads(er, ec, gr_embed, gc_embed):
  """<h_i, g_j^E> + <g_i^E, h_j> with h_i = d_i phi_i^T the head-use gradient of entry i."""
  dt = _acc_dtype(er.phi, gr_embed)
  x = jnp.einsum('iv,jvk->ijk', er.d.astype(dt), gc_embed.astype(dt))
  y = jnp.einsum('jv,ivk->ijk', ec.d.astype(dt), gr_embed.astype(dt))
  return (jnp.einsum('ijk,ik->ij', x, er.phi.astype(dt)) +
          jnp.einsum('ijk,jk->ij', y, ec.phi.astype(dt)))


def _gram_parts(cfg, backbone, pr: Points, er: _Entries, pc: Points, ec: _Entries,
                chunk, shared, tied):
  """Backbone and cross parts by contracting per-entry gradients, in (row chunk x col chunk) blocks."""
  n, m = er.seq.shape[0], ec.seq.shape[0]
  cr, cc = _chunk_len(chunk, n, backbone), _chunk_len(chunk, m, backbone)

  def grads(p, e):
    return _entry_grads(cfg, backbone, p.tokens, p.mask, e.seq, e.pos, e.a)

  def block(e1, g1, e2, g2):
    gg = _contract(g1, g2)
    xx = _tied_cross_from_grads(e1, e2, g1['embed'], g2['embed']) if tied else jnp.zeros_like(gg)
    return gg, xx

  if shared and cr >= n:
    g = grads(pr, er)
    return block(er, g, er, g)

  rows, cols = _to_chunks(er, n, cr), _to_chunks(ec, m, cc)

  def row_block(e1):
    g1 = grads(pr, e1)

    def col_block(e2):
      return block(e1, g1, e2, grads(pc, e2))

    gg, xx = jax.lax.map(col_block, cols)          # (kc, cr, cc)
    flat = lambda x: jnp.moveaxis(x, 0, 1).reshape(cr, -1)
    return flat(gg), flat(xx)

  gg, xx = jax.lax.map(row_block, rows)            # (kr, cr, kc * cc)
  unchunk = lambda x: x.reshape(-1, x.shape[-1])[:n, :m]
  return unchunk(gg), unchunk(xx)


def _jvp_parts(cfg, backbone, pr: Points, er: _Entries, pc: Points, ec: _Entries, chunk, tied):
  """Backbone and cross parts by pushing each row's gradient through one JVP per column sequence.

  G_ij = a_j . (J(c_j) J(c_i)^T a_i): the JVP over the whole column batch gives every
  column position at once.
  """
  n = er.seq.shape[0]
  cr = _chunk_len(chunk, n, backbone)
  _, lin = jax.linearize(lambda b: _features(cfg, b, pc.tokens, pc.mask), backbone)
  if tied:
    rest = {k: v for k, v in backbone.items() if k != 'embed'}
    _, lin_embed = jax.linearize(
        lambda e: _features(cfg, {**rest, 'embed': e}, pc.tokens, pc.mask), backbone['embed'])
  at_cols = lambda dphi: dphi[:, ec.seq, ec.pos]   # (c, B, T, d) -> (c, m, d)

  def row_block(e1):
    g1 = _entry_grads(cfg, backbone, pr.tokens, pr.mask, e1.seq, e1.pos, e1.a)
    dt = _acc_dtype(e1.a)
    gg = jnp.einsum('imk,mk->im', at_cols(jax.vmap(lin)(g1)), ec.a, preferred_element_type=dt)
    if not tied:
      return gg, jnp.zeros_like(gg)
    emb = backbone['embed']
    h1 = (e1.d[:, :, None] * e1.phi[:, None, :].astype(e1.d.dtype)).astype(emb.dtype)
    x1 = jnp.einsum('imk,mk->im', at_cols(jax.vmap(lin_embed)(h1)), ec.a, preferred_element_type=dt)
    x2 = jnp.einsum('mv,ivk,mk->im', ec.d.astype(dt), g1['embed'].astype(dt), ec.phi.astype(dt))
    return gg, x1 + x2

  gg, xx = jax.lax.map(row_block, _to_chunks(er, n, cr))
  unchunk = lambda x: x.reshape(-1, x.shape[-1])[:n]
  return unchunk(gg), unchunk(xx)


def _pick_method(method, n, m, num_col_seqs, seq_len, shared, chunk):
  """Cheaper of the two exact methods, by a flop count in units of (params x tokens)."""
  if method not in METHODS:
    raise ValueError(f'method={method!r}; expected one of {METHODS}.')
  if method != 'auto':
    return method
  passes = 3 * seq_len                   # one VJP of one sequence: forward + backward
  col_vjps = 0 if (shared and chunk >= n) else m * -(-n // chunk)
  gram = passes * (n + col_vjps) + n * m
  jvp = passes * (n + num_col_seqs) + 2 * seq_len * n * num_col_seqs
  return 'gram' if gram <= jvp else 'jvp'


def logprob_kernel(cfg: qwen.QwenConfig, params: Params, rows: Points, cols: Points | None = None,
                   *, method: str = 'auto', chunk_size: int | None = None) -> KernelParts:
  """Exact eNTK between the log-probabilities of given tokens.

  k(i, j) = <d/dtheta log pi(y_i | c_i), d/dtheta log pi(y_j | c_j)> = d_i^T K(c_i, c_j) d_j,
  d = e_y - pi. With a = W^T d:
    r     = <phi_i, phi_j> <d_i, d_j>
    g     = <J_i^T a_i, J_j^T a_j>       (one VJP per row entry)
    cross = tied head only (zeros otherwise)

  rows: Points (n entries); cols: Points (m entries), default rows.
  method: 'gram' contracts per-entry gradients (best for n x n Gram matrices);
    'jvp' pushes each row gradient through one JVP per column sequence, covering all
    column positions at once (best when the columns are many positions of few
    sequences); 'auto' picks the cheaper by a flop count.
  chunk_size: row (and column) entries whose gradients are held at once; None sizes
    chunks to a 1 GiB budget. Memory grows with chunk_size x params, not with n x m.
  Returns KernelParts of (n, m) arrays.
  """
  shared = cols is None
  cols = rows if shared else cols
  _check_points(rows, 'rows', True)
  if not shared:
    _check_points(cols, 'cols', True)
  tied = cfg.tie == 'tied'
  w, backbone = _split(cfg, params)
  er = _logprob_entries(cfg, w, backbone, rows)
  ec = er if shared else _logprob_entries(cfg, w, backbone, cols)
  n, m = er.seq.shape[0], ec.seq.shape[0]
  chunk = _chunk_len(chunk_size, n, backbone)
  method = _pick_method(method, n, m, cols.tokens.shape[0], cols.tokens.shape[1], shared, chunk)
  if method == 'gram':
    g, cross = _gram_parts(cfg, backbone, rows, er, cols, ec, chunk_size, shared, tied)
  else:
    g, cross = _jvp_parts(cfg, backbone, rows, er, cols, ec, chunk_size, tied)
  r = _head_entry_r(er, ec)
  return KernelParts(r, g, cross, r + g + cross)


# --- kernel-vector products -------------------------------------------------
def _kvp_tangent(cfg, w, backbone, tokens, mask, u):
  """(dW, dtheta_b) = sum_c' dz(c')/d(W, theta_b)^T u(c'): one VJP over the batch.

  dW = sum u phi'^T (V, d) is the head-use part; dtheta_b = J'^T W^T u the backbone part.
  """
  expected = tuple(tokens.shape) + (w.shape[0],)
  if tuple(u.shape) != expected or mask.shape != tokens.shape:
    raise ValueError(f'u has shape {u.shape} and the batch mask {mask.shape}; expected u of the batch '
                     f'logits shape {expected} (B, T, V) and mask {tuple(tokens.shape)}.')
  u = u * mask[..., None].astype(u.dtype)
  z_fn = lambda w_, b_: qwen.logits(cfg, {'w': w_}, _features(cfg, b_, tokens, mask))
  z, pull = jax.vjp(z_fn, w, backbone)
  return pull(u.astype(z.dtype))


def _kvp_phi_parts(cfg, w, backbone, tokens, mask, dw, db, tied):
  """phi, and the phi-space tangents at every probe position: J db (G) and J {embed: dW} (cross)."""
  phi, lin = jax.linearize(lambda b: _features(cfg, b, tokens, mask), backbone)
  dphi_g = lin(db)
  dphi_x = None
  if tied:
    zeros = jax.tree_util.tree_map(jnp.zeros_like, backbone)
    dphi_x = lin({**zeros, 'embed': dw.astype(backbone['embed'].dtype)})
  return phi, dphi_g, dphi_x


def kernel_vector_product(cfg: qwen.QwenConfig, params: Params, probe_tokens, probe_mask,
                          batch_tokens, batch_mask, u) -> KernelParts:
  """(K u)(c) = sum_{c' in batch} K(c, c') u(c') at every position c of a probe batch.

  r = <phi, phi'> u summed = (sum_c' u' phi'^T) phi(c);  g = W jvp(phi, J'^T W^T u);
  cross (tied) = dE_input phi(c) + W jvp(phi, {embed: dW}).
  One VJP over the batch, one (two if tied) JVP over the probe batch; no V x V block.
  With u = -dL/dz, eta * (K u) is the first-order change of the probe logits after one
  SGD step theta -= eta grad L; `logprob_change` turns it into log-prob changes.

  probe_tokens, probe_mask: (Bp, Tp); batch_tokens, batch_mask: (B, T); u: (B, T, V)
  (positions with batch_mask 0 are ignored). Returns KernelParts of (Bp, Tp, V) arrays.
  """
  tied = cfg.tie == 'tied'
  w, backbone = _split(cfg, params)
  dw, db = _kvp_tangent(cfg, w, backbone, batch_tokens, batch_mask, u)
  phi, dphi_g, dphi_x = _kvp_phi_parts(cfg, w, backbone, probe_tokens, probe_mask, dw, db, tied)
  head = lambda m, x: qwen.logits(cfg, {'w': m}, x)
  r = head(dw, phi)
  g = head(w, dphi_g)
  cross = head(db['embed'], phi) + head(w, dphi_x) if tied else jnp.zeros_like(r)
  return KernelParts(r, g, cross, r + g + cross)


def logprob_change(logits, dz):
  """First-order change of log pi(.|c) from a logit change: T(c) dz = dz - <pi(c), dz>.

  logits, dz: (..., V). T = I - 1 pi^T is the Jacobian of log-softmax.
  """
  pi = jax.nn.softmax(logits, axis=-1)
  return dz - jnp.sum(pi * dz, axis=-1, keepdims=True)


def logprob_kernel_vector_product(cfg: qwen.QwenConfig, params: Params, points: Points,
                                  batch_tokens, batch_mask, u) -> KernelParts:
  """d_i^T (K u)(c_i) for the log-prob targets at `points` (d = e_y - pi).

  This is the first-order change of log pi(y_i | c_i) caused by the parameter change
  sum_c' dz(c')/dtheta^T u(c'), split into head/backbone/cross parts. For one SGD step
  on a loss L with eta: u = -dL/dz (so for the policy gradient loss
  -1/N sum_i r_i log pi(y_i), u = r_i/N (e_y - pi) and the prediction is
  eta/N sum r_i d^T K d_i').

  points: Points (n,); batch_tokens, batch_mask: (B, T); u: (B, T, V). Returns KernelParts of (n,).
  """
  _check_points(points, 'points', True)
  tied = cfg.tie == 'tied'
  w, backbone = _split(cfg, params)
  dw, db = _kvp_tangent(cfg, w, backbone, batch_tokens, batch_mask, u)
  phi_all, dphi_g, dphi_x = _kvp_phi_parts(cfg, w, backbone, points.tokens, points.mask, dw, db, tied)
  at = lambda x: x[points.seq, points.pos]
  e = _logprob_entries_from_phi(cfg, w, points, at(phi_all))
  dt = _acc_dtype(e.d, dw)
  r = jnp.einsum('nv,vk,nk->n', e.d.astype(dt), dw.astype(dt), e.phi.astype(dt))
  g = jnp.einsum('nk,nk->n', e.a.astype(dt), at(dphi_g).astype(dt))
  if tied:
    cross = (jnp.einsum('nv,vk,nk->n', e.d.astype(dt), db['embed'].astype(dt), e.phi.astype(dt)) +
             jnp.einsum('nk,nk->n', e.a.astype(dt), at(dphi_x).astype(dt)))
  else:
    cross = jnp.zeros_like(r)
  return KernelParts(r, g, cross, r + g + cross)


def logprob_jvp(cfg: qwen.QwenConfig, params: Params, points: Points, delta_params: Params) -> ParamSplit:
  """J_points delta: the exact first-order change of log pi(y_i | c_i) for ANY parameter change.

  d log pi = d^T (dW phi + W J dtheta_b), d = e_y - pi: `head` is the dW phi term (for a
  tied model dW is the embedding's change used as the head), `backbone` the rest
  (including the embedding's change used as the input). delta_params has the structure
  of params (e.g. new_params - params after an Adam step). Returns ParamSplit of (n,).
  """
  _check_points(points, 'points', True)
  if jax.tree_util.tree_structure(delta_params) != jax.tree_util.tree_structure(params):
    raise ValueError('delta_params must have the same tree structure as params '
                     f'({jax.tree_util.tree_structure(params)}).')
  w, backbone = _split(cfg, params)
  dw = qwen.head_params(cfg, delta_params)['w']
  phi_all, dphi = jax.jvp(lambda b: _features(cfg, b, points.tokens, points.mask),
                          (backbone,), (delta_params['backbone'],))
  at = lambda x: x[points.seq, points.pos]
  e = _logprob_entries_from_phi(cfg, w, points, at(phi_all))
  dt = _acc_dtype(e.d, dw)
  head = jnp.einsum('nv,vk,nk->n', e.d.astype(dt), dw.astype(dt), e.phi.astype(dt))
  body = jnp.einsum('nk,nk->n', e.a.astype(dt), at(dphi).astype(dt))
  return ParamSplit(head, body, head + body)


# --- pairs of contexts: token blocks, traces, Theta_phi --------------------
def _check_pairs(a: Points, b: Points):
  _check_points(a, 'a', False)
  _check_points(b, 'b', False)
  if a.seq.shape != b.seq.shape:
    raise ValueError(f'a and b must list the same number of contexts (pairs (a_i, b_i)); '
                     f'got {a.seq.shape[0]} and {b.seq.shape[0]}.')


def _context_pullback(cfg, backbone, tokens, mask, s, t):
  """phi(c) (d,) and the pullback of phi(c) = features(tokens[s])[t]: one forward."""
  tok, msk = tokens[s][None], mask[s][None]
  return jax.vjp(lambda b: _features(cfg, b, tok, msk)[0, t], backbone)


def token_block(cfg: qwen.QwenConfig, params: Params, a: Points, b: Points, token_ids,
                *, batch_size: int | None = None) -> KernelParts:
  """K(a_i, b_i) restricted to a set of token ids: the (k, k) blocks for each pair.

  r = <phi, phi'> I_k; g = W_S J J'^T W_S^T (k VJPs per context, one forward each);
  cross for a tied head. token_ids: (k,) int. a, b: Points with n contexts each (pair
  i is (a_i, b_i)). Pairs are mapped sequentially in groups of batch_size (vmapped),
  so memory is ~2 k x batch_size x params. Returns KernelParts of (n, k, k).
  """
  _check_pairs(a, b)
  token_ids = jnp.asarray(token_ids)
  if token_ids.ndim != 1:
    raise ValueError(f'token_ids must be a (k,) vector; got shape {token_ids.shape}.')
  tied = cfg.tie == 'tied'
  w, backbone = _split(cfg, params)

  def one(xs):
    sa, ta, sb, tb = xs
    phi_a, pull_a = _context_pullback(cfg, backbone, a.tokens, a.mask, sa, ta)
    phi_b, pull_b = _context_pullback(cfg, backbone, b.tokens, b.mask, sb, tb)
    cot = w[token_ids].astype(phi_a.dtype)                       # (k, d): W^T e_s
    ga = jax.vmap(lambda c: pull_a(c)[0])(cot)
    gb = jax.vmap(lambda c: pull_b(c)[0])(cot)
    g = _contract(ga, gb)
    dt = _acc_dtype(phi_a)
    r = jnp.dot(phi_a, phi_b, preferred_element_type=dt) * jnp.eye(token_ids.shape[0], dtype=dt)
    if tied:
      # <e_s phi_a^T, gb_{s'}^E> + <ga_s^E, e_{s'} phi_b^T>
      cross = (jnp.einsum('jsk,k->sj', gb['embed'][:, token_ids].astype(dt), phi_a.astype(dt)) +
               jnp.einsum('sjk,k->sj', ga['embed'][:, token_ids].astype(dt), phi_b.astype(dt)))
    else:
      cross = jnp.zeros_like(g)
    return KernelParts(r, g, cross, r + g + cross)

  return jax.lax.map(one, (a.seq, a.pos, b.seq, b.pos), batch_size=batch_size)


def _divisor_at_most(c, d):
  while d % c:
    c -= 1
  return c


def _feature_pair(cfg, w, backbone, a, b, xs, chunk, tied):
  """Theta_phi(a_i, b_i) (d, d) and, for a tied head, the trace of the cross term.

  Theta[:, m] = J(a) (J(b)^T e_m): VJPs on b, JVPs on a, chunk_size values of m at a time
  (the chunk is a divisor of d, so no m is padded or counted twice).
  """
  sa, ta, sb, tb = xs
  phi_b, pull_b = _context_pullback(cfg, backbone, b.tokens, b.mask, sb, tb)
  tok_a, msk_a = a.tokens[sa][None], a.mask[sa][None]
  phi_a, lin_a = jax.linearize(lambda p: _features(cfg, p, tok_a, msk_a)[0, ta], backbone)
  d = phi_a.shape[-1]
  c = _divisor_at_most(_chunk_len(chunk, d, backbone, copies=3 if tied else 2), d)
  eye = jnp.eye(d, dtype=phi_a.dtype).reshape(d // c, c, d)
  ms = jnp.arange(d).reshape(d // c, c)
  dt = _acc_dtype(phi_a)

  def block(xs):
    e, m = xs
    gb = jax.vmap(lambda v: pull_b(v)[0])(e)                      # (c, backbone)
    cols = jax.vmap(lin_a)(gb)                                    # (c, d): Theta[:, m]^T
    if not tied:
      return cols, jnp.zeros((), dt)
    wm = w[:, m].T.astype(dt)                                    # (c, V): W[:, m]^T
    # tr(H(a) (W J_E(b))^T) = sum_m <(J(b)^T e_m)_E, W[:, m] phi(a)^T>
    x1 = jnp.einsum('cvk,cv,k->', gb['embed'].astype(dt), wm, phi_a.astype(dt))
    # tr((W J_E(a)) H(b)^T) = sum_m [J(a) {embed: W[:, m] phi(b)^T}]_m
    emb = backbone['embed']
    tang = (wm[:, :, None] * phi_b.astype(dt)[None, None, :]).astype(emb.dtype)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, backbone)
    ja = jax.vmap(lambda t_: lin_a({**zeros, 'embed': t_}))(tang)     # (c, d)
    x2 = jnp.sum(jnp.take_along_axis(ja, m[:, None], axis=1))
    return cols, x1 + x2

  cols, cross = jax.lax.map(block, (eye, ms))
  theta = cols.reshape(d, d).T.astype(dt)
  return phi_a, phi_b, theta, jnp.sum(cross)


def feature_kernel(cfg: qwen.QwenConfig, params: Params, a: Points, b: Points,
                   *, chunk_size: int | None = None) -> jax.Array:
  """Backbone feature kernel Theta_phi(a_i, b_i) = J(a_i) J(b_i)^T for each pair: (n, d, d).

  d VJPs on b_i and d JVPs on a_i per pair (chunk_size of them at once), so it is meant
  for small d; G(a, b) = W Theta_phi W^T and tr G = tr(W^T W Theta_phi).
  """
  _check_pairs(a, b)
  w, backbone = _split(cfg, params)
  return jax.lax.map(lambda xs: _feature_pair(cfg, w, backbone, a, b, xs, chunk_size, False)[2],
                     (a.seq, a.pos, b.seq, b.pos))


def vocab_trace(cfg: qwen.QwenConfig, params: Params, a: Points, b: Points,
                *, chunk_size: int | None = None) -> KernelParts:
  """tr K(a_i, b_i): the SUM of the V diagonal entries (not divided by V, unlike
  neural-tangents' trace_axes), per component.

  r = V <phi, phi'>; g = tr(M Theta_phi) with M = W^T W (d x d); cross (tied) =
  tr(H (W J'_E)^T + (W J_E) H'^T), H the head-use Jacobian. Cost per pair: d VJPs and
  d JVPs (2d JVPs tied). Returns KernelParts of (n,).
  """
  _check_pairs(a, b)
  tied = cfg.tie == 'tied'
  w, backbone = _split(cfg, params)
  V = w.shape[0]
  wt = w.astype(_acc_dtype(w))
  M = wt.T @ wt

  def one(xs):
    phi_a, phi_b, theta, cross = _feature_pair(cfg, w, backbone, a, b, xs, chunk_size, tied)
    r = V * jnp.dot(phi_a, phi_b, preferred_element_type=theta.dtype)
    g = jnp.sum(M * theta.T)
    cross = cross.astype(r.dtype) if tied else jnp.zeros_like(r)
    return KernelParts(r, g, cross, r + g + cross)

  return jax.lax.map(one, (a.seq, a.pos, b.seq, b.pos))


def gradient_spectrum(head_w, theta, symmetric: bool = True):
  """Spectrum of the backbone component G = W Theta_phi W^T via the d x d matrix M^1/2 Theta M^1/2.

  head_w: (V, d); theta: (d, d), e.g. Theta_phi(c, c) from `feature_kernel`. With
  M = W^T W = U S U^T and M^1/2 = U S^1/2 U^T, the nonzero eigenvalues of G(c, c) (V x V)
  are the eigenvalues of M^1/2 Theta M^1/2. symmetric=True (Theta(c, c)): eigenvalues,
  descending; symmetric=False (c != c'): singular values, descending (those of G(c, c')
  when W has full column rank). Returns (d,).
  """
  w = head_w.astype(_acc_dtype(head_w, theta))
  s, u = jnp.linalg.eigh(w.T @ w)
  half = (u * jnp.sqrt(jnp.maximum(s, 0.))[None, :]) @ u.T
  x = half @ theta.astype(w.dtype) @ half
  if symmetric:
    return jnp.linalg.eigvalsh(0.5 * (x + x.T))[::-1]
  return jnp.linalg.svd(x, compute_uv=False)
