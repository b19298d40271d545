"""Our Flax model vs HF Llama (LLaDA) / Qwen2 (Dream) with is_causal=False, through our loader."""

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")

from hf_oracle import build, hf_forward, write_checkpoint

from dllm_jax.model.loader import load_model
from dllm_jax.model.transformer import lm_head_logits, shift_for_prediction

ATOL = 1e-4  # f32 model vs f32 torch eager


@pytest.fixture(scope="module", params=["llada", "dream"])
def pair(request, tmp_path_factory):
  family = request.param
  torch_model, cfg = build(family, seed=1)
  path = write_checkpoint(torch_model, cfg, str(tmp_path_factory.mktemp(family)), family)
  return family, torch_model, load_model(path, param_dtype=jnp.float32)


def _ours(model, ids, lengths=None):
  ids = jnp.asarray(ids, jnp.int32)
  b, n = ids.shape
  pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  lengths = jnp.full((b,), n, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  h = model.refresh(ids, pos, lengths)
  return np.asarray(h), np.asarray(lm_head_logits(model, h))


def test_hidden_and_logits_match_hf(pair):
  family, torch_model, model = pair
  ids = np.random.default_rng(0).integers(0, 96, size=(2, 17))
  h_ref, l_ref = hf_forward(torch_model, ids)
  h, l = _ours(model, ids)
  assert np.abs(h - h_ref).max() < ATOL
  assert np.abs(l - l_ref).max() < ATOL
  assert model.cfg.family == family


def test_is_bidirectional(pair):
  _, _, model = pair
  ids = np.random.default_rng(1).integers(0, 90, size=(1, 12))
  ids2 = ids.copy()
  ids2[0, -1] += 1
  h1, _ = _ours(model, ids)
  h2, _ = _ours(model, ids2)
  assert np.abs(h1[0, 0] - h2[0, 0]).max() > 1e-3  # position 0 sees the last token


def test_right_padded_batch_matches_rows_alone(pair):
  _, _, model = pair
  rng = np.random.default_rng(2)
  lens = [9, 16, 4]
  n = max(lens)
  ids = np.full((3, n), 95, np.int64)
  rows = [rng.integers(0, 90, size=k) for k in lens]
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  h, l = _ours(model, ids, lens)
  for i, r in enumerate(rows):
    h1, l1 = _ours(model, r[None])
    assert np.abs(h[i, :len(r)] - h1[0]).max() < 1e-5
    assert np.abs(l[i, :len(r)] - l1[0]).max() < 1e-5


def test_dream_shift_matches_official_logit_shift(pair):
  family, torch_model, model = pair
  if family != "dream":
    pytest.skip("the shift is Dream-only")
  ids = np.random.default_rng(3).integers(0, 90, size=(2, 10))
  _, l_ref = hf_forward(torch_model, ids)
  l_ref = np.concatenate([l_ref[:, :1], l_ref[:, :-1]], axis=1)  # Dream's official shift
  h, _ = _ours(model, ids)
  l = np.asarray(lm_head_logits(model, shift_for_prediction(jnp.asarray(h))))
  assert np.abs(l - l_ref).max() < ATOL
