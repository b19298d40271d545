"""LogitPlan: how the decode head turns hidden rows into (token, confidence).

One plan type for the whole package: the budgeter returns it, the engine compiles it into its
steps, a user may force one (``LLM(logit_plan=...)``, ``EngineConfig(logits=...)``).
"""

from __future__ import annotations

import dataclasses

VARIANTS = ("full", "rows", "row_chunked", "vocab_tiled")
PLAN_IMPLS = ("auto", "xla", "pallas", "interpret")


@dataclasses.dataclass(frozen=True)
class LogitPlan:
  """variant: one of VARIANTS (sampling/variants.py);
  chunk_rows: rows per chunk (row_chunked, vocab_tiled); None: all rows at once;
  vocab_tile: vocabulary columns per tile (vocab_tiled, jnp path); None: the whole vocabulary
    (the fused kernel picks its own tiles);
  impl: vocab_tiled's implementation: "xla" (jnp tiles), "pallas" (the fused kernel),
    "interpret" (the kernel under the CPU interpreter, tests) or "auto" (the kernel on a GPU);
  est_bytes: the budgeter's estimate of the plan's live bytes (None when forced by hand)."""

  variant: str = "rows"
  chunk_rows: int | None = 256
  vocab_tile: int | None = 2048
  impl: str = "auto"
  est_bytes: int | None = None

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
    if self.impl not in PLAN_IMPLS:
      raise ValueError(f"impl: expected one of {PLAN_IMPLS}, got {self.impl!r}")
    for name in ("chunk_rows", "vocab_tile"):
      v = getattr(self, name)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"{name}: expected a positive integer or None, got {v!r}")

  @property
  def decode_impl(self) -> str:
    """The kernel ``impl`` for ``variants.decode_rows`` (pallas_kernels.impls names)."""
    return {"xla": "reference"}.get(self.impl, self.impl)

  def rows_per_chunk(self, rows: int) -> int:
    return rows if self.chunk_rows is None else min(rows, self.chunk_rows)

  def tile(self, vocab: int) -> int:
    return vocab if self.vocab_tile is None else min(vocab, self.vocab_tile)
