"""The engine's memory model: activation bytes of a bucketed step, logit plan, KV pool size.

``budget = weights + KV pool + activation peak`` (DESIGN.md §4). The activation peak of a step
is analytic (a documented upper estimate of the largest live set; see
:func:`step_activation_bytes`); the logit part comes from the budgeter's model of the chosen
variant. The engine enforces the budget on any backend: the pool gets what is left after the
weights and the peak of the largest configured step, and the scheduler only runs steps whose
estimate fits ``activation_budget_bytes``.
"""

from __future__ import annotations

import jax.numpy as jnp

from dllm_jax.config import EngineConfig, ModelConfig
from dllm_jax.sampling.plan import LogitPlan


def logit_plan(cfg: EngineConfig, mcfg: ModelConfig, rows: int, dtype) -> LogitPlan:
  """The logit variant for ``rows`` candidate rows: forced by the config, or the budgeter's
  fastest plan within the logit share of the activation budget."""
  if cfg.logits != "auto":
    return LogitPlan(variant=cfg.logits, chunk_rows=cfg.chunk_rows or 256,
                     vocab_tile=cfg.vocab_tile or 2048)
  from dllm_jax.sampling import budgeter
  budget = cfg.activation_budget_bytes or (1 << 62)
  return budgeter.choose(budget // 2, rows, mcfg.hidden_size, mcfg.vocab_size, jnp.dtype(dtype))


def logit_bytes(mcfg: ModelConfig, plan: LogitPlan, rows: int, fed_rows: int, dtype) -> int:
  from dllm_jax.sampling import budgeter
  variant = plan.variant
  r = fed_rows if variant == "full" else rows
  return budgeter.estimate_bytes(variant if variant != "full" else "rows", r, mcfg.hidden_size,
                                 mcfg.vocab_size, jnp.dtype(dtype), plan.chunk_rows,
                                 plan.vocab_tile,
                                 impl="pallas" if plan.impl == "pallas" else "xla")


def step_activation_bytes(mcfg: ModelConfig, lay, plan: LogitPlan, dtype, *,
                          flash_refresh: bool = False) -> int:
  """Upper estimate of a step's live activations (bytes), for a bucket's ``Layout``
  (dllm_jax/engine/batch.py).

  T flat tokens, A = Br*N + Bu*Lq attention-layout rows, b = dtype bytes:
    residual stream + normed copy + layer output: 3 * T * d * b
    attention: q/k/v of the flat tokens and of the layouts (T + A)*(Hq + 2*Hkv)*D*b, the outputs
               A*Hq*D*b, Refresh scores and probabilities 2 * Br*Hq*N*N*4 (f32; none with cuDNN
               flash attention, ``flash_refresh``), Reuse gathered-page worst case is bounded by
               the kernel's tiles (ignored)
    MLP: gate, up and their product 3 * T * F * b
    logits: the plan's own peak (budgeter) for the K candidate rows (``full``: every fed row),
            with the candidate rows' hidden gather K*d*b
  peak = 3*T*d*b + max(attention, MLP, logits + K*d*b).
  """
  b = jnp.dtype(dtype).itemsize
  t = lay.tokens
  a = lay.refresh_rows * lay.length + lay.reuse_rows * lay.query_width
  d, f, hd = mcfg.hidden_size, mcfg.intermediate_size, mcfg.head_dim
  heads = mcfg.num_heads + 2 * mcfg.num_kv_heads
  attn = (t + a) * heads * hd * b + a * mcfg.num_heads * hd * b
  if not flash_refresh:
    attn += 2 * lay.refresh_rows * mcfg.num_heads * lay.length * lay.length * 4
  mlp = 3 * t * f * b
  rows = lay.candidates
  logits = logit_bytes(mcfg, plan, rows, t, dtype) + rows * d * b
  return 3 * t * d * b + max(attn, mlp, logits)


def weights_bytes(mcfg: ModelConfig, dtype) -> int:
  return mcfg.num_params() * jnp.dtype(dtype).itemsize


def pages_for_budget(budget: int, mcfg: ModelConfig, peak: int, pool) -> int:
  """KV pages that fit: (budget - weights - activation peak of the largest step) / page bytes.

  ``peak``: the largest activation estimate over every bucket of the engine's grid (or the
  activation budget, when one is set). Compare dLLM-Serve's
  ``(total*util - used - peak + current) / page_bytes`` (spec §5.3): the same subtraction, with
  the peak taken from the analytic model instead of a warm-up run.
  """
  left = budget - weights_bytes(mcfg, jnp.dtype(pool.dtype)) - peak
  return int(left // pool.page_bytes)
