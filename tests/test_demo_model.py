"""The bundled demo model: HF layout, loads through the real loader, and predicts masked held-out
tokens clearly better than a context-free baseline."""

import json
import os

import numpy as np
import pytest

DEMO_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir, "dllm_jax",
                                         "assets", "demo"))
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "model.safetensors")

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(DEMO_DIR, "model.safetensors")),
    reason="bundled demo model not built yet (dllm-jax train-demo --export)")


@pytest.fixture(scope="module")
def demo():
  from dllm_jax.model.loader import load_model
  from dllm_jax.tokenizer import load_tokenizer
  return load_model(DEMO_DIR), load_tokenizer(DEMO_DIR)


def test_bundle_files_and_size():
  total = sum(os.path.getsize(os.path.join(DEMO_DIR, f)) for f in FILES)
  assert total < 20 * 2**20
  from safetensors import safe_open
  import ml_dtypes  # noqa: F401  (numpy bfloat16 for safetensors)
  with safe_open(os.path.join(DEMO_DIR, "model.safetensors"), framework="np") as fh:
    names = list(fh.keys())
    assert "model.transformer.wte.weight" in names and "model.transformer.ff_out.weight" in names
    assert fh.get_tensor(names[0]).dtype == ml_dtypes.bfloat16
  with open(os.path.join(DEMO_DIR, "config.json")) as fh:
    cfg = json.load(fh)
  assert cfg["model_type"] == "llada" and cfg["n_kv_heads"] == cfg["n_heads"]
  assert cfg["dllm_jax_token_ids"] == {"eot_token_id": 4, "bos_token_id": 3}
  with open(os.path.join(DEMO_DIR, "generation_config.json")) as fh:
    gen = json.load(fh)
  assert {"gen_length", "steps", "block_length", "temperature"} <= set(gen)
  assert gen["gen_length"] % gen["block_length"] == 0


def test_config_matches_tokenizer(demo):
  model, tok = demo
  cfg = model.cfg
  assert cfg.family == "llada" and cfg.vocab_size == tok.vocab_size
  assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.eot_token_id,
          cfg.bos_token_id) == (tok.mask_token_id, tok.eos_token_id, tok.pad_token_id,
                                tok.eot_token_id, tok.bos_token_id)
  assert 1_000_000 < cfg.num_params() < 10_000_000


def test_heldout_masked_accuracy_beats_unigram(demo):
  from dllm_jax.train.corpus import load_corpus
  from dllm_jax.train.trainer import masked_accuracy, unigram_baseline_accuracy
  model, tok = demo
  heldout = load_corpus("heldout")
  # A fixed small sample: the first 24 windows of 128 tokens, half of each masked.
  kw = dict(seq_len=128, seed=0, num_windows=24)
  acc = masked_accuracy(model, heldout, 0.5, tokenizer=tok, batch=8, **kw)
  base = unigram_baseline_accuracy(load_corpus("train")[:600], heldout, tok, ratio=0.5, **kw)
  assert 0.02 < base < 0.2
  assert acc >= 2 * base, (acc, base)
