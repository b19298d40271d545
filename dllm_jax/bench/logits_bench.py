"""``dllm-jax bench logits``: peak activation bytes and time of each logit variant.

Two sizes:
- LLaDA-8B (rows 8192, d 4096, V 126464, bf16): the analytic peak (the budgeter's model) and, on
  CPU, XLA's ``memory_analysis()`` temp bytes of the compiled program (compile only, nothing
  runs); on a GPU the programs also run and are timed.
- a CPU size that runs (default rows 1024, d 256, V 32768, f32): peak and median time.
- the fused Pallas kernel's analytic peak (its tiles stay on chip; only partial stats are stored).
Every program computes per-row (token, confidence) through ``variants.decode_rows``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from dllm_jax.logits import budgeter, variants
from pallas_kernels.fused_lm_head import ops

# C = rows / 8 (1024 at 8192 rows, as in the H100 figures); None = all rows / the whole vocab.
PLANS = (("rows", None, None), ("row_chunked", 8, None), ("vocab_tiled", 8, 4096))


def _fn(variant, c, tv, rows):
  def f(h, w):
    p = variants.RowParams.create(jnp.arange(rows, dtype=jnp.int32))
    out = variants.decode_rows(h, w, p, variant=variant, chunk_rows=c or 1024,
                               vocab_tile=tv or 8192)
    return out.token, out.confidence
  return jax.jit(f)


def measure(rows, d, vocab, dtype, *, run: bool, repeats: int):
  out = []
  hs = jax.ShapeDtypeStruct((rows, d), dtype)
  ws = jax.ShapeDtypeStruct((d, vocab), dtype)
  if run:
    key = jax.random.PRNGKey(0)
    h = jax.random.normal(key, (rows, d), dtype)
    w = jax.random.normal(jax.random.PRNGKey(1), (d, vocab), dtype) * d ** -0.5
  for variant, c, tv in PLANS:
    c = max(1, rows // c) if c else None
    fn = _fn(variant, c, tv, rows)
    compiled = fn.lower(hs, ws).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    row = dict(variant=variant, chunk_rows=c, vocab_tile=tv,
               analytic_mib=budgeter.estimate_bytes(variant, rows, d, vocab, dtype, c, tv) / 2**20,
               gpu_analytic_mib=budgeter.estimate_bytes(variant, rows, d, vocab, dtype, c, tv,
                                                        backend="gpu") / 2**20,
               xla_temp_mib=temp / 2**20)
    if run:
      jax.block_until_ready(fn(h, w))
      ts = []
      for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(h, w))
        ts.append(time.perf_counter() - t)
      row["ms"] = statistics.median(ts) * 1e3
    out.append(row)
  # The fused Pallas kernel keeps its tiles on chip: only [splits, R] partial stats hit memory.
  splits = ops.kernel_blocks(rows, d, vocab)[3]
  kern = budgeter.estimate_bytes("vocab_tiled", rows, d, vocab, dtype, backend="gpu",
                                 impl="pallas", vocab_splits=splits) / 2**20
  out.append(dict(variant="vocab_tiled (Pallas kernel)", chunk_rows=None, vocab_tile=None,
                  analytic_mib=kern, gpu_analytic_mib=kern, xla_temp_mib=None))
  return out


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--rows", type=int, default=1024, help="rows of the runnable size")
  p.add_argument("--d", type=int, default=256)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--skip-8b", action="store_true", help="skip the LLaDA-8B compile-only rows")
  p.add_argument("--out", help="write JSON here")


def _table(title, rows):
  lines = [f"**{title}**", "",
           "| variant | C | Tv | analytic peak MiB (this backend) | analytic MiB (GPU) "
           "| XLA temp MiB | time ms |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    ms = f"{r['ms']:.1f}" if "ms" in r else "—"
    temp = "—" if r["xla_temp_mib"] is None else f"{r['xla_temp_mib']:.1f}"
    lines.append(f"| {r['variant']} | {r['chunk_rows'] or '—'} | {r['vocab_tile'] or '—'} | "
                 f"{r['analytic_mib']:.1f} | {r['gpu_analytic_mib']:.2f} | {temp} | {ms} |")
  return "\n".join(lines)


def run(args) -> int:
  backend = jax.default_backend()
  result = dict(backend=backend, device=str(jax.devices()[0]))
  if not args.skip_8b:
    big = measure(8192, 4096, 126464, jnp.bfloat16, run=backend != "cpu", repeats=args.repeats)
    result["llada_8b"] = big
    mono = next(r for r in big if r["variant"] == "rows")
    tiled = next(r for r in big if r["variant"] == "vocab_tiled")
    kern = big[-1]
    print(_table(f"LLaDA-8B shapes: 8192 x 4096 @ 4096 x 126464 bf16 ({backend})", big))
    print(f"\nvocab_tiled peak vs monolithic: {mono['analytic_mib'] / tiled['analytic_mib']:.0f}x "
          f"lower (analytic), {mono['xla_temp_mib'] / tiled['xla_temp_mib']:.0f}x (XLA temp); "
          f"fused kernel: {mono['gpu_analytic_mib'] / kern['gpu_analytic_mib']:.0f}x (GPU "
          f"analytic)\n")
  dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
  small = measure(args.rows, args.d, args.vocab, dtype, run=True, repeats=args.repeats)
  result["runnable"] = small
  print(_table(f"runnable: {args.rows} x {args.d} @ {args.d} x {args.vocab} "
               f"{jnp.dtype(dtype).name} ({backend})", small))
  rows_ms = next(r for r in small if r["variant"] == "rows")["ms"]
  tiled_ms = next(r for r in small if r["variant"] == "vocab_tiled")["ms"]
  print(f"\nvocab_tiled time / rows time = {tiled_ms / rows_ms:.2f}")
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(result, fh, indent=2)
  return 0
