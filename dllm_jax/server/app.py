"""HTTP server: OpenAI-compatible completions / chat, a native diffusion endpoint, SSE streaming.

    from dllm_jax.server.app import create_app
    app = create_app(LLM(path), api_key=None, model_name="demo", max_queue=64)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints (all JSON; errors are ``{"error": {"message", "type", "param", "code"}}``):

  GET  /                         demo page (static HTML, live denoising canvas)
  GET  /health                   liveness + queue / page snapshot (no auth)
  GET  /metrics                  Prometheus text format
  GET  /v1/models                the served model (OpenAI list)
  GET  /v1/models/{id}
  POST /v1/completions           OpenAI completions (stream=true -> SSE)
  POST /v1/chat/completions      OpenAI chat completions (chat template; stream=true -> SSE)
  POST /v1/diffusion/generate    every SamplingParams / SparseConfig field, return_trace, stream

Streaming sends the longest left-contiguous committed prefix of the generation as it grows, as
text deltas (``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``); text is held back while it ends in
an incomplete UTF-8 sequence or could be the start of a stop string, so the deltas always
concatenate to the final text of the same request without streaming.

Semantics of the OpenAI parameters (documented choices):
  - ``max_tokens`` -> gen_length. When it is not a multiple of the block length the canvas is
    rounded up to one and the output is cut to ``max_tokens`` tokens. Default: the model's
    generation_config gen_length (else 128).
  - ``stop`` (a string or up to 4) is supported: the text is cut before the first stop string,
    ``finish_reason`` "stop", and the engine request is aborted at once (pages freed).
  - ``n`` must be 1; ``top_p`` 1; penalties 0; no logprobs / echo / best_of / suffix /
    logit_bias: other values are a 400 naming the parameter. ``user`` is accepted and ignored.
  - ``model`` may be omitted; any other name than the served one is a 404 (model_not_found).
  - ``usage.completion_tokens``: generated tokens up to the end of the returned text (before
    EOS / EoT or the stop string); the diffusion canvas itself is always gen_length long.
  - finish_reason: "stop" (EOS / EoT or a stop string) or "length".
  - Diffusion knobs (steps, block_length, confidence, rule, threshold, factor, schedule,
    stop_on_eos, sparse) are accepted as extra fields.

Load: ``max_queue`` requests may wait for a running slot; beyond that a request gets 429 with
``Retry-After``. A client that disconnects (or a stop string that ends a request) aborts the
engine request, which frees its KV pages at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dllm_jax.cache.sparse_state import SparseConfig
from dllm_jax.config import SamplingParams
from dllm_jax.server import protocol as P
from dllm_jax.server.worker import EngineWorker, Handle, QueueFull, ShuttingDown, describe

log = logging.getLogger("dllm_jax.server")

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
DEFAULT_MAX_BODY_BYTES = 1 << 20
HEARTBEAT_S = 5.0
_DEFAULT_BLOCK = SamplingParams(gen_length=1 << 12).block_length
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# Errors ------------------------------------------------------------------------------------------
class APIError(Exception):
  """An OpenAI-style error response."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.type = status, message, type
    self.param, self.code, self.headers = param, code, headers


def _clean(s: Any, limit: int = 500) -> str | None:
  """User-derived text made safe for a JSON body (lone surrogates escaped, length capped)."""
  if s is None:
    return None
  s = str(s).encode("utf-8", "backslashreplace").decode("utf-8")
  return s if len(s) <= limit else s[:limit] + "..."


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
  return {"error": {"message": _clean(message), "type": type, "param": _clean(param, 100),
                    "code": code}}


def _error_response(e: APIError) -> JSONResponse:
  return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status,
                      headers=e.headers)


def _type_for(status: int) -> str:
  if status == 401:
    return "authentication_error"
  if status == 404:
    return "not_found_error"
  if status == 429:
    return "rate_limit_error"
  if status >= 500:
    return "server_error"
  return "invalid_request_error"


def _validation_message(e: ValidationError | RequestValidationError) -> tuple[str, str | None]:
  errs = e.errors()
  if not errs:
    return "invalid request body", None
  err = errs[0]
  loc = [str(x) for x in err.get("loc", ()) if x != "body"]
  # Drop pydantic's union-branch names ("str", "list[int]", "function-after[...]") from the path.
  loc = [x for x in loc if not (x in ("str", "int", "float", "bool", "dict") or "[" in x)]
  param = ".".join(loc) or None
  kind = err.get("type", "")
  msg = err.get("msg", "invalid value")
  if kind == "json_invalid":
    return f"the request body is not valid JSON ({msg})", None
  if kind == "model_type" and not loc:
    return "the request body must be a JSON object", None
  if kind == "extra_forbidden":
    return f"unknown parameter: {param}", param
  if kind == "missing":
    return f"missing required parameter: {param}", param
  extra = f" ({len(errs)} errors in total)" if len(errs) > 1 else ""
  return f"invalid value for {param or 'the body'}: {msg}{extra}", param


# Text of a growing committed prefix ---------------------------------------------------------------
class TextAssembler:
  """Turns committed-prefix token ids into text deltas that concatenate to the final text.

  The text is the decode (special tokens skipped) of the ids before the first EOS / EoT, cut to
  ``limit`` tokens and before the first stop string. While the request is not final, a trailing
  U+FFFD (an incomplete UTF-8 sequence that later tokens may complete) and the last
  ``max(len(stop)) - 1`` characters (the possible start of a stop string) are held back.
  """

  def __init__(self, tokenizer, eos_ids, *, limit: int | None = None,
               stops: list[str] | None = None):
    self.tok = tokenizer
    self.eos_ids = set(eos_ids)
    self.limit = limit
    self.stops = list(stops or [])
    self.hold = max((len(s) for s in self.stops), default=1) - 1
    self.sent = ""
    self.final = False
    self.finish_reason: str | None = None
    self.n_tokens = 0

  def _ids(self, ids: list[int]) -> tuple[list[int], bool]:
    ids = list(ids[:self.limit]) if self.limit is not None else list(ids)
    for j, t in enumerate(ids):
      if t in self.eos_ids:
        return ids[:j], True
    return ids, False

  def update(self, ids: list[int], finished: bool = False) -> str:
    """New text since the last call (``""`` when nothing new is stable yet)."""
    if self.final:
      return ""
    ids, eos = self._ids(ids)
    text = self.tok.decode(ids) if ids else ""
    done = finished or eos
    if not done:
      text = text.rstrip("\ufffd")  # only the stable part may match a stop string
    reason = None
    if self.stops:
      hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
      if hits and (done or not self._may_stop_before(text, min(hits))):
        text, done, reason = text[:min(hits)], True, "stop"
        ids = self._cover(ids, len(text))
    if not done and self.hold:
      text = text[:max(len(self.sent), len(text) - self.hold)]
    if not text.startswith(self.sent):
      text = self.sent  # cannot happen for prefix-stable decoding; never retract sent text
    delta, self.sent = text[len(self.sent):], text
    self.n_tokens = len(ids)
    if done:
      self.final = True
      # EOS / EoT inside the returned window, or a stop string -> "stop"; otherwise the window
      # (gen_length or max_tokens) ran out -> "length".
      self.finish_reason = reason or ("stop" if eos else "length")
    return delta

  def _may_stop_before(self, text: str, j: int) -> bool:
    """Could a stop string that starts before ``j`` still complete with later tokens?"""
    n = len(text)
    return any(s.startswith(text[i:]) for s in self.stops
               for i in range(max(0, n - len(s) + 1), min(j, n)))

  def _cover(self, ids: list[int], n_chars: int) -> list[int]:
    for k in range(len(ids) + 1):
      if len(self.tok.decode(ids[:k])) >= n_chars:
        return ids[:k]
    return ids


# The app ------------------------------------------------------------------------------------------
class _State:
  def __init__(self, llm, worker: EngineWorker, model_name: str, api_key: str | None,
               max_body_bytes: int, metrics):
    self.llm = llm
    self.worker = worker
    self.model_name = model_name
    self.api_key = api_key
    self.max_body_bytes = max_body_bytes
    self.metrics = metrics
    self.created = int(time.time())
    self.max_len = worker.core.max_len
    self.mask_id = llm.cfg.mask_token_id
    self.eos_ids = tuple(llm.cfg.eos_ids)
    self._pieces: dict[int, str] = {}

  def piece(self, tid: int) -> str | None:
    if tid == self.mask_id:
      return None
    p = self._pieces.get(tid)
    if p is None:
      tok = self.llm.tokenizer
      p = tok.decode([tid], skip_special_tokens=False) if tok is not None else f"[{tid}]"
      if len(self._pieces) < 1 << 18:
        self._pieces[tid] = p
    return p


def create_app(llm, *, api_key: str | None = None, model_name: str | None = None,
               max_queue: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               shutdown_timeout: float = 30.0) -> FastAPI:
  """A FastAPI app serving ``llm`` (a :class:`dllm_jax.engine.engine.LLM`, or a list of them:
  data-parallel replicas on disjoint devices behind this one front end, least-loaded routing).

  api_key: if set, /v1/* and /metrics need ``Authorization: Bearer <api_key>`` (401 otherwise).
  model_name: the id /v1/models reports (default: the model directory's name).
  max_queue: requests that may wait for a running slot before new ones get 429 (default: the
    engine's ``max_waiting``).
  shutdown_timeout: seconds in-flight requests get to finish at shutdown before being cancelled.
  """
  from dllm_jax.server.metrics import ServerMetrics

  api_key = api_key or None  # "" means no auth, as an unset --api-key does
  llms = list(llm) if isinstance(llm, (list, tuple)) else [llm]
  llm = llms[0]
  if model_name is None:
    path = getattr(llm, "path", None)
    model_name = os.path.basename(os.path.normpath(path)) if path else "dllm-jax"
  if max_queue is None:
    max_queue = llm.engine_config.max_waiting
  if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
    raise ValueError(f"max_queue: expected a positive integer, got {max_queue!r}")

  metrics = ServerMetrics()
  if len(llms) == 1:
    worker = EngineWorker(llm, max_queue=max_queue, on_finish=metrics.on_finish)
  else:  # data-parallel replicas behind this one front end (least-loaded routing)
    from dllm_jax.server.router import ReplicaRouter

    def on_finish(handle, out):
      metrics.on_finish(handle, out)
      worker.forget(handle.rid)

    worker = ReplicaRouter([EngineWorker(x, max_queue=max_queue, on_finish=on_finish)
                            for x in llms])
  metrics.bind(worker)
  state = _State(llm, worker, model_name, api_key, max_body_bytes, metrics)

  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI):
    worker.start()
    log.info("serving %s (max_queue %d)", model_name, max_queue)
    try:
      yield
    finally:
      await worker.aclose(shutdown_timeout)

  app = FastAPI(title="dllm-jax", version="0.1.0", lifespan=lifespan,
                description="Diffusion LM serving: OpenAI-compatible and native endpoints.")
  app.state.dllm = state
  app.add_middleware(metrics.middleware_class())

  @app.exception_handler(APIError)
  async def _api_error(request: Request, e: APIError):
    return _error_response(e)

  @app.exception_handler(RequestValidationError)
  async def _validation_error(request: Request, e: RequestValidationError):
    msg, param = _validation_message(e)
    return JSONResponse(error_body(msg, param=param), status_code=400)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request: Request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(error_body(str(e.detail), _type_for(e.status_code), None, code),
                        status_code=e.status_code, headers=getattr(e, "headers", None))

  @app.exception_handler(Exception)
  async def _internal_error(request: Request, e: Exception):
    log.exception("unhandled error")
    return JSONResponse(error_body("internal server error", "server_error", None,
                                   "internal_error"), status_code=500)

  async def auth(request: Request) -> None:
    if state.api_key is None:
      return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode("utf-8", "surrogateescape"),
        state.api_key.encode("utf-8", "surrogateescape")):
      raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                     type="invalid_request_error", code="invalid_api_key",
                     headers={"WWW-Authenticate": "Bearer"})

  api = APIRouter(dependencies=[Depends(auth)])

  # Plain endpoints ----------------------------------------------------------------------------
  @app.get("/", include_in_schema=False)
  async def index():
    try:
      with open(os.path.join(STATIC_DIR, "index.html"), encoding="utf-8") as fh:
        html = fh.read()
    except OSError:
      raise APIError(404, "the demo page is not installed (dllm_jax/server/static/index.html)",
                     type="not_found_error", code="not_found") from None
    return HTMLResponse(html.replace("{{MODEL_NAME}}", _html_escape(model_name)))

  @app.get("/health")
  async def health():
    snap = describe(worker)
    ok = worker.alive and worker.accepting
    snap.update(status="ok" if ok else "unavailable", model=model_name)
    return JSONResponse(snap, status_code=200 if ok else 503)

  @api.get("/metrics")
  async def metrics_endpoint():
    body, ctype = metrics.render()
    return Response(body, media_type=ctype)

  def model_card() -> dict:
    return {"id": model_name, "object": "model", "created": state.created,
            "owned_by": "dllm-jax", "max_model_len": state.max_len}

  @api.get("/v1/models")
  async def list_models():
    return {"object": "list", "data": [model_card()]}

  @api.get("/v1/models/{model_id:path}")
  async def get_model(model_id: str):
    if model_id != model_name:
      raise APIError(404, f"the model {model_id!r} does not exist", type="not_found_error",
                     param="model", code="model_not_found")
    return model_card()

  # Generation ---------------------------------------------------------------------------------
  @api.post("/v1/completions")
  async def completions(request: Request):
    req = await _read_body(request, P.CompletionRequest, state)
    _check_openai(req, state)
    prompt_ids = await run_in_threadpool(_completion_prompt_ids, req.prompt, state)
    return await _openai_generate(request, req, prompt_ids, state, chat=False)

  @api.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    req = await _read_body(request, P.ChatCompletionRequest, state)
    _check_openai(req, state)
    if req.max_completion_tokens is not None:
      if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens disagree",
                       param="max_completion_tokens")
      req.max_tokens = req.max_completion_tokens
    prompt_ids = await run_in_threadpool(_chat_prompt_ids, req.messages, state)
    return await _openai_generate(request, req, prompt_ids, state, chat=True)

  @api.post("/v1/diffusion/generate")
  async def diffusion_generate(request: Request):
    req = await _read_body(request, P.GenerateRequest, state)
    _check_model(req.model, state)
    if (req.prompt is None) == (req.messages is None):
      raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
    if req.messages is not None:
      prompt_ids = await run_in_threadpool(_chat_prompt_ids, req.messages, state)
    else:
      prompt_ids = await run_in_threadpool(_completion_prompt_ids, req.prompt, state)
    fields = {k: getattr(req, k) for k in ("gen_length", "steps", "block_length", "temperature",
                                           "confidence", "rule", "threshold", "factor",
                                           "schedule", "seed", "stop_on_eos")}
    sp = _sampling_params(fields, state)
    sparse = _sparse_config(req.sparse)
    handle = _submit(request, state, prompt_ids, sp, sparse, trace=req.return_trace,
                     prefix="gen", endpoint="diffusion")
    asm = TextAssembler(state.llm.tokenizer, state.eos_ids) if state.llm.tokenizer else None
    if req.stream:
      return StreamingResponse(_native_stream(request, handle, asm, state, req),
                               media_type="text/event-stream", headers=SSE_HEADERS)
    out = await _collect(request, handle, asm, state)
    state.metrics.observe("diffusion", handle, asm.n_tokens if asm else len(out.token_ids),
                          len(prompt_ids))
    return _native_result(handle, out, asm, state, with_trace=req.return_trace)

  app.include_router(api)
  return app


def _html_escape(s: str) -> str:
  return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
          .replace('"', "&quot;"))


# Request parsing ----------------------------------------------------------------------------------
async def _read_body(request: Request, model_cls, state: _State):
  limit = state.max_body_bytes
  cl = request.headers.get("content-length")
  if cl is not None and cl.isdigit() and int(cl) > limit:
    raise APIError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
  body = bytearray()
  async for chunk in request.stream():
    body += chunk
    if len(body) > limit:
      raise APIError(413, f"the request body is larger than {limit} bytes",
                     code="body_too_large")
  if not body:
    raise APIError(400, "the request body is empty; expected a JSON object")
  try:
    return model_cls.model_validate_json(bytes(body))
  except ValidationError as e:
    msg, param = _validation_message(e)
    raise APIError(400, msg, param=param,
                   code="invalid_json" if "not valid JSON" in msg else None) from None


def _check_model(model: str | None, state: _State) -> None:
  if model is not None and model != state.model_name:
    raise APIError(404, f"the model {model!r} does not exist; this server serves "
                   f"{state.model_name!r}", type="not_found_error", param="model",
                   code="model_not_found")


def _check_openai(req, state: _State) -> None:
  _check_model(req.model, state)
  bad = P.unsupported_params(req)
  if bad is not None:
    raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")
  if req.stream_options is not None and not req.stream:
    raise APIError(400, "stream_options is only allowed with stream=true",
                   param="stream_options")


def _tokenize(text: str, state: _State) -> list[int]:
  tok = state.llm.tokenizer
  if tok is None:
    raise APIError(400, "this model has no tokenizer; send the prompt as token ids",
                   param="prompt")
  try:
    return tok.encode(text, add_special_tokens=False)
  except Exception as e:  # noqa: BLE001 - e.g. lone surrogates the tokenizer cannot encode
    raise APIError(400, f"the prompt could not be tokenized ({type(e).__name__})",
                   param="prompt") from None


def _check_ids(ids: list[int], state: _State, param: str) -> list[int]:
  vocab = state.llm.cfg.vocab_size
  bad = [t for t in ids if not 0 <= t < vocab]
  if bad:
    raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)
  if state.mask_id in ids:
    raise APIError(400, f"the prompt contains the mask token id {state.mask_id}", param=param)
  return list(ids)


def _completion_prompt_ids(prompt, state: _State) -> list[int]:
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # one prompt in a batch of one
  elif isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
    raise APIError(400, "only one prompt per request is supported", param="prompt")
  if isinstance(prompt, str):
    if len(prompt) > 16 * state.max_len * 8:  # far over any tokenization of max_len tokens
      raise APIError(400, f"the prompt is longer than the model's context ({state.max_len} "
                     "tokens)", param="prompt", code="context_length_exceeded")
    ids = _tokenize(prompt, state)
  else:
    ids = _check_ids(list(prompt), state, "prompt")
  if not ids:
    raise APIError(400, "the prompt is empty", param="prompt")
  return ids


def _chat_prompt_ids(messages, state: _State) -> list[int]:
  tok = state.llm.tokenizer
  if tok is None:
    raise APIError(400, "this model has no tokenizer, so no chat template", param="messages")
  conv = []
  for m in messages:
    content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
    conv.append({"role": "system" if m.role == "developer" else m.role, "content": content})
  if sum(len(m["content"]) for m in conv) > 16 * state.max_len * 8:
    raise APIError(400, f"the messages are longer than the model's context ({state.max_len} "
                   "tokens)", param="messages", code="context_length_exceeded")
  try:
    text = tok.apply_chat_template(conv)
  except Exception as e:  # noqa: BLE001 - template errors (missing template, bad roles)
    raise APIError(400, f"the chat template could not render these messages: {e}",
                   param="messages") from None
  return _tokenize(text, state)


def _sampling_params(fields: dict, state: _State) -> SamplingParams:
  given = {k: v for k, v in fields.items() if v is not None}
  for k in ("gen_length", "steps", "block_length"):
    if given.get(k, 0) > state.max_len:
      raise APIError(400, f"{k} {given[k]} exceeds the model's context ({state.max_len} tokens)",
                     param=k, code="context_length_exceeded" if k == "gen_length" else None)
  try:
    return SamplingParams(**given).with_defaults(state.llm.generation_config)
  except ValueError as e:
    param = str(e).split(":", 1)[0] if ":" in str(e) else None
    raise APIError(400, str(e), param=param if param in fields else None) from None


def _sparse_config(sparse) -> SparseConfig | None:
  if sparse is None:
    return None
  if sparse is True:
    return SparseConfig()
  if sparse is False:
    return SparseConfig(enabled=False)
  try:
    return SparseConfig(**sparse.model_dump())
  except ValueError as e:
    raise APIError(400, f"sparse: {e}", param="sparse") from None


def _openai_sampling(req, state: _State) -> tuple[SamplingParams, int | None]:
  """(SamplingParams, token limit): max_tokens rounded up to a whole number of blocks."""
  fields = {k: getattr(req, k) for k in ("steps", "block_length", "temperature", "confidence",
                                         "rule", "threshold", "factor", "schedule", "seed",
                                         "stop_on_eos")}
  limit = req.max_tokens
  if limit is not None:
    if limit > state.max_len:
      raise APIError(400, f"max_tokens {limit} exceeds the model's context ({state.max_len} "
                     "tokens)", param="max_tokens", code="context_length_exceeded")
    gen = limit
    # An explicit gen_length brings SamplingParams' own block default (generation_config's
    # block_length / steps apply only to requests that leave gen_length unset).
    bl = req.block_length or _DEFAULT_BLOCK
    schedule = req.schedule or state.llm.default_sampling_params().schedule
    if schedule != "dream" and gen > bl and gen % bl:
      gen = -(-gen // bl) * bl
    fields["gen_length"] = gen
    if gen == limit:
      limit = None
  return _sampling_params(fields, state), limit


# Submission and events ----------------------------------------------------------------------------
def _submit(request: Request, state: _State, prompt_ids, sp, sparse, *, trace: bool,
            prefix: str, endpoint: str) -> Handle:
  w = state.worker
  handle = Handle(w.new_id(f"{prefix}-{uuid.uuid4().hex[:12]}"), asyncio.get_running_loop(),
                  prompt_ids, sp, sparse, trace=trace, endpoint=endpoint)
  try:
    w.submit(handle)
  except QueueFull as e:
    state.metrics.rejected("queue_full")
    raise APIError(429, f"{e}; retry later", type="rate_limit_error", code="queue_full",
                   headers={"Retry-After": "1"}) from None
  except ShuttingDown as e:
    state.metrics.rejected("unavailable")
    raise APIError(503, str(e), type="server_error", code="unavailable",
                   headers={"Retry-After": "5"}) from None
  except ValueError as e:
    msg = str(e)
    code = "context_length_exceeded" if "max_model_len" in msg else None
    state.metrics.rejected("invalid")
    raise APIError(400, msg, param="prompt" if code else None, code=code) from None
  return handle


class _ClientGone(Exception):
  pass


async def _next_event(handle: Handle, request: Request | None, timeout: float):
  """The next event, or None after ``timeout`` s without one (raises _ClientGone when the
  client disconnected meanwhile; streaming responses detect that themselves)."""
  try:
    return await asyncio.wait_for(handle.queue.get(), timeout)
  except asyncio.TimeoutError:
    if request is not None and await request.is_disconnected():
      raise _ClientGone() from None
    return None


def _latest_prefix(handle: Handle, ids):
  """Coalesce queued prefix events (each supersedes the previous one)."""
  q = handle.queue
  while not q.empty():
    ev = q._queue[0]  # noqa: SLF001 - peek; only the loop thread touches the deque
    if ev[0] != "prefix":
      break
    ids = q.get_nowait()[1]
  return ids


def _raise_event_error(ev) -> None:
  _, status, msg, code = ev
  raise APIError(status, msg, type=_type_for(status), code=code)


async def _collect(request: Request, handle: Handle, asm: TextAssembler | None, state: _State):
  """Wait for a non-streamed result; returns the GenerationOutput (None when a stop string
  ended the request early)."""
  w = state.worker
  last_check = time.monotonic()
  try:
    while True:
      ev = await _next_event(handle, request, 1.0)
      if ev is not None and time.monotonic() - last_check > 1.0:
        last_check = time.monotonic()  # events may keep coming: still notice a gone client
        if await request.is_disconnected():
          raise _ClientGone()
      if ev is None:
        last_check = time.monotonic()
        continue
      if ev[0] == "prefix":
        if asm is not None and asm.stops:
          asm.update(_latest_prefix(handle, ev[1]))
          if asm.final:
            w.abort(handle)
            return None
      elif ev[0] == "done":
        out = ev[1]
        if asm is not None:
          asm.update(out.token_ids, True)
        return out
      elif ev[0] == "error":
        _raise_event_error(ev)
  except _ClientGone:
    w.abort(handle)
    raise APIError(499, "client closed the request", code="client_closed") from None
  except BaseException:
    w.abort(handle)
    raise


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


async def _openai_generate(request: Request, req, prompt_ids, state: _State, *, chat: bool):
  if state.llm.tokenizer is None:
    raise APIError(400, "this model has no tokenizer; use /v1/diffusion/generate with token ids")
  sp, limit = _openai_sampling(req, state)
  sparse = _sparse_config(req.sparse)
  stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
  endpoint = "chat" if chat else "completions"
  handle = _submit(request, state, prompt_ids, sp, sparse, trace=False,
                   prefix="chatcmpl" if chat else "cmpl", endpoint=endpoint)
  asm = TextAssembler(state.llm.tokenizer, state.eos_ids, limit=limit, stops=stops)
  base = {"id": handle.orig_rid, "created": handle.created, "model": state.model_name,
          "system_fingerprint": None}
  if req.stream:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(
        _openai_stream(request, handle, asm, state, base, chat=chat, include_usage=include_usage),
        media_type="text/event-stream", headers=SSE_HEADERS)
  await _collect(request, handle, asm, state)
  state.metrics.observe(endpoint, handle, asm.n_tokens, len(prompt_ids))
  usage = _usage(len(prompt_ids), asm.n_tokens)
  if chat:
    return {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": asm.sent},
                         "logprobs": None, "finish_reason": asm.finish_reason}],
            "usage": usage}
  return {**base, "object": "text_completion",
          "choices": [{"index": 0, "text": asm.sent, "logprobs": None,
                       "finish_reason": asm.finish_reason}],
          "usage": usage}


def _sse(obj) -> str:
  data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False,
                                                     separators=(",", ":"))
  return f"data: {data}\n\n"


def _sse_error(ev) -> tuple[str, str]:
  """The end of a stream whose request failed: an OpenAI error body, then [DONE]."""
  _, status, msg, code = ev
  return _sse(error_body(msg, _type_for(status), None, code)), _sse("[DONE]")


async def _events(handle: Handle, state: _State) -> AsyncIterator[tuple]:
  """Engine events for a streaming response; None = heartbeat due."""
  while True:
    ev = await _next_event(handle, None, HEARTBEAT_S)
    if ev is not None and ev[0] == "prefix":
      ev = ("prefix", _latest_prefix(handle, ev[1]))
    yield ev


async def _openai_stream(request, handle: Handle, asm: TextAssembler, state: _State, base: dict,
                         *, chat: bool, include_usage: bool):
  w = state.worker
  finished = False
  obj = "chat.completion.chunk" if chat else "text_completion"

  def chunk(text: str | None, finish: str | None, *, role: bool = False) -> dict:
    if chat:
      delta: dict = {}
      if role:
        delta["role"] = "assistant"
      if text is not None:
        delta["content"] = text
      choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
      choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    c = {**base, "object": obj, "choices": [choice]}
    if include_usage:
      c["usage"] = None
    return c

  try:
    if chat:
      yield _sse(chunk("", None, role=True))
    async for ev in _events(handle, state):
      if ev is None:
        yield ": keep-alive\n\n"
        continue
      kind = ev[0]
      if kind == "prefix":
        delta = asm.update(ev[1])
        if delta:
          yield _sse(chunk(delta, None))
        if asm.final:
          w.abort(handle)  # a stop string ended it: free the pages now
          break
      elif kind == "done":
        out = ev[1]
        delta = asm.update(out.token_ids, True)
        if delta:
          yield _sse(chunk(delta, None))
        break
      elif kind == "error":
        finished = True
        for line in _sse_error(ev):
          yield line
        return
    finished = True
    yield _sse(chunk(None if chat else "", asm.finish_reason))
    state.metrics.observe(handle.endpoint, handle, asm.n_tokens, len(handle.prompt_ids))
    if include_usage:
      yield _sse({**base, "object": obj, "choices": [],
                  "usage": _usage(len(handle.prompt_ids), asm.n_tokens)})
    yield _sse("[DONE]")
  finally:
    if not finished:
      w.abort(handle)  # client disconnected (or the server is stopping): free the pages


def _canvas_event(handle: Handle, k: int, row: list[int], t: float, state: _State) -> dict:
  mask = state.mask_id
  g = len(row)
  committed = sum(1 for x in row if x != mask)
  first_mask = next((j for j, x in enumerate(row) if x == mask), None)
  prefix = g if first_mask is None else first_mask
  bl = handle.sp.block_length
  block = None
  if first_mask is not None:
    start = first_mask // bl * bl
    block = [start, min(start + bl, g)]
  elapsed = max(t - handle.t0, 1e-9)
  return {"object": "diffusion.step", "id": handle.orig_rid, "step": k, "nfe": k,
          "canvas": row, "pieces": [state.piece(x) for x in row], "committed": committed,
          "prefix": prefix, "block": block, "elapsed_s": round(elapsed, 4),
          "tokens_per_s": round(committed / elapsed, 2)}


def _native_result(handle: Handle, out, asm: TextAssembler | None, state: _State, *,
                   with_trace: bool) -> dict:
  elapsed = max(out_time(handle, out) - handle.t0, 1e-9)
  sp = handle.sp
  res = {
      "id": handle.orig_rid, "object": "diffusion.generation", "created": handle.created,
      "model": state.model_name,
      "text": out.text if out.text is not None else (asm.sent if asm else None),
      "token_ids": list(out.token_ids), "finish_reason": out.finish_reason, "nfe": out.nfe,
      "mask_token_id": state.mask_id,
      "usage": _usage(len(handle.prompt_ids), asm.n_tokens if asm else len(out.token_ids)),
      "timing": {"total_s": round(elapsed, 4),
                 "ttft_s": (round(handle.first_token_t - handle.t0, 4)
                            if handle.first_token_t else None),
                 "tokens_per_s": round(sp.gen_length / elapsed, 2)},
      "sampling_params": {k: getattr(sp, k) for k in (
          "gen_length", "steps", "block_length", "temperature", "confidence", "rule",
          "threshold", "factor", "schedule", "seed", "stop_on_eos")},
      "sparse": _sparse_dict(handle.sparse, state),
  }
  if with_trace:
    res["trace"] = out.trace
  return res


def out_time(handle: Handle, out) -> float:
  m = out.metrics or {}
  return m.get("finish") or time.perf_counter()


def _sparse_dict(sparse, state: _State):
  if sparse is None:
    sparse = state.llm.engine_config.sparse
  if sparse is None or not sparse.enabled:
    return None
  return {"enabled": True, "keep_ratio": sparse.keep_ratio, "pool_kernel": sparse.pool_kernel,
          "delay": sparse.delay, "selection": sparse.selection}


async def _native_stream(request, handle: Handle, asm: TextAssembler | None, state: _State,
                         req: P.GenerateRequest):
  w = state.worker
  finished = False
  try:
    async for ev in _events(handle, state):
      if ev is None:
        yield ": keep-alive\n\n"
        continue
      kind = ev[0]
      if kind == "prefix":
        if asm is not None:
          delta = asm.update(ev[1])
          if delta:
            yield _sse({"object": "diffusion.delta", "id": handle.orig_rid, "delta": delta,
                        "prefix": len(ev[1])})
      elif kind == "step":
        yield _sse(_canvas_event(handle, ev[1], ev[2], ev[3], state))
      elif kind == "done":
        out = ev[1]
        if asm is not None:
          delta = asm.update(out.token_ids, True)
          if delta:
            yield _sse({"object": "diffusion.delta", "id": handle.orig_rid, "delta": delta,
                        "prefix": len(out.token_ids)})
        finished = True
        state.metrics.observe("diffusion", handle, asm.n_tokens if asm else 0,
                              len(handle.prompt_ids))
        yield _sse(_native_result(handle, out, asm, state, with_trace=False))
        yield _sse("[DONE]")
        return
      elif kind == "error":
        finished = True
        for line in _sse_error(ev):
          yield line
        return
  finally:
    if not finished:
      w.abort(handle)
