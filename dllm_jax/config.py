"""Static configuration, one import for all of it (jax-free, so the CLI's parser stays fast).

    ModelConfig       architecture + token ids, parsed from a HF config.json (model_config.py)
    SamplingParams    how one request is decoded (sampling_params.py)
    SparseConfig      the sparse KV cache's knobs (this module)
    EngineConfig      serving knobs: one switch per technique of the paper (this module)

Each option's value list is defined once and imported from here by the CLI's choices, the
server's request schema and the validation: SCHEDULERS, LOGIT_VARIANTS (``("auto",)`` + the
variants of :mod:`dllm_jax.sampling.plan`), KERNEL_IMPLS (:mod:`pallas_kernels.impls`),
SELECTION_MODES, and the sampling lists CONFIDENCE_KINDS, RULES, SCHEDULES, SAMPLING_FIELDS.
"""

from __future__ import annotations

import dataclasses

from dllm_jax import checks
from dllm_jax.model_config import EXTRA_IDS_KEY, FAMILIES, ModelConfig  # noqa: F401 (re-export)
from dllm_jax.sampling.plan import VARIANTS
from dllm_jax.sampling_params import (  # noqa: F401 (re-export)
    CONFIDENCE_KINDS, RULES, SAMPLING_FIELDS, SCHEDULES, SamplingParams)
from pallas_kernels.impls import KERNEL_IMPLS

# Sparse caching --------------------------------------------------------------------------------

SELECTION_MODES = ("shared", "per_head", "per_head_adaptive")
MAX_POOL_KERNEL = 15


@dataclasses.dataclass(frozen=True)
class SparseConfig:
  """Sparse caching knobs (defaults as the reference: keep 0.5, max-pool 3, delay 1); the
  state machine they drive is dllm_jax/cache/sparse_state.py.

  selection: "per_head" (head-centric, default), "shared" (one token set for all heads, the
  Sparse-dLLM baseline) or "per_head_adaptive" (per-head budgets from score spread).
  """

  enabled: bool = True
  keep_ratio: float = 0.5
  pool_kernel: int = 3
  delay: int = 1
  selection: str = "per_head"

  def __post_init__(self):
    checks.require_bool("enabled", self.enabled)
    r = self.keep_ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
      raise ValueError(f"keep_ratio: must be in [0, 1], got {r!r}")
    object.__setattr__(self, "keep_ratio", float(r))
    checks.require_int("pool_kernel", self.pool_kernel, 1)
    checks.require_int("delay", self.delay, 0)
    if self.pool_kernel > MAX_POOL_KERNEL:
      raise ValueError(f"pool_kernel: at most {MAX_POOL_KERNEL}, got {self.pool_kernel}")
    checks.require_choice("selection", self.selection, SELECTION_MODES)

  @property
  def adaptive(self) -> bool:
    return self.selection == "per_head_adaptive"


# Engine --------------------------------------------------------------------------------------

SCHEDULERS = ("phase", "fcfs", "static")
LOGIT_VARIANTS = ("auto",) + VARIANTS


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Serving knobs. Each technique of the paper is one switch:

  - ``logits``: "auto" (the budgeter's choice within ``activation_budget_bytes``) or a forced
    variant; "full" is the no-budgeting baseline;
  - ``scheduler``: "phase" (phase-multiplexed, default), "fcfs" (the reference's token-budget
    FCFS) or "static" (a batch runs to completion before the next is admitted);
  - ``sparse``: the SparseConfig given to requests that do not bring their own (None = dense);
    its ``selection`` switches head-centric ("per_head") vs "shared" selection.

  Memory: ``memory_budget_bytes`` (if set) is what weights + KV pool + activation peak may use on
  any backend, per device; the KV pool gets what is left (``num_pages``, per device, overrides
  it). ``tp``: tensor-parallel devices (dllm_jax/parallel.py).
  """

  max_running: int = 32
  token_budget: int = 4096
  max_model_len: int | None = None
  scheduler: str = "phase"
  logits: str = "auto"
  chunk_rows: int | None = None
  vocab_tile: int | None = None
  activation_budget_bytes: int | None = None
  memory_budget_bytes: int | None = None
  num_pages: int | None = None
  page_size: int = 64
  max_block_length: int = 128
  max_refresh_rows: int = 16
  max_reuse_rows: int = 32
  sparse: SparseConfig | None = None
  attn_impl: str = "auto"
  max_waiting: int = 1024
  aging_steps: int = 8
  tp: int = 1

  def __post_init__(self):
    checks.require_ints(self, ("tp", "max_running", "token_budget", "page_size",
                               "max_block_length", "max_refresh_rows", "max_reuse_rows",
                               "max_waiting", "aging_steps"))
    checks.require_ints(self, ("max_model_len", "chunk_rows", "vocab_tile",
                               "activation_budget_bytes", "memory_budget_bytes", "num_pages"),
                        optional=True)
    if self.num_pages is not None and self.num_pages < 2:
      raise ValueError("num_pages: need at least 2 (page 0 is the dummy page)")
    checks.require_choice("scheduler", self.scheduler, SCHEDULERS)
    checks.require_choice("logits", self.logits, LOGIT_VARIANTS)
    checks.require_choice("attn_impl", self.attn_impl, KERNEL_IMPLS)
    if self.page_size & (self.page_size - 1) or self.page_size < 16:
      raise ValueError(f"page_size: must be a power of two >= 16 (Triton), got {self.page_size}")
    if self.sparse is not None and not isinstance(self.sparse, SparseConfig):
      raise ValueError(f"sparse: expected a SparseConfig or None, got {type(self.sparse).__name__}")

  def replace(self, **kw) -> "EngineConfig":
    return dataclasses.replace(self, **kw)
