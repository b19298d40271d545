"""ModelConfig: the architecture and token ids of one model, parsed straight from a HF ``config.json``.

No ``AutoConfig`` and no remote code: both families' field names are read here, validated, and
frozen. A missing or inconsistent field raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from dllm_jax import checks, jsonfile

FAMILIES = ("llada", "dream")

# Ids a HF config does not carry (end-of-turn, BOS) live in this block of our presets and of the
# bundled model's config.json; the values are those of the public tokenizers (LLaDA-8B-Instruct:
# <|eot_id|> 126348, <|startoftext|> 126080; Dream: <|im_end|> 151645, <|beginoftext|> 151665).
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
    checks.require_choice("family", self.family, FAMILIES)
    checks.require_ints(self, ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                               "intermediate_size", "vocab_size", "max_position"))
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
      d = jsonfile.read_object(p)
    except FileNotFoundError:
      raise FileNotFoundError(f"no config.json at {p}") from None
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
