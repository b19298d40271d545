"""A thin wrapper around ``transformers.PreTrainedTokenizerFast`` loaded from a model directory.

The directory holds ``tokenizer.json`` (+ ``tokenizer_config.json`` with the special-token roles
and the chat template), as HF model repos and the bundled demo model do. Only the fast tokenizer is
used: no remote code, no torch.
"""

from __future__ import annotations

import os
from typing import Sequence

from dllm_jax import jsonfile

# End-of-turn token names of the supported families, tried when the config names none:
# LLaDA <|eot_id|>, Dream (Qwen ChatML) <|im_end|>, the demo model <|eot|>.
_EOT_NAMES = ("<|eot_id|>", "<|im_end|>", "<|eot|>")


class Tokenizer:
  """Text <-> ids, the chat template, and the ids the decoder needs (mask, eos, eot, pad)."""

  def __init__(self, hf_tokenizer, config: dict | None = None, path: str = ""):
    self.hf = hf_tokenizer
    self.path = path
    self._config = dict(config or {})

  # Ids ----------------------------------------------------------------------------------------
  def _id(self, token: str | None) -> int | None:
    if token is None:
      return None
    i = self.hf.convert_tokens_to_ids(token)
    return i if isinstance(i, int) and i != self.hf.unk_token_id else None

  @property
  def mask_token_id(self) -> int | None:
    return self.hf.mask_token_id

  @property
  def eos_token_id(self) -> int | None:
    return self.hf.eos_token_id

  @property
  def pad_token_id(self) -> int | None:
    return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_token_id

  @property
  def bos_token_id(self) -> int | None:
    return self.hf.bos_token_id

  @property
  def eot_token_id(self) -> int | None:
    """End of turn: the config's ``eot_token`` if set, else a known family name, else None."""
    named = self._config.get("eot_token")
    if isinstance(named, dict):  # AddedToken serialisation
      named = named.get("content")
    if named:
      return self._id(named)
    vocab = self.hf.get_vocab()
    for name in _EOT_NAMES:
      if name in vocab:
        return vocab[name]
    return None

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (base vocabulary + added tokens)."""
    return len(self.hf)

  # Text ---------------------------------------------------------------------------------------
  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Ids of ``text``. Special tokens are added only if the tokenizer's own config adds them
    (its post-processor); the demo tokenizer adds none."""
    return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens,
                          clean_up_tokenization_spaces=False)

  def apply_chat_template(self, messages: str | Sequence[dict]) -> str:
    """The prompt text for ``messages`` (a user string or [{role, content}]), ending with the
    generation prompt (``add_generation_prompt=True``)."""
    if isinstance(messages, str):
      messages = [{"role": "user", "content": messages}]
    if not self.hf.chat_template:
      raise ValueError(f"{self.path or 'tokenizer'}: tokenizer_config.json has no chat_template")
    return self.hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

  def encode_chat(self, messages: str | Sequence[dict]) -> list[int]:
    """Ids of the chat prompt. The template writes BOS itself, so nothing is added here."""
    return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

  def __repr__(self) -> str:
    return (f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"mask={self.mask_token_id}, eos={self.eos_token_id}, eot={self.eot_token_id}, "
            f"pad={self.pad_token_id})")


def _fast_tokenizer_class():
  """``transformers.PreTrainedTokenizerFast``, imported lazily (a slow import) and without the
  "PyTorch was not found" advisory transformers logs at its first import: the engine runs on JAX
  and never needs torch. The advisory switch is set only around the import, so the user's other
  transformers advisories and every other library's logging are left as they were."""
  key = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
  saved = os.environ.get(key)
  os.environ[key] = "1"
  try:
    from transformers import PreTrainedTokenizerFast
  finally:
    if saved is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = saved
  return PreTrainedTokenizerFast


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Load ``tokenizer.json`` (+ ``tokenizer_config.json``) from a model directory.

  Raises FileNotFoundError for a missing directory or tokenizer.json, ValueError for files that
  cannot be parsed.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory not found: {path}")
  if not os.path.isfile(os.path.join(path, "tokenizer.json")):
    raise FileNotFoundError(f"no tokenizer.json in {path}")
  config: dict = {}
  cfg_path = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(cfg_path):
    config = jsonfile.read_object(cfg_path)
  try:
    hf = _fast_tokenizer_class().from_pretrained(path)
  except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on bad JSON
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path}: could not load tokenizer ({msg})") from None
  return Tokenizer(hf, config, path)
