"""Export of a trained demo model as an HF-layout directory (the bundled model's format)."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp

from dllm_jax.model.transformer import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Default sampling settings shipped with the demo model (LLaDA generate.py names).
DEMO_GENERATION_CONFIG = {
    "gen_length": 64, "steps": 64, "block_length": 32, "temperature": 0.0,
    "remasking": "low_confidence", "cfg_scale": 0.0,
}


def export_bundle(model: Transformer, tokenizer_dir: str, out_dir: str, *,
                  generation_config: dict | None = None, dtype=jnp.bfloat16) -> list[str]:
  """The HF-layout model directory: config.json + model.safetensors (bf16), tokenizer files,
  generation_config.json."""
  from dllm_jax.model.loader import save_hf_checkpoint
  written = list(save_hf_checkpoint(model, out_dir, dtype=dtype))
  for f in TOKENIZER_FILES:
    shutil.copyfile(os.path.join(tokenizer_dir, f), os.path.join(out_dir, f))
    written.append(os.path.join(out_dir, f))
  p = os.path.join(out_dir, "generation_config.json")
  gen = dict(DEMO_GENERATION_CONFIG if generation_config is None else generation_config)
  gen.update(mask_token_id=model.cfg.mask_token_id, eos_token_id=model.cfg.eos_token_id,
             eot_token_id=model.cfg.eot_token_id, pad_token_id=model.cfg.pad_token_id)
  with open(p, "w") as fh:
    json.dump(gen, fh, indent=2)
    fh.write("\n")
  written.append(p)
  for f in written:  # safetensors writes 0600; package data must be world-readable
    os.chmod(f, 0o644)
  return written
