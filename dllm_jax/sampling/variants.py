"""Logit variants: hidden rows -> (token, confidence, margin, entropy, rand) per row.

One contract for every variant (``decode_rows``); they differ only in how much of the [R, V]
logit matrix is live at once:

  full         every canvas row, monolithic [B*N, V] (the reference's level 0; ablation baseline).
               Same computation as ``rows``; the caller passes all rows (``decode_full``).
  rows         candidate rows only, monolithic [R, V] f32 logits.
  row_chunked  candidate rows in chunks of C rows (lax.map): [C, V] live. R is padded to a
               multiple of C with zero rows (sliced off).
  vocab_tiled  online over vocab tiles within row chunks: [C, Tv] live (jnp reference), or the
               fused Pallas kernel on GPU (tiles on chip). V need not be a multiple of Tv.

Semantics, per row r (hidden h_r, clean logits l = h_r @ W accumulated in f32):
  token      = argmax_v (l_v + T_r * gumbel(seed_r, step_r, pos_r, lane=v)), ties -> lowest id
               (T_r == 0: argmax l; the noise is skipped for a chunk whose rows are all greedy)
  confidence = softmax(l)[token]              (clean probability, never the noised one)
  margin     = p1 - p2 of softmax(l)          (want_margin)
  entropy    = sum_v p_v log p_v              (want_entropy; negative entropy, higher = surer)
  rand       = noise.uniform(seed, step, pos, lane=V)   (the 'random' confidence kind)
  exclude_id (static; the engine passes the mask id) is never the token — committing the mask id
  would be a no-op and the request would never finish — but it stays in the softmax.

All variants are token-identical for identical logits. Logits computed by differently shaped
GEMMs may differ in the last bit (XLA:CPU f32 GEMMs do; bf16 ones did not in our tests), which
can flip a token only at an exact near-tie. Padding rows need no mask: rows are independent and
every output is finite for finite inputs; the caller ignores padded rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from dllm_jax.sampling.plan import VARIANTS
from pallas_kernels import noise
from pallas_kernels.fused_lm_head import ops as fused_ops
from pallas_kernels.fused_lm_head.stats import finalize, logits_stats, map_row_chunks


@struct.dataclass
class RowParams:
  """Per-row sampling inputs, each [R] (or [B, N] for ``decode_full``)."""

  temperature: jax.Array  # f32, >= 0
  seed: jax.Array         # uint32 (int32 accepted: its 32 bits)
  step: jax.Array         # int32 denoising step
  position: jax.Array     # int32 absolute position in the canvas

  @classmethod
  def create(cls, position, temperature=0.0, seed=0, step=0) -> "RowParams":
    """Broadcast scalars to ``position``'s shape."""
    position = jnp.asarray(position, jnp.int32)
    b = lambda x, dt: jnp.broadcast_to(jnp.asarray(x).astype(dt), position.shape)
    return cls(b(temperature, jnp.float32), b(seed, jnp.uint32), b(step, jnp.int32), position)

  def normalized(self) -> "RowParams":
    """The fields in the dtypes the statistics expect (f32, uint32, int32, int32)."""
    return RowParams(self.temperature.astype(jnp.float32), self.seed.astype(jnp.uint32),
                     self.step.astype(jnp.int32), self.position.astype(jnp.int32))


@struct.dataclass
class RowOut:
  token: jax.Array              # int32 [R]
  confidence: jax.Array         # f32 [R]
  margin: jax.Array | None      # f32 [R] or None
  entropy: jax.Array | None     # f32 [R] or None
  rand: jax.Array               # f32 [R] in (0, 1)


def with_rand(outs, p: RowParams, vocab_size: int) -> RowOut:
  """RowOut from (token, confidence, margin, entropy) plus the 'random' confidence lane."""
  return RowOut(*outs, rand=noise.uniform(p.seed, p.step, p.position, vocab_size))


def _decide(logits, p: RowParams, want_margin, want_entropy, exclude_id):
  """(token, confidence, margin, entropy) from [R, V] f32 logits; ``p`` normalized."""
  st = logits_stats(logits, p.temperature, p.seed, p.step, p.position, want_margin=want_margin,
                    want_entropy=want_entropy, exclude_id=exclude_id)
  return finalize(st, want_margin, want_entropy)


def decode_logits(logits, params: RowParams, *, want_margin: bool = False,
                  want_entropy: bool = False, exclude_id: int | None = None) -> RowOut:
  """logits [R, V] f32, params fields [R] -> RowOut: the decisions from given logits."""
  p = params.normalized()
  return with_rand(_decide(logits, p, want_margin, want_entropy, exclude_id), p,
                   logits.shape[1])


def _monolithic(hidden, head, p: RowParams, want_margin, want_entropy, exclude_id):
  """[R, V] f32 logits at once (``rows``/``full``); reductions fuse into reads of the logits."""
  logits = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
  return _decide(logits, p, want_margin, want_entropy, exclude_id)


def _row_chunked(hidden, head, p: RowParams, c, want_margin, want_entropy, exclude_id):
  def chunk(h, t, s, st, pos):
    return _monolithic(h, head, RowParams(t, s, st, pos), want_margin, want_entropy, exclude_id)

  return map_row_chunks(chunk, (hidden, p.temperature, p.seed, p.step, p.position), c)


@functools.partial(jax.jit, static_argnames=("variant", "chunk_rows", "vocab_tile", "want_margin",
                                             "want_entropy", "exclude_id", "impl"))
def decode_rows(hidden, head, params: RowParams, *, variant: str, chunk_rows: int = 1024,
                vocab_tile: int = 8192, want_margin: bool = False, want_entropy: bool = False,
                exclude_id: int | None = None, impl: str = "auto") -> RowOut:
  """hidden [R, d], head [d, V], params fields [R] -> RowOut with [R] fields.

  ``hidden`` is cast to ``head.dtype``. chunk_rows (C) is used by row_chunked and vocab_tiled,
  vocab_tile (Tv) by vocab_tiled; ``impl`` (auto | pallas | interpret | reference) only by
  vocab_tiled (auto: the Pallas kernel on GPU, the jnp reference elsewhere).
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
  if hidden.ndim != 2 or head.ndim != 2 or hidden.shape[1] != head.shape[0]:
    raise ValueError(f"expected hidden [R, d] and head [d, V]; got {hidden.shape}, {head.shape}")
  if chunk_rows < 1 or vocab_tile < 1:
    raise ValueError(f"chunk_rows / vocab_tile must be >= 1, got {chunk_rows}, {vocab_tile}")
  p = params.normalized()
  hidden = hidden.astype(head.dtype)
  if variant in ("full", "rows"):
    outs = _monolithic(hidden, head, p, want_margin, want_entropy, exclude_id)
  elif variant == "row_chunked":
    outs = _row_chunked(hidden, head, p, chunk_rows, want_margin, want_entropy, exclude_id)
  else:
    outs = tuple(fused_ops.fused_lm_head(
        hidden, head, p.temperature, p.seed, p.step, p.position, chunk_rows=chunk_rows,
        vocab_tile=vocab_tile, want_margin=want_margin, want_entropy=want_entropy,
        exclude_id=exclude_id, impl=impl))
  return with_rand(outs, p, head.shape[1])


def decode_full(hidden_all, head, params: RowParams, *, want_margin: bool = False,
                want_entropy: bool = False, exclude_id: int | None = None) -> RowOut:
  """The ``full`` baseline: hidden_all [B, N, d], params fields [B, N] -> RowOut fields [B, N].

  Logits for every canvas row at once ([B*N, V] f32); the caller then keeps the candidate
  positions. Only for ablation: it is what the budget must avoid.
  """
  b, n, d = hidden_all.shape
  flat = jax.tree.map(lambda x: x.reshape(b * n), params)
  out = decode_rows(hidden_all.reshape(b * n, d), head, flat, variant="full",
                    want_margin=want_margin, want_entropy=want_entropy, exclude_id=exclude_id)
  return jax.tree.map(lambda x: x.reshape(b, n), out)
