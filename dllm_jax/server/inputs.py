"""From an HTTP request to engine inputs: the JSON body, prompt ids, SamplingParams, SparseConfig.

Every problem becomes an :class:`APIError` (4xx) that names the field the client sent.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from dllm_jax.config import SAMPLING_FIELDS, SamplingParams, SparseConfig
from dllm_jax.server import protocol as P
from dllm_jax.server.errors import APIError, validation_error
from dllm_jax.server.state import ServerState

_DEFAULT_BLOCK = SamplingParams(gen_length=1 << 12).block_length


# The body ----------------------------------------------------------------------------------------
def is_json_type(ctype: str | None) -> bool:
  """``application/json``, optionally with a UTF-8 charset (JSON is UTF-8 by definition)."""
  if not ctype:
    return False
  media, _, params = ctype.partition(";")
  if media.strip().lower() != "application/json":
    return False
  for p in params.split(";"):
    k, _, v = p.partition("=")
    if k.strip().lower() == "charset" and v.strip().strip('"').lower() not in ("utf-8", "utf8"):
      return False
  return True


async def read_body(request, model_cls, state: ServerState):
  """The validated request body. Requiring ``application/json`` keeps cross-origin "simple"
  POSTs (text/plain, forms) of any web page from making a local server generate."""
  if not is_json_type(request.headers.get("content-type")):
    raise APIError(415, "the request body must be JSON, sent with 'Content-Type: "
                   "application/json'", code="unsupported_media_type")
  limit = state.max_body_bytes
  too_large = APIError(413, f"the request body is larger than {limit} bytes",
                       code="body_too_large")
  cl = request.headers.get("content-length")
  if cl is not None and cl.isdigit() and int(cl) > limit:
    raise too_large
  body = bytearray()
  async for chunk in request.stream():  # ClientDisconnect: a client abort (errors.install)
    body += chunk
    if len(body) > limit:
      raise too_large
  if not body:
    raise APIError(400, "the request body is empty; expected a JSON object")
  try:
    return model_cls.model_validate_json(bytes(body))
  except ValidationError as e:
    raise validation_error(e, P.MODEL_NAMES) from None


def check_model(model: str | None, state: ServerState) -> None:
  if model is not None and model != state.model_name:
    raise APIError(404, f"the model {model!r} does not exist; this server serves "
                   f"{state.model_name!r}", param="model", code="model_not_found")


def check_openai(req, state: ServerState) -> None:
  check_model(req.model, state)
  bad = P.unsupported_params(req)
  if bad is not None:
    raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")
  if req.stream_options is not None and not req.stream:
    raise APIError(400, "stream_options is only allowed with stream=true",
                   param="stream_options")


# Prompts -----------------------------------------------------------------------------------------
def _too_long(n_chars: int, state: ServerState) -> bool:
  return n_chars > 16 * state.max_len * 8  # far over any tokenization of max_len tokens


def _tokenize(text: str, state: ServerState, param: str) -> list[int]:
  tok = state.tokenizer
  if tok is None:
    raise APIError(400, "this model has no tokenizer; send the prompt as token ids",
                   param=param)
  try:
    ids = tok.encode(text, add_special_tokens=False)
  except Exception as e:  # noqa: BLE001 - e.g. lone surrogates the tokenizer cannot encode
    raise APIError(400, f"the prompt could not be tokenized ({type(e).__name__})",
                   param=param) from None
  return check_ids(ids, state, param)


def check_ids(ids: list[int], state: ServerState, param: str) -> list[int]:
  vocab = state.llm.cfg.vocab_size
  bad = [t for t in ids if not 0 <= t < vocab]
  if bad:
    raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)
  if state.mask_id in ids:
    raise APIError(400, f"the {param} contains the mask token id {state.mask_id} (as text, "
                   "its special token)", param=param)
  return list(ids)


def completion_prompt_ids(prompt, state: ServerState) -> list[int]:
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # one prompt in a batch of one
  elif isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
    raise APIError(400, "only one prompt per request is supported", param="prompt")
  if isinstance(prompt, str):
    if _too_long(len(prompt), state):
      raise APIError(400, f"the prompt is longer than the model's context ({state.max_len} "
                     "tokens)", param="prompt", code="context_length_exceeded")
    ids = _tokenize(prompt, state, "prompt")
  else:
    ids = check_ids(list(prompt), state, "prompt")
  if not ids:
    raise APIError(400, "the prompt is empty", param="prompt")
  return ids


def chat_prompt_ids(messages: list[P.ChatMessage], state: ServerState) -> list[int]:
  tok = state.tokenizer
  if tok is None:
    raise APIError(400, "this model has no tokenizer, so no chat template", param="messages")
  conv = [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
          for m in messages]
  if _too_long(sum(len(m["content"]) for m in conv), state):
    raise APIError(400, f"the messages are longer than the model's context ({state.max_len} "
                   "tokens)", param="messages", code="context_length_exceeded")
  try:
    text = tok.apply_chat_template(conv)
  except Exception as e:  # noqa: BLE001 - template errors (missing template, bad roles)
    raise APIError(400, f"the chat template could not render these messages: {e}",
                   param="messages") from None
  return _tokenize(text, state, "messages")


# Decoding parameters -----------------------------------------------------------------------------
def sampling_params(fields: dict, state: ServerState) -> SamplingParams:
  """SamplingParams of the given fields (None = unset) with the model's defaults; its own
  validation is the only one, its ValueError a 400 naming the field."""
  given = {k: v for k, v in fields.items() if v is not None}
  for k in ("gen_length", "steps", "block_length"):
    if given.get(k, 0) > state.max_len:
      raise APIError(400, f"{k} {given[k]} exceeds the model's context ({state.max_len} tokens)",
                     param=k, code="context_length_exceeded" if k == "gen_length" else None)
  try:
    return SamplingParams(**given).with_defaults(state.llm.generation_config)
  except ValueError as e:
    msg = str(e)
    name = re.match(r"\w*", msg).group()  # SamplingParams' messages start with the field
    param = name if name in SAMPLING_FIELDS else None
    raise APIError(400, msg, param=param) from None


def openai_sampling(req, state: ServerState) -> tuple[SamplingParams, int | None]:
  """(SamplingParams, token limit): max_tokens rounded up to a whole number of blocks (the
  output is then cut to max_tokens tokens). Errors about the canvas say what was sent."""
  fields = {k: getattr(req, k) for k in SAMPLING_FIELDS if k != "gen_length"}
  limit = req.max_tokens
  if limit is None:
    return sampling_params(fields, state), None
  # An explicit gen_length brings SamplingParams' own block default (generation_config's
  # block_length / steps apply only to requests that leave gen_length unset).
  bl = req.block_length or _DEFAULT_BLOCK
  schedule = req.schedule or state.llm.default_sampling_params().schedule
  gen = -(-limit // bl) * bl if schedule != "dream" and limit > bl and limit % bl else limit
  if gen > state.max_len:
    why = ("" if gen == limit else f" needs a canvas of {gen} tokens (whole blocks of "
           f"block_length {bl}), which")
    raise APIError(400, f"max_tokens ({limit}){why} exceeds the model's context "
                   f"({state.max_len} tokens)", param="max_tokens",
                   code="context_length_exceeded")
  try:
    sp = sampling_params({**fields, "gen_length": gen}, state)
  except APIError as e:
    if gen != limit and "gen_length" in e.message:
      e.message = (f"max_tokens ({limit}) is decoded on a canvas of {gen} tokens (whole blocks "
                   f"of block_length {bl}): {e.message}")
    if e.param == "gen_length":
      e.param = "max_tokens"
    raise
  return sp, (limit if gen != limit else None)


def check_context(prompt_ids: list[int], sp: SamplingParams, state: ServerState, *,
                  max_tokens: int | None = None) -> None:
  """Prompt + canvas must fit the model's context; the message names what the client sent."""
  n, g = len(prompt_ids), sp.gen_length
  if n + g <= state.max_len:
    return
  if max_tokens is None:
    what = f"gen_length ({g})"
  elif max_tokens == g:
    what = f"max_tokens ({g})"
  else:
    what = (f"max_tokens ({max_tokens}, decoded on a canvas of {g} tokens: whole blocks of "
            f"block_length {sp.block_length})")
  raise APIError(400, f"prompt ({n} tokens) + {what} = {n + g} tokens exceeds the model's "
                 f"context ({state.max_len} tokens)", param="prompt",
                 code="context_length_exceeded")


def sparse_config(sparse) -> SparseConfig | None:
  """The request's SparseConfig (None = the engine's default); its own validation applies."""
  if sparse is None:
    return None
  if sparse is True:
    return SparseConfig()
  if sparse is False:
    return SparseConfig(enabled=False)
  given = sparse.model_dump(exclude_none=True)
  try:
    return SparseConfig(**given)
  except ValueError as e:
    name = str(e).split(":", 1)[0]
    param = f"sparse.{name}" if name in SparseConfig.__dataclass_fields__ else "sparse"
    raise APIError(400, f"sparse.{e}" if param != "sparse" else f"sparse: {e}",
                   param=param) from None
