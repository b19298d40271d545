"""Turn a scheduler plan into the device inputs of one step (host side, numpy only).

Layout (dllm_jax/model/fused.py, dllm_jax/engine/grid.py): the step's tokens packed flat —
Refresh canvases back to back, then each Reuse row's query tokens, then padding up to the T
bucket — plus the attention layouts (index maps into the flat tokens) and the flat candidate list
of the decode head. The inputs stay numpy arrays: the step transfers them as they are, with no
compilation, whereas ``jnp.asarray`` would dispatch a conversion that XLA compiles once per new
shape (tests/test_recompiles.py)."""

from __future__ import annotations

import dataclasses

import flax.struct
import numpy as np

from dllm_jax.cache.selection import MODES
from dllm_jax.cache.sparse_state import Phase
from dllm_jax.config import ModelConfig
from dllm_jax.sampling.decode import CandidateInputs
from dllm_jax.engine.grid import Grid, Shapes
from dllm_jax.engine.request import Request
from dllm_jax.model.fused import FlatTokens, RefreshLayout, ReuseLayout, SelectPart

I32 = np.int32


@flax.struct.dataclass
class StepInputs:
  flat: FlatTokens
  refresh: RefreshLayout | None   # None when the bucket has no Refresh part (N = 0)
  select: SelectPart | None       # with the Refresh part
  reuse: ReuseLayout
  cand: CandidateInputs


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static sizes of one bucket (derived from the grid)."""

  tokens: int          # T
  length: int          # N
  refresh_rows: int    # Br
  reuse_rows: int      # Bu
  query_width: int     # Lq
  cand_width: int      # C
  candidates: int      # K

  @classmethod
  def of(cls, grid: Grid, s: Shapes, chunk: int) -> "Layout":
    return cls(s.tokens, s.length, grid.refresh_rows(s), grid.reuse_rows(s), grid.query_width,
               grid.cand_width, grid.candidates(s, chunk))

  @property
  def rows(self) -> int:
    return self.refresh_rows + self.reuse_rows


@dataclasses.dataclass
class StepRows:
  """Where the scheduled requests' candidates are (to apply the step's results), n = requests."""

  reqs: list[Request]    # Refresh requests, then Reuse requests
  index: np.ndarray      # [n] row of each request in the commit grid
  positions: np.ndarray  # [n, C] absolute canvas positions (valid entries only, via `valid`)
  valid: np.ndarray      # [n, C] bool


def step_tokens(refresh: list[Request], reuse: list[Request], cfg: ModelConfig) -> int:
  """Flat tokens a step feeds (what the T bucket must hold)."""
  return sum(r.length for r in refresh) + sum(r.reuse_cost(cfg) for r in reuse)


def _empty(lay: Layout, cfg: ModelConfig, *, max_slots: int, reserved_width: int):
  """All-padding arrays of a bucket (nothing attends, nothing is a candidate)."""
  t, n, br, bu, lq, r, k = (lay.tokens, lay.length, lay.refresh_rows, lay.reuse_rows,
                            lay.query_width, lay.rows, lay.candidates)
  zero_row = br * n + bu * lq  # the zero row appended to the attention outputs
  flat = dict(tokens=np.full(t, cfg.pad_token_id, I32), positions=np.zeros(t, I32),
              inverse=np.full(t, zero_row, I32))
  refresh = select = None
  if n:
    refresh = dict(index=np.zeros((br, n), I32), lengths=np.zeros(br, I32))
    select = dict(slots=np.full(br, max_slots, I32), block_start=np.zeros(br, I32),
                  block_len=np.zeros(br, I32), keep=np.zeros(br, I32), mode=np.zeros(br, I32),
                  pool_kernel=np.ones(br, I32), reserved=np.zeros((br, reserved_width), I32))
  reuse = dict(index=np.zeros((bu, lq), I32), n_query=np.zeros(bu, I32),
               new_len=np.zeros(bu, I32), slots=np.zeros(bu, I32))
  cand = dict(src=np.zeros(k, I32), pos=np.zeros(k, I32), cell=np.full(k, r * lay.cand_width, I32),
              count=np.zeros(1, I32), temperature=np.zeros(r, np.float32),
              seed=np.zeros(r, np.uint32), step=np.zeros(r, I32), confidence=np.zeros(r, I32),
              rule=np.zeros(r, I32), k=np.zeros(r, I32), threshold=np.ones(r, np.float32),
              factor=np.ones(r, np.float32))
  return flat, refresh, select, reuse, cand


def _pack(flat, refresh, select, reuse, cand, sparse_on: bool) -> StepInputs:
  return StepInputs(
      FlatTokens(**flat), RefreshLayout(**refresh) if refresh is not None else None,
      SelectPart(**select) if select is not None and sparse_on else None, ReuseLayout(**reuse),
      CandidateInputs(**cand))


def dummy_step(cfg: ModelConfig, lay: Layout, *, max_slots: int, reserved_width: int,
               sparse_on: bool = True) -> StepInputs:
  """Inputs of the given bucket that change nothing (no Select, no candidate): warm-up."""
  return _pack(*_empty(lay, cfg, max_slots=max_slots, reserved_width=reserved_width), sparse_on)


def build_step(refresh: list[Request], reuse: list[Request], cfg: ModelConfig, lay: Layout, *,
               sparse_on: bool, max_slots: int, reserved_width: int):
  """(StepInputs, StepRows) for the scheduled requests. ``reserved_width``: total width of the
  reserved-page array, split evenly between tensor-parallel devices.

  Per-row Python does only what is per row (copy a canvas, read scalars); the candidate arrays
  are built for all rows at once (this loop is the host's share of every step)."""
  flat, ref, sel, reu, cand = _empty(lay, cfg, max_slots=max_slots,
                                     reserved_width=reserved_width)
  n, lq, c = lay.length, lay.query_width, lay.cand_width
  reqs = refresh + reuse
  nr = len(refresh)
  blocks = [r.current_block() for r in reqs]
  starts = np.array([b[1] for b in blocks], I32)
  lbs = np.array([b[2] for b in blocks], I32)
  rows = np.concatenate([np.arange(nr), lay.refresh_rows + np.arange(len(reuse))]).astype(I32)
  offsets = np.zeros(len(reqs), I32)   # each request's first flat token

  off = 0
  for i, req in enumerate(refresh):
    length = req.length
    offsets[i] = off
    flat["tokens"][off:off + length] = req.canvas
    flat["positions"][off:off + length] = np.arange(length)
    flat["inverse"][off:off + length] = i * n + np.arange(length)
    ref["index"][i, :length] = off + np.arange(length)
    ref["lengths"][i] = length
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
    off += length
  base = lay.refresh_rows * n
  for u, req in enumerate(reuse):
    start, lb = starts[nr + u], lbs[nr + u]
    extra = cfg.shifted_prediction and start > 0  # Dream's query-only row (see src below)
    nq = lb + (1 if extra else 0)
    offsets[nr + u] = off
    flat["tokens"][off:off + lb] = req.canvas[start:start + lb]
    flat["positions"][off:off + lb] = start + np.arange(lb)
    if extra:
      flat["tokens"][off + lb] = req.canvas[start - 1]
      flat["positions"][off + lb] = start - 1
    flat["inverse"][off:off + nq] = base + u * lq + np.arange(nq)
    reu["index"][u, :nq] = off + np.arange(nq)
    reu["n_query"][u], reu["new_len"][u], reu["slots"][u] = nq, lb, req.slot
    off += nq

  # Candidates: the still-masked positions of each row's current block, row-major.
  j = np.arange(c, dtype=I32)[None, :]
  valid = j < lbs[:, None]                                      # [n, C]
  pos = np.where(valid, starts[:, None] + j, 0).astype(I32)
  eligible = np.zeros((len(reqs), c), bool)
  for i, r in enumerate(reqs):
    eligible[i, :lbs[i]] = r.canvas[starts[i]:starts[i] + lbs[i]] == r.mask_id
  # The flat hidden row that predicts each candidate.
  local = np.empty((len(reqs), c), I32)
  if nr:
    local[:nr] = np.maximum(pos[:nr] - 1, 0) if cfg.shifted_prediction else pos[:nr]
  if reuse:
    if cfg.shifted_prediction:
      # Dream: block position t is predicted by the row of position t-1; for t = 0 that is the
      # query-only row holding the token just before the block (its K/V is in the cache).
      first = np.where(starts[nr:] > 0, lbs[nr:], 0)
      local[nr:] = np.where(j == 0, first[:, None], j - 1)
    else:
      local[nr:] = j
  ri, ci = np.nonzero(eligible)
  count = len(ri)
  cand["src"][:count] = offsets[ri] + local[ri, ci]
  cand["pos"][:count] = pos[ri, ci]
  cand["cell"][:count] = rows[ri] * c + ci
  cand["count"][0] = count
  if reqs:
    table = np.array([r.decode_scalars() for r in reqs], np.float64).T
    temperature, seed, confidence, rule, threshold, factor, step, k = table
    for name, values in (("temperature", temperature), ("seed", seed), ("step", step),
                         ("confidence", confidence), ("rule", rule), ("k", k),
                         ("threshold", threshold), ("factor", factor)):
      cand[name][rows] = values
  return (_pack(flat, ref, sel, reu, cand, sparse_on),
          StepRows(reqs, rows, pos, valid))
