"""Head-sparse paged attention: interpret-mode Pallas kernel vs the jnp reference, the reference vs
a numpy float64 dense oracle, and argument validation.

Tolerances: kernel vs reference, f32 max abs error <= 1e-5; bf16 relative L2 error <= 5e-3 (one bf16
ulp near 1 is ~4e-3; the kernel on an H100 measured ~2e-3). Reference vs float64 oracle (f32
inputs): max abs <= 1e-5.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.head_sparse_attention import (
    head_sparse_attention,
    head_sparse_attention_reference,
    pack_queries,
    query_rows,
    unpack_outputs,
)

F32_MAX_ABS = 1e-5
BF16_REL_L2 = 5e-3


@dataclasses.dataclass(frozen=True)
class Case:
  """One test configuration. kv_len [B][Hkv], new_len [B]; Ln fresh rows (may differ from Lq)."""
  kv_len: tuple
  new_len: tuple
  num_tokens: int = 16      # Lq: query tokens per request
  num_fresh: int = 16       # Ln: fresh K/V rows (padding included)
  group: int = 1            # G = Hq / Hkv
  head_dim: int = 32
  page_size: int = 16
  max_pages: int = 4
  block_k: int | None = None
  block_q: int | None = None

  @property
  def batch(self):
    return len(self.kv_len)

  @property
  def num_kv_heads(self):
    return len(self.kv_len[0])


CASES = {
    # ragged per-head lengths, an empty head, partial and exact last pages, new_len < Ln
    "ragged_mha": Case(kv_len=((37, 0, 64, 5), (16, 50, 1, 33)), new_len=(16, 9)),
    # Dream-like GQA 7:1, one extra query-only row (Lq = Ln + 1), QB = 64 split into 16-row q tiles
    "gqa7_extra_row": Case(kv_len=((20, 48), (0, 7)), new_len=(8, 3), num_tokens=9, num_fresh=8,
                           group=7, max_pages=3, block_q=16),
    # exact page multiples everywhere, all fresh rows valid
    "exact_pages": Case(kv_len=((32, 64), (16, 48)), new_len=(16, 16), max_pages=4),
    # 32-token pages read in 16-token sub-blocks
    "sub_blocks": Case(kv_len=((70, 33), (96, 17)), new_len=(5, 12), page_size=32, max_pages=3,
                       block_k=16, head_dim=16),
    # request 1 has no cache and no fresh rows at all -> zeros
    "no_keys": Case(kv_len=((25, 3), (0, 0)), new_len=(2, 0), group=2, num_tokens=8, num_fresh=8),
}

# (case, dtype) pairs of the shared parity suite.
PARITY = [(name, "float32") for name in CASES] + [
    ("ragged_mha", "bfloat16"), ("gqa7_extra_row", "bfloat16"), ("sub_blocks", "bfloat16")]


LAYOUTS = ("head_major", "shared")


def page_space(pages, h: int):
  """KV head h's page space: the whole pool for a shared [P, S, D] pool, else pages[h] (a view)."""
  return pages if pages.ndim == 3 else pages[h]


def make_inputs(case: Case, dtype, seed: int = 0, layout: str = "head_major"):
  """Random inputs in the model layout plus packed kernel inputs.

  layout "head_major": pools [Hkv, P, S, D]; within a head, requests own disjoint random pages from
  1..P-1. layout "shared": pools [P, S, D]; every (request, head) owns disjoint random pages of the
  one page space, so different heads' pages interleave. Unused table slots point at page 0.
  Page 0, cached slots past kv_len and fresh rows past new_len are filled with NaN.
  Returns (q_model [B, Lq, Hq, D], packed args tuple for head_sparse_attention).
  """
  assert layout in LAYOUTS, layout
  shared = layout == "shared"
  rng = np.random.default_rng(seed)
  b_, h_, d, s, mp = case.batch, case.num_kv_heads, case.head_dim, case.page_size, case.max_pages
  if shared:
    num_pages = 1 + b_ * h_ * mp                           # one space, mp pages per (b, h)
    pool_shape = (num_pages, s, d)
  else:
    num_pages = 1 + b_ * mp                                # enough distinct pages per head
    pool_shape = (h_, num_pages, s, d)
  q_model = rng.standard_normal((b_, case.num_tokens, h_ * case.group, d)).astype(np.float32)
  k_pages = rng.standard_normal(pool_shape).astype(np.float32)
  v_pages = rng.standard_normal(pool_shape).astype(np.float32)
  k_new = rng.standard_normal((b_, h_, case.num_fresh, d)).astype(np.float32)
  v_new = rng.standard_normal((b_, h_, case.num_fresh, d)).astype(np.float32)
  kv_len = np.asarray(case.kv_len, np.int32)
  new_len = np.asarray(case.new_len, np.int32)
  page_table = np.zeros((b_, h_, mp), np.int32)
  if shared:                                               # global ids, heads interleaved
    owned_all = rng.permutation(np.arange(1, num_pages)).reshape(h_, b_, mp)
  for h in range(h_):
    page_space(k_pages, h)[0] = page_space(v_pages, h)[0] = np.nan
  for b in range(b_):
    k_new[b, :, new_len[b]:] = v_new[b, :, new_len[b]:] = np.nan
  for h in range(h_):
    if shared:
      owned = owned_all[h]
    else:
      owned = rng.permutation(np.arange(1, num_pages)).reshape(b_, mp)   # disjoint per request
    for b in range(b_):
      n = kv_len[b, h]
      used = -(-n // s)
      page_table[b, h, :used] = owned[b, :used]
      if n % s:                                             # garbage after the last valid slot
        last = page_table[b, h, used - 1]
        page_space(k_pages, h)[last, n % s:] = page_space(v_pages, h)[last, n % s:] = np.nan
  cast = lambda x: jnp.asarray(x, dtype)
  q = pack_queries(cast(q_model), h_)
  args = (q, cast(k_pages), cast(v_pages), jnp.asarray(page_table), jnp.asarray(kv_len),
          cast(k_new), cast(v_new), jnp.asarray(new_len))
  return cast(q_model), args


def to_shared(args):
  """Head-major args -> the same logical cache in a shared page space (head h's page p: h*P + p)."""
  q, k_pages, v_pages, page_table, *rest = args
  num_kv_heads, num_pages = k_pages.shape[:2]
  flat = lambda x: x.reshape((num_kv_heads * num_pages,) + x.shape[2:])
  offsets = (jnp.arange(num_kv_heads, dtype=jnp.int32) * num_pages)[None, :, None]
  return (q, flat(k_pages), flat(v_pages), page_table + offsets, *rest)


def _f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def dense_oracle(q_model, args, group: int):
  """numpy float64: explicit [gathered cached tokens ; fresh tokens] per (b, h), plain softmax.

  q_model [B, Lq, Hq, D] -> [B, Lq, Hq, D]; query head hq uses KV head hq // group. Pools may be
  head-major [Hkv, P, S, D] or shared [P, S, D].
  """
  _, k_pages, v_pages, page_table, kv_len, k_new, v_new, new_len = args
  k_pages, v_pages, k_new, v_new = map(_f64, (k_pages, v_pages, k_new, v_new))
  page_table, kv_len, new_len = map(np.asarray, (page_table, kv_len, new_len))
  q_model = _f64(q_model)
  b_, _, hq, d = q_model.shape
  page_size = k_pages.shape[-2]

  def keys(pages, fresh, b, h):
    cached = [page_space(pages, h)[page_table[b, h, t // page_size], t % page_size]
              for t in range(kv_len[b, h])]
    return np.concatenate([np.reshape(cached, (-1, d)), fresh[b, h, :new_len[b]]])

  out = np.zeros_like(q_model)
  for b in range(b_):
    for qh in range(hq):
      h = qh // group
      k, v = keys(k_pages, k_new, b, h), keys(v_pages, v_new, b, h)
      if len(k) == 0:
        continue                                            # no valid key -> zeros
      s = q_model[b, :, qh] @ k.T / math.sqrt(d)            # [Lq, T]
      p = np.exp(s - s.max(-1, keepdims=True))
      out[b, :, qh] = (p / p.sum(-1, keepdims=True)) @ v
  return out


def run(args, impl, case: Case | None = None):
  kw = {} if case is None else dict(block_k=case.block_k, block_q=case.block_q)
  return head_sparse_attention(*args, impl=impl, **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,dtype", PARITY)
def test_interpret_kernel_matches_reference(name, dtype, layout):
  case = CASES[name]
  _, args = make_inputs(case, jnp.dtype(dtype), layout=layout)
  assert args[1].ndim == (3 if layout == "shared" else 4)
  out = run(args, "interpret", case)
  ref = run(args, "reference")
  assert out.shape == ref.shape == args[0].shape and out.dtype == ref.dtype == args[0].dtype
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert not np.isnan(out).any(), "NaN leaked from a poisoned page or padding row"
  assert not np.isnan(ref).any()
  if dtype == "float32":
    np.testing.assert_allclose(out, ref, rtol=0, atol=F32_MAX_ABS)
  else:
    rel_l2 = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel_l2 <= BF16_REL_L2, rel_l2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_dense_oracle(name, layout):
  case = CASES[name]
  q_model, args = make_inputs(case, jnp.float32, seed=1, layout=layout)
  ref = head_sparse_attention_reference(*args)
  got = np.asarray(unpack_outputs(ref, case.num_tokens, q_model.shape[2]))
  want = dense_oracle(q_model, args, case.group)
  np.testing.assert_allclose(got, want, rtol=0, atol=F32_MAX_ABS)


def test_reference_matches_jax_dot_product_attention():
  """Second oracle: jax.nn.dot_product_attention on one (b, h) with explicitly gathered keys."""
  case = CASES["ragged_mha"]
  q_model, args = make_inputs(case, jnp.float32, seed=2)
  q, k_pages, v_pages, page_table, kv_len, k_new, v_new, new_len = args
  ref = head_sparse_attention_reference(*args)
  b, h = 1, 3                                               # kv_len 33: 2 full pages + 1 token
  n = int(kv_len[b, h])
  pages = page_table[b, h, :-(-n // case.page_size)]
  k = jnp.concatenate([k_pages[h, pages].reshape(-1, case.head_dim)[:n], k_new[b, h, :new_len[b]]])
  v = jnp.concatenate([v_pages[h, pages].reshape(-1, case.head_dim)[:n], v_new[b, h, :new_len[b]]])
  want = jax.nn.dot_product_attention(q[b, h][None, :, None], k[None, :, None], v[None, :, None])
  np.testing.assert_allclose(np.asarray(ref[b, h]), np.asarray(want[0, :, 0]), atol=F32_MAX_ABS)


def test_shared_pool_heads_interleave():
  """The shared-layout fixture mixes heads' pages in one space (not head-major in disguise)."""
  _, args = make_inputs(CASES["ragged_mha"], jnp.float32, layout="shared")
  k_pages, page_table, kv_len = args[1], np.asarray(args[3]), np.asarray(args[4])
  assert k_pages.ndim == 3 and np.isnan(np.asarray(k_pages[0])).all()
  owner = {}
  for b, h in np.ndindex(*kv_len.shape):
    for p in page_table[b, h, :-(-kv_len[b, h] // k_pages.shape[1])]:
      assert owner.setdefault(int(p), (b, h)) == (b, h), "page owned by two (request, head)s"
  heads = [owner[p][1] for p in sorted(owner)]
  assert len(set(heads)) > 1 and any(x != y for x, y in zip(heads, heads[1:]))
  assert sorted(heads) != heads                             # not grouped head by head


@pytest.mark.parametrize("impl", ["interpret", "reference"])
def test_shared_layout_matches_head_major(impl):
  """The same logical cache laid out both ways gives the same output."""
  case = CASES["gqa7_extra_row"]
  _, args = make_inputs(case, jnp.float32, seed=3)
  np.testing.assert_allclose(np.asarray(run(to_shared(args), impl, case)),
                             np.asarray(run(args, impl, case)), rtol=0, atol=F32_MAX_ABS)


def test_auto_dispatch_on_this_backend():
  _, args = make_inputs(CASES["exact_pages"], jnp.float32)
  expected = "interpret" if jax.default_backend() == "gpu" else "reference"   # pallas ~ interpret
  np.testing.assert_allclose(np.asarray(run(args, "auto")), np.asarray(run(args, expected)),
                             atol=F32_MAX_ABS)


def test_empty_request_outputs_zeros():
  case = CASES["no_keys"]
  _, args = make_inputs(case, jnp.float32)
  for impl in ("interpret", "reference"):
    out = np.asarray(run(args, impl))
    assert np.all(out[1] == 0), impl                        # request 1: kv_len 0, new_len 0
    assert np.abs(out[0]).max() > 0


def test_lengths_are_clamped():
  """kv_len > MP*S and new_len > Ln act like the maximum; negative lengths like 0."""
  case = CASES["exact_pages"]
  _, args = make_inputs(case, jnp.float32)
  full = list(args)
  full[4] = jnp.full_like(args[4], case.max_pages * case.page_size)
  page_table = np.asarray(args[3]).copy()
  page_table[page_table == 0] = 1                           # every slot now points at a real page
  full[3] = jnp.asarray(page_table)
  over = list(full)
  over[4] = full[4] + 1000
  over[7] = args[7] + 5
  for impl in ("interpret", "reference"):
    np.testing.assert_allclose(np.asarray(run(over, impl)), np.asarray(run(full, impl)),
                               atol=F32_MAX_ABS)
  neg = list(args)
  neg[4] = jnp.full_like(args[4], -3)
  neg[7] = jnp.full_like(args[7], -1)
  for impl in ("interpret", "reference"):
    assert np.all(np.asarray(run(neg, impl)) == 0), impl


def test_pack_unpack_roundtrip_and_layout():
  q = jnp.arange(2 * 5 * 6 * 16, dtype=jnp.float32).reshape(2, 5, 6, 16)   # Lq 5, Hq 6, D 16
  packed = pack_queries(q, num_kv_heads=2)                  # G = 3 -> 15 rows -> QB 16
  assert packed.shape == (2, 2, 16, 16) and query_rows(5, 3) == 16
  # row t*G + g of KV head h is query head h*G + g at token t (token-major)
  np.testing.assert_array_equal(packed[1, 1, 4 * 3 + 2], q[1, 4, 1 * 3 + 2])
  assert np.all(np.asarray(packed[:, :, 15:]) == 0)
  np.testing.assert_array_equal(unpack_outputs(packed, 5, 6), q)
  assert pack_queries(q, 2, rows=32).shape == (2, 2, 32, 16)
  assert query_rows(33, 7) == 256 and query_rows(32, 1) == 32 and query_rows(3, 1) == 16


# ----------------------------------------------------------------------------- validation

def _good_args():
  return make_inputs(CASES["ragged_mha"], jnp.float32)[1]


def _replace(args, index, value):
  args = list(args)
  args[index] = value
  return args


@pytest.mark.parametrize("index,value,match", [
    (0, jnp.zeros((2, 4, 16)), r"q must be \[B, Hkv, QB, D\].*\(2, 4, 16\)"),
    (1, jnp.zeros((3, 9, 16, 32)), r"k_pages \(3, 9, 16, 32\): KV heads = 3 .* q \(2, 4, 16, 32\)"),
    (2, jnp.zeros((4, 9, 16, 16)), r"v_pages .* must have the shape of k_pages"),
    (3, jnp.zeros((2, 4, 4), jnp.int16), r"page_table dtype must be int32, got int16"),
    (3, jnp.zeros((2, 4, 4), jnp.float32), r"page_table dtype must be int32"),
    (3, jnp.zeros((2, 4), jnp.int32), r"page_table must be \[B, Hkv, MP\]"),
    (4, jnp.zeros((2, 3), jnp.int32), r"kv_len \(2, 3\): KV heads"),
    (5, jnp.zeros((2, 4, 16, 64)), r"k_new \(2, 4, 16, 64\): head dim = 64"),
    (5, jnp.zeros((3, 4, 16, 32)), r"k_new .*: batch = 3"),
    (6, jnp.zeros((2, 4, 8, 32)), r"v_new .* must have the shape of k_new"),
    (7, jnp.zeros((2,), jnp.uint32), r"new_len dtype must be int32"),
    (5, jnp.zeros((2, 4, 16, 32), jnp.bfloat16),
     r"k_new dtype bfloat16 must equal q dtype float32"),
])
def test_validation_errors(index, value, match):
  args = _good_args()
  if index == 1:                                            # keep k/v_pages consistent
    args = _replace(args, 2, value)
  if index == 5:
    args = _replace(args, 6, value)
  with pytest.raises(ValueError, match=match):
    head_sparse_attention(*_replace(args, index, value), impl="reference")


@pytest.mark.parametrize("k_pages,v_pages,match", [
    ((9, 16, 64), (9, 16, 64), r"k_pages \(9, 16, 64\): head dim = 64 .* q \(2, 4, 16, 32\)"),
    ((9, 16, 32), (9, 32, 32), r"v_pages \(9, 32, 32\) must have the shape of k_pages \(9, 16,"),
    ((9, 16, 32), (4, 9, 16, 32), r"v_pages \(4, 9, 16, 32\) must have the shape of k_pages"),
    ((16, 32), (16, 32), r"k_pages must be \[P, S, D\] .*rank 3.* or \[Hkv, P, S, D\].*\(16, 32\)"),
    ((1, 4, 9, 16, 32), (1, 4, 9, 16, 32), r"k_pages must be \[P, S, D\].*\(1, 4, 9, 16, 32\)"),
])
def test_shared_pool_validation_errors(k_pages, v_pages, match):
  args = make_inputs(CASES["ragged_mha"], jnp.float32, layout="shared")[1]
  args = _replace(_replace(args, 1, jnp.zeros(k_pages)), 2, jnp.zeros(v_pages))
  with pytest.raises(ValueError, match=match):
    head_sparse_attention(*args, impl="reference")


def test_shared_pool_kernel_only_validation():
  args = make_inputs(CASES["ragged_mha"], jnp.float32, layout="shared")[1]
  with pytest.raises(ValueError, match=r"block_k=32 must divide the page size S=16 \(k_pages \("):
    head_sparse_attention(*args, impl="interpret", block_k=32)


def test_kernel_only_validation():
  args = _good_args()
  q24 = jnp.zeros((2, 4, 24, 32), jnp.float32)              # fine for the reference ...
  assert head_sparse_attention(*_replace(args, 0, q24), impl="reference").shape == q24.shape
  with pytest.raises(ValueError, match=r"q rows \(QB\)=24 must be a power of two"):
    head_sparse_attention(*_replace(args, 0, q24), impl="interpret")   # ... not for the kernel
  with pytest.raises(ValueError, match=r"block_k=32 must divide the page size S=16"):
    head_sparse_attention(*args, impl="interpret", block_k=32)         # S = 16
  with pytest.raises(ValueError, match=r"block_k=8 must be a power of two >= 16"):
    head_sparse_attention(*args, impl="interpret", block_k=8)
  with pytest.raises(ValueError, match=r"block_q=48"):
    head_sparse_attention(*args, impl="interpret", block_q=48)
  with pytest.raises(ValueError, match=r"impl"):
    head_sparse_attention(*args, impl="cuda")


def test_pack_validation():
  with pytest.raises(ValueError, match=r"Hq=6 .* num_kv_heads=4"):
    pack_queries(jnp.zeros((1, 3, 6, 16)), 4)
  with pytest.raises(ValueError, match=r"rows=8 < G\*Lq"):
    pack_queries(jnp.zeros((1, 3, 6, 16)), 2, rows=8)
  with pytest.raises(ValueError, match=r"q must be \[B, Lq, Hq, D\]"):
    pack_queries(jnp.zeros((3, 6, 16)), 2)


# ---- stacked pool [L, P, S, D] read in place at a traced layer, and q_rows tile skipping ----

def to_stacked(args, num_layers: int = 3, layer: int = 1, seed: int = 5):
  """Shared-layout args -> the same cache as plane ``layer`` of an [L, P, S, D] pool whose other
  planes hold NaN (reading a wrong plane, or the whole pool, poisons the output)."""
  q, k_pages, v_pages, *rest = to_shared(args) if args[1].ndim == 4 else args
  stack = lambda x: jnp.stack([x if i == layer else jnp.full_like(x, jnp.nan)
                               for i in range(num_layers)])
  return (q, stack(k_pages), stack(v_pages), *rest)


@pytest.mark.parametrize("name", ["ragged_mha", "gqa7_extra_row", "sub_blocks"])
@pytest.mark.parametrize("impl", ["interpret", "reference", "callback"])
def test_stacked_pool_with_traced_layer_matches_plane(name, impl):
  case = CASES[name]
  _, args = make_inputs(case, jnp.float32, layout="shared")
  want = head_sparse_attention(*args, impl="reference", block_k=case.block_k,
                               block_q=case.block_q)
  stacked = to_stacked(args)
  run = jax.jit(lambda layer, *a: head_sparse_attention(
      *a, layer=layer, impl=impl, block_k=case.block_k, block_q=case.block_q))
  got = run(jnp.int32(1), *stacked)
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=F32_MAX_ABS)


def test_q_rows_skips_whole_tiles_only():
  case = CASES["gqa7_extra_row"]                       # QB 64 in 16-row tiles, G = 7
  _, args = make_inputs(case, jnp.float32, layout="shared")
  full = np.asarray(head_sparse_attention(*args, impl="interpret", block_q=16))
  used = jnp.asarray([7 * 3, 7 * 9], jnp.int32)        # 3 tokens of request 0, all 9 of request 1
  got = np.asarray(head_sparse_attention(*args, q_rows=used, impl="interpret", block_q=16))
  np.testing.assert_array_equal(got[0, :, :32], full[0, :, :32])   # tiles 0-1 cover rows < 21
  np.testing.assert_array_equal(got[0, :, 32:], 0.0)               # tiles 2-3 skipped
  np.testing.assert_array_equal(got[1], full[1])


def test_stacked_pool_validation():
  case = CASES["ragged_mha"]
  _, args = make_inputs(case, jnp.float32, layout="shared")
  with pytest.raises(ValueError, match="stacked pool"):
    head_sparse_attention(*args, layer=jnp.int32(0), impl="reference")
  with pytest.raises(ValueError, match="q_rows"):
    head_sparse_attention(*args, q_rows=jnp.zeros((5,), jnp.int32), impl="reference")


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("group,tokens", [(1, 32), (7, 33)])
def test_stacked_pool_lowers_to_triton_without_slicing(group, tokens):
  """The engine's call (whole [L, P, S, D] pool, traced layer, q_rows) lowers to one Triton
  call that takes the pool buffer itself: no slice or copy of it anywhere in the module."""
  from pallas_kernels.common import cuda_lowering_text

  sds, i32, bf16 = jax.ShapeDtypeStruct, jnp.int32, jnp.bfloat16
  b, hkv, d, s, mp, layers, pages = 2, 4, 128, 64, 8, 3, 37
  qb = query_rows(tokens, group)
  pool = sds((layers, pages, s, d), bf16)
  args = (sds((b, hkv, qb, d), bf16), pool, pool, sds((b, hkv, mp), i32), sds((b, hkv), i32),
          sds((b, hkv, 32, d), bf16), sds((b, hkv, 32, d), bf16), sds((b,), i32), sds((), i32),
          sds((b,), i32))
  text = cuda_lowering_text(lambda *a: head_sparse_attention(*a, impl="pallas"), *args)
  assert "triton" in text
  pool_type = f"tensor<{layers}x{pages}x{s}x{d}xbf16>"
  for line in text.splitlines():
    if pool_type in line and ("slice" in line or "gather" in line or "copy" in line):
      raise AssertionError(f"the pool is sliced or copied: {line.strip()}")
