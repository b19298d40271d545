"""The engine's decode head: candidate hidden rows -> (token, confidence) -> commit decisions.

The candidates of a step are a flat list (``CandidateInputs``): the still-masked positions of
each row's current block, ``count`` of them, in a buffer of K slots (K from the shape grid).
The head runs only ``ceil(count / chunk)`` chunks of ``chunk`` rows at run time (a
``fori_loop`` with a traced trip count), each through the logit variant the plan names, so its
cost follows the real candidates and its live logit memory is one chunk's (or one vocab tile's).
Margin and entropy are computed only when some row asks for them (a runtime ``lax.cond``, so
they cost nothing otherwise and do not multiply the executables). The results are scattered
into the [R, C] commit grid (row r = a scheduled request, column c = its block position c),
where each row's confidence kind and commit rule decide. Nothing [rows x vocab]-sized leaves.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from dllm_jax.sampling import rules, variants
from dllm_jax.sampling.plan import LogitPlan
from pallas_kernels import noise
from pallas_kernels.common import MASK_VALUE
from pallas_kernels.fused_lm_head.stats import finalize, map_row_chunks, merge, tile_stats

ROWS_CHUNK = 256  # chunk of the monolithic 'rows' / 'full' plans (their memory only shrinks)


@flax.struct.dataclass
class CandidateInputs:
  """The step's candidates, flat [K] (the first ``count`` are real), and per-row inputs [R].

  src [K]: flat hidden row that predicts the candidate (Dream's shift folded in by the host);
  pos [K]: absolute canvas position (the noise key); cell [K]: row * C + column in the commit
  grid (R * C for padding: dropped); count [1].
  Per row [R]: temperature, seed, step, confidence (rules.CONFIDENCE_IDS), rule (RULE_IDS),
  k (fixed-rule count), threshold, factor.
  """

  src: jax.Array
  pos: jax.Array
  cell: jax.Array
  count: jax.Array
  temperature: jax.Array
  seed: jax.Array
  step: jax.Array
  confidence: jax.Array
  rule: jax.Array
  k: jax.Array
  threshold: jax.Array
  factor: jax.Array


@dataclasses.dataclass(frozen=True)
class DecodeStatic:
  """Compile-time constants of the decode head."""

  plan: LogitPlan
  chunk: int        # rows per loop iteration (divides K)
  cand_width: int   # C, the commit grid's width
  mask_id: int      # never a decision (stays in the softmax)
  vocab_size: int   # real vocabulary (the head may be padded under tensor parallelism)


def chunk_rows(plan: LogitPlan, capacity: int) -> int:
  """Rows per decode iteration for a plan over ``capacity`` candidate slots."""
  if plan.variant in ("rows", "full"):
    return min(capacity, ROWS_CHUNK)
  return plan.rows_per_chunk(capacity)


def _sharded_stats(hidden, head, p: variants.RowParams, static: DecodeStatic, axis: str,
                   want_margin: bool, want_entropy: bool):
  """Vocab-parallel decisions of one chunk: each device scores its vocab slice, keeps per-row
  online statistics, and only those [rows]-sized statistics cross devices (all_gather, then a
  merge in vocab order); the [rows x V] logits are never gathered."""
  v_local = head.shape[1]
  offset = jax.lax.axis_index(axis) * v_local
  cols = offset + jnp.arange(v_local, dtype=jnp.int32)

  def chunk(h, t, sd, stp, pos):
    logits = jnp.dot(h.astype(head.dtype), head, preferred_element_type=jnp.float32)
    logits = jnp.where(cols[None, :] < static.vocab_size, logits, MASK_VALUE)  # padded ids
    return tile_stats(logits, offset, None, t, sd, stp, pos, hot=jnp.any(t > 0),
                      want_margin=want_margin, want_entropy=want_entropy,
                      exclude_id=static.mask_id)

  st = map_row_chunks(chunk, (hidden, p.temperature, p.seed, p.step, p.position),
                      static.plan.rows_per_chunk(hidden.shape[0]))
  every = jax.lax.all_gather(st, axis)  # each field [tp, R]
  merged = jax.tree.map(lambda x: x[0], every)
  for i in range(1, every.m.shape[0]):
    merged = merge(merged, jax.tree.map(lambda x, i=i: x[i], every))
  return finalize(merged, want_margin, want_entropy)


def _chunk_decisions(hidden, logits, head, p: variants.RowParams, static: DecodeStatic,
                     axis: str | None, want_margin: bool, want_entropy: bool):
  """(token, confidence, margin, entropy) of one chunk; absent statistics as zeros."""
  plan = static.plan
  if axis is not None:
    outs = _sharded_stats(hidden, head, p, static, axis, want_margin, want_entropy)
  elif plan.variant == "full":
    o = variants.decode_logits(logits, p, want_margin=want_margin, want_entropy=want_entropy,
                               exclude_id=static.mask_id)
    outs = (o.token, o.confidence, o.margin, o.entropy)
  else:
    o = variants.decode_rows(hidden, head, p, variant=plan.variant,
                             chunk_rows=plan.rows_per_chunk(hidden.shape[0]),
                             vocab_tile=plan.tile(head.shape[1]), want_margin=want_margin,
                             want_entropy=want_entropy, exclude_id=static.mask_id,
                             impl=plan.decode_impl)
    outs = (o.token, o.confidence, o.margin, o.entropy)
  zeros = jnp.zeros(outs[0].shape, jnp.float32)
  return tuple(zeros if x is None else x for x in outs)


def decode_and_commit(hidden, head, c: CandidateInputs, static: DecodeStatic, *,
                      axis: str | None = None):
  """hidden [T, d] flat final hidden states; head [d, V] (this device's slice under tensor
  parallelism, ``axis``) -> (x0 [R, C] int32, commit [R, C] bool)."""
  k_cap = c.src.shape[0]
  chunk = static.chunk
  r, cw = c.temperature.shape[0], static.cand_width
  row = jnp.minimum(c.cell // cw, r - 1)
  params = variants.RowParams(c.temperature[row], c.seed[row], c.step[row], c.pos).normalized()
  want_margin = jnp.any(c.confidence == rules.CONFIDENCE_IDS["margin"])
  want_entropy = jnp.any(c.confidence == rules.CONFIDENCE_IDS["entropy"])
  # The ablation baseline's `full` plan scores every fed row ([T, V] f32 live), then decides
  # the candidates from those logits.
  logits = None
  if static.plan.variant == "full" and axis is None:
    logits = jnp.dot(hidden.astype(head.dtype), head, preferred_element_type=jnp.float32)

  def body(i, outs):
    start = i * chunk
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk)
    src = cut(c.src)
    h = jnp.take(hidden, src, axis=0)
    lg = None if logits is None else jnp.take(logits, src, axis=0)
    p = jax.tree.map(cut, params)
    run = lambda m, e: _chunk_decisions(h, lg, head, p, static, axis, m, e)
    res = jax.lax.cond(want_margin | want_entropy, lambda: run(True, True),
                       lambda: run(False, False))
    return tuple(jax.lax.dynamic_update_slice_in_dim(o, x.astype(o.dtype), start, 0)
                 for o, x in zip(outs, res))

  init = (jnp.zeros((k_cap,), jnp.int32),) + tuple(jnp.zeros((k_cap,), jnp.float32)
                                                   for _ in range(3))
  n_chunks = (c.count[0] + chunk - 1) // chunk
  token, prob, margin, entropy = jax.lax.fori_loop(0, n_chunks, body, init)
  rand = noise.uniform(params.seed, params.step, params.position, static.vocab_size)

  real = jnp.arange(k_cap) < c.count[0]
  cell = jnp.where(real, c.cell, r * cw)
  grid = lambda x, fill: jnp.full((r * cw,), fill, x.dtype).at[cell].set(x, mode="drop") \
      .reshape(r, cw)
  eligible = grid(real, False)
  conf = rules.pick_confidence(c.confidence, grid(prob, 0.0), grid(rand, 0.0),
                               grid(margin, 0.0), grid(entropy, 0.0))
  commit = rules.commit_mask(conf, eligible, c.rule, c.k, c.threshold, c.factor)
  return grid(token, 0), commit
