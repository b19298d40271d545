"""``sparse_quality``: how often sparse decoding reproduces dense decoding, per selection mode.

For held-out prompts of the bundled demo corpus (token prefixes of ``load_corpus("heldout")``
documents, tokenized with the model's tokenizer, no chat template), every prompt is decoded once
densely (the engine with the sparse cache off, ``sparse=SparseConfig(enabled=False)``) and once
per selection mode
(``shared`` / ``per_head`` / ``per_head_adaptive``) with a sparse cache of the given keep ratio
through the continuous-batching engine. Reported per mode: the **agreement**, i.e. the fraction
of generated positions whose token equals the dense one (mean over prompts; min / max shown).
Greedy decoding (T = 0), fixed rule, one token per step, ``stop_on_eos`` off so every position
is decoded and compared (an EOS fill would make tails agree trivially).

Agreement is a proxy for quality loss, not a quality score: at keep ratio 1.0 a multi-layer model
still differs from dense decoding because the cached K/V of the non-block positions are frozen at
each block's Select step: computed while the block still holds masks, they are not updated as its
tokens are decoded (a bidirectional model's dense K/V would be).

  python -m dllm_jax.bench.sparse_quality --prompts 6 --gen-length 32 --block-length 16
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from dllm_jax.config import LOGIT_VARIANTS, SELECTION_MODES, SparseConfig
from dllm_jax.engine_flags import add_sparse_knobs, positive_int

MODES = SELECTION_MODES


def heldout_prompts(tokenizer, num_prompts: int, prompt_tokens: int) -> list[list[int]]:
  """``num_prompts`` token prefixes (``prompt_tokens`` long) of held-out documents, spread over
  the snapshot deterministically (every k-th document that is long enough)."""
  from dllm_jax.train.corpus import load_corpus
  docs = load_corpus("heldout")
  if num_prompts < 1:
    raise ValueError(f"num_prompts: expected >= 1, got {num_prompts}")
  stride = max(1, len(docs) // num_prompts)
  out: list[list[int]] = []
  for start in range(stride):  # shift the grid until enough long documents are found
    for doc in docs[start::stride]:
      # a character prefix is plenty for prompt_tokens tokens (and keeps the tokenizer from
      # warning about documents longer than the model's context)
      ids = tokenizer.encode(doc[:16 * prompt_tokens], add_special_tokens=False)
      if len(ids) >= prompt_tokens:
        out.append(list(ids[:prompt_tokens]))
      if len(out) == num_prompts:
        return out
  raise ValueError(f"only {len(out)} held-out documents have >= {prompt_tokens} tokens")


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
  """Fraction of positions where the two token lists agree (same length)."""
  if len(a) != len(b):
    raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
  if not len(a):
    return 1.0
  return float(np.mean(np.asarray(a) == np.asarray(b)))


def measure(llm, prompts: list[list[int]], *, gen_length: int = 32, block_length: int = 16,
            keep_ratio: float = 0.5, modes: Sequence[str] = MODES, delay: int = 1,
            pool_kernel: int = 3) -> dict:
  """Agreement of each sparse selection mode with dense decoding on ``prompts``.

  Returns {"dense": [[tokens] per prompt], "modes": {mode: {"agreement": mean,
  "per_prompt": [...], "tokens": [[...]]}}, plus the settings}.
  """
  from dllm_jax.config import SamplingParams, SparseConfig

  sp = SamplingParams(gen_length=gen_length, block_length=block_length, steps=gen_length,
                      temperature=0.0, rule="fixed", stop_on_eos=False)
  dense = [o.token_ids for o in llm.generate(prompts, sp, sparse=SparseConfig(enabled=False))]
  result = dict(gen_length=gen_length, block_length=block_length, keep_ratio=keep_ratio,
                delay=delay, pool_kernel=pool_kernel, num_prompts=len(prompts), dense=dense,
                modes={})
  for mode in modes:
    cfg = SparseConfig(keep_ratio=keep_ratio, pool_kernel=pool_kernel, delay=delay,
                       selection=mode)
    outs = llm.generate(prompts, sp, sparse=cfg)
    per = [agreement(o.token_ids, d) for o, d in zip(outs, dense)]
    result["modes"][mode] = dict(agreement=float(np.mean(per)), per_prompt=per,
                                 tokens=[o.token_ids for o in outs])
  return result


def markdown_table(result: dict) -> str:
  lines = [
      f"Sparse vs dense agreement: {result['num_prompts']} held-out prompts, gen "
      f"{result['gen_length']}, block {result['block_length']}, keep {result['keep_ratio']}, "
      f"delay {result['delay']}, pool {result['pool_kernel']}, T=0",
      "",
      "| selection | prompts | gen length | agreement (mean) | min | max |",
      "|---|---|---|---|---|---|",
  ]
  for mode, r in result["modes"].items():
    lines.append(f"| {mode} | {result['num_prompts']} | {result['gen_length']} | "
                 f"{r['agreement']:.3f} | {min(r['per_prompt']):.3f} | "
                 f"{max(r['per_prompt']):.3f} |")
  return "\n".join(lines)


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", default=None, help="model directory (default: the bundled demo)")
  for flag, default, text in (("--prompts", 6, "held-out prompts"),
                              ("--prompt-tokens", 48, "tokens per prompt"),
                              ("--gen-length", 32, "generated tokens per prompt, all compared"),
                              ("--block-length", 16, "decoding block length")):
    p.add_argument(flag, type=positive_int, default=default, help=f"{text} (default {default})")
  add_sparse_knobs(p, SparseConfig())
  p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                 help="selection modes to compare with dense decoding (default: all)")
  p.add_argument("--logits", default="rows", choices=LOGIT_VARIANTS,
                 help="EngineConfig.logits (tokens do not depend on it; default rows)")
  p.add_argument("--out", help="also write the numbers as JSON here")


def build_llm(model: str | None, max_len: int, logits: str = "rows"):
  from dllm_jax.config import EngineConfig
  from dllm_jax.engine.engine import LLM
  cfg = EngineConfig(max_model_len=max_len, logits=logits, max_block_length=128)
  return LLM(model, engine_config=cfg)


def run(args) -> int:
  llm = build_llm(args.model, args.prompt_tokens + args.gen_length, args.logits)
  if llm.tokenizer is None:
    print("sparse_quality: the model has no tokenizer", file=sys.stderr)
    return 2
  prompts = heldout_prompts(llm.tokenizer, args.prompts, args.prompt_tokens)
  result = measure(llm, prompts, gen_length=args.gen_length, block_length=args.block_length,
                   keep_ratio=args.keep_ratio, modes=args.modes, delay=args.delay,
                   pool_kernel=args.pool_kernel)
  print(markdown_table(result))
  if args.out:
    with open(args.out, "w") as fh:
      json.dump({k: v for k, v in result.items() if k != "dense"}, fh, indent=2)
  return 0


def main(argv=None) -> int:
  """``python -m dllm_jax.bench.sparse_quality ARGS`` = ``dllm-jax bench sparse-quality ARGS``."""
  from dllm_jax import cli
  return cli.main(["bench", "sparse-quality", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  sys.exit(main())
