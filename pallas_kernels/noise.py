"""Counter-based noise: a pure function of (seed, step, position, lane).

A request's random numbers never depend on its batch, its padding, the logit variant or the order
the scheduler ran it in: that is what makes decoding batch-invariant and golden-testable.

The hash ``h`` is four rounds of Chris Wellons' ``lowbias32`` integer mixer, one round per input:

    mix(x) = x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
    h = mix(mix(mix(mix(seed ^ 0x9e3779b9) ^ step) ^ position) ^ lane)

all in uint32 arithmetic (wrapping multiplies). The uniform is ``u = ((h >> 9) + 0.5) * 2**-23``:
23 random bits, exactly representable in float32 and strictly inside (0, 1) (24 bits would round
to 1.0 and give infinite Gumbel noise).

``lane`` is the token id for Gumbel noise and ``vocab_size`` for the ``random`` confidence.
Only uint32 multiplies, xors and shifts are used, so a Pallas kernel computes the same bits.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B9
_M1 = 0x7FEB352D
_M2 = 0x846CA68B


def _mix(x, xp):
  x = x ^ (x >> xp.uint32(16))
  x = x * xp.uint32(_M1)
  x = x ^ (x >> xp.uint32(15))
  x = x * xp.uint32(_M2)
  x = x ^ (x >> xp.uint32(16))
  return x


def _u32(x, xp):
  if xp is np:
    return np.asarray(x).astype(np.int64).astype(np.uint32)
  return jnp.asarray(x).astype(jnp.uint32)


def hash32(seed, step, position, lane, xp=jnp):
  """uint32 hash of four integer arrays (broadcast together). ``xp`` is ``jnp`` or ``np``."""
  with np.errstate(over="ignore"):
    h = _mix(_u32(seed, xp) ^ xp.uint32(_GOLDEN), xp)
    h = _mix(h ^ _u32(step, xp), xp)
    h = _mix(h ^ _u32(position, xp), xp)
    h = _mix(h ^ _u32(lane, xp), xp)
  return h


def uniform(seed, step, position, lane, xp=jnp):
  """float32 uniform in the open interval (0, 1)."""
  h = hash32(seed, step, position, lane, xp)
  return ((h >> xp.uint32(9)).astype(xp.float32) + xp.float32(0.5)) * xp.float32(2.0**-23)


def gumbel(seed, step, position, lane, xp=jnp):
  """Standard Gumbel noise g = -log(-log u), float32, always finite."""
  u = uniform(seed, step, position, lane, xp)
  return -xp.log(-xp.log(u))
