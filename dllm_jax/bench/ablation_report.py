"""The ablation's results: per-rung medians over rounds, the summary table and the plots.

Works on the JSON-able results :mod:`dllm_jax.bench.ablation` writes (``ablation.json``), so a
notebook can rebuild the table and the figures from a saved run. matplotlib is imported only
when a plot is drawn.
"""

from __future__ import annotations

import os

import numpy as np

from dllm_jax.bench.ablation_ladder import MiB, RUNG_KEYS

MEDIAN_KEYS = ("throughput_tok_s", "p50_s", "p90_s", "p99_s", "ttft_p99_s", "wall_s", "cpu_s")


def round_figures(res: dict) -> dict:
  """One timed round's figures (the keys of MEDIAN_KEYS, plus steps and the load)."""
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
  figs = [round_figures(r) for r in results]
  rep["rounds"] = [dict(figs[i], requests=r["requests"]) for i, r in enumerate(results)]
  rep["median"] = {k: float(np.median([f[k] for f in figs])) if all(
      f[k] is not None for f in figs) else None for k in MEDIAN_KEYS}
  return rep


# Summaries -----------------------------------------------------------------------------------


def _figures(r: dict) -> dict:
  """A rung's reported figures: medians over its rounds (or its one run)."""
  med = r.get("median")
  if med is not None:
    return med
  f = round_figures(r)
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


def sweep_table(sweep: dict) -> str:
  """A sweep's points as a markdown table (medians over rounds)."""
  out = [f"| {sweep['name']} | tokens/s | P50 (s) | P99 (s) | KV pages (peak / pool) | "
         "activation peak (MiB) |", "|---:|---:|---:|---:|---:|---:|"]
  for p in sweep["points"]:
    f, ab = p["median"], p["ablation"]
    out.append(f"| {p['value']} | {f['throughput_tok_s']:.1f} | {f['p50_s']:.2f} | "
               f"{f['p99_s']:.2f} | {ab['kv_pages_peak']} / {p['memory']['kv_pages'] - 1} "
               f"| {ab['activation_peak_bytes'] / MiB:.2f} |")
  return "\n".join(out)

