"""``dllm-jax generate``: text generation from the command line.

Flags are checked, and the sampling parameters resolved against the model's
generation_config.json, before jax is imported, so a mistake is reported at once and with the
values actually in effect. ``--show-steps`` prints every denoising step as it happens.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from importlib import resources

from dllm_jax import config as C
from dllm_jax import jsonfile, presets
from dllm_jax.config import SAMPLING_FIELDS
from dllm_jax.cli import CLIError
from dllm_jax.engine_flags import nonneg_int, positive_int

MASK_PLACEHOLDER = "_"
_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def demo_model_dir() -> str:
  return str(resources.files("dllm_jax") / "assets" / "demo")


def add_generate_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("prompts", nargs="*", help="prompts; '-' or none reads stdin (one per line)")
  p.add_argument("--file", help="read one prompt per line from this file")
  p.add_argument("--model", help="model directory, HF safetensors or orbax (default: the "
                                 "bundled demo model)")
  p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
  p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
  p.add_argument("--show-steps", action="store_true",
                 help=f"print the canvas after every step as it happens ('{MASK_PLACEHOLDER}' = "
                      "still masked; newlines shown as \\n; cut to the terminal width); "
                      "prompts then run one at a time")
  p.add_argument("--batch-size", type=positive_int, default=8,
                 help="prompts submitted to the engine together (default 8)")
  p.add_argument("--logits", choices=C.LOGIT_VARIANTS,
                 help="logit variant (default auto: the budgeter's choice)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.add_argument("--verbose", action="store_true",
                 help="print each result's NFE (forward passes) and finish reason")
  g = p.add_argument_group("sampling (unset flags come from the model's generation_config.json)")
  g.add_argument("--gen-length", type=positive_int, help="tokens to generate")
  g.add_argument("--steps", type=positive_int, help="denoising steps (default: gen_length)")
  g.add_argument("--block-length", type=positive_int,
                 help="semi-autoregressive block length (divides gen_length)")
  g.add_argument("--temperature", type=float, help="0 = greedy")
  g.add_argument("--confidence", choices=C.CONFIDENCE_KINDS,
                 help="score deciding which masked positions to commit first")
  g.add_argument("--rule", choices=C.RULES,
                 help="how many to commit per step: fixed schedule, confidence threshold, or "
                      "factor (Fast-dLLM)")
  g.add_argument("--threshold", type=float, help="confidence threshold of --rule threshold")
  g.add_argument("--factor", type=float, help="factor of --rule factor")
  g.add_argument("--schedule", choices=C.SCHEDULES, help="the family's step schedule")
  g.add_argument("--seed", type=nonneg_int, help="sampling seed")
  g.add_argument("--stop-on-eos", dest="stop_on_eos", action="store_true", default=None,
                 help="stop at the first end-of-sequence token")
  g.add_argument("--no-stop-on-eos", dest="stop_on_eos", action="store_false",
                 help="always fill gen_length tokens")


# Inputs --------------------------------------------------------------------------------------


def read_prompts(args) -> list[str]:
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


def model_dir(args) -> str:
  if args.model is None:
    return demo_model_dir()
  if presets.is_preset(args.model):
    raise CLIError(f"{args.model} is an architecture preset without weights; --model needs a "
                   "checkpoint directory")
  if not os.path.isdir(args.model):
    raise FileNotFoundError(f"model directory not found: {args.model}")
  return args.model


def generation_defaults(path: str) -> dict:
  """The model's generation_config.json ({} if it has none)."""
  f = os.path.join(path, "generation_config.json")
  return jsonfile.read_object(f) if os.path.isfile(f) else {}


def sampling_params(args, defaults: dict):
  """SamplingParams from the flags, unset ones filled from ``defaults`` as LLM does it
  (SamplingParams.with_defaults). A ValueError says which values were in effect and where each
  came from (your flag, the model's generation_config.json, the built-in default)."""
  from dllm_jax.config import SamplingParams

  user = {k: getattr(args, k) for k in SAMPLING_FIELDS if getattr(args, k) is not None}
  from_model = {k: v for k, v in defaults.items()
                if k in SAMPLING_FIELDS and k not in user and v is not None
                and not (k in ("steps", "block_length") and "gen_length" in user)}
  try:
    return SamplingParams(**user, **from_model)
  except ValueError as e:
    msg = str(e)
    named = [k for k in SAMPLING_FIELDS if re.search(rf"\b{k}\b", msg)]
    where = []
    for k in named:
      if k in user:
        where.append(f"{k} {user[k]} from your --{k.replace('_', '-')}")
      elif k in from_model:
        where.append(f"{k} {from_model[k]} from the model's generation_config.json")
      else:
        where.append(f"{k}: the built-in default")
    raise ValueError(msg + (f" [in effect: {'; '.join(where)}]" if where else "")) from None


# Output --------------------------------------------------------------------------------------


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


def one_line(text: str, width: int | None) -> str:
  """``text`` on one line (newlines and tabs escaped), cut to ``width`` columns."""
  text = text.translate(_ESCAPES)
  if width is not None and len(text) > width:
    text = text[:max(width - 1, 0)] + "…"
  return text


def terminal_width(stream) -> int | None:
  """Columns to fit live lines to: $COLUMNS, else the terminal's; None when not a terminal."""
  cols = os.environ.get("COLUMNS", "")
  if cols.isdigit() and int(cols) > 0:
    return int(cols)
  try:
    return shutil.get_terminal_size().columns if stream.isatty() else None
  except (AttributeError, ValueError, OSError):
    return None


class Printer:
  """Writes results to stdout: a header before each when there are several prompts."""

  def __init__(self, n: int, args, write):
    self.n, self.args, self.write = n, args, write

  def header(self, i: int, prompt: str) -> None:
    if self.n > 1:
      if i:
        self.write("")
      self.write(f"==> [{i + 1}/{self.n}] {one_line(prompt, 60)} <==")

  def result(self, prompt: str, out, verbose: bool) -> None:
    self.write((prompt + out.text) if self.args.echo else out.text)
    if verbose:
      self.write(f"(nfe {out.nfe}, finish {out.finish_reason})")


def _run_live(llm, prompts: list[str], sp, args, printer: Printer) -> None:
  width = terminal_width(sys.stdout)
  mask = llm.cfg.mask_token_id
  for i, prompt in enumerate(prompts):
    printer.header(i, prompt)
    text = prompt
    if args.chat:
      text = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    shown = 0

    def show(request_id, canvas, finished):  # LLM.step calls it after each step of the request
      nonlocal shown
      shown += 1
      line = f"[step {shown:>3}] {render_canvas(llm.tokenizer, canvas, mask)}"
      print(one_line(line, width), flush=True)

    rid = llm.add_request(text, sp, on_step=show)
    out = None
    while out is None:
      out = next((o for o in llm.step() if o.request_id == rid and o.finished), None)
    printer.result(prompt, out, verbose=True)


def _run_batches(llm, prompts: list[str], sp, args, printer: Printer) -> None:
  from tqdm import tqdm

  bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=args.quiet,
             file=sys.stderr)
  printer.write = bar.write
  for start in range(0, len(prompts), args.batch_size):
    batch = prompts[start:start + args.batch_size]
    if args.chat:
      outs = llm.chat([[{"role": "user", "content": p}] for p in batch], sp)
    else:
      outs = llm.generate(batch, sp)
    bar.update(len(batch))
    for i, (prompt, o) in enumerate(zip(batch, outs)):
      printer.header(start + i, prompt)
      printer.result(prompt, o, verbose=args.verbose)
  bar.close()


def run_generate(args) -> int:
  path = model_dir(args)
  prompts = read_prompts(args)
  sp = sampling_params(args, generation_defaults(path))

  from dllm_jax.sampling.plan import LogitPlan
  from dllm_jax.engine.engine import LLM

  plan = LogitPlan(variant=args.logits) if args.logits not in (None, "auto") else None
  llm = LLM(path, logit_plan=plan)
  if llm.tokenizer is None:
    raise ValueError(f"{path} has no tokenizer.json; text prompts need one")
  printer = Printer(len(prompts), args, print)
  if args.show_steps:
    _run_live(llm, prompts, sp, args, printer)
  else:
    _run_batches(llm, prompts, sp, args, printer)
  return 0
