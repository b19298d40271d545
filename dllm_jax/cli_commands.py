"""The sub-commands of ``dllm-jax``: each ``setup_*`` adds one command's flags and its runner.

:mod:`dllm_jax.cli` calls a setup only when its command is parsed, and the heavy modules
(jax, the engine, the server, the benchmarks) are imported only when a command runs or its
module defines the flags. ``generate`` lives in :mod:`dllm_jax.cli_generate`.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import os

from dllm_jax import presets
from dllm_jax.cli import CLIError, add_lazy_commands

NO_CACHE_HELP = ("do not use JAX's persistent compilation cache (default: on, in "
                 "$DLLM_JAX_CACHE_DIR or ~/.cache/dllm-jax/jax)")


def add_compile_cache_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument("--no-compile-cache", action="store_true", help=NO_CACHE_HELP)


def _use(p: argparse.ArgumentParser, module: str, add: str, run: str, *, cache: bool) -> None:
  """Give ``p`` the flags ``module.add`` defines and ``module.run`` as its runner; with
  ``cache``, also --no-compile-cache. A command with its own --compile-cache DIR flag keeps
  managing its cache (the default one is not turned on) and --no-compile-cache empties DIR."""
  mod = importlib.import_module(module)
  getattr(mod, add)(p)
  runner = getattr(mod, run)
  if cache:
    add_compile_cache_flag(p)
    if "--compile-cache" in p._option_string_actions:
      p.set_defaults(own_compile_cache=True)
      runner = functools.partial(_own_cache_off, runner)
  p.set_defaults(func=runner)


def _own_cache_off(run, args) -> int:
  if args.no_compile_cache:
    args.compile_cache = ""
  return run(args)


# generate ------------------------------------------------------------------------------------


def setup_generate(p: argparse.ArgumentParser) -> None:
  from dllm_jax import cli_generate
  cli_generate.add_generate_args(p)
  add_compile_cache_flag(p)
  p.set_defaults(func=cli_generate.run_generate)


# info ----------------------------------------------------------------------------------------


def _fmt_int(n: int) -> str:
  return f"{n:,}"


def setup_info(p: argparse.ArgumentParser) -> None:
  p.add_argument("path", metavar="MODEL",
                 help="a preset (" + ", ".join(presets.names()) + "), a config.json or a "
                      "model directory")
  p.set_defaults(func=run_info)


def run_info(args) -> int:
  cfg = presets.model_config(args.path)
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


# convert -------------------------------------------------------------------------------------


def setup_convert(p: argparse.ArgumentParser) -> None:
  p.description = ("Convert a checkpoint between HF safetensors and orbax. Tokenizer files, "
                   "generation_config.json and the other non-weight files are copied along, so "
                   "both results load with `generate --model DST` and LLM(DST).")
  p.add_argument("src", help="source model directory (HF layout, or orbax for --to hf)")
  p.add_argument("dst", help="destination directory (orbax: must not exist)")
  p.add_argument("--to", choices=["orbax", "hf"], required=True, help="the format to write")
  p.add_argument("--dtype", choices=["float32", "bfloat16"],
                 help="parameter dtype of the result (default: float32 for orbax, as saved "
                      "for hf)")
  p.add_argument("--max-shard-gb", type=float, default=5.0,
                 help="largest safetensors shard of an HF export, GB (default 5)")
  p.set_defaults(func=run_convert)


def run_convert(args) -> int:
  src, dst = args.src, args.dst
  if not os.path.isdir(src):
    raise FileNotFoundError(f"source directory not found: {src}")
  if os.path.abspath(src) == os.path.abspath(dst):
    raise CLIError("source and destination are the same directory")
  if not args.max_shard_gb > 0:
    raise CLIError(f"--max-shard-gb: expected a positive size, got {args.max_shard_gb:g}")
  is_orbax = os.path.isdir(os.path.join(src, "params"))
  if args.to == "orbax" and is_orbax:
    raise CLIError(f"{src} is already an orbax checkpoint")
  if args.to == "hf" and not is_orbax:
    raise CLIError(f"{src} is not an orbax checkpoint (no params/); --to hf converts one")
  if args.to == "orbax" and os.path.exists(dst):
    raise FileExistsError(f"{dst} already exists; orbax will not overwrite it")
  import jax.numpy as jnp

  from dllm_jax.model import checkpoint
  from dllm_jax.model.loader import load_model, save_hf_checkpoint

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[args.dtype]
  if args.to == "orbax":
    model = load_model(src, param_dtype=dtype or jnp.float32)
    checkpoint.save_params(model, dst)
  else:
    model = checkpoint.restore_params(src, param_dtype=dtype)
    save_hf_checkpoint(model, dst, max_shard_bytes=int(args.max_shard_gb * 1e9))
  copied = checkpoint.copy_sidecars(src, dst)
  print(f"wrote {dst}" + (f" (with {', '.join(copied)})" if copied else ""))
  return 0


# commands defined in other modules ------------------------------------------------------------

def setup_train(p: argparse.ArgumentParser) -> None:
  _use(p, "dllm_jax.train.trainer", "add_train_args", "run_train", cache=False)


def setup_profile(p: argparse.ArgumentParser) -> None:
  p.description = ("Offline memory profile: weights, the Refresh step's activation peak, logit "
                   "peaks and the KV pool a device has room for. Exits 1 if the model does "
                   "not fit.")
  _use(p, "dllm_jax.engine.profiler", "add_profile_args", "run_profile", cache=False)


def setup_serve(p: argparse.ArgumentParser) -> None:
  _use(p, "dllm_jax.server.cli", "add_serve_args", "run_serve", cache=False)  # has its own


def setup_ablate(p: argparse.ArgumentParser) -> None:
  _use(p, "dllm_jax.bench.ablation", "add_args", "run", cache=True)


# bench ---------------------------------------------------------------------------------------

BENCHES = (  # name, help, module (exposing add_args(parser) and run(args))
    ("serve", "run a workload against the engine (or --url server)", "dllm_jax.bench.driver"),
    ("e2e", "the engine end to end on random weights at a preset's width",
     "dllm_jax.bench.e2e"),
    ("logits", "logit variants: peak activation bytes and time", "dllm_jax.bench.logits_bench"),
    ("attention", "Reuse attention: dense vs sparse", "dllm_jax.bench.attention_bench"),
    ("sparse-quality", "agreement of sparse modes with dense decoding",
     "dllm_jax.bench.sparse_quality"),
)


def setup_bench(p: argparse.ArgumentParser) -> None:
  present = [(name, help_, functools.partial(_use, module=module, add="add_args", run="run",
                                             cache=True))
             for name, help_, module in BENCHES if importlib.util.find_spec(module) is not None]
  add_lazy_commands(p, present, dest="bench", title="benchmarks", metavar="BENCHMARK")
