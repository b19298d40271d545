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
from dllm_jax.decoding import rules
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
class RowMeta:
  """Where each decoded row's candidates live on the canvas (to apply the results)."""

  req: Request
  positions: np.ndarray  # [C] absolute positions (valid entries only used via `valid`)
  valid: np.ndarray      # [C] bool


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
  """(StepInputs, [RowMeta]) for the scheduled requests. ``reserved_width``: total width of the
  reserved-page array, split evenly between tensor-parallel devices."""
  c = shapes.cand
  total_rows = shapes.refresh_rows + shapes.reuse_rows
  f32, i32 = np.float32, np.int32
  cand = dict(src=np.zeros((total_rows, c), i32), pos=np.zeros((total_rows, c), i32),
              eligible=np.zeros((total_rows, c), bool), temperature=np.zeros(total_rows, f32),
              seed=np.zeros(total_rows, np.uint32), step=np.zeros(total_rows, i32),
              confidence=np.zeros(total_rows, i32), rule=np.zeros(total_rows, i32),
              k=np.zeros(total_rows, i32), threshold=np.ones(total_rows, f32),
              factor=np.ones(total_rows, f32))
  metas = []

  def fill_candidates(i: int, req: Request, src: np.ndarray):
    _, start, lb = req.current_block()
    j = np.arange(c)
    valid = j < lb
    pos = np.where(valid, start + j, 0)
    sp = req.params
    cand["src"][i] = np.where(valid, src, 0)
    cand["pos"][i] = pos
    cand["eligible"][i] = valid & (req.canvas[np.minimum(pos, req.length - 1)] == req.mask_id)
    cand["temperature"][i], cand["seed"][i], cand["step"][i] = sp.temperature, sp.seed, req.step
    cand["confidence"][i] = rules.CONFIDENCE_IDS[sp.confidence]
    cand["rule"][i] = rules.RULE_IDS[sp.rule]
    cand["k"][i] = req.fixed_count() if sp.rule == "fixed" else 0
    cand["threshold"][i], cand["factor"][i] = sp.threshold, sp.factor
    metas.append(RowMeta(req, pos, valid))

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
      _, start, lb = req.current_block()
      pos = start + np.arange(c)
      src = np.maximum(pos - 1, 0) if cfg.shifted_prediction else pos
      fill_candidates(i, req, src)
      if req.is_sparse and req.phase() == Phase.SELECT:
        sel["slots"][i] = req.slot
        sel["block_start"][i], sel["block_len"][i] = start, lb
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
    new_len = np.zeros(bu, i32)
    slots = np.zeros(bu, i32)
    for i, req in enumerate(reuse):
      _, start, lb = req.current_block()
      tokens[i, :lb] = req.canvas[start:start + lb]
      positions[i, :lb] = np.arange(start, start + lb)
      new_len[i] = lb
      slots[i] = req.slot
      j = np.arange(c)
      if cfg.shifted_prediction:
        # Dream: block position t is predicted by the row of position t-1; for t = 0 that is the
        # query-only row holding the token just before the block (its K/V is in the cache).
        has_prev = start > 0
        if has_prev:
          tokens[i, lb] = req.canvas[start - 1]
          positions[i, lb] = start - 1
        src = np.where(j == 0, lb if has_prev else 0, j - 1)
      else:
        src = j
      fill_candidates(shapes.refresh_rows + i, req, src)
    reuse_part = ReusePart(tokens, positions, new_len, slots)
  cand_inputs = CandidateInputs(**cand)
  # Reuse rows' metas were appended after the refresh rows but the refresh block is padded:
  # record the device row index of each meta.
  device_rows = list(range(len(refresh))) + [shapes.refresh_rows + i for i in range(len(reuse))]
  return StepInputs(refresh_part, select_part, reuse_part, cand_inputs), list(zip(device_rows,
                                                                                 metas))


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
