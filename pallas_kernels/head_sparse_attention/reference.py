"""Plain-jnp head-sparse paged attention: the CPU path and the oracle for the Pallas kernel.

Gathers every (request, KV head)'s pages into a dense [MP*S] key axis, appends the block's fresh
K/V, masks and runs one f32 softmax. Memory is O(B * Hkv * (MP*S + Ln) * D): a fallback, not fast.
See ops.py for the layout and semantics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import for_each_used
from pallas_kernels.head_sparse_attention.operands import SparseOperands


def gather_cached(pages: jax.Array, page_table: jax.Array, layer=None) -> jax.Array:
  """Per-(request, head) cached rows, in token order.

  pages [Hkv, P, S, D] (head-major: (b, h)'s ids index head h's pages), [P, S, D] (shared page
  space: ids index it directly) or [L, P, S, D] with ``layer`` (stacked: gathered at that layer
  directly, without slicing the plane out first), page_table [B, Hkv, MP] int32
  -> [B, Hkv, MP*S, D].
  """
  batch, num_kv_heads, max_pages = page_table.shape
  page_size, head_dim = pages.shape[-2:]
  if layer is not None:
    rows = pages[layer, page_table]                           # [B, Hkv, MP, S, D]
  elif pages.ndim == 3:
    rows = pages[page_table]                                  # [B, Hkv, MP, S, D]
  else:
    heads = jnp.arange(num_kv_heads)[None, :, None]          # [1, Hkv, 1] broadcasts with the table
    rows = pages[heads, page_table]                           # [B, Hkv, MP, S, D]
  return rows.reshape(batch, num_kv_heads, max_pages * page_size, head_dim)


def key_validity(kv_len: jax.Array, new_len: jax.Array, num_cached: int,
                 num_fresh: int) -> jax.Array:
  """[B, Hkv, num_cached + num_fresh] bool: cached pos < kv_len[b, h], fresh row < new_len[b]."""
  cached = jnp.arange(num_cached)[None, None, :] < kv_len[:, :, None]
  fresh = jnp.arange(num_fresh)[None, :] < new_len[:, None]                    # [B, Ln]
  fresh = jnp.broadcast_to(fresh[:, None, :], kv_len.shape + (num_fresh,))
  return jnp.concatenate([cached, fresh], axis=-1)


Q_TILE = 32  # q rows per tile of the q_rows path (rows past a request's used tiles: zeros)


def _attend(q, k, v, valid, scale):
  """q [..., QB, D], k/v [..., T, D] (f32), valid [..., T] -> [..., QB, D]: one f32 softmax."""
  hi = lax.Precision.HIGHEST
  s = jnp.einsum("...qd,...td->...qt", q, k, precision=hi) * scale
  s = jnp.where(valid[..., None, :], s, -jnp.inf)          # also drops NaN scores of garbage pages
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)                    # rows with no valid key
  p = jnp.where(valid[..., None, :], jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  v = jnp.where(valid[..., None], v, 0.0)                   # 0 * NaN guard
  o = jnp.einsum("...qt,...td->...qd", p, v, precision=hi)
  return o / jnp.where(l > 0, l, 1.0)


def head_sparse_attention_reference(*operands: jax.Array, layer=None, q_rows=None,
                                    scale: float | None = None) -> jax.Array:
  """Reference head-sparse attention of the eight ``operands`` (:class:`SparseOperands`, in that
  order; shapes as in ops.head_sparse_attention) -> [B, Hkv, QB, D].

  Lengths outside [0, MP*S] / [0, Ln] behave as if clamped (the kernel clamps explicitly).
  With ``q_rows`` [B], only the requests with a query row in use run, one at a time, and of each
  only the 32-row q tiles that hold used rows (the other rows are zeros): padding rows of a bucket
  cost nothing on the CPU path.
  """
  q, k_pages, v_pages, page_table, kv_len, k_new, v_new, new_len = SparseOperands(*operands)
  head_dim = q.shape[-1]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  f32 = jnp.float32
  num_fresh = k_new.shape[2]

  def keys(pt, kl, kn, vn, nl):
    """K, V [..., MP*S + Ln, D] f32 and validity of (a batch of) requests."""
    k = jnp.concatenate([gather_cached(k_pages, pt, layer), kn], axis=-2).astype(f32)
    v = jnp.concatenate([gather_cached(v_pages, pt, layer), vn], axis=-2).astype(f32)
    return k, v, key_validity(kl, nl, k.shape[-2] - num_fresh, num_fresh)

  if q_rows is None:
    k, v, valid = keys(page_table, kv_len, k_new, v_new, new_len)            # [B, Hkv, T]
    return _attend(q.astype(f32), k, v, valid, scale).astype(q.dtype)

  # Only the requests in use run (a loop with a traced trip count, over their indices), and of
  # each only the q tiles holding its used rows (like the kernel's tiles; the rest stay zero).
  rows = q.shape[2]
  tile = min(rows, Q_TILE)

  def body(b, out):
    row = lambda x: lax.dynamic_index_in_dim(x, b, keepdims=True)
    k, v, valid = keys(row(page_table), row(kv_len), row(k_new), row(v_new), row(new_len))
    qb = row(q)                                                     # [1, Hkv, QB, D]

    def one_tile(j, ob):
      qt = lax.dynamic_slice_in_dim(qb, j * tile, tile, axis=2).astype(f32)
      ot = _attend(qt, k, v, valid, scale).astype(q.dtype)
      return lax.dynamic_update_slice_in_dim(ob, ot, j * tile, axis=2)

    tiles = jnp.minimum((q_rows[b] + tile - 1) // tile, rows // tile)
    ob = lax.fori_loop(0, tiles, one_tile, jnp.zeros(qb.shape, q.dtype))
    return lax.dynamic_update_index_in_dim(out, ob[0], b, 0)

  return for_each_used(q_rows > 0, body, jnp.zeros(q.shape, q.dtype))
