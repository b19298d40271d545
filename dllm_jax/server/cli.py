"""``dllm-jax serve``: the HTTP server from the command line.

    dllm-jax serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                   [--max-queue N] [--warmup {none,quick,full}] [engine flags]

``add_serve_args(parser)`` adds the flags, ``run_serve(args)`` serves (blocks) on the hardened
transport (dllm_jax.server.transport: header/body timeouts, a connection cap).
"""

from __future__ import annotations

import argparse
import os
import sys

from dllm_jax import engine_flags
from dllm_jax.engine_flags import add_engine_args, positive_float, positive_int


def _port(v: str) -> int:
  n = positive_int(v)
  if n > 65535:
    raise argparse.ArgumentTypeError(f"expected a port in [1, 65535], got {v!r}")
  return n


# (flag, type, default, help) of serve's numeric flags.
_NUMBERS = (
    ("--port", _port, 8000, "TCP port (default 8000)"),
    ("--max-queue", positive_int, 64,
     "requests that may wait for a running slot before new ones get 429 (default 64)"),
    ("--shutdown-timeout", positive_float, 30.0,
     "seconds in-flight requests get to finish on shutdown (default 30)"),
    ("--header-timeout", positive_float, 10.0,
     "seconds a client has to send a request's line and headers (408 after; default 10)"),
    ("--body-timeout", positive_float, 30.0,
     "seconds a client has to send a request's body (408 after; default 30)"),
    ("--max-connections", positive_int, 256,
     "open connections beyond this are answered 503 (default 256)"),
    ("--replicas", positive_int, 1,
     "data-parallel engines on disjoint device sets (least-loaded routing; default 1)"),
)


def add_serve_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
  p.description = ("Serve a diffusion LM over HTTP: OpenAI-compatible /v1/completions and "
                   "/v1/chat/completions, native /v1/diffusion/generate, SSE streaming, "
                   "/metrics and a demo page at /.")
  p.add_argument("--model", help="model directory in HF layout (default: the bundled demo model)")
  p.add_argument("--model-name", help="the id /v1/models reports (default: the directory name)")
  p.add_argument("--host", default="127.0.0.1",
                 help="bind address (default 127.0.0.1; use 0.0.0.0 to expose the server)")
  for flag, kind, default, text in _NUMBERS:
    p.add_argument(flag, type=kind, default=default, help=text)
  p.add_argument("--api-key", default=os.environ.get("DLLM_API_KEY"),
                 help="require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                      "(default: $DLLM_API_KEY, else no auth)")
  p.add_argument("--log-level", default="info",
                 choices=["critical", "error", "warning", "info", "debug"],
                 help="server log level (default info)")
  p.add_argument("--warmup", nargs="?", const="full", default="none",
                 choices=("none", "quick", "full"),
                 help="precompile the engine's steps before serving: quick = the common "
                      "shapes, full = every shape the configuration allows (a bare --warmup "
                      "means full; default none). With the compile cache on, a later start "
                      "loads them instead of compiling")
  p.add_argument("--no-compile-cache", action="store_true",
                 help="do not use JAX's persistent compilation cache (default: on, in "
                      "$DLLM_JAX_CACHE_DIR or ~/.cache/dllm-jax/jax)")
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
    from dllm_jax.server import transport
    from dllm_jax.server.app import create_app
  except ImportError as e:
    if e.name is None:  # e.g. an unsupported uvicorn version: the message says what to do
      raise ValueError(str(e)) from None
    raise ValueError(f"serving needs the server extras ({e.name} is missing): "
                     "pip install fastapi uvicorn prometheus-client") from None
  from dllm_jax import compile_cache, presets
  from dllm_jax.cli_generate import demo_model_dir

  model = args.model or demo_model_dir()
  if presets.is_preset(model):
    raise ValueError(f"{model} is an architecture preset without weights; --model needs a "
                     "checkpoint directory")
  if not os.path.isdir(model):
    raise FileNotFoundError(f"model directory not found: {model}")
  cfg = engine_config_from_args(args)
  if not args.no_compile_cache:
    compile_cache.enable()
  llms = build_replicas(model, cfg, args.replicas)
  llm = llms[0]
  if llm.tokenizer is None:
    print(f"dllm-jax serve: warning: {model} has no tokenizer.json; only token-id prompts on "
          "/v1/diffusion/generate will work", file=sys.stderr)
  if args.warmup != "none":
    n = sum(r.core.warmup(args.warmup, progress=sys.stderr.isatty()) for r in llms)
    print(f"dllm-jax serve: warm-up ({args.warmup}) compiled {n} step variants", file=sys.stderr)
  app = create_app(llms if len(llms) > 1 else llm, api_key=args.api_key or None,
                   model_name=args.model_name, max_queue=args.max_queue,
                   shutdown_timeout=args.shutdown_timeout)
  auth = "on" if args.api_key else "off"
  print(f"dllm-jax serve: {model} on http://{args.host}:{args.port} (auth {auth}; demo page /)",
        file=sys.stderr)
  transport.serve(app, host=args.host, port=args.port, log_level=args.log_level,
                  header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                  max_connections=args.max_connections,
                  shutdown_timeout_s=args.shutdown_timeout)
  return 0


def main(argv: list[str] | None = None) -> int:
  from dllm_jax.cli import Parser
  p = add_serve_args(Parser(prog="dllm-jax serve"))
  args = p.parse_args(argv)
  try:
    return run_serve(args)
  except (ValueError, OSError) as e:
    print(f"dllm-jax serve: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
