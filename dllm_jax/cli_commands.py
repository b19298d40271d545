"""Sub-commands of ``dllm-jax`` beyond ``info``: generate, convert, train-demo, profile, bench.

Each registers its own parser; heavy modules are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys

MASK_PLACEHOLDER = "_"


def _sampling_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("sampling (unset flags come from the model's generation_config.json)")
  g.add_argument("--gen-length", type=int)
  g.add_argument("--steps", type=int)
  g.add_argument("--block-length", type=int)
  g.add_argument("--temperature", type=float)
  g.add_argument("--confidence", choices=["low_confidence", "random", "margin", "entropy"])
  g.add_argument("--rule", choices=["fixed", "threshold", "factor"])
  g.add_argument("--threshold", type=float)
  g.add_argument("--factor", type=float)
  g.add_argument("--schedule", choices=["llada", "dream"])
  g.add_argument("--seed", type=int)
  g.add_argument("--stop-on-eos", dest="stop_on_eos", action="store_true", default=None)
  g.add_argument("--no-stop-on-eos", dest="stop_on_eos", action="store_false")


SAMPLING_FIELDS = ("gen_length", "steps", "block_length", "temperature", "confidence", "rule",
                   "threshold", "factor", "schedule", "seed", "stop_on_eos")


def sampling_params_from_args(args):
  from dllm_jax.config import SamplingParams
  return SamplingParams(**{k: getattr(args, k) for k in SAMPLING_FIELDS})


def _read_prompts(args) -> list[str]:
  prompts = list(args.prompts)
  if args.file:
    try:
      with open(args.file) as fh:
        prompts += [line.rstrip("\n") for line in fh if line.strip()]
    except OSError as e:
      raise FileNotFoundError(f"cannot read prompt file {args.file}: {e.strerror}") from None
  if prompts == ["-"] or (not prompts and not sys.stdin.isatty()):
    prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
  if not prompts:
    raise ValueError("no prompt given (pass prompts as arguments, --file PATH, or on stdin)")
  return prompts


def render_canvas(tokenizer, ids: list[int], mask_id: int) -> str:
  """Decode a partly denoised canvas, masks shown as placeholders."""
  out, run = [], []
  for t in ids:
    if t == mask_id:
      if run:
        out.append(tokenizer.decode(run, skip_special_tokens=True))
        run = []
      out.append(MASK_PLACEHOLDER)
    else:
      run.append(t)
  if run:
    out.append(tokenizer.decode(run, skip_special_tokens=True))
  return "".join(out)


def cmd_generate(args) -> int:
  from tqdm import tqdm

  from dllm_jax.decoding.dense import LogitPlan
  from dllm_jax.engine.engine import DEMO_MODEL_DIR, LLM

  model = args.model or DEMO_MODEL_DIR
  if not os.path.isdir(model):
    raise FileNotFoundError(f"model directory not found: {model}")
  prompts = _read_prompts(args)
  sp = sampling_params_from_args(args)
  llm = LLM(model, logit_plan=LogitPlan(variant=args.logits) if args.logits else None)
  if llm.tokenizer is None:
    raise ValueError(f"{model} has no tokenizer.json; text prompts need one")
  batches = [prompts[i:i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
  bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=args.quiet,
             file=sys.stderr)
  for batch in batches:
    if args.chat:
      outs = llm.chat([[{"role": "user", "content": p}] for p in batch], sp,
                      return_trace=args.show_steps)
    else:
      outs = llm.generate(batch, sp, return_trace=args.show_steps)
    bar.update(len(batch))
    for prompt, o in zip(batch, outs):
      if args.show_steps:
        for k, canvas in enumerate(o.trace):
          bar.write(f"[step {k + 1:>3}] {render_canvas(llm.tokenizer, canvas, llm.cfg.mask_token_id)}")
      text = (prompt + o.text) if args.echo else o.text
      bar.write(text)
      if args.show_steps or args.verbose:
        bar.write(f"(nfe {o.nfe}, finish {o.finish_reason})")
  bar.close()
  return 0


def register_generate(sub) -> None:
  p = sub.add_parser("generate", help="generate text with diffusion decoding",
                     description="Generate with diffusion decoding (default: the bundled demo model).")
  p.add_argument("prompts", nargs="*", help="prompts; '-' or none reads stdin")
  p.add_argument("--file", help="read one prompt per line from this file")
  p.add_argument("--model", help="model directory in HF layout (default: the bundled demo model)")
  p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
  p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
  p.add_argument("--show-steps", action="store_true",
                 help=f"print the canvas after every step ('{MASK_PLACEHOLDER}' = still masked)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--logits", choices=["full", "rows", "row_chunked", "vocab_tiled"],
                 help="force a logit variant (default: the budgeter's choice)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.add_argument("--verbose", action="store_true", help="print NFE and finish reason")
  _sampling_flags(p)
  p.set_defaults(func=cmd_generate)


def cmd_convert(args) -> int:
  import jax.numpy as jnp

  from dllm_jax.model.checkpoint import restore_params, save_params
  from dllm_jax.model.loader import load_model, save_hf_checkpoint

  src = args.src
  if not os.path.isdir(src):
    raise FileNotFoundError(f"source directory not found: {src}")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[args.dtype]
  if args.to == "orbax":
    model = load_model(src, param_dtype=dtype or jnp.float32)
    save_params(model, args.dst)
  else:
    model = restore_params(src, param_dtype=dtype)
    save_hf_checkpoint(model, args.dst, max_shard_bytes=int(args.max_shard_gb * 1e9))
  print(f"wrote {args.dst}")
  return 0


def register_convert(sub) -> None:
  p = sub.add_parser("convert", help="HF safetensors <-> orbax checkpoint")
  p.add_argument("src", help="source directory")
  p.add_argument("dst", help="destination directory (orbax: must not exist)")
  p.add_argument("--to", choices=["orbax", "hf"], required=True)
  p.add_argument("--dtype", choices=["float32", "bfloat16"])
  p.add_argument("--max-shard-gb", type=float, default=5.0, help="HF export shard size")
  p.set_defaults(func=cmd_convert)


def _command(sub, name: str, help_: str, add_args, run):
  """One sub-command: its parser, its flags (``add_args``) and what runs it."""
  p = sub.add_parser(name, help=help_)
  add_args(p)
  p.set_defaults(func=run)
  return p


def register_train(sub) -> None:
  from dllm_jax.train import trainer
  _command(sub, "train-demo", "train the bundled demo model (masked diffusion)",
           trainer.add_train_args, trainer.run_train)


def register_profile(sub) -> None:
  from dllm_jax.logits import profiler
  _command(sub, "profile", "offline memory profile and KV pool sizing",
           profiler.add_profile_args, profiler.run_profile)


def register_serve(sub) -> None:
  from dllm_jax.server import cli as server_cli
  _command(sub, "serve", "OpenAI-compatible HTTP server with a live demo page",
           server_cli.add_serve_args, server_cli.run_serve)


def register_bench(sub) -> None:
  p = sub.add_parser("bench", help="benchmarks (logits | attention | serve | sparse-quality)")
  bsub = p.add_subparsers(dest="bench", required=True)
  from dllm_jax.bench import driver, logits_bench

  _command(bsub, "logits", "logit variants: peak activation bytes and time",
           logits_bench.add_args, logits_bench.run)
  _command(bsub, "serve", "run a workload against the engine (or --url server)",
           driver.add_args, driver.run)
  for name, module, help_ in (("attention", "attention_bench", "Reuse attention: dense vs sparse"),
                              ("sparse-quality", "sparse_quality",
                               "agreement of sparse modes with dense decoding")):
    try:
      mod = __import__(f"dllm_jax.bench.{module}", fromlist=["run"])
    except ModuleNotFoundError:
      continue
    _command(bsub, name, help_, mod.add_args, mod.run)


def register_ablate(sub) -> None:
  from dllm_jax.bench import ablation
  _command(sub, "ablate", "the ablation ladder at an equal memory budget, with plots",
           ablation.add_args, ablation.run)


def _optional(register):
  """Register a command whose module may not be importable where optional extras are missing
  (e.g. the server without fastapi): it is then absent from --help instead of breaking the CLI."""
  def wrapped(sub):
    try:
      register(sub)
    except ModuleNotFoundError as e:
      if not (e.name or "").startswith(("fastapi", "uvicorn", "matplotlib", "httpx")):
        raise
  return wrapped


REGISTRY = [register_generate, register_convert, register_train, register_profile,
            _optional(register_serve), _optional(register_bench), _optional(register_ablate)]
