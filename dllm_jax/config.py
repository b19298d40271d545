"""Static configuration: ModelConfig parsed straight from a HF ``config.json``.

No ``AutoConfig`` and no remote code: both families' field names are read here, validated, and
frozen. A missing or inconsistent field raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from pallas_kernels.impls import KERNEL_IMPLS

FAMILIES = ("llada", "dream")

# Ids a HF config does not carry (EoT, BOS, ...) live in this block of our presets and of the
# bundled model's config.json. Values from the public tokenizers (offline-setup-notes.md §2).
EXTRA_IDS_KEY = "dllm_jax_token_ids"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and token ids of one LLaDA- or Dream-family model.

  ``vocab_size`` is the number of LM-head / embedding rows (LLaDA's ``embedding_size``).
  """

  family: str
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  vocab_size: int
  max_position: int
  rope_theta: float
  rms_norm_eps: float
  mask_token_id: int
  eos_token_id: int
  pad_token_id: int
  eot_token_id: int | None = None
  bos_token_id: int | None = None
  name: str = ""

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"family: expected one of {FAMILIES}, got {self.family!r}")
    for f in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
              "vocab_size", "max_position"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{f}: expected a positive integer, got {v!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"num_heads: {self.num_heads} heads do not divide hidden_size "
                       f"{self.hidden_size}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads: {self.num_kv_heads} KV heads do not divide num_heads "
                       f"{self.num_heads}")
    if self.head_dim % 2:
      raise ValueError(f"num_heads: head_dim {self.head_dim} must be even for rotate-half RoPE")
    if not self.rope_theta > 0:
      raise ValueError(f"rope_theta: must be > 0, got {self.rope_theta!r}")
    if not self.rms_norm_eps > 0:
      raise ValueError(f"rms_norm_eps: must be > 0, got {self.rms_norm_eps!r}")
    for f in ("mask_token_id", "eos_token_id", "pad_token_id", "eot_token_id", "bos_token_id"):
      v = getattr(self, f)
      if v is None and f in ("eot_token_id", "bos_token_id"):
        continue
      if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.vocab_size:
        raise ValueError(f"{f}: expected an id in [0, vocab_size={self.vocab_size}), got {v!r}")

  # Derived quantities -----------------------------------------------------------------------
  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def group_size(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def qkv_bias(self) -> bool:
    """Dream (Qwen2) has q/k/v biases; LLaDA has no bias anywhere."""
    return self.family == "dream"

  @property
  def shifted_prediction(self) -> bool:
    """Dream predicts token i from hidden row i-1 (the caller applies the shift)."""
    return self.family == "dream"

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Ids that end a generation: eos and, when known, end-of-turn."""
    ids = [self.eos_token_id]
    if self.eot_token_id is not None and self.eot_token_id not in ids:
      ids.append(self.eot_token_id)
    return tuple(ids)

  def num_params(self) -> int:
    """Exact parameter count (analytic; equals the real checkpoints' counts)."""
    d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
    q = self.num_heads * hd
    kv = self.num_kv_heads * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
    if self.qkv_bias:
      per_layer += q + 2 * kv
    return 2 * v * d + self.num_layers * per_layer + d

  def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
    """K and V bytes of one token over all layers."""
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

  # Parsing ----------------------------------------------------------------------------------
  @classmethod
  def from_dict(cls, d: Mapping[str, Any], name: str = "") -> "ModelConfig":
    return _parse(d, name)

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
    p = os.fspath(path)
    if os.path.isdir(p):
      p = os.path.join(p, "config.json")
    try:
      with open(p) as fh:
        d = json.load(fh)
    except FileNotFoundError:
      raise FileNotFoundError(f"no config.json at {p}") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
      raise ValueError(f"{p}: expected a JSON object")
    return _parse(d, name=os.path.basename(os.path.dirname(os.path.abspath(p))))

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF config.json fields of this family (plus our extra-ids block)."""
    if self.family == "llada":
      d = {
          "model_type": "llada", "architectures": ["LLaDAModelLM"],
          "d_model": self.hidden_size, "n_layers": self.num_layers, "n_heads": self.num_heads,
          "n_kv_heads": self.num_kv_heads, "mlp_hidden_size": self.intermediate_size,
          "vocab_size": self.vocab_size, "embedding_size": self.vocab_size,
          "max_sequence_length": self.max_position, "rope_theta": self.rope_theta,
          "rms_norm_eps": self.rms_norm_eps, "mask_token_id": self.mask_token_id,
          "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
          "weight_tying": False, "include_bias": False, "include_qkv_bias": False,
          "block_type": "llama", "activation_type": "silu",
      }
    else:
      d = {
          "model_type": "Dream", "architectures": ["DreamModel"],
          "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
          "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
          "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size,
          "max_position_embeddings": self.max_position, "rope_theta": self.rope_theta,
          "rms_norm_eps": self.rms_norm_eps, "mask_token_id": self.mask_token_id,
          "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
          "tie_word_embeddings": False, "hidden_act": "silu",
      }
    extra = {}
    if self.eot_token_id is not None:
      extra["eot_token_id"] = self.eot_token_id
    if self.bos_token_id is not None:
      extra["bos_token_id"] = self.bos_token_id
    if extra:
      d[EXTRA_IDS_KEY] = extra
    return d


_LLADA_KEYS = dict(hidden_size="d_model", num_layers="n_layers", num_heads="n_heads",
                   intermediate_size="mlp_hidden_size", max_position="max_sequence_length")
_DREAM_KEYS = dict(hidden_size="hidden_size", num_layers="num_hidden_layers",
                   num_heads="num_attention_heads", intermediate_size="intermediate_size",
                   max_position="max_position_embeddings")


def _family_of(d: Mapping[str, Any]) -> str:
  mt = d.get("model_type")
  if isinstance(mt, str) and mt.lower() == "llada":
    return "llada"
  if isinstance(mt, str) and mt.lower() in ("dream", "qwen2"):
    return "dream"
  if mt is None:
    if "d_model" in d:
      return "llada"
    if "hidden_size" in d:
      return "dream"
  raise ValueError(f"model_type: expected 'llada' or 'Dream', got {mt!r}")


def _get(d: Mapping[str, Any], key: str, kind: type, default: Any = dataclasses.MISSING):
  if key not in d or d[key] is None:
    if default is dataclasses.MISSING:
      raise ValueError(f"{key}: missing from config.json")
    return default
  v = d[key]
  if kind is int:
    if isinstance(v, bool) or not isinstance(v, int):
      raise ValueError(f"{key}: expected an integer, got {v!r}")
  elif kind is float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise ValueError(f"{key}: expected a number, got {v!r}")
    v = float(v)
  return v


def _parse(d: Mapping[str, Any], name: str) -> ModelConfig:
  family = _family_of(d)
  keys = _LLADA_KEYS if family == "llada" else _DREAM_KEYS
  kw: dict[str, Any] = {k: _get(d, src, int) for k, src in keys.items()}
  kv_key = "n_kv_heads" if family == "llada" else "num_key_value_heads"
  kw["num_kv_heads"] = _get(d, kv_key, int, kw["num_heads"])
  if family == "llada":
    vocab = _get(d, "vocab_size", int)
    emb = _get(d, "embedding_size", int, vocab)
    if emb < vocab:
      raise ValueError(f"embedding_size: {emb} is smaller than vocab_size {vocab}")
    kw["vocab_size"] = emb
    for flag in ("weight_tying", "include_bias", "include_qkv_bias"):
      if d.get(flag):
        raise ValueError(f"{flag}: true is not supported (LLaDA checkpoints have it false)")
  else:
    kw["vocab_size"] = _get(d, "vocab_size", int)
    if d.get("tie_word_embeddings"):
      raise ValueError("tie_word_embeddings: true is not supported (Dream's head is untied)")
    if d.get("rope_scaling"):
      raise ValueError("rope_scaling: RoPE scaling is not supported")
  kw["rope_theta"] = _get(d, "rope_theta", float)
  kw["rms_norm_eps"] = _get(d, "rms_norm_eps", float)
  kw["mask_token_id"] = _get(d, "mask_token_id", int)
  kw["eos_token_id"] = _get(d, "eos_token_id", int)
  kw["pad_token_id"] = _get(d, "pad_token_id", int, kw["eos_token_id"])
  extra = d.get(EXTRA_IDS_KEY) or {}
  if not isinstance(extra, dict):
    raise ValueError(f"{EXTRA_IDS_KEY}: expected an object")
  kw["eot_token_id"] = _get(extra, "eot_token_id", int, None)
  kw["bos_token_id"] = _get(extra, "bos_token_id", int, d.get("bos_token_id"))
  return ModelConfig(family=family, name=name, **kw)


# Sampling ------------------------------------------------------------------------------------

CONFIDENCE_KINDS = ("low_confidence", "random", "margin", "entropy")
RULES = ("fixed", "threshold", "factor")
SCHEDULES = ("llada", "dream")

_SAMPLING_DEFAULTS: dict[str, Any] = dict(
    gen_length=128, steps=None, block_length=32, temperature=0.0, confidence="low_confidence",
    rule="fixed", threshold=0.9, factor=1.0, schedule="llada", seed=0, stop_on_eos=True)


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
    given = dict(gen_length=gen_length, steps=steps, block_length=block_length,
                 temperature=temperature, confidence=confidence, rule=rule, threshold=threshold,
                 factor=factor, schedule=schedule, seed=seed, stop_on_eos=stop_on_eos)
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
    def _int(name, lo=1):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
    _int("gen_length")
    _int("steps")
    _int("block_length")
    _int("seed", 0)
    if self.seed >= 2**32:
      raise ValueError(f"seed: expected an integer in [0, 2**32), got {self.seed}")
    if self.confidence not in CONFIDENCE_KINDS:
      raise ValueError(f"confidence: expected one of {CONFIDENCE_KINDS}, got {self.confidence!r}")
    if self.rule not in RULES:
      raise ValueError(f"rule: expected one of {RULES}, got {self.rule!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
    if not isinstance(self.stop_on_eos, bool):
      raise ValueError(f"stop_on_eos: expected true or false, got {self.stop_on_eos!r}")
    for name in ("temperature", "threshold", "factor"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise ValueError(f"{name}: expected a number, got {v!r}")
      object.__setattr__(self, name, float(v))
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


# Sparse caching --------------------------------------------------------------------------------

SELECTION_MODES = ("shared", "per_head", "per_head_adaptive")
MAX_POOL_KERNEL = 15


@dataclasses.dataclass(frozen=True)
class SparseConfig:
  """Sparse caching knobs (defaults as the reference: keep 0.5, max-pool 3, delay 1); the
  state machine they drive is dllm_jax/cache/sparse_state.py.

  selection: "per_head" (head-centric, default), "shared" (one token set for all heads, the
  Sparse-dLLM baseline) or "per_head_adaptive" (per-head budgets from score spread).
  """

  enabled: bool = True
  keep_ratio: float = 0.5
  pool_kernel: int = 3
  delay: int = 1
  selection: str = "per_head"

  def __post_init__(self):
    if not isinstance(self.enabled, bool):
      raise ValueError(f"enabled: expected true or false, got {self.enabled!r}")
    r = self.keep_ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
      raise ValueError(f"keep_ratio: must be in [0, 1], got {r!r}")
    object.__setattr__(self, "keep_ratio", float(r))
    for f, lo in (("pool_kernel", 1), ("delay", 0)):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{f}: expected an integer >= {lo}, got {v!r}")
    if self.pool_kernel > MAX_POOL_KERNEL:
      raise ValueError(f"pool_kernel: at most {MAX_POOL_KERNEL}, got {self.pool_kernel}")
    if self.selection not in SELECTION_MODES:
      raise ValueError(f"selection: expected one of {SELECTION_MODES}, got {self.selection!r}")

  @property
  def adaptive(self) -> bool:
    return self.selection == "per_head_adaptive"


# Engine --------------------------------------------------------------------------------------

SCHEDULERS = ("phase", "fcfs", "static")
LOGIT_VARIANTS = ("auto", "full", "rows", "row_chunked", "vocab_tiled")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Serving knobs. Each technique of the paper is one switch:

  - ``logits``: "auto" (the budgeter's choice within ``activation_budget_bytes``) or a forced
    variant; "full" is the no-budgeting baseline;
  - ``scheduler``: "phase" (phase-multiplexed, default), "fcfs" (the reference's token-budget
    FCFS) or "static" (a batch runs to completion before the next is admitted);
  - ``sparse``: the SparseConfig given to requests that do not bring their own (None = dense);
    its ``selection`` switches head-centric ("per_head") vs "shared" selection.

  Memory: ``memory_budget_bytes`` (if set) is what weights + KV pool + activation peak may use on
  any backend, per device; the KV pool gets what is left (``num_pages``, per device, overrides
  it). ``tp``: tensor-parallel devices (dllm_jax/parallel.py).
  """

  max_running: int = 32
  token_budget: int = 4096
  max_model_len: int | None = None
  scheduler: str = "phase"
  logits: str = "auto"
  chunk_rows: int | None = None
  vocab_tile: int | None = None
  activation_budget_bytes: int | None = None
  memory_budget_bytes: int | None = None
  num_pages: int | None = None
  page_size: int = 64
  max_block_length: int = 128
  max_refresh_rows: int = 16
  max_reuse_rows: int = 32
  sparse: SparseConfig | None = None
  attn_impl: str = "auto"
  max_waiting: int = 1024
  aging_steps: int = 8
  tp: int = 1

  def __post_init__(self):
    for f in ("tp", "max_running", "token_budget", "page_size", "max_block_length", "max_refresh_rows",
              "max_reuse_rows", "max_waiting", "aging_steps"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{f}: expected a positive integer, got {v!r}")
    for f in ("max_model_len", "chunk_rows", "vocab_tile", "activation_budget_bytes",
              "memory_budget_bytes", "num_pages"):
      v = getattr(self, f)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"{f}: expected a positive integer or null, got {v!r}")
    if self.num_pages is not None and self.num_pages < 2:
      raise ValueError("num_pages: need at least 2 (page 0 is the dummy page)")
    if self.scheduler not in SCHEDULERS:
      raise ValueError(f"scheduler: expected one of {SCHEDULERS}, got {self.scheduler!r}")
    if self.logits not in LOGIT_VARIANTS:
      raise ValueError(f"logits: expected one of {LOGIT_VARIANTS}, got {self.logits!r}")
    if self.attn_impl not in KERNEL_IMPLS:
      raise ValueError(f"attn_impl: expected one of {KERNEL_IMPLS}, got {self.attn_impl!r}")
    if self.page_size & (self.page_size - 1) or self.page_size < 16:
      raise ValueError(f"page_size: must be a power of two >= 16 (Triton), got {self.page_size}")
    if self.sparse is not None and not isinstance(self.sparse, SparseConfig):
      raise ValueError(f"sparse: expected a SparseConfig or None, got {type(self.sparse).__name__}")

  def replace(self, **kw) -> "EngineConfig":
    return dataclasses.replace(self, **kw)
