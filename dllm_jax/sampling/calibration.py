"""Measured cost of the logit variants per backend / device: the budgeter's timing table.

A table (JSON, ``calibration.json`` next to this module, shipped as package data) holds entries

  {"key": {"backend": "cpu", "device_kind": "cpu"}            # or "generation": "hopper"
   "source": "...",  "unit": "seconds per row" | "relative",  "shape": {"d": .., "vocab": ..},
   "rows": [n0, n1, ...],                                      # ascending row counts
   "cost": {"rows": [...], "row_chunked": [...], "vocab_tiled": [...],
            "vocab_tiled_kernel": [...]}}                      # per-row cost at each n

``cost[variant][i]`` is the time per row of that variant when each GEMM call sees ``rows[i]``
rows: all R rows for ``rows`` and the kernel, one chunk of C rows for ``row_chunked`` and the jnp
``vocab_tiled`` (measured by ``dllm-jax bench logits --calibrate`` with two chunks of C rows).
A plan's time is then ``R * cost(R)`` (monolithic, kernel) or ``ceil(R/C)*C * cost(C)`` (chunked:
padded rows cost too). Between measured n the per-row cost is interpolated log-log; below the
smallest n the *call* time is held (a GEMM of fewer rows is no faster: the head read bounds it),
above the largest the per-row cost is held. Variants missing from an entry are not timed.

Only the order of costs matters (``unit`` may be seconds or relative). The ranking depends on the
GEMM width, so an entry with a ``shape`` only ranks widths d*V within SHAPE_RANGE (8x) of it
(``Entry.covers``; LLaDA-8B and Dream-7B heads are within 1.1x of each other; the demo model's
128 x 3072 head is 21x below the CPU entry's 256 x 32768, so the analytic rule decides there).

Lookup (``lookup``): an entry for the exact device kind wins over one for its GPU generation;
entries from the user file (``$DLLM_JAX_LOGITS_CALIBRATION`` or
``~/.cache/dllm-jax/logits-calibration.json``, written by ``--calibrate``) win over the packaged
ones. No entry: the budgeter uses its analytic rule.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Mapping

FORMAT = 1
PACKAGE_TABLE = Path(__file__).with_name("calibration.json")
ENV_PATH = "DLLM_JAX_LOGITS_CALIBRATION"
COST_KEYS = ("rows", "row_chunked", "vocab_tiled", "vocab_tiled_kernel")
GPU_BACKENDS = ("gpu", "cuda", "rocm")
SHAPE_RANGE = 8.0  # an entry ranks widths d*V within this factor of the one it was measured at


def user_path() -> Path:
  """Where ``--calibrate`` writes by default, and which the budgeter reads first."""
  if os.environ.get(ENV_PATH):
    return Path(os.environ[ENV_PATH])
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(cache) / "dllm-jax" / "logits-calibration.json"


def norm_backend(backend: str) -> str:
  return "gpu" if backend in GPU_BACKENDS else backend


@dataclasses.dataclass(frozen=True)
class Curve:
  """Per-row cost at ascending row counts ``ns``."""

  ns: tuple[int, ...]
  cost: tuple[float, ...]

  def per_row(self, n: int) -> float:
    ns, cs = self.ns, self.cost
    if n <= ns[0]:
      return cs[0] * ns[0] / n  # hold the call time
    if n >= ns[-1]:
      return cs[-1]
    i = bisect.bisect_right(ns, n)
    x0, x1, y0, y1 = (math.log(v) for v in (ns[i - 1], ns[i], cs[i - 1], cs[i]))
    return math.exp(y0 + (y1 - y0) * (math.log(n) - x0) / (x1 - x0))


@dataclasses.dataclass(frozen=True)
class Entry:
  backend: str
  device_kind: str | None
  generation: str | None
  curves: Mapping[str, Curve]
  source: str = ""
  raw: Mapping = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def covers(self, d: int, vocab: int) -> bool:
    """Whether the entry ranks plans of this width: its measured d*V within SHAPE_RANGE x
    (GEMM shape changes the ranking; an entry without a shape covers every width)."""
    shape = self.raw.get("shape") or {}
    if not (isinstance(shape.get("d"), int) and isinstance(shape.get("vocab"), int)):
      return True
    ratio = d * vocab / (shape["d"] * shape["vocab"])
    return 1 / SHAPE_RANGE <= ratio <= SHAPE_RANGE

  def plan_time(self, variant: str, impl: str, rows: int, chunk_rows: int | None):
    """Estimated time (table units) of a budgeter plan, or None if its variant is not timed."""
    key = "vocab_tiled_kernel" if variant == "vocab_tiled" and impl == "pallas" else variant
    curve = self.curves.get(key)
    if curve is None:
      return None
    if key in ("row_chunked", "vocab_tiled"):
      c = min(chunk_rows or rows, rows)
      return -(-rows // c) * c * curve.per_row(c)
    return rows * curve.per_row(rows)


def _fail(msg: str):
  raise ValueError(f"logit calibration table: {msg}")


def parse_entry(obj: Mapping) -> Entry:
  if not isinstance(obj, Mapping):
    _fail(f"an entry must be an object, got {type(obj).__name__}")
  key = obj.get("key")
  if not isinstance(key, Mapping) or not isinstance(key.get("backend"), str):
    _fail(f"entry needs key.backend, got {key!r}")
  if not (key.get("device_kind") or key.get("generation")):
    _fail(f"entry key needs device_kind or generation, got {dict(key)}")
  ns = obj.get("rows")
  if (not isinstance(ns, list) or not ns or not all(isinstance(n, int) and n >= 1 for n in ns)
      or sorted(set(ns)) != ns):
    _fail(f"rows must be ascending distinct positive ints, got {ns!r}")
  cost = obj.get("cost")
  if not isinstance(cost, Mapping) or not cost:
    _fail("entry needs a non-empty cost object")
  curves = {}
  for name, cs in cost.items():
    if name not in COST_KEYS:
      _fail(f"unknown variant {name!r} (expected one of {COST_KEYS})")
    if (not isinstance(cs, list) or len(cs) != len(ns)
        or not all(isinstance(c, (int, float)) and c > 0 and math.isfinite(c) for c in cs)):
      _fail(f"cost[{name!r}] must be {len(ns)} positive numbers, got {cs!r}")
    curves[name] = Curve(tuple(ns), tuple(float(c) for c in cs))
  return Entry(norm_backend(key["backend"]), key.get("device_kind"), key.get("generation"),
               curves, str(obj.get("source", "")), dict(obj))


def parse(table: Mapping) -> list[Entry]:
  """Validate a table object (the JSON) -> entries in file order."""
  if not isinstance(table, Mapping) or table.get("format") != FORMAT:
    _fail(f"expected an object with format {FORMAT}")
  entries = table.get("entries")
  if not isinstance(entries, list):
    _fail("expected an 'entries' list")
  return [parse_entry(e) for e in entries]


def read(path) -> list[Entry]:
  with open(path) as fh:
    return parse(json.load(fh))


def load(path=None) -> list[Entry]:
  """Entries of ``path``; None: the user file (if any) before the packaged table."""
  if path is not None:
    return read(path)
  user = user_path()
  return (read(user) if user.is_file() else []) + read(PACKAGE_TABLE)


def lookup(entries, backend: str, device_kind: str | None,
           compute_capability: str | None = None) -> Entry | None:
  """The entry for this device: exact device kind first, then its GPU generation."""
  from pallas_kernels.fused_lm_head.tiles import generation

  backend = norm_backend(backend)
  same = [e for e in entries if e.backend == backend]
  for e in same:
    if device_kind is not None and e.device_kind == device_kind:
      return e
  if backend == "gpu" and (device_kind or compute_capability):
    gen = generation(device_kind, compute_capability)
    for e in same:
      if e.generation is not None and e.generation == gen:
        return e
  return None


def merge_entry(path, entry: Mapping) -> dict:
  """The table at ``path`` (empty if absent) with ``entry`` replacing the one of the same key."""
  parse_entry(entry)
  p = Path(path)
  table = json.loads(p.read_text()) if p.is_file() else {"format": FORMAT, "entries": []}
  parse(table)
  key = dict(entry["key"])
  table["entries"] = [e for e in table["entries"] if dict(e["key"]) != key] + [dict(entry)]
  return table


def dumps(table: Mapping) -> str:
  """JSON with one line per list of numbers (the cost rows stay readable)."""
  text = json.dumps(table, indent=1)
  return re.sub(r"\[\s*([-+0-9.eE,\s]*?)\s*\]",
                lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def write_entry(path, entry: Mapping) -> dict:
  """Merge ``entry`` into the table at ``path`` and write it (creating folders); returns it."""
  table = merge_entry(path, entry)
  p = Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text(dumps(table) + "\n")
  return table
