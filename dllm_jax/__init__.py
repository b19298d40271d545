"""dllm-jax: a JAX/Pallas inference engine for diffusion language models (LLaDA, Dream)."""

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "dllm_jax.engine.engine",
    "GenerationOutput": "dllm_jax.engine.outputs",
    "RequestOutput": "dllm_jax.engine.outputs",
    "OutputKind": "dllm_jax.engine.outputs",
    "SamplingParams": "dllm_jax.config",
    "SparseConfig": "dllm_jax.config",
    "EngineConfig": "dllm_jax.config",
    "ModelConfig": "dllm_jax.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):  # lazy, so `dllm-jax info` does not import jax
  if name in _EXPORTS:
    import importlib
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'dllm_jax' has no attribute {name!r}")
