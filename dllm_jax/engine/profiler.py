"""Offline memory profiler: weights, the Refresh step's activation peak, logit peaks, KV pool size.

All figures are per device and come from the engine's own memory model (engine/memory.py: the
weights, a step's activation terms, the logit plans) and pool layout (PoolConfig.page_bytes), so
an 8B model can be profiled on a laptop; on a GPU the device memory is read from
``memory_stats()['bytes_limit']``.

    pages = floor((memory * utilization - weights - activation_peak) / page_bytes)
    page_bytes = 2 (K and V) * L * page_size * D * dtype_bytes      (one KV head's page)

The profiled step is a Refresh of ``batch`` rows of ``seq_len`` tokens (no flash attention: the
f32 scores are counted), decoding ``block_length`` candidates per row. Its activation peak is
the step's live set without the decode head (memory.StepActivation.without_logits) plus the
chosen logit plan's peak (``full`` = logits for every row, the no-budgeting baseline): a bound
that holds whether or not the decode head's temporaries overlap the layers'. dLLM-Serve sizes its
pool the same way with the peak measured in a warm-up run. Under tensor parallelism weights and
the head-split activations divide by ``tp``; every device stores only its own KV heads' pages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np

from dllm_jax.cache.page_pool import PoolConfig
from dllm_jax.config import LOGIT_VARIANTS, ModelConfig
from dllm_jax.engine import memory
from dllm_jax.engine.batch import Layout
from dllm_jax.sampling.plan import VARIANTS, LogitPlan

# The sizes of the row_chunked / vocab_tiled plans whose peaks the profile lists.
PROFILE_CHUNK_ROWS = 1024
PROFILE_VOCAB_TILE = 8192


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


def refresh_layout(batch: int, seq_len: int, block_length: int) -> Layout:
  """A Refresh-only step: ``batch`` whole canvases of ``seq_len`` tokens, one block of
  candidates each."""
  return Layout(tokens=batch * seq_len, length=seq_len, refresh_rows=batch, reuse_rows=0,
                query_width=0, cand_width=block_length, candidates=batch * block_length)


def _variant_plan(variant: str, rows: int, vocab: int) -> LogitPlan:
  """The plan whose peak the profile lists for ``variant``."""
  return LogitPlan(variant, chunk_rows=min(rows, PROFILE_CHUNK_ROWS),
                   vocab_tile=min(vocab, PROFILE_VOCAB_TILE))


def profile(cfg: ModelConfig, *, batch: int, seq_len: int, device_memory_bytes: int,
            utilization: float = 0.9, dtype="bfloat16", page_size: int = 64, tp: int = 1,
            block_length: int = 32, logits: str = "auto", logit_budget_bytes: int | None = None,
            backend: str | None = None) -> MemoryProfile:
  if not 0 < utilization <= 1:
    raise ValueError(f"utilization: must be in (0, 1], got {utilization}")
  if cfg.num_heads % tp:
    raise ValueError(f"tp={tp} does not divide the {cfg.num_heads} query heads")
  if logits not in LOGIT_VARIANTS:
    raise ValueError(f"logits: expected one of {LOGIT_VARIANTS}, got {logits!r}")
  lay = refresh_layout(batch, seq_len, block_length)
  v_local = -(-cfg.vocab_size // tp)
  step = lambda plan: memory.step_activation(cfg, lay, plan, dtype, tp=tp, backend=backend)
  plans = {v: _variant_plan(v, lay.candidates, v_local) for v in VARIANTS}
  logit = {v: memory.logit_bytes(cfg, plan, lay.candidates, lay.tokens, dtype, tp=tp,
                                 backend=backend) for v, plan in plans.items()}
  act = step(plans["rows"]).without_logits
  if logits == "auto":
    budget = logit_budget_bytes or max(act // 2, 1)
    plan = memory.choose_plan("auto", lay.candidates, cfg, dtype, budget=budget, tp=tp,
                              backend=backend)
    logits = plan.variant
    logit_peak = memory.logit_bytes(cfg, plan, lay.candidates, lay.tokens, dtype, tp=tp,
                                    backend=backend)
  else:
    logit_peak = logit[logits]
  peak = act + logit_peak
  weights = memory.weights_bytes(cfg, dtype, tp)
  heads = max(1, cfg.num_kv_heads // tp)
  page_bytes = PoolConfig(num_pages=2, page_size=page_size, num_layers=cfg.num_layers,
                          num_kv_heads=heads, head_dim=cfg.head_dim, max_slots=1,
                          max_pages_per_head=1, dtype=np.dtype(dtype).name, shards=tp).page_bytes
  free = int(device_memory_bytes * utilization) - weights - peak
  pages = max(0, free // page_bytes)
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
  from dllm_jax.engine_flags import positive_int
  parser.add_argument("--config", required=True,
                      help="model preset (" + ", ".join(presets.model_names()) + "), config.json or "
                           "model directory")
  for flag, default, text in (("--batch", 4, "Refresh rows at the largest shape"),
                              ("--seq-len", 4096, "canvas length (prompt + generation) per row"),
                              ("--block-length", 32, "candidate rows per request (block length)"),
                              ("--page-size", 64, "tokens per KV page"),
                              ("--tp", 1, "tensor-parallel devices")):
    parser.add_argument(flag, type=positive_int, default=default,
                        help=f"{text} (default {default})")
  parser.add_argument("--device-memory-gb", type=float, default=None,
                      help="per-device memory, GiB (default: read from the GPU; required on CPU)")
  parser.add_argument("--utilization", type=float, default=0.9,
                      help="fraction of device memory the engine may use (default 0.9)")
  parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                      help="weight and activation dtype (default bfloat16)")
  parser.add_argument("--logits", choices=LOGIT_VARIANTS, default="auto",
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
