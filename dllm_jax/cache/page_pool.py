"""Paged storage of the selected sparse K/V, head-centric.

Layout (documented choice): a page holds ``page_size`` tokens of ONE (request, KV head) for
every layer at once — the pool is ``k, v [L, P, S, D]`` and a page id means the same slot range
in every layer plane. Page ids form one space shared by all KV heads, so a request's reserved pages
can be split unevenly between its heads (head-adaptive budgets) and differently per layer.

Device state (:class:`SparseCache`, donated through the jitted step):
- ``k``, ``v``            [L, P, S, D]        page 0 is a dummy page for padding entries;
- ``page_table``          [slots, L, Hkv, MP] pages of (request slot, layer, KV head), token order;
- ``kv_len``              [slots, L, Hkv]     selected tokens of (request slot, layer, KV head).
A running sparse request owns one slot; the tables are written at its Select steps.

Host side: :class:`PageAllocator` reserves a request's whole page budget at admission and frees it
on finish or abort; :class:`SlotAllocator` hands out table slots. Exhaustion returns ``None`` to the
caller (the scheduler queues the request) — never an OOM and never an overwrite.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from dllm_jax.cache.selection import n_keep


@dataclasses.dataclass(frozen=True)
class PoolConfig:
  """Static sizes of the sparse KV pool."""

  num_pages: int          # P, including the dummy page 0
  page_size: int          # S tokens per page
  num_layers: int
  num_kv_heads: int
  head_dim: int
  max_slots: int          # concurrently running sparse requests
  max_pages_per_head: int  # MP: page-table width per (slot, layer, head)
  dtype: str = "float32"
  shards: int = 1         # tensor-parallel devices; num_pages is per device

  def __post_init__(self):
    for f in ("num_pages", "page_size", "num_layers", "num_kv_heads", "head_dim", "max_slots",
              "max_pages_per_head"):
      v = getattr(self, f)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"{f}: expected a positive integer, got {v!r}")
    if self.num_pages < 2:
      raise ValueError("num_pages: need at least 2 (page 0 is the dummy page)")

  @property
  def page_bytes(self) -> int:
    """Bytes of one page id over all layers, K and V."""
    return 2 * self.num_layers * self.page_size * self.head_dim * jnp.dtype(self.dtype).itemsize

  @property
  def pool_bytes(self) -> int:
    """Bytes of the whole pool, all devices."""
    return self.shards * self.num_pages * self.page_bytes


@flax.struct.dataclass
class SparseCache:
  k: jax.Array
  v: jax.Array
  page_table: jax.Array
  kv_len: jax.Array


def init_cache(cfg: PoolConfig) -> SparseCache:
  """The global pool; with ``shards`` devices, device d owns pages [d*P, (d+1)*P) of axis 1 and
  the table entries of its KV heads (axis 2)."""
  shape = (cfg.num_layers, cfg.shards * cfg.num_pages, cfg.page_size, cfg.head_dim)
  return SparseCache(
      k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype),
      page_table=jnp.zeros((cfg.max_slots, cfg.num_layers, cfg.num_kv_heads,
                            cfg.max_pages_per_head), jnp.int32),
      kv_len=jnp.zeros((cfg.max_slots, cfg.num_layers, cfg.num_kv_heads), jnp.int32))


def max_keep(length: int, prompt_len: int, gen_length: int, block_length: int,
             ratio: float) -> int:
  """Largest n_keep over the request's blocks (K = length - Lb; the last block may be short)."""
  best = 0
  for start in range(prompt_len, prompt_len + gen_length, block_length):
    lb = min(block_length, prompt_len + gen_length - start)
    best = max(best, n_keep(length - lb, ratio))
  return best


def pages_needed(keep_max: int, num_kv_heads: int, page_size: int, adaptive: bool) -> int:
  """Pages a sparse request reserves for its whole life.

  Even budgets (shared / per_head): every head holds keep_max tokens -> Hkv * ceil(keep_max / S).
  Adaptive: the same Hkv * keep_max tokens split unevenly; rounding each head up to whole pages
  costs at most one extra page per head -> ceil(Hkv * keep_max / S) + Hkv.
  """
  if keep_max <= 0:
    return 0
  if adaptive:
    return math.ceil(num_kv_heads * keep_max / page_size) + num_kv_heads
  return num_kv_heads * math.ceil(keep_max / page_size)


class PageAllocator:
  """Host allocator of page ids 1..P-1 (page 0 is the dummy). Whole budgets, all or nothing."""

  def __init__(self, num_pages: int):
    if num_pages < 2:
      raise ValueError("num_pages: need at least 2 (page 0 is the dummy page)")
    self.num_pages = num_pages
    self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
    self._owned: dict[object, list[int]] = {}

  @property
  def capacity(self) -> int:
    return self.num_pages - 1

  @property
  def num_free(self) -> int:
    return len(self._free)

  def can_allocate(self, n: int) -> bool:
    return n <= len(self._free)

  def allocate(self, owner, n: int) -> list[int] | None:
    """Reserve n pages for ``owner``; None (and nothing taken) when they are not free."""
    if owner in self._owned:
      raise ValueError(f"{owner!r} already holds pages")
    if n < 0:
      raise ValueError(f"cannot allocate {n} pages")
    if n > len(self._free):
      return None
    pages = [self._free.pop() for _ in range(n)]
    self._owned[owner] = pages
    return pages

  def free(self, owner) -> int:
    pages = self._owned.pop(owner, [])
    self._free.extend(reversed(pages))
    return len(pages)

  def owned(self, owner) -> list[int]:
    return list(self._owned.get(owner, []))


class ShardedPageAllocator:
  """One :class:`PageAllocator` per tensor-parallel device (each device stores the pages of its
  own KV heads, with its own dummy page 0). Allocation is all-or-nothing across devices."""

  def __init__(self, num_pages: int, shards: int = 1):
    self.shards = [PageAllocator(num_pages) for _ in range(shards)]

  @property
  def capacity(self) -> int:
    return self.shards[0].capacity

  @property
  def num_free(self) -> int:
    return min(a.num_free for a in self.shards)

  def can_allocate(self, n: int) -> bool:
    return all(a.can_allocate(n) for a in self.shards)

  def allocate(self, owner, n: int) -> list[list[int]] | None:
    """n pages on every device (per-device page ids), or None and nothing taken."""
    if not self.can_allocate(n):
      return None
    return [a.allocate(owner, n) for a in self.shards]

  def free(self, owner) -> int:
    return sum(a.free(owner) for a in self.shards)


class SlotAllocator:
  """Host allocator of page-table slots (one per running sparse request)."""

  def __init__(self, num_slots: int):
    self.num_slots = num_slots
    self._free = list(range(num_slots - 1, -1, -1))
    self._owned: dict[object, int] = {}

  @property
  def num_free(self) -> int:
    return len(self._free)

  def allocate(self, owner) -> int | None:
    if owner in self._owned:
      raise ValueError(f"{owner!r} already holds a slot")
    if not self._free:
      return None
    slot = self._free.pop()
    self._owned[owner] = slot
    return slot

  def free(self, owner) -> None:
    slot = self._owned.pop(owner, None)
    if slot is not None:
      self._free.append(slot)
