"""Vocab-tiled fused LM head in plain jnp: the oracle of the Pallas kernel (and its CPU path).

At most one [chunk_rows, vocab_tile] f32 logit tile is live; the per-tile statistics are the
shared ones of ``stats.py``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.fused_lm_head.stats import (cdiv, finalize, init_stats, map_row_chunks,
                                                merge, slice_no_hoist, tile_stats)


def fused_lm_head_reference(hidden, head, temperature, seed, step, position, *, chunk_rows: int,
                            vocab_tile: int, want_margin: bool = False,
                            want_entropy: bool = False, exclude_id: int | None = None):
  """Vocab-tiled decode in plain jnp: at most one [chunk_rows, vocab_tile] f32 tile live.

  hidden [R, d], head [d, V] (same dtype; the matmul accumulates in f32), per-row
  temperature/seed/step/position [R]. Rows are padded to a multiple of chunk_rows (zero rows,
  T = 0; sliced off). The ragged last vocab tile is read at a clamped start with the overlap
  masked, so nothing is padded or read out of bounds (V >= vocab_tile after clamping).
  Returns (token, confidence, margin|None, entropy|None), each [R].
  """
  r, d = hidden.shape
  v = head.shape[1]
  tv = min(vocab_tile, v)
  nt = cdiv(v, tv)
  ragged = v % tv != 0

  def one_chunk(h, t, sd, st, ps):
    hot = jnp.any(t > 0)

    def body(j, acc):
      lo = j * tv
      start = jnp.minimum(lo, v - tv)  # the ragged last tile re-reads some columns: masked
      l = jnp.dot(h, slice_no_hoist(head, start, tv, 1), preferred_element_type=jnp.float32)
      return merge(acc, tile_stats(l, start, lo if ragged else None, t, sd, st, ps, hot=hot,
                                   want_margin=want_margin, want_entropy=want_entropy,
                                   exclude_id=exclude_id))

    return finalize(lax.fori_loop(0, nt, body, init_stats(h.shape[0])), want_margin,
                    want_entropy)

  return map_row_chunks(one_chunk, (hidden, temperature, seed, step, position), chunk_rows)
