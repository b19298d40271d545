"""Logit budgeter: pick the logit variant and its chunk sizes from an activation budget.

Analytic memory model (temporary bytes of the jitted decode, arguments and outputs excluded)
for R rows, hidden size d, vocabulary V, head dtype of b bytes, row chunk C, vocab tile Tv:

  full / rows   F * R*V*4                                  the f32 logits
  row_chunked   F * C*V*4 + C*d*b           (+ pad)        one chunk's logits + its hidden slice
  vocab_tiled   F * C*Tv*4 + d*Tv*b + [C<R] C*d*b (+ pad)  one logit tile + the head tile slice
                                                           (+ the hidden chunk when chunked)
  vocab_tiled, impl="pallas"  S*R'*32 (+ pad)              the kernel keeps tiles on chip; only
                                                           the [S, R'] partial stats hit memory
  every plan    + R*64                                     per-row stats and outputs
  pad           R'*(d*b + 16) when R' = ceil(R/C)*C > R    the zero-padded copy of the rows

F is a per-backend factor: 1.05 on GPU, 1.0 on CPU. Calibration, hidden [8192, 4096] bf16 x
head [4096, 126464] -> (argmax, max prob):

  H100 measured                  model (GPU)
  monolithic          3.89 GiB   4.05 GiB  (+4%)
  row chunks C=1024   534 MiB    527 MiB   (-1%)
  vocab tiles Tv=8192, C=R  352 MiB    333 MiB   (-5%)

On CPU the same terms match ``compiled.memory_analysis().temp_size_in_bytes`` of this module's
variants within a few percent (tests/test_budgeter.py), provided the loops slice with
``slice_no_hoist``: XLA:CPU upcasts bf16 GEMM operands and would otherwise hoist an f32 copy of
the whole head or hidden out of the loop.

"Fastest" is a documented cost rule, not a measurement: fewest, largest tiles that fit. Order:
rows, then row_chunked by C descending, then vocab_tiled by tile count ceil(R/C)*ceil(V/Tv)
ascending (ties: larger C). C runs over R and the powers of two below it down to MIN_CHUNK, Tv
over the powers of two below V down to ``min_vocab_tile``. A ``timings`` table
{(variant, C, Tv): seconds} of measured plans (None for an unused size, as in the plans)
overrides the rule among the plans that fit: the fastest measured one wins.
No plan is ever returned over budget; if nothing fits, ValueError.

Plans carry ``chunk_rows=None`` for rows/full and ``vocab_tile=None`` for rows/row_chunked.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp

# Per-backend multiplier on the f32 logit block (GPU: fusion scratch around the logits).
LOGIT_FACTOR = {"gpu": 1.05, "cuda": 1.05, "rocm": 1.05, "cpu": 1.0}
ROW_BYTES = 64       # per-row stats (8 x f32 [R]) and outputs
PARTIAL_BYTES = 32   # kernel partial stats per (split, row): 8 x 4 bytes
KERNEL_ROWS = 64     # the Pallas kernel's row block (rows are padded to it)
PREFERENCE = ("rows", "row_chunked", "vocab_tiled")
MIN_CHUNK = 16        # smallest row chunk considered
MIN_VOCAB_TILE = 128  # smallest vocab tile considered


@dataclasses.dataclass(frozen=True)
class LogitPlan:
  variant: str
  chunk_rows: int | None   # None: all rows at once
  vocab_tile: int | None   # None: the whole vocabulary
  est_bytes: int


LogitPlanChoice = LogitPlan  # earlier name, kept for callers


def _itemsize(dtype) -> int:
  return jnp.dtype(dtype).itemsize


def _backend(backend: str | None) -> str:
  b = jax.default_backend() if backend is None else backend
  if b not in LOGIT_FACTOR:
    raise ValueError(f"backend: expected one of {sorted(LOGIT_FACTOR)}, got {b!r}")
  return b


def _pad_bytes(r: int, c: int, d: int, b: int) -> int:
  rp = -(-r // c) * c
  return 0 if rp == r else rp * (d * b + 16)


def estimate_bytes(variant: str, rows: int, d: int, vocab: int, dtype,
                   chunk_rows: int | None = None, vocab_tile: int | None = None,
                   backend: str | None = None, *, impl: str = "xla",
                   vocab_splits: int = 1) -> int:
  """Temporary bytes of ``decode_rows`` for one plan (module docstring).

  chunk_rows defaults to all rows, vocab_tile to the whole vocabulary. impl: "xla" (the jnp
  paths) or "pallas" (vocab_tiled through the fused kernel, ``vocab_splits`` partials).
  """
  for name, x in (("rows", rows), ("d", d), ("vocab", vocab)):
    if x < 1:
      raise ValueError(f"{name}: must be >= 1, got {x}")
  if variant not in ("full", "rows", "row_chunked", "vocab_tiled"):
    raise ValueError(f"variant: expected full|rows|row_chunked|vocab_tiled, got {variant!r}")
  f = LOGIT_FACTOR[_backend(backend)]
  b = _itemsize(dtype)
  r = rows
  c = min(chunk_rows or r, r)
  tv = min(vocab_tile or vocab, vocab)
  per_row = r * ROW_BYTES
  chunk = c * d * b if c < r else 0  # the sliced hidden chunk
  if variant in ("full", "rows"):
    return int(f * r * vocab * 4) + per_row
  if variant == "row_chunked":
    return int(f * c * vocab * 4) + chunk + _pad_bytes(r, c, d, b) + per_row
  if impl == "pallas":
    rp = -(-r // KERNEL_ROWS) * KERNEL_ROWS
    return vocab_splits * rp * PARTIAL_BYTES + _pad_bytes(r, KERNEL_ROWS, d, b) + per_row
  if impl != "xla":
    raise ValueError(f"impl: expected 'xla' or 'pallas', got {impl!r}")
  return int(f * c * tv * 4) + d * tv * b + chunk + _pad_bytes(r, c, d, b) + per_row


def _pow2_below(n: int, floor: int = 1) -> list[int]:
  """Powers of two p with floor <= p < n, descending."""
  out, p = [], 1
  while p < n:
    if p >= floor:
      out.append(p)
    p *= 2
  return out[::-1]


def plan_sizes(rows: int, vocab: int, *, min_vocab_tile: int = MIN_VOCAB_TILE,
               variants: Iterable[str] = PREFERENCE) -> list[tuple[str, int | None, int | None]]:
  """(variant, C, Tv) in cost-rule order: fewest, largest tiles first."""
  variants = tuple(variants)
  out: list[tuple[str, int | None, int | None]] = []
  if "rows" in variants:
    out.append(("rows", None, None))
  if "row_chunked" in variants:
    out += [("row_chunked", c, None) for c in _pow2_below(rows, MIN_CHUNK)]
  if "vocab_tiled" in variants:
    tiles = _pow2_below(vocab, min(min_vocab_tile, vocab)) or [vocab]
    cs = [rows] + _pow2_below(rows, MIN_CHUNK)
    vt = [(c, t) for c in cs for t in tiles]
    vt.sort(key=lambda ct: (-(-rows // ct[0]) * -(-vocab // ct[1]), -ct[0]))
    out += [("vocab_tiled", c, t) for c, t in vt]
  return out


def candidates(rows: int, d: int, vocab: int, dtype, backend: str | None = None, *,
               impl: str = "xla", min_vocab_tile: int = MIN_VOCAB_TILE,
               variants: Iterable[str] = PREFERENCE):
  """Every plan with its estimate, in preference order."""
  for v, c, tv in plan_sizes(rows, vocab, min_vocab_tile=min_vocab_tile, variants=variants):
    yield LogitPlan(v, c, tv, estimate_bytes(v, rows, d, vocab, dtype, c, tv, backend,
                                             impl=impl if v == "vocab_tiled" else "xla"))


def choose(budget_bytes: int, rows: int, d: int, vocab: int, dtype, *,
           backend: str | None = None, timings: Mapping | None = None, impl: str = "xla",
           min_vocab_tile: int = MIN_VOCAB_TILE,
           variants: Iterable[str] = PREFERENCE) -> LogitPlan:
  """The fastest plan (cost rule or ``timings``) whose estimate fits ``budget_bytes``.

  impl="pallas" estimates vocab_tiled as the fused kernel (use it when the decode runs on a GPU
  with impl auto/pallas). Raises ValueError when no plan fits.
  """
  if rows < 1 or d < 1 or vocab < 1:
    raise ValueError(f"rows, d and vocab must be positive, got {rows}, {d}, {vocab}")
  backend = _backend(backend)
  plans = list(candidates(rows, d, vocab, dtype, backend, impl=impl,
                          min_vocab_tile=min_vocab_tile, variants=variants))
  fits = [p for p in plans if p.est_bytes <= budget_bytes]
  if not fits:
    s = min(plans, key=lambda p: p.est_bytes)
    raise ValueError(
        f"no logit plan fits {budget_bytes:,} bytes for {rows} rows x vocab {vocab} "
        f"(d={d}, {jnp.dtype(dtype).name}, {backend}); the smallest ({s.variant}, "
        f"C={s.chunk_rows}, Tv={s.vocab_tile}) needs {s.est_bytes:,}")
  if timings:
    timed = [p for p in fits if (p.variant, p.chunk_rows, p.vocab_tile) in timings]
    if timed:
      return min(timed, key=lambda p: timings[(p.variant, p.chunk_rows, p.vocab_tile)])
  return fits[0]
