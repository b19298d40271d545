"""Helpers of ``dllm-jax bench e2e``: one phase of the fused step timed alone, its analytic FLOP
count, free device memory, and the backend compile events of a run.

:func:`single_phase_seconds` is the ONE place that reaches into the engine's internals (the
bucketed step inputs, the jitted runner step, the static step config, the KV pool); everything
else in the benchmark goes through the public ``LLM`` API.
"""

from __future__ import annotations

import contextlib
import statistics
import time

PHASES = ("refresh", "reuse")

# The analytic FLOP model of one step, stated in every result JSON.
FLOP_FORMULA = {
    "linear_per_token": "2 * L * (d*Hq*D + 2*d*Hkv*D + Hq*D*d + 3*d*F)  (q, k, v, o, SwiGLU "
                        "gate/up/down; embeddings, norms, RoPE and biases not counted)",
    "refresh_step": "T = Br*N fed tokens: linear_per_token * T + L * 4 * T * N * Hq*D "
                    "(QK^T and PV over all N keys, non-causal) + 2 * d * V * Br*C (LM head on "
                    "the candidate rows)",
    "reuse_step": "T = Bu*Lq fed tokens: linear_per_token * T + L * 4 * T * (keep + Lb) * Hq*D "
                  "(each query reads its head's kept tokens plus the block's fresh K/V) + "
                  "2 * d * V * Bu*C",
    "symbols": "L layers, d hidden size, Hq/Hkv query/KV heads, D head dim, F MLP hidden, V vocab; "
               "Br/Bu rows and N length of the step's buckets, C candidate bucket (pow2 >= block "
               "length, >= 8), Lq = C (+1 for Dream's query-only row), Lb block length, keep the "
               "kept tokens per KV head; padding rows and tokens of a bucket are counted "
               "(the device computes them)",
    "tflops": "flops / median seconds of the step run alone / 1e12",
}


def linear_flops_per_token(mcfg) -> int:
  d, f, hd = mcfg.hidden_size, mcfg.intermediate_size, mcfg.head_dim
  q, kv = mcfg.num_heads * hd, mcfg.num_kv_heads * hd
  return 2 * mcfg.num_layers * (d * q + 2 * d * kv + q * d + 3 * d * f)


def step_flops(mcfg, phase: str, *, rows: int, length: int, query_rows: int, cand: int,
               keys: int) -> int:
  """FLOPs of one step of ``phase`` (see FLOP_FORMULA). refresh: ``rows`` x ``length`` tokens,
  every token attends to ``length`` keys; reuse: ``rows`` x ``query_rows`` tokens attending to
  ``keys`` keys (kept + block)."""
  if phase not in PHASES:
    raise ValueError(f"phase: expected one of {PHASES}, got {phase!r}")
  qd = mcfg.num_heads * mcfg.head_dim
  if phase == "refresh":
    tokens, keys = rows * length, length
  else:
    tokens = rows * query_rows
  attn = mcfg.num_layers * 4 * tokens * keys * qd
  head = 2 * mcfg.hidden_size * mcfg.vocab_size * rows * cand
  return linear_flops_per_token(mcfg) * tokens + attn + head


def single_phase_seconds(core, phase: str, rows: int, length: int, block: int, keep: float, *,
                         repeats: int = 5, timings: dict | None = None) -> float:
  """Median seconds of ONE fused engine step holding only ``phase`` rows, run alone.

  core: an ``EngineCore`` (``LLM.core``) that is idle (no request running);
  phase: "refresh" -> ``rows`` Refresh rows of ``length`` valid tokens (length bucket
    pow2 >= length, >= 32), no Select; "reuse" -> ``rows`` Reuse rows of a ``block``-token
    block at the end of a ``length``-token canvas, each KV head of each row (slots 0..rows-1)
    attending to n_keep(length - block, keep) kept tokens in the KV pool plus the block;
  keep: the keep ratio (reuse only);
  repeats: timed runs after one untimed first call (which compiles the bucket if new).
  ``timings`` (optional dict) receives: shapes (the bucket), keep_tokens, first_call_s, runs_s,
  compiles (new step executables of the first call).

  Engine internals used (ported by whoever changes them): ``engine.batch.Shapes`` and
  ``dummy_step``, ``runner.pow2_at_least``, ``core._static``, ``core.runner.step`` (donates the
  cache, returns (cache, x0, commit)), ``core.runner.cache_specs`` / ``.mesh`` with
  ``parallel.put``, ``core.cache`` (a
  ``SparseCache``: k/v pool, page_table [slots, L, Hkv, MP], kv_len [slots, L, Hkv]),
  ``core.pool_cfg``, ``core.reserved_width``, ``core.max_len_bucket``, ``core.mcfg``. The pool's
  page tables are restored afterwards, so the engine can keep serving.
  """
  import jax
  import numpy as np

  from dllm_jax import parallel
  from dllm_jax.cache.page_pool import SparseCache
  from dllm_jax.cache.selection import n_keep
  from dllm_jax.engine.batch import Shapes, dummy_step
  from dllm_jax.engine.runner import pow2_at_least

  if phase not in PHASES:
    raise ValueError(f"phase: expected one of {PHASES}, got {phase!r}")
  if not 1 <= block <= length:
    raise ValueError(f"block: expected 1 <= block <= length ({length}), got {block}")
  if core.has_unfinished():
    raise RuntimeError("single_phase_seconds needs an idle engine (requests are running)")
  mcfg, pool = core.mcfg, core.pool_cfg
  cand = pow2_at_least(block, 8)
  lq = cand + (1 if mcfg.shifted_prediction else 0)
  br = pow2_at_least(rows)
  i32 = np.int32
  kept = 0
  if phase == "refresh":
    n = min(pow2_at_least(length, 32), core.max_len_bucket)
    shapes = Shapes(refresh_rows=br, length=n, reuse_rows=0, query_rows=lq, cand=cand)
  else:
    if rows > pool.max_slots:
      raise ValueError(f"rows: at most max_running={pool.max_slots} Reuse rows, got {rows}")
    shapes = Shapes(refresh_rows=0, length=0, reuse_rows=br, query_rows=lq, cand=cand)
  inp = dummy_step(mcfg, shapes, max_slots=pool.max_slots, reserved_width=core.reserved_width)
  old = core.cache
  cache = old
  if phase == "refresh":
    lengths = np.where(np.arange(br) < rows, min(length, shapes.length), 1).astype(i32)
    inp = inp.replace(refresh=inp.refresh.replace(lengths=lengths))
  else:
    kept = n_keep(length - block, keep)
    mp = pool.max_pages_per_head
    if kept > mp * pool.page_size:
      raise ValueError(f"keep: {kept} tokens per head exceed the page table ({mp} pages)")
    start = length - block
    positions = np.zeros((br, lq), i32)
    positions[:, :cand] = np.minimum(start + np.arange(cand), length - 1)
    new_len = np.where(np.arange(br) < rows, block, 0).astype(i32)
    slots = np.minimum(np.arange(br), pool.max_slots - 1).astype(i32)
    inp = inp.replace(reuse=inp.reuse.replace(positions=positions, new_len=new_len, slots=slots))
    # Every (row, layer, head) holds `kept` tokens on distinct pages while the pool has them.
    npg = -(-kept // pool.page_size)
    table = np.zeros(old.page_table.shape, i32)
    heads = table.shape[2]
    ids = 1 + np.arange(rows * mcfg.num_layers * heads * npg) % (pool.num_pages - 1)
    table[:rows, :, :, :npg] = ids.reshape(rows, mcfg.num_layers, heads, npg)
    kv_len = np.zeros(old.kv_len.shape, i32)
    kv_len[:rows] = kept
    specs, mesh = core.runner.cache_specs(), core.runner.mesh
    cache = SparseCache(k=old.k, v=old.v, page_table=parallel.put(table, mesh, specs.page_table),
                        kv_len=parallel.put(kv_len, mesh, specs.kv_len))
  static = core._static(shapes, False, False)
  compiles0 = core.runner.compile_count
  runs = []
  try:
    t = time.perf_counter()
    cache, x0, _ = core.runner.step(cache, inp, static)
    jax.block_until_ready(x0)
    first = time.perf_counter() - t
    for _ in range(repeats):
      t = time.perf_counter()
      cache, x0, _ = core.runner.step(cache, inp, static)
      jax.block_until_ready(x0)
      runs.append(time.perf_counter() - t)
  finally:  # the step donates the pool: hand the live buffers back (Reuse: the original tables)
    core.cache = cache if phase == "refresh" else SparseCache(
        k=cache.k, v=cache.v, page_table=old.page_table, kv_len=old.kv_len)
  if timings is not None:
    timings.update(shapes=dict(refresh_rows=shapes.refresh_rows, length=shapes.length,
                               reuse_rows=shapes.reuse_rows, query_rows=shapes.query_rows,
                               cand=shapes.cand),
                   keep_tokens=kept, first_call_s=first, runs_s=runs,
                   compiles=core.runner.compile_count - compiles0)
  return statistics.median(runs) if runs else first


def free_device_bytes(device_memory_gb: float | None = None) -> tuple[int, str]:
  """(bytes, source): ``--device-memory-gb`` if given, else the accelerator's memory_stats
  (limit - in use), else the host's available memory (CPU backend)."""
  if device_memory_gb is not None:
    return int(device_memory_gb * 2**30), "--device-memory-gb"
  import jax
  stats = None
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 -- some backends do not implement it
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), "memory_stats"
  try:
    import psutil
    return int(psutil.virtual_memory().available), "psutil.available"
  except ImportError:
    pass
  with open("/proc/meminfo") as fh:
    for line in fh:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
  raise RuntimeError("cannot tell the free device memory; pass --device-memory-gb")


@contextlib.contextmanager
def compile_events():
  """Collect XLA backend compile durations ({"name", "s"}) while the block runs (a persistent
  compilation-cache hit shows up as a short one)."""
  import jax.monitoring as mon
  events: list[dict] = []

  def listener(event: str, duration: float, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(dict(name=str(kw.get("fun_name", "?")), s=float(duration)))

  mon.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    mon.unregister_event_duration_listener(listener)


def summarize_compiles(events: list[dict], top: int = 12) -> dict:
  slow = sorted(events, key=lambda e: -e["s"])[:top]
  total = sum(e["s"] for e in events)
  return dict(count=len(events), total_s=total, mean_s=total / len(events) if events else None,
              max_s=max((e["s"] for e in events), default=0.0), slowest=slow)
