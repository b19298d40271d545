"""Refresh-phase attention: non-causal attention over right-padded rows, cuDNN flash on GPUs.

Every Refresh row attends to its own valid tokens (bidirectional, a key-padding mask) through
``jax.nn.dot_product_attention`` with the rows' lengths as int32 ``[B]`` query and key/value
sequence lengths:

- ``cudnn``: cuDNN's fused flash attention (no ``[B, H, N, N]`` score tensor is ever held).
  Needs a GPU, bf16/f16, a head dim that is a multiple of 8 and at most 128 (256 on Hopper).
  GQA is native: K/V keep their own head count.
- ``xla``: the same function's XLA path (materialises the scores; f32 softmax).
- ``xla_rows``: the XLA path, but when fewer than two thirds of the rows have a length, one row
  at a time over those only (a loop with a traced trip count), so padding rows of a bucket cost
  nothing (a loop row costs ~1.5x a batched one on a CPU, hence the threshold). What the engine's
  step uses off a GPU (not differentiable: training uses ``xla``).
- ``auto``: ``cudnn`` when ``jax.default_backend() == "gpu"`` and the shapes qualify, else
  ``xla``, so lowering on a CPU never asks for cuDNN.

Semantics of both: query row t of batch row b (t < lengths[b]) gets softmax(q.k / sqrt(D)) over
keys s < lengths[b]; rows t >= lengths[b] (padding, including every row of a length-0 batch row)
are zeros. :func:`dense_attention` is the plain reference (rows past the length attend to the
valid keys there; nothing reads them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import for_each_used

REFRESH_IMPLS = ("auto", "cudnn", "xla", "xla_rows")

# Finite "minus infinity" for masked scores ((-inf) - (-inf) would be NaN).
_MASK = -1e30


def _hopper() -> bool:
  kind = jax.devices()[0].device_kind.upper()
  return any(name in kind for name in ("H100", "H200", "H800", "GH200"))


def cudnn_supported(dtype, head_dim: int) -> bool:
  """Whether cuDNN flash attention takes these inputs on the default device."""
  if jax.default_backend() != "gpu":
    return False
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return False
  limit = 256 if _hopper() else 128
  return head_dim % 8 == 0 and head_dim <= limit


def resolve_refresh_impl(impl: str, dtype, head_dim: int, *, fallback: str = "xla") -> str:
  """'auto' -> 'cudnn' where supported, else ``fallback`` ('xla' or 'xla_rows'). Explicit
  choices pass through."""
  if impl not in REFRESH_IMPLS:
    raise ValueError(f"refresh attention impl: expected one of {REFRESH_IMPLS}, got {impl!r}")
  if impl == "auto":
    return "cudnn" if cudnn_supported(dtype, head_dim) else fallback
  return impl


def refresh_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                      impl: str = "auto") -> jax.Array:
  """q [B, T, Hq, D]; k, v [B, T, Hkv, D] (Hq a multiple of Hkv); lengths [B] -> [B, T, Hq, D]."""
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"refresh_attention: expected q [B, T, Hq, D], k and v [B, T, Hkv, D]; got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"refresh_attention: {q.shape[2]} query heads are not a multiple of "
                     f"{k.shape[2]} KV heads")
  impl = resolve_refresh_impl(impl, q.dtype, q.shape[-1])
  lengths = jnp.asarray(lengths, jnp.int32)
  batched = lambda: jax.nn.dot_product_attention(
      q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
      implementation="xla" if impl == "xla_rows" else impl)
  if impl == "xla_rows":
    mostly_used = 3 * jnp.sum(lengths > 0) >= 2 * q.shape[0]
    return jax.lax.cond(mostly_used, batched, lambda: _rows_in_use(q, k, v, lengths))
  return batched()


def _rows_in_use(q, k, v, lengths):
  """The XLA path for the rows with a length only, one at a time; the other rows are zeros."""
  def body(b, out):
    row = lambda x: jax.lax.dynamic_index_in_dim(x, b, keepdims=True)
    n = row(lengths)
    o = jax.nn.dot_product_attention(row(q), row(k), row(v), query_seq_lengths=n,
                                     key_value_seq_lengths=n, implementation="xla")
    return jax.lax.dynamic_update_index_in_dim(out, o[0], b, 0)

  return for_each_used(lengths > 0, body, jnp.zeros_like(q))


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array) -> jax.Array:
  """Reference: non-causal attention with a key-padding mask; GQA by grouping query heads.

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
