"""The fused step forward (DESIGN.md §3a): Refresh and Reuse rows through one pass.

Linear layers and norms run on the packed tokens of both parts together
(``[Br*N + Bu*Lq, d]``: the weights are read once for both phases); only attention is split:
dense with a key-padding mask for Refresh rows, head-sparse over the paged pool for Reuse rows.
Refresh rows flagged for Select also pick and store their K/V in every layer.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from dllm_jax.cache import selection
from dllm_jax.cache.page_pool import SparseCache
from dllm_jax.model.attention import dense_attention
from dllm_jax.model.transformer import RefreshPart, Transformer
from pallas_kernels.head_sparse_attention import (head_sparse_attention, pack_queries,
                                                  unpack_outputs)


@flax.struct.dataclass
class ReusePart:
  """Block-only rows.

  tokens, positions [Bu, Lq]: the block's tokens at absolute positions (Dream: then the token just
  before the block as a query-only row); new_len [Bu]: rows whose fresh K/V join the attention
  (the block's tokens); slots [Bu]: cache slot holding the row's selected K/V.
  """

  tokens: jax.Array
  positions: jax.Array
  new_len: jax.Array
  slots: jax.Array


@flax.struct.dataclass
class SelectPart:
  """Per Refresh row: whether and where to select. slots [Br] (== max_slots: no select);
  block_start, block_len, keep [Br]; mode [Br] (index into selection.MODES); pool_kernel [Br];
  reserved [Br, R] page ids the request owns."""

  slots: jax.Array
  block_start: jax.Array
  block_len: jax.Array
  keep: jax.Array
  mode: jax.Array
  pool_kernel: jax.Array
  reserved: jax.Array


@dataclasses.dataclass(frozen=True)
class SparseStatic:
  """Compile-time constants of the sparse path."""

  block_width: int = 32       # query rows of the block used for the Select mean (>= block len)
  select_width: int = 256     # max tokens one head may keep (static sort width)
  attn_impl: str = "auto"


def _select_and_store(cache: SparseCache, layer: int, q, k, v, lengths, sel: SelectPart,
                      st: SparseStatic, axis: str | None = None) -> SparseCache:
  """Select each row's important K/V for this layer and write them into its reserved pages."""
  n = q.shape[1]
  page_size = cache.k.shape[2]
  num_pages = cache.k.shape[1]
  max_slots, mp = cache.page_table.shape[0], cache.page_table.shape[-1]
  selecting = sel.slots < max_slots

  c = jnp.arange(st.block_width, dtype=jnp.int32)
  qpos = jnp.clip(sel.block_start[:, None] + c, 0, n - 1)
  q_block = jnp.take_along_axis(q, qpos[:, :, None, None], axis=1)
  q_valid = c[None, :] < sel.block_len[:, None]
  width = min(st.select_width, n)
  pick = jax.vmap(functools.partial(selection.select, width=width, axis=axis))
  pos, counts = pick(q_block, q_valid, k, sel.block_start, sel.block_len, lengths, sel.keep,
                     sel.mode, sel.pool_kernel)
  counts = jnp.where(selecting[:, None], jnp.minimum(counts, mp * page_size), 0)  # [Br, Hkv]

  # Split the row's reserved pages between its heads: head h takes ceil(count_h / S) pages.
  npages = -(-counts // page_size)
  first = jnp.cumsum(npages, axis=1) - npages
  j = jnp.arange(mp, dtype=jnp.int32)
  idx = jnp.clip(first[..., None] + j, 0, sel.reserved.shape[1] - 1)
  table = jnp.where(j < npages[..., None],
                    jnp.take_along_axis(sel.reserved[:, None, :], idx, axis=2), 0)  # [Br,Hkv,MP]

  # Scatter the kept K/V rows: token t of head h -> page table[h, t // S], offset t % S.
  t = jnp.arange(width, dtype=jnp.int32)
  page = jnp.take_along_axis(table, jnp.minimum(t // page_size, mp - 1)[None, None, :], axis=2)
  page = jnp.where(t[None, None, :] < counts[..., None], page, num_pages)  # dropped
  off = jnp.broadcast_to(t % page_size, page.shape)
  k_sel = jnp.take_along_axis(k.transpose(0, 2, 1, 3), pos[..., None], axis=2)  # [Br,Hkv,W,D]
  v_sel = jnp.take_along_axis(v.transpose(0, 2, 1, 3), pos[..., None], axis=2)
  slots = jnp.where(selecting, sel.slots, max_slots)
  return SparseCache(
      k=cache.k.at[layer, page, off].set(k_sel.astype(cache.k.dtype), mode="drop"),
      v=cache.v.at[layer, page, off].set(v_sel.astype(cache.v.dtype), mode="drop"),
      page_table=cache.page_table.at[slots, layer].set(table, mode="drop"),
      kv_len=cache.kv_len.at[slots, layer].set(counts, mode="drop"))


def _sparse_attention(cache: SparseCache, layer: int, q, k, v, u: ReusePart, st: SparseStatic):
  """Reuse rows: queries attend to their head's selected K/V plus the block's fresh K/V."""
  lq, hq = q.shape[1], q.shape[2]
  hkv = k.shape[2]  # local heads under tensor parallelism
  table = cache.page_table[u.slots, layer]
  kv_len = cache.kv_len[u.slots, layer]
  out = head_sparse_attention(
      pack_queries(q, hkv), cache.k[layer], cache.v[layer], table, kv_len,
      k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), u.new_len, impl=st.attn_impl)
  return unpack_outputs(out, lq, hq)


def _embed(model: Transformer, tokens, axis: str | None):
  """Token embeddings; under tensor parallelism each device holds a vocab slice (then psum)."""
  table = model.embed[...]
  if axis is None:
    return jnp.take(table, tokens, axis=0)
  local = tokens - jax.lax.axis_index(axis) * table.shape[0]
  inside = (local >= 0) & (local < table.shape[0])
  x = jnp.take(table, jnp.clip(local, 0, table.shape[0] - 1), axis=0)
  return jax.lax.psum(jnp.where(inside[:, None], x, 0), axis)


def step_forward(model: Transformer, refresh: RefreshPart | None, reuse: ReusePart | None,
                 cache: SparseCache | None = None, select: SelectPart | None = None,
                 st: SparseStatic = SparseStatic(), axis: str | None = None):
  """Hidden states of both parts (refresh [Br, N, d] or None, reuse [Bu, Lq, d] or None) and the
  updated cache. Either part may be None (or have zero rows).

  ``axis``: the mesh axis name when running as one tensor-parallel shard under shard_map (the
  params, pool and tables are then this device's slices; see dllm_jax/parallel.py).
  """
  reduce = (lambda y: jax.lax.psum(y, axis)) if axis else (lambda y: y)
  parts = []
  if refresh is not None:
    parts.append(("refresh", refresh.tokens, refresh.positions))
  if reuse is not None:
    parts.append(("reuse", reuse.tokens, reuse.positions))
  shapes = [tok.shape for _, tok, _ in parts]
  sizes = [s[0] * s[1] for s in shapes]
  x = jnp.concatenate([_embed(model, tok.reshape(-1), axis) for _, tok, _ in parts], axis=0)

  def split(y):
    out, start = [], 0
    for (b, t), size in zip(shapes, sizes):
      out.append(y[start:start + size].reshape(b, t, *y.shape[1:]))
      start += size
    return out

  for li, layer in enumerate(model.layers):
    att = layer.attn
    h = layer.attn_norm(x)
    outs = []
    for (name, _, positions), hp in zip(parts, split(h)):
      q, k, v = att.qkv(hp, positions)
      if name == "refresh":
        if select is not None:
          cache = _select_and_store(cache, li, q, k, v, refresh.lengths, select, st, axis)
        o = dense_attention(q, k, v, refresh.lengths)
      else:
        o = _sparse_attention(cache, li, q, k, v, reuse, st)
      outs.append(o.reshape(o.shape[0] * o.shape[1], -1))
    x = x + reduce(att.o_proj(jnp.concatenate(outs, axis=0)))
    x = x + reduce(layer.mlp(layer.mlp_norm(x)))
  hidden = split(model.final_norm(x))
  it = iter(hidden)
  h_refresh = next(it) if refresh is not None else None
  h_reuse = next(it) if reuse is not None else None
  return h_refresh, h_reuse, cache
