"""Building blocks shared by LLaDA and Dream: RMSNorm, Linear, rotate-half RoPE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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
