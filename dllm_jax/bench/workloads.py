"""Open-loop, seeded workload generators: LiveBench-like, Burst, OSC, Poisson, trace replay.

A workload is a list of :class:`WorkItem` sorted by arrival time (seconds from the start of the
run). Generators are *open loop*: arrival times never depend on how fast the engine answers.
Every generator is a pure function of its arguments and ``seed`` (``numpy.random.Generator``);
the arrival process and the request content draw from two independent child streams of the
seed, so changing e.g. the rate does not change the prompts.

Two independent parts make a request stream:

- the **arrival process** (this module's generators): ``poisson`` (constant rate), ``burst``
  (``burst_size`` requests at once every ``period_s``, or spread over a short high-rate spike),
  ``osc`` (Poisson whose rate oscillates between ``low_rate`` and ``high_rate``),
  ``livebench_like`` (Poisson at ``rate``, LiveBench-like content), ``trace`` (JSONL replay);
- the **content** (:class:`Content`): a category mix (:class:`Category`: weight, lognormal
  prompt length in tokens, generation length), a :class:`PromptSource` that cuts prompts of a
  given token length from local text (or draws random token ids for random-weight models), and
  SamplingParams overrides.

The paper names its workloads (LiveBench, Burst, OSC) without defining them: these are labelled
"-like" and every parameter is explicit. Burst and OSC use the LiveBench-like mix by default;
Poisson defaults to one fixed-length category so that it isolates the arrival process.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from dllm_jax.bench.workload_items import (  # noqa: F401 (re-exported: one import for users)
    CATEGORIES, FIXED_MIX, LIVEBENCH_MIX, Category, Content, PromptSource, TextSource,
    TokenSource, WorkItem, sample_content)
from dllm_jax.bench.workload_trace import (  # noqa: F401 (re-export)
    PARAM_KEYS, TRACE_KEYS, TraceError, save_trace, trace)

def _assemble(arrivals: np.ndarray, rng: np.random.Generator, content: Content) -> list[WorkItem]:
  bodies = sample_content(rng, len(arrivals), content)
  items = [WorkItem(arrival_s=float(t), prompt=p, gen_length=g, params=dict(content.params),
                    category=c) for t, (c, p, g) in zip(arrivals, bodies)]
  return sorted(items, key=lambda it: it.arrival_s)


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
  """(arrivals, content) generators: independent child streams of ``seed``."""
  a, c = np.random.SeedSequence(seed).spawn(2)
  return np.random.default_rng(a), np.random.default_rng(c)


def _check_n(n: int) -> None:
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"n: expected a positive number of requests, got {n!r}")


def _check_rate(name: str, rate: float) -> None:
  if not rate > 0:
    raise ValueError(f"{name}: expected a rate > 0 requests/s, got {rate!r}")


# Arrival processes ---------------------------------------------------------------------------


def poisson_arrivals(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
  """``n`` arrival times (s) of a Poisson process of ``rate`` requests/s; the first at t = 0
  (as a benchmark client sends its first request at once), then exponential gaps of mean
  1/rate. ``rate = inf`` puts every arrival at 0 (an offline batch)."""
  if math.isinf(rate):
    return np.zeros(n)
  gaps = rng.exponential(1.0 / rate, size=n - 1)
  return np.concatenate([[0.0], np.cumsum(gaps)])


def poisson(n: int, *, rate: float = 2.0, seed: int = 0,
            content: Content | None = None) -> list[WorkItem]:
  """Constant-rate Poisson arrivals.

  n: requests. rate: mean arrivals per second (inf = all at t = 0); the first arrives at t = 0
  and the mean gap is 1/rate s, so (n - 1) / last arrival -> rate. content: default one
  fixed-length category (:data:`FIXED_MIX`: 128 prompt tokens, 128 generated).
  """
  _check_n(n)
  _check_rate("rate", rate)
  ra, rc = _streams(seed)
  return _assemble(poisson_arrivals(ra, n, rate), rc, content or Content(mix=FIXED_MIX))


def livebench_like(n: int, *, rate: float = 2.0, seed: int = 0,
                   content: Content | None = None) -> list[WorkItem]:
  """LiveBench-like: Poisson arrivals at ``rate`` requests/s with the LiveBench-like prompt mix.

  The content defaults to :data:`LIVEBENCH_MIX` (six categories, uniform weights, per-category
  lognormal prompt lengths; an assumption documented there) with prompts cut from the held-out
  corpus. Pass ``Content(length_scale=..., max_prompt_tokens=...)`` to fit a small model.
  """
  _check_n(n)
  _check_rate("rate", rate)
  ra, rc = _streams(seed)
  return _assemble(poisson_arrivals(ra, n, rate), rc, content or Content())


def burst_arrivals(rng: np.random.Generator, n: int, burst_size: int, period_s: float,
                   spread_s: float) -> np.ndarray:
  """Burst k (k = 0, 1, ...) holds requests k*burst_size .. (k+1)*burst_size - 1 (the last one
  may be partial) and starts at k * period_s. spread_s = 0: all arrive at that instant;
  spread_s > 0: they arrive uniformly at random within [start, start + spread_s) -- a short
  spike of about burst_size / spread_s requests/s."""
  k = np.arange(n) // burst_size
  offsets = rng.uniform(0.0, spread_s, size=n) if spread_s > 0 else np.zeros(n)
  return k * period_s + offsets


def burst(n: int, *, burst_size: int = 8, period_s: float = 10.0, spread_s: float = 0.0,
          seed: int = 0, content: Content | None = None) -> list[WorkItem]:
  """Bursty arrivals: ``burst_size`` requests every ``period_s`` seconds.

  spread_s: 0 (default) sends each burst at one instant; > 0 spreads it uniformly over the
  first ``spread_s`` seconds of its period (a high-rate spike). Mean rate = burst_size /
  period_s requests/s. content: default the LiveBench-like mix.
  """
  _check_n(n)
  if isinstance(burst_size, bool) or not isinstance(burst_size, int) or burst_size < 1:
    raise ValueError(f"burst_size: expected a positive integer, got {burst_size!r}")
  if not period_s > 0:
    raise ValueError(f"period_s: expected > 0 seconds, got {period_s!r}")
  if not 0 <= spread_s <= period_s:
    raise ValueError(f"spread_s: expected 0 <= spread_s <= period_s, got {spread_s!r}")
  ra, rc = _streams(seed)
  return _assemble(burst_arrivals(ra, n, burst_size, period_s, spread_s), rc,
                   content or Content())


OSC_SHAPES = ("square", "sine")


def osc_rate(t, low_rate: float, high_rate: float, period_s: float, shape: str = "square",
             high_fraction: float = 0.5):
  """The OSC rate (requests/s) at time ``t`` (s; scalar or array). Each period starts low.

  square: ``low_rate`` for the first (1 - high_fraction) of each period, ``high_rate`` for the
  rest. sine: low + (high - low) * (1 - cos(2 pi t / period)) / 2 (low at 0, high at period/2).
  """
  phase = np.mod(t, period_s) / period_s
  if shape == "square":
    return np.where(phase >= 1.0 - high_fraction, high_rate, low_rate)
  return low_rate + (high_rate - low_rate) * (1.0 - np.cos(2 * np.pi * phase)) / 2


def osc_arrivals(rng: np.random.Generator, n: int, low_rate: float, high_rate: float,
                 period_s: float, shape: str, high_fraction: float) -> np.ndarray:
  """``n`` arrivals of the non-homogeneous Poisson process of :func:`osc_rate`, by thinning
  (Lewis-Shedler): candidates at rate max(low, high), each kept with probability
  rate(t) / max rate."""
  peak = max(low_rate, high_rate)
  out, t = [], 0.0
  while sum(len(o) for o in out) < n:
    m = max(64, 2 * n)  # candidates per batch, vectorised
    cand = t + np.cumsum(rng.exponential(1.0 / peak, size=m))
    keep = rng.uniform(size=m) * peak < osc_rate(cand, low_rate, high_rate, period_s, shape,
                                                 high_fraction)
    out.append(cand[keep])
    t = cand[-1]
  return np.concatenate(out)[:n]


def osc(n: int, *, low_rate: float = 0.5, high_rate: float = 4.0, period_s: float = 20.0,
        shape: str = "square", high_fraction: float = 0.5, seed: int = 0,
        content: Content | None = None) -> list[WorkItem]:
  """Oscillating load: Poisson arrivals whose rate alternates between ``low_rate`` and
  ``high_rate`` (requests/s) with period ``period_s`` seconds (see :func:`osc_rate`; square
  wave by default, high for the last ``high_fraction`` of each period). The mean rate is
  low + (high - low) * high_fraction for the square wave, (low + high) / 2 for the sine.
  content: default the LiveBench-like mix.
  """
  _check_n(n)
  _check_rate("low_rate", low_rate)
  _check_rate("high_rate", high_rate)
  if not period_s > 0:
    raise ValueError(f"period_s: expected > 0 seconds, got {period_s!r}")
  if shape not in OSC_SHAPES:
    raise ValueError(f"shape: expected one of {OSC_SHAPES}, got {shape!r}")
  if not 0 < high_fraction < 1:
    raise ValueError(f"high_fraction: expected in (0, 1), got {high_fraction!r}")
  ra, rc = _streams(seed)
  arrivals = osc_arrivals(ra, n, low_rate, high_rate, period_s, shape, high_fraction)
  return _assemble(arrivals, rc, content or Content())


# Dispatch (CLI) ------------------------------------------------------------------------------

WORKLOADS = ("livebench-like", "burst", "osc", "poisson", "trace")


def make_workload(name: str, n: int, *, seed: int = 0, content: Content | None = None,
                  trace_path: str | None = None, **kw: Any) -> list[WorkItem]:
  """Build workload ``name`` (one of :data:`WORKLOADS`) from keyword arguments of its
  generator; ``trace`` replays ``trace_path`` and keeps its first ``n`` items."""
  if name == "trace":
    if not trace_path:
      raise ValueError("workload 'trace' needs a trace file (--trace PATH)")
    return trace(trace_path)[:n]
  fns = {"livebench-like": livebench_like, "burst": burst, "osc": osc, "poisson": poisson}
  if name not in fns:
    raise ValueError(f"workload: expected one of {WORKLOADS}, got {name!r}")
  return fns[name](n, seed=seed, content=content, **kw)


def summarize(items: Sequence[WorkItem]) -> dict:
  """Counts and spans of a workload (JSON-able): requests, arrival span, per-category counts,
  mean prompt length (tokens for id prompts, characters for text)."""
  cats: dict[str, int] = {}
  for it in items:
    cats[it.category] = cats.get(it.category, 0) + 1
  lens = [len(it.prompt) for it in items]
  return dict(requests=len(items), first_arrival_s=items[0].arrival_s if items else None,
              last_arrival_s=items[-1].arrival_s if items else None, categories=cats,
              mean_prompt_len=float(np.mean(lens)) if lens else None,
              mean_gen_length=float(np.mean([it.gen_length for it in items])) if items else None)
