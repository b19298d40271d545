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
    "refresh_step": "T = rows*N tokens: linear_per_token * T + L * 4 * T * N * Hq*D (QK^T and PV "
                    "over the row's N keys, non-causal) + 2 * d * V * rows*Lb (LM head on the "
                    "block's candidates)",
    "reuse_step": "T = rows*(Lb + s) tokens: linear_per_token * T + L * 4 * T * (keep + Lb) * "
                  "Hq*D (each query reads its head's kept tokens plus the block's fresh K/V) + "
                  "2 * d * V * rows*Lb",
    "symbols": "L layers, d hidden size, Hq/Hkv query/KV heads, D head dim, F MLP hidden, V vocab; "
               "rows, N canvas length, Lb block length, keep kept tokens per KV head, s = 1 for "
               "Dream's query-only row (else 0). Useful work only: the padding of the step's "
               "bucket is not counted (it lowers the achieved figure)",
    "tflops": "flops / median seconds of the step run alone / 1e12",
}


def linear_flops_per_token(mcfg) -> int:
  d, f, hd = mcfg.hidden_size, mcfg.intermediate_size, mcfg.head_dim
  q, kv = mcfg.num_heads * hd, mcfg.num_kv_heads * hd
  return 2 * mcfg.num_layers * (d * q + 2 * d * kv + q * d + 3 * d * f)


def step_flops(mcfg, phase: str, *, rows: int, length: int, block: int, keep: int = 0) -> int:
  """Useful FLOPs of one step of ``phase`` (see FLOP_FORMULA): refresh = ``rows`` canvases of
  ``length`` tokens; reuse = ``rows`` blocks of ``block`` tokens attending to ``keep`` kept
  tokens per KV head plus the block."""
  if phase not in PHASES:
    raise ValueError(f"phase: expected one of {PHASES}, got {phase!r}")
  qd = mcfg.num_heads * mcfg.head_dim
  if phase == "refresh":
    tokens, keys = rows * length, length
  else:
    tokens, keys = rows * (block + (1 if mcfg.shifted_prediction else 0)), keep + block
  attn = mcfg.num_layers * 4 * tokens * keys * qd
  head = 2 * mcfg.hidden_size * mcfg.vocab_size * rows * block
  return linear_flops_per_token(mcfg) * tokens + attn + head


def single_phase_seconds(core, phase: str, rows: int, length: int, block: int, keep: float, *,
                         repeats: int = 5, timings: dict | None = None) -> float:
  """Median seconds of ONE fused engine step holding only ``phase`` rows, run alone.

  core: an idle ``EngineCore`` (``LLM.core``);
  phase "refresh": ``rows`` Refresh rows of ``length`` tokens, no Select, the last ``block``
    positions of each row are the decode candidates;
  phase "reuse": ``rows`` Reuse rows of a ``block``-token block at the end of a ``length``-token
    canvas, each KV head of each row (slots 0..rows-1) attending to n_keep(length - block, keep)
    kept tokens in the KV pool plus the block, every block position a candidate;
  keep: the keep ratio (reuse only); repeats: timed runs after one untimed first call (which
  compiles the bucket if it is new). ``timings`` (optional dict) receives: shapes (the bucket
  and its layout), keep_tokens, first_call_s, runs_s, compiles (new step executables).

  Engine internals used (port them here when they change): ``core.grid.choose`` /
  ``cand_width``, ``core.layout``, ``core.step_key``, ``engine.batch.dummy_step`` and the
  StepInputs fields it fills (flat tokens/positions/inverse, refresh index/lengths, reuse
  index/n_query/new_len/slots, cand src/pos/cell/count), ``core.runner.step`` (donates the
  cache), ``core.runner.cache_specs`` / ``.mesh`` with ``parallel.put``, ``core.cache`` (a
  ``SparseCache``: page_table [slots, L, Hkv, MP], kv_len [slots, L, Hkv]), ``core.pool_cfg``,
  ``core.reserved_width``, ``core.mcfg``. The pool's page tables are restored afterwards, so the
  engine keeps serving.
  """
  import jax
  import numpy as np

  from dllm_jax import parallel
  from dllm_jax.cache.page_pool import SparseCache
  from dllm_jax.cache.selection import n_keep
  from dllm_jax.engine.batch import dummy_step

  if phase not in PHASES:
    raise ValueError(f"phase: expected one of {PHASES}, got {phase!r}")
  if not 1 <= block <= length:
    raise ValueError(f"block: expected 1 <= block <= length ({length}), got {block}")
  if core.has_unfinished():
    raise RuntimeError("single_phase_seconds needs an idle engine (requests are running)")
  mcfg, pool = core.mcfg, core.pool_cfg
  if block > core.grid.cand_width:
    raise ValueError(f"block: at most max_block_length={core.grid.cand_width}, got {block}")
  if phase == "reuse" and rows > pool.max_slots:
    raise ValueError(f"rows: at most max_running={pool.max_slots} Reuse rows, got {rows}")
  i32 = np.int32
  extra = 1 if mcfg.shifted_prediction else 0
  start = length - block
  if phase == "refresh":
    shapes = core.grid.choose(rows * length, length, rows, 0)
  else:
    shapes = core.grid.choose(rows * (block + extra), 0, 0, rows)
  if shapes is None:
    raise ValueError(f"no bucket of this engine holds {rows} {phase} rows of {length} tokens")
  lay = core.layout(shapes)
  inp = dummy_step(mcfg, lay, max_slots=pool.max_slots, reserved_width=core.reserved_width)
  tokens, positions, inverse = (np.array(x) for x in (inp.flat.tokens, inp.flat.positions,
                                                       inp.flat.inverse))
  cand = {k: np.array(getattr(inp.cand, k)) for k in ("src", "pos", "cell", "count")}
  c, j = lay.cand_width, np.arange(block, dtype=i32)
  src, pos, cell = [], [], []
  old, cache, kept = core.cache, core.cache, 0
  if phase == "refresh":
    n = lay.length
    index, lengths = np.array(inp.refresh.index), np.array(inp.refresh.lengths)
    for i in range(rows):
      off = i * length
      positions[off:off + length] = np.arange(length)
      inverse[off:off + length] = i * n + np.arange(length)
      index[i, :length] = off + np.arange(length)
      lengths[i] = length
      src.append(off + (np.maximum(start + j - 1, 0) if extra else start + j))
      pos.append(start + j)
      cell.append(i * c + j)
    inp = inp.replace(refresh=inp.refresh.replace(index=index, lengths=lengths))
  else:
    kept = n_keep(length - block, keep)
    mp = pool.max_pages_per_head
    if kept > mp * pool.page_size:
      raise ValueError(f"keep: {kept} tokens per head exceed the page table ({mp} pages)")
    lq, nq = lay.query_width, block + extra
    base = lay.refresh_rows * lay.length
    ru = {k: np.array(getattr(inp.reuse, k)) for k in ("index", "n_query", "new_len", "slots")}
    for u in range(rows):
      off = u * nq
      positions[off:off + block] = start + j
      if extra:
        positions[off + block] = start - 1
      inverse[off:off + nq] = base + u * lq + np.arange(nq)
      ru["index"][u, :nq] = off + np.arange(nq)
      ru["n_query"][u], ru["new_len"][u], ru["slots"][u] = nq, block, u
      src.append(off + (np.where(j == 0, block, j - 1) if extra else j))
      pos.append(start + j)
      cell.append((lay.refresh_rows + u) * c + j)
    inp = inp.replace(reuse=inp.reuse.replace(**ru))
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
  count = min(rows * block, len(cand["src"]))
  cand["src"][:count] = np.concatenate(src)[:count]
  cand["pos"][:count] = np.concatenate(pos)[:count]
  cand["cell"][:count] = np.concatenate(cell)[:count]
  cand["count"][0] = count
  inp = inp.replace(flat=inp.flat.replace(tokens=tokens, positions=positions, inverse=inverse),
                    cand=inp.cand.replace(**cand))
  key = core.step_key(shapes)
  compiles0 = core.runner.compile_count
  runs = []
  try:
    t = time.perf_counter()
    cache, x0, _ = core.runner.step(cache, inp, key, key[1])
    jax.block_until_ready(x0)
    first = time.perf_counter() - t
    for _ in range(repeats):
      t = time.perf_counter()
      cache, x0, _ = core.runner.step(cache, inp, key, key[1])
      jax.block_until_ready(x0)
      runs.append(time.perf_counter() - t)
  finally:  # the step donates the pool: hand the live buffers back (Reuse: the original tables)
    core.cache = cache if phase == "refresh" else SparseCache(
        k=cache.k, v=cache.v, page_table=old.page_table, kv_len=old.kv_len)
  if timings is not None:
    timings.update(shapes=dict(tokens=shapes.tokens, length=shapes.length,
                               refresh_rows=lay.refresh_rows, reuse_rows=lay.reuse_rows,
                               query_rows=lay.query_width, cand=lay.cand_width,
                               candidates=count),
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
