"""Refresh attention, cuDNN vs XLA, against a float64 numpy oracle (a gpu-check stage).

    PYTHONPATH=. python3 scripts/gpu_refresh_attention.py --size gpu --out refresh_attention.json

Calls ``dllm_jax.model.attention.refresh_attention(q, k, v, lengths, impl=...)`` in bf16 with
Dream's GQA 28:4 (D 128) and LLaDA's MHA 32:32, ragged lengths including a length-0 row.
Checks: every output finite; rel-L2 over the valid query rows (t < length) <= 5e-3 between the
two implementations and from each to the oracle; rows past the length are reported (the wrapper
documents zeros). Without a GPU (``--size toy`` on a CPU) cuDNN is skipped and only XLA is
checked against the oracle. Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

TOL = 5e-3
# name: (batch, T, Hq, Hkv, D)
SHAPES = {
    "gpu": {"dream_gqa": (4, 512, 28, 4, 128), "llada_mha": (4, 512, 32, 32, 128)},
    "toy": {"dream_gqa": (3, 64, 28, 4, 32), "llada_mha": (3, 64, 4, 4, 32)},
}


def oracle(q, k, v, lengths) -> np.ndarray:
  """float64 non-causal softmax attention over each row's valid keys; rows past the length 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, hq, d = q.shape
  g = hq // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  out = np.zeros_like(q)
  for i, n in enumerate(np.asarray(lengths)):
    if n == 0:
      continue
    qi, ki, vi = (x[i, :n].transpose(1, 0, 2) for x in (q, k, v))  # [H, n, D]
    s = qi @ ki.transpose(0, 2, 1) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[i, :n] = (p @ vi).transpose(1, 0, 2)
  return out


def rel_l2(a, b, valid) -> float:
  a, b = np.asarray(a, np.float64)[valid], np.asarray(b, np.float64)[valid]
  den = np.linalg.norm(b)
  return float(np.linalg.norm(a - b) / den) if den else float(np.linalg.norm(a - b))


def check(name, shape, impls, seed=0) -> dict:
  from dllm_jax.model.attention import refresh_attention
  b, t, hq, hkv, d = shape
  rng = np.random.default_rng(seed)
  lengths = np.array([t, t // 2 + 3, 0] + [t - 5] * (b - 3), np.int32)[:b]
  mk = lambda h: jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
  q, k, v = mk(hq), mk(hkv), mk(hkv)
  want = oracle(q, k, v, lengths)
  valid = np.arange(t)[None, :] < lengths[:, None]  # [B, T] query rows that mean something
  outs, row = {}, dict(case=name, batch=b, tokens=t, hq=hq, hkv=hkv, head_dim=d,
                       lengths=lengths.tolist(), dtype="bfloat16", tol=TOL, impls={})
  for impl in impls:
    fn = jax.jit(lambda q, k, v, n, impl=impl: refresh_attention(q, k, v, n, impl=impl))
    o = np.asarray(fn(q, k, v, jnp.asarray(lengths)), np.float32)
    outs[impl] = o
    row["impls"][impl] = dict(finite=bool(np.isfinite(o).all()),
                              rel_l2_vs_oracle=rel_l2(o, want, valid),
                              padded_rows_max_abs=float(np.abs(o[~valid]).max()))
  ok = all(r["finite"] and r["rel_l2_vs_oracle"] <= TOL for r in row["impls"].values())
  if "cudnn" in outs and "xla" in outs:
    row["rel_l2_cudnn_vs_xla"] = rel_l2(outs["cudnn"], outs["xla"], valid)
    ok = ok and row["rel_l2_cudnn_vs_xla"] <= TOL
  row["passed"] = bool(ok)
  return row


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", choices=("gpu", "toy"), default="gpu")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  gpu = jax.default_backend() == "gpu"
  impls = ["cudnn", "xla"] if gpu else ["xla"]
  rows = []
  for name, shape in SHAPES[args.size].items():
    try:
      row = check(name, shape, impls)
    except Exception as e:  # noqa: BLE001 -- e.g. the wrapper missing or cuDNN refusing
      row = dict(case=name, passed=False, error=f"{type(e).__name__}: {e}"[:2000])
    rows.append(row)
    print(f"{name:>10} {'pass' if row['passed'] else 'FAIL'} {row.get('error', '')}", flush=True)
  result = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                jax=jax.__version__, impls=impls,
                skipped=[] if gpu else ["cudnn (no GPU)"],
                passed=all(r["passed"] for r in rows), cases=rows)
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=1)
  return 0 if result["passed"] else 1


if __name__ == "__main__":
  sys.exit(main())
