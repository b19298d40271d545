"""Open-loop benchmark driver: replay a workload against the in-process engine (or a server).

In process (:func:`run_workload`): one loop submits every request whose scheduled arrival
(``arrival_s * time_scale`` seconds after the start) has passed, runs one engine step, records
finishes, and sleeps only when the engine is idle and the next arrival is in the future. The
engine's own timestamps (first committed token, finish) are used, relative to the start, and
latencies are measured from the *scheduled* arrival, so time a request waited while a step ran
counts (open loop). Requests the engine rejects (never fit) are recorded as "rejected".

Over HTTP (:func:`run_http`): requests go to an OpenAI-compatible ``URL/v1/completions`` at
their scheduled times (one worker thread each, up to ``max_concurrency``); latency is
client-side (scheduled arrival -> full response). Kept simple: non-streaming, so no TTFT.

CLI: ``dllm-jax bench serve --workload livebench-like --requests 32 --out results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections import deque
from typing import Any, Mapping, Sequence

from dllm_jax import presets
from dllm_jax.bench import metrics as M
from dllm_jax.bench import workloads as W
from dllm_jax.engine_flags import add_engine_args, engine_config_from_args  # noqa: F401 (API)

RESULT_VERSION = 1


# Machine / memory / config descriptions -------------------------------------------------------


def machine_info() -> dict:
  """Where the run happened: platform, CPUs, Python, jax version, backend and device kind."""
  import jax
  dev = jax.devices()[0]
  try:
    cpus_avail = len(os.sched_getaffinity(0))
  except AttributeError:
    cpus_avail = os.cpu_count()
  return dict(platform=platform.platform(), machine=platform.machine(),
              processor=platform.processor() or None, cpu_count=os.cpu_count(),
              cpus_available=cpus_avail, python=platform.python_version(),
              jax_version=jax.__version__, backend=jax.default_backend(),
              device_kind=dev.device_kind, device_count=jax.device_count())


def engine_config_dict(cfg) -> dict:
  """The full EngineConfig as JSON (``sparse`` as its SparseConfig fields, or None)."""
  return dataclasses.asdict(cfg)


def memory_info(llm) -> dict:
  """Bytes by category: weights, the KV pool, and the activation peak estimate.

  The activation peak is the analytic estimate (engine.memory.step_activation_bytes) of the
  largest step the configuration allows -- the same step the KV pool is sized against -- or the
  configured activation budget when one is set. It bounds, not measures, the run's peak.
  """
  from dllm_jax.engine import memory
  core, cfg, mcfg = llm.core, llm.engine_config, llm.cfg
  weights = memory.weights_bytes(mcfg, core.dtype)
  pool = core.pool_cfg.pool_bytes
  peak = cfg.activation_budget_bytes
  if peak is None:
    try:  # the largest bucket of the engine's grid
      peak = max(core.step_activation_bytes(s) for s in core.shapes())
    except ImportError:  # the logit budgeter's model is unavailable: report no estimate
      peak = None
  return dict(weights_bytes=int(weights), kv_pool_bytes=int(pool),
              activation_peak_bytes=None if peak is None else int(peak),
              total_bytes=int(weights + pool + (peak or 0)),
              memory_budget_bytes=cfg.memory_budget_bytes, kv_pages=core.pool_cfg.num_pages,
              page_bytes=core.pool_cfg.page_bytes)


def model_info(llm) -> dict:
  c = llm.cfg
  return dict(path=llm.path, name=c.name, family=c.family, parameters=c.num_params(),
              layers=c.num_layers, hidden_size=c.hidden_size, vocab_size=c.vocab_size,
              max_position=c.max_position, dtype=str(llm.core.dtype))


def _stats_snapshot(stats) -> dict:
  return stats.as_dict()


# In-process driver ---------------------------------------------------------------------------


def sampling_params_for(item: W.WorkItem, base_params: Mapping | None = None):
  """SamplingParams of an item: ``base_params`` overridden by the item's own params."""
  from dllm_jax.config import SamplingParams
  kw = {**(base_params or {}), **item.params}
  kw.pop("gen_length", None)
  return SamplingParams(gen_length=item.gen_length, **kw)


class _Run:
  """State of one in-process run: pending items, records, progress bar."""

  def __init__(self, llm, items, time_scale, progress, base_params):
    from tqdm.auto import tqdm
    self.llm, self.items, self.scale = llm, list(items), float(time_scale)
    self.base_params = dict(base_params or {})
    self.eos_ids = llm.cfg.eos_ids
    self.next = 0
    self.backlog: deque[int] = deque()
    self.rid_to_index: dict[str, int] = {}
    self.records: dict[int, M.RequestRecord] = {}
    self.submit: dict[int, float] = {}
    self.bar = tqdm(total=len(self.items), disable=not progress, unit="req", desc="bench",
                    leave=False)
    self.start = time.perf_counter()

  def due(self, i: int) -> float:
    return self.items[i].arrival_s * self.scale

  def now(self) -> float:
    return time.perf_counter() - self.start

  def admit(self) -> None:
    """Move every arrived item to the backlog, then submit from it until the queue is full."""
    from dllm_jax.engine.core import QueueFull
    now = self.now()
    while self.next < len(self.items) and self.due(self.next) <= now:
      self.backlog.append(self.next)
      self.next += 1
    while self.backlog:
      i = self.backlog[0]
      item = self.items[i]
      try:
        rid = self.llm.add_request(list(item.prompt) if not isinstance(item.prompt, str)
                                   else item.prompt, sampling_params_for(item, self.base_params),
                                   request_id=f"w{i}")
      except QueueFull:
        return
      except ValueError as e:
        self._reject(i, str(e))
      else:
        self.rid_to_index[rid] = i
        self.submit[i] = self.now()
      self.backlog.popleft()

  def _reject(self, i: int, msg: str) -> None:
    item = self.items[i]
    self.records[i] = M.RequestRecord(
        request_id=f"w{i}", category=item.category, arrival_s=self.due(i), submit_s=None,
        first_token_s=None, finish_s=None, prompt_tokens=len(item.prompt),
        gen_length=item.gen_length, generated_tokens=0, eos_fill=0, nfe=0,
        finish_reason="rejected", error=msg)
    self.bar.update(1)

  def finish(self, out) -> None:
    """Record a request's last output (engine.outputs.RequestOutput)."""
    i = self.rid_to_index.pop(out.request_id, None)
    if i is None:  # not one of this run's requests
      return
    item, m = self.items[i], out.metrics or {}
    counted, fill = M.count_generated(out.token_ids, self.eos_ids)
    rel = lambda t: None if t is None else t - self.start
    self.records[i] = M.RequestRecord(
        request_id=out.request_id, category=item.category, arrival_s=self.due(i),
        submit_s=self.submit.get(i), first_token_s=rel(m.get("first_token")),
        finish_s=rel(m.get("finish")), prompt_tokens=len(out.prompt_token_ids),
        gen_length=item.gen_length, generated_tokens=counted, eos_fill=fill, nfe=int(out.nfe),
        finish_reason=out.finish_reason)
    self.bar.update(1)

  def idle_wait(self) -> None:
    if self.next < len(self.items):
      time.sleep(max(0.0, min(self.due(self.next) - self.now(), 0.5)))

  def done(self) -> bool:
    return self.next >= len(self.items) and not self.backlog and not self.llm.has_unfinished()


def run_workload(llm, items: Sequence[W.WorkItem], *, time_scale: float = 1.0,
                 progress: bool = True, base_params: Mapping | None = None,
                 workload: str | None = None) -> dict:
  """Replay ``items`` open loop against ``llm`` (an engine.LLM) and return a JSON-able result.

  time_scale: multiplies every arrival time (0 = all at once; 2 = half the rate).
  base_params: SamplingParams fields for every request (an item's own params win).
  Returns {version, workload, engine_config, model, machine, memory, requests (records),
  metrics, engine_stats (this run's StepStats difference, with the per-step phase mix)}.
  """
  if not time_scale >= 0:
    raise ValueError(f"time_scale: expected >= 0, got {time_scale!r}")
  core = llm.core
  before, compiles0 = _stats_snapshot(core.stats), core.runner.compile_count
  run = _Run(llm, sorted(items, key=lambda it: it.arrival_s), time_scale, progress, base_params)
  while not run.done():
    run.admit()
    if llm.has_unfinished():
      for out in llm.step():  # typed RequestOutputs; requests here do not stream
        if out.finished:
          run.finish(out)
    elif not run.backlog:
      run.idle_wait()
  wall = run.now()
  run.bar.close()
  stats = M.stats_delta(before, _stats_snapshot(core.stats))
  compiles = core.runner.compile_count - compiles0
  records = [run.records[i] for i in range(len(run.items))]
  first = min((r.arrival_s for r in records), default=0.0)
  metrics = M.compute_metrics(records, wall_s=wall - first, stats=stats, compile_count=compiles)
  return dict(version=RESULT_VERSION, mode="in-process",
              workload=dict(name=workload, time_scale=time_scale, base_params=dict(
                  base_params or {}), **W.summarize(run.items)),
              engine_config=engine_config_dict(llm.engine_config), model=model_info(llm),
              machine=machine_info(), memory=memory_info(llm),
              requests=[r.to_json() for r in records], metrics=metrics,
              engine_stats={**stats, "phase_mix": [list(m) for m in stats["phase_mix"]]})


# HTTP driver ---------------------------------------------------------------------------------


def _post_one(client, url: str, body: dict, t0: float, arrival: float, rid: str, item):
  """Send one completion request; returns its RequestRecord (client-side times)."""
  try:
    r = client.post(url, json=body)
    t = time.perf_counter() - t0
    r.raise_for_status()
    data = r.json()
    usage = data.get("usage") or {}
    choice = (data.get("choices") or [{}])[0]
    gen = int(usage.get("completion_tokens", 0))
    reason, err = choice.get("finish_reason") or "length", None
  except Exception as e:  # noqa: BLE001 -- any failure is a recorded error, not a crash
    t, gen, reason, err = time.perf_counter() - t0, 0, "error", f"{type(e).__name__}: {e}"
  return M.RequestRecord(
      request_id=rid, category=item.category, arrival_s=arrival, submit_s=arrival,
      first_token_s=None, finish_s=t if err is None else None, prompt_tokens=len(item.prompt),
      gen_length=item.gen_length, generated_tokens=gen, eos_fill=0, nfe=0,
      finish_reason=reason, error=err)


def run_http(url: str, items: Sequence[W.WorkItem], *, model: str | None = None,
             time_scale: float = 1.0, progress: bool = True, base_params: Mapping | None = None,
             max_concurrency: int = 256, timeout_s: float = 600.0,
             workload: str | None = None, transport=None) -> dict:
  """Replay ``items`` against an OpenAI-compatible server at ``url`` (``/v1/completions``).

  Body: {"model", "prompt" (text or token ids), "max_tokens": gen_length, "stream": false} plus
  the SamplingParams overrides as extra top-level fields. Generated tokens are the response's
  ``usage.completion_tokens`` (the server's count); latency is client-side. A failed request is
  recorded with finish_reason "error". ``transport``: an httpx transport (tests).
  """
  import concurrent.futures as cf

  import httpx
  from tqdm.auto import tqdm

  endpoint = url.rstrip("/") + "/v1/completions"
  items = sorted(items, key=lambda it: it.arrival_s)
  bar = tqdm(total=len(items), disable=not progress, unit="req", desc="bench", leave=False)
  with httpx.Client(timeout=timeout_s, transport=transport) as client, \
      cf.ThreadPoolExecutor(max_workers=max(1, min(len(items), max_concurrency))) as pool:
    t0, futures = time.perf_counter(), []
    for i, item in enumerate(items):
      due = item.arrival_s * time_scale
      time.sleep(max(0.0, due - (time.perf_counter() - t0)))
      prompt = item.prompt if isinstance(item.prompt, str) else list(item.prompt)
      body = {**(base_params or {}), **item.params, "model": model or "default",
              "prompt": prompt, "max_tokens": item.gen_length, "stream": False}
      fut = pool.submit(_post_one, client, endpoint, body, t0, due, f"w{i}", item)
      fut.add_done_callback(lambda _: bar.update(1))
      futures.append(fut)
    records = [f.result() for f in futures]
    wall = time.perf_counter() - t0
  bar.close()
  first = min(r.arrival_s for r in records)
  return dict(version=RESULT_VERSION, mode="http", url=url,
              workload=dict(name=workload, time_scale=time_scale,
                            base_params=dict(base_params or {}), **W.summarize(items)),
              engine_config=None, model=dict(name=model), machine=machine_info(), memory=None,
              requests=[r.to_json() for r in records],
              metrics=M.compute_metrics(records, wall_s=wall - first))


# CLI -----------------------------------------------------------------------------------------


def add_args(p: argparse.ArgumentParser) -> None:
  """Flags of ``dllm-jax bench serve``."""
  p.add_argument("--workload", choices=W.WORKLOADS, default="livebench-like",
                 help="arrival pattern and request mix (default livebench-like)")
  p.add_argument("--model", default=None,
                 help="model directory (default: the bundled demo), or a model preset such as "
                      "'bench-small' (the ablation model): its architecture with random weights")
  p.add_argument("--requests", type=int, default=32, help="number of requests (default 32)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the workload's arrivals and prompts (default 0)")
  p.add_argument("--out", default=None, help="write the result JSON here")
  p.add_argument("--url", default=None,
                 help="benchmark an OpenAI-compatible server at URL instead of the engine")
  g = p.add_argument_group("workload")
  g.add_argument("--rate", type=float, default=2.0, help="req/s (poisson, livebench-like)")
  g.add_argument("--burst-size", type=int, default=8, help="requests per burst (burst)")
  g.add_argument("--period", type=float, default=10.0, help="s (burst, osc)")
  g.add_argument("--spread", type=float, default=0.0, help="s a burst is spread over")
  g.add_argument("--low-rate", type=float, default=0.5, help="req/s (osc)")
  g.add_argument("--high-rate", type=float, default=4.0, help="req/s (osc)")
  g.add_argument("--trace", default=None, help="JSONL trace (workload 'trace')")
  g.add_argument("--time-scale", type=float, default=1.0, help="multiplies arrival times")
  g.add_argument("--length-scale", type=float, default=1.0, help="multiplies prompt lengths")
  g.add_argument("--max-prompt-tokens", type=int, default=None,
                 help="clip prompt lengths (default: the model's length minus gen length)")
  g.add_argument("--gen-length", type=int, default=None, help="override every gen length")
  g.add_argument("--block-length", type=int, default=None,
                 help="override every request's block length")
  g.add_argument("--steps", type=int, default=None, help="override every request's steps")
  g.add_argument("--temperature", type=float, default=None,
                 help="override every request's temperature")
  g.add_argument("--warmup", choices=("none", "quick", "full"), default="quick",
                 help="untimed compile before the run: quick = generate two of the requests, "
                      "full = every bucket (slow on CPU)")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")
  add_engine_args(p, sparse_default="per_head")


def base_params_from_args(args) -> dict:
  return {k: v for k, v in (("block_length", args.block_length), ("steps", args.steps),
                            ("temperature", args.temperature)) if v is not None}


def workload_from_args(args, source, max_len: int | None) -> list[W.WorkItem]:
  """Build the CLI's workload; prompts come from ``source`` and are clipped to fit max_len."""
  if args.requests < 1:
    raise ValueError(f"--requests: expected >= 1, got {args.requests}")
  gen_max = args.gen_length or max(c.gen_length for c in W.LIVEBENCH_MIX + W.FIXED_MIX)
  max_prompt = args.max_prompt_tokens
  if max_prompt is None and max_len is not None:
    max_prompt = max(4, max_len - gen_max)
  mix = W.FIXED_MIX if args.workload == "poisson" else W.LIVEBENCH_MIX
  content = W.Content(mix=mix, source=source, length_scale=args.length_scale,
                      max_prompt_tokens=max_prompt, gen_length=args.gen_length)
  kw: dict[str, Any] = {}
  if args.workload in ("poisson", "livebench-like"):
    kw = dict(rate=args.rate)
  elif args.workload == "burst":
    kw = dict(burst_size=args.burst_size, period_s=args.period, spread_s=args.spread)
  elif args.workload == "osc":
    kw = dict(low_rate=args.low_rate, high_rate=args.high_rate, period_s=args.period)
  return W.make_workload(args.workload, args.requests, seed=args.seed, content=content,
                         trace_path=args.trace, **kw)


def _warmup(llm, items, base_params, mode: str) -> None:
  if mode == "quick":
    sample = items[:2]
    llm.generate([list(it.prompt) if not isinstance(it.prompt, str) else it.prompt
                  for it in sample], [sampling_params_for(it, base_params) for it in sample])
  elif mode == "full":
    llm.core.warmup("full", lengths=[len(it.prompt) + it.gen_length for it in items])


def _print_summary(result: dict) -> None:
  m = result["metrics"]
  lat, ttft = m["latency_s"], m["ttft_s"]
  fmt = lambda v, unit="": "-" if v is None else f"{v:.3f}{unit}"
  lines = [
      f"requests          {m['finished']}/{m['requests']} finished, {m['rejected']} rejected",
      f"wall              {m['wall_s']:.2f} s",
      f"throughput        {fmt(m['throughput_tok_s'])} tok/s  (EOS fill not counted), "
      f"{fmt(m['requests_per_s'])} req/s",
      f"latency P50/90/99 {fmt(lat['p50'])} / {fmt(lat['p90'])} / {fmt(lat['p99'])} s",
      f"TTFT P50/P99      {fmt(ttft['p50'])} / {fmt(ttft['p99'])} s",
      f"NFE per token     {fmt(m['nfe_per_token'])}",
  ]
  eng = m.get("engine")
  if eng:
    lines.append(f"host per step     {fmt(eng['host_ms_per_step'])} ms "
                 f"({fmt(eng['host_pct_of_step'])} % of step), {eng['steps']} steps, "
                 f"{eng['compilations']} compilations")
    lines.append(f"rows per step     refresh {fmt(eng['refresh_rows_per_step'])}, "
                 f"reuse {fmt(eng['reuse_rows_per_step'])}, mixed steps "
                 f"{fmt(eng['mixed_steps'])}")
  print("\n".join(lines))


def run(args) -> int:
  """``dllm-jax bench serve``: build the workload, run it, print a summary, write --out."""
  base_params = base_params_from_args(args)
  if args.url:
    items = workload_from_args(args, W.TextSource(), args.max_prompt_tokens)
    result = run_http(args.url, items, time_scale=args.time_scale, progress=not args.no_progress,
                      base_params=base_params, workload=args.workload)
  else:
    from dllm_jax.engine.engine import LLM
    model = args.model
    if model is not None and presets.is_preset(model):
      from dllm_jax.bench.random_model import build_model
      model = build_model(presets.model_config(model))
    llm = LLM(model, engine_config=engine_config_from_args(args))
    source = (W.TextSource(tokenizer=llm.tokenizer) if llm.tokenizer is not None
              else W.TokenSource.for_model(llm.cfg))
    items = workload_from_args(args, source, llm.core.max_len)
    _warmup(llm, items, base_params, args.warmup)
    result = run_workload(llm, items, time_scale=args.time_scale,
                          progress=not args.no_progress and sys.stderr.isatty(),
                          base_params=base_params, workload=args.workload)
  _print_summary(result)
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(result, fh, indent=1, default=_json_default)
    print(f"wrote {args.out}")
  return 0


def _json_default(o):
  if isinstance(o, float) and math.isnan(o):
    return None
  if hasattr(o, "tolist"):
    return o.tolist()
  if isinstance(o, (set, frozenset, tuple)):
    return list(o)
  return str(o)
