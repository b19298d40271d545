"""The eight arrays of one head-sparse attention call, in the order every implementation takes
them (the public entry point, ops.head_sparse_attention, spells them out as its arguments)."""

from __future__ import annotations

from typing import NamedTuple

import jax


class SparseOperands(NamedTuple):
  q: jax.Array           # [B, Hkv, QB, D] packed block queries
  k_pages: jax.Array     # [Hkv, P, S, D] head-major, [P, S, D] shared or [L, P, S, D] stacked
  v_pages: jax.Array     # same layout as k_pages
  page_table: jax.Array  # [B, Hkv, MP] int32 page ids of (request, KV head), token order
  kv_len: jax.Array      # [B, Hkv] int32 cached tokens of (request, KV head)
  k_new: jax.Array       # [B, Hkv, Ln, D] the block's fresh keys
  v_new: jax.Array       # [B, Hkv, Ln, D] the block's fresh values
  new_len: jax.Array     # [B] int32 fresh rows in use per request
