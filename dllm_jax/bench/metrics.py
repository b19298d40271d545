"""Serving metrics from per-request records and engine statistics.

Definitions (all times in seconds from the start of the run, on one clock):

- **generated tokens** of a request: its generated positions up to and including the first EOS /
  EoT; positions after it (the **EOS fill**, which the engine sets to EOS once the generation is
  decided) are NOT counted; without an EOS all ``gen_length`` positions count. Prompt tokens are
  never counted (cf. Fast-dLLM issue #15).
- **throughput** = sum of generated tokens of finished requests / ``wall_s`` (tokens/s), with
  ``wall_s`` the span from the first scheduled arrival to the last finish unless given.
- **requests/s** = finished requests / ``wall_s``.
- **end-to-end latency** = finish - scheduled arrival (open loop: queueing before the driver could
  submit counts); reported as mean / P50 / P90 / P99 / max.
- **TTFT** (time to first committed token) = the moment the left-contiguous committed prefix of
  the generation first became non-empty - scheduled arrival; P50 / P90 / P99.
- **host overhead per step**: the engine's host-side seconds per step (mean, ms) and their share
  of host + device seconds (%).
- **Refresh / Reuse mix**: rows of each phase per step (mean), and the share of steps that were
  Refresh-only, Reuse-only or mixed.
- **NFE per token**: forward passes (summed over finished requests) / generated tokens.
- **compilations**: new jit compilations during the run.

Percentiles use :func:`percentile`: numpy's ``'linear'`` method (type 7 of Hyndman & Fan, the
numpy default): for sorted x[0..n-1], the q-th percentile is at rank h = (n - 1) * q / 100,
interpolated linearly between x[floor(h)] and x[ceil(h)].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class RequestRecord:
  """One request's timeline and counts (times: seconds from the start of the run).

  arrival_s: scheduled arrival. submit_s: when it was handed to the engine (None if rejected).
  first_token_s: first committed token (None if never). finish_s: finish (None if rejected).
  prompt_tokens: prompt length (tokens; characters for text sent to a server whose tokenizer
  is unknown). gen_length: positions decoded. generated_tokens: counted tokens (up to and
  including the first EOS). eos_fill: positions after the first EOS (not counted).
  nfe: forward passes. finish_reason: "eos" | "length" | "abort" | "rejected" | "error".
  """

  request_id: str
  category: str
  arrival_s: float
  submit_s: float | None
  first_token_s: float | None
  finish_s: float | None
  prompt_tokens: int
  gen_length: int
  generated_tokens: int
  eos_fill: int
  nfe: int
  finish_reason: str
  error: str | None = None

  @property
  def finished(self) -> bool:
    return self.finish_s is not None and self.finish_reason not in ("rejected", "error", "abort")

  @property
  def latency_s(self) -> float | None:
    return None if self.finish_s is None else self.finish_s - self.arrival_s

  @property
  def ttft_s(self) -> float | None:
    return None if self.first_token_s is None else self.first_token_s - self.arrival_s

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def count_generated(token_ids: Sequence[int], eos_ids: Iterable[int]) -> tuple[int, int]:
  """(counted tokens, EOS fill) of a generation: positions up to and including the first EOS
  count; the positions after it are the fill. Without an EOS every position counts."""
  eos = set(int(e) for e in eos_ids)
  for i, t in enumerate(token_ids):
    if int(t) in eos:
      return i + 1, len(token_ids) - i - 1
  return len(token_ids), 0


def percentile(values: Sequence[float], q: float) -> float | None:
  """The q-th percentile (q in [0, 100]) with numpy's 'linear' method; None for no values."""
  if len(values) == 0:
    return None
  return float(np.percentile(np.asarray(values, np.float64), q, method="linear"))


def _summary(values: Sequence[float], qs: Sequence[int]) -> dict:
  out = {"mean": float(np.mean(values)) if len(values) else None}
  for q in qs:
    out[f"p{q}"] = percentile(values, q)
  out["max"] = float(np.max(values)) if len(values) else None
  return out


def _stats_dict(stats: Any) -> dict:
  if stats is None:
    return {}
  if hasattr(stats, "as_dict"):
    return stats.as_dict()
  return dict(stats)


def engine_metrics(stats: Any, compile_count: int | None = None) -> dict:
  """Per-step engine figures from StepStats (or its dict / the difference of two snapshots):
  host ms per step and % of step time, device ms per step, Refresh / Reuse mix, compilations."""
  s = _stats_dict(stats)
  steps = int(s.get("steps", 0))
  host, device = float(s.get("host_seconds", 0.0)), float(s.get("device_seconds", 0.0))
  mix = [tuple(m) for m in s.get("phase_mix", [])]
  out = dict(
      steps=steps,
      host_ms_per_step=1e3 * host / steps if steps else None,
      device_ms_per_step=1e3 * device / steps if steps else None,
      host_pct_of_step=100.0 * host / (host + device) if host + device > 0 else None,
      committed_tokens=int(s.get("committed_tokens", 0)),
      transfers=int(s.get("transfers", 0)),
      select_rows=int(s.get("select_rows", 0)),
      tokens=int(s.get("tokens", 0)),
      padding_waste=(s["bucket_tokens"] / s["tokens"]) if s.get("tokens") else None,
      compilations=compile_count)
  out.update(phase_mix_summary(mix, s.get("refresh_rows"), s.get("reuse_rows"), steps))
  return out


def phase_mix_summary(mix: Sequence[tuple[int, int]], refresh_rows: int | None = None,
                      reuse_rows: int | None = None, steps: int | None = None) -> dict:
  """Refresh / Reuse rows per step (mean) and the share of Refresh-only / Reuse-only / mixed
  steps, from the per-step (refresh rows, reuse rows) list (totals fall back to the list)."""
  n = steps or len(mix)
  rf = refresh_rows if refresh_rows is not None else sum(r for r, _ in mix)
  ru = reuse_rows if reuse_rows is not None else sum(u for _, u in mix)
  k = len(mix)
  return dict(
      refresh_rows=int(rf), reuse_rows=int(ru),
      refresh_rows_per_step=rf / n if n else None,
      reuse_rows_per_step=ru / n if n else None,
      reuse_share_of_rows=ru / (rf + ru) if rf + ru else None,
      refresh_only_steps=sum(1 for r, u in mix if r and not u) / k if k else None,
      reuse_only_steps=sum(1 for r, u in mix if u and not r) / k if k else None,
      mixed_steps=sum(1 for r, u in mix if r and u) / k if k else None)


def compute_metrics(records: Sequence[RequestRecord], *, wall_s: float | None = None,
                    stats: Any = None, compile_count: int | None = None) -> dict:
  """All serving metrics of a run (JSON-able; see the module docstring for definitions).

  records: every request of the run (rejected ones are counted, not timed).
  wall_s: the run's duration (s); default last finish - first scheduled arrival.
  stats / compile_count: the run's engine StepStats (difference) and new compilations, if any.
  """
  done = [r for r in records if r.finished]
  if wall_s is None:
    wall_s = (max(r.finish_s for r in done) - min(r.arrival_s for r in records)) if done else 0.0
  tokens = sum(r.generated_tokens for r in done)
  nfe = sum(r.nfe for r in done)
  lat = [r.latency_s for r in done]
  ttft = [r.ttft_s for r in done if r.ttft_s is not None]
  out = dict(
      requests=len(records), finished=len(done),
      rejected=sum(1 for r in records if r.finish_reason in ("rejected", "error")),
      wall_s=float(wall_s),
      generated_tokens=int(tokens),
      eos_fill_tokens=int(sum(r.eos_fill for r in done)),
      throughput_tok_s=tokens / wall_s if wall_s > 0 else None,
      requests_per_s=len(done) / wall_s if wall_s > 0 else None,
      latency_s=_summary(lat, (50, 90, 99)),
      ttft_s=_summary(ttft, (50, 90, 99)),
      nfe_per_token=nfe / tokens if tokens else None,
      per_category=_per_category(done))
  if stats is not None or compile_count is not None:
    out["engine"] = engine_metrics(stats, compile_count)
    out["compilations"] = compile_count
  return out


def _per_category(done: Sequence[RequestRecord]) -> dict:
  cats: dict[str, list[RequestRecord]] = {}
  for r in done:
    cats.setdefault(r.category, []).append(r)
  return {c: dict(requests=len(rs), generated_tokens=sum(r.generated_tokens for r in rs),
                  latency_p50_s=percentile([r.latency_s for r in rs], 50),
                  latency_p99_s=percentile([r.latency_s for r in rs], 99))
          for c, rs in sorted(cats.items())}


def stats_delta(before: Mapping, after: Mapping) -> dict:
  """The difference of two StepStats snapshots (dicts): counters subtract, phase_mix keeps the
  steps taken after ``before``."""
  out = {}
  new_steps = after.get("steps", 0) - before.get("steps", 0)
  for k, v in after.items():
    if k == "phase_mix":  # the engine keeps a bounded history: the newest entries are last
      out[k] = [tuple(m) for m in list(v)[max(0, len(v) - new_steps):]]
    elif k.endswith("_peak"):  # a running maximum: the run's own peak is not recoverable
      out[k] = v
    elif isinstance(v, Mapping):
      old = before.get(k, {})
      out[k] = {key: n - old.get(key, 0) for key, n in v.items() if n - old.get(key, 0)}
    else:
      out[k] = v - before.get(k, 0)
  return out
