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


def head_sparse_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    kv_len: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    new_len: jax.Array,
    *,
    layer=None,
    scale: float | None = None,
) -> jax.Array:
  """Reference head-sparse attention; shapes as in ops.head_sparse_attention -> [B, Hkv, QB, D].

  Lengths outside [0, MP*S] / [0, Ln] behave as if clamped (the kernel clamps explicitly).
  """
  head_dim = q.shape[-1]
  scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
  f32 = jnp.float32

  k = jnp.concatenate([gather_cached(k_pages, page_table, layer), k_new], axis=2).astype(f32)
  v = jnp.concatenate([gather_cached(v_pages, page_table, layer), v_new], axis=2).astype(f32)
  num_cached = k.shape[2] - k_new.shape[2]
  valid = key_validity(kv_len, new_len, num_cached, k_new.shape[2])           # [B, Hkv, T]

  hi = lax.Precision.HIGHEST
  s = jnp.einsum("bhqd,bhtd->bhqt", q.astype(f32), k, precision=hi) * scale
  s = jnp.where(valid[:, :, None, :], s, -jnp.inf)        # also drops NaN scores from garbage pages
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)                    # rows with no valid key
  p = jnp.where(valid[:, :, None, :], jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  v = jnp.where(valid[..., None], v, 0.0)                   # 0 * NaN guard
  o = jnp.einsum("bhqt,bhtd->bhqd", p, v, precision=hi)
  return (o / jnp.where(l > 0, l, 1.0)).astype(q.dtype)
