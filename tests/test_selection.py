"""Selection math, page accounting and the sparse state machine vs independent numpy references.

The references below follow dLLM-Serve's selection rule literally (float64 numpy, no code shared
with dllm_jax.cache.selection): candidates = prefix [0, b) then suffix [b + Lb, N); q_avg = mean of
the block's queries; ``shared`` = one score per token summed over all query heads (K/V
repeat-interleaved to the query heads); ``per_head`` = per KV head, max over its GQA group; 1-D
max-pool, stride 1, padding k//2 acting as -inf, output truncated to K (the window spans the
prefix/suffix seam); top-k with ties to the lowest position; n_keep = min(max(1, floor(K * ratio)),
K).
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax.cache import selection
from dllm_jax.cache.page_pool import (PageAllocator, PoolConfig, SlotAllocator, max_keep,
                                      pages_needed)
from dllm_jax.cache.sparse_state import Phase, SparseConfig, phase_of

# Independent numpy reference ---------------------------------------------------------------------


def ref_n_keep(k: int, ratio: float) -> int:
  if k <= 0:
    return 0
  return min(max(1, math.floor(np.float64(k) * np.float64(ratio))), k)


def ref_candidates(block_start: int, block_len: int, length: int) -> np.ndarray:
  return np.concatenate([np.arange(0, block_start), np.arange(block_start + block_len, length)])


def ref_scores(q_block: np.ndarray, k_cand: np.ndarray, mode: str) -> np.ndarray:
  """Unpooled scores: shared -> [K]; per_head -> [Hkv, K]. q_block [Lb, Hq, D]; k_cand [K, Hkv, D]."""
  q = q_block.astype(np.float64)
  k = k_cand.astype(np.float64)
  hq, d = q.shape[1], q.shape[2]
  hkv = k.shape[1]
  g = hq // hkv
  q_avg = q.mean(axis=0)                                   # [Hq, D]
  if mode == "shared":
    k_rep = np.repeat(k, g, axis=1)                        # repeat-interleave -> [K, Hq, D]
    return np.einsum("hd,thd->t", q_avg, k_rep) / math.sqrt(d)
  out = np.empty((hkv, k.shape[0]))
  for h in range(hkv):
    s = np.stack([k[:, h] @ q_avg[h * g + i] for i in range(g)]) / math.sqrt(d)  # [g, K]
    out[h] = s.max(axis=0)
  return out


def ref_max_pool(s: np.ndarray, kernel: int) -> np.ndarray:
  """torch max_pool1d(kernel, stride 1, padding kernel//2) with -inf padding, truncated to K."""
  if kernel <= 1:
    return s.copy()
  pad = kernel // 2
  kk = s.shape[-1]
  padded = np.concatenate([np.full(s.shape[:-1] + (pad,), -np.inf), s,
                           np.full(s.shape[:-1] + (pad,), -np.inf)], axis=-1)
  out_len = kk + 2 * pad - kernel + 1
  out = np.stack([padded[..., t:t + kernel].max(axis=-1) for t in range(out_len)], axis=-1)
  return out[..., :kk]


def ref_topk(s: np.ndarray, n: int) -> np.ndarray:
  """Indices of the n largest, descending, ties to the lowest index."""
  return np.lexsort((np.arange(len(s)), -s))[:n]


def ref_select(q_block, k_all, block_start, block_len, length, ratio, mode, pool_kernel):
  """Selected canvas positions per KV head: list of Hkv arrays (descending pooled score)."""
  cand = ref_candidates(block_start, block_len, length)
  hkv = k_all.shape[1]
  keep = ref_n_keep(len(cand), ratio)
  if len(cand) == 0:
    return [np.zeros(0, int)] * hkv
  s = ref_scores(q_block, k_all[cand], "shared" if mode == "shared" else "per_head")
  if mode == "shared":
    idx = ref_topk(ref_max_pool(s, pool_kernel), keep)
    return [cand[idx]] * hkv
  pooled = ref_max_pool(s, pool_kernel)
  return [cand[ref_topk(pooled[h], keep)] for h in range(hkv)]


# Helpers to drive the code under test --------------------------------------------------------------

_select = jax.jit(selection.select, static_argnames=("width",))  # one compile per shape
_max_pool = jax.jit(selection.max_pool)


def run_select(q_block, k_all, block_start, block_len, length, keep, mode, pool_kernel,
               q_pad=0, width=None):
  """selection.select on numpy inputs; q_pad extra garbage query rows (masked by q_valid)."""
  lb = q_block.shape[0]
  if q_pad:
    garbage = np.full((q_pad,) + q_block.shape[1:], 1e3, np.float32)
    q_block = np.concatenate([q_block, garbage], axis=0)
  q_valid = np.arange(q_block.shape[0]) < lb
  n = k_all.shape[0]
  pos, counts = _select(
      jnp.asarray(q_block, jnp.float32), jnp.asarray(q_valid), jnp.asarray(k_all, jnp.float32),
      jnp.int32(block_start), jnp.int32(block_len), jnp.int32(length), jnp.int32(keep),
      jnp.int32(selection.MODES.index(mode)), jnp.int32(pool_kernel), width=width or n)
  pos, counts = np.asarray(pos), np.asarray(counts)
  return [pos[h, :counts[h]] for h in range(pos.shape[0])], counts


def rand_qk(rng, lb, n, hq, hkv, d):
  q = rng.standard_normal((lb, hq, d)).astype(np.float32)
  k = rng.standard_normal((n, hkv, d)).astype(np.float32)
  return q, k


# n_keep -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,ratio,expected", [
    (100, 0.29, 28),      # 100 * 0.29 = 28.999999999999996 in float64: floor -> 28
    (100, 0.57, 56),      # 56.99999999999999
    (100, 0.58, 57),      # 57.99999999999999
    (132, 0.5, 66),       # the worked example of test_worked_example_max_keep
    (10, 0.0, 1),         # ratio 0 keeps one token
    (0, 0.5, 0),          # no candidates: nothing to keep
    (0, 0.0, 0),
    (1, 0.3, 1),
    (7, 1.0, 7),
    (3, 0.5, 1),
    (1000, 0.001, 1),
    (1000, 0.999, 999),
])
def test_n_keep_cases(k, ratio, expected):
  assert selection.n_keep(k, ratio) == expected
  assert ref_n_keep(k, ratio) == expected


def test_n_keep_matches_float64_reference_on_a_grid():
  ratios = [i / 100 for i in range(101)] + [0.1 * i for i in range(11)] + [1 / 3, 2 / 3, 0.999]
  for k in list(range(0, 70)) + [99, 100, 101, 127, 128, 255, 256, 257, 1000, 4095]:
    for r in ratios:
      got = selection.n_keep(k, r)
      assert got == ref_n_keep(k, r), (k, r)
      assert (got == 0) == (k == 0)
      assert got <= k


# Candidate order ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,b,lb,length", [(20, 5, 4, 20), (20, 5, 4, 16), (24, 0, 8, 24),
                                           (24, 16, 8, 24), (32, 10, 6, 25), (8, 0, 8, 8)])
def test_candidate_index_is_prefix_then_suffix(n, b, lb, length):
  idx, valid = selection.candidate_index(n, jnp.int32(b), jnp.int32(lb), jnp.int32(length))
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert idx.shape == (n,) and valid.shape == (n,)
  np.testing.assert_array_equal(idx[valid], ref_candidates(b, lb, length))
  assert valid.sum() == len(ref_candidates(b, lb, length))
  assert valid[:valid.sum()].all()  # valid entries come first
  assert ((idx >= 0) & (idx < n)).all()


# Scores -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 3), (4, 1)])
def test_head_scores_shared_and_per_head(hq, hkv):
  rng = np.random.default_rng(hq * 10 + hkv)
  lb, n, d = 5, 17, 8
  q, k = rand_qk(rng, lb, n, hq, hkv, d)
  q_pad = np.concatenate([q, np.full((3, hq, d), 50.0, np.float32)])  # padding rows ignored
  valid = np.arange(lb + 3) < lb
  for shared in (True, False):
    got = np.asarray(selection.head_scores(jnp.asarray(q_pad), jnp.asarray(valid),
                                           jnp.asarray(k), jnp.bool_(shared)))
    assert got.shape == (hkv, n)
    if shared:
      ref = ref_scores(q, k, "shared")
      for h in range(hkv):
        np.testing.assert_allclose(got[h], ref, rtol=1e-5, atol=1e-5)
    else:
      np.testing.assert_allclose(got, ref_scores(q, k, "per_head"), rtol=1e-5, atol=1e-5)


def test_shared_score_sums_all_query_heads_with_repeat_interleave():
  """GQA: query head h reads KV head h // g (repeat-interleave), not h % Hkv (tiling)."""
  hq, hkv, d, n = 4, 2, 4, 3
  q = np.zeros((1, hq, d), np.float32)
  q[0, 0, 0] = 1.0   # query head 0 -> KV head 0
  q[0, 1, 0] = 1.0   # query head 1 -> KV head 0 (tiling would pick KV head 1)
  k = np.zeros((n, hkv, d), np.float32)
  k[0, 0, 0] = 2.0   # candidate 0 matches through KV head 0 only
  k[1, 1, 0] = 2.0   # candidate 1 matches through KV head 1 only
  got = np.asarray(selection.head_scores(jnp.asarray(q), jnp.ones(1, bool), jnp.asarray(k),
                                         jnp.bool_(True)))
  np.testing.assert_allclose(got[0], [2 * 2.0 / 2, 0.0, 0.0], atol=1e-6)  # (1+1)*2/sqrt(4)
  per = np.asarray(selection.head_scores(jnp.asarray(q), jnp.ones(1, bool), jnp.asarray(k),
                                         jnp.bool_(False)))
  np.testing.assert_allclose(per, [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], atol=1e-6)


def test_per_head_score_is_max_over_group_not_sum():
  hq, hkv, d = 2, 1, 2
  q = np.array([[[1.0, 0.0], [3.0, 0.0]]], np.float32)      # [1, 2, 2]
  k = np.array([[[1.0, 0.0]], [[-1.0, 0.0]]], np.float32)   # [2, 1, 2]
  per = np.asarray(selection.head_scores(jnp.asarray(q), jnp.ones(1, bool), jnp.asarray(k),
                                         jnp.bool_(False)))
  s = 1 / math.sqrt(d)
  np.testing.assert_allclose(per[0], [3.0 * s, -1.0 * s], atol=1e-6)  # max(1, 3), max(-1, -3)
  shared = np.asarray(selection.head_scores(jnp.asarray(q), jnp.ones(1, bool), jnp.asarray(k),
                                            jnp.bool_(True)))
  np.testing.assert_allclose(shared[0], [4.0 * s, -4.0 * s], atol=1e-6)


# Max-pool -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5, 7, 15])
def test_max_pool_matches_torch_semantics(kernel):
  rng = np.random.default_rng(kernel)
  s = rng.standard_normal((3, 23)).astype(np.float32)
  valid = np.ones((1, 23), bool)
  got = np.asarray(_max_pool(jnp.asarray(s), jnp.asarray(valid), jnp.int32(kernel)))
  np.testing.assert_array_equal(got, ref_max_pool(s.astype(np.float64), kernel).astype(np.float32))


def test_max_pool_even_kernel_window_is_left_heavy():
  s = np.array([[0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0]], np.float32)
  got = np.asarray(_max_pool(jnp.asarray(s), jnp.ones((1, 7), bool), jnp.int32(4)))
  # kernel 4, padding 2: output t covers inputs [t-2, t+1]
  np.testing.assert_array_equal(got[0], [0, 0, 9, 9, 9, 9, 0])


def test_max_pool_invalid_entries_are_minus_inf():
  s = np.array([[5.0, 1.0, 2.0, 100.0, 100.0]], np.float32)
  valid = np.array([[True, True, True, False, False]])
  got = np.asarray(_max_pool(jnp.asarray(s), jnp.asarray(valid), jnp.int32(3)))
  np.testing.assert_array_equal(got[0, :3], [5.0, 5.0, 2.0])  # padding never leaks in
  assert np.all(np.isneginf(got[0, 3:]))


# Top-k / full selection ---------------------------------------------------------------------------


CASES = [
    # (hq, hkv, d, n, block_start, block_len, length, ratio, pool)
    (4, 4, 8, 40, 20, 8, 40, 0.5, 3),
    (4, 4, 8, 40, 20, 8, 37, 0.3, 1),
    (8, 2, 8, 48, 12, 8, 44, 0.5, 5),
    (8, 2, 8, 48, 40, 8, 48, 0.25, 4),    # block at the end: no suffix
    (4, 1, 8, 33, 0, 8, 33, 0.6, 3),      # block at the start: no prefix
    (6, 3, 4, 30, 10, 5, 30, 1.0, 3),     # keep all
    (4, 2, 8, 40, 16, 8, 40, 0.0, 3),     # keep one
]


@pytest.mark.parametrize("mode", ["shared", "per_head"])
@pytest.mark.parametrize("case", CASES)
def test_select_matches_reference(case, mode):
  hq, hkv, d, n, b, lb, length, ratio, pool = case
  rng = np.random.default_rng(zlib.crc32(repr((case, mode)).encode()))
  q, k = rand_qk(rng, lb, n, hq, hkv, d)
  k[length:] = 1e3  # padding keys beyond the request's length must never be selected
  keep = selection.n_keep(length - lb, ratio)
  got, counts = run_select(q, k, b, lb, length, keep, mode, pool, q_pad=3)
  ref = ref_select(q, k, b, lb, length, ratio, mode, pool)
  assert counts.tolist() == [keep] * hkv
  for h in range(hkv):
    np.testing.assert_array_equal(got[h], ref[h], err_msg=f"head {h}")
    assert not np.any((got[h] >= b) & (got[h] < b + lb))  # never a block position
    assert np.all(got[h] < length)
  if mode == "shared":
    for h in range(1, hkv):
      np.testing.assert_array_equal(got[h], got[0])


def test_select_ties_go_to_lowest_position():
  hq = hkv = 1
  d, n, b, lb = 4, 16, 6, 4
  q = np.ones((lb, hq, d), np.float32)
  k = np.zeros((n, hkv, d), np.float32)  # every score 0: a 12-way tie
  for mode in ("shared", "per_head"):
    got, _ = run_select(q, k, b, lb, n, 5, mode, 1)
    np.testing.assert_array_equal(got[0], [0, 1, 2, 3, 4])
  k[13] = 1.0  # one clear winner, then the tie in position order
  got, _ = run_select(q, k, b, lb, n, 4, "per_head", 1)
  np.testing.assert_array_equal(got[0], [13, 0, 1, 2])


def test_pool_window_spans_the_prefix_suffix_seam():
  """A peak just before the block spreads (kernel 3) to the first suffix candidate."""
  hq = hkv = 2
  d, n, b, lb = 4, 24, 8, 8
  rng = np.random.default_rng(0)
  u = np.array([1.0, 0.5, -0.5, 0.25], np.float32)
  q = np.broadcast_to(u, (lb, hq, d)).copy()
  k = (0.01 * rng.standard_normal((n, hkv, d))).astype(np.float32)
  k[b - 1] = 100 * u  # last prefix candidate
  for mode in ("shared", "per_head"):
    got, _ = run_select(q, k, b, lb, n, 3, mode, 3)
    for h in range(hkv):
      # b-2, b-1 and b+lb share the pooled peak; the tie order is by position
      np.testing.assert_array_equal(got[h], [b - 2, b - 1, b + lb])
    got, _ = run_select(q, k, b, lb, n, 3, mode, 1)
    assert got[0][0] == b - 1 and (b + lb) not in got[0][:1]
  # peak on the first suffix candidate spreads back to the last prefix one
  k = (0.01 * rng.standard_normal((n, hkv, d))).astype(np.float32)
  k[b + lb] = 100 * u
  got, _ = run_select(q, k, b, lb, n, 3, "per_head", 3)
  np.testing.assert_array_equal(got[0], [b - 1, b + lb, b + lb + 1])


def test_per_head_sets_differ_between_heads():
  hq, hkv, d, n, b, lb = 4, 2, 4, 20, 10, 4
  u = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
  q = np.broadcast_to(u, (lb, hq, d)).copy()
  k = np.zeros((n, hkv, d), np.float32)
  k[2, 0] = 10 * u   # head 0 wants position 2
  k[17, 1] = 10 * u  # head 1 wants position 17
  got, _ = run_select(q, k, b, lb, n, 1, "per_head", 1)
  assert got[0].tolist() == [2] and got[1].tolist() == [17]
  shared, _ = run_select(q, k, b, lb, n, 1, "shared", 1)
  assert shared[0].tolist() == shared[1].tolist() == [2]  # tie -> lowest position


def test_select_with_no_candidates():
  q = np.ones((8, 2, 4), np.float32)
  k = np.ones((8, 2, 4), np.float32)
  for mode in selection.MODES:
    got, counts = run_select(q, k, 0, 8, 8, 0, mode, 3)
    assert counts.tolist() == [0, 0]


# per_head_adaptive --------------------------------------------------------------------------------


def _adaptive(q, k, b, lb, length, ratio, pool=3):
  keep = selection.n_keep(length - lb, ratio)
  got, counts = run_select(q, k, b, lb, length, keep, "per_head_adaptive", pool)
  return keep, got, counts


def test_adaptive_budgets_properties_random():
  rng = np.random.default_rng(7)
  for trial in range(10):
    hq, hkv = [(4, 4), (8, 2)][trial % 2]
    d, n, lb = 8, 48, 8
    b = int(rng.integers(0, n - lb + 1))
    length = int(rng.integers(b + lb, n + 1))
    ratio = float(rng.choice([0.1, 0.25, 0.5, 0.75]))
    q, k = rand_qk(rng, lb, n, hq, hkv, d)
    k *= float(rng.choice([0.5, 2.0, 8.0]))
    keep, got, counts = _adaptive(q, k, b, lb, length, ratio)
    kk = length - lb
    assert counts.sum() <= hkv * keep
    assert (counts >= 1).all() and (counts <= kk).all()
    # each head's kept tokens are its own per-head ranking's top counts[h]
    ref = ref_select(q, k, b, lb, length, 1.0, "per_head", 3)
    for h in range(hkv):
      np.testing.assert_array_equal(got[h], ref[h][:counts[h]])


def test_adaptive_concentrated_head_gets_fewer_than_diffuse():
  hq = hkv = 2
  d, n, b, lb = 4, 40, 16, 8
  u = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
  q = np.broadcast_to(u, (lb, hq, d)).copy()
  k = np.zeros((n, hkv, d), np.float32)
  k[3, 0] = 40 * u   # head 0: one dominant token (perplexity ~1)
  # head 1: flat scores (perplexity ~K)
  keep, got, counts = _adaptive(q, k, b, lb, n, 0.5, pool=1)
  assert keep == 16
  assert counts[0] < counts[1], counts
  assert counts.sum() <= hkv * keep
  assert counts[0] >= 1 and got[0][0] == 3
  # the numpy perplexity rule of the module docstring
  cand = ref_candidates(b, lb, n)
  s = ref_scores(q, k[cand], "per_head")
  p = np.exp(s - s.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  perp = np.exp(-(p * np.log(np.maximum(p, 1e-30))).sum(1))
  expect = 1 + np.floor(perp / perp.sum() * (hkv * keep - hkv)).astype(int)
  assert np.abs(counts - np.minimum(expect, len(cand))).max() <= 1


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_adaptive_ratio_one_keeps_all(hq, hkv):
  rng = np.random.default_rng(3)
  d, n, b, lb, length = 8, 40, 12, 8, 37
  q, k = rand_qk(rng, lb, n, hq, hkv, d)
  k[0, 0] *= 50  # a very concentrated head must still keep everything at ratio 1
  keep, got, counts = _adaptive(q, k, b, lb, length, 1.0)
  assert counts.tolist() == [length - lb] * hkv
  for h in range(hkv):
    assert sorted(got[h].tolist()) == ref_candidates(b, lb, length).tolist()


def test_adaptive_budgets_function_directly():
  scores = jnp.asarray(np.array([[10.0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.float32))
  valid = jnp.ones((1, 6), bool)
  budgets = jax.jit(selection.adaptive_budgets)
  b = np.asarray(budgets(scores, valid, jnp.int32(6), jnp.int32(6)))
  assert b.sum() <= 6 and (b >= 1).all() and b[0] < b[1]
  b = np.asarray(budgets(scores, valid, jnp.int32(12), jnp.int32(6)))
  assert b.tolist() == [6, 6]
  b = np.asarray(budgets(scores, valid, jnp.int32(0), jnp.int32(0)))
  assert b.tolist() == [0, 0]


# Page accounting ----------------------------------------------------------------------------------


def test_worked_example_max_keep():
  """dLLM-Serve's worked example: P=100, G=64, block 32, ratio 0.5 -> K = 132 and n_keep = 66 in
  both blocks."""
  assert max_keep(164, 100, 64, 32, 0.5) == 66
  for start in (100, 132):
    lb = min(32, 164 - start)
    assert selection.n_keep(164 - lb, 0.5) == 66


def test_max_keep_short_last_block_and_edges():
  # blocks 8, 8, 4 of a 30-token canvas: K = 22, 22, 26 -> 11, 11, 13
  assert max_keep(30, 10, 20, 8, 0.5) == 13
  assert max_keep(8, 0, 8, 8, 0.5) == 0          # empty prompt, one block: K = 0
  assert max_keep(8, 0, 8, 8, 1.0) == 0
  assert max_keep(40, 8, 32, 8, 0.0) == 1
  assert max_keep(40, 8, 32, 8, 1.0) == 32
  for p, g, bl, r in [(5, 16, 4, 0.3), (0, 24, 8, 0.7), (17, 8, 8, 0.5), (3, 30, 7, 0.29)]:
    n = p + g
    ks = [ref_n_keep(n - min(bl, p + g - s), r) for s in range(p, p + g, bl)]
    assert max_keep(n, p, g, bl, r) == max(ks)


def test_pages_needed_formulas():
  # worked example with the reference's page of 256 tokens and one KV "head row": 1 page
  assert pages_needed(66, 1, 256, adaptive=False) == 1
  # even budgets: every head rounds up separately
  assert pages_needed(66, 4, 64, adaptive=False) == 4 * 2
  assert pages_needed(64, 4, 64, adaptive=False) == 4
  assert pages_needed(65, 2, 64, adaptive=False) == 4
  # adaptive: ceil(Hkv * keep / S) + Hkv
  assert pages_needed(66, 4, 64, adaptive=True) == math.ceil(4 * 66 / 64) + 4
  assert pages_needed(1, 8, 16, adaptive=True) == 1 + 8
  assert pages_needed(0, 4, 64, adaptive=False) == 0
  assert pages_needed(0, 4, 64, adaptive=True) == 0


def test_adaptive_page_bound_covers_any_split():
  """Any split of Hkv*keep tokens into per-head counts fits the adaptive reservation."""
  rng = np.random.default_rng(0)
  for _ in range(200):
    hkv, s = int(rng.integers(1, 9)), int(rng.choice([16, 32, 64]))
    keep = int(rng.integers(1, 300))
    total = hkv * keep
    cuts = np.sort(rng.integers(0, total + 1, hkv - 1))
    counts = np.diff(np.concatenate([[0], cuts, [total]]))
    assert sum(-(-c // s) for c in counts) <= pages_needed(keep, hkv, s, adaptive=True)


def test_page_allocator():
  pa = PageAllocator(6)
  assert pa.capacity == 5 and pa.num_free == 5
  a = pa.allocate("a", 3)
  assert len(a) == 3 and 0 not in a and len(set(a)) == 3
  assert pa.num_free == 2 and pa.owned("a") == a
  assert pa.allocate("b", 3) is None          # not enough: nothing taken
  assert pa.num_free == 2 and pa.owned("b") == []
  assert not pa.can_allocate(3) and pa.can_allocate(2)
  with pytest.raises(ValueError):
    pa.allocate("a", 1)                        # double allocation
  with pytest.raises(ValueError):
    pa.allocate("c", -1)
  b = pa.allocate("b", 2)
  assert set(a).isdisjoint(b) and 0 not in b and pa.num_free == 0
  assert pa.allocate("c", 1) is None
  assert pa.allocate("z", 0) == []             # a zero-page budget always fits
  assert pa.free("a") == 3 and pa.num_free == 3
  assert pa.free("a") == 0 and pa.free("nobody") == 0
  c = pa.allocate("c", 3)
  assert sorted(c) == sorted(a)                # freed pages are handed out again
  pa.free("b"), pa.free("c"), pa.free("z")
  assert pa.num_free == pa.capacity
  seen = pa.allocate("all", 5)
  assert sorted(seen) == [1, 2, 3, 4, 5]       # page 0 is never handed out
  with pytest.raises(ValueError):
    PageAllocator(1)


def test_slot_allocator():
  sa = SlotAllocator(3)
  s = [sa.allocate(i) for i in range(3)]
  assert sorted(s) == [0, 1, 2] and sa.num_free == 0
  assert sa.allocate(9) is None
  with pytest.raises(ValueError):
    sa.allocate(0)
  sa.free(1)
  assert sa.num_free == 1 and sa.allocate(9) == s[1]
  sa.free("nobody")
  assert sa.num_free == 0


def test_pool_config_validation():
  ok = dict(num_pages=4, page_size=16, num_layers=1, num_kv_heads=2, head_dim=8, max_slots=2,
            max_pages_per_head=2)
  PoolConfig(**ok)
  for k, v in [("num_pages", 1), ("page_size", 0), ("head_dim", -1), ("max_slots", 1.5)]:
    with pytest.raises(ValueError):
      PoolConfig(**{**ok, k: v})


# SparseConfig and the state machine ---------------------------------------------------------------


def test_sparse_config_defaults_and_validation():
  c = SparseConfig()
  assert (c.enabled, c.keep_ratio, c.pool_kernel, c.delay, c.selection) == (
      True, 0.5, 3, 1, "per_head")
  assert not c.adaptive and SparseConfig(selection="per_head_adaptive").adaptive
  assert SparseConfig(keep_ratio=1).keep_ratio == 1.0
  assert isinstance(SparseConfig(keep_ratio=1).keep_ratio, float)
  for kw in [dict(keep_ratio=-0.1), dict(keep_ratio=1.01), dict(keep_ratio=True),
             dict(keep_ratio="0.5"), dict(keep_ratio=float("nan")), dict(pool_kernel=0),
             dict(pool_kernel=selection.MAX_POOL_KERNEL + 1), dict(pool_kernel=True),
             dict(pool_kernel=3.0), dict(delay=-1), dict(delay=1.5), dict(delay=False),
             dict(selection="heads"), dict(selection=None), dict(enabled=1),
             dict(enabled="yes")]:
    with pytest.raises(ValueError):
      SparseConfig(**kw)
  for k in (1, 2, 4, selection.MAX_POOL_KERNEL):
    SparseConfig(pool_kernel=k)
  for mode in selection.MODES:
    SparseConfig(selection=mode)


@pytest.mark.parametrize("delay,expected", [
    (0, [Phase.SELECT, Phase.REUSE, Phase.REUSE, Phase.REUSE]),
    (1, [Phase.REFRESH, Phase.SELECT, Phase.REUSE, Phase.REUSE]),
    (2, [Phase.REFRESH, Phase.REFRESH, Phase.SELECT, Phase.REUSE]),
    (5, [Phase.REFRESH] * 4),
])
def test_phase_of(delay, expected):
  assert [phase_of(s, delay) for s in range(4)] == expected
