"""Turn a scheduler plan into the bucketed device inputs of one step (host side, numpy only).

The inputs stay numpy arrays: the jitted step transfers them as they are, with no compilation,
whereas ``jnp.asarray`` would dispatch a conversion that XLA compiles once per new shape (after
warm-up, those compiles landed in the first real steps: tests/test_recompiles.py)."""

from __future__ import annotations

import dataclasses

import numpy as np

from dllm_jax.cache.selection import MODES
from dllm_jax.cache.sparse_state import Phase
from dllm_jax.config import ModelConfig
from dllm_jax.engine.request import Request
from dllm_jax.engine.runner import CandidateInputs, StepInputs, pow2_at_least
from dllm_jax.model.fused import ReusePart, SelectPart
from dllm_jax.model.transformer import RefreshPart

MIN_LEN_BUCKET = 32
MIN_CAND_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The bucketed shapes of one step (the compile key together with the static config)."""

  refresh_rows: int
  length: int
  reuse_rows: int
  query_rows: int
  cand: int


@dataclasses.dataclass
class StepRows:
  """Where the scheduled requests' candidates are (to apply the step's results), n = requests."""

  reqs: list[Request]    # Refresh requests, then Reuse requests
  index: np.ndarray      # [n] row of each request in the device outputs (Refresh bucket padded)
  positions: np.ndarray  # [n, C] absolute canvas positions (valid entries only, via `valid`)
  valid: np.ndarray      # [n, C] bool


def shapes_for(refresh: list[Request], reuse: list[Request], cfg: ModelConfig,
               max_len_bucket: int) -> Shapes:
  lb = max([r.current_block()[2] for r in refresh + reuse] + [1])
  cand = pow2_at_least(lb, MIN_CAND_BUCKET)
  return Shapes(
      refresh_rows=pow2_at_least(len(refresh)) if refresh else 0,
      length=min(pow2_at_least(max([r.length for r in refresh] + [1]), MIN_LEN_BUCKET),
                 max_len_bucket) if refresh else 0,
      reuse_rows=pow2_at_least(len(reuse)) if reuse else 0,
      query_rows=cand + (1 if cfg.shifted_prediction else 0),
      cand=cand)


def build_step(refresh: list[Request], reuse: list[Request], cfg: ModelConfig, shapes: Shapes,
               *, sparse_on: bool, max_slots: int, reserved_width: int):
  """(StepInputs, StepRows) for the scheduled requests. ``reserved_width``: total width of the
  reserved-page array, split evenly between tensor-parallel devices.

  Per-row Python does only what is per row (copy a canvas, read scalars); the candidate arrays
  are built for all rows at once (this loop is the host's share of every step)."""
  c = shapes.cand
  i32 = np.int32
  reqs = refresh + reuse
  blocks = [r.current_block() for r in reqs]
  starts = np.array([b[1] for b in blocks], i32)
  lbs = np.array([b[2] for b in blocks], i32)
  j = np.arange(c, dtype=i32)[None, :]
  valid = j < lbs[:, None]                                      # [n, C]
  pos = np.where(valid, starts[:, None] + j, 0).astype(i32)
  eligible = np.zeros((len(reqs), c), bool)
  for i, r in enumerate(reqs):
    eligible[i, :lbs[i]] = r.canvas[starts[i]:starts[i] + lbs[i]] == r.mask_id
  nr = len(refresh)
  # The hidden row (within the row's own fed tokens) that predicts each candidate.
  src = np.empty((len(reqs), c), i32)
  if nr:
    src[:nr] = np.maximum(pos[:nr] - 1, 0) if cfg.shifted_prediction else starts[:nr, None] + j
  if reuse:
    if cfg.shifted_prediction:
      # Dream: block position t is predicted by the row of position t-1; for t = 0 that is the
      # query-only row holding the token just before the block (its K/V is in the cache).
      first = np.where(starts[nr:] > 0, lbs[nr:], 0)
      src[nr:] = np.where(j == 0, first[:, None], j - 1)
    else:
      src[nr:] = j
  src = np.where(valid, src, 0).astype(i32)

  # Rows: the refresh bucket (padded), then the reuse rows.
  total_rows = shapes.refresh_rows + shapes.reuse_rows
  rows = np.array(list(range(nr)) + [shapes.refresh_rows + i for i in range(len(reuse))],
                  np.int64)

  def per_row(values, dtype, fill):
    out = np.full((total_rows,) + np.shape(values)[1:], fill, dtype)
    out[rows] = values
    return out

  # One [n, 8] float64 table for the per-row scalars (exact for uint32 seeds and small ints).
  table = np.array([r.decode_scalars() for r in reqs], np.float64).T
  temperature, seed, confidence, rule, threshold, factor, step, k = table
  cand = CandidateInputs(
      src=per_row(src, i32, 0), pos=per_row(pos, i32, 0), eligible=per_row(eligible, bool, False),
      temperature=per_row(temperature, np.float32, 0.0), seed=per_row(seed, np.uint32, 0),
      step=per_row(step, i32, 0), confidence=per_row(confidence, i32, 0),
      rule=per_row(rule, i32, 0), k=per_row(k, i32, 0),
      threshold=per_row(threshold, np.float32, 1.0), factor=per_row(factor, np.float32, 1.0))

  refresh_part = select_part = reuse_part = None
  if refresh:
    br, n = shapes.refresh_rows, shapes.length
    tokens = np.full((br, n), cfg.pad_token_id, i32)
    lengths = np.ones(br, i32)
    sel = dict(slots=np.full(br, max_slots, i32), block_start=np.zeros(br, i32),
               block_len=np.zeros(br, i32), keep=np.zeros(br, i32), mode=np.zeros(br, i32),
               pool_kernel=np.ones(br, i32), reserved=np.zeros((br, reserved_width), i32))
    for i, req in enumerate(refresh):
      tokens[i, :req.length] = req.canvas
      lengths[i] = req.length
      if req.is_sparse and req.phase() == Phase.SELECT:
        sel["slots"][i] = req.slot
        sel["block_start"][i], sel["block_len"][i] = starts[i], lbs[i]
        sel["keep"][i] = req.keep()
        sel["mode"][i] = MODES.index(req.sparse.selection)
        sel["pool_kernel"][i] = req.sparse.pool_kernel
        # Per-device page ids, device-major: device d's ids fill reserved[i, d*R:(d+1)*R].
        width = reserved_width // len(req.pages)
        for d, pages in enumerate(req.pages):
          sel["reserved"][i, d * width:d * width + len(pages)] = pages
    positions = np.broadcast_to(np.arange(n, dtype=i32), (br, n))
    refresh_part = RefreshPart(tokens, positions, lengths)
    if sparse_on:
      select_part = SelectPart(**sel)
  if reuse:
    bu, lq = shapes.reuse_rows, shapes.query_rows
    tokens = np.full((bu, lq), cfg.pad_token_id, i32)
    positions = np.zeros((bu, lq), i32)
    positions[:len(reuse), :c] = pos[nr:]
    new_len = np.zeros(bu, i32)
    new_len[:len(reuse)] = lbs[nr:]
    slots = np.zeros(bu, i32)
    for i, req in enumerate(reuse):
      start, lb = starts[nr + i], lbs[nr + i]
      tokens[i, :lb] = req.canvas[start:start + lb]
      slots[i] = req.slot
      if cfg.shifted_prediction and start > 0:  # the query-only row (see src above)
        tokens[i, lb] = req.canvas[start - 1]
        positions[i, lb] = start - 1
    reuse_part = ReusePart(tokens, positions, new_len, slots)
  return StepInputs(refresh_part, select_part, reuse_part, cand), StepRows(reqs, rows, pos, valid)


def dummy_step(cfg: ModelConfig, shapes: Shapes, *, max_slots: int, reserved_width: int):
  """Inputs of the given bucket that change nothing (no Select, nothing eligible): warm-up."""
  i32 = np.int32
  refresh = select = reuse = None
  br, n, bu, lq, c = (shapes.refresh_rows, shapes.length, shapes.reuse_rows, shapes.query_rows,
                      shapes.cand)
  if br:
    refresh = RefreshPart(np.full((br, n), cfg.pad_token_id, i32),
                          np.broadcast_to(np.arange(n, dtype=i32), (br, n)), np.ones(br, i32))
    z = np.zeros(br, i32)
    select = SelectPart(slots=np.full(br, max_slots, i32), block_start=z, block_len=z, keep=z,
                        mode=z, pool_kernel=np.ones(br, i32),
                        reserved=np.zeros((br, reserved_width), i32))
  if bu:
    reuse = ReusePart(np.full((bu, lq), cfg.pad_token_id, i32), np.zeros((bu, lq), i32),
                      np.zeros(bu, i32), np.zeros(bu, i32))
  r = br + bu
  z = np.zeros(r, i32)
  cand = CandidateInputs(
      src=np.zeros((r, c), i32), pos=np.zeros((r, c), i32), eligible=np.zeros((r, c), bool),
      temperature=np.zeros(r, np.float32), seed=np.zeros(r, np.uint32), step=z,
      confidence=z, rule=z, k=z, threshold=np.ones(r, np.float32),
      factor=np.ones(r, np.float32))
  return StepInputs(refresh, select, reuse, cand)
