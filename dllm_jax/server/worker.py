"""The engine thread of the server: one ``LLM`` stepped by one background thread.

The engine is not thread-safe except ``add_request`` / ``abort`` (a locked intake), so every
``step()`` runs in :class:`EngineWorker`'s thread, which claims the engine (``LLM.claim``). HTTP
handlers talk to it through a :class:`Handle` per request: the engine thread posts events onto
the handle with ``loop.call_soon_threadsafe`` and the handler consumes them in order. An event is
either the engine's own :class:`~dllm_jax.engine.outputs.RequestOutput` (PREFIX: the committed
prefix and its text grew, consecutive ones coalesce as each supersedes the previous one; STEP:
the canvas after a step, only with return_trace; FINISHED: the request ended) or a
:class:`Failure` (the server ended the request: HTTP status, message, code).

Admission: ``max_queue`` bounds the requests that wait for a running slot, counted as the
requests in flight that are not running beyond the engine's free running slots (a burst that
fits the free slots is never refused). A request the engine's own intake cannot take yet
(``QueueFull``) is parked here, in order, and fed to the engine by its thread between steps.

Failure isolation: an exception inside ``llm.step()`` does not stop the loop. ``llm.recover``
ends the requests the failed step may have left half done (ERROR outputs; their KV pages return
to the pool, a consumed pool is rebuilt) and those are retried from scratch one at a time, when
the engine is otherwise idle (or after ``retry_wait_s``); decoding is deterministic and
batch-invariant, so a retry gives the same tokens and a stream simply continues. A request that
is in a second failed step gets its own error (HTTP 500) and the others go on.

Nothing is kept after a request is delivered: handles exist only while a request is in flight.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Union

from dllm_jax.engine.core import QueueFull
from dllm_jax.engine.outputs import OutputKind, RequestOutput

log = logging.getLogger("dllm_jax.server")

__all__ = ["EngineWorker", "Failure", "Handle", "QueueFull", "ShuttingDown", "describe"]


class ShuttingDown(RuntimeError):
  """The server no longer accepts requests (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class Failure:
  """The server ended a request: the HTTP ``status``, a ``message`` and an error ``code``."""

  status: int
  message: str
  code: str | None = None


Event = Union[RequestOutput, Failure]


@dataclasses.dataclass(eq=False)
class Handle:
  """One in-flight request as the HTTP side sees it. ``stream``: the handler wants PREFIX (and
  with ``trace`` STEP) events, not only the end; ``stops`` / ``limit``: the text's stop strings
  and token cut (OpenAI ``stop`` / ``max_tokens``), applied by the engine."""

  rid: str
  loop: asyncio.AbstractEventLoop
  prompt_ids: list[int]
  sp: Any
  sparse: Any
  trace: bool = False
  endpoint: str = ""
  stream: bool = False
  stops: list[str] = dataclasses.field(default_factory=list)
  limit: int | None = None
  t0: float = dataclasses.field(default_factory=time.perf_counter)
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))
  trace_sent: int = 0       # steps already posted (survives a retry: steps repeat)
  strikes: int = 0          # failed engine steps this request was part of
  retries: int = 0
  retry_since: float = 0.0
  cancelled: bool = False   # the client went away / the handler stopped waiting
  first_token_t: float | None = None

  def __post_init__(self):
    self.orig_rid = self.rid
    self.stops = list(self.stops or [])
    self._events: collections.deque[Event] = collections.deque()  # touched in the loop only
    self._ready = asyncio.Event()

  def post(self, event: Event) -> None:
    """Any thread: queue ``event`` for the handler."""
    try:
      self.loop.call_soon_threadsafe(self._put, event)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
      pass

  def _put(self, event: Event) -> None:
    ev = self._events
    if _is_prefix(event) and ev and _is_prefix(ev[-1]):
      ev[-1] = event  # a longer committed prefix (its whole text) supersedes the unread one
    else:
      ev.append(event)
    self._ready.set()

  async def next_event(self, timeout: float) -> Event | None:
    """The next event, or None after ``timeout`` seconds without one."""
    if not self._events:
      self._ready.clear()
      try:
        await asyncio.wait_for(self._ready.wait(), timeout)
      except asyncio.TimeoutError:
        return None
    return self._events.popleft()


class EngineWorker:
  """Owns the engine thread. ``max_queue``: requests accepted that may wait for a running
  slot."""

  def __init__(self, llm, *, max_queue: int, retry_wait_s: float = 2.0, on_finish=None):
    self.llm = llm
    self.core = llm.core  # builds the engine (KV pool) now, not in the first request
    self.max_queue = int(max_queue)
    self.retry_wait_s = retry_wait_s
    self.on_finish = on_finish  # callback(handle, output) in the engine thread (metrics)
    self._handles: dict[str, Handle] = {}    # requests the engine knows
    self._pending: collections.deque[Handle] = collections.deque()  # accepted, not yet added
    self._retry: collections.deque[Handle] = collections.deque()
    self._hlock = threading.Lock()
    self._submit_lock = threading.Lock()
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._ids = itertools.count()
    self.accepting = False
    self.step_errors = 0
    self.requests_failed = 0
    self.requests_retried = 0
    self.last_error: str | None = None
    self.started_at = time.time()
    # (perf_counter, committed tokens so far) after every step, for tokens/s.
    self._samples: collections.deque = collections.deque(maxlen=4096)

  # Lifecycle -----------------------------------------------------------------------------------
  def start(self) -> None:
    if self._thread is not None:
      return
    self.llm.claim(self)
    self._stop.clear()
    self._thread = threading.Thread(target=self._run, name="dllm-engine", daemon=True)
    self._thread.start()
    self.accepting = True

  @property
  def alive(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  def in_flight(self) -> int:
    with self._hlock:
      return len(self._handles) + len(self._retry) + len(self._pending)

  def waiting(self) -> int:
    """Requests waiting for a running slot: in flight, not running, beyond the free slots."""
    running = self.core.num_running()
    free = max(0, self.core.cfg.max_running - running)
    return max(0, self.in_flight() - running - free)

  async def aclose(self, drain_timeout: float = 30.0) -> None:
    """Graceful shutdown: stop accepting, let in-flight requests finish for up to
    ``drain_timeout`` seconds, cancel the rest (their pages are freed), join the thread."""
    self.accepting = False
    deadline = time.monotonic() + drain_timeout
    while self.in_flight() and time.monotonic() < deadline and self.alive:
      await asyncio.sleep(0.05)
    with self._hlock:
      left = list(self._handles.values()) + list(self._retry) + list(self._pending)
      self._handles.clear()
      self._retry.clear()
      self._pending.clear()
    for h in left:
      h.cancelled = True
      h.post(Failure(503, "the server is shutting down; request cancelled", "shutting_down"))
      self.llm.abort(h.rid)
    deadline = time.monotonic() + 10.0
    while self.alive and self.llm.has_unfinished() and time.monotonic() < deadline:
      await asyncio.sleep(0.02)  # the loop frees the aborted requests' pages
    self._stop.set()
    self._wake.set()
    if self._thread is not None:
      await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)
    self._thread = None
    self.llm.unclaim(self)

  # Intake (any thread) -------------------------------------------------------------------------
  def new_id(self, prefix: str) -> str:
    return f"{prefix}-{next(self._ids)}"

  def submit(self, handle: Handle) -> None:
    """Accept ``handle``'s request. Raises ValueError (can never run), QueueFull, ShuttingDown."""
    if not self.accepting or not self.alive:
      raise ShuttingDown("the server is shutting down" if not self.accepting
                         else "the engine thread is not running")
    with self._submit_lock:
      if self.waiting() >= self.max_queue:
        raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
      with self._hlock:
        park = bool(self._pending)  # keep arrival order behind parked requests
      if not park:
        try:
          self._add(handle)
        except QueueFull:  # the engine's intake is full for now; our queue is not
          park = True
      if park:
        sparse = self.llm.engine_config.sparse if handle.sparse is None else handle.sparse
        self.core.validate(handle.prompt_ids, handle.sp, sparse)  # ValueError now, not later
        with self._hlock:
          self._pending.append(handle)
    self._wake.set()

  def _add(self, handle: Handle) -> None:
    with self._hlock:
      self._handles[handle.rid] = handle
    try:
      self.llm.add_request(handle.prompt_ids, handle.sp, handle.sparse, request_id=handle.rid,
                           stream=handle.stream, return_trace=handle.trace, stop=handle.stops,
                           max_tokens=handle.limit)
    except BaseException:
      with self._hlock:
        self._handles.pop(handle.rid, None)
      raise

  def abort(self, handle: Handle) -> None:
    """The client is gone (or no longer needs the rest): free the request's pages."""
    handle.cancelled = True
    with self._hlock:
      for q in (self._retry, self._pending):
        if handle in q:
          q.remove(handle)
    self.llm.abort(handle.rid)
    self._wake.set()

  # Telemetry ----------------------------------------------------------------------------------
  def tokens_per_second(self, window: float = 10.0) -> float:
    samples = list(self._samples)
    if len(samples) < 2:
      return 0.0
    now = time.perf_counter()
    t_last, c_last = samples[-1]
    if now - t_last > window:
      return 0.0
    first = next(((t, c) for t, c in samples if now - t <= window), samples[0])
    dt = t_last - first[0]
    return (c_last - first[1]) / dt if dt > 0 else 0.0

  # The engine thread --------------------------------------------------------------------------
  def _run(self) -> None:
    failures = 0
    while not self._stop.is_set():
      try:
        self._feed_pending()
        self._submit_retries()
        self._wake.clear()
        if not self.llm.has_unfinished():
          self._wake.wait(0.05)
          continue
        try:
          outs = self.llm.step()
        except Exception as e:  # noqa: BLE001 - one bad step must not stop the server
          failures += 1
          self._step_failed(e)
          time.sleep(min(0.005 * failures, 0.5))
          continue
        failures = 0
        self._deliver(outs)
      except Exception:  # noqa: BLE001 - a bug in our bookkeeping: log, keep the thread alive
        log.exception("engine loop error")
        time.sleep(0.05)

  def _feed_pending(self) -> None:
    """Hand parked requests to the engine, in order, while its intake takes them."""
    while True:
      with self._hlock:
        if not self._pending:
          return
        h = self._pending.popleft()
      if h.cancelled:
        continue
      try:
        self._add(h)
      except QueueFull:
        with self._hlock:
          self._pending.appendleft(h)
        return
      except Exception as e:  # noqa: BLE001 - validated at submit; report, never stall
        h.post(Failure(400, str(e)))
        continue
      if h.cancelled:  # aborted while being added
        self.llm.abort(h.rid)

  def _deliver(self, outs: list[RequestOutput]) -> None:
    now = time.perf_counter()
    for out in outs:
      with self._hlock:
        h = self._handles.get(out.request_id)
        if h is not None and out.finished:
          del self._handles[out.request_id]
      if h is None:
        continue
      if h.first_token_t is None and out.metrics.get("first_token") is not None:
        h.first_token_t = out.metrics["first_token"]
      if not out.finished:
        if h.cancelled:
          continue
        if out.kind is OutputKind.STEP:
          if out.nfe <= h.trace_sent:
            continue  # a retry repeats the steps already posted
          h.trace_sent = out.nfe
        h.post(out)
      elif out.kind is OutputKind.ERROR:  # a failed engine step ended it
        h.strikes += 1
        if h.cancelled:
          continue
        if not self.accepting:
          h.post(Failure(503, "the request was cancelled", "cancelled"))
        elif h.strikes >= 2:
          self._fail(h, "the engine failed while running this request")
        else:
          h.retry_since = now
          with self._hlock:
            self._retry.append(h)
      elif out.finish_reason == "abort":
        if not h.cancelled:
          h.post(Failure(503, "the request was cancelled", "cancelled"))
      else:
        h.post(out)
        if self.on_finish is not None:
          try:
            self.on_finish(h, out)
          except Exception:  # noqa: BLE001
            log.exception("on_finish hook failed")
    self._samples.append((now, self.core.stats.committed_tokens))

  def _fail(self, h: Handle, msg: str) -> None:
    self.requests_failed += 1
    h.post(Failure(500, msg, "engine_error"))

  def _step_failed(self, exc: Exception) -> None:
    self.step_errors += 1
    self.last_error = f"{type(exc).__name__}: {exc}"
    log.error("engine step failed: %s", self.last_error, exc_info=exc)
    # The engine ends every request the failed step may have left half done (the requests of
    # other callers too) and rebuilds a consumed KV pool; ours are retried from scratch.
    self._deliver(self.llm.recover(exc))

  def _submit_retries(self) -> None:
    with self._hlock:
      if not self._retry:
        return
      h = self._retry[0]
    idle = self.core.num_running() == 0 and self.core.num_waiting() == 0
    if not idle and time.perf_counter() - h.retry_since < self.retry_wait_s:
      return
    with self._hlock:
      if not self._retry or self._retry[0] is not h:
        return
      self._retry.popleft()
    if h.cancelled:
      return
    h.retries += 1
    self.requests_retried += 1
    h.rid = f"{h.orig_rid}.retry{h.retries}"
    try:
      self._add(h)
    except QueueFull:  # the engine's intake is full: retry at the next turn
      h.retries -= 1
      self.requests_retried -= 1
      with self._hlock:
        self._retry.appendleft(h)
    except Exception as e:  # noqa: BLE001
      self._fail(h, f"could not retry the request: {e}")


def describe(worker) -> dict[str, Any]:
  """A snapshot for /health (a worker or a ReplicaRouter; pages of the first engine)."""
  core = worker.core
  return {
      "engine_thread": "running" if worker.alive else "stopped",
      "accepting": worker.accepting,
      "waiting": worker.waiting(),
      "running": core.num_running(),
      "in_flight": worker.in_flight(),
      "kv_pages_free": core.pages.num_free,
      "kv_pages_total": core.pages.capacity,
      "engine_steps": core.stats.steps,
      "step_errors": worker.step_errors,
  }


def _is_prefix(event) -> bool:
  return isinstance(event, RequestOutput) and event.kind is OutputKind.PREFIX
