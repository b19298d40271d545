"""dllm-jax: a JAX/Pallas inference engine for diffusion language models (LLaDA, Dream)."""

__version__ = "0.1.0"
