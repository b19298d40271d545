"""The per-block Refresh -> Select -> Reuse state machine of a sparse request (its knobs:
``dllm_jax.config.SparseConfig``).

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

import enum

from dllm_jax.config import SparseConfig  # noqa: F401  (its home is config.py; re-exported)


class Phase(enum.IntEnum):
  REFRESH = 0
  SELECT = 1
  REUSE = 2


def phase_of(step_in_block: int, delay: int) -> Phase:
  if step_in_block < delay:
    return Phase.REFRESH
  if step_in_block == delay:
    return Phase.SELECT
  return Phase.REUSE
