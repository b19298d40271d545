"""Pick the logit variant and its tile sizes from an activation budget (analytic memory model).

Peak live bytes of turning hidden rows [R, d] (dtype b_in bytes) and a head [d, V] into per-row
(token, confidence), by variant (f32 logits, 4 bytes):

  rows / full    R * V * 4                       the whole logit matrix
  row_chunked    C * V * 4 + C * d * b_in        one chunk of C rows and its gathered hidden rows
  vocab_tiled    C * Tv * 4 + d * Tv * b_in      one [C, Tv] tile and the head slice it reads
                 (C = R when unchunked)

plus O(R) per-row outputs (ignored). Times a per-backend, per-variant constant: 1.0 on GPU (the
H100 figures for hidden [8192, 4096] bf16 x W [4096, 126464] -> (argmax, max prob): monolithic
3.89 GiB, C = 1024 row chunks 534 MiB, Tv = 8192 tiles over all 8192 rows 352 MiB — the model
gives 3.86 GiB, 502 MiB and 320 MiB); on CPU 1.0 / 1.1 / 1.3 for rows / row_chunked /
vocab_tiled, because XLA:CPU keeps part of a second tile-sized temporary (the exp) alive in the
loops (checked against ``compiled.memory_analysis()`` temp bytes in tests/test_budgeter.py).

"Fastest" follows a documented cost rule: fewest, largest tiles that fit. The order of preference
is rows (one GEMM), then row_chunked with the largest C (powers of two) that fits, then
vocab_tiled with the largest C and Tv; measured times (``timings``: {(variant, C, Tv): seconds})
refine the choice among the plans that fit.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

BACKEND_FACTOR = {"cpu": {"rows": 1.0, "full": 1.0, "row_chunked": 1.1, "vocab_tiled": 1.3}}
CHUNKS = (8192, 4096, 2048, 1024, 512, 256, 128, 64, 32, 16)
TILES = (32768, 16384, 8192, 4096, 2048, 1024, 512, 256)


@dataclasses.dataclass(frozen=True)
class LogitPlanChoice:
  variant: str
  chunk_rows: int | None
  vocab_tile: int | None
  est_bytes: int


def estimate_bytes(variant: str, rows: int, d: int, vocab: int, dtype, chunk_rows: int | None = None,
                   vocab_tile: int | None = None, backend: str | None = None) -> int:
  """Peak activation bytes of one variant (module docstring)."""
  b = np.dtype(dtype).itemsize
  backend = backend or jax.default_backend()
  factor = BACKEND_FACTOR.get(backend, {}).get(variant, 1.0)
  if variant in ("rows", "full"):
    core = rows * vocab * 4
  elif variant == "row_chunked":
    c = min(chunk_rows or rows, rows)
    core = c * vocab * 4 + c * d * b
  elif variant == "vocab_tiled":
    c = min(chunk_rows or rows, rows)
    tv = min(vocab_tile or vocab, vocab)
    core = c * tv * 4 + d * tv * b
  else:
    raise ValueError(f"variant: expected rows|full|row_chunked|vocab_tiled, got {variant!r}")
  return int(core * factor)


def candidates(rows: int, d: int, vocab: int, dtype, backend: str | None = None):
  """Every plan in preference order (fewest, largest tiles first)."""
  yield LogitPlanChoice("rows", None, None, estimate_bytes("rows", rows, d, vocab, dtype,
                                                           backend=backend))
  for c in CHUNKS:
    if c < rows:
      yield LogitPlanChoice("row_chunked", c, None, estimate_bytes(
          "row_chunked", rows, d, vocab, dtype, c, backend=backend))
  for c in (rows,) + tuple(x for x in CHUNKS if x < rows):
    for tv in TILES:
      if tv < vocab:
        yield LogitPlanChoice("vocab_tiled", c, tv, estimate_bytes(
            "vocab_tiled", rows, d, vocab, dtype, c, tv, backend=backend))


def choose(budget_bytes: int, rows: int, d: int, vocab: int, dtype, *, backend: str | None = None,
           timings: dict | None = None) -> LogitPlanChoice:
  """The fastest plan whose estimate fits ``budget_bytes``; ValueError when none does."""
  if rows < 1 or d < 1 or vocab < 1:
    raise ValueError(f"rows, d and vocab must be positive, got {rows}, {d}, {vocab}")
  fits = [p for p in candidates(rows, d, vocab, dtype, backend) if p.est_bytes <= budget_bytes]
  if not fits:
    smallest = min(candidates(rows, d, vocab, dtype, backend), key=lambda p: p.est_bytes)
    raise ValueError(f"no logit plan fits {budget_bytes:,} bytes for {rows} rows x vocab {vocab}; "
                     f"the smallest ({smallest.variant}, C={smallest.chunk_rows}, "
                     f"Tv={smallest.vocab_tile}) needs {smallest.est_bytes:,}")
  if timings:
    timed = [p for p in fits if (p.variant, p.chunk_rows, p.vocab_tile) in timings]
    if timed:
      return min(timed, key=lambda p: timings[(p.variant, p.chunk_rows, p.vocab_tile)])
  return fits[0]
