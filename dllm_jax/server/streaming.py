"""The one event loop behind every answer, and server-sent-event framing.

:func:`updates` turns a request's events (the engine's RequestOutputs, the worker's Failures) into
text deltas, trace steps, heartbeats and its end; the OpenAI stream, the native stream and the
collected (non-streamed) answers all consume it. The text itself (incremental detokenising, stop
strings, the max_tokens cut) is the engine's (engine/outputs.py): a delta is what the request's
text gained since the last one sent, so a retried request (whose text regrows from the start)
sends nothing twice. Whenever it stops before the engine finished the request (a client that
went away, a cancelled response), the engine request is aborted at once, which frees its KV
pages at the next step boundary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any, AsyncIterator

from dllm_jax.engine.outputs import OutputKind, RequestOutput
from dllm_jax.server.errors import client_closed
from dllm_jax.server.worker import Failure, Handle

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
  """One thing for a response to send. kind: "delta" (new ``text``; ``prefix``: committed
  tokens), "step" (``out``: the STEP output), "heartbeat", "done" (``out``: the FINISHED output)
  or "error" (``error``: the Failure)."""

  kind: str
  text: str = ""
  prefix: int = 0
  out: RequestOutput | None = None
  error: Failure | None = None


async def updates(handle: Handle, state, *, request=None) -> AsyncIterator[Update]:
  """The request's updates until "done" or "error".

  request: given for a collected answer, whose client is polled every DISCONNECT_CHECK_S and
    gets a 499 when gone (a streamed response notices that itself and is cancelled).
  """
  worker, metrics = state.worker, state.metrics
  idle = DISCONNECT_CHECK_S if request is not None else HEARTBEAT_S
  ended = False
  sent = 0  # characters of the request's text already yielded
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
      if isinstance(ev, Failure):
        ended = True
        yield Update("error", error=ev)
        return
      if ev.kind is OutputKind.STEP:
        yield Update("step", out=ev)
        continue
      if ev.text is not None and len(ev.text) > sent:
        yield Update("delta", ev.text[sent:], prefix=ev.prefix_len)
        sent = len(ev.text)
      if ev.finished:
        ended = True
        yield Update("done", out=ev)
        return
  except (asyncio.CancelledError, GeneratorExit):
    if not ended:  # the response was cancelled: its client went away (or the server stops)
      metrics.client_gone("generation")
    raise
  finally:
    if not ended:
      worker.abort(handle)
