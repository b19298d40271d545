"""Head-centric sparse paged attention for the Reuse phase (one layer, whole batch).

During Reuse the queries are the current block's tokens. Each one attends to the block's fresh K/V
plus the sparse K/V cached for its KV head at the block's Select step (the once-per-block Refresh
step that chose and stored each KV head's most important tokens).
Every (request, KV head) has its own cached token set and length (head-adaptive budgets), kept in a
paged pool.

Shapes (B requests, Hkv KV heads, G = Hq // Hkv query heads per KV head, D head dim):

  q           [B, Hkv, QB, D]  query rows of KV head h's GQA group, token-major: row t*G + g is
                               query head h*G + g at block token t. Rows past G*Lq are padding (any
                               values; their outputs are meaningless). Build q with `pack_queries`,
                               read results back with `unpack_outputs`.
  k_pages,    [P, S, D]        paged pool, one of three layouts (below): shared or head-major told
  v_pages  or [Hkv, P, S, D]   apart by rank, stacked by passing `layer`. A page holds S tokens of
           or [L, P, S, D]     ONE (request, KV head). Page 0 is a dummy page for unused table
                               entries and may hold garbage (even NaN).
  layer       int32 scalar     (stacked pool only) the layer plane to read, traced: the same code
                               runs inside lax.scan over layers.
  q_rows      [B] i32          (optional) q rows in use per request (e.g. n_tokens*G): the kernel
                               skips q tiles wholly past it (their outputs are zeros); rows past it
                               inside a used tile are computed and meaningless.
  page_table  [B, Hkv, MP] i32 pages of (b, h) in token order, ids in [0, P); unused entries = 0.
  kv_len      [B, Hkv] i32     valid cached tokens of (b, h), in [0, MP*S]: may be 0 and need not be
                               a multiple of S. Cached token t is in page page_table[b, h, t // S]
                               at offset t % S. Values outside the range are clamped.
  k_new,      [B, Hkv, Ln, D]  fresh K/V of the block (post-RoPE). Rows >= new_len[b] are padding
  v_new                        (may be garbage). Ln need not equal Lq: e.g. Dream's extra
                               query-only row has its K/V in the cache already, not in k_new.
  new_len     [B] i32          valid fresh rows per request, clamped to [0, Ln].
  -> out      [B, Hkv, QB, D]  dtype of q.

Pool layouts (same kernel body; only the BlockSpec differs):

  shared      [P, S, D]        one page space for all KV heads: page ids are global and (b, h)'s
                               table entries index it directly (token t at
                               k_pages[page_table[b, h, t // S], t % S]). Pages of different heads
                               interleave freely, so one free list serves every head and a request's
                               page reservation can be split unevenly among its heads (head-adaptive
                               budgets without per-head pools).
  stacked     [L, P, S, D]     the shared layout for every layer at once (the engine's pool):
                               page id p means the same slot range in every layer plane; pass the
                               whole buffer and `layer`. Never pass `pool[layer]`: a slice of a
                               buffer handed to a custom call is a copy of that whole plane
                               (measured on an H200), so every step would move the pool.
  head-major  [Hkv, P, S, D]   each KV head has its own page space: (b, h)'s ids index k_pages[h]
                               (token t at k_pages[h, page_table[b, h, t // S], t % S]). Needs a
                               free list per head and P pages in every head's space, so it suits
                               uniform or separately managed per-head budgets.

Page ids are traced, so nothing checks them: an id outside [0, P) silently reads some other page
under the reference or the interpreter, and out-of-bounds memory on a GPU.

Every query row of (b, h) attends, non-causally, to the valid cached tokens of (b, h) and the valid
fresh rows of b, with softmax(q.k * scale) in f32, scale = 1/sqrt(D) unless given. A row with no
valid key gets zeros. All float inputs must share one dtype (bf16 or f32).

Implementations (`impl`): "auto" -> the Pallas (Triton) kernel on a GPU, the jnp reference
elsewhere (the Mosaic GPU kernel is opt-in until a GPU run has measured it); "pallas"; "mosaic"
(kernel_mgpu.py, for Dream-like GQA: Hopper wgmma +
TMA page ring; block_k -> its block_kv, num_stages -> its K/V ring slots, block_q and num_warps
unused; defaults 128 and 3 where SMEM allows); "interpret" (the Pallas kernel under the CPU
interpreter, for tests); "reference"; "callback" (test-only: the kernel's exact operand list
handed to `jax.pure_callback`, an opaque call like the GPU custom call, computed by the reference
on the host; lets CPU tests see what XLA does around an opaque consumer of the pool).
The kernel needs QB, D and the tile sizes to be powers of two >= 16 (Triton); it pads Ln itself.
Static tuning knobs: block_k (cached tokens per step, must divide S; default min(S, 64)), block_q
(q rows per program, grid (B, Hkv, QB // block_q); default min(QB, 64)), num_warps, num_stages
(4 and 2, None meaning 2: the fastest on an H100 for MHA; 8 warps were 12-23 % slower).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import is_power_of_two, resolve_impl
from pallas_kernels.head_sparse_attention.kernel import (
    MIN_DOT,
    head_sparse_attention_kernel,
    padded_rows,
)
from pallas_kernels.head_sparse_attention.operands import SparseOperands
from pallas_kernels.head_sparse_attention.reference import head_sparse_attention_reference

DEFAULT_BLOCK_K = 64
DEFAULT_BLOCK_Q = 64


def query_rows(num_tokens: int, group: int) -> int:
  """QB for `num_tokens` block tokens, `group` query heads per KV head: pow2 >= max(16, G*Lq)."""
  return padded_rows(num_tokens * group)


def pack_queries(q: jax.Array, num_kv_heads: int, rows: int | None = None) -> jax.Array:
  """q [B, Lq, Hq, D] -> [B, Hkv, QB, D], row t*G + g = query head h*G + g at token t, zero
  padded. Token-major, so the first n*G rows hold the first n tokens (``q_rows`` = n*G lets the
  kernel skip the q tiles of padding tokens).

  QB = `rows` if given (must be >= G*Lq), else query_rows(Lq, G).
  """
  if q.ndim != 4:
    raise ValueError(f"pack_queries: q must be [B, Lq, Hq, D], got shape {q.shape}")
  batch, num_tokens, num_heads, head_dim = q.shape
  if num_kv_heads <= 0 or num_heads % num_kv_heads:
    raise ValueError(f"pack_queries: Hq={num_heads} (q {q.shape}) is not a multiple of "
                     f"num_kv_heads={num_kv_heads}")
  group = num_heads // num_kv_heads
  used = group * num_tokens
  rows = query_rows(num_tokens, group) if rows is None else rows
  if rows < used:
    raise ValueError(f"pack_queries: rows={rows} < G*Lq = {group}*{num_tokens} = {used}")
  q = q.reshape(batch, num_tokens, num_kv_heads, group, head_dim)
  q = q.transpose(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, used, head_dim)
  return jnp.pad(q, ((0, 0), (0, 0), (0, rows - used), (0, 0)))


def unpack_outputs(o: jax.Array, num_tokens: int, num_heads: int) -> jax.Array:
  """Inverse of pack_queries: o [B, Hkv, QB, D] -> [B, Lq, Hq, D] (padding rows dropped)."""
  if o.ndim != 4:
    raise ValueError(f"unpack_outputs: o must be [B, Hkv, QB, D], got shape {o.shape}")
  batch, num_kv_heads, rows, head_dim = o.shape
  if num_heads % num_kv_heads or (num_heads // num_kv_heads) * num_tokens > rows:
    raise ValueError(f"unpack_outputs: o {o.shape} cannot hold Lq={num_tokens} tokens of "
                     f"Hq={num_heads} heads")
  group = num_heads // num_kv_heads
  o = o[:, :, :group * num_tokens].reshape(batch, num_kv_heads, num_tokens, group, head_dim)
  return o.transpose(0, 2, 1, 3, 4).reshape(batch, num_tokens, num_heads, head_dim)


def _check_rank(name: str, x, rank: int, layout: str) -> None:
  if x.ndim != rank:
    raise ValueError(f"{name} must be {layout} (rank {rank}), got shape {x.shape}")


def _check_dim(name: str, x, axis: int, expected: int, what: str, ref: str) -> None:
  if x.shape[axis] != expected:
    raise ValueError(
        f"{name} {x.shape}: {what} = {x.shape[axis]} does not match {ref} ({expected})")


def _validate(q, k_pages, v_pages, page_table, kv_len, k_new, v_new, new_len, layer=None,
              q_rows=None) -> None:
  """Shape/dtype checks shared by every impl; raises ValueError naming the argument."""
  _check_rank("q", q, 4, "[B, Hkv, QB, D]")
  if layer is not None:
    if k_pages.ndim != 4:
      raise ValueError(f"k_pages must be [L, P, S, D] (stacked pool) when layer is given, got "
                       f"shape {k_pages.shape}")
    if jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
      raise ValueError(f"layer must be an integer scalar, got {layer!r}")
  elif k_pages.ndim not in (3, 4):
    raise ValueError(f"k_pages must be [P, S, D] (shared page space, rank 3) or [Hkv, P, S, D] "
                     f"(head-major, rank 4), got shape {k_pages.shape}")
  if q_rows is not None and (q_rows.shape != (q.shape[0],) or q_rows.dtype != jnp.int32):
    raise ValueError(f"q_rows must be int32 [B] = [{q.shape[0]}], got {q_rows.dtype} "
                     f"{q_rows.shape}")
  _check_rank("page_table", page_table, 3, "[B, Hkv, MP]")
  _check_rank("kv_len", kv_len, 2, "[B, Hkv]")
  _check_rank("k_new", k_new, 4, "[B, Hkv, Ln, D]")
  _check_rank("new_len", new_len, 1, "[B]")
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"v_pages {v_pages.shape} must have the shape of k_pages {k_pages.shape}")
  if v_new.shape != k_new.shape:
    raise ValueError(f"v_new {v_new.shape} must have the shape of k_new {k_new.shape}")

  batch, num_kv_heads, _, head_dim = q.shape
  ref = f"q {q.shape}"
  for name, x, axis in (("page_table", page_table, 0), ("kv_len", kv_len, 0),
                        ("k_new", k_new, 0), ("new_len", new_len, 0)):
    _check_dim(name, x, axis, batch, "batch", ref)
  head_checks = (("page_table", page_table, 1), ("kv_len", kv_len, 1), ("k_new", k_new, 1))
  if k_pages.ndim == 4 and layer is None:   # head-major; shared and stacked pools have no head axis
    head_checks = (("k_pages", k_pages, 0),) + head_checks
  for name, x, axis in head_checks:
    _check_dim(name, x, axis, num_kv_heads, "KV heads", ref)
  for name, x in (("k_pages", k_pages), ("k_new", k_new)):
    _check_dim(name, x, x.ndim - 1, head_dim, "head dim", ref)

  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q dtype must be floating, got {q.dtype}")
  for name, x in (("k_pages", k_pages), ("v_pages", v_pages), ("k_new", k_new), ("v_new", v_new)):
    if x.dtype != q.dtype:
      raise ValueError(f"{name} dtype {x.dtype} must equal q dtype {q.dtype}")
  for name, x in (("page_table", page_table), ("kv_len", kv_len), ("new_len", new_len)):
    if x.dtype != jnp.int32:
      raise ValueError(f"{name} dtype must be int32, got {x.dtype} (shape {x.shape})")


def _check_pow2(name: str, value: int, context: str) -> None:
  if not is_power_of_two(value) or value < MIN_DOT:
    raise ValueError(f"{name}={value} must be a power of two >= {MIN_DOT} for the Pallas kernel "
                     f"({context})")


def _kernel_tiles(q, k_pages, block_k, block_q) -> tuple[int, int]:
  """Resolve and check the kernel's tile sizes (Triton: power-of-two shapes, dots >= 16)."""
  q_rows, head_dim = q.shape[2], q.shape[3]
  page_size = k_pages.shape[-2]
  _check_pow2("q rows (QB)", q_rows, f"q {q.shape}; pad with pack_queries/query_rows")
  _check_pow2("head dim D", head_dim, f"q {q.shape}")
  block_k = min(page_size, DEFAULT_BLOCK_K) if block_k is None else block_k
  block_q = min(q_rows, DEFAULT_BLOCK_Q) if block_q is None else block_q
  _check_pow2("block_k", block_k, f"k_pages {k_pages.shape}")
  _check_pow2("block_q", block_q, f"q {q.shape}")
  if page_size % block_k:
    raise ValueError(f"block_k={block_k} must divide the page size S={page_size} "
                     f"(k_pages {k_pages.shape})")
  if q_rows % block_q:
    raise ValueError(f"block_q={block_q} must divide QB={q_rows} (q {q.shape})")
  return block_k, block_q


@functools.partial(
    jax.jit,
    static_argnames=("scale", "impl", "block_k", "block_q", "num_warps", "num_stages"))
def head_sparse_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    kv_len: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    new_len: jax.Array,
    layer: jax.Array | None = None,
    q_rows: jax.Array | None = None,
    *,
    scale: float | None = None,
    impl: str = "auto",
    block_k: int | None = None,
    block_q: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> jax.Array:
  """Reuse-phase attention over sparse paged + fresh K/V; see the module docstring.

  q [B, Hkv, QB, D]; k_pages, v_pages [P, S, D] (shared page space), [Hkv, P, S, D]
  (head-major) or [L, P, S, D] with ``layer`` (stacked); page_table [B, Hkv, MP] int32;
  kv_len [B, Hkv] int32; k_new, v_new [B, Hkv, Ln, D]; new_len [B] int32; q_rows [B] int32
  (optional) -> [B, Hkv, QB, D].
  """
  _validate(q, k_pages, v_pages, page_table, kv_len, k_new, v_new, new_len, layer, q_rows)
  impl = resolve_impl(impl)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  args = SparseOperands(q, k_pages, v_pages, page_table, kv_len, k_new, v_new, new_len)
  if layer is not None:
    layer = jnp.asarray(layer, jnp.int32)
  if impl == "reference":
    return head_sparse_attention_reference(*args, layer=layer, q_rows=q_rows, scale=scale)
  if impl == "callback":
    return _callback(*args, layer=layer, q_rows=q_rows, scale=scale)
  if impl == "mosaic":
    from pallas_kernels.head_sparse_attention import kernel_mgpu  # imports Mosaic GPU: on use
    return kernel_mgpu.head_sparse_attention_mosaic_kernel(
        *args, scale=scale, layer=layer, q_rows=q_rows, block_kv=block_k, num_stages=num_stages)
  block_k, block_q = _kernel_tiles(q, k_pages, block_k, block_q)
  return head_sparse_attention_kernel(
      *args, scale=scale, block_k=block_k, block_q=block_q, layer=layer, q_rows=q_rows,
      num_warps=num_warps, num_stages=2 if num_stages is None else num_stages,
      interpret=impl == "interpret")


def _callback(q, k_pages, v_pages, page_table, kv_len, k_new, v_new, new_len, *, layer, q_rows,
              scale):
  """The kernel's operand list through an opaque host call (test-only; see the module doc)."""
  operands = [q, k_pages, v_pages, page_table, kv_len, k_new, v_new, new_len]
  if layer is not None:
    operands.append(layer.reshape(1))
  if q_rows is not None:
    operands.append(q_rows)

  def host(*xs):
    q_, kp, vp, pt, kl, kn, vn, nl = xs[:8]
    lyr = xs[8][0] if layer is not None else None
    out = head_sparse_attention_reference(q_, kp, vp, pt, kl, kn, vn, nl, layer=lyr, scale=scale)
    return np.asarray(out)

  return jax.pure_callback(host, jax.ShapeDtypeStruct(q.shape, q.dtype), *operands)
