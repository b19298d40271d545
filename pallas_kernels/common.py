"""Helpers shared by the Pallas GPU kernels: backend choice, Triton params, cuda-lowering probe,
the CPU paths' loop over the rows in use."""

from __future__ import annotations

import warnings

import jax
from jax.experimental.pallas import triton as pltr

from pallas_kernels.impls import KERNEL_IMPLS

# Large finite negative used for masked scores: (-inf) - (-inf) would be NaN in an online softmax.
MASK_VALUE = -0.7 * float(jax.numpy.finfo(jax.numpy.float32).max)


def triton_params(num_warps: int = 4, num_stages: int = 2) -> pltr.CompilerParams:
  """Explicit Triton compiler params.

  JAX 0.10 lowers a bare ``pallas_call`` on GPU to Mosaic GPU, JAX 0.11 to Triton; passing these
  makes a kernel mean the same thing on both.
  """
  return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def resolve_impl(impl: str) -> str:
  """'auto' -> 'pallas' on a GPU, 'reference' elsewhere. Explicit choices pass through
  ('callback' is test-only and only some kernels have it)."""
  if impl not in KERNEL_IMPLS:
    raise ValueError(f"impl: expected one of {'|'.join(KERNEL_IMPLS)}, got {impl!r}")
  if impl == "auto":
    return "pallas" if on_gpu() else "reference"
  return impl


def for_each_used(used: jax.Array, body, init):
  """``body(b, carry) -> carry`` over the indices b with ``used[b]`` (bool [B]), in index order,
  as a loop with a traced trip count: the unused (padding) entries of a bucket cost nothing.
  What the CPU paths use to run only the rows a step really has."""
  order = jax.numpy.argsort(~used, stable=True).astype(jax.numpy.int32)
  return jax.lax.fori_loop(0, jax.numpy.sum(used), lambda i, carry: body(order[i], carry), init)


def is_power_of_two(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def cuda_lowering_text(fn, *arg_specs) -> str:
  """Lower ``fn`` for the 'cuda' platform on this (possibly CPU-only) machine; return the text.

  Runs the Pallas -> Triton-IR lowering without a GPU, so non-power-of-two shapes and
  unsupported primitives fail here. Raises whatever the lowering raises.
  """
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    lowered = jax.jit(fn).trace(*arg_specs).lower(lowering_platforms=("cuda",))
    return lowered.as_text()
