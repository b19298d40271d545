"""Request bodies of the HTTP server (pydantic, strict, unknown fields rejected).

Every model forbids unknown fields and uses pydantic's strict mode: JSON strings are not coerced
to numbers, numbers not to booleans (a JSON integer is still accepted where a float is expected).
NaN / infinity are rejected. Value ranges are checked here where they are static; limits that
depend on the model (context length, block length cap, vocabulary) are checked by the server and
the engine and answered with 400 as well.

OpenAI parameters that the diffusion engine does not implement are accepted only at their
neutral value (e.g. ``n`` 1, ``top_p`` 1, penalties 0, ``logprobs`` null); any other value is a
400 naming the parameter (see ``unsupported_params``).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from dllm_jax.cache.selection import MAX_POOL_KERNEL, MODES
from dllm_jax.config import CONFIDENCE_KINDS, RULES, SCHEDULES

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


Seed = Annotated[int, Field(ge=0, lt=2**32)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class SparseOptions(_Strict):
  """``dllm_jax.cache.sparse_state.SparseConfig`` fields (defaults as SparseConfig's)."""

  enabled: bool = True
  keep_ratio: float = Field(0.5, ge=0.0, le=1.0)
  pool_kernel: int = Field(3, ge=1, le=MAX_POOL_KERNEL)
  delay: int = Field(1, ge=0, le=1 << 20)
  selection: Literal[MODES] = "per_head"


class DiffusionOptions(_Strict):
  """The SamplingParams fields without an OpenAI name; also accepted by the OpenAI endpoints
  (e.g. ``extra_body={"steps": 16}``). Unset fields come from the model's generation_config.json,
  then SamplingParams' defaults. ``sparse``: null = the engine's default, false = dense, true =
  SparseConfig defaults, or an object of SparseConfig fields."""

  steps: int | None = Field(None, ge=1)
  block_length: int | None = Field(None, ge=1)
  confidence: Literal[CONFIDENCE_KINDS] | None = None
  rule: Literal[RULES] | None = None
  threshold: float | None = Field(None, gt=0.0, le=1.0)
  factor: float | None = Field(None, gt=0.0, le=1e6)
  schedule: Literal[SCHEDULES] | None = None
  stop_on_eos: bool | None = None
  sparse: bool | SparseOptions | None = None


class StreamOptions(_Strict):
  include_usage: bool = False


class ContentPart(_Strict):
  type: Literal["text"]
  text: str


class ChatMessage(_Strict):
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[ContentPart]
  name: str | None = None


class _OpenAICommon(DiffusionOptions):
  model: str | None = None
  max_tokens: int | None = Field(None, ge=1)
  temperature: float | None = Field(None, ge=0.0, le=2.0)
  seed: Seed | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
  user: str | None = None
  # Accepted only at their neutral values.
  n: int | None = None
  top_p: float | None = None
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  logit_bias: dict[str, float] | None = None


class CompletionRequest(_OpenAICommon):
  """POST /v1/completions. ``prompt``: a string or token ids (one prompt per request; a list
  holding one string or one id list is accepted too)."""

  prompt: Union[str, list[TokenId], list[str], list[list[TokenId]]]
  logprobs: int | None = None
  echo: bool = False
  best_of: int | None = None
  suffix: str | None = None


class ChatCompletionRequest(_OpenAICommon):
  """POST /v1/chat/completions. The model's chat template renders ``messages``."""

  messages: Annotated[list[ChatMessage], Field(min_length=1)]
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool | None = None
  top_logprobs: int | None = None


class GenerateRequest(DiffusionOptions):
  """POST /v1/diffusion/generate: every SamplingParams and SparseConfig field.

  Exactly one of ``prompt`` (text or token ids, no template) and ``messages`` (chat template).
  ``return_trace``: the generated positions after every step (mask id = not yet committed); with
  ``stream`` they arrive live as ``diffusion.step`` events.
  """

  model: str | None = None
  prompt: str | list[TokenId] | None = None
  messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
  gen_length: int | None = Field(None, ge=1)
  temperature: float | None = Field(None, ge=0.0, le=100.0)
  seed: Seed | None = None
  return_trace: bool = False
  stream: bool = False


# (field, neutral values) of the OpenAI parameters the engine does not implement.
_NEUTRAL = {
    "n": (None, 1), "top_p": (None, 1.0), "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0), "logprobs": (None, False, 0), "echo": (False,),
    "best_of": (None, 1), "suffix": (None, ""), "top_logprobs": (None, 0),
}


def unsupported_params(req: BaseModel) -> tuple[str, str] | None:
  """(param, message) for the first OpenAI parameter set to a value we do not implement."""
  for name, ok in _NEUTRAL.items():
    if name not in type(req).model_fields:
      continue
    v = getattr(req, name)
    if not any(v is o or (type(v) is type(o) and v == o) or
               (isinstance(v, (int, float)) and not isinstance(v, bool) and
                not isinstance(o, bool) and o is not None and v == o) for o in ok):
      return name, (f"{name}={v!r} is not supported by this server (diffusion decoding); "
                    f"omit it or use {ok[-1]!r}")
  if getattr(req, "logit_bias", None):
    return "logit_bias", "logit_bias is not supported by this server; omit it"
  return None
