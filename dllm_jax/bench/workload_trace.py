"""Workload traces: JSONL files of :class:`~dllm_jax.bench.workload_items.WorkItem` (replay, save).

One JSON object per line: ``arrival_s``, ``prompt``, ``gen_length``, optional ``params`` (any
SamplingParams field but gen_length) and ``category``. Every bad line is a :class:`TraceError`
naming ``path:line``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

from dllm_jax import jsonfile
from dllm_jax.bench.workload_items import WorkItem
from dllm_jax.config import SAMPLING_FIELDS

# Trace replay --------------------------------------------------------------------------------

TRACE_KEYS = ("arrival_s", "prompt", "gen_length", "params", "category")
# A trace item's params: SamplingParams overrides (its gen_length is the item's own).
PARAM_KEYS = tuple(f for f in SAMPLING_FIELDS if f != "gen_length")


class TraceError(ValueError):
  """A malformed trace line; the message names the file and line."""


def save_trace(items: Sequence[WorkItem], path: str | os.PathLike) -> None:
  """Write ``items`` as JSONL, one :meth:`WorkItem.to_json` object per line."""
  with open(path, "w") as fh:
    for it in items:
      fh.write(json.dumps(it.to_json()) + "\n")


def trace(path: str | os.PathLike) -> list[WorkItem]:
  """Replay a JSONL trace: one JSON object per line (blank lines are skipped) with

  arrival_s (number >= 0, seconds from the start), prompt (a string or a list of token ids >= 0),
  gen_length (integer >= 1), optional params (an object of SamplingParams overrides: any of
  :data:`PARAM_KEYS`) and optional category (a string). Unknown keys are errors (they are
  usually typos). Items are returned sorted by arrival (stable). Raises :class:`TraceError`
  naming ``path:line`` for a bad line and FileNotFoundError for a missing file.
  """
  p = os.fspath(path)
  if not os.path.isfile(p):
    raise FileNotFoundError(f"trace not found: {p}")
  items = []
  with open(p) as fh:
    for lineno, line in enumerate(fh, 1):
      if line.strip():
        items.append(_parse_line(line, f"{p}:{lineno}"))
  if not items:
    raise TraceError(f"{p}: the trace has no requests")
  return sorted(items, key=lambda it: it.arrival_s)


def _parse_line(line: str, where: str) -> WorkItem:
  d = jsonfile.parse_object(line, where, TraceError)
  unknown = sorted(set(d) - set(TRACE_KEYS))
  if unknown:
    raise TraceError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(TRACE_KEYS)})")
  for key in ("arrival_s", "prompt", "gen_length"):
    if key not in d:
      raise TraceError(f"{where}: missing {key!r}")
  return WorkItem(arrival_s=_arrival(d["arrival_s"], where), prompt=_prompt(d["prompt"], where),
                  gen_length=_gen_length(d["gen_length"], where),
                  params=_params(d.get("params", {}), d["gen_length"], where),
                  category=_category(d.get("category", "default"), where))


def _arrival(v, where: str) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
    raise TraceError(f"{where}: arrival_s must be a finite number >= 0, got {v!r}")
  return float(v)


def _prompt(v, where: str) -> str | tuple[int, ...]:
  if isinstance(v, str):
    if not v:
      raise TraceError(f"{where}: prompt is empty")
    return v
  if isinstance(v, list) and v and all(
      isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
    return tuple(v)
  raise TraceError(f"{where}: prompt must be a non-empty string or a non-empty list of token "
                   f"ids >= 0")


def _gen_length(v, where: str) -> int:
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise TraceError(f"{where}: gen_length must be an integer >= 1, got {v!r}")
  return v


def _params(v, gen_length: int, where: str) -> dict:
  if not isinstance(v, dict):
    raise TraceError(f"{where}: params must be an object, got {type(v).__name__}")
  unknown = sorted(set(v) - set(PARAM_KEYS))
  if unknown:
    raise TraceError(f"{where}: params: unknown key {unknown[0]!r} "
                     f"(expected any of {', '.join(PARAM_KEYS)})")
  from dllm_jax.config import SamplingParams
  try:
    SamplingParams(gen_length=gen_length, **v)
  except ValueError as e:
    raise TraceError(f"{where}: params: {e}") from None
  return dict(v)


def _category(v, where: str) -> str:
  if not isinstance(v, str) or not v:
    raise TraceError(f"{where}: category must be a non-empty string, got {v!r}")
  return v
