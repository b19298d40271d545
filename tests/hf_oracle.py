"""Tiny random HF Llama / Qwen2 models (torch, test-only) written in the real LLaDA / Dream naming.

HF Llama and Qwen2 called with ``is_causal=False`` are exact oracles for LLaDA and Dream (their
remote modeling code, run with tiny random weights, matched them with max |diff| = 0.0). Every
weight is randomised, norms and biases included, so a wrong mapping cannot hide behind ones and
zeros.
"""

from __future__ import annotations

import json
import os

import numpy as np

LLADA_RENAME = {
    "model.embed_tokens.weight": "model.transformer.wte.weight",
    "model.norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
}
LLADA_LAYER_RENAME = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.o_proj.weight": "attn_out.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
}

TINY = dict(vocab=96, hidden=64, layers=2, heads=4, inter=96, max_pos=128)


def llada_name(hf_name: str) -> str:
  if hf_name in LLADA_RENAME:
    return LLADA_RENAME[hf_name]
  parts = hf_name.split(".")  # model.layers.{i}.rest
  i, rest = parts[2], ".".join(parts[3:])
  return f"model.transformer.blocks.{i}.{LLADA_LAYER_RENAME[rest]}"


def build(family: str, seed: int = 0, kv_heads: int | None = None, **over):
  """Return (torch model, our config dict). LLaDA: MHA Llama; Dream: GQA Qwen2 with biases."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

  t = dict(TINY, **over)
  torch.manual_seed(seed)
  if family == "llada":
    kv = kv_heads or t["heads"]
    cfg = LlamaConfig(vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["inter"],
                      num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                      num_key_value_heads=kv, max_position_embeddings=t["max_pos"],
                      rms_norm_eps=1e-5, rope_theta=500000.0, attention_bias=False,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    ours = dict(model_type="llada", d_model=t["hidden"], n_layers=t["layers"], n_heads=t["heads"],
                n_kv_heads=kv, mlp_hidden_size=t["inter"], vocab_size=t["vocab"],
                embedding_size=t["vocab"], max_sequence_length=t["max_pos"], rope_theta=500000.0,
                rms_norm_eps=1e-5, mask_token_id=t["vocab"] - 1, eos_token_id=t["vocab"] - 2,
                pad_token_id=t["vocab"] - 2,
                dllm_jax_token_ids={"eot_token_id": t["vocab"] - 3, "bos_token_id": t["vocab"] - 4})
  else:
    kv = kv_heads or 2
    cfg = Qwen2Config(vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["inter"],
                      num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                      num_key_value_heads=kv, max_position_embeddings=t["max_pos"],
                      rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    ours = dict(model_type="Dream", hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                num_attention_heads=t["heads"], num_key_value_heads=kv,
                intermediate_size=t["inter"], vocab_size=t["vocab"],
                max_position_embeddings=t["max_pos"], rope_theta=1000000.0, rms_norm_eps=1e-6,
                mask_token_id=t["vocab"] - 1, eos_token_id=t["vocab"] - 2,
                pad_token_id=t["vocab"] - 2,
                dllm_jax_token_ids={"eot_token_id": t["vocab"] - 3, "bos_token_id": t["vocab"] - 4})
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        p.normal_(0.0, 0.5)
      else:
        p.normal_(0.0, 0.5 / np.sqrt(p.shape[-1]) if p.dim() > 1 else 0.5)
      if "embed_tokens" in name:
        p.normal_(0.0, 1.0)
  return model.eval(), ours


def write_checkpoint(model, ours_cfg: dict, out_dir: str, family: str) -> str:
  """Save the torch weights as safetensors in the real naming plus our config.json."""
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  tensors = {}
  for name, p in model.state_dict().items():
    key = llada_name(name) if family == "llada" else name
    tensors[key] = p.detach().cpu().numpy().copy()
  save_file(tensors, os.path.join(out_dir, "model.safetensors"))
  with open(os.path.join(out_dir, "config.json"), "w") as fh:
    json.dump(ours_cfg, fh)
  return out_dir


def hf_forward(model, ids: np.ndarray):
  """(last hidden state, logits) from the torch model, bidirectional."""
  import torch

  with torch.no_grad():
    t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    hidden = model.model(input_ids=t, is_causal=False).last_hidden_state
    logits = model(input_ids=t, is_causal=False).logits
  return hidden.numpy(), logits.numpy()
