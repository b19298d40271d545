"""Fused LM head: validated API and dispatch (Pallas kernel on GPU, jnp reference elsewhere).

  fused_lm_head(hidden [R, d], head [d, V], temperature [R], seed [R], step [R], position [R])
    -> FusedOut(token int32 [R], confidence f32 [R], margin [R]|None, entropy [R]|None)

Semantics (the decode head's logit variants): clean logits l = hidden @ head in f32; token = argmax of
l + T*gumbel(seed, step, position, token id), ties to the lowest id; confidence = softmax(l)[token];
margin = p1 - p2 of softmax(l); entropy = sum p log p. ``exclude_id`` (the mask id) is never the
token, but stays in the softmax.

``chunk_rows`` / ``vocab_tile`` size the jnp reference (its live tile is [chunk_rows, vocab_tile]
f32: that is what the budgeter plans). The kernel keeps its tile on chip, so it has its own
``block_rows`` / ``block_vocab`` / ``block_k`` / warps / stages (powers of two, Triton-sized;
per GPU generation and row count from ``tiles.py``) and its XLA temporaries are only the
[vocab_splits, R] partials.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.common import resolve_impl
from pallas_kernels.fused_lm_head import kernel as _kernel
from pallas_kernels.fused_lm_head import tiles
from pallas_kernels.fused_lm_head.reference import fused_lm_head_reference
from pallas_kernels.fused_lm_head.stats import finalize, reduce_stats

# Block sizes come from ``tiles.tile_config`` (per GPU generation and row count); explicit
# arguments override single fields.


class FusedOut(NamedTuple):
  token: jax.Array
  confidence: jax.Array
  margin: jax.Array | None
  entropy: jax.Array | None


def _pow2_floor(n: int) -> int:
  return 1 << (max(int(n), 1).bit_length() - 1)


class Blocks(NamedTuple):
  """The kernel's launch configuration for one problem (all static)."""

  block_rows: int
  block_vocab: int
  block_k: int
  vocab_splits: int
  num_warps: int
  num_stages: int


def kernel_blocks(r: int, d: int, v: int, block_rows: int | None = None,
                  block_vocab: int | None = None, block_k: int | None = None,
                  vocab_splits: int | None = None, *, num_warps: int | None = None,
                  num_stages: int | None = None, itemsize: int = 2,
                  device_kind: str | None = None, core_count: int | None = None) -> Blocks:
  """The kernel's blocks for R x d @ d x V: ``tiles.tile_config`` overridden by explicit args,
  then clamped to the problem.

  block_vocab <= V and block_k <= d (the ragged tails are read at clamped starts); block_rows is
  not shrunk below 16 (tl.dot minimum) except for tiny R. ``vocab_splits=None`` picks enough
  splits for about two waves of programs (``tiles.target_programs``). ``device_kind`` None: the
  default device (its SM count too).
  """
  if device_kind is None:
    device_kind, cc, cores = tiles.local_device()
    core_count = core_count or cores
  else:
    cc = None
  cfg = tiles.tile_config(r, itemsize, device_kind, cc)
  given = dict(block_rows=block_rows, block_vocab=block_vocab, block_k=block_k,
               num_warps=num_warps, num_stages=num_stages)
  cfg = cfg.replace(**{k: x for k, x in given.items() if x is not None})  # validates
  c = cfg.block_rows
  while c > 16 and c // 2 >= r:  # few rows: smaller blocks, less padding
    c //= 2
  tv = min(cfg.block_vocab, _pow2_floor(v))
  bk = min(cfg.block_k, _pow2_floor(d))
  num_tiles = -(-v // tv)
  row_programs = -(-r // c)
  if vocab_splits is None:
    vocab_splits = max(1, min(num_tiles, tiles.target_programs(core_count) // row_programs))
  if vocab_splits < 1:
    raise ValueError(f"vocab_splits: must be >= 1, got {vocab_splits}")
  return Blocks(c, tv, bk, min(vocab_splits, num_tiles), cfg.num_warps, cfg.num_stages)


def _check(hidden, head, temperature, seed, step, position):
  if hidden.ndim != 2 or head.ndim != 2:
    raise ValueError(f"hidden must be [R, d] and head [d, V]; got {hidden.shape}, {head.shape}")
  r, d = hidden.shape
  if head.shape[0] != d:
    raise ValueError(f"head: expected [d={d}, V], got {head.shape}")
  if not jnp.issubdtype(head.dtype, jnp.floating):
    raise ValueError(f"head: expected a float dtype, got {head.dtype}")
  for name, x in (("temperature", temperature), ("seed", seed), ("step", step),
                  ("position", position)):
    if x.shape != (r,):
      raise ValueError(f"{name}: expected shape ({r},), got {x.shape}")
  if r == 0:
    raise ValueError("hidden: R must be >= 1")


@functools.partial(jax.jit, static_argnames=(
    "chunk_rows", "vocab_tile", "want_margin", "want_entropy", "exclude_id", "impl",
    "block_rows", "block_vocab", "block_k", "vocab_splits", "num_warps", "num_stages",
    "device_kind"))
def fused_lm_head(hidden, head, temperature, seed, step, position, *, chunk_rows: int = 1024,
                  vocab_tile: int = 8192, want_margin: bool = False, want_entropy: bool = False,
                  exclude_id: int | None = None, impl: str = "auto",
                  block_rows: int | None = None, block_vocab: int | None = None,
                  block_k: int | None = None, vocab_splits: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None,
                  device_kind: str | None = None) -> FusedOut:
  """See the module docstring. ``impl``: auto | pallas | interpret | reference.

  ``hidden`` is cast to ``head.dtype`` (casting the head would copy it). seed may be int32 or
  uint32 (taken as its 32 bits). ``exclude_id`` (e.g. the mask id) is never returned as the
  token but stays in the softmax. Kernel blocks / warps / stages left None come from
  ``tiles.tile_config`` for R rows on ``device_kind`` (None: the default device).
  """
  _check(hidden, head, temperature, seed, step, position)
  if chunk_rows < 1 or vocab_tile < 1:
    raise ValueError(f"chunk_rows / vocab_tile must be >= 1, got {chunk_rows}, {vocab_tile}")
  impl = resolve_impl(impl)
  if impl == "mosaic":
    raise ValueError("the fused LM head has no Mosaic GPU kernel: use impl='pallas' (or 'auto')")
  hidden = hidden.astype(head.dtype)
  temperature = temperature.astype(jnp.float32)
  seed = seed.astype(jnp.uint32)
  step = step.astype(jnp.int32)
  position = position.astype(jnp.int32)
  if impl == "reference":
    return FusedOut(*fused_lm_head_reference(
        hidden, head, temperature, seed, step, position, chunk_rows=chunk_rows,
        vocab_tile=vocab_tile, want_margin=want_margin, want_entropy=want_entropy,
        exclude_id=exclude_id))
  r, d = hidden.shape
  v = head.shape[1]
  blk = kernel_blocks(r, d, v, block_rows, block_vocab, block_k, vocab_splits,
                      num_warps=num_warps, num_stages=num_stages,
                      itemsize=jnp.dtype(head.dtype).itemsize, device_kind=device_kind)
  c = blk.block_rows
  if impl == "pallas" and min(blk.block_k, blk.block_vocab) < tiles.MIN_DOT:
    raise ValueError(f"the fused LM head kernel needs d and V >= {tiles.MIN_DOT} (tl.dot "
                     f"minimum), got d={d}, V={v}; use impl='reference'")
  rp = -(-r // c) * c
  pad = lambda x: x if rp == r else jnp.pad(x, [(0, rp - r)] + [(0, 0)] * (x.ndim - 1))
  parts = _kernel.fused_lm_head_partials(
      pad(hidden), head, pad(temperature), pad(seed), pad(step), pad(position), block_rows=c,
      block_vocab=blk.block_vocab, block_k=blk.block_k, vocab_splits=blk.vocab_splits,
      want_margin=want_margin, want_entropy=want_entropy, exclude_id=exclude_id,
      num_warps=blk.num_warps, num_stages=blk.num_stages, interpret=impl == "interpret")
  st = reduce_stats(parts)
  st = type(st)(*(x[:r] for x in st))
  return FusedOut(*finalize(st, want_margin, want_entropy))
