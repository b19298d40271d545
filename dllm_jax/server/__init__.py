"""HTTP serving: ``create_app(llm)`` (FastAPI; OpenAI-compatible + native diffusion endpoints).

Imported lazily so that ``dllm_jax`` works without the server extras (fastapi, uvicorn,
prometheus-client) installed.
"""

__all__ = ["create_app"]


def __getattr__(name):
  if name == "create_app":
    from dllm_jax.server.app import create_app
    return create_app
  raise AttributeError(name)
