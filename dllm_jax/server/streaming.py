"""The one event loop behind every answer, and server-sent-event framing.

:func:`updates` turns a request's engine events into text deltas, trace steps, heartbeats and
its end; the OpenAI stream, the native stream and the collected (non-streamed) answers all
consume it. Whenever it stops before the engine finished the request (a stop string, a client
that went away, a cancelled response), the engine request is aborted at once, which frees its
KV pages at the next step boundary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any, AsyncIterator

from dllm_jax.server.errors import client_closed
from dllm_jax.server.text import TextAssembler
from dllm_jax.server.worker import Handle

HEARTBEAT_S = 5.0          # a streamed response sends a comment line after this much silence
DISCONNECT_CHECK_S = 1.0   # a collected answer checks this often whether its client is gone
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_MEDIA_TYPE = "text/event-stream"
KEEPALIVE = ": keep-alive\n\n"


def sse(obj: Any) -> str:
  """One ``data:`` event: a JSON object, or a bare string such as ``[DONE]``."""
  data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False,
                                                     separators=(",", ":"))
  return f"data: {data}\n\n"


DONE = sse("[DONE]")


@dataclasses.dataclass
class Update:
  """One thing for a response to send. kind: "delta" (new text; ``prefix``: committed tokens),
  "step" (``step``: (k, row, t) of the trace), "heartbeat", "done" (``out``: the
  GenerationOutput; None when a stop string ended the request) or "error" (``error``:
  (status, message, code))."""

  kind: str
  text: str = ""
  prefix: int = 0
  step: tuple | None = None
  out: Any = None
  error: tuple | None = None


async def updates(handle: Handle, state, asm: TextAssembler | None, *,
                  decode_prefixes: bool = True, request=None) -> AsyncIterator[Update]:
  """The request's updates until "done" or "error".

  decode_prefixes: turn committed prefixes into deltas as they grow (a collected answer needs
    this only to notice a stop string early).
  request: given for a collected answer, whose client is polled every DISCONNECT_CHECK_S and
    gets a 499 when gone (a streamed response notices that itself and is cancelled).
  """
  worker, metrics = state.worker, state.metrics
  idle = DISCONNECT_CHECK_S if request is not None else HEARTBEAT_S
  ended = False
  checked = time.monotonic()
  try:
    while True:
      ev = await handle.next_event(idle)
      if request is not None and (ev is None or time.monotonic() - checked > idle):
        checked = time.monotonic()
        if await request.is_disconnected():
          metrics.client_gone("generation")
          raise client_closed()
      if ev is None:
        if request is None:
          yield Update("heartbeat")
        continue
      kind = ev[0]
      if kind == "prefix":
        if asm is None or not decode_prefixes:
          continue
        delta = asm.update(ev[1])
        if delta:
          yield Update("delta", delta, prefix=len(ev[1]))
        if asm.final:  # a stop string ended it: free the pages now
          ended = True
          worker.abort(handle)
          yield Update("done")
          return
      elif kind == "step":
        yield Update("step", step=ev[1:])
      elif kind == "done":
        ended = True
        out = ev[1]
        if asm is not None:
          delta = asm.update(out.token_ids, True)
          if delta:
            yield Update("delta", delta, prefix=len(out.token_ids))
        yield Update("done", out=out)
        return
      elif kind == "error":
        ended = True
        yield Update("error", error=ev[1:])
        return
  except (asyncio.CancelledError, GeneratorExit):
    if not ended:  # the response was cancelled: its client went away (or the server stops)
      metrics.client_gone("generation")
    raise
  finally:
    if not ended:
      worker.abort(handle)
