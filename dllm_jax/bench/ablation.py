"""The ablation ladder: one seeded workload, one memory budget, each technique switched on in turn.

``dllm-jax ablate --workload burst --out results/ablation-burst`` runs, on the bench-small model
(``configs/bench-small.json``, random float32 weights of seed 0: bench/random_model.py) and the
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

Every technique is one EngineConfig switch, so a rung differs from the previous one in one
field. The baseline is a hypothesis about the paper's "state-of-the-art baseline": its artifact's
sparse defaults equal Sparse-dLLM's (block 32, keep 0.5, max-pool 3, one-step delay), so it is
taken to be Sparse-dLLM-style serving (static batching, monolithic logits, head-shared
selection) in this same engine with the three techniques off.

Each rung builds an ``LLM`` with its EngineConfig on the shared model, compiles every step
bucket the workload can reach (:func:`warmup`, so compile time is excluded; the rungs share one
``Runner``, so an executable is compiled once for all rungs that use it), then replays the
workload open loop with :func:`dllm_jax.bench.driver.run_workload`.
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

Modules: ablation_ladder.py (the rungs, workloads, configs and budgets), this module (warm-up,
timed runs, the command), ablation_report.py (medians, table, plots).
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

from dllm_jax import presets
from dllm_jax.bench import workloads as W
from dllm_jax.bench.ablation_ladder import (  # noqa: F401 (the ladder's names, re-exported)
    BASE_PARAMS, BENCH_MIX, DEFAULT_REPEATS, DEFAULT_REQUESTS, ENGINE_CONFIG,
    MAX_PROMPT, MIN_PROMPT, MODEL_CONFIG, QUICK_OVERRIDES, QUICK_REQUESTS, RUNG_KEYS, RUNGS,
    SWEEP_GRIDS, SWEEPS, WORKLOAD_PARAMS, MiB, Rung, engine_config_for, load_engine_dict,
    load_model_config, make_items, require_budgeter, scaled_budgets, workload_params)
from dllm_jax.bench.ablation_report import (  # noqa: F401 (re-exported for notebooks)
    combine_rounds, make_plots, markdown_table, plot_sweep, summary_rows, sweep_table)
from dllm_jax.bench.random_model import MODEL_SEED, build_model  # noqa: F401 (re-export)

RESULT_VERSION = 1


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


def _loadavg():
  try:
    return list(os.getloadavg())
  except OSError:
    return None


# CLI -----------------------------------------------------------------------------------------


def add_args(p: argparse.ArgumentParser) -> None:
  """Flags of ``dllm-jax ablate``."""
  p.add_argument("--workload", choices=tuple(WORKLOAD_PARAMS), default="burst",
                 help="the seeded arrival process every rung replays (default burst: 8 "
                      "requests every 1.75 s)")
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


def run(args) -> int:
  """``dllm-jax ablate``: run the ladder (or a sweep), write JSON + plots, print the table."""
  from dllm_jax.bench.driver import _json_default, machine_info
  require_budgeter()
  if args.compile_cache:
    from dllm_jax import compile_cache
    compile_cache.enable(args.compile_cache)
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
                    params=workload_params(args.workload, args.quick),
                    content=dict(mix=[dataclasses.asdict(c) for c in BENCH_MIX],
                                 min_prompt_tokens=MIN_PROMPT, max_prompt_tokens=MAX_PROMPT),
                    base_params=BASE_PARAMS, summary=W.summarize(items)))
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
    rungs[key]["engine_config"] = dataclasses.asdict(prep.engine_config)
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
  from dllm_jax.bench.driver import _json_default
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
                       engine_config=dataclasses.asdict(cfg)))
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
  print("\n" + sweep_table(sweep))
  print(f"\nwrote {path}")
  return 0
