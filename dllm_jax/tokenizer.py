"""The tokenizer of a model directory: HF ``tokenizers`` for text <-> ids, transformers' renderer
for the chat template.

The directory holds ``tokenizer.json`` (+ ``tokenizer_config.json`` with the special-token roles
and the chat template, optionally ``special_tokens_map.json``), as HF model repos and the bundled
demo model do. Encoding and decoding run on the ``tokenizers`` library itself (what
``transformers.PreTrainedTokenizerFast`` wraps): importing transformers costs most of a second,
and a plain ``generate`` never needs it. The chat template is rendered by transformers' own
``apply_chat_template`` (its sandboxed jinja2 environment, exact HF semantics), built on first
use only. No remote code, no torch.
"""

from __future__ import annotations

import os
from typing import Sequence

from dllm_jax import jsonfile

# End-of-turn token names of the supported families, tried when the config names none:
# LLaDA <|eot_id|>, Dream (Qwen ChatML) <|im_end|>, the demo model <|eot|>.
_EOT_NAMES = ("<|eot_id|>", "<|im_end|>", "<|eot|>")
_ROLES = ("bos_token", "eos_token", "pad_token", "mask_token", "unk_token", "eot_token")


def _content(token) -> str | None:
  """A special token from a config: a string, or an AddedToken serialisation ({"content": ...})."""
  if isinstance(token, dict):
    token = token.get("content")
  return token if isinstance(token, str) and token else None


class Tokenizer:
  """Text <-> ids, the chat template, and the ids the decoder needs (mask, eos, eot, pad)."""

  def __init__(self, tokenizer, config: dict | None = None, path: str = ""):
    self.backend = tokenizer  # a tokenizers.Tokenizer
    self.path = path
    self.config = dict(config or {})
    self.chat_template = self.config.get("chat_template") or None
    self._hf = None  # transformers' tokenizer, built by the first apply_chat_template

  # Ids ----------------------------------------------------------------------------------------
  def token_id(self, token: str | None) -> int | None:
    """The id of one token string (special or not), or None when the vocabulary lacks it."""
    return None if token is None else self.backend.token_to_id(token)

  def _role_id(self, role: str) -> int | None:
    return self.token_id(_content(self.config.get(role)))

  @property
  def mask_token_id(self) -> int | None:
    return self._role_id("mask_token")

  @property
  def eos_token_id(self) -> int | None:
    return self._role_id("eos_token")

  @property
  def pad_token_id(self) -> int | None:
    pad = self._role_id("pad_token")
    return pad if pad is not None else self.eos_token_id

  @property
  def bos_token_id(self) -> int | None:
    return self._role_id("bos_token")

  @property
  def eot_token_id(self) -> int | None:
    """End of turn: the config's ``eot_token`` if set, else a known family name, else None."""
    if _content(self.config.get("eot_token")):
      return self._role_id("eot_token")
    for name in _EOT_NAMES:
      i = self.token_id(name)
      if i is not None:
        return i
    return None

  @property
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can produce (base vocabulary + added tokens)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  # Text ---------------------------------------------------------------------------------------
  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Ids of ``text``. Special tokens are added only if the tokenizer's own config adds them
    (its post-processor); the demo tokenizer adds none."""
    return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: str | Sequence[dict]) -> str:
    """The prompt text for ``messages`` (a user string or [{role, content}]), ending with the
    generation prompt (``add_generation_prompt=True``), rendered by transformers."""
    if isinstance(messages, str):
      messages = [{"role": "user", "content": messages}]
    if not self.chat_template:
      raise ValueError(f"{self.path or 'tokenizer'}: tokenizer_config.json has no chat_template")
    return self._transformers().apply_chat_template(list(messages), tokenize=False,
                                                    add_generation_prompt=True)

  def encode_chat(self, messages: str | Sequence[dict]) -> list[int]:
    """Ids of the chat prompt. The template writes BOS itself, so nothing is added here."""
    return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

  def _transformers(self):
    if self._hf is None:
      roles = {r: _content(self.config.get(r)) for r in _ROLES if r != "eot_token"}
      extra = [_content(t) for t in self.config.get("additional_special_tokens") or []]
      self._hf = _fast_tokenizer_class()(
          tokenizer_object=self.backend, chat_template=self.chat_template,
          additional_special_tokens=[t for t in extra if t],
          **{r: t for r, t in roles.items() if t})
    return self._hf

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
  """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` / ``special_tokens_map.json``) from a
  model directory.

  Raises FileNotFoundError for a missing directory or tokenizer.json, ValueError for files that
  cannot be parsed.
  """
  from tokenizers import Tokenizer as Backend

  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory not found: {path}")
  if not os.path.isfile(os.path.join(path, "tokenizer.json")):
    raise FileNotFoundError(f"no tokenizer.json in {path}")
  config: dict = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
    f = os.path.join(path, name)
    if os.path.isfile(f):
      config.update(jsonfile.read_object(f))
  try:
    backend = Backend.from_file(os.path.join(path, "tokenizer.json"))
  except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on bad JSON
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path}: could not load tokenizer ({msg})") from None
  return Tokenizer(backend, config, path)
