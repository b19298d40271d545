"""Offline memory profiler: weights, the Refresh step's activation peak, logit peaks, KV pool size.

All figures are per device and analytic (DESIGN.md §4), so an 8B model can be profiled on a
laptop; on a GPU the device memory is read from ``memory_stats()['bytes_limit']``.

KV pool sizing (compare dLLM-Serve, spec §5.3: ``(total*util - used - peak + current) /
page_bytes``, with the peak measured in a warm-up run):

    pages = floor((memory * utilization - weights - activation_peak) / page_bytes)
    page_bytes = 2 (K and V) * L * page_size * D * dtype_bytes      (one KV head's page)

where activation_peak is the Refresh step at the largest configured shape (batch x seq_len),
its logit part computed with the chosen logit variant (``full`` = the reference's level 0:
logits for every row). Under tensor parallelism weights and the head-split activations divide by
``tp``; every device stores only its own KV heads' pages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import jax
import numpy as np

from dllm_jax.config import ModelConfig
from dllm_jax.sampling import budgeter

VARIANTS = ("full", "rows", "row_chunked", "vocab_tiled")


@dataclasses.dataclass(frozen=True)
class MemoryProfile:
  model: str
  dtype: str
  tp: int
  batch: int
  seq_len: int
  block_length: int
  device_memory_bytes: int
  utilization: float
  weights_bytes: int
  activation_bytes: int             # Refresh activations without the logits
  logit_bytes: dict                 # per variant (the chosen one is `logits`)
  logits: str
  activation_peak_bytes: int        # activations + the chosen variant's logit peak
  page_size: int
  page_bytes: int
  kv_pages: int
  kv_bytes: int
  kv_tokens_per_head: int

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)


def refresh_activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, dtype, tp: int = 1) -> int:
  """Largest live set of a Refresh forward without logits (per device), bytes:
  residual stream + normed copy + layer output 3*T*d*b, then the larger of attention
  (q/k/v T*(Hq+2Hkv)*D*b / tp and f32 scores + probabilities 2*B*Hq*N*N*4 / tp) and the MLP
  (gate, up, product 3*T*F*b / tp)."""
  b = np.dtype(dtype).itemsize
  t = batch * seq_len
  attn = (t * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * b
          + 2 * batch * cfg.num_heads * seq_len * seq_len * 4) // tp
  mlp = 3 * t * cfg.intermediate_size * b // tp
  return 3 * t * cfg.hidden_size * b + max(attn, mlp)


def profile(cfg: ModelConfig, *, batch: int, seq_len: int, device_memory_bytes: int,
            utilization: float = 0.9, dtype="bfloat16", page_size: int = 64, tp: int = 1,
            block_length: int = 32, logits: str = "auto", logit_budget_bytes: int | None = None,
            backend: str | None = None) -> MemoryProfile:
  if not 0 < utilization <= 1:
    raise ValueError(f"utilization: must be in (0, 1], got {utilization}")
  if cfg.num_heads % tp:
    raise ValueError(f"tp={tp} does not divide the {cfg.num_heads} query heads")
  b = np.dtype(dtype).itemsize
  weights = math.ceil(cfg.num_params() * b / tp)
  act = refresh_activation_bytes(cfg, batch, seq_len, dtype, tp)
  rows = batch * block_length  # candidate rows: the current block of every row
  v_local = -(-cfg.vocab_size // tp)
  d = cfg.hidden_size
  logit = {
      "full": budgeter.estimate_bytes("full", batch * seq_len, d, v_local, dtype, backend=backend),
      "rows": budgeter.estimate_bytes("rows", rows, d, v_local, dtype, backend=backend),
      "row_chunked": budgeter.estimate_bytes("row_chunked", rows, d, v_local, dtype,
                                             min(rows, 1024), backend=backend),
      "vocab_tiled": budgeter.estimate_bytes("vocab_tiled", rows, d, v_local, dtype,
                                             min(rows, 1024), min(v_local, 8192), backend=backend),
  }
  if logits == "auto":
    budget = logit_budget_bytes or max(act // 2, 1)
    choice = budgeter.choose(budget, rows, d, v_local, dtype, backend=backend)
    logits, logit_peak = choice.variant, choice.est_bytes
  else:
    if logits not in logit:
      raise ValueError(f"logits: expected auto or one of {VARIANTS}, got {logits!r}")
    logit_peak = logit[logits]
  peak = act + logit_peak
  page_bytes = 2 * cfg.num_layers * page_size * cfg.head_dim * b
  free = int(device_memory_bytes * utilization) - weights - peak
  pages = max(0, free // page_bytes)
  heads = max(1, cfg.num_kv_heads // tp)
  return MemoryProfile(
      model=cfg.name or cfg.family, dtype=np.dtype(dtype).name, tp=tp, batch=batch,
      seq_len=seq_len, block_length=block_length, device_memory_bytes=int(device_memory_bytes),
      utilization=utilization, weights_bytes=weights, activation_bytes=act, logit_bytes=logit,
      logits=logits, activation_peak_bytes=peak, page_size=page_size, page_bytes=page_bytes,
      kv_pages=int(pages), kv_bytes=int(pages * page_bytes),
      kv_tokens_per_head=int(pages * page_size // heads))


def write_profile(p: MemoryProfile, path: str) -> None:
  with open(path, "w") as fh:
    fh.write(p.to_json())


def _gib(x: int) -> str:
  return f"{x / 2**30:8.2f} GiB"


def format_table(p: MemoryProfile) -> str:
  rows = [
      ("device memory x utilization", _gib(int(p.device_memory_bytes * p.utilization))),
      (f"weights ({p.dtype}, per device, tp={p.tp})", _gib(p.weights_bytes)),
      (f"Refresh activations ({p.batch} x {p.seq_len})", _gib(p.activation_bytes)),
      *[(f"  logit peak: {k}", _gib(v)) for k, v in p.logit_bytes.items()],
      (f"activation peak (logits: {p.logits})", _gib(p.activation_peak_bytes)),
      (f"KV pool: {p.kv_pages:,} pages of {p.page_bytes / 2**20:.1f} MiB", _gib(p.kv_bytes)),
      ("KV tokens per head (all layers)", f"{p.kv_tokens_per_head:,}"),
  ]
  w = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def add_profile_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  from dllm_jax import presets
  parser.add_argument("--config", required=True,
                      help="model preset (" + ", ".join(presets.names()) + "), config.json or "
                           "model directory")
  parser.add_argument("--batch", type=int, default=4,
                      help="Refresh rows at the largest shape (default 4)")
  parser.add_argument("--seq-len", type=int, default=4096,
                      help="canvas length (prompt + generation) of those rows (default 4096)")
  parser.add_argument("--block-length", type=int, default=32,
                      help="decoding block length: the candidate rows per request (default 32)")
  parser.add_argument("--device-memory-gb", type=float, default=None,
                      help="per-device memory, GiB (default: read from the GPU; required on CPU)")
  parser.add_argument("--utilization", type=float, default=0.9,
                      help="fraction of device memory the engine may use (default 0.9)")
  parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                      help="weight and activation dtype (default bfloat16)")
  parser.add_argument("--page-size", type=int, default=64,
                      help="tokens per KV page (default 64)")
  parser.add_argument("--tp", type=int, default=1, help="tensor-parallel devices (default 1)")
  parser.add_argument("--logits", choices=("auto",) + VARIANTS, default="auto",
                      help="logit variant: auto = the budgeter's choice (default), full = "
                           "logits for every row (the no-budgeting baseline)")
  parser.add_argument("--kv-budget-gb", type=float, default=None,
                      help="report whether this much KV cache (per device) fits; exit 1 if not")
  parser.add_argument("--out", help="write the JSON profile here")
  return parser


MIN_PAGES = 2  # page 0 is the pool's dummy page, so a usable pool has at least two


def run_profile(args) -> int:
  """``dllm-jax profile``: print the table; exit 1 when the model does not fit."""
  import os
  import sys

  from dllm_jax import presets
  path = presets.resolve(args.config)
  cfg = presets.model_config(path)
  name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
  if name == "config":
    name = cfg.name
  mem = args.device_memory_gb
  if mem is None:
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if not stats:
      raise ValueError("--device-memory-gb is required on CPU (no device memory to read)")
    mem_bytes = int(stats["bytes_limit"])
  elif not mem > 0:
    raise ValueError(f"--device-memory-gb: expected a positive number, got {mem:g}")
  else:
    mem_bytes = int(mem * 2**30)
  for flag, v in (("--batch", args.batch), ("--seq-len", args.seq_len),
                  ("--block-length", args.block_length), ("--page-size", args.page_size),
                  ("--tp", args.tp)):
    if v < 1:
      raise ValueError(f"{flag}: expected a positive integer, got {v}")
  p = profile(cfg, batch=args.batch, seq_len=args.seq_len, device_memory_bytes=mem_bytes,
              utilization=args.utilization, dtype=args.dtype, page_size=args.page_size,
              tp=args.tp, block_length=args.block_length, logits=args.logits)
  print(format_table(p))
  where = f"{args.tp} x {mem_bytes / 2**30:g} GiB"
  rc = 0
  if p.kv_pages < MIN_PAGES:
    usable = p.device_memory_bytes * p.utilization
    print(f"{name} does not fit on {where}: weights {p.weights_bytes / 2**30:.2f} GiB + "
          f"activation peak {p.activation_peak_bytes / 2**30:.2f} GiB leave "
          f"{max(0.0, usable - p.weights_bytes - p.activation_peak_bytes) / 2**20:.1f} MiB of "
          f"the usable {usable / 2**30:.2f} GiB, under the {MIN_PAGES} KV pages of "
          f"{p.page_bytes / 2**20:.1f} MiB a pool needs (try more memory, --tp, a smaller "
          "--batch or --seq-len" + (", --dtype bfloat16" if p.dtype == "float32" else "") + ")",
          file=sys.stderr)
    rc = 1
  if args.kv_budget_gb is not None:
    need = int(args.kv_budget_gb * 2**30)
    fits = p.kv_bytes >= need and p.kv_pages >= MIN_PAGES
    print(f"{name} on {where} with {args.kv_budget_gb:g} GiB KV per device: "
          f"{'fits' if fits else 'does NOT fit'} ({p.kv_bytes / 2**30:.2f} GiB available)")
    rc = rc or (0 if fits else 1)
  if args.out:
    write_profile(p, args.out)
    print(f"wrote {args.out}")
  return rc
