"""The ablation's fixed parts: the ladder of rungs, its seeded workloads and its configs.

A rung is one EngineConfig: the engine-bench-small preset's settings and budgets with the rung's
three switches (scheduler, logit variant, sparse selection). Everything here is plain data or
cheap to build; :mod:`dllm_jax.bench.ablation` runs it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dllm_jax import presets
from dllm_jax.bench import workloads as W

MODEL_CONFIG = "bench-small"          # presets (dllm_jax/configs/); a path works too
ENGINE_CONFIG = "engine-bench-small"
MiB = 2 ** 20


# The ladder ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rung:
  key: str
  label: str
  scheduler: str
  logits: str
  selection: str | None  # None = dense (sparse caching off)
  reference: bool = False  # a reference point, not a ladder step


RUNGS: tuple[Rung, ...] = (
    Rung("baseline", "baseline (static, full logits, shared)", "static", "full", "shared"),
    Rung("logit", "+ logit budgeting", "static", "auto", "shared"),
    Rung("phase", "+ phase-multiplexed scheduling", "phase", "auto", "shared"),
    Rung("all_on", "+ head-centric selection (all on)", "phase", "auto", "per_head"),
    Rung("dense", "ref: dense (sparse off)", "phase", "auto", None, reference=True),
    Rung("fcfs", "ref: fcfs scheduler, rest on", "fcfs", "auto", "per_head", reference=True),
)
RUNG_KEYS = tuple(r.key for r in RUNGS)


# Workloads -----------------------------------------------------------------------------------

# The LiveBench-like category mix (workloads.LIVEBENCH_MIX: uniform weights, lognormal prompt
# lengths) scaled to bench-small: prompt medians x 0.1 and clipped to [36, 64] tokens, generation
# 64 tokens for the categories that generate 256 at full scale and 32 for those that generate
# 128. Every canvas (prompt + generation) is then 68..128 tokens: one 128-token length bucket,
# so a rung compiles one set of executables. Prompts are random token ids (random weights).
LENGTH_SCALE = 0.1
MIN_PROMPT, MAX_PROMPT = 36, 64
BENCH_MIX: tuple[W.Category, ...] = tuple(
    W.Category(c.name, c.weight, c.median_tokens * LENGTH_SCALE, c.sigma, c.gen_length // 4)
    for c in W.LIVEBENCH_MIX)

# Arrival parameters per workload (seconds; see workloads.py). "burst": 8 requests at one
# instant every 1.75 s (48 requests = 6 bursts over 8.75 s; about 200 generated tokens/s
# offered, near the all-on capacity of a busy 2-core CPU). A configuration that serves a burst in
# less than the period keeps latency near one burst's service time; a slower one accumulates a
# backlog that every later burst waits behind -- the contention regime where tail latency
# separates. Throughput differs only while a configuration is saturated, so the ratios depend on
# the machine's speed: scale the schedule with --time-scale (e.g. 0.5 on a machine twice as
# fast as a busy 2-core CPU; 0 sends everything at t = 0 and measures capacity).
WORKLOAD_PARAMS: dict[str, dict[str, Any]] = {
    "burst": dict(burst_size=8, period_s=1.75, spread_s=0.0),
    "livebench-like": dict(rate=3.0),
    "osc": dict(low_rate=1.0, high_rate=6.0, period_s=8.0),
    "poisson": dict(rate=3.0),
}
DEFAULT_REQUESTS = 48
QUICK_REQUESTS = 8
DEFAULT_REPEATS = 3
# SamplingParams of every request: LLaDA's fixed rule (one token per step, steps = gen_length),
# greedy, block 16; stop_on_eos off so every rung decodes exactly the same number of positions.
BASE_PARAMS = dict(block_length=16, temperature=0.0, stop_on_eos=False)


def workload_params(name: str, quick: bool = False) -> dict[str, Any]:
  """The arrival parameters of workload ``name`` (--quick: bursts of 4 every 2 s)."""
  params = dict(WORKLOAD_PARAMS[name])
  if quick and name == "burst":
    params.update(burst_size=4, period_s=2.0)
  return params


def make_items(name: str, n: int, mcfg, *, seed: int = 0, block_length: int | None = None,
               quick: bool = False) -> list[W.WorkItem]:
  """The ablation's seeded workload ``name`` for the model ``mcfg``."""
  params = workload_params(name, quick)
  content = W.Content(mix=BENCH_MIX, source=W.TokenSource.for_model(mcfg),
                      min_prompt_tokens=MIN_PROMPT, max_prompt_tokens=MAX_PROMPT)
  items = W.make_workload(name, n, seed=seed, content=content, **params)
  if block_length is not None:
    items = [dataclasses.replace(it, params={**it.params, "block_length": block_length})
             for it in items]
  return items


# Configs -------------------------------------------------------------------------------------


def load_model_config(path: str = MODEL_CONFIG):
  """The ablation's model architecture (random weights: bench/random_model.py)."""
  return presets.model_config(path)


def load_engine_dict(path: str = ENGINE_CONFIG) -> dict:
  """The EngineConfig fields every rung starts from (budgets included)."""
  return presets.load_dict(path)


def scaled_budgets(engine: dict, mcfg, memory_budget_mb: float | None) -> tuple[int, int]:
  """(memory_budget_bytes, activation_budget_bytes): the config's, or for another total budget
  the activation budget at the config's share of ``budget - weights``."""
  import jax.numpy as jnp

  from dllm_jax.engine import memory
  m0, a0 = int(engine["memory_budget_bytes"]), int(engine["activation_budget_bytes"])
  if memory_budget_mb is None:
    return m0, a0
  m = int(memory_budget_mb * MiB)
  w = memory.weights_bytes(mcfg, jnp.float32)
  if m <= w:
    raise ValueError(f"--memory-budget-mb {memory_budget_mb}: not above the weights "
                     f"({w / MiB:.2f} MiB)")
  return m, int(a0 * (m - w) / (m0 - w))


def engine_config_for(rung: Rung, engine: dict, *, memory_budget: int, activation_budget: int,
                      overrides: dict | None = None, sparse_overrides: dict | None = None):
  """The rung's EngineConfig: the file's settings with the rung's three switches."""
  from dllm_jax.config import EngineConfig, SparseConfig
  kw = {k: v for k, v in engine.items() if k != "sparse"}
  kw.update(overrides or {})
  kw.update(memory_budget_bytes=memory_budget, activation_budget_bytes=activation_budget,
            scheduler=rung.scheduler, logits=rung.logits)
  sparse = None
  if rung.selection is not None:
    sparse = SparseConfig(**{**engine.get("sparse", {}), **(sparse_overrides or {}),
                             "selection": rung.selection})
  return EngineConfig(sparse=sparse, **kw)


def require_budgeter() -> None:
  try:
    import dllm_jax.sampling.budgeter  # noqa: F401
  except ImportError as e:
    raise ValueError(
        "the ablation enforces memory budgets, whose activation estimates come from "
        f"dllm_jax.sampling.budgeter, which cannot be imported ({e})") from None


# --quick: row caps 2 / 4 (a subset of the full run's step buckets, so a warm compilation cache
# serves it), 8 requests, bursts of 4, one round.
QUICK_OVERRIDES = dict(max_refresh_rows=2, max_reuse_rows=4)

# --sweep: the all-on rung over one knob.
SWEEPS = ("keep_ratio", "block_length", "memory_budget")
SWEEP_GRIDS = dict(keep_ratio=(0.25, 0.5, 0.75, 1.0), block_length=(8, 16, 32),
                   memory_budget=(12.0, 14.0, 16.0, 24.0, 32.0))
