"""Refresh attention wrapper (dllm_jax/model/attention.py): the XLA path on CPU in f32.

Checked against two independent references: the plain-jnp ``dense_attention`` (today's
attention) and torch's ``scaled_dot_product_attention`` with a key-padding mask (float64).
Padded rows, length-0 rows and GQA are included. cuDNN is only compared with XLA on a GPU
(scripts/gpu-check.sh); here we check that "auto" never picks it off a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax.model.attention import (dense_attention, refresh_attention,
                                      resolve_refresh_impl)

ATOL = 2e-6  # f32 XLA vs f32 jnp / f64 torch on O(1) values


def _inputs(seed, b, t, hq, hkv, d, lengths):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, hq, d), np.float32)
  k = rng.standard_normal((b, t, hkv, d), np.float32)
  v = rng.standard_normal((b, t, hkv, d), np.float32)
  return q, k, v, np.asarray(lengths, np.int32)


def _torch_reference(q, k, v, lengths):
  torch = pytest.importorskip("torch")
  b, t, hq, d = q.shape
  g = hq // k.shape[2]
  tq = torch.tensor(q, dtype=torch.float64).transpose(1, 2)                    # [B, Hq, T, D]
  tk = torch.tensor(np.repeat(k, g, axis=2), dtype=torch.float64).transpose(1, 2)
  tv = torch.tensor(np.repeat(v, g, axis=2), dtype=torch.float64).transpose(1, 2)
  keys = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]               # [B, S]
  out = torch.zeros_like(tq)
  for i in range(b):  # torch gives NaN for a row with no valid key: skip length-0 rows
    if lengths[i] == 0:
      continue
    mask = keys[i][None, None, :].expand(hq, t, t)
    out[i] = torch.nn.functional.scaled_dot_product_attention(tq[i], tk[i], tv[i],
                                                              attn_mask=mask)
  return out.transpose(1, 2).numpy()


CASES = [
    # (b, t, hq, hkv, d, lengths): full, padded, length-0, GQA 4:1 and 7:1 (Dream's group)
    (2, 16, 4, 4, 32, [16, 16]),
    (3, 32, 4, 4, 16, [32, 5, 0]),
    (2, 24, 8, 2, 32, [24, 9]),
    (2, 16, 28, 4, 8, [11, 0]),
]


@pytest.mark.parametrize("b,t,hq,hkv,d,lengths", CASES)
def test_xla_path_matches_dense_attention_and_torch(b, t, hq, hkv, d, lengths):
  q, k, v, lens = _inputs(sum(lengths) + hq, b, t, hq, hkv, d, lengths)
  out = np.asarray(refresh_attention(q, k, v, lens, impl="xla"))
  auto = np.asarray(refresh_attention(q, k, v, lens))  # CPU: auto is the XLA path
  dense = np.asarray(dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                     jnp.asarray(lens)))
  ref = _torch_reference(q, k, v, lens)
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(auto, out)
  for i, n in enumerate(lens):
    np.testing.assert_allclose(out[i, :n], dense[i, :n], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out[i, :n], ref[i, :n], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(out[i, n:], 0.0)  # padding rows (all of a length-0 row)


@pytest.mark.parametrize("b,t,hq,hkv,d,lengths", CASES)
def test_rows_in_use_path_equals_the_batched_xla_path(b, t, hq, hkv, d, lengths):
  """impl="xla_rows" (the engine's CPU path: one row at a time, rows with a length only)."""
  q, k, v, lens = _inputs(sum(lengths) + 1, b, t, hq, hkv, d, lengths)
  rows = np.asarray(jax.jit(lambda *a: refresh_attention(*a, impl="xla_rows"))(q, k, v, lens))
  batched = np.asarray(refresh_attention(q, k, v, lens, impl="xla"))
  np.testing.assert_allclose(rows, batched, atol=ATOL, rtol=0)
  for i, n in enumerate(lens):
    np.testing.assert_array_equal(rows[i, n:], 0.0)


def test_auto_never_picks_cudnn_off_a_gpu():
  assert jax.default_backend() != "gpu"
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    assert resolve_refresh_impl("auto", dtype, 128) == "xla"
  assert resolve_refresh_impl("cudnn", jnp.bfloat16, 128) == "cudnn"  # explicit passes through


@pytest.mark.parametrize("bad", ["flash", "", "XLA"])
def test_unknown_impl_is_a_clear_error(bad):
  q, k, v, lens = _inputs(0, 1, 8, 2, 2, 8, [8])
  with pytest.raises(ValueError, match="refresh attention impl"):
    refresh_attention(q, k, v, lens, impl=bad)


def test_shape_errors_name_the_problem():
  q, k, v, lens = _inputs(0, 1, 8, 3, 2, 8, [8])
  with pytest.raises(ValueError, match="not a multiple"):
    refresh_attention(q, k, v, lens)
  with pytest.raises(ValueError, match="expected q"):
    refresh_attention(q[0], k, v, lens)
