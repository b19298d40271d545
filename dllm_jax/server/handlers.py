"""The generation endpoints: OpenAI completions / chat and the native diffusion endpoint.

Each handler reads and maps its body (:mod:`inputs`), submits one engine request, then either
streams or collects it through the one event loop (:func:`streaming.updates`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from dllm_jax.server import inputs as I
from dllm_jax.server import protocol as P
from dllm_jax.server.errors import APIError, error_body, type_for
from dllm_jax.server.state import ServerState
from dllm_jax.server.streaming import (DONE, KEEPALIVE, SSE_HEADERS, SSE_MEDIA_TYPE, sse,
                                       updates)
from dllm_jax.server.worker import Failure, Handle, QueueFull, ShuttingDown


# Endpoints ---------------------------------------------------------------------------------------
async def completions(request: Request, state: ServerState):
  req = await I.read_body(request, P.CompletionRequest, state)
  I.check_openai(req, state)
  prompt_ids = await run_in_threadpool(I.completion_prompt_ids, req.prompt, state)
  return await _openai(request, req, prompt_ids, state, chat=False)


async def chat_completions(request: Request, state: ServerState):
  req = await I.read_body(request, P.ChatCompletionRequest, state)
  I.check_openai(req, state)
  if req.max_completion_tokens is not None:
    if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
      raise APIError(400, "max_tokens and max_completion_tokens disagree",
                     param="max_completion_tokens")
    req.max_tokens = req.max_completion_tokens
  prompt_ids = await run_in_threadpool(I.chat_prompt_ids, req.messages, state)
  return await _openai(request, req, prompt_ids, state, chat=True)


async def diffusion_generate(request: Request, state: ServerState):
  req = await I.read_body(request, P.GenerateRequest, state)
  I.check_model(req.model, state)
  if (req.prompt is None) == (req.messages is None):
    raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
  if req.messages is not None:
    prompt_ids = await run_in_threadpool(I.chat_prompt_ids, req.messages, state)
  else:
    prompt_ids = await run_in_threadpool(I.completion_prompt_ids, req.prompt, state)
  sp = I.sampling_params({k: getattr(req, k) for k in I.SAMPLING_FIELDS}, state)
  sparse = I.sparse_config(req.sparse)
  I.check_context(prompt_ids, sp, state)
  handle = _submit(state, prompt_ids, sp, sparse, trace=req.return_trace, prefix="gen",
                   endpoint="diffusion", stream=req.stream)
  if req.stream:
    return StreamingResponse(_native_stream(handle, state), media_type=SSE_MEDIA_TYPE,
                             headers=SSE_HEADERS)
  out = await _collect(request, handle, state)
  state.metrics.observe("diffusion", handle, _completion_tokens(out), len(prompt_ids))
  return _native_result(handle, out, state, with_trace=req.return_trace)


# Submission --------------------------------------------------------------------------------------
def _submit(state: ServerState, prompt_ids, sp, sparse, *, trace: bool, prefix: str,
            endpoint: str, stream: bool, stops: list[str] | None = None,
            limit: int | None = None) -> Handle:
  w = state.worker
  handle = Handle(w.new_id(f"{prefix}-{uuid.uuid4().hex[:12]}"), asyncio.get_running_loop(),
                  prompt_ids, sp, sparse, trace=trace, endpoint=endpoint, stream=stream,
                  stops=stops, limit=limit)
  try:
    w.submit(handle)
  except QueueFull as e:
    state.metrics.rejected("queue_full")
    raise APIError(429, f"{e}; retry later", code="queue_full",
                   headers={"Retry-After": "1"}) from None
  except ShuttingDown as e:
    state.metrics.rejected("unavailable")
    raise APIError(503, str(e), code="unavailable", headers={"Retry-After": "5"}) from None
  except ValueError as e:
    msg = str(e)
    code = "context_length_exceeded" if "max_model_len" in msg else None
    state.metrics.rejected("invalid")
    param = "prompt" if code or msg.startswith("prompt") else (
        "sparse" if "sparse" in msg else None)
    raise APIError(400, msg, param=param, code=code) from None
  return handle


async def _collect(request: Request, handle: Handle, state: ServerState):
  """The engine's FINISHED output of a non-streamed request."""
  events = updates(handle, state, request=request)
  async with contextlib.aclosing(events):
    async for u in events:
      if u.kind == "done":
        return u.out
      if u.kind == "error":
        raise APIError(u.error.status, u.error.message, code=u.error.code)
  raise APIError(500, "the request ended without a result", code="internal_error")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def _completion_tokens(out) -> int:
  """Generated tokens up to the end of the text (before EOS / EoT or the stop string); the
  whole canvas without a tokenizer."""
  return out.num_text_tokens if out.text is not None else len(out.token_ids)


def _openai_finish_reason(out) -> str:
  """OpenAI's finish_reason: "stop" (an EOS / EoT within the text, or a stop string) or
  "length"."""
  return "stop" if out.finish_reason in ("eos", "stop") else "length"


def _sse_error(error: Failure) -> str:
  return sse(error_body(error.message, type_for(error.status), None, error.code))


# OpenAI ------------------------------------------------------------------------------------------
async def _openai(request: Request, req, prompt_ids, state: ServerState, *, chat: bool):
  if state.tokenizer is None:
    raise APIError(400, "this model has no tokenizer; use /v1/diffusion/generate with token ids")
  sp, limit = I.openai_sampling(req, state)
  sparse = I.sparse_config(req.sparse)
  I.check_context(prompt_ids, sp, state, max_tokens=req.max_tokens)
  stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
  endpoint = "chat" if chat else "completions"
  handle = _submit(state, prompt_ids, sp, sparse, trace=False,
                   prefix="chatcmpl" if chat else "cmpl", endpoint=endpoint, stream=req.stream,
                   stops=stops, limit=limit)
  base = {"id": handle.orig_rid, "created": handle.created, "model": state.model_name,
          "system_fingerprint": None}
  if req.stream:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(
        _openai_stream(handle, state, base, chat=chat, include_usage=include_usage),
        media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
  out = await _collect(request, handle, state)
  n = _completion_tokens(out)
  state.metrics.observe(endpoint, handle, n, len(prompt_ids))
  usage = _usage(len(prompt_ids), n)
  finish = _openai_finish_reason(out)
  if chat:
    return {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage}
  return {**base, "object": "text_completion",
          "choices": [{"index": 0, "text": out.text, "logprobs": None,
                       "finish_reason": finish}],
          "usage": usage}


async def _openai_stream(handle: Handle, state: ServerState, base: dict, *, chat: bool,
                         include_usage: bool):
  obj = "chat.completion.chunk" if chat else "text_completion"

  def chunk(text: str | None, finish: str | None, *, role: bool = False) -> dict:
    if chat:
      delta: dict = {"role": "assistant"} if role else {}
      if text is not None:
        delta["content"] = text
      choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
      choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    c = {**base, "object": obj, "choices": [choice]}
    if include_usage:
      c["usage"] = None
    return c

  if chat:
    yield sse(chunk("", None, role=True))
  out = None
  async with contextlib.aclosing(updates(handle, state)) as events:
    async for u in events:
      if u.kind == "heartbeat":
        yield KEEPALIVE
      elif u.kind == "delta":
        yield sse(chunk(u.text, None))
      elif u.kind == "error":
        yield _sse_error(u.error)
        yield DONE
        return
      elif u.kind == "done":
        out = u.out
        break
  if out is None:
    return
  n = _completion_tokens(out)
  yield sse(chunk(None if chat else "", _openai_finish_reason(out)))
  state.metrics.observe(handle.endpoint, handle, n, len(handle.prompt_ids))
  if include_usage:
    yield sse({**base, "object": obj, "choices": [], "usage": _usage(len(handle.prompt_ids), n)})
  yield DONE


# Native ------------------------------------------------------------------------------------------
def _canvas_event(handle: Handle, out, state: ServerState) -> dict:
  """A ``diffusion.step`` event of a STEP output."""
  k, row, t = out.nfe, out.canvas, out.time
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


def _native_result(handle: Handle, out, state: ServerState, *, with_trace: bool) -> dict:
  finished_at = (out.metrics or {}).get("finish") or time.perf_counter()
  elapsed = max(finished_at - handle.t0, 1e-9)
  sp = handle.sp
  res = {
      "id": handle.orig_rid, "object": "diffusion.generation", "created": handle.created,
      "model": state.model_name,
      "text": out.text,
      "token_ids": list(out.token_ids), "finish_reason": out.finish_reason, "nfe": out.nfe,
      "mask_token_id": state.mask_id,
      "usage": _usage(len(handle.prompt_ids), _completion_tokens(out)),
      "timing": {"total_s": round(elapsed, 4),
                 "ttft_s": (round(handle.first_token_t - handle.t0, 4)
                            if handle.first_token_t else None),
                 "tokens_per_s": round(sp.gen_length / elapsed, 2)},
      "sampling_params": {k: getattr(sp, k) for k in I.SAMPLING_FIELDS},
      "sparse": _sparse_dict(handle.sparse, state),
  }
  if with_trace:
    res["trace"] = out.trace
  return res


def _sparse_dict(sparse, state: ServerState):
  if sparse is None:
    sparse = state.llm.engine_config.sparse
  if sparse is None or not sparse.enabled:
    return None
  return {"enabled": True, "keep_ratio": sparse.keep_ratio, "pool_kernel": sparse.pool_kernel,
          "delay": sparse.delay, "selection": sparse.selection}


async def _native_stream(handle: Handle, state: ServerState):
  async with contextlib.aclosing(updates(handle, state)) as events:
    async for u in events:
      if u.kind == "heartbeat":
        yield KEEPALIVE
      elif u.kind == "delta":
        yield sse({"object": "diffusion.delta", "id": handle.orig_rid, "delta": u.text,
                   "prefix": u.prefix})
      elif u.kind == "step":
        yield sse(_canvas_event(handle, u.out, state))
      elif u.kind == "error":
        yield _sse_error(u.error)
        yield DONE
        return
      elif u.kind == "done":
        state.metrics.observe("diffusion", handle, _completion_tokens(u.out),
                              len(handle.prompt_ids))
        yield sse(_native_result(handle, u.out, state, with_trace=False))
        yield DONE
        return
