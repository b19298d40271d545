"""Pallas (Triton-style) head-sparse paged attention kernel for the Reuse phase.

One program per (request b, KV head h, q tile i). It attends to the block's fresh K/V, then walks
the (b, h) page table in `block_k`-token sub-blocks of a page (a scalar page id read from the
table plus a `pl.ds` offset into that page), all inside one f32 online softmax.

Pool layouts (ops.py explains when to use which): head-major `[Hkv, P, S, D]`, where the
BlockSpec hands program (b, h, i) head h's own `[P, S, D]` page space; shared `[P, S, D]`, where
every program sees the whole page space and (b, h)'s page ids index it directly; and stacked
`[L, P, S, D]` (the engine's pool, all layers), where the layer index is a traced scalar operand
and the kernel indexes `pool[layer, page]` itself, so the pool buffer is never sliced or copied
(a slice of a buffer passed to a custom call is a copy: measured on an H200, it copied the whole
pool every step).

No argument validation here (ops.py does it), so the lowering tests can feed bad shapes straight in.
Triton rules this code keeps (the Pallas Triton lowering rejects the alternatives): every
loaded/computed array has a power-of-two element count, one combined indexer per ref access,
`lax.div` instead of `%` on loop indices, 2-D dots without batch dimensions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.common import MASK_VALUE, triton_params
from pallas_kernels.head_sparse_attention.operands import SparseOperands

MIN_DOT = 16  # tl.dot needs M, N, K >= 16 (only fails on the GPU, so enforce it up front)


def padded_rows(n: int, minimum: int = MIN_DOT) -> int:
  """Smallest power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(0, n - 1).bit_length())


def _init_state(rows: int, head_dim: int):
  """Online-softmax carry: (acc [rows, D] f32, running max [rows], running sum [rows])."""
  return (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def _attend(state, q, k, v, valid, scale, precision):
  """One online-softmax step. q [rows, D]; k, v [bk, D]; valid [bk] bool."""
  acc, m, l = state
  s = pltr.dot(q, k, trans_b=True, precision=precision) * scale               # [rows, bk] f32
  s = jnp.where(valid[None, :], s, MASK_VALUE)          # finite: (-inf) - (-inf) would give NaN
  v = jnp.where(valid[:, None], v, jnp.zeros_like(v))   # 0 * NaN guard for garbage/dummy rows
  m_new = jnp.maximum(m, s.max(axis=-1))
  p = jnp.exp(s - m_new[:, None])
  alpha = jnp.exp(m - m_new)
  acc = alpha[:, None] * acc + pltr.dot(p.astype(v.dtype), v, precision=precision)
  return acc, m_new, alpha * l + p.sum(axis=-1)


def _kernel(*refs, block_k: int, scale: float, num_fresh: int, stacked: bool, skip_rows: bool):
  """Refs, in order: [layer (1,)] if stacked, [q_rows ()] if skip_rows, then q [bq, D]; k/v pool
  [P, S, D] (this head's, or the shared one) or [L, P, S, D] (stacked, indexed by layer);
  page table [MP]; kv_len, new_len 0-d; fresh k/v [Lf, D] (Lf = padded num_fresh); out [bq, D]."""
  refs = list(refs)
  layer_ref = refs.pop(0) if stacked else None
  q_rows_ref = refs.pop(0) if skip_rows else None
  q_ref, k_ref, v_ref, pt_ref, kv_len_ref, kn_ref, vn_ref, new_len_ref, o_ref = refs
  rows, head_dim = q_ref.shape
  page_size = k_ref.shape[-2]
  max_pages = pt_ref.shape[0]
  subs_per_page = page_size // block_k
  # f32 would otherwise run as TF32 on tensor cores; bf16 keeps the default.
  precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
  attend = functools.partial(_attend, scale=scale, precision=precision)

  def run():
    q = q_ref[...]
    state = _init_state(rows, head_dim)

    # Fresh K/V of the block: valid rows < new_len[b] (the padding rows are masked too).
    n_new = jnp.clip(new_len_ref[...], 0, num_fresh)
    fresh_valid = jnp.arange(kn_ref.shape[0]) < n_new
    state = attend(state, q, kn_ref[...], vn_ref[...], fresh_valid)

    # Cached tokens, clamped so the loop never reads past the page table.
    n_cached = jnp.clip(kv_len_ref[...], 0, max_pages * page_size)
    layer = layer_ref[0] if stacked else None

    def body(t, state):
      page = lax.div(t, subs_per_page)                  # `%`/`//` on loop indices break lowering
      pid = pt_ref[page]                                # scalar page id
      off = pl.multiple_of((t - page * subs_per_page) * block_k, block_k)
      if stacked:                                       # one combined indexer -> [bk, D]
        k = k_ref[layer, pid, pl.ds(off, block_k), :]
        v = v_ref[layer, pid, pl.ds(off, block_k), :]
      else:
        k = k_ref[pid, pl.ds(off, block_k), :]
        v = v_ref[pid, pl.ds(off, block_k), :]
      valid = t * block_k + jnp.arange(block_k) < n_cached
      return attend(state, q, k, v, valid)

    acc, _, l = lax.fori_loop(0, pl.cdiv(n_cached, block_k), body, state)
    # l > 0 always (the fresh step adds masked ones); a row with no valid key has acc == 0.
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)

  if skip_rows:  # q tiles wholly past the request's used rows only write zeros
    used = pl.program_id(2) * rows < q_rows_ref[...]
    pl.when(used)(run)

    @pl.when(jnp.logical_not(used))
    def _():
      o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
  else:
    run()


def head_sparse_attention_kernel(
    *operands: jax.Array,
    scale: float,
    block_k: int,
    block_q: int | None = None,
    layer: jax.Array | None = None,
    q_rows: jax.Array | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
  """pallas_call wrapper (unvalidated; use ops.head_sparse_attention).

  operands (:class:`SparseOperands`, in that order): q [B, Hkv, QB, D]; k_pages, v_pages [Hkv, P, S, D] (head-major), [P, S, D] (shared page
  space) or, with ``layer`` (int32 [1], traced), [L, P, S, D] (a stacked shared pool read in
  place at that layer: the whole buffer is the operand, never a per-layer slice of it);
  page_table [B, Hkv, MP] int32; kv_len [B, Hkv] int32; k_new, v_new [B, Hkv, Ln, D];
  new_len [B] int32; q_rows [B] int32 (optional): rows of q in use per request (q tiles wholly
  past it are skipped and write zeros) -> [B, Hkv, QB, D].
  Grid (B, Hkv, QB // block_q). Fresh rows are zero-padded to a power of two >= 16 here.
  """
  q, k_pages, v_pages, page_table, kv_len, k_new, v_new, new_len = SparseOperands(*operands)
  batch, num_kv_heads, q_rows_total, head_dim = q.shape
  stacked = layer is not None
  num_pages, page_size = k_pages.shape[-3:-1]
  max_pages = page_table.shape[-1]
  num_fresh = k_new.shape[2]
  block_q = q_rows_total if block_q is None else block_q

  fresh_rows = padded_rows(num_fresh)
  if fresh_rows != num_fresh:
    pad = ((0, 0), (0, 0), (0, fresh_rows - num_fresh), (0, 0))
    k_new, v_new = jnp.pad(k_new, pad), jnp.pad(v_new, pad)

  params = triton_params(num_warps=num_warps, num_stages=num_stages)
  # Without Triton params jax 0.10 silently hands the kernel to Mosaic GPU on a GPU.
  assert isinstance(params, pltr.CompilerParams), params

  if stacked:                                            # whole [L, P, S, D] pool, all layers
    pool_spec = pl.BlockSpec(k_pages.shape, lambda b, h, i: (0, 0, 0, 0))
  elif k_pages.ndim == 3:                                # shared page space: whole pool
    pool_spec = pl.BlockSpec((num_pages, page_size, head_dim), lambda b, h, i: (0, 0, 0))
  else:                                                  # head-major: head h's own page space
    pool_spec = pl.BlockSpec((None, num_pages, page_size, head_dim),
                             lambda b, h, i: (h, 0, 0, 0))
  fresh_spec = pl.BlockSpec((None, None, fresh_rows, head_dim), lambda b, h, i: (b, h, 0, 0))
  q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
  in_specs, args = [], []
  if stacked:
    in_specs.append(pl.BlockSpec((1,), lambda b, h, i: (0,)))
    args.append(jnp.asarray(layer, jnp.int32).reshape(1))
  if q_rows is not None:
    in_specs.append(pl.BlockSpec((None,), lambda b, h, i: (b,)))
    args.append(q_rows)
  in_specs += [
      q_spec,
      pool_spec,                                                     # the whole pool:
      pool_spec,                                                     # pointer arithmetic only
      pl.BlockSpec((None, None, max_pages), lambda b, h, i: (b, h, 0)),
      pl.BlockSpec((None, None), lambda b, h, i: (b, h)),
      fresh_spec,
      fresh_spec,
      pl.BlockSpec((None,), lambda b, h, i: (b,)),
  ]
  args += [q, k_pages, v_pages, page_table, kv_len, k_new, v_new, new_len]
  kernel = functools.partial(_kernel, block_k=block_k, scale=float(scale), num_fresh=num_fresh,
                             stacked=stacked, skip_rows=q_rows is not None)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(batch, num_kv_heads, q_rows_total // block_q),
      in_specs=in_specs,
      out_specs=q_spec,
      compiler_params=params,
      interpret=interpret,
      name="head_sparse_attention",
  )(*args)
