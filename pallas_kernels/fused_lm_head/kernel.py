"""Pallas (Triton-style) fused LM head: logits tile -> online softmax stats + noisy argmax.

Grid ``(R_pad / block_rows, vocab_splits)``. Program (i, s) owns rows [i*C, (i+1)*C) and the
vocab tiles [s*tps, (s+1)*tps) (tps = tiles per split). For each vocab tile of Tv columns it
accumulates the [C, Tv] logits over d in K chunks of ``block_k`` with ``pltr.dot`` (f32
accumulation), then folds the tile into the running statistics of ``reference.tile_stats`` /
``merge`` (the Gumbel hash is computed in-kernel by ``pallas_kernels.noise``: uint32 ops only).
Logits never leave registers/shared memory; each program writes one partial ``Stats`` row block,
and ``ops`` merges the ``vocab_splits`` partials (O(S*R) work in XLA). ``vocab_splits > 1`` only
exists to fill the GPU when there are few row blocks (a decode step with a few hundred rows).

Ragged edges without out-of-bounds reads: the last vocab tile is loaded at start V - Tv and
the columns already seen are masked; a ragged last K chunk is loaded at d - bk with the
already-summed hidden columns zeroed. Rows are padded to a multiple of C by ``ops``.

Shapes in the kernel: block_rows, block_vocab, block_k powers of two (Triton requirement), with
block_vocab <= V and block_k <= d. In-kernel index math is multiplies and clamps only (no ``%``).
The k-loop over d stays in the kernel (``pltr.dot`` accumulates f32; ``num_stages`` pipelines its
loads); block sizes, warps and stages per GPU generation and row count come from ``tiles.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.common import triton_params
from pallas_kernels.fused_lm_head.stats import Stats, init_stats, merge, tile_stats


def _kernel(h_ref, w_ref, t_ref, seed_ref, step_ref, pos_ref,
            m_ref, se_ref, ae_ref, t1_ref, t2_ref, bs_ref, bi_ref, bl_ref, *,
            d, v, c, tv, bk, num_tiles, tiles_per_split, want_margin, want_entropy, precision,
            exclude_id):
  split = pl.program_id(1)
  temp = t_ref[...]
  seed = seed_ref[...]
  step = step_ref[...]
  pos = pos_ref[...]
  hot = jnp.max(temp) > 0.0  # all rows greedy -> skip the hash (same result)
  j0 = split * tiles_per_split
  n_here = jnp.clip(num_tiles - j0, 0, tiles_per_split)
  nk = -(-d // bk)
  k_ragged = d % bk != 0
  v_ragged = v % tv != 0
  k_local = jnp.arange(bk, dtype=jnp.int32)

  def tile(jj, acc_st):
    lo = (j0 + jj) * tv
    start = jnp.minimum(lo, v - tv)

    def kstep(kk, acc):
      k_lo = kk * bk
      k0 = jnp.minimum(k_lo, d - bk) if k_ragged else k_lo
      h = h_ref[:, pl.ds(k0, bk)]
      if k_ragged:  # columns < k_lo were already summed by the previous chunk
        h = jnp.where((k0 + k_local >= k_lo)[None, :], h, jnp.zeros_like(h))
      w = w_ref[pl.ds(k0, bk), pl.ds(start, tv)]
      return acc + pltr.dot(h, w, precision=precision)

    l = lax.fori_loop(0, nk, kstep, jnp.zeros((c, tv), jnp.float32))
    st = tile_stats(l, start, lo if v_ragged else None, temp, seed, step, pos, hot=hot,
                    want_margin=want_margin, want_entropy=want_entropy, in_kernel=True,
                    exclude_id=exclude_id)
    return merge(acc_st, st)

  st = lax.fori_loop(0, n_here, tile, init_stats(c))
  m_ref[...] = st.m
  se_ref[...] = st.se
  ae_ref[...] = st.ae
  t1_ref[...] = st.t1
  t2_ref[...] = st.t2
  bs_ref[...] = st.bs
  bi_ref[...] = st.bi
  bl_ref[...] = st.bl


def fused_lm_head_partials(hidden, head, temperature, seed, step, position, *, block_rows: int,
                           block_vocab: int, block_k: int, vocab_splits: int,
                           want_margin: bool = False, want_entropy: bool = False,
                           exclude_id: int | None = None, num_warps: int = 4, num_stages: int = 2,
                           interpret: bool = False) -> Stats:
  """Partial statistics, each field [vocab_splits, R]; R a multiple of block_rows.

  hidden [R, d] and head [d, V] of one float dtype; seed uint32 [R]; temperature f32 [R];
  step/position int32 [R]. Arguments are validated by ``ops.fused_lm_head``.
  """
  r, d = hidden.shape
  v = head.shape[1]
  c, tv, bk, s = block_rows, block_vocab, block_k, vocab_splits
  num_tiles = -(-v // tv)
  tps = -(-num_tiles // s)
  precision = lax.Precision.HIGHEST if hidden.dtype == jnp.float32 else None  # no TF32
  kern = functools.partial(_kernel, d=d, v=v, c=c, tv=tv, bk=bk, num_tiles=num_tiles,
                           tiles_per_split=tps, want_margin=want_margin,
                           want_entropy=want_entropy, precision=precision,
                           exclude_id=exclude_id)
  row = pl.BlockSpec((c,), lambda i, j: (i,))
  out = pl.BlockSpec((None, c), lambda i, j: (j, i))
  f32 = jax.ShapeDtypeStruct((s, r), jnp.float32)
  i32 = jax.ShapeDtypeStruct((s, r), jnp.int32)
  outs = pl.pallas_call(
      kern,
      grid=(r // c, s),
      in_specs=[pl.BlockSpec((c, d), lambda i, j: (i, 0)),
                pl.BlockSpec((d, v), lambda i, j: (0, 0)),  # whole head; tiles read by pl.ds
                row, row, row, row],
      out_specs=[out] * 8,
      out_shape=[f32, f32, f32, f32, f32, f32, i32, f32],
      compiler_params=triton_params(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="fused_lm_head",
  )(hidden, head, temperature, seed, step, position)
  return Stats(*outs)
