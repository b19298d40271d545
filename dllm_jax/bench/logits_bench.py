"""``dllm-jax bench logits``: time, throughput and peak temporaries of each logit variant, against
XLA's plain matmul of the same rows (``dot`` + argmax + max-softmax: the speed bar of issue #16).

- On a GPU: LLaDA-8B width (d 4096, V 126464, bf16) at R in ``--row-counts`` (default 256, 1024,
  4096, 8192). Every variant runs and is timed, the fused Pallas kernel included (with the blocks
  ``tiles.py`` picks for this GPU and R).
- On CPU: the LLaDA-8B programs at 8192 rows are compiled only (XLA temp bytes and the analytic
  peaks; nothing runs), and a runnable size (default 1024 x 256 @ 256 x 32768, f32) is timed. The
  kernel has only its analytic peak there.

Each size reports per variant: C, Tv, analytic peak (this backend; GPU), XLA temp bytes of the
compiled program, median ms, time / plain matmul, achieved TFLOP/s (2 R d V / time), and the
budgeter's choice with an unbounded budget. ``--out`` writes it all as JSON (with the device).

``--calibrate`` measures the budgeter's timing table instead (``logits_calibrate.py``) and writes
it to ``--out`` (default: the user file the budgeter reads; ``--out`` the packaged table to ship).
"""

from __future__ import annotations

import argparse
import json
import statistics

import jax
import jax.numpy as jnp

from dllm_jax.bench import logits_calibrate as cal
from dllm_jax.sampling import budgeter
from pallas_kernels.fused_lm_head import ops

LLADA = (4096, 126464)
GPU_ROWS = (256, 1024, 4096, 8192)
# (label, variant, impl, C = rows // this (None: all rows), Tv). C = rows / 8 is 1024 at 8192 rows,
# as in the H100 memory figures.
PLANS = (
    ("rows", "rows", "reference", None, None),
    ("row_chunked", "row_chunked", "reference", 8, None),
    ("vocab_tiled", "vocab_tiled", "reference", 8, 4096),
    ("vocab_tiled_kernel", "vocab_tiled", "pallas", None, None),
)


def plain_matmul(h, w):
  """The baseline: f32 logits, argmax and the max softmax probability (XLA fuses the tail)."""
  logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
  m = jnp.max(logits, axis=1, keepdims=True)
  return jnp.argmax(logits, axis=1), 1.0 / jnp.sum(jnp.exp(logits - m), axis=1)


def _compiled(fn, rows, d, vocab, dtype):
  return jax.jit(fn).lower(jax.ShapeDtypeStruct((rows, d), dtype),
                           jax.ShapeDtypeStruct((d, vocab), dtype)).compile()


def _time(compiled, h, w, repeats):
  return statistics.median(cal.wall_times(compiled, h, w, repeats=repeats))


def measure(rows, d, vocab, dtype, *, run: bool, repeats: int) -> dict:
  """One size: the baseline and every plan (the kernel only where it runs, else analytic)."""
  dtype = jnp.dtype(dtype)
  on_gpu = jax.default_backend() == "gpu"
  flops = 2.0 * rows * d * vocab
  if run:
    h, w = cal.hidden(rows, d, dtype), cal.head(d, vocab, dtype)
  base = _compiled(plain_matmul, rows, d, vocab, dtype)
  result = dict(rows=rows, d=d, vocab=vocab, dtype=dtype.name, ran=run,
                baseline=dict(xla_temp_mib=base.memory_analysis().temp_size_in_bytes / 2**20))
  if run:
    t = _time(base, h, w, repeats)
    result["baseline"].update(ms=t * 1e3, tflops=flops / t / 1e12)
  out = []
  for label, variant, impl, cdiv, tv in PLANS:
    c = max(16, rows // cdiv) if cdiv else None
    est = dict(impl="pallas" if impl == "pallas" else "xla")
    row = dict(variant=label, chunk_rows=c, vocab_tile=tv,
               analytic_mib=budgeter.estimate_bytes(variant, rows, d, vocab, dtype, c, tv,
                                                    **est) / 2**20,
               gpu_analytic_mib=budgeter.estimate_bytes(variant, rows, d, vocab, dtype, c, tv,
                                                        backend="gpu", **est) / 2**20,
               xla_temp_mib=None)
    if impl == "pallas":
      row["kernel_blocks"] = budgeter.kernel_blocks_for(rows, d, vocab, dtype,
                                                        backend="gpu")._asdict()
      if not on_gpu:  # the kernel only runs on a GPU: analytic figures only
        out.append(row)
        continue
    key = "vocab_tiled_kernel" if impl == "pallas" else variant
    try:  # one variant failing to compile or run (e.g. GPU resources) must not hide the rest
      comp = _compiled(cal.decode_fn(key, rows, c or 1024, tv or 8192), rows, d, vocab, dtype)
      row["xla_temp_mib"] = comp.memory_analysis().temp_size_in_bytes / 2**20
      if run:
        t = _time(comp, h, w, repeats)
        row.update(ms=t * 1e3, tflops=flops / t / 1e12, vs_plain_matmul=t * 1e3 /
                   result["baseline"]["ms"])
    except Exception as e:  # noqa: BLE001 -- reported in the row and the table
      row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    out.append(row)
  result["variants"] = out
  plan = budgeter.choose(1 << 62, rows, d, vocab, dtype)
  result["budgeter_choice"] = dict(variant=plan.variant, impl=plan.impl,
                                   chunk_rows=plan.chunk_rows, vocab_tile=plan.vocab_tile)
  return result


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--rows", type=int, default=1024, help="rows of the CPU runnable size")
  p.add_argument("--d", type=int, default=256, help="hidden size of the CPU runnable size")
  p.add_argument("--vocab", type=int, default=32768, help="vocabulary of the CPU runnable size")
  p.add_argument("--row-counts", type=lambda s: tuple(int(x) for x in s.split(",")),
                 help="comma-separated R to time (GPU default 256,1024,4096,8192 at LLaDA-8B "
                      "width; CPU default --rows at the runnable size)")
  p.add_argument("--repeats", type=int, default=5,
                 help="timed runs per plan; the median is reported (default 5)")
  p.add_argument("--skip-8b", action="store_true",
                 help="skip the LLaDA-8B sizes (CPU: the compile-only rows; GPU: time the "
                      "runnable size instead)")
  p.add_argument("--calibrate", action="store_true",
                 help="measure the budgeter's timing table on this machine and write it")
  p.add_argument("--calibrate-rows", type=lambda s: tuple(int(x) for x in s.split(",")),
                 help="row counts for --calibrate (default: GPU 256..8192, CPU 16..1024)")
  p.add_argument("--out", help="write the JSON results here (with --calibrate: the table path; "
                               "default the user file, see the printed hint)")


def _f(x, fmt):
  return "—" if x is None else format(x, fmt)


def table(res: dict, backend: str) -> str:
  b = res["baseline"]
  lines = [f"**{res['rows']} x {res['d']} @ {res['d']} x {res['vocab']} {res['dtype']} "
           f"({backend}{'' if res['ran'] else ', compile only'})**", "",
           "| variant | C | Tv | analytic MiB (this backend) | analytic MiB (GPU) | XLA temp MiB "
           "| ms | / plain matmul | TFLOP/s |", "|---|---|---|---|---|---|---|---|---|",
           f"| plain matmul (dot + argmax + max-softmax) | — | — | — | — | "
           f"{_f(b['xla_temp_mib'], '.1f')} | {_f(b.get('ms'), '.2f')} | {'1.00' if 'ms' in b else '—'} | "
           f"{_f(b.get('tflops'), '.3g')} |"]
  for r in res["variants"]:
    if "error" in r:
      lines.append(f"| {r['variant']} | failed: {r['error'][:120]} |")
      continue
    lines.append(
        f"| {r['variant']} | {r['chunk_rows'] or '—'} | {r['vocab_tile'] or '—'} | "
        f"{r['analytic_mib']:.1f} | {r['gpu_analytic_mib']:.2f} | {_f(r['xla_temp_mib'], '.1f')} "
        f"| {_f(r.get('ms'), '.2f')} | {_f(r.get('vs_plain_matmul'), '.2f')} | "
        f"{_f(r.get('tflops'), '.3g')} |")
  c = res["budgeter_choice"]
  lines += ["", f"budgeter's choice (no memory limit): {c['variant']} ({c['impl']}, "
                f"C={c['chunk_rows']}, Tv={c['vocab_tile']})"]
  return "\n".join(lines)


def run(args) -> int:
  if args.calibrate:
    cal.run(args.out, ns=args.calibrate_rows, repeats=args.repeats)
    return 0
  backend = jax.default_backend()
  dev = jax.devices()[0]
  result = dict(backend=backend, device=str(dev), device_kind=dev.device_kind,
                jax_version=jax.__version__, sizes=[])
  sizes = []  # (rows, d, vocab, dtype, run)
  if backend == "gpu" and not args.skip_8b:
    sizes += [(r, *LLADA, jnp.bfloat16, True) for r in args.row_counts or GPU_ROWS]
  else:
    if not args.skip_8b:
      sizes.append((8192, *LLADA, jnp.bfloat16, False))
    dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
    sizes += [(r, args.d, args.vocab, dtype, True) for r in args.row_counts or (args.rows,)]
  for rows, d, vocab, dtype, ran in sizes:
    res = measure(rows, d, vocab, dtype, run=ran, repeats=args.repeats)
    result["sizes"].append(res)
    print(table(res, f"{backend}: {dev.device_kind}"), "\n", flush=True)
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(result, fh, indent=2)
  return 0
