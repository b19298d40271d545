"""Masked-diffusion trainer on a tiny config: the loss goes down, a resumed run is bit-identical to
an uninterrupted one, a seed fixes the result; the data, evaluation and export helpers."""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dllm_jax.tokenizer import load_tokenizer
from dllm_jax.train import trainer as T
from dllm_jax.train.corpus import load_corpus
from dllm_jax.train.tokenizer_train import save_tokenizer, train_bpe

TC = T.TrainConfig(steps=8, batch=4, seq_len=32, lr=3e-3, ckpt_every=3, log_every=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  docs = load_corpus("heldout")[:60]
  d = str(tmp_path_factory.mktemp("tok"))
  save_tokenizer(train_bpe(docs, 512), d)
  tok = load_tokenizer(d)
  stream = T.token_stream(docs, tok, chat_fraction=0.5, seed=0)
  cfg = T.model_config_for_tokenizer("tiny", tok)
  return dict(docs=docs, tok=tok, tok_dir=d, stream=stream, cfg=cfg)


@pytest.fixture(scope="module")
def reference_run(setup, tmp_path_factory):
  """One uninterrupted run of TC, shared by the resume and determinism tests."""
  model, hist = T.train(setup["cfg"], TC, setup["stream"], str(tmp_path_factory.mktemp("ref")),
                        progress=False)
  return model, hist


def _loss(model, tokens, key, **kw):
  """The diffusion loss, jitted (eager op-by-op execution is slow)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda st: T.diffusion_loss(nnx.merge(graphdef, st), tokens, key, **kw))(state)


def _leaves(model):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_loss_decreases(setup, tmp_path):
  cfg, stream = setup["cfg"], setup["stream"]
  tc = T.TrainConfig(steps=40, batch=8, seq_len=32, lr=5e-3, ckpt_every=40, log_every=40)
  # A fixed batch and masking key, scored before and after training.
  batch = jnp.asarray(T.sample_windows(np.random.default_rng(123), stream, 16, 32))
  key = jax.random.PRNGKey(7)
  before = float(_loss(T.init_model(cfg, seed=tc.seed), batch, key)[0])
  model, hist = T.train(cfg, tc, stream, str(tmp_path), progress=False)
  after = float(_loss(model, batch, key)[0])
  assert np.log(cfg.vocab_size) * 0.5 < before  # near-uniform predictions at init
  assert after < 0.9 * before, (before, after)
  assert hist[-1]["step"] == 40 and np.isfinite(hist[-1]["loss"])


def test_resume_is_bit_identical(setup, reference_run, tmp_path):
  ref_model, ref_hist = reference_run
  out = str(tmp_path)
  _, first = T.train(setup["cfg"], TC, setup["stream"], out, stop_after=5, progress=False)
  assert [h["step"] for h in first] == [1, 2, 3, 4, 5]
  model, rest = T.train(setup["cfg"], TC, setup["stream"], out, resume=True, progress=False)
  assert [h["step"] for h in rest] == [6, 7, 8]  # continues at the step it stopped at
  for a, b in zip(_leaves(ref_model), _leaves(model)):
    np.testing.assert_array_equal(a, b)
  assert [h["loss"] for h in first + rest] == [h["loss"] for h in ref_hist]


def test_fresh_run_refuses_a_used_directory_and_resume_checks_settings(setup, reference_run,
                                                                        tmp_path):
  out = str(tmp_path)
  T.train(setup["cfg"], TC, setup["stream"], out, stop_after=3, progress=False)
  with pytest.raises(FileExistsError, match="--resume"):
    T.train(setup["cfg"], TC, setup["stream"], out, progress=False)
  other = T.TrainConfig(**{**TC.__dict__, "lr": 1e-3})
  with pytest.raises(ValueError, match="train_config.lr"):
    T.train(setup["cfg"], other, setup["stream"], out, resume=True, progress=False)


def test_same_seed_same_params_other_seed_differs(setup, reference_run, tmp_path):
  ref_model, _ = reference_run
  again, _ = T.train(setup["cfg"], TC, setup["stream"], str(tmp_path / "a"), progress=False)
  for a, b in zip(_leaves(ref_model), _leaves(again)):
    np.testing.assert_array_equal(a, b)
  tc2 = T.TrainConfig(**{**TC.__dict__, "seed": 1, "steps": 2})
  other, _ = T.train(setup["cfg"], tc2, setup["stream"], str(tmp_path / "b"), progress=False)
  assert not np.array_equal(_leaves(ref_model)[0], _leaves(other)[0])


def test_windows_are_seeded_slices_of_the_stream():
  stream = np.arange(1000, dtype=np.int32)
  a = T.sample_windows(np.random.default_rng(0), stream, 4, 16)
  b = T.sample_windows(np.random.default_rng(0), stream, 4, 16)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (4, 16) and a.dtype == np.int32
  np.testing.assert_array_equal(np.diff(a, axis=1), 1)  # contiguous windows
  with pytest.raises(ValueError, match="shorter"):
    T.sample_windows(np.random.default_rng(0), stream[:10], 1, 16)


def test_token_stream_chat_format(setup):
  tok, docs = setup["tok"], setup["docs"]
  plain = T.token_stream(docs, tok, chat_fraction=0.0)
  assert int(np.sum(plain == tok.eos_token_id)) == len(docs)
  assert not np.any(np.isin(plain, [tok.bos_token_id, tok.eot_token_id, tok.mask_token_id]))
  chat = T.token_stream(docs[:10], tok, chat_fraction=1.0)
  text = tok.decode(chat, skip_special_tokens=False)
  first = docs[0].partition("\n")[0].strip()
  assert text.startswith(f"<|bos|><|user|>\n{first}<|eot|><|assistant|>\n")
  assert text.count("<|bos|>") == text.count("<|eos|>") == 10
  assert text.count("<|eot|>") == 20 and "<|mask|>" not in text


def test_diffusion_loss_weighting():
  """With every token masked (p -> 1) the loss is the mean cross-entropy / p."""
  from dllm_jax.config import ModelConfig
  cfg = ModelConfig(family="llada", hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                    intermediate_size=32, vocab_size=40, max_position=64, rope_theta=1e4,
                    rms_norm_eps=1e-5, mask_token_id=39, eos_token_id=1, pad_token_id=0)
  model = T.init_model(cfg, seed=0)
  tokens = jnp.arange(2 * 8, dtype=jnp.int32).reshape(2, 8) % 30
  loss, m = _loss(model, tokens, jax.random.PRNGKey(0), eps=0.999999)
  # p = 1 - 1e-6 * (1 - t) ~ 1: all masked, loss == mean masked CE.
  np.testing.assert_allclose(float(loss), float(m["masked_ce"]), rtol=1e-5)


def test_eval_masks_an_exact_fraction(setup):
  tok, docs = setup["tok"], setup["docs"]
  masks = {}
  for ratio in (0.15, 0.5, 0.9):
    w, masks[ratio] = T.eval_windows(docs, seq_len=32, ratio=ratio, seed=0, tokenizer=tok,
                                     num_windows=10)
    assert w.shape == masks[ratio].shape == (10, 32)
    assert np.all(masks[ratio].sum(1) == round(ratio * 32))
  again = T.eval_windows(docs, seq_len=32, ratio=0.5, seed=0, tokenizer=tok, num_windows=10)[1]
  np.testing.assert_array_equal(again, masks[0.5])  # seeded
  other = T.eval_windows(docs, seq_len=32, ratio=0.5, seed=1, tokenizer=tok, num_windows=10)[1]
  assert not np.array_equal(other, masks[0.5])


def test_masked_accuracy_and_unigram_baseline(setup, reference_run):
  model, _ = reference_run
  tok, docs = setup["tok"], setup["docs"]
  acc = T.masked_accuracy(model, docs, 0.5, 32, seed=0, tokenizer=tok, num_windows=20, batch=8)
  assert 0.0 <= acc <= 1.0
  base = T.unigram_baseline_accuracy(docs, docs, tok, ratio=0.5, seq_len=32, seed=0,
                                     num_windows=20)
  top = T.most_frequent_token(docs, tok)
  w, mask = T.eval_windows(docs, seq_len=32, ratio=0.5, seed=0, tokenizer=tok, num_windows=20)
  assert base == pytest.approx(np.mean(w[mask] == top))  # always predicting the top token
  assert 0.0 < base < 0.5


def test_export_bundle_loads(setup, reference_run, tmp_path):
  from dllm_jax.config import ModelConfig
  from dllm_jax.model.loader import load_model
  model, _ = reference_run
  files = T.export_bundle(model, setup["tok_dir"], str(tmp_path))
  names = sorted(os.path.basename(f) for f in files)
  assert names == ["config.json", "generation_config.json", "model.safetensors",
                   "tokenizer.json", "tokenizer_config.json"]
  cfg = ModelConfig.from_json(str(tmp_path))
  assert cfg.to_hf_dict() == model.cfg.to_hf_dict() and cfg.family == "llada"
  assert (cfg.mask_token_id, cfg.eos_token_id, cfg.eot_token_id, cfg.bos_token_id) == (2, 1, 4, 3)
  gen = json.loads((tmp_path / "generation_config.json").read_text())
  assert gen["gen_length"] == 64 and gen["block_length"] == 32 and gen["mask_token_id"] == 2
  loaded = load_model(str(tmp_path), param_dtype=jnp.float32)
  for a, b in zip(_leaves(model), _leaves(loaded)):  # bf16 on disk
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)
  assert load_tokenizer(str(tmp_path)).mask_token_id == cfg.mask_token_id


def test_cli_args_and_errors(tmp_path, capsys):
  p = T.add_train_args(argparse.ArgumentParser())
  a = p.parse_args(["--out", str(tmp_path), "--steps", "5", "--config-size", "tiny", "--resume"])
  assert a.steps == 5 and a.batch == 16 and a.seq_len == 128 and a.resume and a.export is None
  bad = p.parse_args(["--out", str(tmp_path), "--steps", "0"])
  assert T.run_train(bad) == 2
  assert "steps" in capsys.readouterr().err
  with pytest.raises(ValueError, match="config size"):
    T.model_config("huge", vocab_size=10, mask_token_id=2, eos_token_id=1, pad_token_id=0)
