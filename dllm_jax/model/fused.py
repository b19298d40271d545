"""The step forward: Refresh and Reuse rows through one pass, layers under scan.

The tokens of one step are packed flat, ``[T]`` (Refresh canvases back to back, then the Reuse
rows' query tokens, then padding): embeddings, norms, projections and the MLP run on those T
tokens once (the weights are read once for both phases, and nothing is padded but the tail of
T). Only attention needs per-row layouts, which are runtime index maps into the flat tokens:

  Refresh  ``RefreshLayout.index [Br, N]``: row r's canvas; dense non-causal attention over it
           (:func:`dllm_jax.model.attention.refresh_attention`, cuDNN flash on GPUs). Rows flagged
           in ``SelectPart`` also pick and store each KV head's important K/V (Select).
  Reuse    ``ReuseLayout.index [Bu, Lq]``: the block's tokens (Dream: then the token before the
           block, a query-only row); head-sparse attention over the pool's selected K/V plus the
           block's fresh K/V (Pallas kernel on GPUs).

The attention outputs go back to the flat order through one gather (``FlatTokens.inverse``).

Layers run under ``jax.lax.scan`` over the model's stacked parameters with ONE layer body
(:func:`layer_forward`), for the Refresh-only model forward (``Transformer.refresh``), the
engine's fused step and tensor parallelism alike; the KV pool ``[L, P, S, D]`` is carried
through the scan and read / written in place at the traced layer index (never sliced).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from dllm_jax.cache import selection
from dllm_jax.cache.page_pool import SparseCache
from dllm_jax.model.attention import refresh_attention
from dllm_jax.model.transformer import Block, RefreshPart, Transformer
from pallas_kernels.common import for_each_used, resolve_impl
from pallas_kernels.head_sparse_attention import (head_sparse_attention, pack_queries,
                                                  unpack_outputs)


@flax.struct.dataclass
class ReusePart:
  """Block-only rows, padded (the convenience form of :func:`step_forward`).

  tokens, positions [Bu, Lq]: the block's tokens at absolute positions (Dream: then the token just
  before the block as a query-only row); new_len [Bu]: rows whose fresh K/V join the attention
  (the block's tokens); slots [Bu]: cache slot holding the row's selected K/V.
  """

  tokens: jax.Array
  positions: jax.Array
  new_len: jax.Array
  slots: jax.Array


@flax.struct.dataclass
class FlatTokens:
  """The step's tokens, packed. tokens, positions [T] int32; inverse [T] int32: where token t's
  attention output is in concat(Refresh layout [Br*N], Reuse layout [Bu*Lq], one zero row)."""

  tokens: jax.Array
  positions: jax.Array
  inverse: jax.Array


@flax.struct.dataclass
class RefreshLayout:
  """index [Br, N] int32: flat token of row r's canvas position j (any valid index past the
  row's length); lengths [Br] int32 (0 for padding rows)."""

  index: jax.Array
  lengths: jax.Array


@flax.struct.dataclass
class ReuseLayout:
  """index [Bu, Lq] int32: flat token of row u's query j; n_query [Bu]: query tokens in use
  (block + Dream's query-only row; 0 for padding rows); new_len [Bu]: leading query tokens whose
  fresh K/V join the attention; slots [Bu]: the row's page-table slot."""

  index: jax.Array
  n_query: jax.Array
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
  """Compile-time constants of the forward."""

  block_width: int = 32       # query rows of the block used for the Select mean (>= block len)
  select_width: int = 256     # max tokens one head may keep (static sort width)
  attn_impl: str = "auto"     # Reuse: head-sparse kernel impl (pallas_kernels.common.KERNEL_IMPLS)
  refresh_impl: str = "auto"  # Refresh: dllm_jax.model.attention.REFRESH_IMPLS


def _select_and_store(cache: SparseCache, layer, q, k, v, lengths, sel: SelectPart,
                      st: SparseStatic, axis: str | None = None) -> SparseCache:
  """Select each row's important K/V for this layer and write them into its reserved pages.

  q [Br, N, Hq, D], k/v [Br, N, Hkv, D]; ``layer`` a traced int32 scalar. The pool is updated by
  one scatter per tensor, in place (it is a scan carry and a donated step argument)."""
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


def reuse_attention(cache: SparseCache, layer, q, k, v, u: ReuseLayout, st: SparseStatic):
  """Reuse rows: queries attend to their head's selected K/V plus the block's fresh K/V.

  q [T, Hq, D], k/v [T, Hkv, D] (the flat tokens) -> [Bu, Lq, Hq, D]. The whole pool and the
  traced ``layer`` go to the kernel (a per-layer slice would be a copy of the plane every step).
  The CPU path (the jnp reference) runs the rows in use one at a time, straight from the flat
  tokens: the [Bu, Lq] layout is sized for the longest block and mostly padding otherwise."""
  if resolve_impl(st.attn_impl) == "reference":
    return _reuse_rows_in_use(cache, layer, q, k, v, u)
  q, k, v = (jnp.take(a, u.index, axis=0) for a in (q, k, v))        # [Bu, Lq, H, D]
  return _head_sparse(cache, layer, q, k, v, u.slots, u.new_len, u.n_query, st.attn_impl)


def _head_sparse(cache: SparseCache, layer, q, k, v, slots, new_len, n_query, impl: str):
  """q [B, Lq, Hq, D], k/v [B, Lq, Hkv, D] of B Reuse rows -> [B, Lq, Hq, D]."""
  lq, hq = q.shape[1], q.shape[2]
  hkv = k.shape[2]  # local heads under tensor parallelism
  table = cache.page_table[slots, layer]
  kv_len = cache.kv_len[slots, layer]
  out = head_sparse_attention(
      pack_queries(q, hkv), cache.k, cache.v, table, kv_len, k.transpose(0, 2, 1, 3),
      v.transpose(0, 2, 1, 3), new_len, layer, n_query * (hq // hkv), impl=impl)
  return unpack_outputs(out, lq, hq)


def _reuse_rows_in_use(cache: SparseCache, layer, q, k, v, u: ReuseLayout):
  """The reference path over the Reuse rows in use only, each sliced from the flat tokens (a
  row's query tokens are contiguous there, from u.index[r, 0])."""
  bu, lq = u.index.shape
  pad = lambda a: jnp.pad(a, ((0, lq),) + ((0, 0),) * (a.ndim - 1))  # slices never clamp
  q, k, v = pad(q), pad(k), pad(v)
  # A row runs at the smallest power-of-two length (>= 16) holding its block: the fresh keys and
  # query tiles then scale with the block it has, not with the longest one the layout allows.
  sizes = sorted({min(lq, 16 << i) for i in range(max(lq, 16).bit_length())})

  def body(r, out):
    pick = lambda a: jax.lax.dynamic_index_in_dim(a, r, keepdims=True)

    def at(n):
      def run():
        one = lambda a: jax.lax.dynamic_slice_in_dim(a, u.index[r, 0], n)[None]
        o = _head_sparse(cache, layer, one(q), one(k), one(v), pick(u.slots), pick(u.new_len),
                         pick(u.n_query), "reference")
        return jnp.pad(o[0], ((0, lq - n),) + ((0, 0),) * (o.ndim - 2))
      return run

    size = jnp.searchsorted(jnp.asarray(sizes), jnp.maximum(u.n_query[r], u.new_len[r]))
    o = jax.lax.switch(jnp.minimum(size, len(sizes) - 1), [at(n) for n in sizes])
    return jax.lax.dynamic_update_index_in_dim(out, o, r, 0)

  init = jnp.zeros((bu, lq) + q.shape[1:], q.dtype)
  return for_each_used(u.n_query > 0, body, init)


def embed(model: Transformer, tokens, axis: str | None):
  """Token embeddings; under tensor parallelism each device holds a vocab slice (then psum)."""
  table = model.embed[...]
  if axis is None:
    return jnp.take(table, tokens, axis=0)
  local = tokens - jax.lax.axis_index(axis) * table.shape[0]
  inside = (local >= 0) & (local < table.shape[0])
  x = jnp.take(table, jnp.clip(local, 0, table.shape[0] - 1), axis=0)
  return jax.lax.psum(jnp.where(inside[:, None], x, 0), axis)


def layer_forward(blk: Block, layer, x, flat: FlatTokens, refresh: RefreshLayout | None,
                  reuse: ReuseLayout | None, cache: SparseCache | None,
                  select: SelectPart | None, st: SparseStatic, axis: str | None):
  """One layer over the flat tokens: x [T, d] -> (x [T, d], cache). ``layer``: traced index."""
  att = blk.attn
  q, k, v = att.qkv(blk.attn_norm(x), flat.positions)            # [T, H, D]
  outs = []
  if refresh is not None:
    qr, kr, vr = (jnp.take(a, refresh.index, axis=0) for a in (q, k, v))  # [Br, N, H, D]
    if select is not None:  # most steps select nothing: skip the scoring and sorting then
      selecting = jnp.any(select.slots < cache.page_table.shape[0])
      cache = jax.lax.cond(
          selecting,
          lambda c: _select_and_store(c, layer, qr, kr, vr, refresh.lengths, select, st, axis),
          lambda c: c, cache)
    o = refresh_attention(qr, kr, vr, refresh.lengths, impl=st.refresh_impl)
    outs.append(o.reshape(-1, *o.shape[2:]))
  if reuse is not None:
    o = reuse_attention(cache, layer, q, k, v, reuse, st)               # [Bu, Lq, Hq, D]
    outs.append(o.reshape(-1, *o.shape[2:]))
  outs.append(jnp.zeros((1,) + q.shape[1:], q.dtype))           # what padding tokens read
  o = jnp.take(jnp.concatenate(outs, axis=0), flat.inverse, axis=0)   # back to flat order
  reduce = (lambda y: jax.lax.psum(y, axis)) if axis else (lambda y: y)
  x = x + reduce(att.o_proj(o.reshape(o.shape[0], -1)))
  x = x + reduce(blk.mlp(blk.mlp_norm(x)))
  return x, cache


def flat_forward(model: Transformer, flat: FlatTokens, refresh: RefreshLayout | None,
                 reuse: ReuseLayout | None, cache: SparseCache | None = None,
                 select: SelectPart | None = None, st: SparseStatic = SparseStatic(),
                 axis: str | None = None):
  """Final hidden states [T, d] of the flat tokens and the updated cache.

  ``axis``: the mesh axis name when running as one tensor-parallel shard under shard_map (the
  params, pool and tables are then this device's slices; see dllm_jax/parallel.py).
  """
  graphdef, stacked = nnx.split(model.layers)
  num_layers = jax.tree.leaves(stacked)[0].shape[0]

  def body(carry, xs):
    x, cache = carry
    state, layer = xs
    x, cache = layer_forward(nnx.merge(graphdef, state), layer, x, flat, refresh, reuse, cache,
                             select, st, axis)
    return (x, cache), None

  x = embed(model, flat.tokens, axis)
  (x, cache), _ = jax.lax.scan(body, (x, cache),
                               (stacked, jnp.arange(num_layers, dtype=jnp.int32)))
  return model.final_norm(x), cache


def step_forward(model: Transformer, refresh: RefreshPart | None, reuse: ReusePart | None,
                 cache: SparseCache | None = None, select: SelectPart | None = None,
                 st: SparseStatic = SparseStatic(), axis: str | None = None):
  """The padded convenience form: hidden states of both parts (refresh [Br, N, d] or None,
  reuse [Bu, Lq, d] or None) and the updated cache. Packs every row's full padded width into
  the flat tokens (no trimming), then runs :func:`flat_forward`."""
  tokens, positions, shapes = [], [], []
  lay_refresh = lay_reuse = None
  offset = 0
  for part in (refresh, reuse):
    if part is None:
      shapes.append(None)
      continue
    b, w = part.tokens.shape
    index = offset + jnp.arange(b * w, dtype=jnp.int32).reshape(b, w)
    if part is refresh:
      lay_refresh = RefreshLayout(index, refresh.lengths)
    else:
      lay_reuse = ReuseLayout(index, jnp.full((b,), w, jnp.int32), reuse.new_len, reuse.slots)
    tokens.append(part.tokens.reshape(-1))
    positions.append(part.positions.reshape(-1))
    shapes.append((b, w))
    offset += b * w
  flat = FlatTokens(jnp.concatenate(tokens), jnp.concatenate(positions),
                    jnp.arange(offset, dtype=jnp.int32))
  hidden, cache = flat_forward(model, flat, lay_refresh, lay_reuse, cache, select, st, axis)
  out, start = [], 0
  for shape in shapes:
    if shape is None:
      out.append(None)
      continue
    out.append(hidden[start:start + shape[0] * shape[1]].reshape(*shape, -1))
    start += shape[0] * shape[1]
  return out[0], out[1], cache
