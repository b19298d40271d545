"""HTTP server: OpenAI-compatible completions / chat, a native diffusion endpoint, SSE streaming.

    from dllm_jax.server.app import create_app
    from dllm_jax.server.transport import serve
    serve(create_app(LLM(path), api_key=None, model_name="demo", max_queue=64),
          host="127.0.0.1", port=8000)

Endpoints (all JSON; errors are ``{"error": {"message", "type", "param", "code"}}``):

  GET  /                         demo page (static HTML, live denoising canvas)
  GET  /health                   liveness; queue / page details too without auth or with the key
  GET  /metrics                  Prometheus text format
  GET  /v1/models                the served model (OpenAI list)
  GET  /v1/models/{id}
  POST /v1/completions           OpenAI completions (stream=true -> SSE)
  POST /v1/chat/completions      OpenAI chat completions (chat template; stream=true -> SSE)
  POST /v1/diffusion/generate    every SamplingParams / SparseConfig field, return_trace, stream
  GET  /docs, /openapi.json      the request bodies, every field described

POST bodies must be sent as ``Content-Type: application/json`` (415 otherwise), so a web page
cannot make a local server generate with a cross-origin "simple" request. A trailing slash is
ignored (``/metrics/`` is ``/metrics``); nothing redirects to a client-supplied Host.

Streaming sends the longest left-contiguous committed prefix of the generation as it grows, as
text deltas (``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``); text is held back while it ends in
an incomplete UTF-8 sequence or could be the start of a stop string, so the deltas always
concatenate to the final text of the same request without streaming. The text (incremental
detokenising, stop strings, the max_tokens cut) is assembled by the engine itself
(dllm_jax/engine/outputs.py): ``LLM.generate(..., stop=...)`` gives the same text.

Semantics of the OpenAI parameters (documented choices):
  - ``max_tokens`` -> gen_length. When it is not a multiple of the block length the canvas is
    rounded up to one and the output is cut to ``max_tokens`` tokens. Default: the model's
    generation_config gen_length (else 128).
  - ``stop`` (a string or up to 4) is supported: the text is cut before the first stop string,
    ``finish_reason`` "stop", and the engine ends the request at once (pages freed).
  - ``n`` must be 1; ``top_p`` 1; penalties 0; no logprobs / echo / best_of / suffix /
    logit_bias: other values are a 400 naming the parameter. ``user`` is accepted and ignored.
  - ``model`` may be omitted; any other name than the served one is a 404 (model_not_found).
  - chat ``content``: a string or a non-empty list of text parts, joined with a newline.
  - ``usage.completion_tokens``: generated tokens up to the end of the returned text (before
    EOS / EoT or the stop string); the diffusion canvas itself is always gen_length long.
  - finish_reason: "stop" (EOS / EoT or a stop string) or "length".
  - Diffusion knobs (steps, block_length, confidence, rule, threshold, factor, schedule,
    stop_on_eos, sparse) are accepted as extra fields.

Load: ``max_queue`` requests may wait for a running slot (requests that fit the engine's free
running slots do not count); beyond that a request gets 429 with ``Retry-After``. A client that
disconnects aborts the engine request, which frees its KV pages at the next step boundary.
"""

from __future__ import annotations

import contextlib
import hmac
import html
import logging
import os

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response

from dllm_jax.server import errors, handlers
from dllm_jax.server import protocol as P
from dllm_jax.server.errors import APIError
from dllm_jax.server.state import ServerState
from dllm_jax.engine.text import TextAssembler  # noqa: F401 - re-exported (older imports)
from dllm_jax.server.worker import EngineWorker, describe

log = logging.getLogger("dllm_jax.server")

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
DEFAULT_MAX_BODY_BYTES = 1 << 20


def create_app(llm, *, api_key: str | None = None, model_name: str | None = None,
               max_queue: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               shutdown_timeout: float = 30.0) -> FastAPI:
  """A FastAPI app serving ``llm`` (a :class:`dllm_jax.engine.engine.LLM`, or a list of them:
  data-parallel replicas on disjoint devices behind this one front end, least-loaded routing).

  api_key: if set, /v1/*, /metrics and the details of /health need ``Authorization: Bearer
    <api_key>`` (401 otherwise; /health still answers a bare liveness status).
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
  worker = _worker(llms, max_queue, metrics)
  metrics.bind(worker)
  app = FastAPI(title="dllm-jax", version="0.1.0", lifespan=_lifespan, redirect_slashes=False,
                description="Diffusion LM serving: OpenAI-compatible and native endpoints.")
  app.state.dllm = ServerState(llm, worker, model_name, api_key, max_body_bytes, metrics,
                               shutdown_timeout=shutdown_timeout)
  app.add_middleware(metrics.middleware_class())
  app.add_middleware(_NoTrailingSlash)  # outermost: metrics see the normalised path
  errors.install(app, metrics, P.MODEL_NAMES)
  app.openapi = lambda: _openapi(app)
  for router in _routers():
    app.include_router(router)
  return app


def _worker(llms: list, max_queue: int, metrics):
  if len(llms) == 1:
    return EngineWorker(llms[0], max_queue=max_queue, on_finish=metrics.on_finish)
  from dllm_jax.server.router import ReplicaRouter  # data-parallel replicas, least-loaded

  router = None

  def on_finish(handle, out):
    metrics.on_finish(handle, out)
    router.forget(handle.rid)

  router = ReplicaRouter([EngineWorker(x, max_queue=max_queue, on_finish=on_finish)
                          for x in llms])
  return router


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
  state: ServerState = app.state.dllm
  state.worker.start()
  log.info("serving %s (max_queue %d)", state.model_name, state.worker.max_queue)
  try:
    yield
  finally:
    await state.worker.aclose(state.shutdown_timeout)


# Routes ------------------------------------------------------------------------------------------
def _state(request: Request) -> ServerState:
  return request.app.state.dllm


def authorized(request: Request) -> bool:
  key = _state(request).api_key
  if key is None:
    return True
  scheme, _, token = request.headers.get("authorization", "").partition(" ")
  return scheme.lower() == "bearer" and hmac.compare_digest(
      token.strip().encode("utf-8", "surrogateescape"), key.encode("utf-8", "surrogateescape"))


async def require_key(request: Request) -> None:
  if not authorized(request):
    raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                   type="invalid_request_error", code="invalid_api_key",
                   headers={"WWW-Authenticate": "Bearer"})


async def index(request: Request):
  try:
    with open(os.path.join(STATIC_DIR, "index.html"), encoding="utf-8") as fh:
      page = fh.read()
  except OSError:
    raise APIError(404, "the demo page is not installed (dllm_jax/server/static/index.html)",
                   code="not_found") from None
  return HTMLResponse(page.replace("{{MODEL_NAME}}", html.escape(_state(request).model_name)))


async def health(request: Request):
  """Liveness; the queue and KV-page details too when no key is set or it is sent."""
  state = _state(request)
  ok = state.worker.alive and state.worker.accepting
  body = {"status": "ok" if ok else "unavailable"}
  if authorized(request):
    body.update(describe(state.worker), model=state.model_name)
  return JSONResponse(body, status_code=200 if ok else 503)


async def metrics_text(request: Request):
  """Prometheus text format."""
  body, ctype = _state(request).metrics.render()
  return Response(body, media_type=ctype)


def _model_card(state: ServerState) -> dict:
  return {"id": state.model_name, "object": "model", "created": state.created,
          "owned_by": "dllm-jax", "max_model_len": state.max_len}


async def list_models(request: Request):
  """The served model (OpenAI list)."""
  return {"object": "list", "data": [_model_card(_state(request))]}


async def get_model(request: Request, model_id: str):
  state = _state(request)
  if model_id != state.model_name:
    raise APIError(404, f"the model {model_id!r} does not exist", param="model",
                   code="model_not_found")
  return _model_card(state)


async def completions(request: Request):
  """OpenAI completions; diffusion knobs ride along as extra fields."""
  return await handlers.completions(request, _state(request))


async def chat_completions(request: Request):
  """OpenAI chat completions (the model's chat template renders the messages)."""
  return await handlers.chat_completions(request, _state(request))


async def diffusion_generate(request: Request):
  """Native generation: every SamplingParams / SparseConfig field, optional step trace."""
  return await handlers.diffusion_generate(request, _state(request))


def _body(name: str) -> dict:
  return {"requestBody": {"required": True, "content": {"application/json": {
      "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def _routers() -> list[APIRouter]:
  public = APIRouter()
  public.add_api_route("/", index, methods=["GET"], include_in_schema=False)
  public.add_api_route("/health", health, methods=["GET"])
  api = APIRouter(dependencies=[Depends(require_key)])
  api.add_api_route("/metrics", metrics_text, methods=["GET"])
  api.add_api_route("/v1/models", list_models, methods=["GET"])
  api.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
  api.add_api_route("/v1/completions", completions, methods=["POST"],
                    openapi_extra=_body("CompletionRequest"))
  api.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"],
                    openapi_extra=_body("ChatCompletionRequest"))
  api.add_api_route("/v1/diffusion/generate", diffusion_generate, methods=["POST"],
                    openapi_extra=_body("GenerateRequest"))
  return [public, api]


def _openapi(app: FastAPI) -> dict:
  """FastAPI's schema plus the request bodies the handlers read themselves (they parse the JSON
  after checking its type and size, so FastAPI does not see the models)."""
  if app.openapi_schema is None:
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    schema.setdefault("components", {}).setdefault("schemas", {}).update(P.openapi_schemas())
    app.openapi_schema = schema
  return app.openapi_schema


class _NoTrailingSlash:
  """Serve ``/metrics/`` as ``/metrics`` (pure ASGI): no slash redirect, whose Location would
  be built from the client's Host header."""

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    path = scope.get("path", "")
    if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
      scope = dict(scope, path=path.rstrip("/") or "/")
      raw = scope.get("raw_path")
      if raw is not None:
        scope["raw_path"] = raw.rstrip(b"/") or b"/"
    await self.app(scope, receive, send)
