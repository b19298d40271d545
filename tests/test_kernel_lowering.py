"""Every head-sparse attention configuration the engine uses lowers to Triton for 'cuda' on CPU.

Runs the Pallas -> Triton-IR lowering only (``jax.jit(f).trace(...).lower(lowering_platforms=
("cuda",))``, no GPU needed), so non-power-of-two shapes and unsupported primitives fail here;
Triton's own compiler limits only show up on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import triton as pltr

from pallas_kernels.common import cuda_lowering_text
from pallas_kernels.head_sparse_attention import head_sparse_attention, query_rows
from pallas_kernels.head_sparse_attention.kernel import head_sparse_attention_kernel

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

TRITON_TARGETS = {"__gpu$xla.gpu.triton", getattr(pltr, "CUSTOM_CALL_TARGET_NAME", "")} - {""}
HEAD_DIM = 128


def specs(*, batch, kv_heads, q_rows, page_size, max_pages, num_fresh, dtype, num_pages=64,
          head_dim=HEAD_DIM, shared=False):
  """Abstract arguments of head_sparse_attention, in order.

  shared=False: head-major pools [Hkv, P, S, D]; shared=True: one page space [P, S, D].
  """
  sds, i32 = jax.ShapeDtypeStruct, jnp.int32
  pool_shape = (num_pages, page_size, head_dim)
  pool = sds(pool_shape if shared else (kv_heads,) + pool_shape, dtype)
  fresh = sds((batch, kv_heads, num_fresh, head_dim), dtype)
  return (sds((batch, kv_heads, q_rows, head_dim), dtype), pool, pool,
          sds((batch, kv_heads, max_pages), i32), sds((batch, kv_heads), i32), fresh, fresh,
          sds((batch,), i32))


def assert_triton(text: str) -> None:
  assert any(t in text for t in TRITON_TARGETS), "no Triton custom call in the lowered module"


# (label, spec kwargs, op kwargs)
ENGINE_CONFIGS = [
    # LLaDA-like MHA (32 heads scaled down to 4), block 32 -> QB 32, 256-token budget over pages
    *[(f"llada_S{s}_{dt}", dict(batch=2, kv_heads=4, q_rows=query_rows(32, 1), page_size=s,
                                max_pages=1024 // s, num_fresh=32, dtype=dt), {})
      for s in (64, 256) for dt in ("bfloat16", "float32")],
    # Dream-like GQA 28:4 (group 7), 33 query tokens -> 231 rows -> QB 256; fresh rows 32 or 33
    *[(f"dream_S{s}_Ln{ln}_{dt}", dict(batch=2, kv_heads=4, q_rows=query_rows(33, 7), page_size=s,
                                       max_pages=1024 // s, num_fresh=ln, dtype=dt), {})
      for s, ln in ((256, 32), (64, 33)) for dt in ("bfloat16", "float32")],
    # Dream with the whole 256-row q block per program and 8 warps (the other fast setting on H100)
    ("dream_bq256_w8", dict(batch=2, kv_heads=4, q_rows=256, page_size=256, max_pages=4,
                            num_fresh=32, dtype="bfloat16"), dict(block_q=256, num_warps=8)),
    # odd page-table width and pool size (only loads must be powers of two, not block shapes)
    ("odd_table_and_pool", dict(batch=3, kv_heads=4, q_rows=32, page_size=64, max_pages=5,
                                num_pages=37, num_fresh=32, dtype="bfloat16"), {}),
    # 128-token compute sub-blocks of 256-token pages
    ("llada_bk128", dict(batch=1, kv_heads=4, q_rows=32, page_size=256, max_pages=4, num_fresh=32,
                         dtype="bfloat16"), dict(block_k=128)),
    # ---- shared page space [P, S, D] (the engine's layout: one free list for all KV heads) ----
    # LLaDA-like MHA, D 128, 64-token pages; P = 4 heads * 64 pages + the dummy (not a power of 2)
    *[(f"shared_llada_S64_{dt}", dict(batch=2, kv_heads=4, q_rows=query_rows(32, 1), page_size=64,
                                      max_pages=1024 // 64, num_pages=257, num_fresh=32, dtype=dt,
                                      shared=True), {})
      for dt in ("bfloat16", "float32")],
    # Dream-like GQA 28:4 (group 7) -> QB 256, bf16; 64-token pages with Ln 33, 256-token with Ln 32
    *[(f"shared_dream_S{s}_Ln{ln}_bf16", dict(batch=2, kv_heads=4, q_rows=query_rows(33, 7),
                                              page_size=s, max_pages=1024 // s,
                                              num_pages=4 * (1024 // s) + 1, num_fresh=ln,
                                              dtype="bfloat16", shared=True), {})
      for s, ln in ((64, 33), (256, 32))],
    # Dream with 256-row q tiles and 8 warps on the shared pool
    ("shared_dream_bq256_w8", dict(batch=2, kv_heads=4, q_rows=256, page_size=256, max_pages=4,
                                   num_pages=33, num_fresh=32, dtype="bfloat16", shared=True),
     dict(block_q=256, num_warps=8)),
]


@pytest.mark.parametrize("label,spec_kw,op_kw", ENGINE_CONFIGS, ids=[c[0] for c in ENGINE_CONFIGS])
def test_engine_config_lowers_to_triton(label, spec_kw, op_kw):
  fn = functools.partial(head_sparse_attention, impl="pallas", **op_kw)
  assert_triton(cuda_lowering_text(fn, *specs(**spec_kw)))


BAD_CONFIGS = [
    # 48-row q block: not a power of two (validation would reject it; the kernel module does not)
    ("q_rows_48", dict(q_rows=48, head_dim=128), dict(block_k=64)),
    # 96-wide heads
    ("head_dim_96", dict(q_rows=32, head_dim=96), dict(block_k=64)),
    # 48-token compute blocks
    ("block_k_48", dict(q_rows=32, head_dim=128, page_size=96), dict(block_k=48)),
]


@pytest.mark.parametrize("label,spec_kw,kernel_kw", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_fails_to_lower(label, spec_kw, kernel_kw):
  base = dict(batch=1, kv_heads=2, page_size=64, max_pages=4, num_fresh=32, dtype="bfloat16")
  fn = functools.partial(head_sparse_attention_kernel, scale=0.1, **kernel_kw)
  with pytest.raises(Exception, match="power of 2"):
    cuda_lowering_text(fn, *specs(**{**base, **spec_kw}))


def test_tuning_knobs_reach_triton():
  """num_warps and the q-tile grid axis show up in the Triton call (no silent default)."""
  shape = dict(batch=2, kv_heads=4, q_rows=256, page_size=256, max_pages=4, num_fresh=32,
               dtype="bfloat16")
  text = cuda_lowering_text(
      functools.partial(head_sparse_attention, impl="pallas", block_q=64, num_warps=8),
      *specs(**shape))
  assert "num_warps = 8" in text
  assert "grid_x = 2" in text and "grid_y = 4" in text and "grid_z = 4" in text   # (B, Hkv, QB/bq)


def test_shared_pool_grid_and_pool_operand():
  """Shared layout: same (B, Hkv, QB/bq) grid; the kernel takes the rank-3 pool as is."""
  shape = dict(batch=2, kv_heads=4, q_rows=256, page_size=64, max_pages=16, num_pages=129,
               num_fresh=33, dtype="bfloat16", shared=True)
  args = specs(**shape)
  assert args[1].shape == (129, 64, HEAD_DIM)
  text = cuda_lowering_text(
      functools.partial(head_sparse_attention, impl="pallas", block_q=64), *args)
  assert_triton(text)
  assert "grid_x = 2" in text and "grid_y = 4" in text and "grid_z = 4" in text
  assert "129x64x128xbf16" in text                          # whole shared pool passed unsliced


# ---- fused LM head: every block configuration tiles.py ships, through ops.fused_lm_head ----

def _lm_head_specs(r, d, v, dtype):
  sds = jax.ShapeDtypeStruct
  return (sds((r, d), dtype), sds((d, v), dtype), sds((r,), jnp.float32), sds((r,), jnp.uint32),
          sds((r,), jnp.int32), sds((r,), jnp.int32))


def _dot_shapes(jaxpr) -> list:
  """Operand shapes of every dot_general in a jaxpr and its sub-jaxprs."""
  out = []
  for e in jaxpr.eqns:
    if e.primitive.name == "dot_general":
      out.append(tuple(x.aval.shape for x in e.invars))
    for p in e.params.values():
      for sub in p if isinstance(p, tuple) else (p,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          out += _dot_shapes(sub)
  return out


LLADA_HEAD, DREAM_HEAD = (4096, 126464), (3584, 152064)
# (label, device kind, R, (d, V), dtype, op kwargs, (block rows, k, vocab, warps, stages))
LM_HEAD_CONFIGS = [
    ("hopper_llada_1024", "NVIDIA H200", 1024, LLADA_HEAD, "bfloat16", {}, (128, 32, 256, 8, 4)),
    ("hopper_llada_8192_margin_entropy", "NVIDIA H100 80GB HBM3", 8192, LLADA_HEAD, "bfloat16",
     dict(want_margin=True, want_entropy=True), (128, 32, 256, 8, 4)),
    ("hopper_ragged_300_exclude_mask", "NVIDIA H200", 300, LLADA_HEAD, "bfloat16",
     dict(exclude_id=126336), (128, 32, 256, 8, 4)),
    ("hopper_dream_256", "NVIDIA GH200 480GB", 256, DREAM_HEAD, "bfloat16",
     dict(exclude_id=151666), (128, 32, 256, 8, 4)),
    ("hopper_f32_fewer_stages", "NVIDIA H200", 512, LLADA_HEAD, "float32", {},
     (128, 32, 256, 8, 3)),
    ("hopper_small_100", "NVIDIA H200", 100, LLADA_HEAD, "bfloat16",
     dict(want_margin=True, exclude_id=126336), (64, 32, 256, 4, 4)),
    ("hopper_small_5_rows", "NVIDIA H200", 5, LLADA_HEAD, "bfloat16", {}, (16, 32, 256, 4, 4)),
    ("default_ampere_1024", "NVIDIA A100-SXM4-80GB", 1024, LLADA_HEAD, "bfloat16",
     dict(want_entropy=True), (64, 64, 128, 4, 2)),
    ("default_unknown_f32", "Some Future GPU", 256, DREAM_HEAD, "float32", {},
     (64, 32, 128, 4, 2)),
]


@pytest.mark.parametrize("label,kind,r,dv,dtype,kw,want", LM_HEAD_CONFIGS,
                         ids=[c[0] for c in LM_HEAD_CONFIGS])
def test_fused_lm_head_config_lowers_to_triton(label, kind, r, dv, dtype, kw, want):
  """The blocks tiles.py picks for this GPU and R reach the kernel (its dot is [C, k] x [k, Tv],
  grid R/C row blocks) and the Triton call (warps, stages), and the whole op lowers for cuda."""
  from pallas_kernels.fused_lm_head import ops
  c, bk, tv, warps, stages = want
  fn = functools.partial(ops.fused_lm_head, impl="pallas", device_kind=kind, **kw)
  specs = _lm_head_specs(r, *dv, dtype)
  assert set(_dot_shapes(jax.make_jaxpr(fn)(*specs).jaxpr)) == {((c, bk), (bk, tv))}, label
  text = cuda_lowering_text(fn, *specs)
  assert_triton(text)
  assert f"grid_x = {-(-r // c)} :" in text, label
  assert f"num_warps = {warps} :" in text and f"num_stages = {stages} :" in text, label


def test_fused_lm_head_every_shipped_config_is_covered():
  """Each configuration in tiles.SHIPPED is selected by at least one lowering case above."""
  from pallas_kernels.fused_lm_head import tiles
  core = lambda c: (c.block_rows, c.block_vocab, c.num_warps, c.source)  # k/stages: smem-fitted
  picked = {core(tiles.tile_config(r, jnp.dtype(dt).itemsize, kind))
            for _, kind, r, _, dt, _, _ in LM_HEAD_CONFIGS}
  for name, cfg in tiles.SHIPPED.items():
    assert core(cfg) in picked, name
