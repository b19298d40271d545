"""Time the engine's full warm-up (every step bucket compiled) with a persistent compile cache
(a gpu-check stage; run it twice on one cache directory: cold, then from the cache).

    PYTHONPATH=. python3 scripts/gpu_warmup.py --config llada-8b --layers 32 \\
        --cache-dir /tmp/jax-cache --out warmup_cold.json      # then again: from the cache

Random weights at the preset's width (as ``bench e2e``: ``--layers`` / ``--hidden-size`` shrink
it) and the engine flags of ``serve`` (their defaults: the server's EngineConfig). Reports:
model init, engine build and ``core.warmup`` seconds, the step executables it
compiled (and the engine's bound on them), the backend compile events (a cache hit is
a short one) and the cache directory's entry count before and after. What ``serve --warmup``
runs: ``core.warmup("full")`` where the engine takes a mode, else ``core.warmup()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time


def _entries(path: str) -> int:
  return sum(len(files) for _, _, files in os.walk(path)) if os.path.isdir(path) else 0


def warmup_call(core):
  """(seconds, new executables, the call made): the full warm-up in whichever form the engine
  offers."""
  params = list(inspect.signature(core.warmup).parameters.values())
  t = time.perf_counter()
  if params and params[0].name in ("mode", "level", "kind"):
    n, call = core.warmup("full"), 'core.warmup("full")'
  else:
    n, call = core.warmup(), "core.warmup()"
  return time.perf_counter() - t, n, call


def _bound(core, cfg) -> int:
  """Step executables the engine can ever compile (its own count where it offers one)."""
  if callable(getattr(core, "executable_bound", None)):
    return core.executable_bound()
  from dllm_jax.engine.runner import executable_bound
  return executable_bound(cfg.max_refresh_rows, core.max_len_bucket, cfg.max_reuse_rows,
                          cfg.max_block_length)


def main(argv=None) -> int:
  from dllm_jax.engine_flags import add_engine_args, engine_config_from_args
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="llada-8b")
  p.add_argument("--layers", type=int)
  p.add_argument("--hidden-size", type=int)
  p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
  p.add_argument("--cache-dir", required=True, help="persistent compilation cache directory")
  p.add_argument("--out", required=True)
  add_engine_args(p, sparse_default="per_head")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from dllm_jax.bench import e2e_phase as ph
  from dllm_jax.bench.e2e import load_model_config
  from dllm_jax.engine.engine import LLM
  from dllm_jax.model.transformer import init_model

  entries_before = _entries(args.cache_dir)
  from dllm_jax import compile_cache
  cache_dir = compile_cache.enable(args.cache_dir)
  mcfg = load_model_config(args.config, args.layers, args.hidden_size)
  cfg = engine_config_from_args(args)
  dtype = {"auto": jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16,
           "float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  t = time.perf_counter()
  model = init_model(mcfg, param_dtype=dtype, seed=0)
  jax.block_until_ready(jax.tree.leaves(model))
  init_s = time.perf_counter() - t
  t = time.perf_counter()
  llm = LLM(model, engine_config=cfg)
  core = llm.core
  build_s = time.perf_counter() - t
  with ph.compile_events() as events:
    secs, n, call = warmup_call(core)
  ready = len(core.runner.executables)
  result = dict(
      device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
      model=dict(name=mcfg.name, layers=mcfg.num_layers, hidden_size=mcfg.hidden_size,
                 parameters=mcfg.num_params(), dtype=jnp.dtype(dtype).name),
      engine_config=dataclasses.asdict(cfg),
      call=call, model_init_s=init_s, engine_build_s=build_s, warmup_s=secs,
      # ready = compiled now + loaded from the executable store (a cached start compiles none)
      executables=ready, compiled=n, loaded=ready - n,
      engine_compile_count=core.runner.compile_count, executable_bound=_bound(core, cfg),
      seconds_per_executable=secs / ready if ready else None,
      backend_compiles=ph.summarize_compiles(events), cache_dir=cache_dir,
      cache_entries_before=entries_before, cache_entries_after=_entries(args.cache_dir))
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=1)
  print(f"{call}: {secs:.1f} s, {ready} executables ({n} compiled, {ready - n} loaded), "
        f"cache entries {entries_before} -> "
        f"{result['cache_entries_after']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
