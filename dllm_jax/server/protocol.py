"""Request bodies of the HTTP server (pydantic, strict, unknown fields rejected).

Every model forbids unknown fields and uses pydantic's strict mode: JSON strings are not coerced
to numbers, numbers not to booleans (a JSON integer is still accepted where a float is expected).
NaN / infinity are rejected. The models check JSON types and the server's own API limits; the
decoding rules (ranges, divisibility, option names) are checked once, by ``SamplingParams`` and
``SparseConfig``, whose errors the server answers with a 400 naming the field. The option lists
in the schema are the ones in ``dllm_jax.config``.

Chat ``content`` takes the OpenAI shapes: a string, or a non-empty list of
``{"type": "text", "text": ...}`` parts, joined in order with ``"\\n"`` (:data:`PART_SEPARATOR`);
an empty list, parts that hold no text at all, and non-text parts are a 400 naming
``messages[i].content``.

OpenAI parameters that the diffusion engine does not implement are accepted only at their
neutral value (e.g. ``n`` 1, ``top_p`` 1, penalties 0, ``logprobs`` null); any other value is a
400 naming the parameter (see :func:`unsupported_params`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dllm_jax.config import (CONFIDENCE_KINDS, MAX_POOL_KERNEL, RULES, SCHEDULES,
                             SELECTION_MODES)

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
PART_SEPARATOR = "\n"  # between the text parts of one chat message (as vLLM)
MAX_TEMPERATURE_OPENAI = 2.0
MAX_TEMPERATURE_NATIVE = 100.0
MAX_FACTOR = 1e6
MAX_DELAY = 1 << 20


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _options(values, what: str):
  return Field(None, description=f"{what}; one of {', '.join(map(repr, values))}.",
               json_schema_extra={"enum": list(values)})


TokenId = Annotated[int, Field(ge=0, lt=2**31)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class SparseOptions(_Strict):
  """Sparse KV caching for this request: ``dllm_jax.config.SparseConfig`` fields
  (unset ones take SparseConfig's defaults)."""

  enabled: bool | None = Field(None, description="Sparse caching on (default true).")
  keep_ratio: float | None = Field(None, description=(
      "Share of the context's tokens each head keeps in the Reuse phase (default 0.5)."))
  pool_kernel: int | None = Field(None, description=(
      f"Max-pool window over the token scores before top-k (default 3, at most "
      f"{MAX_POOL_KERNEL})."))
  delay: int | None = Field(None, le=MAX_DELAY, description=(
      "Refresh steps at the start of each block before selecting (default 1)."))
  selection: str | None = _options(SELECTION_MODES, "Token selection (default 'per_head')")


class DiffusionOptions(_Strict):
  """The SamplingParams fields without an OpenAI name; also accepted by the OpenAI endpoints
  (e.g. ``extra_body={"steps": 16}``). Unset fields come from the model's generation_config.json,
  then SamplingParams' defaults."""

  steps: int | None = Field(None, description=(
      "Denoising steps (forward passes) over the whole generation; default gen_length. With "
      "the fixed rule, a multiple of the number of blocks."))
  block_length: int | None = Field(None, description=(
      "Tokens per semi-autoregressive block (default 32, never above gen_length; "
      "the 'dream' schedule needs block_length = gen_length)."))
  confidence: str | None = _options(CONFIDENCE_KINDS,
                                    "Score that picks which masked positions to commit")
  rule: str | None = _options(RULES, "How many positions a step commits: 'fixed' (steps "
                              "schedule), 'threshold' (confidence >= threshold) or 'factor'")
  threshold: float | None = Field(None, description=(
      "Confidence threshold in (0, 1] for rule 'threshold' (default 0.9)."))
  factor: float | None = Field(None, le=MAX_FACTOR, description=(
      "Factor > 0 for rule 'factor' (default 1.0)."))
  schedule: str | None = _options(SCHEDULES, "Commit-count schedule")
  stop_on_eos: bool | None = Field(None, description=(
      "End the request once an EOS / EoT is committed and everything before it is (default "
      "true)."))
  sparse: bool | SparseOptions | None = Field(None, description=(
      "Sparse KV caching: null = the server's default, false = dense, true = SparseConfig "
      "defaults, or an object of SparseConfig fields."))


class StreamOptions(_Strict):
  include_usage: bool = Field(False, description="Send a last chunk with the token usage.")


class ContentPart(_Strict):
  """One part of a chat message's content (only text parts are supported)."""

  type: Literal["text"] = Field(description="Always 'text'.")
  text: str = Field(description="The text of this part.")


def _content_shape(v: Any) -> Any:
  """Check the OpenAI content shapes before pydantic picks a union branch (one clear error)."""
  if isinstance(v, str):
    return v
  if not isinstance(v, list):
    raise ValueError("expected a string or a list of {\"type\": \"text\", \"text\": ...} parts")
  if not v:
    raise ValueError("the list of content parts is empty")
  for i, p in enumerate(v):
    if not isinstance(p, dict) or p.get("type") != "text":
      kind = p.get("type") if isinstance(p, dict) else None
      got = f"a part of type {kind!r}" if isinstance(kind, str) else "not a text part"
      raise ValueError(f"part {i}: {got}; only {{\"type\": \"text\", \"text\": ...}} parts "
                       "are supported")
    if not isinstance(p.get("text"), str):
      raise ValueError(f"part {i}: 'text' must be a string")
    if set(p) - {"type", "text"}:
      raise ValueError(f"part {i}: unknown field {sorted(set(p) - {'type', 'text'})[0]!r}")
  if not any(p["text"] for p in v):
    raise ValueError("the content parts hold no text")
  return v


class ChatMessage(_Strict):
  role: Literal["system", "developer", "user", "assistant"] = Field(description=(
      "Who wrote the message ('developer' is rendered as 'system')."))
  content: str | list[ContentPart] = Field(description=(
      "A string, or a non-empty list of {\"type\": \"text\", \"text\": ...} parts joined in "
      "order with a newline."))
  name: str | None = Field(None, description="Accepted and ignored.")

  @field_validator("content", mode="before")
  @classmethod
  def check_content(cls, v: Any) -> Any:
    return _content_shape(v)

  @property
  def text(self) -> str:
    c = self.content
    return c if isinstance(c, str) else PART_SEPARATOR.join(p.text for p in c)


Messages = Annotated[list[ChatMessage], Field(min_length=1)]


class _OpenAICommon(DiffusionOptions):
  model: str | None = Field(None, description="The served model's id (optional).")
  max_tokens: int | None = Field(None, ge=1, description=(
      "Tokens to generate (the diffusion canvas is rounded up to whole blocks and the output "
      "cut to max_tokens); default: generation_config's gen_length."))
  temperature: float | None = Field(None, le=MAX_TEMPERATURE_OPENAI,
                                    description="Sampling temperature (0 = greedy).")
  seed: int | None = Field(None, description="Noise seed in [0, 2**32) (default 0).")
  stream: bool = Field(False, description="Stream the committed prefix as server-sent events.")
  stream_options: StreamOptions | None = Field(None, description="Only with stream=true.")
  stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None = (
      Field(None, description="Up to 4 strings; the text ends before the first one."))
  user: str | None = Field(None, description="Accepted and ignored.")
  # Accepted only at their neutral values.
  n: int | None = Field(None, description="Only 1.")
  top_p: float | None = Field(None, description="Only 1.")
  presence_penalty: float | None = Field(None, description="Only 0.")
  frequency_penalty: float | None = Field(None, description="Only 0.")
  logit_bias: dict[str, float] | None = Field(None, description="Not supported (omit it).")


class CompletionRequest(_OpenAICommon):
  """POST /v1/completions. ``prompt``: a string or token ids (one prompt per request; a list
  holding one string or one id list is accepted too)."""

  prompt: Union[str, list[TokenId], list[str], list[list[TokenId]]] = Field(description=(
      "Text or token ids; one prompt per request."))
  logprobs: int | None = Field(None, description="Only null or 0.")
  echo: bool = Field(False, description="Only false.")
  best_of: int | None = Field(None, description="Only 1.")
  suffix: str | None = Field(None, description="Not supported (omit it).")


class ChatCompletionRequest(_OpenAICommon):
  """POST /v1/chat/completions. The model's chat template renders ``messages``."""

  messages: Messages = Field(description="The conversation, rendered by the chat template.")
  max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens.")
  logprobs: bool | None = Field(None, description="Only null or false.")
  top_logprobs: int | None = Field(None, description="Only null or 0.")


class GenerateRequest(DiffusionOptions):
  """POST /v1/diffusion/generate: every SamplingParams and SparseConfig field.

  Exactly one of ``prompt`` (text or token ids, no template) and ``messages`` (chat template).
  """

  model: str | None = Field(None, description="The served model's id (optional).")
  prompt: str | list[TokenId] | None = Field(None, description=(
      "Text (tokenized without a template) or token ids; give this or messages."))
  messages: Messages | None = Field(None, description=(
      "A conversation rendered by the chat template; give this or prompt."))
  gen_length: int | None = Field(None, description=(
      "Tokens on the diffusion canvas (default: generation_config, else 128); a multiple of "
      "block_length."))
  temperature: float | None = Field(None, le=MAX_TEMPERATURE_NATIVE,
                                    description="Sampling temperature (0 = greedy).")
  seed: int | None = Field(None, description="Noise seed in [0, 2**32) (default 0).")
  return_trace: bool = Field(False, description=(
      "Return the generated positions after every step (mask id = not yet committed); with "
      "stream they arrive live as diffusion.step events."))
  stream: bool = Field(False, description=(
      "Server-sent events: diffusion.delta text, diffusion.step canvases (with return_trace), "
      "then the diffusion.generation result."))


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, GenerateRequest)
# Pydantic names union branches by these in error locations; the error mapper drops them.
MODEL_NAMES = frozenset({"SparseOptions", "StreamOptions", "ContentPart", "ChatMessage"})

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


def openapi_schemas() -> dict[str, dict]:
  """The request models (and the models they use) as OpenAPI component schemas."""
  out: dict[str, dict] = {}
  for m in REQUEST_MODELS:
    s = m.model_json_schema(ref_template="#/components/schemas/{model}")
    out.update(s.pop("$defs", {}))
    out[m.__name__] = s
  return out
