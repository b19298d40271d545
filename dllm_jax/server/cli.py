"""``dllm-jax serve``: the HTTP server from the command line.

    dllm-jax serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                   [--max-queue N] [engine flags]

Wire it into the main CLI with::

    p = sub.add_parser("serve", help="...")
    add_serve_args(p)
    p.set_defaults(func=run_serve)
"""

from __future__ import annotations

import argparse
import os
import sys

from dllm_jax import engine_flags
from dllm_jax.engine_flags import add_engine_args, positive_int


def _port(v: str) -> int:
  n = positive_int(v)
  if n > 65535:
    raise argparse.ArgumentTypeError(f"expected a port in [1, 65535], got {v!r}")
  return n


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
  p.description = ("Serve a diffusion LM over HTTP: OpenAI-compatible /v1/completions and "
                   "/v1/chat/completions, native /v1/diffusion/generate, SSE streaming, "
                   "/metrics and a demo page at /.")
  p.add_argument("--model", help="model directory in HF layout (default: the bundled demo model)")
  p.add_argument("--model-name", help="the id /v1/models reports (default: the directory name)")
  p.add_argument("--host", default="127.0.0.1",
                 help="bind address (default 127.0.0.1; use 0.0.0.0 to expose the server)")
  p.add_argument("--port", type=_port, default=8000)
  p.add_argument("--api-key", default=os.environ.get("DLLM_API_KEY"),
                 help="require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                      "(default: $DLLM_API_KEY, else no auth)")
  p.add_argument("--max-queue", type=positive_int, default=64,
                 help="requests that may wait for a running slot before new ones get 429")
  p.add_argument("--shutdown-timeout", type=float, default=30.0,
                 help="seconds in-flight requests get to finish on shutdown")
  p.add_argument("--log-level", default="info",
                 choices=["critical", "error", "warning", "info", "debug"])
  p.add_argument("--warmup", action="store_true",
                 help="precompile the engine's step for every bucket before serving")
  p.add_argument("--replicas", type=positive_int, default=1,
                 help="data-parallel engines on disjoint device sets (least-loaded routing)")
  add_engine_args(p)
  return p


def engine_config_from_args(args):
  """The EngineConfig of ``serve``'s flags (``--max-queue`` is its waiting-queue limit)."""
  return engine_flags.engine_config_from_args(args, max_waiting=args.max_queue)


def build_replicas(model: str, cfg, replicas: int) -> list:
  """``replicas`` engines, each on its own ``cfg.tp`` devices (disjoint sets)."""
  import jax

  from dllm_jax.engine.engine import LLM

  devices = jax.devices()
  need = replicas * cfg.tp
  if need > len(devices):
    raise ValueError(f"--replicas {replicas} x --tp {cfg.tp} needs {need} devices; "
                     f"{len(devices)} available")
  llms = []
  for r in range(replicas):
    llm = LLM(model, engine_config=cfg, devices=devices[r * cfg.tp:(r + 1) * cfg.tp])
    llm.core  # build the engine (and its KV pool) on its devices now
    llms.append(llm)
  return llms


def run_serve(args) -> int:
  try:
    import uvicorn

    from dllm_jax.server.app import create_app
  except ImportError as e:
    raise ValueError(f"serving needs the server extras ({e.name} is missing): "
                     "pip install fastapi uvicorn prometheus-client") from None
  from dllm_jax.engine.engine import DEMO_MODEL_DIR, LLM

  model = args.model or DEMO_MODEL_DIR
  if not os.path.isdir(model):
    raise FileNotFoundError(f"model directory not found: {model}")
  cfg = engine_config_from_args(args)
  llms = build_replicas(model, cfg, args.replicas)
  llm = llms[0]
  if llm.tokenizer is None:
    print(f"dllm-jax serve: warning: {model} has no tokenizer.json; only token-id prompts on "
          "/v1/diffusion/generate will work", file=sys.stderr)
  if args.warmup:
    n = sum(r.core.warmup() for r in llms)
    print(f"dllm-jax serve: warm-up compiled {n} step variants", file=sys.stderr)
  app = create_app(llms if len(llms) > 1 else llm, api_key=args.api_key or None, model_name=args.model_name,
                   max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout)
  auth = "on" if args.api_key else "off"
  print(f"dllm-jax serve: {model} on http://{args.host}:{args.port} (auth {auth}; demo page /)",
        file=sys.stderr)
  uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
              timeout_graceful_shutdown=int(args.shutdown_timeout) + 5)
  return 0


def main(argv: list[str] | None = None) -> int:
  p = add_serve_args(argparse.ArgumentParser(prog="dllm-jax serve"))
  args = p.parse_args(argv)
  try:
    return run_serve(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"dllm-jax serve: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
