"""``dllm-jax bench e2e``: the engine end to end on random weights at a preset's width.

    dllm-jax bench e2e --config llada-8b --layers 32 --batch 32 --prompt-len 192 --gen-length 64 \\
        --block-length 32 --modes dense,dual,sparse --keep-ratio 0.5 --memory-budget-gb 30 \\
        --out e2e.json
    python -m dllm_jax.bench.e2e ...   (the same; imports nothing of dllm_jax.server)

Workload: ``--batch`` B requests of ``--prompt-len`` P random ids (never a special id) plus
``--gen-length`` G generated tokens in blocks of ``--block-length`` Lb, one token per step
(steps = G), temperature 0, no EOS stop, all submitted at once. Per mode the engine is built on
the same random model; the first ``generate`` compiles (its seconds are reported), the second is
timed. Modes: dense = no sparse cache; dual = SparseConfig(keep_ratio=1.0, selection="shared")
(every token kept: a dual cache); sparse = SparseConfig(keep_ratio=K, selection="per_head").

Reported per mode: tokens/s, first-call seconds and its backend compile events, host share of
the step (StepStats host / (host + device)), KV pool pages, the timed call's padding waste and
steps per bucket, and single-phase figures: a Refresh-only and a Reuse-only step of the
workload's shapes timed alone (median) with their achieved TFLOP/s under the analytic
(useful-work) FLOP model stated in the JSON (``flop_formula``).
``--pool-sweep F1,F2`` repeats one mode with ``memory_budget_bytes`` = F x the free device
memory measured before the model was built (accelerator memory_stats; on CPU the host's
available memory or ``--device-memory-gb``).

``--config`` is a preset (llada-8b, dream-7b, bench-small) or a config.json / model directory;
``--layers`` and ``--hidden-size`` shrink it (head dim and GQA group kept, MLP width scaled with
the hidden size), so it also runs on a CPU. The JSON is rewritten after every mode and sweep
point (``complete`` is false until the end), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import time

from dllm_jax.bench import e2e_phase as ph

RESULT_VERSION = 1
MODES = ("dense", "dual", "sparse")


# Inputs ---------------------------------------------------------------------------------------


def _csv(kind, what: str):
  def parse(v: str):
    try:
      out = [kind(x) for x in v.split(",") if x.strip()]
    except ValueError:
      raise argparse.ArgumentTypeError(f"{what}: expected a comma-separated list, got {v!r}")
    return out
  return parse


def parse_modes(v: str) -> list[str]:
  """'dense,dual,sparse' -> the list (or 'none' -> []); unknown names are an error."""
  if v.strip() == "none":
    return []
  modes = [m.strip() for m in v.split(",") if m.strip()]
  bad = [m for m in modes if m not in MODES]
  if bad or not modes:
    raise argparse.ArgumentTypeError(f"--modes: expected a comma-separated subset of {MODES} or "
                                     f"'none', got {v!r}")
  return modes


def load_model_config(spec: str, layers: int | None = None, hidden_size: int | None = None):
  """ModelConfig of a preset name or a config.json path, shrunk by ``layers`` / ``hidden_size``
  (head dim and query heads per KV head kept; MLP width scaled with the hidden size)."""
  from dllm_jax import presets
  cfg = presets.model_config(spec)
  if layers is not None:
    if layers < 1:
      raise ValueError(f"--layers: expected >= 1, got {layers}")
    cfg = dataclasses.replace(cfg, num_layers=layers)
  if hidden_size is not None and hidden_size != cfg.hidden_size:
    hd, group = cfg.head_dim, cfg.group_size
    if hidden_size < 1 or hidden_size % (hd * group):
      raise ValueError(f"--hidden-size: must be a positive multiple of head_dim x group = "
                       f"{hd} x {group} = {hd * group} (head dim and GQA group are kept), "
                       f"got {hidden_size}")
    heads = hidden_size // hd
    mlp = max(1, round(cfg.intermediate_size * hidden_size / cfg.hidden_size))
    cfg = dataclasses.replace(cfg, hidden_size=hidden_size, num_heads=heads,
                              num_kv_heads=heads // group, intermediate_size=mlp)
  return cfg


def random_prompts(mcfg, batch: int, length: int, seed: int = 0) -> list[list[int]]:
  """``batch`` prompts of ``length`` uniform ids, never a special (mask/eos/eot/pad/bos) id."""
  import numpy as np
  special = {mcfg.mask_token_id, mcfg.pad_token_id, *mcfg.eos_ids}
  if mcfg.bos_token_id is not None:
    special.add(mcfg.bos_token_id)
  allowed = np.setdiff1d(np.arange(mcfg.vocab_size), np.array(sorted(special)))
  rng = np.random.default_rng(seed)
  return [rng.choice(allowed, size=length).tolist() for _ in range(batch)]


def _pow2(x: int, lo: int = 1) -> int:
  return max(lo, 1 << max(0, x - 1).bit_length())


def base_engine_config(args, mcfg):
  """The EngineConfig the workload implies (flags that are set win), through the one
  EngineConfig-from-flags builder. Its ``sparse`` is the 'sparse' mode's SparseConfig."""
  from dllm_jax.engine_flags import engine_config_from_args
  if args.sparse != "per_head" or args.selection is not None:
    raise ValueError("--sparse / --selection: bench e2e sets the cache per mode "
                     "(--modes dense,dual,sparse); drop them")
  total = args.prompt_len + args.gen_length
  if total > mcfg.max_position:
    raise ValueError(f"--prompt-len + --gen-length = {total} exceeds the model's "
                     f"{mcfg.max_position} positions")
  n = args.max_model_len or min(_pow2(total), mcfg.max_position)
  implied = dict(max_model_len=n, max_running=args.batch, token_budget=args.batch * n,
                 max_refresh_rows=args.batch, max_reuse_rows=args.batch,
                 max_block_length=args.block_length)
  over = {k: v for k, v in implied.items() if getattr(args, k, None) is None}
  if args.memory_budget_gb is not None:
    if args.memory_budget_mb is not None or args.memory_budget_bytes is not None:
      raise ValueError("--memory-budget-gb: give one of --memory-budget-gb/-mb/-bytes")
    over["memory_budget_bytes"] = int(args.memory_budget_gb * 2**30)
  return engine_config_from_args(args, **over)


def mode_config(base, mode: str):
  if mode == "dense":
    return base.replace(sparse=None)
  if mode == "dual":
    return base.replace(sparse=dataclasses.replace(base.sparse, keep_ratio=1.0,
                                                   selection="shared"))
  return base.replace(sparse=dataclasses.replace(base.sparse, selection="per_head"))


# Measuring -----------------------------------------------------------------------------------


def _stats(core) -> dict:
  s = core.stats
  return dict(steps=s.steps, committed=s.committed_tokens, host=s.host_seconds,
              device=s.device_seconds, refresh_rows=s.refresh_rows, reuse_rows=s.reuse_rows,
              fed=s.tokens, bucket_fed=s.bucket_tokens, compiles=core.runner.compile_count)


def _phase(core, mcfg, phase, args, keep, rows) -> dict:
  t: dict = {}
  length = args.prompt_len + args.gen_length
  sec = ph.single_phase_seconds(core, phase, rows, length, args.block_length, keep,
                                repeats=args.repeats, timings=t)
  flops = ph.step_flops(mcfg, phase, rows=rows, length=length, block=args.block_length,
                        keep=t["keep_tokens"])
  return dict(rows=rows, length=length, block=args.block_length, bucket=t["shapes"],
              keep_tokens=t["keep_tokens"] if phase == "reuse" else None, seconds=sec,
              runs_s=t["runs_s"], first_call_s=t["first_call_s"], compiles=t["compiles"],
              flops=flops, tflops=flops / sec / 1e12)


def run_mode(model, mcfg, cfg, mode: str, args, prompts, single_phase: bool = True) -> dict:
  """Build the engine with ``cfg``, generate twice (compile, timed), then the single phases."""
  from dllm_jax import compile_cache
  from dllm_jax.config import SamplingParams
  from dllm_jax.engine.engine import LLM
  sp = SamplingParams(gen_length=args.gen_length, steps=args.gen_length,
                      block_length=args.block_length, temperature=0.0, stop_on_eos=False)
  out = dict(mode=mode, sparse=None if cfg.sparse is None else dataclasses.asdict(cfg.sparse),
             memory_budget_bytes=cfg.memory_budget_bytes)
  llm = LLM(model, engine_config=cfg)
  core = llm.core
  out.update(pool_pages=core.pool_cfg.num_pages, page_bytes=core.pool_cfg.page_bytes,
             pool_bytes=core.pool_cfg.pool_bytes)
  with compile_cache.counting() as cs, ph.compile_events() as events:
    t = time.perf_counter()
    llm.generate(prompts, sp)
    out["first_call_s"] = time.perf_counter() - t
  out["first_call_compiles"] = dict(engine_executables=core.runner.compile_count,
                                    cache_hits=cs.cache_hits, **ph.summarize_compiles(events))
  s0, b0 = _stats(core), core.stats.as_dict()["shape_counts"]
  t = time.perf_counter()
  outs = llm.generate(prompts, sp)
  wall = time.perf_counter() - t
  s1, b1 = _stats(core), core.stats.as_dict()["shape_counts"]
  d = {k: s1[k] - s0[k] for k in s0}
  tokens = sum(len(o.token_ids) for o in outs)
  busy = d["host"] + d["device"]
  out.update(timed_s=wall, tokens=tokens, committed_tokens=d["committed"],
             tokens_per_s=tokens / wall, steps=d["steps"], refresh_rows=d["refresh_rows"],
             reuse_rows=d["reuse_rows"], timed_compiles=d["compiles"],
             nfe_per_request=sorted({o.nfe for o in outs}),
             host_seconds=d["host"], device_seconds=d["device"],
             host_share=d["host"] / busy if busy else None,
             host_ms_per_step=1e3 * d["host"] / max(1, d["steps"]),
             step_ms=1e3 * busy / max(1, d["steps"]),
             padding_waste=d["bucket_fed"] / d["fed"] if d["fed"] else None,
             kv_pages_peak=core.stats.kv_pages_peak, running_peak=core.stats.running_peak,
             buckets={k: n - b0.get(k, 0) for k, n in b1.items() if n > b0.get(k, 0)})
  if single_phase and not args.no_single_phase:
    refresh_rows = max(1, min(args.batch, cfg.max_refresh_rows,
                              cfg.token_budget // (args.prompt_len + args.gen_length)))
    # A failure here (e.g. engine internals that moved) keeps the mode's other figures.
    sp_out = dict(refresh=_guarded(_phase, core, mcfg, "refresh", args, 1.0, refresh_rows),
                  reuse=None)
    if cfg.sparse is not None:
      rows = min(args.batch, cfg.max_reuse_rows, cfg.max_running)
      sp_out["reuse"] = _guarded(_phase, core, mcfg, "reuse", args, cfg.sparse.keep_ratio, rows)
    out["single_phase"] = sp_out
  del llm, core
  gc.collect()
  return out


def _guarded(fn, *a) -> dict:
  """Run one mode / sweep point; a failure is recorded (type and message), not raised."""
  try:
    return fn(*a)
  except Exception as e:  # noqa: BLE001 -- e.g. an OOM or a budget too small for a pool
    gc.collect()
    return dict(error=f"{type(e).__name__}: {e}")


# CLI -----------------------------------------------------------------------------------------


def add_args(p: argparse.ArgumentParser) -> None:
  """Flags of ``dllm-jax bench e2e`` (the workload, the modes, and the engine flags)."""
  from dllm_jax.engine_flags import add_engine_args, positive_float, positive_int
  w = p.add_argument_group("model and workload")
  w.add_argument("--config", default="llada-8b",
                 help="preset name (configs/NAME.json) or a config.json (default llada-8b)")
  w.add_argument("--layers", type=positive_int, help="keep this many layers")
  w.add_argument("--hidden-size", type=positive_int,
                 help="shrink the width (head dim and GQA group kept)")
  w.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                 help="weights and activations (auto: bfloat16 on an accelerator, else float32)")
  for flag, default, text in (("--batch", 32, "requests B"),
                              ("--prompt-len", 192, "random prompt tokens per request P"),
                              ("--gen-length", 64, "generated tokens per request G, one per step"),
                              ("--block-length", 32, "block length; divides --gen-length")):
    w.add_argument(flag, type=positive_int, default=default, help=f"{text} (default {default})")
  w.add_argument("--seed", type=int, default=0, help="weights and prompts")
  m = p.add_argument_group("modes and measurements")
  m.add_argument("--modes", type=parse_modes, default=list(MODES),
                 help="comma-separated subset of dense,dual,sparse, or 'none' (sweep only)")
  m.add_argument("--memory-budget-gb", type=positive_float,
                 help="weights + KV pool + activation peak, GiB (memory_budget_bytes)")
  m.add_argument("--pool-sweep", type=_csv(float, "--pool-sweep"), default=[],
                 help="fractions of free device memory, e.g. 0.2,0.4: repeat --sweep-mode with "
                      "memory_budget_bytes = F x free memory")
  m.add_argument("--sweep-mode", choices=MODES, default="sparse",
                 help="the mode --pool-sweep repeats (default sparse)")
  m.add_argument("--device-memory-gb", type=positive_float,
                 help="free device memory for --pool-sweep (default: measured)")
  m.add_argument("--repeats", type=positive_int, default=5, help="single-phase timed runs")
  m.add_argument("--no-single-phase", action="store_true",
                 help="skip the single-phase timings (a Refresh-only and a Reuse-only step)")
  m.add_argument("--compile-cache", help="persistent compilation cache directory (default: "
                 "none, unless JAX already has one; the JSON names the one in use)")
  m.add_argument("--out", help="write the result JSON here")
  add_engine_args(p, sparse_default="per_head")


def _machine() -> dict:
  import jax
  dev = jax.devices()[0]
  return dict(device=dev.device_kind, backend=jax.default_backend(), jax=jax.__version__,
              device_count=jax.device_count(), platform=platform.platform(),
              python=platform.python_version(), cpu_count=os.cpu_count())


def _model_info(mcfg, dtype) -> dict:
  import jax.numpy as jnp
  return dict(name=mcfg.name, family=mcfg.family, layers=mcfg.num_layers,
              hidden_size=mcfg.hidden_size, heads=mcfg.num_heads, kv_heads=mcfg.num_kv_heads,
              head_dim=mcfg.head_dim, intermediate_size=mcfg.intermediate_size,
              vocab_size=mcfg.vocab_size, parameters=mcfg.num_params(), dtype=jnp.dtype(dtype).name,
              weights_bytes=mcfg.num_params() * jnp.dtype(dtype).itemsize,
              linear_flops_per_token=ph.linear_flops_per_token(mcfg))


def _write(result: dict, path: str | None) -> None:
  if path:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
      json.dump(result, fh, indent=1)
    os.replace(tmp, path)


def _fmt(v, spec=".1f"):
  return "-" if v is None else format(v, spec)


def _print(result: dict) -> None:
  print("| mode | tok/s | first call s | host % | pool pages | Refresh step ms (TFLOP/s) "
        "| Reuse step ms (TFLOP/s) |")
  print("|---|---|---|---|---|---|---|")
  rows = [(r["mode"], r) for r in result["modes"]]
  rows += [(f"{result['pool_sweep']['mode']} @ {p['fraction']:g} free", p)
           for p in (result.get("pool_sweep") or {}).get("points", [])]
  for name, r in rows:
    if "error" in r:
      print(f"| {name} | error: {r['error'][:80]} |||||")
      continue
    sp = r.get("single_phase") or {}
    cell = lambda x: "-" if not x else ("error" if "error" in x else
                                        f"{1e3 * x['seconds']:.2f} ({x['tflops']:.3g})")
    share = None if r["host_share"] is None else 100 * r["host_share"]
    print(f"| {name} | {r['tokens_per_s']:.1f} | {r['first_call_s']:.1f} | {_fmt(share)} "
          f"| {r['pool_pages']} | {cell(sp.get('refresh'))} | {cell(sp.get('reuse'))} |")


def run(args) -> int:
  """``dllm-jax bench e2e``; returns 0, or 1 when a mode or sweep point failed."""
  import jax
  import jax.numpy as jnp
  if args.compile_cache:
    from dllm_jax import compile_cache
    compile_cache.enable(args.compile_cache)
  mcfg = load_model_config(args.config, args.layers, args.hidden_size)
  base = base_engine_config(args, mcfg)
  if args.block_length > args.gen_length or args.gen_length % args.block_length:
    raise ValueError(f"--gen-length {args.gen_length} must be a multiple of --block-length "
                     f"{args.block_length}")
  if not args.modes and not args.pool_sweep:
    raise ValueError("--modes none: nothing to run without --pool-sweep")
  if any(not 0 < f <= 1 for f in args.pool_sweep):
    raise ValueError(f"--pool-sweep: fractions must be in (0, 1], got {args.pool_sweep}")
  free, source = ph.free_device_bytes(args.device_memory_gb) if args.pool_sweep else (None, None)
  backend = jax.default_backend()
  dtype = {"auto": jnp.float32 if backend == "cpu" else jnp.bfloat16, "float32": jnp.float32,
           "bfloat16": jnp.bfloat16}[args.dtype]
  from dllm_jax.bench.random_model import build_model
  t = time.perf_counter()
  model = build_model(mcfg, dtype, seed=args.seed)
  init_s = time.perf_counter() - t
  prompts = random_prompts(mcfg, args.batch, args.prompt_len, args.seed)
  result = dict(
      version=RESULT_VERSION, tool="dllm-jax bench e2e", complete=False, **_machine(),
      argv=sys.argv[1:], model=_model_info(mcfg, dtype), model_init_s=init_s,
      workload=dict(batch=args.batch, prompt_len=args.prompt_len, gen_length=args.gen_length,
                    block_length=args.block_length, steps=args.gen_length, temperature=0.0,
                    stop_on_eos=False, tokens_per_call=args.batch * args.gen_length,
                    seed=args.seed),
      engine_config=dataclasses.asdict(base), flop_formula=ph.FLOP_FORMULA,
      compile_cache=jax.config.jax_compilation_cache_dir or None, modes=[])
  failed = False
  for mode in args.modes:
    r = _guarded(run_mode, model, mcfg, mode_config(base, mode), mode, args, prompts)
    r.setdefault("mode", mode)
    failed |= "error" in r or any("error" in (x or {})
                                  for x in (r.get("single_phase") or {}).values())
    result["modes"].append(r)
    _write(result, args.out)
  if args.pool_sweep:
    sweep = dict(mode=args.sweep_mode, free_device_bytes=free, free_source=source, points=[])
    result["pool_sweep"] = sweep
    for f in args.pool_sweep:
      cfg = mode_config(base, args.sweep_mode).replace(memory_budget_bytes=int(f * free))
      r = _guarded(run_mode, model, mcfg, cfg, args.sweep_mode, args, prompts, False)
      r.update(fraction=f, memory_budget_bytes=int(f * free))
      failed |= "error" in r
      sweep["points"].append(r)
      _write(result, args.out)
  result["complete"] = True
  _write(result, args.out)
  _print(result)
  if args.out:
    print(f"wrote {args.out}")
  return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
  """``python -m dllm_jax.bench.e2e ARGS`` = ``dllm-jax bench e2e ARGS`` (the same parser, errors
  and exit codes)."""
  from dllm_jax import cli
  return cli.main(["bench", "e2e", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  sys.exit(main())
