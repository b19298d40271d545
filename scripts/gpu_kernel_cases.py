"""The Pallas kernels vs their jnp references at model shapes (a gpu-check stage).

    PYTHONPATH=. python3 scripts/gpu_kernel_cases.py --impl pallas --size gpu --out kernels.json
    PYTHONPATH=. python3 scripts/gpu_kernel_cases.py --impl interpret --size toy --out k.json

Cases: head-sparse paged attention (LLaDA MHA 32 heads, D 128, block 32; Dream GQA 28:4 with
its extra query-only row) and the fused LM head (LLaDA d 4096 x V 126464, Dream 3584 x 152064;
sampled and greedy rows, margin and entropy, the mask id excluded), each in bf16 and f32.
The reference runs at ``highest`` matmul precision (no TF32), the kernels use f32 accumulation.
Pass: attention rel-L2 <= 5e-3 (bf16) / 1e-4 (f32) and every output finite; LM head: >= 99% of
tokens equal and confidence / margin / entropy rel-L2 within the same bounds.
Exit status 0 when every case passes, 1 otherwise; the JSON lists every case either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

TOL = {"bfloat16": 5e-3, "float32": 1e-4}
TOKEN_AGREEMENT = 0.99

# name: (batch, Hq, Hkv, D, block tokens Lq, fresh rows Ln, page size, max pages per head)
ATTN = {
    "gpu": {"llada_mha": (4, 32, 32, 128, 32, 32, 64, 16),
            "dream_gqa": (4, 28, 4, 128, 33, 32, 64, 16)},
    "toy": {"llada_mha": (2, 4, 4, 32, 8, 8, 16, 4),
            "dream_gqa": (2, 7, 1, 32, 9, 8, 16, 4)},
}
# name: (rows, d, V, excluded id)
HEAD = {
    "gpu": {"llada_head": (256, 4096, 126464, 126336), "dream_head": (256, 3584, 152064, 151666)},
    "toy": {"llada_head": (32, 64, 1000, 999), "dream_head": (24, 56, 1200, 1100)},
}


def rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  den = np.linalg.norm(b)
  return float(np.linalg.norm(a - b) / den) if den else float(np.linalg.norm(a - b))


def attention_case(name, spec, dtype, impl, seed=0) -> dict:
  from pallas_kernels.head_sparse_attention import ops
  b, hq, hkv, d, lq, ln, s, mp = spec
  rng = np.random.default_rng(seed)
  num_pages = 1 + b * hkv * mp
  # Ragged kept lengths (one empty head, one full, the rest random), shuffled page ids.
  kv_len = rng.integers(0, mp * s + 1, size=(b, hkv))
  kv_len[0, 0], kv_len[-1, -1] = 0, mp * s
  table = (1 + rng.permutation(b * hkv * mp)).reshape(b, hkv, mp)
  new_len = np.full((b,), ln)
  new_len[-1] = ln // 2 + 1
  mk = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  q = ops.pack_queries(mk(b, lq, hq, d), hkv)
  args = (q, mk(num_pages, s, d), mk(num_pages, s, d), jnp.asarray(table, jnp.int32),
          jnp.asarray(kv_len, jnp.int32), mk(b, hkv, ln, d), mk(b, hkv, ln, d),
          jnp.asarray(new_len, jnp.int32))
  t = time.perf_counter()
  got = jax.block_until_ready(ops.head_sparse_attention(*args, impl=impl))
  secs = time.perf_counter() - t
  with jax.default_matmul_precision("highest"):
    want = ops.head_sparse_attention(*args, impl="reference")
  rows = (hq // hkv) * lq  # packed rows past G*Lq are padding
  got, want = np.asarray(got[:, :, :rows], np.float32), np.asarray(want[:, :, :rows], np.float32)
  err = rel_l2(got, want)
  tol = TOL[jnp.dtype(dtype).name]
  finite = bool(np.isfinite(got).all())
  return dict(case=name, kernel="head_sparse_attention", impl=impl, dtype=jnp.dtype(dtype).name,
              batch=b, hq=hq, hkv=hkv, head_dim=d, query_tokens=lq, fresh_rows=ln, page_size=s,
              max_pages=mp, rel_l2=err, max_abs=float(np.abs(got - want).max()), tol=tol,
              finite=finite, first_call_s=secs, passed=finite and err <= tol)


def head_case(name, spec, dtype, impl, seed=0) -> dict:
  from pallas_kernels.fused_lm_head import ops
  r, d, v, excl = spec
  rng = np.random.default_rng(seed)
  kh, kw_ = jax.random.split(jax.random.PRNGKey(seed))  # on device: the head is 0.5G numbers
  hidden = jax.random.normal(kh, (r, d), jnp.float32).astype(dtype)
  head = (jax.random.normal(kw_, (d, v), jnp.float32) * d ** -0.5).astype(dtype)
  temperature = jnp.asarray(np.where(np.arange(r) % 2 == 0, 0.0, 0.7), jnp.float32)
  seed_ = jnp.asarray(rng.integers(0, 2**32, size=r, dtype=np.uint64).astype(np.uint32))
  step = jnp.asarray(rng.integers(0, 64, size=r), jnp.int32)
  pos = jnp.asarray(rng.integers(0, 4096, size=r), jnp.int32)
  kw = dict(want_margin=True, want_entropy=True, exclude_id=excl)
  t = time.perf_counter()
  got = jax.block_until_ready(ops.fused_lm_head(hidden, head, temperature, seed_, step, pos,
                                                impl=impl, **kw))
  secs = time.perf_counter() - t
  with jax.default_matmul_precision("highest"):
    want = ops.fused_lm_head(hidden, head, temperature, seed_, step, pos, impl="reference", **kw)
  tol = TOL[jnp.dtype(dtype).name]
  agree = float(np.mean(np.asarray(got.token) == np.asarray(want.token)))
  errs = {f"{f}_rel_l2": rel_l2(getattr(got, f), getattr(want, f))
          for f in ("confidence", "margin", "entropy")}
  finite = all(bool(np.isfinite(np.asarray(getattr(got, f))).all())
               for f in ("confidence", "margin", "entropy"))
  excluded = bool((np.asarray(got.token) != excl).all())
  ok = finite and excluded and agree >= TOKEN_AGREEMENT and all(e <= tol for e in errs.values())
  return dict(case=name, kernel="fused_lm_head", impl=impl, dtype=jnp.dtype(dtype).name, rows=r,
              d=d, vocab=v, exclude_id=excl, token_agreement=agree, min_agreement=TOKEN_AGREEMENT,
              excluded_id_never_chosen=excluded, **errs, tol=tol, finite=finite,
              first_call_s=secs, passed=ok)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--impl", choices=("pallas", "interpret"), default="pallas")
  p.add_argument("--size", choices=("gpu", "toy"), default="gpu")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  dev = jax.devices()[0]
  cases = []
  for dtype in (jnp.bfloat16, jnp.float32):
    for name, spec in ATTN[args.size].items():
      cases.append((attention_case, name, spec, dtype))
    for name, spec in HEAD[args.size].items():
      cases.append((head_case, name, spec, dtype))
  rows = []
  for fn, name, spec, dtype in cases:
    try:
      row = fn(name, spec, dtype, args.impl)
    except Exception as e:  # noqa: BLE001 -- a kernel that fails to lower is a failed case
      row = dict(case=name, dtype=jnp.dtype(dtype).name, impl=args.impl, passed=False,
                 error=f"{type(e).__name__}: {e}"[:2000])
    rows.append(row)
    print(f"{row['case']:>11} {row['dtype']:>8} {'pass' if row['passed'] else 'FAIL'} "
          + (row.get("error") or ""), flush=True)
  result = dict(device=dev.device_kind, backend=jax.default_backend(), jax=jax.__version__,
                impl=args.impl, size=args.size, passed=all(r["passed"] for r in rows),
                cases=rows)
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=1)
  return 0 if result["passed"] else 1


if __name__ == "__main__":
  sys.exit(main())
