import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from dllm_jax.config import ModelConfig
from dllm_jax.model.checkpoint import restore_params, save_params
from dllm_jax.model.loader import (INDEX_FILE, CheckpointError, load_model, name_map,
                                   save_hf_checkpoint)
from dllm_jax.model.transformer import init_model

TINY = {
    "llada": dict(model_type="llada", d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
                  mlp_hidden_size=48, vocab_size=50, embedding_size=50, max_sequence_length=64,
                  rope_theta=5e5, rms_norm_eps=1e-5, mask_token_id=49, eos_token_id=48),
    "dream": dict(model_type="Dream", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, vocab_size=50,
                  max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6,
                  mask_token_id=49, eos_token_id=48),
}


def _leaves(model):
  return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _same(a, b):
  la, lb = _leaves(a), _leaves(b)
  return len(la) == len(lb) and all(
      x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(params=["llada", "dream"])
def model(request):
  return init_model(ModelConfig.from_dict(TINY[request.param]), seed=3)


def test_single_file_round_trip_is_exact(model, tmp_path):
  files = save_hf_checkpoint(model, str(tmp_path))
  assert os.path.basename(files[0]) == "model.safetensors"
  assert _same(load_model(str(tmp_path), param_dtype=jnp.float32), model)


def test_sharded_round_trip_is_exact(model, tmp_path):
  files = save_hf_checkpoint(model, str(tmp_path), max_shard_bytes=20_000)
  assert any(f.endswith(INDEX_FILE) for f in files) and len(files) > 3
  index = json.load(open(tmp_path / INDEX_FILE))
  assert set(index["weight_map"]) == set(name_map(model.cfg))
  assert _same(load_model(str(tmp_path), param_dtype=jnp.float32), model)


def test_real_names_are_written(model, tmp_path):
  save_hf_checkpoint(model, str(tmp_path))
  names = set(load_file(str(tmp_path / "model.safetensors")))
  if model.cfg.family == "llada":
    assert "model.transformer.blocks.1.ff_proj.weight" in names
    assert "model.transformer.ff_out.weight" in names
    assert load_file(str(tmp_path / "model.safetensors"))[
        "model.transformer.blocks.0.ff_out.weight"].shape == (32, 48)  # [out, in]
  else:
    assert "model.layers.1.self_attn.k_proj.bias" in names and "lm_head.weight" in names


def test_bf16_export_then_load(model, tmp_path):
  save_hf_checkpoint(model, str(tmp_path), dtype=jnp.bfloat16)
  m = load_model(str(tmp_path), param_dtype=jnp.bfloat16)
  assert _leaves(m)[0].dtype == jnp.bfloat16
  again = tmp_path / "again"
  save_hf_checkpoint(m, str(again))
  assert _same(load_model(str(again), param_dtype=jnp.bfloat16), m)


def test_orbax_round_trip_is_exact(model, tmp_path):
  save_params(model, str(tmp_path / "ckpt"))
  assert _same(restore_params(str(tmp_path / "ckpt")), model)
  with pytest.raises(FileExistsError):
    save_params(model, str(tmp_path / "ckpt"))


def _rewrite(tmp_path, mutate):
  p = str(tmp_path / "model.safetensors")
  t = load_file(p)
  mutate(t)
  save_file(t, p)


def test_missing_tensor_is_named(model, tmp_path):
  save_hf_checkpoint(model, str(tmp_path))
  name = sorted(name_map(model.cfg))[3]
  _rewrite(tmp_path, lambda t: t.pop(name))
  with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
    load_model(str(tmp_path))


def test_unexpected_tensor_is_named(model, tmp_path):
  save_hf_checkpoint(model, str(tmp_path))
  _rewrite(tmp_path, lambda t: t.__setitem__("model.extra.weight", np.zeros(3, np.float32)))
  with pytest.raises(CheckpointError, match="unexpected tensor 'model.extra.weight'"):
    load_model(str(tmp_path))


def test_misshaped_tensor_names_both_shapes(model, tmp_path):
  save_hf_checkpoint(model, str(tmp_path))
  name = [n for n in name_map(model.cfg) if "up_proj" in n][0]
  _rewrite(tmp_path, lambda t: t.__setitem__(name, np.zeros((47, 32), np.float32)))
  with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[47, 32\], expected \[48, 32\]"):
    load_model(str(tmp_path))


def test_corrupted_file_and_missing_dir(model, tmp_path):
  save_hf_checkpoint(model, str(tmp_path))
  (tmp_path / "model.safetensors").write_bytes(b"\x05\x00garbage")
  with pytest.raises(CheckpointError, match="not a readable safetensors file"):
    load_model(str(tmp_path))
  with pytest.raises(FileNotFoundError):
    load_model(str(tmp_path / "nowhere"))


def test_index_naming_a_missing_shard(model, tmp_path):
  save_hf_checkpoint(model, str(tmp_path), max_shard_bytes=20_000)
  os.remove(tmp_path / "model-00002-of-{:05d}.safetensors".format(
      len([f for f in os.listdir(tmp_path) if f.startswith("model-")])))
  with pytest.raises(CheckpointError, match="does not exist"):
    load_model(str(tmp_path))
