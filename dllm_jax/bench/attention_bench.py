"""``dllm-jax bench attention``: one Reuse step's attention, dense vs head-sparse.

Dense (dual-cache style): the block's queries attend to the K/V of all N canvas positions.
Sparse: they attend to each KV head's selected tokens (``keep_ratio * (N - Lb)``) in the paged
pool plus the block's fresh K/V — `shared` and `per_head` selection read the same number of
bytes (same budget per head); what differs is which tokens, not how many.

Reported per case: K/V bytes read (analytic: every valid key and value row once) and the
measured time of one layer's attention on this backend (median of --repeats). On a GPU the
sparse op runs the Pallas kernel and the table adds its bandwidth as a fraction of a plain
device copy of the same bytes measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.model.attention import dense_attention
from pallas_kernels.head_sparse_attention import head_sparse_attention, pack_queries
from pallas_kernels.impls import KERNEL_IMPLS, TEST_ONLY_IMPLS

CASES = {
    # name: (batch, Hq, Hkv, D, N list, block)
    "cpu-small": (4, 4, 4, 64, [256, 512], 32),
    "llada-8b": (1, 32, 32, 128, [1024, 2048, 4096], 32),
    "dream-7b": (1, 28, 4, 128, [1024, 2048], 32),
}


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _inputs(b, hq, hkv, d, n, lb, ratio, page_size, dtype, seed=0):
  rng = np.random.default_rng(seed)
  keep = max(1, int((n - lb) * ratio))
  pages_per_head = math.ceil(keep / page_size)
  num_pages = 1 + b * hkv * pages_per_head
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  q = mk(b, lb, hq, d)
  k_all, v_all = mk(b, n, hkv, d), mk(b, n, hkv, d)
  k_pool, v_pool = mk(num_pages, page_size, d), mk(num_pages, page_size, d)
  table = (1 + np.arange(b * hkv * pages_per_head)).reshape(b, hkv, pages_per_head)
  return dict(q=q, k_all=k_all, v_all=v_all, k_pool=k_pool, v_pool=v_pool,
              table=jnp.asarray(table, jnp.int32), kv_len=jnp.full((b, hkv), keep, jnp.int32),
              k_new=mk(b, hkv, lb, d), v_new=mk(b, hkv, lb, d),
              new_len=jnp.full((b,), lb, jnp.int32), keep=keep)


def run_case(b, hq, hkv, d, n, lb, *, ratio, page_size, dtype, repeats, impl):
  x = _inputs(b, hq, hkv, d, n, lb, ratio, page_size, dtype)
  item = jnp.dtype(dtype).itemsize
  dense = jax.jit(lambda q, k, v: dense_attention(q, k, v, jnp.full((b,), n, jnp.int32)))
  sparse = jax.jit(lambda q, kp, vp, t, kl, kn, vn, nl: head_sparse_attention(
      pack_queries(q, hkv), kp, vp, t, kl, kn, vn, nl, impl=impl))
  t_dense = _time(dense, x["q"], x["k_all"], x["v_all"], repeats=repeats)
  t_sparse = _time(sparse, x["q"], x["k_pool"], x["v_pool"], x["table"], x["kv_len"],
                   x["k_new"], x["v_new"], x["new_len"], repeats=repeats)
  bytes_dense = 2 * b * n * hkv * d * item
  bytes_sparse = 2 * b * hkv * (x["keep"] + lb) * d * item
  row = dict(batch=b, hq=hq, hkv=hkv, d=d, n=n, block=lb, keep_per_head=x["keep"],
             dense_ms=t_dense * 1e3, sparse_ms=t_sparse * 1e3,
             dense_kv_mib=bytes_dense / 2**20, sparse_kv_mib=bytes_sparse / 2**20,
             speedup=t_dense / t_sparse)
  if jax.default_backend() == "gpu":
    src = jnp.zeros((bytes_sparse // 4,), jnp.float32)
    t_copy = _time(jax.jit(lambda a: a + 0), src, repeats=repeats)
    row["sparse_bw_fraction_of_copy"] = (bytes_sparse / t_sparse) / (2 * src.nbytes / t_copy)
  return row


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--cases", nargs="+", default=["cpu-small", "llada-8b"], choices=sorted(CASES),
                 help="shapes to time: " + "; ".join(
                     f"{k} = batch {b}, heads {hq}/{hkv}, D {d}, N {ns}, block {lb}"
                     for k, (b, hq, hkv, d, ns, lb) in CASES.items())
                 + " (default cpu-small llada-8b)")
  p.add_argument("--keep-ratio", type=float, default=0.5,
                 help="fraction of the context kept per KV head by the sparse side (default 0.5)")
  p.add_argument("--page-size", type=int, default=64,
                 help="tokens per KV page of the sparse pool (default 64)")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="default: float32 on CPU, bfloat16 on GPU")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median "
                 "is reported (default 3)")
  p.add_argument("--impl", default="auto",
                 choices=[i for i in KERNEL_IMPLS if i not in TEST_ONLY_IMPLS],
                 help="head-sparse kernel implementation (default auto: Pallas on a GPU, the "
                      "jnp reference elsewhere)")
  p.add_argument("--out", help="write the rows as JSON here")


def run(args) -> int:
  dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  rows = []
  for name in args.cases:
    b, hq, hkv, d, ns, lb = CASES[name]
    for n in ns:
      row = run_case(b, hq, hkv, d, n, lb, ratio=args.keep_ratio, page_size=args.page_size,
                     dtype=dtype, repeats=args.repeats, impl=args.impl)
      row["case"] = name
      rows.append(row)
      print(f"{name:>9} N={n:<5} dense {row['dense_ms']:8.2f} ms {row['dense_kv_mib']:8.1f} MiB | "
            f"sparse {row['sparse_ms']:8.2f} ms {row['sparse_kv_mib']:8.1f} MiB | "
            f"x{row['speedup']:.2f}", flush=True)
  print()
  print("| case | N | keep/head | dense ms | sparse ms | dense K/V MiB | sparse K/V MiB | speed-up |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['case']} | {r['n']} | {r['keep_per_head']} | {r['dense_ms']:.2f} | "
          f"{r['sparse_ms']:.2f} | {r['dense_kv_mib']:.1f} | {r['sparse_kv_mib']:.1f} | "
          f"{r['speedup']:.2f}x |")
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(dict(backend=jax.default_backend(), device=str(jax.devices()[0]), dtype=dtype,
                     rows=rows), fh, indent=2)
  return 0
