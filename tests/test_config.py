import json

import jax.numpy as jnp
import pytest

from dllm_jax.config import ModelConfig
from dllm_jax.model.transformer import abstract_model, count_params


@pytest.mark.parametrize("path,family,params", [
    ("configs/llada-8b.json", "llada", 8_015_581_184),
    ("configs/dream-7b.json", "dream", 7_615_616_512),
])
def test_presets_parse_with_exact_param_counts(path, family, params):
  cfg = ModelConfig.from_json(path)
  assert cfg.family == family
  assert cfg.num_params() == params
  # jax.eval_shape of the real module, not only the analytic formula.
  assert count_params(abstract_model(cfg, param_dtype=jnp.bfloat16)) == params


def test_preset_values():
  llada = ModelConfig.from_json("configs/llada-8b.json")
  assert (llada.hidden_size, llada.num_layers, llada.num_heads, llada.num_kv_heads) == (4096, 32, 32, 32)
  assert (llada.mask_token_id, llada.eos_token_id, llada.eot_token_id, llada.bos_token_id) == (
      126336, 126081, 126348, 126080)
  assert llada.rope_theta == 500000.0 and not llada.qkv_bias and not llada.shifted_prediction
  dream = ModelConfig.from_json("configs/dream-7b.json")
  assert (dream.num_heads, dream.num_kv_heads, dream.head_dim, dream.group_size) == (28, 4, 128, 7)
  assert (dream.mask_token_id, dream.eos_token_id, dream.eot_token_id) == (151666, 151643, 151645)
  assert dream.qkv_bias and dream.shifted_prediction and dream.rms_norm_eps == 1e-6


def test_hf_dict_round_trip():
  for p in ("configs/llada-8b.json", "configs/dream-7b.json"):
    cfg = ModelConfig.from_json(p)
    assert ModelConfig.from_dict(cfg.to_hf_dict(), name=cfg.name) == cfg


def _llada(**over):
  d = json.load(open("configs/llada-8b.json"))
  d.update(over)
  return d


@pytest.mark.parametrize("over,field", [
    (dict(d_model=None), "d_model"),
    (dict(n_heads=33), "num_heads"),
    (dict(n_kv_heads=5), "num_kv_heads"),
    (dict(n_layers=0), "num_layers"),
    (dict(n_layers="32"), "n_layers"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(mask_token_id=200000), "mask_token_id"),
    (dict(model_type="gpt2"), "model_type"),
    (dict(weight_tying=True), "weight_tying"),
    (dict(embedding_size=100), "embedding_size"),
])
def test_bad_configs_name_the_field(over, field):
  d = _llada(**over)
  d = {k: v for k, v in d.items() if v is not None}
  with pytest.raises(ValueError, match=field):
    ModelConfig.from_dict(d)


def test_missing_file_and_bad_json(tmp_path):
  with pytest.raises(FileNotFoundError):
    ModelConfig.from_json(tmp_path / "nope.json")
  p = tmp_path / "config.json"
  p.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    ModelConfig.from_json(tmp_path)
