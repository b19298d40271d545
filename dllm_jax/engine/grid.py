"""The step's shape grid: few executables, little padding.

One engine step feeds T tokens, packed flat (dllm_jax/model/fused.py): every linear layer, norm
and the MLP run on exactly T tokens, so T is the only size that costs compute, and it is
bucketed finely: two buckets per octave (32, 48, 64, 96, 128, 192, ...), at most 1.5x the real
tokens. Attention reads per-row layouts gathered from the flat tokens; their sizes follow from T
and one more bucket, N (the longest Refresh canvas, a power of two >= 32, or 0 for a step with
no Refresh row):

  Br(T, N) = min(max_refresh_rows, T // max(N / 2, 16))   Refresh layout rows (of N positions)
  Bu(T)    = min(max_reuse_rows, T // 4)                  Reuse layout rows (of Lq queries)
  Lq       = max_block_length (+1 for Dream's query-only row)
  C        = max_block_length                             commit-grid width
  K(T, N)  = min(T, (Br + Bu) * C), a multiple of the     candidate rows the decode head may see
             decode chunk                                 (it runs only ceil(count / chunk)
                                                          chunks at run time)

A step with more Refresh rows than Br(T, N) (short rows beside a long one) or more Reuse rows
than Bu(T) moves up to the next T that holds them; the scheduler never schedules a step that
fits no bucket. Everything else a step varies in (which rows Select, confidence kinds, margin /
entropy, sampling parameters, sparse settings) is a runtime value, and the logit plan is a
function of K. So the engine's executables are exactly the (T, N) pairs of :meth:`Grid.shapes`:
for LLaDA-8B's default EngineConfig (token budget 4096, max_model_len 4096) that is 86.
"""

from __future__ import annotations

import dataclasses
import functools

MIN_TOKENS = 32
MIN_LENGTH = 32
MIN_HALF = 16          # Br counts rows of at least this many tokens in the N = 32 bucket
REUSE_MIN_TOKENS = 4   # Bu(T) assumes Reuse rows of >= 4 tokens (shorter ones move T up)


def pow2_at_least(x: int, lo: int = 1) -> int:
  return max(lo, 1 << max(0, int(x) - 1).bit_length())


def token_buckets(limit: int) -> tuple[int, ...]:
  """32, 48, 64, 96, ... up to the first bucket >= limit (two per octave: waste <= 1.5x)."""
  out, v = [], MIN_TOKENS
  while True:
    for b in (v, v + v // 2):
      out.append(b)
      if b >= limit:
        return tuple(out)
    v *= 2


@dataclasses.dataclass(frozen=True)
class Shapes:
  """One step's bucket: T flat tokens, N the Refresh layout length (0: no Refresh part)."""

  tokens: int
  length: int


@dataclasses.dataclass(frozen=True)
class Grid:
  """Static shape rules of one engine (from its EngineConfig and model: :meth:`of`)."""

  max_tokens: int          # token budget (T never exceeds its bucket)
  max_len_bucket: int      # pow2 >= max_model_len
  max_refresh_rows: int
  max_reuse_rows: int
  max_block_length: int
  shifted: bool            # Dream: one query-only row per Reuse row

  @classmethod
  def of(cls, cfg, mcfg) -> "Grid":
    """The grid of an EngineConfig on a ModelConfig (no model or device needed). The token
    buckets stop at the most a step can feed: the token budget, or every row cap filled."""
    max_len = min(cfg.max_model_len or mcfg.max_position, mcfg.max_position)
    shift = 1 if mcfg.shifted_prediction else 0
    feedable = (min(cfg.max_refresh_rows, cfg.max_running) * max_len
                + min(cfg.max_reuse_rows, cfg.max_running) * (cfg.max_block_length + shift))
    return cls(max_tokens=min(cfg.token_budget, feedable),
               max_len_bucket=pow2_at_least(max_len, MIN_LENGTH),
               max_refresh_rows=cfg.max_refresh_rows, max_reuse_rows=cfg.max_reuse_rows,
               max_block_length=cfg.max_block_length, shifted=mcfg.shifted_prediction)

  @functools.cached_property
  def tokens(self) -> tuple[int, ...]:
    return token_buckets(self.max_tokens)

  @property
  def query_width(self) -> int:
    return self.max_block_length + (1 if self.shifted else 0)

  @property
  def cand_width(self) -> int:
    return self.max_block_length

  def lengths_for(self, t: int) -> list[int]:
    """N buckets a T-token step can have: 0, and each N whose rows (longer than N/2) fit T."""
    out, n = [0], MIN_LENGTH
    while n <= self.max_len_bucket:
      if n == MIN_LENGTH or n // 2 < t:
        out.append(n)
      n *= 2
    return out

  def refresh_rows(self, s: Shapes) -> int:
    if s.length == 0:
      return 0
    return min(self.max_refresh_rows, max(1, s.tokens // max(s.length // 2, MIN_HALF)))

  def reuse_rows(self, s: Shapes) -> int:
    return min(self.max_reuse_rows, max(1, s.tokens // REUSE_MIN_TOKENS))

  def rows(self, s: Shapes) -> int:
    """Rows of the commit grid: the Refresh layout rows, then the Reuse layout rows."""
    return self.refresh_rows(s) + self.reuse_rows(s)

  def candidates(self, s: Shapes, chunk: int) -> int:
    k = min(s.tokens, self.rows(s) * self.cand_width)
    return -(-k // chunk) * chunk

  def shapes(self) -> list[Shapes]:
    """Every executable of the engine, smallest first."""
    return [Shapes(t, n) for t in self.tokens for n in self.lengths_for(t)]

  def choose(self, tokens: int, longest: int, n_refresh: int, n_reuse: int) -> Shapes | None:
    """The smallest bucket holding a step (total tokens, longest Refresh canvas, row counts),
    or None when no bucket does (the scheduler then leaves a row for a later step)."""
    n = pow2_at_least(longest, MIN_LENGTH) if n_refresh else 0
    if n > self.max_len_bucket:
      return None
    for t in self.tokens:
      if t < tokens:
        continue
      s = Shapes(t, n)
      if n and n not in self.lengths_for(t):
        continue
      if n_refresh <= self.refresh_rows(s) and n_reuse <= self.reuse_rows(s):
        return s
    return None
