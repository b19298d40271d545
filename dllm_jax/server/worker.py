"""The engine thread of the server: one ``LLM`` stepped by one background thread.

The engine is not thread-safe except ``add_request`` / ``abort`` (a locked intake), so every
``step()`` runs in :class:`EngineWorker`'s thread. HTTP handlers talk to it through a
:class:`Handle` per request: the engine thread posts events onto the handle with
``loop.call_soon_threadsafe`` and the handler consumes them in order:

    ("prefix", ids)            the committed left-contiguous prefix grew (stream callback;
                               consecutive ones coalesce: each supersedes the previous one)
    ("step", k, row, t)        generated positions after step k (only with return_trace)
    ("done", output, t)        the request finished (GenerationOutput)
    ("error", status, msg, code)  the request failed or was cancelled by the server

Admission: ``max_queue`` bounds the requests that wait for a running slot, counted as the
requests in flight that are not running beyond the engine's free running slots (a burst that
fits the free slots is never refused). A request the engine's own intake cannot take yet
(``QueueFull``) is parked here, in order, and fed to the engine by its thread between steps.

Failure isolation: an exception inside ``llm.step()`` does not stop the loop. The requests that
were running in the failed step are aborted (their KV pages return to the pool) and retried from
scratch one at a time, when the engine is otherwise idle (or after ``retry_wait_s``); decoding is
deterministic and batch-invariant, so a retry gives the same tokens and a stream simply continues.
A request that is in a second failed step gets its own error (HTTP 500) and the others go on.

Nothing is kept after a request is delivered: handles exist only while a request is in flight.
The few places that still reach into engine internals are the ``# ENGINE-API:`` functions at the
end of this module.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from typing import Any

from dllm_jax.engine.core import QueueFull

log = logging.getLogger("dllm_jax.server")

__all__ = ["EngineWorker", "Handle", "QueueFull", "ShuttingDown", "describe"]


class ShuttingDown(RuntimeError):
  """The server no longer accepts requests (HTTP 503)."""


class Handle:
  """One in-flight request as the HTTP side sees it."""

  def __init__(self, rid: str, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], sp,
               sparse, *, trace: bool = False, endpoint: str = ""):
    self.rid = rid
    self.orig_rid = rid
    self.loop = loop
    self._events: collections.deque[tuple] = collections.deque()  # touched in the loop only
    self._ready = asyncio.Event()
    self.prompt_ids = prompt_ids
    self.sp = sp
    self.sparse = sparse
    self.trace = trace
    self.endpoint = endpoint
    self.t0 = time.perf_counter()
    self.created = int(time.time())
    self.trace_sent = 0      # trace rows already posted (survives a retry: rows repeat)
    self.strikes = 0         # failed engine steps this request was part of
    self.retries = 0
    self.retry_pending = False
    self.retry_since = 0.0
    self.cancelled = False   # the client went away / the handler stopped waiting
    self.first_token_t: float | None = None

  def post(self, event: tuple) -> None:
    """Any thread: queue ``event`` for the handler."""
    try:
      self.loop.call_soon_threadsafe(self._put, event)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
      pass

  def _put(self, event: tuple) -> None:
    ev = self._events
    if event[0] == "prefix" and ev and ev[-1][0] == "prefix":
      ev[-1] = event  # a longer committed prefix supersedes the unread one
    else:
      ev.append(event)
    self._ready.set()

  async def next_event(self, timeout: float) -> tuple | None:
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
    _claim_engine(self.llm, self)
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
      h.post(("error", 503, "the server is shutting down; request cancelled", "shutting_down"))
      self.llm.abort(h.rid)
    deadline = time.monotonic() + 10.0
    while self.alive and self.llm.has_unfinished() and time.monotonic() < deadline:
      await asyncio.sleep(0.02)  # the loop frees the aborted requests' pages
    self._stop.set()
    self._wake.set()
    if self._thread is not None:
      await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)
    self._thread = None

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
                           stream=self._callback(handle), return_trace=handle.trace)
    except BaseException:
      with self._hlock:
        self._handles.pop(handle.rid, None)
      raise

  @staticmethod
  def _callback(handle: Handle):
    def cb(rid, ids, finished):  # engine thread, inside step(): keep it cheap, never raise
      if not finished and not handle.cancelled:
        if handle.first_token_t is None and ids:
          handle.first_token_t = time.perf_counter()
        handle.post(("prefix", ids))
    return cb

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
        h.post(("error", 400, str(e), None))
        continue
      if h.cancelled:  # aborted while being added
        self.llm.abort(h.rid)

  def _deliver(self, outs) -> None:
    now = time.perf_counter()
    for out in outs:
      _drop_kept_output(self.llm, out.request_id)
      with self._hlock:
        h = self._handles.pop(out.request_id, None)
      if h is None:
        continue
      if out.finish_reason == "abort":
        if h.retry_pending and not h.cancelled and self.accepting:
          h.retry_pending = False
          if h.strikes >= 2:
            self._fail(h, "the engine failed while running this request")
          else:
            h.retry_since = now
            with self._hlock:
              self._retry.append(h)
        elif not h.cancelled:
          h.post(("error", 503, "the request was cancelled", "cancelled"))
        continue
      if h.trace and out.trace is not None:
        self._post_trace(h, out.trace, now)
      h.post(("done", out, now))
      if self.on_finish is not None:
        try:
          self.on_finish(h, out)
        except Exception:  # noqa: BLE001
          log.exception("on_finish hook failed")
    with self._hlock:
      traced = [h for h in self._handles.values() if h.trace and not h.cancelled]
    for h in traced:
      rows = _live_trace(self.core, h.rid)
      if rows:
        self._post_trace(h, rows, now)
    self._samples.append((now, self.core.stats.committed_tokens))

  @staticmethod
  def _post_trace(h: Handle, rows: list, now: float) -> None:
    for k in range(h.trace_sent, len(rows)):
      h.post(("step", k + 1, list(rows[k]), now))
    h.trace_sent = max(h.trace_sent, len(rows))

  def _fail(self, h: Handle, msg: str) -> None:
    self.requests_failed += 1
    h.post(("error", 500, msg, "engine_error"))

  def _step_failed(self, exc: Exception) -> None:
    self.step_errors += 1
    self.last_error = f"{type(exc).__name__}: {exc}"
    log.error("engine step failed: %s", self.last_error, exc_info=exc)
    _repair_kv_pool(self.core)
    known = _engine_request_ids(self.core)
    suspects = _failed_step_requests(self.core)
    with self._hlock:
      items = list(self._handles.items())
    for rid, h in items:
      if rid not in known:  # finished inside the failed step; its output was lost
        with self._hlock:
          self._handles.pop(rid, None)
        self._fail(h, "the engine failed while finishing this request")
    for rid in suspects:
      with self._hlock:
        h = self._handles.get(rid)
      if h is not None:
        h.strikes += 1
        h.retry_pending = True
      # Abort every running request: the failed step may have left its cache state half
      # written. Requests without a handle (not ours) are aborted too, for the same reason.
      self.llm.abort(rid)

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


# Engine internals the server still needs. Each is one call site, to be replaced by a public
# engine method.

def _claim_engine(llm, worker: EngineWorker) -> None:
  # ENGINE-API: marks the LLM as stepped by this worker (llm._server_worker) so that a second
  # app cannot step the same engine from another thread.
  other = getattr(llm, "_server_worker", None)
  if other is not None and other is not worker and other.alive:
    raise RuntimeError("this LLM is already served by another running app; the engine "
                       "must be stepped by one thread only")
  llm._server_worker = worker


def _drop_kept_output(llm, request_id: str) -> None:
  # ENGINE-API: LLM keeps outputs for generate() in llm._outputs; the server never reads them.
  pending = getattr(llm, "_outputs", None)
  if isinstance(pending, dict):
    pending.pop(request_id, None)


def _live_trace(core, request_id: str) -> list | None:
  # ENGINE-API: the trace rows of a running request (core._requests[rid].trace); read in the
  # engine thread only, between steps.
  req = core._requests.get(request_id)
  return req.trace if req is not None else None


def _engine_request_ids(core) -> set[str]:
  # ENGINE-API: ids of the requests the engine still holds (core._requests under core._lock).
  with core._lock:
    return set(core._requests)


def _failed_step_requests(core) -> list[str]:
  # ENGINE-API: the requests a failed step ran (core.scheduler.running), or the waiting ones
  # when it failed before admitting any (core.scheduler.waiting).
  running = [r.request_id for r in list(core.scheduler.running)]
  return running or [r.request_id for r in list(core.scheduler.waiting)]


def _repair_kv_pool(core) -> None:
  # ENGINE-API: a step that failed after donating the KV pool leaves it deleted; allocate a new
  # one (core.cache = shard_cache(init_cache(core.pool_cfg))) as EngineCore.__init__ does. The
  # requests that used it are aborted and retried from scratch.
  try:
    import jax

    from dllm_jax.cache.page_pool import init_cache
    if any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(core.cache)):
      cache = init_cache(core.pool_cfg)
      runner = getattr(core, "runner", None)
      core.cache = runner.shard_cache(cache) if runner is not None else cache
  except Exception:  # noqa: BLE001
    log.exception("could not repair the KV pool")
