"""Sparse KV configuration and the per-block Refresh -> Select -> Reuse state machine.

Per request and diffusion block, counting the block's forward passes s = 0, 1, 2, ...:

    s <  delay   Refresh          full forward (all N tokens)
    s == delay   Refresh+Select   full forward that also selects and stores each KV head's K/V
    s >  delay   Reuse            only the block's tokens, at their absolute positions, attending
                                  to the stored selected K/V plus the block's fresh K/V

delay 0 therefore selects at the block's first forward and reuses from the second on (the
reference starts block 0 in state 0 whatever the delay and so reads an unfilled cache at delay 0).
A block advances when all its positions are committed, so rules that commit several tokens per
step (threshold, factor) work; a block that finishes before its Select step simply never selects.
The block length is the request's ``SamplingParams.block_length``.

Dream's shifted prediction in Reuse: the token just before the block is fed as one extra
query-only row (its K/V is not added again), so the block's first position is predicted from the
right hidden row at any delay; no first-token rule is needed.
"""

from __future__ import annotations

import dataclasses
import enum

from dllm_jax.cache.selection import MAX_POOL_KERNEL, MODES


class Phase(enum.IntEnum):
  REFRESH = 0
  SELECT = 1
  REUSE = 2


@dataclasses.dataclass(frozen=True)
class SparseConfig:
  """Sparse caching knobs (defaults as the reference: keep 0.5, max-pool 3, delay 1).

  selection: "per_head" (head-centric, default), "shared" (one token set for all heads, the
  Sparse-dLLM baseline) or "per_head_adaptive" (per-head budgets from score spread).
  """

  enabled: bool = True
  keep_ratio: float = 0.5
  pool_kernel: int = 3
  delay: int = 1
  selection: str = "per_head"

  def __post_init__(self):
    if not isinstance(self.enabled, bool):
      raise ValueError(f"enabled: expected true or false, got {self.enabled!r}")
    r = self.keep_ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
      raise ValueError(f"keep_ratio: must be in [0, 1], got {r!r}")
    object.__setattr__(self, "keep_ratio", float(r))
    for f, lo in (("pool_kernel", 1), ("delay", 0)):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{f}: expected an integer >= {lo}, got {v!r}")
    if self.pool_kernel > MAX_POOL_KERNEL:
      raise ValueError(f"pool_kernel: at most {MAX_POOL_KERNEL}, got {self.pool_kernel}")
    if self.selection not in MODES:
      raise ValueError(f"selection: expected one of {MODES}, got {self.selection!r}")

  @property
  def adaptive(self) -> bool:
    return self.selection == "per_head_adaptive"


def phase_of(step_in_block: int, delay: int) -> Phase:
  if step_in_block < delay:
    return Phase.REFRESH
  if step_in_block == delay:
    return Phase.SELECT
  return Phase.REUSE
