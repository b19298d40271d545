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
from dllm_jax.server.text import TextAssembler
from dllm_jax.server.worker import Handle, QueueFull, ShuttingDown


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
                   endpoint="diffusion")
  tok = state.tokenizer
  asm = TextAssembler(tok, state.eos_ids) if tok is not None else None
  if req.stream:
    return StreamingResponse(_native_stream(handle, asm, state), media_type=SSE_MEDIA_TYPE,
                             headers=SSE_HEADERS)
  out = await _collect(request, handle, asm, state)
  state.metrics.observe("diffusion", handle, asm.n_tokens if asm else len(out.token_ids),
                        len(prompt_ids))
  return _native_result(handle, out, asm, state, with_trace=req.return_trace)


# Submission --------------------------------------------------------------------------------------
def _submit(state: ServerState, prompt_ids, sp, sparse, *, trace: bool, prefix: str,
            endpoint: str) -> Handle:
  w = state.worker
  handle = Handle(w.new_id(f"{prefix}-{uuid.uuid4().hex[:12]}"), asyncio.get_running_loop(),
                  prompt_ids, sp, sparse, trace=trace, endpoint=endpoint)
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


async def _collect(request: Request, handle: Handle, asm: TextAssembler | None,
                   state: ServerState):
  """The GenerationOutput of a non-streamed request (None when a stop string ended it)."""
  events = updates(handle, state, asm, decode_prefixes=bool(asm and asm.stops),
                   request=request)
  async with contextlib.aclosing(events):
    async for u in events:
      if u.kind == "done":
        return u.out
      if u.kind == "error":
        status, msg, code = u.error
        raise APIError(status, msg, code=code)
  raise APIError(500, "the request ended without a result", code="internal_error")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def _sse_error(error: tuple) -> str:
  status, msg, code = error
  return sse(error_body(msg, type_for(status), None, code))


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
                   prefix="chatcmpl" if chat else "cmpl", endpoint=endpoint)
  asm = TextAssembler(state.tokenizer, state.eos_ids, limit=limit, stops=stops)
  base = {"id": handle.orig_rid, "created": handle.created, "model": state.model_name,
          "system_fingerprint": None}
  if req.stream:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(
        _openai_stream(handle, asm, state, base, chat=chat, include_usage=include_usage),
        media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
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


async def _openai_stream(handle: Handle, asm: TextAssembler, state: ServerState, base: dict,
                         *, chat: bool, include_usage: bool):
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
  async with contextlib.aclosing(updates(handle, state, asm)) as events:
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
        break
  yield sse(chunk(None if chat else "", asm.finish_reason))
  state.metrics.observe(handle.endpoint, handle, asm.n_tokens, len(handle.prompt_ids))
  if include_usage:
    yield sse({**base, "object": obj, "choices": [],
               "usage": _usage(len(handle.prompt_ids), asm.n_tokens)})
  yield DONE


# Native ------------------------------------------------------------------------------------------
def _canvas_event(handle: Handle, k: int, row: list[int], t: float, state: ServerState) -> dict:
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


def _native_result(handle: Handle, out, asm: TextAssembler | None, state: ServerState, *,
                   with_trace: bool) -> dict:
  finished_at = (out.metrics or {}).get("finish") or time.perf_counter()
  elapsed = max(finished_at - handle.t0, 1e-9)
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


async def _native_stream(handle: Handle, asm: TextAssembler | None, state: ServerState):
  async with contextlib.aclosing(updates(handle, state, asm)) as events:
    async for u in events:
      if u.kind == "heartbeat":
        yield KEEPALIVE
      elif u.kind == "delta":
        yield sse({"object": "diffusion.delta", "id": handle.orig_rid, "delta": u.text,
                   "prefix": u.prefix})
      elif u.kind == "step":
        yield sse(_canvas_event(handle, *u.step, state))
      elif u.kind == "error":
        yield _sse_error(u.error)
        yield DONE
        return
      elif u.kind == "done":
        state.metrics.observe("diffusion", handle, asm.n_tokens if asm else 0,
                              len(handle.prompt_ids))
        yield sse(_native_result(handle, u.out, asm, state, with_trace=False))
        yield DONE
        return
