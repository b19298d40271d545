"""Mosaic GPU (Hopper) head-sparse paged attention: the Reuse-phase kernel for GQA-heavy models.

Same contract as kernel.py's Triton kernel (ops.py documents shapes and semantics), written for
Hopper tensor cores: wgmma with an f32 accumulator, TMA page loads into swizzled SMEM, a
multi-buffered K/V ring fed by a producer warpgroup. Why: Dream's GQA (28:4, 7 query heads per KV
head, 256 q rows per (request, KV head)) is compute-bound under Triton (~220 TFLOP/s
measured on an H100); a Mosaic GPU prototype of the same loop ran 1.6x faster there.

Work items are (64·W q rows, KV head h, request b); a persistent grid of one CTA per SM loops
over them (items c, c + #CTAs, ...; the two q tiles of one (b, h) run side by side and share its
K/V in L2). Each CTA has

  * W compute warpgroups (W = 2 when QB > 64, else 1), 64 q rows each (wgmma M = 64);
  * one memory warpgroup streaming the K/V blocks through a ring of `num_stages` SMEM slots:
    per item the block's fresh K/V (64-row steps), then the cached tokens in `block_kv` steps,
    each TMA-loaded by page id (a sub-block of one page, or whole pages when block_kv > S)
    straight from the pool (the stacked [L, P, S, D] pool is indexed by the traced layer, never
    sliced); the ring runs on across items, so the next item's loads overlap this one's tail;
  * the compute warpgroups run an f32 online softmax (exp2, FlashAttention-3 style ping-pong
    between the two warpgroups via a schedule barrier) and write their 64 rows through SMEM.

Ragged lengths cost nothing on full steps: only the fresh steps and the last, partial cached step
are masked, in loops of their own. Masked keys get p = 0 (not a large negative score, whose
exp2 under FMA contraction is not exact), and their V rows (past new_len / kv_len, or stale
SMEM) are zeroed in SMEM (0 * NaN is NaN in wgmma). For Dream the wrapper copies nothing.
Pages past kv_len (page 0 included) are never loaded. A row with no valid key has l == 0 -> 0.

Differences from the Triton kernel: bf16/f16 only (wgmma would run f32 as tf32); D a multiple of
64 up to 256; S and block_kv multiples of 64; the q_rows skip works per item of 64 * W rows.
Lowering semantics are jax's default (Lane on 0.10, Warpgroup on 0.11); the code sticks to the
primitives jax's own attention_mgpu.py uses, which run under both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # needs jaxlib's Mosaic GPU bindings (and absl-py on jax 0.10)
  from jax.experimental.pallas import mosaic_gpu as plgpu
  _IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001 - any import failure means "use Triton"
  plgpu = None
  _IMPORT_ERROR = f"{type(e).__name__}: {e}"

ROWS = 64                    # q rows per compute warpgroup (wgmma M)
FRESH_ROWS = 64              # fresh K/V rows per pipeline step (wgmma K >= 64)
SMEM_BYTES = 227 * 1024      # Hopper's per-block shared memory limit
SMEM_RESERVE = 3 * 1024      # barriers + Mosaic's 2 KiB reduction scratch
MASKED = -1e30               # raw score of a masked key (only used for the row max)
_API = ("kernel", "wgmma", "copy_gmem_to_smem", "copy_smem_to_gmem", "wait_smem_to_gmem",
        "barrier_wait", "barrier_arrive", "Barrier", "SMEM", "ACC", "Layout", "layout_cast",
        "broadcasted_iota", "transpose_ref", "commit_smem", "set_max_registers",
        "TilingTransform", "SwizzleTransform", "CompilerParams")


def mosaic_unsupported_reason() -> str | None:
  """None if this jax and its default device can run the kernel, else why not (-> use Triton)."""
  if plgpu is None:
    return f"jax.experimental.pallas.mosaic_gpu cannot be imported ({_IMPORT_ERROR})"
  missing = [name for name in _API if not hasattr(plgpu, name)]
  if missing:
    return f"jax {jax.__version__}: plgpu lacks {', '.join(missing)}"
  if jax.default_backend() != "gpu":
    return f"default backend is {jax.default_backend()!r}, not a CUDA GPU"
  device = jax.devices()[0]
  platform_version = str(getattr(device.client, "platform_version", "")).lower()
  if "rocm" in platform_version:
    return "Mosaic GPU does not support ROCm"
  capability = str(getattr(device, "compute_capability", ""))
  if capability.split(".")[0] != "9":
    return (f"{device.device_kind} has compute capability {capability or '?'}: the kernel "
            f"uses Hopper wgmma (sm_90a)")
  return None


def mosaic_supported() -> bool:
  """Whether the current jax/device can run the Mosaic GPU kernel (Hopper, CUDA, plgpu API)."""
  return mosaic_unsupported_reason() is None


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
  """Static tiling of one call, checked by `mosaic_tiles`."""
  block_kv: int       # cached tokens per step (multiple of 64, <= 256; divides S or k * S)
  num_stages: int     # K/V SMEM ring slots
  compute_wgs: int    # compute warpgroups per CTA (64 q rows each)
  q_rows: int         # QB padded to a multiple of 64 * compute_wgs
  fresh_copy: int     # fresh rows per TMA: Ln if Ln <= 64 is a multiple of 8 (no pad), else 64
  fresh_rows: int     # rows of the fresh arrays the kernel reads (Ln, or Ln padded to 64k)
  smem_bytes: int


def mosaic_tiles(q_shape, pool_shape, fresh_shape, dtype, *, block_kv: int | None = None,
                 num_stages: int | None = None) -> MosaicTiles:
  """Resolve and check the tiling; raises ValueError for what the kernel cannot run."""
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"the Mosaic GPU kernel takes bf16 or f16 (wgmma would run {dtype} as "
                     f"tf32); got {dtype}: use impl='pallas' or 'reference'")
  num_q_rows, head_dim = q_shape[-2:]
  page_size = pool_shape[-2]
  if head_dim % 64 or not 64 <= head_dim <= 256:
    raise ValueError(f"head dim D={head_dim} (q {tuple(q_shape)}) must be a multiple of 64 in "
                     f"[64, 256] for the Mosaic GPU kernel (128-byte swizzle, wgmma N <= 256)")
  if page_size % 64:
    raise ValueError(f"page size S={page_size} (pool {tuple(pool_shape)}) must be a multiple "
                     f"of 64 for the Mosaic GPU kernel")
  if num_q_rows < 1:
    raise ValueError(f"q {tuple(q_shape)} has no query rows")
  compute_wgs = 2 if num_q_rows > ROWS else 1
  smem = lambda bk, stages: (compute_wgs * ROWS + 2 * stages * bk) * head_dim * dtype.itemsize
  fits = lambda bk, stages: smem(bk, stages) <= SMEM_BYTES - SMEM_RESERVE
  if block_kv is None:                                   # 128-token steps unless SMEM forbids
    block_kv = 128 if (page_size % 128 == 0 or 128 % page_size == 0) and fits(128, 2) else 64
  if block_kv % 64 or not 64 <= block_kv <= 256 or (page_size % block_kv and block_kv % page_size):
    raise ValueError(f"block_kv={block_kv} must be a multiple of 64 in [64, 256] that divides, or "
                     f"is a multiple of, the page size S={page_size}")
  if num_stages is None:                                 # 3 hides TMA + page-id latency best
    num_stages = 3 if fits(block_kv, 3) else 2
  if num_stages < 2:
    raise ValueError(f"num_stages={num_stages} must be >= 2 (double-buffered K/V)")
  if not fits(block_kv, num_stages):
    raise ValueError(f"block_kv={block_kv} x num_stages={num_stages} (D={head_dim}) needs "
                     f"{smem(block_kv, num_stages)} bytes of SMEM (> "
                     f"{SMEM_BYTES - SMEM_RESERVE}); lower block_kv or num_stages")
  num_fresh = fresh_shape[-2]
  fresh_copy = num_fresh if 0 < num_fresh <= FRESH_ROWS and num_fresh % 8 == 0 else FRESH_ROWS
  return MosaicTiles(block_kv=block_kv, num_stages=num_stages, compute_wgs=compute_wgs,
                     q_rows=_round_up(num_q_rows, compute_wgs * ROWS),
                     fresh_copy=fresh_copy, fresh_rows=_round_up(num_fresh, fresh_copy),
                     smem_bytes=smem(block_kv, num_stages))


def _cdiv(a, b: int):
  return lax.div(a + (b - 1), b)       # a >= 0 here


class _Hopper:
  """The tensor-core pieces: wgmma from SMEM (K transposed in place) and registers (P)."""

  @staticmethod
  def qk(q_ref, k_ref, *, then):
    def body(acc_ref):
      plgpu.wgmma(acc_ref, q_ref, plgpu.transpose_ref(k_ref, (1, 0)))
      then()                                           # overlaps the async wgmma
      return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC((q_ref.shape[0], k_ref.shape[0]), jnp.float32))

  @staticmethod
  def pv(acc, p, v_ref, *, then):
    def body(acc_ref):
      plgpu.wgmma(acc_ref, p, v_ref)
      then()
    return pl.run_state(body)(plgpu.ACC.init(acc))

  @staticmethod
  def iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

  tile = staticmethod(lambda x: plgpu.layout_cast(x, plgpu.Layout.WGMMA))
  rows = staticmethod(lambda x: plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1)))


class _Interpreted:
  """The same pieces in plain jnp, for jax's CPU Mosaic GPU interpreter (tests only): it lacks
  run_state, layout casts, register/transposed wgmma operands. The rest of the kernel (TMA ring,
  barriers, page addressing, masking) is unchanged."""

  @staticmethod
  def qk(q_ref, k_ref, *, then):
    s = jnp.dot(q_ref[...], k_ref[...].T, preferred_element_type=jnp.float32)
    then()
    return s

  @staticmethod
  def pv(acc, p, v_ref, *, then):
    acc = acc + jnp.dot(p, v_ref[...], preferred_element_type=jnp.float32)
    then()
    return acc

  iota = staticmethod(lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim))
  tile = rows = staticmethod(lambda x: x)


class _Item(NamedTuple):
  """One work item: q tile qt of (request b, KV head h) and its step counts."""
  qt: jax.Array
  h: jax.Array
  b: jax.Array
  n_new: jax.Array           # valid fresh rows
  n_cached: jax.Array        # valid cached tokens
  n_fresh: jax.Array         # fresh steps (64 rows each)
  n_full: jax.Array          # unmasked cached steps
  n_steps: jax.Array         # all steps (fresh, full, then at most one partial)


def _kernel(q_ref, k_ref, v_ref, pt_ref, kv_len_ref, kn_ref, vn_ref, new_len_ref, layer_ref,
            q_rows_ref, o_ref, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, k_free, v_free,
            sched_bar, vmask_bar, *, tiles: MosaicTiles, scale: float, pool_index: str,
            num_fresh: int, num_ctas: int, interpret: bool):
  """Refs: q [B, Hkv, QB', D]; pools (see pool_index: 'stacked' [L, P, S, D], 'shared' [P, S, D],
  'head' [Hkv, P, S, D]); page table [B, Hkv, MP]; kv_len [B, Hkv]; fresh k/v [B, Hkv, F, D];
  new_len [B]; layer [1]; q_rows [B]; out like q. CTA c runs items c, c + num_ctas, ...; the
  step counter t runs on across items, so the K/V ring (slots, barrier phases) never drains."""
  wgs, stages, bk = tiles.compute_wgs, tiles.num_stages, tiles.block_kv
  page_size, head_dim = k_ref.shape[-2:]
  max_pages = pt_ref.shape[-1]
  piece = min(bk, page_size)                             # rows per TMA: a block within a page,
  pieces = bk // piece                                   # or whole pages when block_kv > S
  dtype = q_ref.dtype
  q_tiles, heads = q_ref.shape[2] // (wgs * ROWS), q_ref.shape[1]
  num_items = q_tiles * heads * q_ref.shape[0]
  cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
  my_items = _cdiv(num_items - cta, num_ctas)            # the grid never exceeds num_items
  mma = _Interpreted() if interpret else _Hopper()

  def item(j) -> _Item:                                  # q tiles of one (b, h) are neighbours
    i = cta + j * num_ctas
    qt, hb = lax.rem(i, q_tiles), lax.div(i, q_tiles)
    h, b = lax.rem(hb, heads), lax.div(hb, heads)
    used = qt * (wgs * ROWS) < q_rows_ref[b]             # else: streams nothing, writes zeros
    n_new = lax.min(lax.max(new_len_ref[b], 0), num_fresh)
    n_cached = lax.min(lax.max(kv_len_ref[b, h], 0), max_pages * page_size)
    n_fresh = jnp.where(used, _cdiv(n_new, FRESH_ROWS), 0)
    n_full = jnp.where(used, lax.div(n_cached, bk), 0)
    n_steps = n_fresh + jnp.where(used, _cdiv(n_cached, bk), 0)
    return _Item(qt, h, b, n_new, n_cached, n_fresh, n_full, n_steps)

  def block(smem, slot, rows):
    return smem.at[slot] if rows == bk else smem.at[slot, pl.ds(0, rows)]

  @pl.when(wg == wgs)
  def _memory_warpgroup():
    plgpu.set_max_registers(40, action="decrease")
    layer = layer_ref[0]

    def page_ids(it, s):                                 # clamped: fresh steps read page 0
      first = (s - it.n_fresh) * bk
      pages = [lax.div(lax.max(first + j * piece, 0), page_size) for j in range(pieces)]
      return [pt_ref[it.b, it.h, lax.min(page, max_pages - 1)] for page in pages]

    def issue(it, s, slot, pids, pool, fresh, smem, bar):
      """TMA step s of `it` into ring slot `slot`: one copy per page piece, `pieces` arrivals."""
      @pl.when(s < it.n_fresh)
      def _fresh():
        fc = tiles.fresh_copy                             # < 64: rows fc.. of the step are
        f = lax.min(s, fresh.shape[2] // fc - 1)          # stale (masked, V zeroed)
        src = fresh.at[it.b, it.h, pl.ds(f * fc, fc)]
        plgpu.copy_gmem_to_smem(src, block(smem, slot, fc), bar.at[slot])
        for _ in range(pieces - 1):
          plgpu.barrier_arrive(bar.at[slot])

      @pl.when(s >= it.n_fresh)
      def _cached():
        for j, pid in enumerate(pids):                    # pieces of one page each
          token = (s - it.n_fresh) * bk + j * piece
          rows = pl.ds(token - lax.div(token, page_size) * page_size, piece)
          src = {"stacked": lambda: pool.at[layer, pid, rows],
                 "shared": lambda: pool.at[pid, rows], "head": lambda: pool.at[it.h, pid, rows]}
          dst = smem.at[slot] if pieces == 1 else smem.at[slot, pl.ds(j * piece, piece)]
          if j == 0:                                      # step s < n_steps: token 0 is valid
            plgpu.copy_gmem_to_smem(src[pool_index](), dst, bar.at[slot])
          else:                                           # pieces past kv_len: arrive only
            lax.cond(token < it.n_cached,
                     lambda: plgpu.copy_gmem_to_smem(src[pool_index](), dst, bar.at[slot]),
                     lambda: plgpu.barrier_arrive(bar.at[slot]))

    def stream(j, t0):
      it = item(j)

      @pl.loop(0, it.n_steps)
      def _step(s):
        t, slot = t0 + s, lax.rem(t0 + s, stages)
        pids = page_ids(it, s)                           # loads overlap the slot waits
        for pool, fresh, smem, bar, free in ((k_ref, kn_ref, k_smem, k_bar, k_free),
                                             (v_ref, vn_ref, v_smem, v_bar, v_free)):
          pl.when(t >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))  # step t - stages
          issue(it, s, slot, pids, pool, fresh, smem, bar)
      return t0 + it.n_steps

    total = lax.fori_loop(0, my_items, stream, jnp.int32(0))

    @pl.loop(lax.max(total - stages, 0), total)
    def _drain(t):                                       # observe every phase (cleanliness; the
      plgpu.barrier_wait(k_free.at[lax.rem(t, stages)])  # interpreter checks it), costs nothing
      plgpu.barrier_wait(v_free.at[lax.rem(t, stages)])

  @pl.when(wg < wgs)
  def _compute_warpgroup():
    # jax's pipeline emitter split: 40 for the producer, the rest (<= 256, /8) to compute
    plgpu.set_max_registers(min(256, (512 - 40) // wgs // 8 * 8), action="increase")
    q_tile = q_smem.at[wg]
    c = scale * math.log2(math.e)                       # softmax in base 2

    def schedule():                                     # ping-pong the two warpgroups
      if wgs > 1:
        plgpu.barrier_arrive(sched_bar)
        plgpu.barrier_wait(sched_bar)

    def zero_v_rows(slot, limit, key0, chunks):
      """Zero V rows >= limit of a masked step in SMEM. Warpgroup 0 writes, the other waits:
      a two-way sync here would deadlock against the ping-pong, where warpgroup 1 runs ahead and
      waits for warpgroup 0's next QK; warpgroup 0 reaches this point before that QK."""
      @pl.when(wg == 0)
      def _zero():
        for chunk in range(chunks):                       # 64-row windows (WGMMA layout)
          ref = v_smem.at[slot, pl.ds(chunk * 64, 64)]
          x = ref[...]
          row = mma.iota(x.shape, 0) + (key0 + chunk * 64)
          ref[...] = jnp.where(row < limit, x, jnp.zeros_like(x))
        plgpu.commit_smem()                             # generic-proxy writes -> wgmma
        if wgs > 1:
          plgpu.barrier_arrive(vmask_bar)

      if wgs > 1:
        pl.when(wg != 0)(lambda: plgpu.barrier_wait(vmask_bar))

    def step(s, carry, *, it, t0, rows, mask=None, zero_v=False):
      """Step s of item `it` (global step t0 + s); mask (limit, first key) masks keys >= limit."""
      acc, m, l = carry
      slot = lax.rem(t0 + s, stages)
      if zero_v:                                         # V before anything else (see schedule)
        plgpu.barrier_wait(v_bar.at[slot])
        zero_v_rows(slot, *mask, chunks=rows // 64)

      s_ = mma.qk(q_tile, block(k_smem, slot, rows), then=schedule)
      plgpu.barrier_arrive(k_free.at[slot])
      if mask is not None:
        limit, key0 = mask
        valid = mma.iota(s_.shape, 1) + key0 < limit
        s_ = jnp.where(valid, s_, MASKED)
      m_new = jnp.maximum(m, s_.max(axis=1) * c)
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s_ * c - lax.broadcast_in_dim(m_new, s_.shape, [0]))
      if mask is not None:
        p = jnp.where(valid, p, 0.0)                     # exact zeros for masked keys
      acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
      l = l * alpha + p.sum(axis=1)
      p16 = p.astype(dtype)
      acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
      if wgs > 1:
        plgpu.barrier_arrive(sched_bar)
      if not zero_v:
        plgpu.barrier_wait(v_bar.at[slot])
      if wgs > 1:
        plgpu.barrier_wait(sched_bar)

      def wait_next_k():                                 # runs under the PV wgmma
        @pl.when(s + 1 < it.n_steps)
        def _():
          plgpu.barrier_wait(k_bar.at[lax.rem(t0 + s + 1, stages)])

      acc = mma.pv(acc, p16, block(v_smem, slot, rows), then=wait_next_k)
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l

    def attend(j, t0):
      it = item(j)
      q_base = it.qt * (wgs * ROWS) + wg * ROWS
      plgpu.copy_gmem_to_smem(q_ref.at[it.b, it.h, pl.ds(q_base, ROWS)], q_tile, q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      fresh_step = lambda s, carry: step(s, carry, it=it, t0=t0, rows=FRESH_ROWS,
                                         mask=(it.n_new, s * FRESH_ROWS), zero_v=True)
      full_step = lambda s, carry: step(s, carry, it=it, t0=t0, rows=bk)
      partial_step = lambda s, carry: step(s, carry, it=it, t0=t0, rows=bk, zero_v=True,
                                           mask=(it.n_cached, (s - it.n_fresh) * bk))
      carry = (mma.tile(jnp.zeros((ROWS, head_dim), jnp.float32)),
               mma.rows(jnp.full((ROWS,), -jnp.inf, jnp.float32)),
               mma.rows(jnp.zeros((ROWS,), jnp.float32)))

      @pl.when(it.n_steps > 0)
      def _():
        plgpu.barrier_wait(k_bar.at[lax.rem(t0, stages)])

      if wgs > 1:
        pl.when(wg == 1)(schedule)
      carry = lax.fori_loop(0, it.n_fresh, fresh_step, carry)
      carry = lax.fori_loop(it.n_fresh, it.n_fresh + it.n_full, full_step, carry)
      carry = lax.fori_loop(it.n_fresh + it.n_full, it.n_steps, partial_step, carry)
      if wgs > 1:
        pl.when(wg == 0)(schedule)

      acc, _, l = carry
      inv = jnp.where(l > 0, 1.0 / l, 0.0)             # no valid key -> zeros
      q_tile[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_tile, o_ref.at[it.b, it.h, pl.ds(q_base, ROWS)])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # q_tile is the next item's q buffer
      return t0 + it.n_steps

    lax.fori_loop(0, my_items, attend, jnp.int32(0))
    plgpu.wait_smem_to_gmem(0)


def head_sparse_attention_mosaic_kernel(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
    kv_len: jax.Array, k_new: jax.Array, v_new: jax.Array, new_len: jax.Array, *, scale: float,
    layer: jax.Array | None = None, q_rows: jax.Array | None = None,
    block_kv: int | None = None, num_stages: int | None = None, num_ctas: int | None = None,
    compiler_params=None, interpret=False) -> jax.Array:
  """plgpu.kernel wrapper; operands as ops.head_sparse_attention, which validates shapes and dtypes
  (impl="mosaic"); the Mosaic-specific limits raise ValueError here, before lowering.

  q [B, Hkv, QB, D]; pools [P, S, D] (shared), [Hkv, P, S, D] (head-major) or [L, P, S, D] with
  ``layer`` (stacked, read in place); page_table [B, Hkv, MP]; kv_len [B, Hkv]; k_new, v_new
  [B, Hkv, Ln, D]; new_len [B]; q_rows [B] (optional) -> [B, Hkv, QB, D] in q's dtype.
  Pads q rows to a multiple of 64 * compute warpgroups, and the fresh rows to a multiple of 64
  unless Ln <= 64 is a multiple of 8 (Dream: 32, no copy); the pool is passed whole.
  num_ctas: the persistent grid (default: the GPU's SM count). ``interpret`` (True, or an
  InterpretGPUParams): jax's private CPU Mosaic GPU interpreter, jnp matmuls (tests only).
  """
  tiles = mosaic_tiles(q.shape, k_pages.shape, k_new.shape, q.dtype, block_kv=block_kv,
                       num_stages=num_stages)
  if plgpu is None:
    raise RuntimeError(f"Mosaic GPU kernel unavailable: {_IMPORT_ERROR}")
  batch, num_kv_heads, num_q_rows, head_dim = q.shape
  num_fresh = k_new.shape[2]
  pool_index = ("stacked" if layer is not None else "shared" if k_pages.ndim == 3 else "head")

  if tiles.q_rows != num_q_rows:
    q = jnp.pad(q, ((0, 0), (0, 0), (0, tiles.q_rows - num_q_rows), (0, 0)))
  if tiles.fresh_rows != num_fresh:
    pad = ((0, 0), (0, 0), (0, tiles.fresh_rows - num_fresh), (0, 0))
    k_new, v_new = jnp.pad(k_new, pad), jnp.pad(v_new, pad)
  if num_fresh == 0:                      # no fresh rows at all: a dummy block never read
    k_new = v_new = jnp.zeros((batch, num_kv_heads, FRESH_ROWS, head_dim), q.dtype)
  layer = jnp.zeros((1,), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32).reshape(1)
  q_rows = (jnp.full((batch,), num_q_rows, jnp.int32) if q_rows is None
            else jnp.asarray(q_rows, jnp.int32))

  wgs, stages = tiles.compute_wgs, tiles.num_stages
  pieces = max(1, tiles.block_kv // k_pages.shape[-2])
  swizzle = () if interpret else (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  swizzled = lambda *shape: plgpu.SMEM(shape, q.dtype, transforms=swizzle)
  scratch = (
      swizzled(wgs, ROWS, head_dim),                     # q tiles, reused for the output
      swizzled(stages, tiles.block_kv, head_dim),        # K ring
      swizzled(stages, tiles.block_kv, head_dim),        # V ring
      plgpu.Barrier(num_barriers=wgs),                   # q loaded
      plgpu.Barrier(num_arrivals=pieces, num_barriers=stages),  # K slot loaded
      plgpu.Barrier(num_arrivals=pieces, num_barriers=stages),  # V slot loaded
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),  # K slot consumed
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),  # V slot consumed
      plgpu.Barrier(num_arrivals=wgs),                   # schedule (ping-pong)
      plgpu.Barrier(),                                   # partial-step V rows zeroed
  )
  num_items = tiles.q_rows // (wgs * ROWS) * num_kv_heads * batch
  if num_ctas is None:                                   # persistent: one CTA per SM
    num_ctas = 2 if interpret else _sm_count()
  body = lambda *refs: _kernel(*refs, tiles=tiles, scale=float(scale), pool_index=pool_index,
                               num_fresh=num_fresh, num_ctas=min(num_ctas, num_items),
                               interpret=bool(interpret))
  out = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_types=scratch,
      grid=(min(num_ctas, num_items),),
      grid_names=("cta",),
      num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=compiler_params or plgpu.CompilerParams(approx_math=True),
      **({"interpret": _interpret_params(interpret)} if interpret else {}),
  )(q, k_pages, v_pages, page_table, kv_len, k_new, v_new, new_len, layer, q_rows)
  return out[:, :, :num_q_rows] if tiles.q_rows != num_q_rows else out


def _sm_count() -> int:
  """SMs of the default GPU (132 on an H100/H200 SXM, also the figure used off a GPU)."""
  device = jax.devices()[0]
  return int(getattr(device, "core_count", 0) or 132) if device.platform == "gpu" else 132


def _interpret_params(interpret):
  if interpret is not True:
    return interpret
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # private, 0.10+
  return InterpretGPUParams()

