"""``dllm-jax bench logits --calibrate``: time the logit variants here, write the budgeter's table.

Each variant is timed with greedy rows (token + max-softmax confidence, ``variants.decode_rows``)
at row counts n: ``rows`` and the fused kernel on n rows, ``row_chunked`` and the jnp
``vocab_tiled`` on 2n rows in chunks of n (so the per-chunk loop is in the figure). The entry
stores the fastest of ``repeats`` runs in seconds per row (other processes only ever add time:
on a shared machine the minimum is the stable figure); the runs go round-robin over all cells,
so a busy spell slows every variant alike. On CPU the clock is the process's CPU time (all
threads): on this shared 2-core machine at load 7-8, wall time per row varied 2x between runs and
variants, CPU time by about 10 % (the wall times of an idle run match CPU time / 2 threads).
``calibration.py`` says how the budgeter uses the entry.

Sizes: on a GPU the real LLaDA-8B width (d 4096, V 126464, bf16) at n = 256 .. 8192; on CPU a
width that runs in seconds (d 256, V 32768, f32) at n = 16 .. 1024. The kernel is only timed on a
GPU (on CPU it exists only as the interpreter, which the budgeter never picks).
"""

from __future__ import annotations

import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp

from dllm_jax.sampling import calibration, variants
from pallas_kernels.fused_lm_head import tiles

SIZES = {  # backend -> (d, vocab, dtype, row counts)
    "gpu": (4096, 126464, "bfloat16", (256, 1024, 4096, 8192)),
    "cpu": (256, 32768, "float32", (16, 64, 256, 1024)),
}
VOCAB_TILE = 8192


def default_size(backend: str):
  return SIZES["gpu" if calibration.norm_backend(backend) == "gpu" else "cpu"]


def wall_times(fn, *args, repeats: int) -> list[float]:
  """Wall times of ``fn(*args)`` over ``repeats`` runs after one warm-up (compile) run."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(max(1, repeats)):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return ts


def decode_fn(key: str, rows: int, chunk_rows: int, vocab_tile: int):
  """jit (hidden, head) -> (token, confidence) for one cost key of the table."""
  variant = "vocab_tiled" if key.startswith("vocab_tiled") else key
  impl = "pallas" if key == "vocab_tiled_kernel" else "reference"

  def f(h, w):
    p = variants.RowParams.create(jnp.arange(rows, dtype=jnp.int32))
    out = variants.decode_rows(h, w, p, variant=variant, chunk_rows=chunk_rows,
                               vocab_tile=vocab_tile, impl=impl)
    return out.token, out.confidence

  return jax.jit(f)


def hidden(rows: int, d: int, dtype, seed: int = 0):
  return jax.random.normal(jax.random.PRNGKey(seed), (rows, d), dtype)


def head(d: int, vocab: int, dtype):
  """A head with unit-scale logits (LLaDA-like spread) for unit-normal hidden rows."""
  return (jax.random.normal(jax.random.PRNGKey(1), (d, vocab), jnp.float32)
          * d ** -0.5).astype(dtype)


def measure_entry(ns=None, d=None, vocab=None, dtype=None, *, repeats: int = 3,
                  keys=None, log=print) -> dict:
  """Time every cost key at each n; returns a table entry (JSON object) for this device."""
  backend = calibration.norm_backend(jax.default_backend())
  dd, dv, dt, dn = default_size(backend)
  d, vocab, dtype, ns = d or dd, vocab or dv, jnp.dtype(dtype or dt), tuple(ns or dn)
  if keys is None:
    keys = calibration.COST_KEYS if backend == "gpu" else calibration.COST_KEYS[:3]
  kind = tiles.local_device()[0]
  tv = min(VOCAB_TILE, vocab)
  w = head(d, vocab, dtype)
  cells = []  # (key, n, rows, compiled fn, hidden)
  failed = set()
  for n in ns:
    for k in keys:
      rows = 2 * n if k in ("row_chunked", "vocab_tiled") else n
      h = hidden(rows, d, dtype, seed=n)
      fn = decode_fn(k, rows, n, tv)
      try:
        jax.block_until_ready(fn(h, w))  # compile + warm up
      except Exception as e:  # noqa: BLE001 -- a variant that cannot run is left out, said so
        log(f"calibrate {k} n={n}: failed ({type(e).__name__}: {str(e)[:300]}); "
            f"{k} is left out of the entry")
        failed.add(k)
        continue
      cells.append((k, n, rows, fn, h))
  cells = [c for c in cells if c[0] not in failed]
  keys = [k for k in keys if k not in failed]
  if not keys:
    raise RuntimeError("calibration: no variant ran")
  # Round-robin: each round times every cell once, so load changes hit all variants alike.
  clock = time.process_time if backend == "cpu" else time.perf_counter
  best = [float("inf")] * len(cells)
  for _ in range(max(1, repeats)):
    for i, (k, n, rows, fn, h) in enumerate(cells):
      t = clock()
      jax.block_until_ready(fn(h, w))
      best[i] = min(best[i], clock() - t)
  cost = {k: [] for k in keys}
  for (k, n, rows, _, _), sec in zip(cells, best):
    cost[k].append(float(f"{sec / rows:.4g}"))
    log(f"calibrate {k:<18} n={n:<5} rows={rows:<5} {sec * 1e3:9.3f} ms "
        f"({sec / rows * 1e6:.3f} us/row{', CPU time' if backend == 'cpu' else ''})")
  when = datetime.date.today().isoformat()
  machine = kind
  if backend == "cpu":  # a shared CPU's figures depend on what else ran: say how busy it was
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
               f"{os.getloadavg()[0]:.1f} at the end")
  return {
      "key": {"backend": backend, "device_kind": kind},
      "source": (f"measured by `dllm-jax bench logits --calibrate` on {kind} ({machine}), "
                 f"jax {jax.__version__}, {when}"),
      "unit": "CPU seconds per row (all threads)" if backend == "cpu" else "seconds per row",
      "shape": {"d": d, "vocab": vocab, "dtype": dtype.name, "vocab_tile": tv,
                "chunked": "2n rows in chunks of n"},
      "rows": list(ns),
      "cost": cost,
  }


def run(out: str | None, *, ns=None, d=None, vocab=None, dtype=None, repeats: int = 3,
        log=print) -> dict:
  """Measure and merge the entry into ``out`` (default: the user file the budgeter reads)."""
  entry = measure_entry(ns, d, vocab, dtype, repeats=repeats, log=log)
  path = out or calibration.user_path()
  table = calibration.write_entry(path, entry)
  log(f"wrote the {entry['key']} entry to {path}")
  if os.path.abspath(path) == os.path.abspath(calibration.user_path()):
    log("the budgeter reads it from now on on this machine (it wins over the packaged table)")
  if os.path.abspath(path) != os.path.abspath(calibration.PACKAGE_TABLE):
    log(f"to ship it: rerun with --out {calibration.PACKAGE_TABLE} (merges this entry into the "
        f"packaged table) and commit that file")
  return table
