"""A request's host-side decoding state: its canvas and where it stands in the state machine.

All bookkeeping is on small numpy arrays; the device only ever sees the rows it runs this step.
"""

from __future__ import annotations

import dataclasses
import enum
import time

import numpy as np

from dllm_jax.cache.page_pool import max_keep, pages_needed
from dllm_jax.cache.selection import n_keep
from dllm_jax.cache.sparse_state import Phase, phase_of
from dllm_jax.config import ModelConfig, SamplingParams, SparseConfig
from dllm_jax.sampling import rules, schedule


class Status(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"
  FINISHED = "finished"
  ABORTED = "aborted"
  REJECTED = "rejected"


@dataclasses.dataclass
class Request:
  """One generation request. ``canvas`` = prompt + generation ([P + G] int32, mask = pending)."""

  request_id: str
  prompt_ids: list[int]
  params: SamplingParams
  sparse: SparseConfig | None
  mask_id: int
  prompt: str | None = None
  arrival: float = dataclasses.field(default_factory=time.perf_counter)

  status: Status = Status.WAITING
  step: int = 0              # forward passes run so far (the noise counter)
  block_step: int = 0        # forward passes within the current block
  block_index: int = -1
  slot: int | None = None
  pages: list[int] = dataclasses.field(default_factory=list)
  skipped: int = 0           # consecutive steps the scheduler passed this request over
  first_token_time: float | None = None
  finish_time: float | None = None
  finish_reason: str | None = None
  error: str | None = None
  trace: list | None = None  # generated positions after every step, when requested

  def __post_init__(self):
    self.canvas = np.asarray(
        list(self.prompt_ids) + [self.mask_id] * self.params.gen_length, np.int32)
    sp = self.params  # decode_scalars' constant part
    self._consts = (sp.temperature, sp.seed, rules.CONFIDENCE_IDS[sp.confidence],
                    rules.RULE_IDS[sp.rule], sp.threshold, sp.factor)
    self._eos_at = None  # leftmost committed EOS / EoT (index in the generation)
    self._scan(0)

  def _scan(self, start: int) -> None:
    """Cache the first masked generated position, the mask count and the current block, reading
    from generation index ``start`` on (everything left of it is committed). The canvas
    changes only in ``apply``, while the scheduler and the batch builder ask for the block
    several times per step: these caches keep the host loop thin (tests/test_engine.py checks
    them against a plain re-scan)."""
    masked = np.flatnonzero(self.canvas[len(self.prompt_ids) + start:] == self.mask_id)
    self._first_mask = start + int(masked[0]) if len(masked) else self.params.gen_length
    self._num_masked = len(masked)
    bl = self.params.block_length
    b = self._first_mask // bl if self._num_masked else 0
    block_start = len(self.prompt_ids) + b * bl
    self._block = (b, block_start, min(bl, len(self.canvas) - block_start))

  # Geometry ---------------------------------------------------------------------------------
  @property
  def prompt_len(self) -> int:
    return len(self.prompt_ids)

  @property
  def length(self) -> int:
    return len(self.canvas)

  @property
  def generated(self) -> np.ndarray:
    return self.canvas[self.prompt_len:]

  @property
  def is_sparse(self) -> bool:
    return self.sparse is not None and self.sparse.enabled

  def current_block(self) -> tuple[int, int, int]:
    """(block index, start, length) of the first block that still holds a mask."""
    return self._block

  def committed_prefix(self) -> int:
    """Length of the longest left-contiguous committed part of the generation."""
    return self._first_mask

  # State machine ----------------------------------------------------------------------------
  def sync_block(self) -> tuple[int, int, int]:
    """Enter the current block (resetting the in-block step counter when it changed)."""
    b, start, lb = self.current_block()
    if b != self.block_index:
      self.block_index, self.block_step = b, 0
    return b, start, lb

  def phase(self) -> Phase:
    if not self.is_sparse:
      return Phase.REFRESH
    return phase_of(self.block_step, self.sparse.delay)

  def keep(self) -> int:
    """n_keep of the current block (host side, float64 like the reference)."""
    _, _, lb = self.current_block()
    return n_keep(self.length - lb, self.sparse.keep_ratio)

  def pages_needed(self, num_kv_heads: int, page_size: int) -> int:
    if not self.is_sparse:
      return 0
    km = max_keep(self.length, self.prompt_len, self.params.gen_length, self.params.block_length,
                  self.sparse.keep_ratio)
    return pages_needed(km, num_kv_heads, page_size, self.sparse.adaptive)

  def fixed_count(self) -> int:
    """Tokens the fixed rule commits this step (LLaDA per-block or Dream schedule)."""
    sp = self.params
    b, _, lb = self.current_block()
    if sp.schedule == "dream":
      return schedule.dream_counts_host(self._num_masked, sp.effective_steps, self.step)
    per_block = max(sp.steps_per_block, 1)
    return schedule.llada_count_host(lb, per_block, self.step - b * per_block)

  def decode_scalars(self) -> tuple:
    """(temperature, seed, confidence id, rule id, threshold, factor, step, fixed count): the
    row's per-step decode inputs (batch.build_step)."""
    k = self.fixed_count() if self.params.rule == "fixed" else 0
    return self._consts + (self.step, k)

  def reuse_cost(self, cfg: ModelConfig) -> int:
    _, _, lb = self.current_block()
    return lb + (1 if cfg.shifted_prediction else 0)

  def apply(self, positions: np.ndarray, tokens: np.ndarray, eos_ids: tuple[int, ...],
            eos_id: int) -> bool:
    """Commit tokens at masked canvas ``positions`` (the step's eligible candidates); run the
    EOS rule; advance counters. Returns True when finished."""
    self.canvas[positions] = tokens
    self.step += 1
    self.block_step += 1
    if len(positions):
      p0 = len(self.prompt_ids)
      pos = positions.tolist()
      for q, t in zip(pos, tokens.tolist()):
        if t in eos_ids and (self._eos_at is None or q - p0 < self._eos_at):
          self._eos_at = q - p0
      if p0 + self._first_mask in pos:
        self._scan(self._first_mask)
      else:  # the first mask and the block stay; every committed position was masked
        self._num_masked -= len(pos)
    done = self._finish_check(eos_id)
    if self.trace is not None:
      self.trace.append(self.generated.tolist())
    return done

  def _finish_check(self, eos_id) -> bool:
    # An EOS whose left side is fully committed lies left of the first mask.
    if self.params.stop_on_eos and self._eos_at is not None and self._eos_at < self._first_mask:
      self.generated[self._eos_at + 1:] = eos_id
      self._scan(self._first_mask)
      self.finish_reason = "eos"
      return True
    if not self._num_masked:
      self.finish_reason = "eos" if self._eos_at is not None else "length"
      return True
    return False
