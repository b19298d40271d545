"""The ablation ladder: one seeded workload, one memory budget, each technique switched on in turn.

``dllm-jax ablate --workload burst --out results/ablation-burst`` runs, on the bench-small model
(``configs/bench-small.json``, random weights from ``init_model(cfg, seed=0)``, float32) and the
engine settings of ``configs/engine-bench-small.json`` (the SAME ``memory_budget_bytes`` and
``activation_budget_bytes`` for every rung, so weights + KV pool + activation peak fit one budget):

==========  ==================================  =========  ===========  =================
rung        what it adds                        scheduler  logits       sparse selection
==========  ==================================  =========  ===========  =================
baseline    Sparse-dLLM-style serving           static     full         shared
logit       + logit budgeting                   static     auto         shared
phase       + continuous phase multiplexing     phase      auto         shared
all_on      + head-centric selection (all on)   phase      auto         per_head
dense       reference: no sparse cache          phase      auto         (off)
fcfs        reference: token-budget FCFS        fcfs       auto         per_head
==========  ==================================  =========  ===========  =================

(DESIGN.md section 3 "Every optimization is a switch"; the baseline is decoding-semantics.md
section 6.2's hypothesis.) Each rung builds an ``LLM`` with its EngineConfig on the shared
model, compiles every step bucket the workload can reach (:func:`warmup`, so compile time is
excluded; the rungs share one ``Runner``, so an executable is compiled once for all rungs that
use it), then replays the workload open loop with :func:`dllm_jax.bench.driver.run_workload`.
``--repeats`` rounds (default 3) are interleaved -- every rung once, then again -- so slow drifts
of a shared machine's load hit every rung alike; the table reports per-metric medians.

Outputs in ``--out DIR``: ``ablation.json`` (every rung's full driver result, plus the configs,
the budgets, the machine, the load average around each rung, and each rung's observed step
shapes), ``throughput.png``, ``latency_cdf.png``, ``memory.png`` (weights / KV pool /
activation peak per rung, against the budget), ``phase_mix.png`` (Refresh vs Reuse rows per
step of the all-on rung); a markdown table on stdout (also ``table.md``).
``--sweep {keep_ratio,block_length,memory_budget}`` runs the all-on configuration over a small
grid instead (``sweep_<name>.json`` / ``sweep_<name>.png``).

Memory accounting: the KV pool is sized by the engine as ``memory_budget - weights -
activation_budget`` (engine/memory.py), identical for every rung; the scheduler runs only steps
whose analytic activation estimate fits ``activation_budget_bytes``. The reported activation
peak of a rung is the largest analytic estimate over the steps it actually ran (a bound, not a
measurement: XLA:CPU's buffer assignment differs). With ``--memory-budget-mb`` the activation
budget keeps its share of ``budget - weights`` from the config file.

Measurements on a shared CPU are noisy: the JSON records ``os.getloadavg()`` before and after
each rung and the process CPU seconds of the run next to its wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from dllm_jax import presets
from dllm_jax.bench import workloads as W

MODEL_CONFIG = "bench-small"          # presets (dllm_jax/configs/); a path works too
ENGINE_CONFIG = "engine-bench-small"
RESULT_VERSION = 1
MODEL_SEED = 0
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
LADDER = tuple(r.key for r in RUNGS if not r.reference)


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


def make_items(name: str, n: int, mcfg, *, seed: int = 0, block_length: int | None = None,
               quick: bool = False) -> list[W.WorkItem]:
  """The ablation's seeded workload ``name`` for the model ``mcfg``."""
  params = dict(WORKLOAD_PARAMS[name])
  if quick and name == "burst":
    params.update(burst_size=4, period_s=2.0)
  content = W.Content(mix=BENCH_MIX, source=W.TokenSource.for_model(mcfg),
                      min_prompt_tokens=MIN_PROMPT, max_prompt_tokens=MAX_PROMPT)
  items = W.make_workload(name, n, seed=seed, content=content, **params)
  if block_length is not None:
    items = [dataclasses.replace(it, params={**it.params, "block_length": block_length})
             for it in items]
  return items


# Configs -------------------------------------------------------------------------------------


def load_model_config(path: str = MODEL_CONFIG):
  return presets.model_config(path)


def load_engine_dict(path: str = ENGINE_CONFIG) -> dict:
  return presets.load_dict(path)


def build_model(mcfg):
  import jax.numpy as jnp

  from dllm_jax.model.transformer import init_model
  return init_model(mcfg, param_dtype=jnp.float32, seed=MODEL_SEED)


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
  from dllm_jax.config import SparseConfig
  from dllm_jax.config import EngineConfig
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


# Warm-up -------------------------------------------------------------------------------------


def warmup(core, lengths: Sequence[int]) -> tuple[int, int]:
  """Compile every bucket of the engine's own grid that canvases of these lengths can reach
  (``EngineCore.warmup("full", lengths=...)``). Returns (new compilations, buckets)."""
  shapes = core.warmup_shapes("full", lengths)
  return core.warmup("full", lengths=lengths), len(shapes)


def step_record(core) -> dict:
  """What the engine's telemetry says about the timed run: each bucket's steps and activation
  estimate, the KV pages and requests in use at their peak, and the padding waste."""
  st = core.stats
  counts = st.shape_counts
  est = {s: core.step_activation_bytes(s) for s in counts}
  return dict(activation_peak_bytes=int(max(est.values(), default=0)),
              kv_pages_peak=int(st.kv_pages_peak), running_peak=int(st.running_peak),
              padding_waste=st.bucket_tokens / st.tokens if st.tokens else None,
              step_shapes=[dict(tokens=s.tokens, length=s.length, steps=counts[s],
                                activation_bytes=int(est[s]))
                           for s in sorted(counts, key=lambda s: (s.tokens, s.length))])


@dataclasses.dataclass
class Prepared:
  """A rung's warmed-up engine, ready for timed runs."""

  rung: Rung
  llm: Any
  engine_config: Any
  warmup_compiles: int
  warmup_s: float
  warmup_shapes: int


def prepare_rung(rung: Rung, model, engine_cfg, items: Sequence[W.WorkItem], *,
                 base_params: dict, runner=None, log=print) -> Prepared:
  """Build the rung's ``LLM`` and compile every step bucket the workload can reach.

  runner: a ``Runner`` of the same model to use instead of the engine's own: the rungs of one
  ablation share one, so an executable compiled for one rung (same logit plan and bucket) is
  not traced and compiled again for the next. Each rung reports the compilations its warm-up
  and its runs triggered.
  """
  from dllm_jax.engine.engine import LLM
  llm = LLM(model, engine_config=engine_cfg)
  core = llm.core
  if runner is not None:
    core.runner = runner
  lengths = [len(it.prompt) + it.gen_length for it in items]
  t0 = time.perf_counter()
  compiles, buckets = warmup(core, lengths)
  warm_s = time.perf_counter() - t0
  log(f"  [{rung.key}] warm-up: {compiles} new executables in {warm_s:.1f} s; "
      f"KV pool {core.pool_cfg.num_pages} pages")
  return Prepared(rung, llm, engine_cfg, compiles, warm_s, buckets)


def timed_run(prep: Prepared, items: Sequence[W.WorkItem], *, base_params: dict,
              workload: str, progress: bool = False, log=print) -> dict:
  """One open-loop replay of ``items`` on a prepared rung: the driver's result plus an
  ``ablation`` block (process CPU seconds, load average, observed step shapes, pages)."""
  from dllm_jax.bench.driver import run_workload
  llm, rung = prep.llm, prep.rung
  load0 = _loadavg()
  llm.core.stats = type(llm.core.stats)()  # this run's telemetry only
  cpu0 = time.process_time()
  result = run_workload(llm, items, progress=progress, base_params=base_params,
                        workload=workload)
  observed = step_record(llm.core)
  cpu_s = time.process_time() - cpu0
  llm._outputs.clear()  # the LLM keeps every step() result (see tests/test_engine.py)
  result["ablation"] = dict(
      rung=dataclasses.asdict(rung), warmup_compiles=prep.warmup_compiles,
      warmup_s=prep.warmup_s, warmup_shapes=prep.warmup_shapes, cpu_s=cpu_s,
      loadavg_before=load0, loadavg_after=_loadavg(), **observed)
  m = result["metrics"]
  log(f"  [{rung.key}] {m['throughput_tok_s']:.1f} tok/s, P50 {m['latency_s']['p50']:.2f} s, "
      f"P99 {m['latency_s']['p99']:.2f} s, {m['engine']['steps']} steps, "
      f"{m['compilations']} compilations during the run, cpu {cpu_s:.1f} s, "
      f"load {load0[0] if load0 else float('nan'):.1f}")
  return result


MEDIAN_KEYS = ("throughput_tok_s", "p50_s", "p90_s", "p99_s", "ttft_p99_s", "wall_s", "cpu_s")


def _round_figures(res: dict) -> dict:
  m = res["metrics"]
  return dict(throughput_tok_s=m["throughput_tok_s"], p50_s=m["latency_s"]["p50"],
              p90_s=m["latency_s"]["p90"], p99_s=m["latency_s"]["p99"],
              ttft_p99_s=m["ttft_s"]["p99"], wall_s=m["wall_s"], cpu_s=res["ablation"]["cpu_s"],
              steps=m["engine"]["steps"], loadavg_before=res["ablation"]["loadavg_before"])


def combine_rounds(results: list[dict]) -> dict:
  """One rung's repeated runs: the round of median throughput is the representative (its full
  driver result), ``rounds`` lists every round's figures and request records, and ``median``
  holds the per-metric medians the summary table reports."""
  tp = [r["metrics"]["throughput_tok_s"] or 0.0 for r in results]
  rep = dict(results[int(np.argsort(tp)[(len(tp) - 1) // 2])])
  figs = [_round_figures(r) for r in results]
  rep["rounds"] = [dict(figs[i], requests=r["requests"]) for i, r in enumerate(results)]
  rep["median"] = {k: float(np.median([f[k] for f in figs])) if all(
      f[k] is not None for f in figs) else None for k in MEDIAN_KEYS}
  return rep


def _loadavg():
  try:
    return list(os.getloadavg())
  except OSError:
    return None


# Summaries -----------------------------------------------------------------------------------


def _figures(r: dict) -> dict:
  """A rung's reported figures: medians over its rounds (or its one run)."""
  med = r.get("median")
  if med is not None:
    return med
  f = _round_figures(r)
  return {k: f[k] for k in MEDIAN_KEYS}


def summary_rows(rungs: dict) -> list[dict]:
  """One row per rung: throughput and latency (medians over rounds), speed-ups vs the baseline
  and vs the previous ladder rung, memory, and the engine's step mix."""
  base = rungs.get("baseline")
  bf = _figures(base) if base else None
  rows, prev = [], None
  for key in RUNG_KEYS:
    if key not in rungs:
      continue
    r = rungs[key]
    f, m, mem, ab = _figures(r), r["metrics"], r["memory"], r["ablation"]
    tokens = m["generated_tokens"]
    row = dict(key=key, label=ab["rung"]["label"], reference=ab["rung"]["reference"],
               rounds=len(r.get("rounds", [None])), **f,
               tokens=tokens, finished=m["finished"], requests=m["requests"],
               steps=m["engine"]["steps"], compilations=m["compilations"],
               kv_pages_peak=ab["kv_pages_peak"], kv_pages_pool=mem["kv_pages"] - 1,
               activation_peak_bytes=ab["activation_peak_bytes"],
               running_peak=ab["running_peak"],
               refresh_rows_per_step=m["engine"]["refresh_rows_per_step"],
               reuse_rows_per_step=m["engine"]["reuse_rows_per_step"])
    if bf:
      row["speedup_vs_baseline"] = _ratio(f["throughput_tok_s"], bf["throughput_tok_s"])
      row["p99_reduction_vs_baseline"] = _ratio(bf["p99_s"], f["p99_s"])
      row["cpu_speedup_vs_baseline"] = _ratio(
          bf["cpu_s"] / max(base["metrics"]["generated_tokens"], 1), f["cpu_s"] / max(tokens, 1))
    if not row["reference"] and prev is not None:
      pf = _figures(rungs[prev])
      row["speedup_vs_previous"] = _ratio(f["throughput_tok_s"], pf["throughput_tok_s"])
      row["p99_reduction_vs_previous"] = _ratio(pf["p99_s"], f["p99_s"])
    if not row["reference"]:
      prev = key
    rows.append(row)
  return rows


def _ratio(a, b):
  return None if a is None or b is None or b == 0 else a / b


def markdown_table(rows: list[dict]) -> str:
  f = lambda v, fmt: "-" if v is None else format(v, fmt)
  out = ["| rung | tokens/s | speed-up vs baseline | P50 latency (s) | P99 latency (s) | "
         "P99 reduction vs baseline | KV pages (peak / pool) | activation peak (MiB) |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    out.append(
        f"| {r['label']} | {f(r['throughput_tok_s'], '.1f')} | "
        f"{f(r.get('speedup_vs_baseline'), '.2f')}x | {f(r['p50_s'], '.2f')} | "
        f"{f(r['p99_s'], '.2f')} | {f(r.get('p99_reduction_vs_baseline'), '.2f')}x | "
        f"{r['kv_pages_peak']} / {r['kv_pages_pool']} | "
        f"{r['activation_peak_bytes'] / MiB:.2f} |")
  return "\n".join(out)


# Plots ---------------------------------------------------------------------------------------

COLORS = dict(baseline="#9e9e9e", logit="#64b5f6", phase="#1e88e5", all_on="#0d47a1",
              dense="#ffb74d", fcfs="#a1887f")


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_throughput(data: dict, path: str) -> None:
  """Throughput bars (speed-up vs baseline on each bar) and P99 latency bars."""
  plt = _plt()
  rows = summary_rows(data["rungs"])
  labels = [r["label"].replace(" (", "\n(").replace(", rest", ",\nrest") for r in rows]
  x = np.arange(len(rows))
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.6))
  cols = [COLORS.get(r["key"], "#777") for r in rows]
  tp = [r["throughput_tok_s"] or 0 for r in rows]
  a1.bar(x, tp, color=cols, hatch=None)
  for i, r in enumerate(rows):
    s = r.get("speedup_vs_baseline")
    a1.text(i, tp[i], f"{s:.2f}x" if s else "", ha="center", va="bottom", fontsize=9)
  a1.set_ylabel("generated tokens / s")
  a1.set_title("Throughput")
  p99 = [r["p99_s"] or 0 for r in rows]
  a2.bar(x, p99, color=cols)
  for i, r in enumerate(rows):
    s = r.get("p99_reduction_vs_baseline")
    a2.text(i, p99[i], f"{s:.2f}x lower" if s and r["key"] != "baseline" else "",
            ha="center", va="bottom", fontsize=9)
  a2.set_ylabel("P99 end-to-end latency (s)")
  a2.set_title("Tail latency")
  for a in (a1, a2):
    a.set_xticks(x)
    a.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    for i, r in enumerate(rows):
      if r["reference"]:
        a.get_xticklabels()[i].set_color("#555")
  fig.suptitle(_title(data), fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _title(data: dict) -> str:
  wl, b = data["workload"], data["budgets"]
  ts = wl.get("time_scale", 1.0)
  sched = "" if ts == 1.0 else (", all at t=0" if ts == 0 else f", arrivals x{ts:g}")
  return (f"{wl['name']} workload{sched}, {wl['summary']['requests']} requests, "
          f"{data.get('repeats', 1)} rounds (medians), bench-small model, "
          f"equal memory budget {b['memory_budget_bytes'] / MiB:.1f} MiB "
          f"(activation {b['activation_budget_bytes'] / MiB:.1f} MiB) -- "
          f"{data['machine']['backend']} x{data['machine']['cpus_available']}")


def latencies(result: dict) -> np.ndarray:
  """End-to-end latencies of a rung's finished requests, pooled over its rounds."""
  runs = [rd["requests"] for rd in result.get("rounds", [])] or [result["requests"]]
  return np.sort([q["finish_s"] - q["arrival_s"] for reqs in runs for q in reqs
                  if q["finish_s"] is not None])


def plot_latency_cdf(data: dict, path: str) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for key in RUNG_KEYS:
    if key not in data["rungs"]:
      continue
    r = data["rungs"][key]
    lat = latencies(r)
    if not len(lat):
      continue
    y = np.arange(1, len(lat) + 1) / len(lat)
    ax.step(lat, y, where="post", color=COLORS.get(key), label=r["ablation"]["rung"]["label"],
            linestyle="--" if r["ablation"]["rung"]["reference"] else "-")
  ax.set_xlabel("end-to-end latency (s)" + (" -- all rounds pooled" if any(
      "rounds" in r for r in data["rungs"].values()) else ""))
  ax.set_ylabel("fraction of requests")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  ax.set_title("Latency CDF", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_memory(data: dict, path: str) -> None:
  """Stacked weights / KV pool / activation peak (observed steps' estimate) per rung, with the
  KV pages actually in use and the activation budget and memory budget as lines."""
  plt = _plt()
  keys = [k for k in RUNG_KEYS if k in data["rungs"]]
  fig, ax = plt.subplots(figsize=(8, 4.5))
  x = np.arange(len(keys))
  w = np.array([data["rungs"][k]["memory"]["weights_bytes"] for k in keys]) / MiB
  pool = np.array([data["rungs"][k]["memory"]["kv_pool_bytes"] for k in keys]) / MiB
  page = np.array([data["rungs"][k]["memory"]["page_bytes"] for k in keys]) / MiB
  used = np.array([data["rungs"][k]["ablation"]["kv_pages_peak"] for k in keys]) * page
  act = np.array([data["rungs"][k]["ablation"]["activation_peak_bytes"] for k in keys]) / MiB
  ax.bar(x, w, color="#78909c", label="weights")
  ax.bar(x, pool, bottom=w, color="#c5e1a5", label="KV pool (reserved)")
  ax.bar(x, used, bottom=w, color="#7cb342", width=0.4, label="KV pages in use (peak)")
  ax.bar(x, act, bottom=w + pool, color="#ef6c00", label="activation peak (largest step run)")
  b = data["budgets"]
  ax.axhline(b["memory_budget_bytes"] / MiB, color="k", linestyle="--", linewidth=1,
             label="memory budget")
  ax.set_xticks(x)
  ax.set_xticklabels([data["rungs"][k]["ablation"]["rung"]["label"].split(" (")[0]
                      for k in keys], rotation=25, ha="right", fontsize=8)
  ax.set_ylabel("MiB")
  ax.set_title("Memory by category at an equal budget (analytic activation estimate)",
               fontsize=10)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_phase_mix(data: dict, path: str, key: str = "all_on") -> None:
  plt = _plt()
  if key not in data["rungs"]:
    key = next(iter(data["rungs"]))
  r = data["rungs"][key]
  mix = np.asarray(r["engine_stats"]["phase_mix"], dtype=float).reshape(-1, 2)
  fig, ax = plt.subplots(figsize=(9, 3.6))
  steps = np.arange(len(mix))
  ax.stackplot(steps, mix[:, 0], mix[:, 1], labels=["Refresh rows", "Reuse rows"],
               colors=["#ef6c00", "#1e88e5"], step="post", alpha=0.85)
  ax.set_xlabel("engine step")
  ax.set_ylabel("rows in the step")
  ax.set_title(f"Phase mix per step: {r['ablation']['rung']['label']}", fontsize=10)
  ax.legend(fontsize=8, loc="upper right")
  ax.margins(x=0)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def make_plots(data: dict, out: str) -> list[str]:
  paths = []
  for name, fn in (("throughput.png", plot_throughput), ("latency_cdf.png", plot_latency_cdf),
                   ("memory.png", plot_memory), ("phase_mix.png", plot_phase_mix)):
    p = os.path.join(out, name)
    fn(data, p)
    paths.append(p)
  return paths


# Sweeps --------------------------------------------------------------------------------------

SWEEPS = ("keep_ratio", "block_length", "memory_budget")
SWEEP_GRIDS = dict(keep_ratio=(0.25, 0.5, 0.75, 1.0), block_length=(8, 16, 32),
                   memory_budget=(12.0, 14.0, 16.0, 24.0, 32.0))


def plot_sweep(sweep: dict, path: str) -> None:
  plt = _plt()
  xs = [p["value"] for p in sweep["points"]]
  tp = [p["median"]["throughput_tok_s"] for p in sweep["points"]]
  p99 = [p["median"]["p99_s"] for p in sweep["points"]]
  fig, a1 = plt.subplots(figsize=(6.5, 4))
  a1.plot(xs, tp, "o-", color="#0d47a1", label="tokens/s")
  a1.set_xlabel(sweep["name"] + (" (MiB)" if sweep["name"] == "memory_budget" else ""))
  a1.set_ylabel("generated tokens / s", color="#0d47a1")
  a2 = a1.twinx()
  a2.plot(xs, p99, "s--", color="#ef6c00", label="P99 latency")
  a2.set_ylabel("P99 latency (s)", color="#ef6c00")
  a1.set_ylim(bottom=0)
  a2.set_ylim(bottom=0)
  a1.set_title(f"all-on sweep over {sweep['name']} ({sweep['workload']['name']})", fontsize=10)
  a1.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# CLI -----------------------------------------------------------------------------------------


def add_args(p: argparse.ArgumentParser) -> None:
  """Flags of ``dllm-jax ablate``."""
  p.add_argument("--workload", choices=tuple(WORKLOAD_PARAMS), default="burst")
  p.add_argument("--out", required=True, help="output directory (created)")
  p.add_argument("--requests", type=int, default=None,
                 help=f"requests (default {DEFAULT_REQUESTS}; --quick {QUICK_REQUESTS})")
  p.add_argument("--memory-budget-mb", type=float, default=None,
                 help="the equal memory budget of every rung (default: the engine config's); "
                      "the activation budget keeps its share of budget - weights")
  p.add_argument("--quick", action="store_true",
                 help="a small smoke run: few requests and small row caps")
  p.add_argument("--sweep", choices=SWEEPS, default=None,
                 help="run the all-on configuration over a small grid instead of the ladder")
  p.add_argument("--rungs", default=",".join(RUNG_KEYS),
                 help=f"comma-separated subset of {','.join(RUNG_KEYS)}")
  p.add_argument("--seed", type=int, default=0, help="workload seed")
  p.add_argument("--time-scale", type=float, default=1.0,
                 help="multiplies every arrival time (e.g. 2 on a machine half as fast)")
  p.add_argument("--model-config", default=MODEL_CONFIG,
                 help=f"model preset or config.json (default {MODEL_CONFIG}, random weights)")
  p.add_argument("--engine-config", default=ENGINE_CONFIG,
                 help=f"engine preset or JSON of EngineConfig fields (default {ENGINE_CONFIG})")
  p.add_argument("--compile-cache", default=os.path.join(tempfile.gettempdir(),
                                                         "dllm-jax-compile-cache"),
                 help="JAX persistent compilation cache directory, so rungs that share "
                      "executables compile once ('' = off); compile time is never timed")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed rounds per rung, interleaved across rungs (round 1 runs every "
                      "rung, then round 2, ...); the table reports medians (default 3; "
                      "--quick 1)")
  p.add_argument("--progress", action="store_true", help="progress bars")


# --quick: row caps 2 / 4 (a subset of the full run's step buckets, so a warm compilation cache
# serves it), 8 requests, bursts of 4, one round.
QUICK_OVERRIDES = dict(max_refresh_rows=2, max_reuse_rows=4)


def _setup_compile_cache(path: str) -> None:
  if not path:
    return
  import jax
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run(args) -> int:
  """``dllm-jax ablate``: run the ladder (or a sweep), write JSON + plots, print the table."""
  from dllm_jax.bench.driver import _json_default, engine_config_dict, machine_info
  require_budgeter()
  _setup_compile_cache(args.compile_cache)
  keys = [k.strip() for k in args.rungs.split(",") if k.strip()]
  bad = [k for k in keys if k not in RUNG_KEYS]
  if bad or not keys:
    raise ValueError(f"--rungs: expected a subset of {','.join(RUNG_KEYS)}, got {args.rungs!r}")
  n = args.requests or (QUICK_REQUESTS if args.quick else DEFAULT_REQUESTS)
  if n < 1:
    raise ValueError(f"--requests: expected >= 1, got {n}")
  repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS)
  if repeats < 1:
    raise ValueError(f"--repeats: expected >= 1, got {repeats}")
  if not args.time_scale >= 0:
    raise ValueError(f"--time-scale: expected >= 0, got {args.time_scale}")
  os.makedirs(args.out, exist_ok=True)
  mcfg = load_model_config(args.model_config)
  engine = load_engine_dict(args.engine_config)
  m_budget, a_budget = scaled_budgets(engine, mcfg, args.memory_budget_mb)
  overrides = dict(QUICK_OVERRIDES) if args.quick else {}
  model = build_model(mcfg)
  items = make_items(args.workload, n, mcfg, seed=args.seed, quick=args.quick)
  if args.time_scale != 1.0:
    items = [dataclasses.replace(it, arrival_s=it.arrival_s * args.time_scale) for it in items]
  common = dict(
      version=RESULT_VERSION,
      command=" ".join(["dllm-jax"] + sys.argv[1:]) if sys.argv[1:2] == ["ablate"] else None,
      machine=machine_info(), model_config=dataclasses.asdict(mcfg), model_seed=MODEL_SEED,
      engine_config_file=f"configs/{args.engine_config}.json"
      if presets.is_preset(args.engine_config) else args.engine_config,
      engine_config_base=engine, quick=args.quick, overrides=overrides,
      budgets=dict(memory_budget_bytes=m_budget, activation_budget_bytes=a_budget),
      repeats=repeats,
      workload=dict(name=args.workload, seed=args.seed, requests=n, time_scale=args.time_scale,
                    params=dict(WORKLOAD_PARAMS[args.workload]),
                    content=dict(mix=[dataclasses.asdict(c) for c in BENCH_MIX],
                                 min_prompt_tokens=MIN_PROMPT, max_prompt_tokens=MAX_PROMPT),
                    base_params=BASE_PARAMS, summary=W.summarize(items)))
  if args.quick and args.workload == "burst":
    common["workload"]["params"].update(burst_size=4, period_s=2.0)
  print(f"ablation: {args.workload}, {n} requests, memory budget {m_budget / MiB:.2f} MiB "
        f"(activation {a_budget / MiB:.2f} MiB), model {mcfg.num_params():,} params")
  if args.sweep:
    return _run_sweep(args, common, model, mcfg, engine, items, m_budget, a_budget, overrides,
                      repeats)
  preps: dict[str, Prepared] = {}
  runner = None
  for rung in RUNGS:
    if rung.key not in keys:
      continue
    print(f"rung {rung.key}: {rung.label}", flush=True)
    cfg = engine_config_for(rung, engine, memory_budget=m_budget, activation_budget=a_budget,
                            overrides=overrides)
    preps[rung.key] = prepare_rung(rung, model, cfg, items, base_params=BASE_PARAMS,
                                   runner=runner)
    runner = preps[rung.key].llm.core.runner
  results: dict[str, list[dict]] = {k: [] for k in preps}
  for rnd in range(repeats):
    print(f"round {rnd + 1}/{repeats}", flush=True)
    for key, prep in preps.items():
      results[key].append(timed_run(prep, items, base_params=BASE_PARAMS,
                                    workload=args.workload, progress=args.progress))
  rungs: dict[str, dict] = {}
  for key, prep in preps.items():
    rungs[key] = combine_rounds(results[key])
    rungs[key]["engine_config"] = engine_config_dict(prep.engine_config)
  data = dict(common, rungs=rungs)
  data["summary"] = summary_rows(rungs)
  path = os.path.join(args.out, "ablation.json")
  with open(path, "w") as fh:
    json.dump(data, fh, default=_json_default)  # compact: per-request records
  plots = make_plots(data, args.out)
  table = markdown_table(data["summary"])
  with open(os.path.join(args.out, "table.md"), "w") as fh:
    fh.write(table + "\n")
  print()
  print(table)
  print(f"\nwrote {path}, " + ", ".join(os.path.basename(p) for p in plots))
  return 0


def _run_sweep(args, common, model, mcfg, engine, items, m_budget, a_budget, overrides,
               repeats) -> int:
  from dllm_jax.bench.driver import _json_default, engine_config_dict
  rung = next(r for r in RUNGS if r.key == "all_on")
  grid = SWEEP_GRIDS[args.sweep]
  points, runner = [], None
  for value in grid:
    print(f"sweep {args.sweep} = {value}", flush=True)
    ov, sov, its, mb, ab = dict(overrides), {}, items, m_budget, a_budget
    if args.sweep == "keep_ratio":
      sov["keep_ratio"] = float(value)
    elif args.sweep == "block_length":
      ov["max_block_length"] = max(int(value), engine.get("max_block_length", 16))
      its = [dataclasses.replace(it, params={**it.params, "block_length": int(value)})
             for it in items]
    else:
      mb, ab = scaled_budgets(engine, mcfg, float(value))
    try:
      cfg = engine_config_for(rung, engine, memory_budget=mb, activation_budget=ab,
                              overrides=ov, sparse_overrides=sov)
      prep = prepare_rung(rung, model, cfg, its, base_params=BASE_PARAMS, runner=runner)
    except ValueError as e:  # e.g. a budget too small for the weights and one request
      print(f"  skipped: {e}")
      points.append(dict(value=value, error=str(e)))
      continue
    runner = prep.llm.core.runner
    res = combine_rounds([timed_run(prep, its, base_params=BASE_PARAMS, workload=args.workload,
                                    progress=args.progress) for _ in range(repeats)])
    points.append(dict(value=value, metrics=res["metrics"], median=res["median"],
                       memory=res["memory"], ablation=res["ablation"],
                       rounds=res["rounds"],
                       engine_config=engine_config_dict(cfg)))
    del prep
    gc.collect()
  ok = [p for p in points if "metrics" in p]
  sweep = dict(common, name=args.sweep, rung=dataclasses.asdict(rung), points=ok,
               failed=[p for p in points if "metrics" not in p])
  path = os.path.join(args.out, f"sweep_{args.sweep}.json")
  with open(path, "w") as fh:
    json.dump(sweep, fh, default=_json_default)
  if ok:
    plot_sweep(sweep, os.path.join(args.out, f"sweep_{args.sweep}.png"))
  print(f"\n| {args.sweep} | tokens/s | P50 (s) | P99 (s) | KV pages (peak / pool) | "
        f"activation peak (MiB) |\n|---:|---:|---:|---:|---:|---:|")
  for p in ok:
    f = p["median"]
    print(f"| {p['value']} | {f['throughput_tok_s']:.1f} | {f['p50_s']:.2f} | "
          f"{f['p99_s']:.2f} | {p['ablation']['kv_pages_peak']} / {p['memory']['kv_pages'] - 1} "
          f"| {p['ablation']['activation_peak_bytes'] / MiB:.2f} |")
  print(f"\nwrote {path}")
  return 0
