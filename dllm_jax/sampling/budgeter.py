"""Logit budgeter: pick the logit variant and its chunk sizes from an activation budget.

Analytic memory model (temporary bytes of the jitted decode, arguments and outputs excluded)
for R rows, hidden size d, vocabulary V, head dtype of b bytes, row chunk C, vocab tile Tv:

  full / rows   F * R*V*4                                  the f32 logits
  row_chunked   F * C*V*4 + C*d*b           (+ pad)        one chunk's logits + its hidden slice
  vocab_tiled   F * C*Tv*4 + d*Tv*b + [C<R] C*d*b (+ pad)  one logit tile + the head tile slice
                                                           (+ the hidden chunk when chunked)
  vocab_tiled, impl="pallas"  S*R'*32 (+ pad)              the kernel keeps tiles on chip; only
                                                           the [S, R'] partial stats hit memory
                                                           (C = the kernel's row block for the
                                                           device, tiles.py; unknown GPU: 128)
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

"Fastest" is measured where a calibration table knows the device and width (``calibration.py``:
time per variant at a few row counts, per backend / device kind / GPU generation, for heads
within 8x the measured d*V; ``dllm-jax bench logits --calibrate`` measures it): among the plans
that fit, the least estimated time wins, ties by the rule below, and the rule's own choice is
kept unless a plan is CALIBRATION_MARGIN faster.
Without an entry for the device (e.g. unknown GPUs) it is the analytic cost rule:
fewest, largest tiles that fit. Order: rows, then row_chunked by C descending, then vocab_tiled by
tile count ceil(R/C)*ceil(V/Tv) ascending (ties: larger C), then the fused kernel. C runs over R
and the powers of two below it down to MIN_CHUNK, Tv over the powers of two below V down to
``min_vocab_tile``. A ``timings`` table {(variant, C, Tv): seconds} of measured plans (None for an
unused size, as in the plans) overrides both among the plans that fit.
No plan is ever returned over budget; if nothing fits, ValueError.

vocab_tiled comes in two implementations (``LogitPlan.impl``): "xla" (the jnp reference, tiles
sized by C and Tv) and "pallas" (the fused kernel, its own blocks; one plan with C = Tv = None).
``impl="auto"`` offers both on a GPU and only "xla" elsewhere (the kernel does not run on CPU);
``LogitPlan.decode_impl`` is what ``variants.decode_rows(impl=...)`` must get to run the plan
that was estimated.

Plans carry ``chunk_rows=None`` for rows/full and ``vocab_tile=None`` for rows/row_chunked.
``device_kind`` (e.g. "NVIDIA H200") defaults to the running device when ``backend`` is the
running backend; it picks the kernel's blocks and the calibration entry.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax
import jax.numpy as jnp

from dllm_jax.sampling import calibration as calib
from dllm_jax.sampling.plan import VARIANTS, LogitPlan
from pallas_kernels.fused_lm_head import ops as kernel_ops
from pallas_kernels.fused_lm_head import tiles

# Per-backend multiplier on the f32 logit block (GPU: fusion scratch around the logits).
LOGIT_FACTOR = {"gpu": 1.05, "cuda": 1.05, "rocm": 1.05, "cpu": 1.0}
ROW_BYTES = 64       # per-row stats (8 x f32 [R]) and outputs
PARTIAL_BYTES = 32   # kernel partial stats per (split, row): 8 x 4 bytes
PREFERENCE = ("rows", "row_chunked", "vocab_tiled")
MIN_CHUNK = 16        # smallest row chunk considered
MIN_VOCAB_TILE = 128  # smallest vocab tile considered
# A measured plan replaces the cost rule's choice only when it is this much faster: closer
# calibrated times are within timing noise (CPU tables vary 10-20 % under load).
CALIBRATION_MARGIN = 0.05


IMPLS = ("auto", "xla", "pallas")


def _itemsize(dtype) -> int:
  return jnp.dtype(dtype).itemsize


def _backend(backend: str | None) -> str:
  b = jax.default_backend() if backend is None else backend
  if b not in LOGIT_FACTOR:
    raise ValueError(f"backend: expected one of {sorted(LOGIT_FACTOR)}, got {b!r}")
  return b


def _device(backend: str, device_kind: str | None):
  """(device_kind, compute_capability, core_count): the given kind, else the local device's when
  ``backend`` is the running one, else all None (unknown)."""
  if device_kind is not None:
    return device_kind, None, None
  if calib.norm_backend(backend) == calib.norm_backend(jax.default_backend()):
    return tiles.local_device()
  return None, None, None


# An unknown GPU is estimated with the largest shipped row block (128): its padding bounds any
# smaller block's (a multiple of 128 rows is a multiple of 64).
_LARGEST_BLOCK_KIND = "NVIDIA H100"


def kernel_blocks_for(rows: int, d: int, vocab: int, dtype, backend: str | None = None,
                      device_kind: str | None = None) -> kernel_ops.Blocks:
  """The fused kernel's blocks the budgeter assumes for this backend / device."""
  kind, _, cores = _device(_backend(backend), device_kind)
  return kernel_ops.kernel_blocks(rows, d, vocab, itemsize=_itemsize(dtype),
                                  device_kind=kind or _LARGEST_BLOCK_KIND, core_count=cores)


def _pad_bytes(r: int, c: int, d: int, b: int) -> int:
  rp = -(-r // c) * c
  return 0 if rp == r else rp * (d * b + 16)


def estimate_bytes(variant: str, rows: int, d: int, vocab: int, dtype,
                   chunk_rows: int | None = None, vocab_tile: int | None = None,
                   backend: str | None = None, *, impl: str = "xla",
                   vocab_splits: int | None = None, device_kind: str | None = None) -> int:
  """Temporary bytes of ``decode_rows`` for one plan (module docstring).

  chunk_rows defaults to all rows, vocab_tile to the whole vocabulary. impl: "xla" (the jnp
  paths) or "pallas" (vocab_tiled through the fused kernel: its row block and ``vocab_splits``
  partials, both as the kernel picks them for ``device_kind`` unless given).
  """
  for name, x in (("rows", rows), ("d", d), ("vocab", vocab)):
    if x < 1:
      raise ValueError(f"{name}: must be >= 1, got {x}")
  if variant not in VARIANTS:
    raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
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
    blk = kernel_blocks_for(r, d, vocab, dtype, backend, device_kind)
    kr = blk.block_rows
    rp = -(-r // kr) * kr
    splits = blk.vocab_splits if vocab_splits is None else vocab_splits
    return splits * rp * PARTIAL_BYTES + _pad_bytes(r, kr, d, b) + per_row
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
    tvs = _pow2_below(vocab, min(min_vocab_tile, vocab)) or [vocab]
    cs = [rows] + _pow2_below(rows, MIN_CHUNK)
    vt = [(c, t) for c in cs for t in tvs]
    vt.sort(key=lambda ct: (-(-rows // ct[0]) * -(-vocab // ct[1]), -ct[0]))
    out += [("vocab_tiled", c, t) for c, t in vt]
  return out


def _impls(impl: str, backend: str) -> tuple[str, ...]:
  if impl not in IMPLS:
    raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return ("xla", "pallas") if calib.norm_backend(backend) == "gpu" else ("xla",)
  return (impl,)


def candidates(rows: int, d: int, vocab: int, dtype, backend: str | None = None, *,
               impl: str = "auto", min_vocab_tile: int = MIN_VOCAB_TILE,
               variants: Iterable[str] = PREFERENCE, device_kind: str | None = None):
  """Every plan with its estimate, in cost-rule order (the kernel after the jnp tiles)."""
  backend = _backend(backend)
  impls = _impls(impl, backend)
  est = lambda v, c, tv, i: estimate_bytes(v, rows, d, vocab, dtype, c, tv, backend, impl=i,
                                           device_kind=device_kind)
  for v, c, tv in plan_sizes(rows, vocab, min_vocab_tile=min_vocab_tile, variants=variants):
    if v != "vocab_tiled":
      yield LogitPlan(v, c, tv, "xla", est(v, c, tv, "xla"))
    elif "xla" in impls:
      yield LogitPlan(v, c, tv, "xla", est(v, c, tv, "xla"))
  if "vocab_tiled" in tuple(variants) and "pallas" in impls:
    yield LogitPlan("vocab_tiled", None, None, "pallas",
                    est("vocab_tiled", None, None, "pallas"))


def calibration_entry(calibration="auto", backend: str | None = None,
                      device_kind: str | None = None) -> calib.Entry | None:
  """The timing entry ``choose`` uses: ``calibration`` is "auto" (the user file, then the
  packaged table), None (none: analytic rule), an ``Entry``, a path, or a parsed table
  (list of entries / the JSON object). Looked up for ``backend`` / ``device_kind``."""
  if calibration is None or isinstance(calibration, calib.Entry):
    return calibration
  backend = _backend(backend)
  if calibration == "auto":
    entries = calib.load()
  elif isinstance(calibration, Mapping):
    entries = calib.parse(calibration)
  elif isinstance(calibration, (list, tuple)):
    entries = list(calibration)
  else:
    entries = calib.read(calibration)
  kind, cc, _ = _device(backend, device_kind)
  return calib.lookup(entries, backend, kind, cc)


def choose(budget_bytes: int, rows: int, d: int, vocab: int, dtype, *,
           backend: str | None = None, timings: Mapping | None = None, impl: str = "auto",
           min_vocab_tile: int = MIN_VOCAB_TILE, variants: Iterable[str] = PREFERENCE,
           calibration="auto", device_kind: str | None = None) -> LogitPlan:
  """The fastest plan (``timings``, else the calibration entry for this device, else the cost
  rule) whose estimate fits ``budget_bytes``. Raises ValueError when no plan fits.

  impl: "auto" (the kernel is a candidate on GPU), "xla" (jnp vocab tiles only) or "pallas"
  (vocab_tiled as the fused kernel only). calibration / device_kind: see ``calibration_entry``.
  """
  if rows < 1 or d < 1 or vocab < 1:
    raise ValueError(f"rows, d and vocab must be positive, got {rows}, {d}, {vocab}")
  backend = _backend(backend)
  plans = list(candidates(rows, d, vocab, dtype, backend, impl=impl,
                          min_vocab_tile=min_vocab_tile, variants=variants,
                          device_kind=device_kind))
  fits = [p for p in plans if p.est_bytes <= budget_bytes]
  if not fits:
    s = min(plans, key=lambda p: p.est_bytes)
    raise ValueError(
        f"no logit plan fits {budget_bytes:,} bytes for {rows} rows x vocab {vocab} "
        f"(d={d}, {jnp.dtype(dtype).name}, {backend}); the smallest ({s.variant}, "
        f"C={s.chunk_rows}, Tv={s.vocab_tile}, {s.impl}) needs {s.est_bytes:,}")
  if timings:
    timed = [p for p in fits if (p.variant, p.chunk_rows, p.vocab_tile) in timings]
    if timed:
      return min(timed, key=lambda p: timings[(p.variant, p.chunk_rows, p.vocab_tile)])
  entry = calibration_entry(calibration, backend, device_kind)
  if entry is not None and entry.covers(d, vocab):
    times = [entry.plan_time(p.variant, p.impl, rows, p.chunk_rows) for p in fits]
    timed = [(t, i) for i, t in enumerate(times) if t is not None]
    if timed:
      best, i = min(timed)
      if times[0] is None or best < (1 - CALIBRATION_MARGIN) * times[0]:
        return fits[i]
  return fits[0]
