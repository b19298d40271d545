"""Select the important K/V of one layer at a Refresh+Select step (Sparse-dLLM / dLLM-Serve math).

Per request, on post-RoPE q/k:
- ``q_avg`` = mean of the current block's queries [Hq, D];
- candidates = every non-block position below the request's length, prefix then suffix (the
  reference's order, so the pooling window spans the seam);
- score = q_avg . k / sqrt(D): ``shared`` sums over all query heads (one token set for every
  head, the Sparse-dLLM baseline); ``per_head`` / ``per_head_adaptive`` give each KV head its own
  score (GQA: max over the group's query heads);
- 1-D max-pool along the candidates (kernel ``pool_kernel``, stride 1, padding kernel//2 as -inf);
- top-k with ``n_keep = min(max(1, floor(K * ratio)), K)``, K = number of candidates, ties to the
  lowest position.

``per_head_adaptive`` keeps the same total ``Hkv * n_keep`` tokens but splits it by how spread
each head's attention is: every head keeps 1 token, and the remaining ``Hkv * (n_keep - 1)`` are
shared in proportion to the perplexity ``exp(H_h)`` of the softmax of the head's (unpooled)
candidate scores, i.e. its effective number of attended tokens (floored, capped at K). A
concentrated head (perplexity near 1) keeps few tokens; a diffuse one keeps more; the total never
exceeds ``Hkv * n_keep``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dllm_jax.config import MAX_POOL_KERNEL, SELECTION_MODES

MODES = SELECTION_MODES  # indices into this tuple are the runtime mode values
_NEG = -jnp.inf


def n_keep(num_candidates: int, ratio: float) -> int:
  """``min(max(1, floor(K * ratio)), K)`` (0 when K == 0), in float64 like the reference.

  Computed on the host and handed to the device, so host page accounting and device selection
  can never disagree.
  """
  if num_candidates <= 0:
    return 0
  return min(max(1, int(num_candidates * float(ratio))), num_candidates)


def candidate_index(n: int, block_start, block_len, length):
  """Positions of the candidates in reference order: [0, b) then [b + Lb, length).

  Returns (index [n] int32 into the canvas, valid [n] bool) for one request.
  """
  j = jnp.arange(n, dtype=jnp.int32)
  idx = jnp.where(j < block_start, j, j + block_len)
  return jnp.minimum(idx, n - 1), idx < length


def max_pool(scores, valid, kernel):
  """1-D max-pool over the last axis, stride 1, padding kernel//2 (as -inf), invalid = -inf.

  ``kernel`` may be a traced int (<= MAX_POOL_KERNEL): window [t - k//2, t - k//2 + k - 1].
  """
  s = jnp.where(valid, scores, _NEG)
  left = kernel // 2
  n = s.shape[-1]
  r = MAX_POOL_KERNEL
  pad = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(r, r)], constant_values=_NEG)
  out = s
  for off in range(-r, r + 1):
    inside = (off >= -left) & (off <= kernel - 1 - left)
    out = jnp.where(inside, jnp.maximum(out, pad[..., r + off:r + off + n]), out)
  return jnp.where(valid, out, _NEG)


def head_scores(q_block, q_valid, k_cand, shared, axis: str | None = None):
  """Unpooled candidate scores, [Hkv, n] (shared: the same row repeated for every head).
  ``shared`` may be a traced bool. Under tensor parallelism (``axis``) the shared score sums the
  query heads of every device.

  q_block [Lq, Hq, D] (rows beyond q_valid are padding); k_cand [n, Hkv, D].
  """
  lq, hq, d = q_block.shape
  hkv = k_cand.shape[1]
  w = q_valid.astype(jnp.float32)[:, None, None]
  q_avg = jnp.sum(q_block.astype(jnp.float32) * w, 0) / jnp.maximum(jnp.sum(w), 1.0)  # [Hq, D]
  qg = q_avg.reshape(hkv, hq // hkv, d)
  s = jnp.einsum("hgd,nhd->hgn", qg, k_cand.astype(jnp.float32)) * (d ** -0.5)  # [Hkv, G, n]
  total = jnp.sum(s, axis=(0, 1))
  if axis is not None:
    total = jax.lax.psum(total, axis)
  one_set = jnp.broadcast_to(total[None], (hkv, s.shape[-1]))
  return jnp.where(shared, one_set, jnp.max(s, axis=1))


def adaptive_budgets(scores, valid, total, num_candidates):
  """Per-head budgets [Hkv] from score spread (see module docstring)."""
  s = jnp.where(valid, scores, _NEG)
  p = jax.nn.softmax(s, axis=-1)
  ent = -jnp.sum(jnp.where(valid, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=-1)
  perp = jnp.exp(ent)
  share = perp / jnp.sum(perp)
  hkv = scores.shape[0]
  # Every head keeps at least one token; the rest of the total is shared by spread.
  spare = jnp.maximum(total - hkv, 0).astype(jnp.float32)
  b = 1 + jnp.floor(share * spare).astype(jnp.int32)
  b = jnp.minimum(b, num_candidates)
  b = jnp.where(total >= hkv * num_candidates, num_candidates, b)  # keep-all stays keep-all
  return jnp.where(num_candidates > 0, b, 0)


def select(q_block, q_valid, k_all, block_start, block_len, length, keep, mode, pool_kernel, *,
           width: int, axis: str | None = None):
  """Selected canvas positions of one request and layer.

  q_block [Lq, Hq, D]; q_valid [Lq] bool; k_all [N, Hkv, D] post-RoPE keys of the whole canvas;
  keep: n_keep of this request and block (from :func:`n_keep` on the host); mode: index into
  MODES; pool_kernel: int. All may be traced, so requests with different sparse configs share
  one executable.
  Returns (positions [Hkv, width] int32, counts [Hkv] int32): head h keeps positions[h, :counts[h]]
  (sorted by descending pooled score). ``width`` is a static bound >= every count.
  """
  n = k_all.shape[0]
  idx, valid = candidate_index(n, block_start, block_len, length)
  k_cand = jnp.take(k_all, idx, axis=0)
  raw = head_scores(q_block, q_valid, k_cand, mode == MODES.index("shared"), axis)
  raw = jnp.where(valid[None], raw, _NEG)
  pooled = max_pool(raw, valid[None], pool_kernel)
  num = jnp.sum(valid).astype(jnp.int32)
  hkv = k_all.shape[1]
  counts = jnp.where(mode == MODES.index("per_head_adaptive"),
                     adaptive_budgets(raw, valid[None], keep * hkv, num),
                     jnp.full((hkv,), keep, jnp.int32))
  order = jnp.argsort(-pooled, axis=-1, stable=True)[:, :width]  # ties -> lowest position
  pos = jnp.take(idx, order)
  counts = jnp.minimum(counts, width)
  return pos.astype(jnp.int32), counts
