"""Building blocks shared by LLaDA and Dream: RMSNorm, rotate-half RoPE, dense attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Finite "minus infinity" for masked attention scores ((-inf) - (-inf) would be NaN).
_MASK = -1e30


class RMSNorm(nnx.Module):
  """Normalise in float32, cast back to the input dtype, then scale (HF / LLaDA order)."""

  def __init__(self, dim: int, eps: float, *, dtype):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return xf.astype(x.dtype) * self.weight[...]


class Linear(nnx.Module):
  """y = x @ kernel (+ bias). ``kernel`` is [in, out] (the HF [out, in] weight transposed)."""

  def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
    std = d_in ** -0.5
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out), dtype) * std)
    self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x, self.kernel[...], preferred_element_type=jnp.float32).astype(x.dtype)
    if self.bias is not None:
      y = y + self.bias[...]
    return y


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate-half (NeoX / HF) RoPE over the full head dim, computed in float32.

  x: [..., T, H, D]; positions: [..., T] absolute positions.
  """
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, D/2]
  cos = jnp.cos(ang)[..., None, :]
  sin = jnp.sin(ang)[..., None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array) -> jax.Array:
  """Non-causal attention with a key-padding mask; GQA by grouping query heads.

  q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; kv_lengths: [B] valid keys per row.
  Returns [B, T, Hq, D]. Softmax in float32, scale 1/sqrt(D).
  """
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  qg = q.reshape(b, t, hkv, g, d)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  s = s * (d ** -0.5)
  valid = jnp.arange(k.shape[1])[None, :] < kv_lengths[:, None]  # [B, S]
  s = jnp.where(valid[:, None, None, None, :], s, _MASK)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return o.reshape(b, t, hq, d).astype(q.dtype)
