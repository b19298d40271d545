"""Online decode statistics of logit tiles: (token, confidence, margin, entropy) per row.

The production code of the decode head, shared by the Pallas kernel (kernel.py), the vocab-
tiled jnp path (reference.py), the monolithic variants and the tensor-parallel merge of the
engine's decode head (dllm_jax/sampling): only ops the Triton lowering accepts (1-D iota,
max/min/sum/argmax reductions, where, exp, log, uint32 hashing).

Per row, over the columns seen so far (clean logits ``l``, noisy scores ``s = l + T*g``):

  m   running max of l               se  sum exp(l - m)         ae  sum exp(l - m) * (l - m)
  t1  top-1 clean logit (== m)       t2  top-2 clean logit (a repeated max counts twice)
  bs  best noisy score               bi  its token id (ties: lowest id)   bl  its clean logit

``ae`` is the centred form of "sum e^(l-m) l": it keeps the entropy accurate when |l| is large.
Finalising: lse = m + log se, confidence = exp(bl - lse), margin = exp(t1 - lse) - exp(t2 - lse),
entropy_conf = sum p log p = ae / se - log se. se >= 1 always (the max contributes 1), so no NaN.

Masked columns hold (kernel) or get added (XLA) ``MASK_VALUE`` (large, finite): exp(MASK - m) == 0
and 0 * (MASK - m) == 0, where -inf would give NaN.

``exclude_id`` (static; the model's mask id) can never be the chosen token: committing the mask
id would be a no-op and the request would never finish. It still counts in the softmax, so the
confidence stays the clean probability under the model's full distribution.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import noise
from pallas_kernels.common import MASK_VALUE

_BIG_ID = 2**31 - 1  # "no token" in min-reductions over ids


class Stats(NamedTuple):
  """Online softmax / noisy-argmax state; every field is [rows] (or [splits, rows])."""

  m: jax.Array   # f32 running max clean logit
  se: jax.Array  # f32 sum exp(l - m)
  ae: jax.Array  # f32 sum exp(l - m) (l - m); zeros unless entropy is wanted
  t1: jax.Array  # f32 top-1 clean logit
  t2: jax.Array  # f32 top-2 clean logit; MASK_VALUE unless margin is wanted
  bs: jax.Array  # f32 best noisy score
  bi: jax.Array  # int32 token id of the best noisy score
  bl: jax.Array  # f32 clean logit of that token


def init_stats(rows: int) -> Stats:
  neg = jnp.full((rows,), MASK_VALUE, jnp.float32)
  zero = jnp.zeros((rows,), jnp.float32)
  return Stats(neg, zero, zero, neg, neg, neg, jnp.zeros((rows,), jnp.int32), neg)


def _pick(l, idx, local, in_kernel):
  """l[r, idx[r]] for a [C, T] value. Triton cannot gather from a value, so mask-and-max there."""
  if in_kernel:
    return jnp.max(jnp.where(local[None, :] == idx[:, None], l, MASK_VALUE), axis=1)
  return jnp.take_along_axis(l, idx[:, None], axis=1)[:, 0]


# XLA paths use one variadic reduction for quantities that share a [C, T] producer: with two
# plain reductions XLA:CPU materialises the shared exp / select as a [C, T] temp (measured: 3-4x
# the logits for rows with margin + entropy).
def _sum2(a, b):
  """(sum a, sum b) over axis 1 in one pass."""
  zero = jnp.float32(0)
  return lax.reduce((a, b), (zero, zero), lambda x, y: (x[0] + y[0], x[1] + y[1]), (1,))


def _top2(l):
  """(largest, second largest) per row over axis 1 (a repeated maximum counts twice), one pass."""
  neg = jnp.float32(MASK_VALUE)

  def top2(x, y):
    return jnp.maximum(x[0], y[0]), jnp.maximum(jnp.minimum(x[0], y[0]), jnp.maximum(x[1], y[1]))

  return lax.reduce((l, jnp.full_like(l, neg)), (neg, neg), top2, (1,))


def tile_stats(l, start, lo, temperature, seed, step, position, *, hot, want_margin=False,
               want_entropy=False, in_kernel=False, exclude_id: int | None = None) -> Stats:
  """Statistics of one logit tile.

  l: [C, T] f32 clean logits of token ids start .. start+T-1 (``start`` an int32 scalar).
  lo: columns with id < lo are masked (already seen in the previous tile: the ragged last tile
    is loaded at a clamped start); None = no masking.
  exclude_id: a token id never chosen as the token (still in the softmax); None = none.
  temperature [C] f32, seed [C] uint32, step [C] int32, position [C] int32.
  hot: Python bool (static) or a traced bool scalar; False means every T == 0, so the noise is
    skipped (l + 0*g == l, so the result is the same either way).
  """
  c, t = l.shape
  local = jnp.arange(t, dtype=jnp.int32)
  raw = l  # the unmasked tile (the GEMM output)
  ids = start + local  # token ids of the columns
  valid = None if lo is None else (ids >= lo)[None, :]

  def masked(x, fill):
    return x if valid is None else jnp.where(valid, x, fill)

  # XLA paths mask by adding 0 / MASK_VALUE per column: XLA:CPU fuses a broadcast add into
  # the reductions but materialises a broadcast select (measured).
  bias = None if lo is None else jnp.where(valid, 0.0, MASK_VALUE).astype(jnp.float32)

  def biased(x):
    return x if bias is None else x + bias

  # The argmax also skips exclude_id: one [T] bias / predicate, fused like the mask above.
  pickable = valid if exclude_id is None else (
      (ids != exclude_id)[None, :] if valid is None else valid & (ids != exclude_id)[None, :])
  pick_bias = None if pickable is None else jnp.where(pickable, 0.0, MASK_VALUE).astype(
      jnp.float32)

  if in_kernel:  # registers: share one masked tile; Triton has no variadic reduce
    l = masked(raw, MASK_VALUE)
    m = jnp.max(l, axis=1)
    lm = l - m[:, None]
    e = jnp.exp(lm)
    se = jnp.sum(e, axis=1)
    ae = jnp.sum(e * lm, axis=1) if want_entropy else jnp.zeros_like(m)
    if want_margin:  # mask the first maximum, take the max again
      i1 = jnp.argmax(l, axis=1).astype(jnp.int32)
      t2 = jnp.max(jnp.where(local[None, :] == i1[:, None], MASK_VALUE, l), axis=1)
    else:
      t2 = jnp.full_like(m, MASK_VALUE)
  else:
    # Variadic reductions throughout: XLA:CPU fuses the biased tile into them, but materialises
    # it in front of a plain max/sum (one more tile buffer, measured). t2 / ae cost a few flops.
    m, t2 = _top2(biased(raw))
    if not want_margin:
      m = jnp.maximum(m, t2)  # == m; keeps the reduction variadic (XLA drops unused outputs)
      t2 = jnp.full_like(m, MASK_VALUE)
    lm = biased(raw) - m[:, None]  # masked columns: about MASK_VALUE, so exp(lm) == 0
    e = jnp.exp(lm)
    se, ae = _sum2(e, e * lm)
    if not want_entropy:
      se = se + 0.0 * ae  # == se (ae is finite); same reason
      ae = jnp.zeros_like(m)

  # best() reads only the raw tile: under lax.cond a masked tile would be a cond operand, which
  # XLA must materialise (one more [C, T] buffer, measured).
  def best(noisy: bool):
    s = raw
    if noisy:
      g = noise.gumbel(seed[:, None], step[:, None], position[:, None], ids[None, :])
      s = raw + temperature[:, None] * g
    if pickable is not None:
      s = jnp.where(pickable, s, MASK_VALUE) if in_kernel else s + pick_bias
    i = jnp.argmax(s, axis=1).astype(jnp.int32)  # first maximum: ties -> lowest id
    bl = _pick(raw, i, local, in_kernel)  # i is never a masked column
    # Recompute the winner's score on [C] instead of gathering from s: s then has one consumer
    # (the argmax), so XLA fuses it away instead of materialising [C, T].
    bs = bl + temperature * noise.gumbel(seed, step, position, start + i) if noisy else bl
    if exclude_id is not None:  # a tile of only exclude_id (Tv == 1) must never win a merge
      bs = jnp.where(start + i == exclude_id, MASK_VALUE, bs)
    return bs, start + i, bl

  if isinstance(hot, bool):
    bs, bi, bl = best(hot)
  else:
    bs, bi, bl = lax.cond(hot, lambda: best(True), lambda: best(False))
  return Stats(m, se, ae, m, t2, bs, bi.astype(jnp.int32), bl)


def merge(a: Stats, b: Stats) -> Stats:
  """Combine the statistics of two disjoint column sets (elementwise over rows)."""
  m = jnp.maximum(a.m, b.m)
  da, db = a.m - m, b.m - m
  ca, cb = jnp.exp(da), jnp.exp(db)
  se = ca * a.se + cb * b.se
  ae = ca * (a.ae + da * a.se) + cb * (b.ae + db * b.se)
  t1 = jnp.maximum(a.t1, b.t1)
  t2 = jnp.maximum(jnp.minimum(a.t1, b.t1), jnp.maximum(a.t2, b.t2))
  take_b = (b.bs > a.bs) | ((b.bs == a.bs) & (b.bi < a.bi))
  bs = jnp.where(take_b, b.bs, a.bs)
  bi = jnp.where(take_b, b.bi, a.bi)
  bl = jnp.where(take_b, b.bl, a.bl)
  return Stats(m, se, ae, t1, t2, bs, bi, bl)


def reduce_stats(st: Stats) -> Stats:
  """Merge partial statistics along axis 0 ([S, R] -> [R]); same result as folding ``merge``."""
  m = jnp.max(st.m, axis=0)
  dm = st.m - m[None]
  c = jnp.exp(dm)
  se = jnp.sum(c * st.se, axis=0)
  ae = jnp.sum(c * (st.ae + dm * st.se), axis=0)
  t1 = jnp.max(st.t1, axis=0)
  k1 = jnp.argmax(st.t1, axis=0)
  split = jnp.arange(st.m.shape[0])[:, None]
  t2 = jnp.maximum(jnp.max(jnp.where(split == k1[None], MASK_VALUE, st.t1), axis=0),
                   jnp.max(st.t2, axis=0))
  bs = jnp.max(st.bs, axis=0)
  cand = st.bs == bs[None]
  bi = jnp.min(jnp.where(cand, st.bi, _BIG_ID), axis=0)
  bl = jnp.max(jnp.where(cand & (st.bi == bi[None]), st.bl, MASK_VALUE), axis=0)
  return Stats(m, se, ae, t1, t2, bs, bi.astype(jnp.int32), bl)


def finalize(st: Stats, want_margin=False, want_entropy=False):
  """-> (token int32 [R], confidence f32 [R], margin [R] or None, entropy_conf [R] or None)."""
  log_se = jnp.log(st.se)
  lse = st.m + log_se
  conf = jnp.exp(st.bl - lse)
  margin = jnp.exp(st.t1 - lse) - jnp.exp(st.t2 - lse) if want_margin else None
  entropy = st.ae / st.se - log_se if want_entropy else None
  return st.bi, conf, margin, entropy


def logits_stats(logits, temperature, seed, step, position, *, want_margin=False,
                 want_entropy=False, exclude_id: int | None = None) -> Stats:
  """Statistics of full [R, V] logits (the monolithic variants)."""
  return tile_stats(logits, jnp.int32(0), None, temperature, seed, step, position,
                    hot=jnp.any(temperature > 0), want_margin=want_margin,
                    want_entropy=want_entropy, exclude_id=exclude_id)


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _pad_rows(x, rows: int):
  return x if x.shape[0] == rows else jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def slice_no_hoist(x, start, size: int, axis: int):
  """``lax.dynamic_slice_in_dim`` for use inside a loop body, for a loop-invariant ``x``.

  The barrier ties ``x`` to the loop-variant start. Without it XLA:CPU, which upcasts bf16
  GEMM operands, converts the *whole* array (the head, or all hidden rows) to f32 before the
  loop: measured 2 GiB extra at LLaDA size for the head, 128 MiB for hidden [8192, 4096].
  On GPU the barrier costs nothing.
  """
  x, start = lax.optimization_barrier((x, start))
  return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def map_row_chunks(fn, arrays, chunk_rows: int):
  """Apply ``fn`` to row chunks of ``arrays`` (each [R, ...]) in sequence (lax.map).

  ``fn`` gets the chunk's arrays ([C, ...]) and returns a pytree of [C] arrays (None allowed).
  R is padded to a multiple of C with zero rows; results are sliced back to [R].
  """
  r = arrays[0].shape[0]
  c = min(chunk_rows, r)
  n = cdiv(r, c)
  rp = n * c
  arrays = tuple(_pad_rows(x, rp) for x in arrays)
  if n == 1:
    return fn(*arrays)

  def body(i):
    return fn(*(slice_no_hoist(x, i * c, c, 0) for x in arrays))

  out = lax.map(body, jnp.arange(n, dtype=jnp.int32))
  return jax.tree.map(lambda x: x.reshape((rp,) + x.shape[2:])[:r], out)
