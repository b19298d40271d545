"""The step's shape grid (dllm_jax/engine/grid.py): few executables, every step fits one, little
padding.

Checked against independent re-derivations: the executable count from the documented rules,
``choose`` against a brute-force search over all buckets, and the padding bound from the
bucket list itself.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings, strategies as st

from dllm_jax.config import EngineConfig
from dllm_jax.engine.grid import Grid, Shapes, token_buckets
from dllm_jax.presets import model_config as preset


@pytest.mark.parametrize("name", ["llada-8b", "dream-7b"])
@pytest.mark.parametrize("token_budget", [4096, 8192, 16384])
def test_default_server_reaches_at_most_128_executables(name, token_budget):
  """Every logit plan and flag counted: plans are a function of the bucket, flags are runtime
  values, so the executables are exactly the grid's buckets."""
  grid = Grid.of(EngineConfig(token_budget=token_budget), preset(name))
  shapes = grid.shapes()
  assert len(shapes) == len(set(shapes)) <= 128
  # Independent count: for each T bucket, N = 0 plus every power of two 32 <= N <= the length
  # bucket whose rows (longer than N / 2, or any row for N = 32) fit in T tokens.
  count = 0
  for t in grid.tokens:
    count += 1 + sum(1 for k in range(5, 40) if 2**k <= grid.max_len_bucket
                     and (2**k == 32 or 2**(k - 1) < t))
  assert count == len(shapes)


def test_llada_default_count_is_documented():
  grid = Grid.of(EngineConfig(), preset("llada-8b"))
  assert len(grid.shapes()) == 86  # grid.py's docstring


def test_token_buckets_two_per_octave():
  assert token_buckets(4096)[:8] == (32, 48, 64, 96, 128, 192, 256, 384)
  for limit in (1, 33, 100, 4096, 5000):
    b = token_buckets(limit)
    assert b[-1] >= limit and (len(b) == 1 or b[-2] < limit)
    assert all(y / x <= 1.5 for x, y in zip(b, b[1:]))


GRID = Grid(max_tokens=2048, max_len_bucket=512, max_refresh_rows=8, max_reuse_rows=16,
            max_block_length=32, shifted=False)


def holds(grid: Grid, s: Shapes, tokens: int, longest: int, n_refresh: int, n_reuse: int):
  if tokens > s.tokens or n_reuse > grid.reuse_rows(s):
    return False
  if n_refresh == 0:
    return True
  return s.length >= longest and n_refresh <= grid.refresh_rows(s) and s.length >= 32


@settings(max_examples=300, deadline=None, derandomize=True)
@given(refresh=st.lists(st.integers(1, 512), max_size=8),
       reuse=st.lists(st.integers(1, 33), max_size=16))
@example(refresh=[300, 5, 5, 5], reuse=[])      # short rows beside a long one: T moves up
@example(refresh=[], reuse=[1] * 16)            # 1-token Reuse rows: T moves up
@example(refresh=[512], reuse=[])
def test_choose_is_the_smallest_bucket_that_holds_the_step(refresh, reuse):
  tokens = sum(refresh) + sum(reuse)
  longest = max(refresh, default=0)
  got = GRID.choose(tokens, longest, len(refresh), len(reuse))
  fitting = [s for s in GRID.shapes() if holds(GRID, s, tokens, longest, len(refresh),
                                                len(reuse))
             and (s.length == 0) == (not refresh)]
  if not fitting:
    assert got is None
    return
  assert got in fitting
  # smallest T, then the smallest N among the buckets of that T
  assert (got.tokens, got.length) == min((s.tokens, s.length) for s in fitting)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(tokens=st.integers(32, 2048))
def test_flat_padding_is_at_most_one_and_a_half(tokens):
  """One row of any length: the T bucket wastes at most half of the real tokens."""
  longest = min(tokens, 512)
  s = GRID.choose(tokens, longest, 1, 0) if tokens <= 512 else GRID.choose(tokens, 0, 0, 1)
  assert s is not None and s.tokens / tokens <= 1.5


def test_layout_sizes_follow_the_documented_rules():
  for s in GRID.shapes():
    br = GRID.refresh_rows(s)
    assert br == (0 if s.length == 0 else min(8, max(1, s.tokens // max(s.length // 2, 16))))
    assert GRID.reuse_rows(s) == min(16, max(1, s.tokens // 4))
    assert GRID.candidates(s, 1) == min(s.tokens, (br + GRID.reuse_rows(s)) * 32)
    assert GRID.candidates(s, 24) % 24 == 0


def test_dream_query_width_has_the_query_only_row():
  grid = Grid.of(EngineConfig(max_block_length=64), preset("dream-7b"))
  assert grid.query_width == 65 and grid.cand_width == 64


def test_lengths_need_rows_that_fit():
  assert GRID.lengths_for(32) == [0, 32]
  assert GRID.lengths_for(48) == [0, 32, 64]          # a 33..48-token row
  assert GRID.lengths_for(64) == [0, 32, 64]          # 128 needs a row of > 64 tokens
  assert GRID.lengths_for(96) == [0, 32, 64, 128]
  assert list(itertools.takewhile(lambda n: n <= 512, GRID.lengths_for(2048)))[-1] == 512


def test_token_buckets_stop_at_what_the_rows_can_feed():
  from dllm_jax.model_config import ModelConfig
  small = preset("bench-small")
  cfg = EngineConfig(token_budget=4096, max_model_len=128, max_refresh_rows=8,
                     max_reuse_rows=8, max_block_length=16, max_running=16)
  grid = Grid.of(cfg, small)
  assert grid.max_tokens == 8 * 128 + 8 * 16  # every row cap filled, under the token budget
  assert grid.tokens[-1] == 1536 and grid.tokens[-2] < 1152
  # max_running caps the rows too; the budget still binds when it is the smaller
  assert Grid.of(cfg.replace(max_running=2), small).max_tokens == 2 * 128 + 2 * 16
  assert Grid.of(cfg.replace(token_budget=100), small).max_tokens == 100
  assert isinstance(small, ModelConfig)
