"""SamplingParams: how one request is decoded (frozen, validated), and its option value lists.

The field names are defined once here (:data:`SAMPLING_FIELDS`); the CLI's flags, the server's
request fields and the workload traces take them from this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from dllm_jax import checks

CONFIDENCE_KINDS = ("low_confidence", "random", "margin", "entropy")
RULES = ("fixed", "threshold", "factor")
SCHEDULES = ("llada", "dream")

_SAMPLING_DEFAULTS: dict[str, Any] = dict(
    gen_length=128, steps=None, block_length=32, temperature=0.0, confidence="low_confidence",
    rule="fixed", threshold=0.9, factor=1.0, schedule="llada", seed=0, stop_on_eos=True)
# Every SamplingParams field a caller may set, in signature order.
SAMPLING_FIELDS: tuple[str, ...] = tuple(_SAMPLING_DEFAULTS)


@dataclasses.dataclass(frozen=True, init=False)
class SamplingParams:
  """How one request is decoded. Frozen and validated at construction.

  Defaults: gen_length 128, steps = gen_length, block_length 32, temperature 0.0,
  confidence "low_confidence" (also random / margin / entropy), rule "fixed" (also threshold with
  threshold 0.9 as Fast-dLLM, factor with factor 1.0), schedule "llada" (also "dream"), seed 0,
  stop_on_eos True. Fields the caller leaves unset can be filled from a model's
  generation_config.json with :meth:`with_defaults`.

  steps > gen_length: LLaDA's own per-block schedule then has (steps - gen_length) trailing
  steps that commit nothing; those no-op forwards are skipped (``effective_steps`` is clamped to
  gen_length), which gives LLaDA's tokens at T = 0. The Dream schedule keeps every step.
  """

  gen_length: int
  steps: int
  block_length: int
  temperature: float
  confidence: str
  rule: str
  threshold: float
  factor: float
  schedule: str
  seed: int
  stop_on_eos: bool
  explicit: frozenset = dataclasses.field(default=frozenset(), repr=False, compare=False)

  def __init__(self, gen_length=None, steps=None, block_length=None, temperature=None,
               confidence=None, rule=None, threshold=None, factor=None, schedule=None, seed=None,
               stop_on_eos=None):
    args = locals()  # the signature spells SAMPLING_FIELDS out (for callers' tools)
    given = {k: args[k] for k in SAMPLING_FIELDS}
    explicit = frozenset(k for k, v in given.items() if v is not None)
    values = {k: (v if v is not None else _SAMPLING_DEFAULTS[k]) for k, v in given.items()}
    gen, block = values["gen_length"], values["block_length"]
    if "block_length" not in explicit and isinstance(gen, int) and isinstance(block, int):
      # An unset block length follows the request: the whole canvas for Dream's block-less
      # schedule, and never longer than the generation itself.
      if values["schedule"] == "dream" or gen < block:
        values["block_length"] = gen
    if values["steps"] is None:
      values["steps"] = values["gen_length"]
    for k, v in values.items():
      object.__setattr__(self, k, v)
    object.__setattr__(self, "explicit", explicit)
    self._validate()

  def with_defaults(self, defaults: Mapping[str, Any]) -> "SamplingParams":
    """Fill the fields the caller left unset from ``defaults`` (e.g. generation_config.json)."""
    kw = {k: getattr(self, k) for k in self.explicit}
    for k, v in defaults.items():  # other keys (e.g. HF's own) are not ours to interpret
      if k not in _SAMPLING_DEFAULTS or k in self.explicit or v is None:
        continue
      if k in ("steps", "block_length") and "gen_length" in self.explicit:
        continue  # a caller's gen_length implies its own steps / block defaults
      kw[k] = v
    out = SamplingParams(**kw)
    object.__setattr__(out, "explicit", self.explicit)
    return out

  def replace(self, **changes) -> "SamplingParams":
    kw = {k: getattr(self, k) for k in self.explicit}
    kw.update(changes)
    if "gen_length" in changes and "steps" not in changes and "steps" not in self.explicit:
      kw.pop("steps", None)
    return SamplingParams(**kw)

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def effective_steps(self) -> int:
    """Forward passes the fixed rule runs (see the class docstring for steps > gen_length)."""
    if self.schedule == "llada" and self.steps > self.gen_length:
      return self.gen_length
    return self.steps

  @property
  def steps_per_block(self) -> int:
    return self.effective_steps // self.num_blocks

  def _validate(self):
    checks.require_ints(self, ("gen_length", "steps", "block_length"))
    checks.require_int("seed", self.seed, 0)
    if self.seed >= 2**32:
      raise ValueError(f"seed: expected an integer in [0, 2**32), got {self.seed}")
    checks.require_choice("confidence", self.confidence, CONFIDENCE_KINDS)
    checks.require_choice("rule", self.rule, RULES)
    checks.require_choice("schedule", self.schedule, SCHEDULES)
    checks.require_bool("stop_on_eos", self.stop_on_eos)
    for name in ("temperature", "threshold", "factor"):
      object.__setattr__(self, name, checks.require_number(name, getattr(self, name)))
    if self.temperature < 0:
      raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
    if not 0.0 < self.threshold <= 1.0:
      raise ValueError(f"threshold: must be in (0, 1], got {self.threshold}")
    if not self.factor > 0:
      raise ValueError(f"factor: must be > 0, got {self.factor}")
    if self.gen_length % self.block_length:
      raise ValueError(
          f"gen_length ({self.gen_length}) must be a multiple of block_length "
          f"({self.block_length}); e.g. set block_length={_divisor_near(self.gen_length, self.block_length)}"
          f" or gen_length={-(-self.gen_length // self.block_length) * self.block_length}")
    if self.schedule == "dream":
      if self.block_length != self.gen_length:
        raise ValueError(
            f"schedule 'dream' is block-less: block_length ({self.block_length}) must equal "
            f"gen_length ({self.gen_length}); set block_length={self.gen_length}")
    elif self.rule == "fixed" and self.steps % self.num_blocks:
      nb = self.num_blocks
      raise ValueError(
          f"steps ({self.steps}) must be a multiple of the number of blocks "
          f"gen_length/block_length = {nb} for the fixed rule; e.g. steps="
          f"{max(nb, self.steps // nb * nb)}")


def _divisor_near(n: int, target: int) -> int:
  """The divisor of n closest to target (O(sqrt n), so huge values stay cheap)."""
  divisors = set()
  d = 1
  while d * d <= n:
    if n % d == 0:
      divisors.update((d, n // d))
    d += 1
  return min(divisors, key=lambda x: (abs(x - target), x))
