"""``dllm-jax`` command line: generate | info | convert | train-demo | profile | bench.

Bad flags and unreadable paths exit non-zero with one clear line, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


class CLIError(Exception):
  """An error the user can fix; printed as one line."""


def _fmt_int(n: int) -> str:
  return f"{n:,}"


def cmd_info(args) -> int:
  from dllm_jax.config import ModelConfig

  path = args.path
  if not os.path.exists(path):
    raise CLIError(f"no such file or directory: {path}")
  cfg = ModelConfig.from_json(path)
  rows = [
      ("family", cfg.family),
      ("layers", cfg.num_layers),
      ("hidden size", cfg.hidden_size),
      ("heads (q / kv)", f"{cfg.num_heads} / {cfg.num_kv_heads}"
       + (" (MHA)" if cfg.num_heads == cfg.num_kv_heads else f" (GQA {cfg.group_size}:1)")),
      ("head dim", cfg.head_dim),
      ("MLP hidden (SwiGLU)", cfg.intermediate_size),
      ("vocab (LM-head rows)", cfg.vocab_size),
      ("max positions", cfg.max_position),
      ("RoPE theta", cfg.rope_theta),
      ("RMSNorm eps", cfg.rms_norm_eps),
      ("q/k/v bias", cfg.qkv_bias),
      ("prediction", "shifted (row i-1 predicts i)" if cfg.shifted_prediction else "direct"),
      ("mask / eos / eot / pad", f"{cfg.mask_token_id} / {cfg.eos_token_id} / "
       f"{cfg.eot_token_id} / {cfg.pad_token_id}"),
      ("parameters", _fmt_int(cfg.num_params())),
      ("bf16 weights", f"{cfg.num_params() * 2 / 2**30:.2f} GiB"),
      ("KV bytes / token (bf16)", _fmt_int(cfg.kv_bytes_per_token(2))),
  ]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="dllm-jax", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)

  info = sub.add_parser("info", help="architecture and exact parameter count of a config/model")
  info.add_argument("path", help="a config.json or a model directory")
  info.set_defaults(func=cmd_info)

  for register in _optional_commands():
    register(sub)
  return p


def _optional_commands():
  """Sub-commands that live in their own modules (imported lazily, so `info` stays fast)."""
  from dllm_jax import cli_commands

  return cli_commands.REGISTRY


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except (CLIError, FileNotFoundError, FileExistsError, ValueError, PermissionError,
          IsADirectoryError, NotADirectoryError) as e:
    print(f"dllm-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
