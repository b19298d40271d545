"""The engine's memory model: weights, activation bytes of a step, logit plan, KV pool size.

``budget = weights + KV pool + activation peak``, per device. The activation peak of a step is
analytic (a documented upper estimate of the largest live set; see :func:`step_activation`); the
logit part comes from the budgeter's model of the chosen variant. The engine enforces the budget
on any backend: the pool gets what is left after the weights and the peak of the largest
configured step, and the scheduler only runs steps whose estimate fits
``activation_budget_bytes``. ``dllm-jax profile`` (engine/profiler.py) reports the same model
for a Refresh step of a chosen shape.

Under tensor parallelism (``tp`` devices) every figure is per device: the weights, the query and
KV heads, the MLP width and the vocabulary divide by ``tp`` (a KV head shared by fewer than one
device per head is replicated: at least one per device); the residual stream does not.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dllm_jax.config import EngineConfig, ModelConfig
from dllm_jax.sampling.plan import LogitPlan

# Plan sizes of a forced variant whose EngineConfig leaves them unset.
DEFAULT_CHUNK_ROWS = 256
DEFAULT_VOCAB_TILE = 2048


def _local(n: int, tp: int) -> int:
  """A per-device share of ``n`` heads / columns (ceil: padding and replication round up)."""
  return -(-n // tp)


def choose_plan(logits: str, rows: int, mcfg: ModelConfig, dtype, *, budget: int,
                chunk_rows: int | None = None, vocab_tile: int | None = None, tp: int = 1,
                backend: str | None = None) -> LogitPlan:
  """``logits`` forced (with ``chunk_rows`` / ``vocab_tile``), or "auto": the budgeter's fastest
  plan for ``rows`` candidate rows whose logit bytes fit ``budget``."""
  if logits != "auto":
    return LogitPlan(variant=logits, chunk_rows=chunk_rows or DEFAULT_CHUNK_ROWS,
                     vocab_tile=vocab_tile or DEFAULT_VOCAB_TILE)
  from dllm_jax.sampling import budgeter
  return budgeter.choose(budget, rows, mcfg.hidden_size, _local(mcfg.vocab_size, tp),
                         jnp.dtype(dtype), backend=backend)


def logit_plan(cfg: EngineConfig, mcfg: ModelConfig, rows: int, dtype) -> LogitPlan:
  """The engine's plan for ``rows`` candidate rows: forced by the config, or the budgeter's
  fastest within the logit share (half) of the activation budget."""
  budget = cfg.activation_budget_bytes or (1 << 62)
  return choose_plan(cfg.logits, rows, mcfg, dtype, budget=budget // 2,
                     chunk_rows=cfg.chunk_rows, vocab_tile=cfg.vocab_tile)


def logit_bytes(mcfg: ModelConfig, plan: LogitPlan, rows: int, fed_rows: int, dtype, *,
                tp: int = 1, backend: str | None = None) -> int:
  """The plan's logit peak for ``rows`` candidate rows (``full``: every one of ``fed_rows``)."""
  from dllm_jax.sampling import budgeter
  variant = plan.variant
  r = fed_rows if variant == "full" else rows
  return budgeter.estimate_bytes(variant if variant != "full" else "rows", r, mcfg.hidden_size,
                                 _local(mcfg.vocab_size, tp), jnp.dtype(dtype), plan.chunk_rows,
                                 plan.vocab_tile, backend,
                                 impl="pallas" if plan.impl == "pallas" else "xla")


@dataclasses.dataclass(frozen=True)
class StepActivation:
  """A step's live-set terms, bytes: the residual stream (always live) and the three phases
  that are not live at once (attention, MLP, decode head)."""

  stream: int
  attention: int
  mlp: int
  logits: int

  @property
  def peak(self) -> int:
    return self.stream + max(self.attention, self.mlp, self.logits)

  @property
  def without_logits(self) -> int:
    return self.stream + max(self.attention, self.mlp)


def step_activation(mcfg: ModelConfig, lay, plan: LogitPlan, dtype, *,
                    flash_refresh: bool = False, tp: int = 1,
                    backend: str | None = None) -> StepActivation:
  """Upper estimate of a step's live activations (bytes, per device) for a bucket's ``Layout``
  (dllm_jax/engine/batch.py).

  T flat tokens, A = Br*N + Bu*Lq attention-layout rows, b = dtype bytes, heads and F per device:
    stream: residual stream + normed copy + layer output 3 * T * d * b
    attention: q/k/v of the flat tokens and of the layouts (T + A)*(Hq + 2*Hkv)*D*b, the outputs
               A*Hq*D*b, Refresh scores and probabilities 2 * Br*Hq*N*N*4 (f32; none with cuDNN
               flash attention, ``flash_refresh``), Reuse gathered-page worst case is bounded by
               the kernel's tiles (ignored)
    MLP: gate, up and their product 3 * T * F * b
    logits: the plan's own peak (budgeter) for the K candidate rows (``full``: every fed row),
            with the candidate rows' hidden gather K*d*b
  peak = stream + max(attention, MLP, logits).
  """
  b = jnp.dtype(dtype).itemsize
  t = lay.tokens
  a = lay.refresh_rows * lay.length + lay.reuse_rows * lay.query_width
  d, hd = mcfg.hidden_size, mcfg.head_dim
  hq, hkv = _local(mcfg.num_heads, tp), _local(mcfg.num_kv_heads, tp)
  attn = (t + a) * (hq + 2 * hkv) * hd * b + a * hq * hd * b
  if not flash_refresh:
    attn += 2 * lay.refresh_rows * hq * lay.length * lay.length * 4
  mlp = 3 * t * _local(mcfg.intermediate_size, tp) * b
  rows = lay.candidates
  logits = logit_bytes(mcfg, plan, rows, t, dtype, tp=tp, backend=backend) + rows * d * b
  return StepActivation(3 * t * d * b, attn, mlp, logits)


def step_activation_bytes(mcfg: ModelConfig, lay, plan: LogitPlan, dtype, *,
                          flash_refresh: bool = False) -> int:
  """The peak of :func:`step_activation` (one device, no tensor parallelism)."""
  return step_activation(mcfg, lay, plan, dtype, flash_refresh=flash_refresh).peak


def weights_bytes(mcfg: ModelConfig, dtype, tp: int = 1) -> int:
  """Parameter bytes per device (the exact count, split evenly over ``tp`` devices)."""
  return -(-mcfg.num_params() * jnp.dtype(dtype).itemsize // tp)


def pages_for_budget(budget: int, mcfg: ModelConfig, peak: int, pool) -> int:
  """KV pages per device that fit: (budget - weights - activation peak) / page bytes.

  ``peak``: the largest activation estimate over every bucket of the engine's grid (or the
  activation budget, when one is set); ``pool``: a PoolConfig (its dtype, page bytes and
  ``shards``, the tensor-parallel devices the weights split over). dLLM-Serve sizes its pool as
  ``(total * utilization - used - peak + current) / page_bytes`` with the peak measured in a
  warm-up run: the same subtraction, here with the analytic peak.
  """
  left = budget - weights_bytes(mcfg, jnp.dtype(pool.dtype), pool.shards) - peak
  return int(left // pool.page_bytes)
