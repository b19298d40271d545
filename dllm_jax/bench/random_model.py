"""Random-weight models for the benchmarks: a preset's architecture, no checkpoint.

``dllm-jax ablate`` and ``dllm-jax bench serve --model PRESET`` build theirs here (float32, seed
0), so the same preset gives the same weights in both.
"""

from __future__ import annotations

MODEL_SEED = 0


def build_model(mcfg, dtype=None, seed: int = MODEL_SEED):
  """``init_model(mcfg)`` with random weights of ``dtype`` (default float32)."""
  import jax.numpy as jnp

  from dllm_jax.model.transformer import init_model
  return init_model(mcfg, param_dtype=jnp.float32 if dtype is None else dtype, seed=seed)
