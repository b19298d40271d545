"""How many tokens a request commits at each step under the fixed rule.

LLaDA (per block): a block of n masked tokens decoded in s steps commits ``n // s`` tokens per
step plus one more in each of the first ``n % s`` steps (32 over 5 steps -> 7, 7, 6, 6, 6).
dLLM-Serve's ``ceil(n_masked / steps_remaining)`` gives the same counts.

Dream (block-less): ``timesteps = linspace(1, eps, steps + 1)`` with eps = 1e-3; at step i with m
masked tokens it commits ``int(m * (1 - t[i+1] / t[i]))`` and everything left at the last step.
Here ``1 - t[i+1]/t[i] = 999 / (1000 * steps - 999 * i)`` exactly, so the count is computed in
integers: ``(999 * m) // (1000 * steps - 999 * i)`` (Dream evaluates it in float32, which can
round differently at exact-integer boundaries). Dream averages m over the batch; we use each
row's own m so that a request never depends on its neighbours (batch invariance).
"""

from __future__ import annotations

import jax.numpy as jnp


def llada_count_host(n: int, s: int, j: int) -> int:
  """Host-side LLaDA count at step j of a block of n tokens over s steps."""
  base, rem = divmod(n, s)
  return base + (j < rem)


def llada_block_counts(n: int, s: int) -> list[int]:
  """Host-side LLaDA schedule of one block: n tokens over s steps."""
  return [llada_count_host(n, s, j) for j in range(s)]


def llada_count(block_len, steps_per_block, step_in_block):
  """Per-row jnp version of :func:`llada_block_counts` (int32 arrays [B])."""
  base = block_len // steps_per_block
  return base + (step_in_block < block_len % steps_per_block).astype(base.dtype)


def dream_count(num_masked, steps, step):
  """Per-row Dream count at ``step`` (int32 arrays [B]); all remaining on the last step."""
  denom = 1000 * steps - 999 * step
  k = (999 * num_masked) // jnp.maximum(denom, 1)
  return jnp.where(step >= steps - 1, num_masked, k)


def dream_counts_host(num_masked: int, steps: int, step: int) -> int:
  """Plain-int version, for tests and the host."""
  if step >= steps - 1:
    return num_masked
  return (999 * num_masked) // (1000 * steps - 999 * step)
