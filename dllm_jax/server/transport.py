"""The HTTP transport: uvicorn's h11 protocol with read timeouts and a connection cap.

uvicorn has only a keep-alive timeout: a client that sends half a request line, or declares
``Content-Length: 500`` and sends 30 bytes, holds its connection (and a request task) forever.
:class:`GuardedH11Protocol` adds

  - a header timeout: the request line and headers must arrive within ``header_timeout_s`` of
    the connection opening (or of the first byte of a later request on a kept-alive connection);
  - a body timeout: the whole body must arrive within ``body_timeout_s`` of the headers;
  - a connection cap: a connection beyond ``max_connections`` open ones is answered 503 at
    once and closed.

A timed-out request is answered 408 and its connection closed; a handler still reading the body
sees a client disconnect. Answers written here use the server's OpenAI-style error body.

The subclass leans on uvicorn internals (``H11Protocol.conn``, ``cycle``, ``connections``), so
it is pinned to the uvicorn minor version it was written against: importing this module with
another one fails with a clear message (pyproject pins ``uvicorn>=0.55,<0.56``).

    from dllm_jax.server.transport import serve
    serve(create_app(llm), host="127.0.0.1", port=8000)   # blocks; SIGINT / SIGTERM: graceful
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time

import h11
import uvicorn

SUPPORTED_UVICORN = "0.55."
if not uvicorn.__version__.startswith(SUPPORTED_UVICORN):
  raise ImportError(
      f"dllm_jax.server.transport was written for uvicorn {SUPPORTED_UVICORN}x (it subclasses "
      f"uvicorn's h11 protocol); uvicorn {uvicorn.__version__} is installed: "
      f'pip install "uvicorn>=0.55,<0.56"')

from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402
from uvicorn.server import HANDLED_SIGNALS  # noqa: E402


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
  body = json.dumps({"error": {"message": message, "type": "invalid_request_error"
                               if status < 500 else "server_error", "param": None,
                               "code": code}}).encode()
  head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
          f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
  return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
  """H11Protocol with header / body read timeouts and a cap on open connections. The limits
  are class attributes: :func:`protocol_class` makes a subclass with the configured ones."""

  header_timeout_s: float = 10.0
  body_timeout_s: float = 30.0
  max_connections: int = 256

  def connection_made(self, transport) -> None:
    super().connection_made(transport)
    self._timer: asyncio.TimerHandle | None = None
    self._timing: str | None = None  # "header" / "body": what the armed timer waits for
    if len(self.connections) > self.max_connections:
      self.logger.warning("connection cap (%d) reached: answering 503", self.max_connections)
      self._reject(503, "Service Unavailable",
                   f"the server has too many open connections ({self.max_connections}); "
                   "retry later", "too_many_connections")
      return
    self._arm("header")

  def data_received(self, data: bytes) -> None:
    super().data_received(data)
    self._update_timer()

  def on_response_complete(self) -> None:
    super().on_response_complete()  # may start the next pipelined request
    self._update_timer()

  def connection_lost(self, exc) -> None:
    self._disarm()
    super().connection_lost(exc)

  # Timers --------------------------------------------------------------------------------------
  def _update_timer(self) -> None:
    """Arm the timer that matches what the client still owes us."""
    if self.transport.is_closing():
      self._disarm()
      return
    state = self.conn.their_state
    if state is h11.SEND_BODY:
      if self._timing != "body":
        self._arm("body")
    elif state is h11.IDLE:
      # Bytes of a next request on a kept-alive connection start its header clock; an idle
      # connection with nothing buffered is left to uvicorn's keep-alive timeout.
      if self._timing != "header" and self.conn.trailing_data[0]:
        self._arm("header")
      elif self._timing == "body":
        self._disarm()
    else:
      self._disarm()

  def _arm(self, what: str) -> None:
    self._disarm()
    delay = self.header_timeout_s if what == "header" else self.body_timeout_s
    self._timing = what
    self._timer = self.loop.call_later(delay, self._timed_out, what)

  def _disarm(self) -> None:
    if self._timer is not None:
      self._timer.cancel()
    self._timer, self._timing = None, None

  def _timed_out(self, what: str) -> None:
    self._timer, self._timing = None, None
    if self.transport.is_closing():
      return
    limit = self.header_timeout_s if what == "header" else self.body_timeout_s
    self.logger.info("request %s not received within %.3g s: closing the connection", what,
                     limit)
    started = self.cycle is not None and self.cycle.response_started
    if what == "header" and self.cycle is not None and not self.cycle.response_complete:
      started = True  # a response of the previous request is still being written
    if started:
      self._close()
    else:
      self._reject(408, "Request Timeout",
                   f"the request {'headers' if what == 'header' else 'body'} did not arrive "
                   f"within {limit:g} s", "request_timeout")

  def _reject(self, status: int, reason: str, message: str, code: str) -> None:
    self.transport.write(_raw_response(status, reason, message, code))
    self._close()

  def _close(self) -> None:
    if self.cycle is not None and not self.cycle.response_complete:
      self.cycle.disconnected = True  # the handler's sends become no-ops; receive -> disconnect
      self.cycle.message_event.set()
    self._disarm()
    self.transport.close()


def protocol_class(*, header_timeout_s: float, body_timeout_s: float,
                   max_connections: int) -> type[GuardedH11Protocol]:
  for name, v in (("header_timeout_s", header_timeout_s), ("body_timeout_s", body_timeout_s)):
    if not v > 0:
      raise ValueError(f"{name}: expected a positive number of seconds, got {v!r}")
  if isinstance(max_connections, bool) or not isinstance(max_connections, int) \
      or max_connections < 1:
    raise ValueError(f"max_connections: expected a positive integer, got {max_connections!r}")
  return type("GuardedH11Protocol", (GuardedH11Protocol,), {
      "header_timeout_s": float(header_timeout_s), "body_timeout_s": float(body_timeout_s),
      "max_connections": max_connections})


class _Server(uvicorn.Server):
  """uvicorn's Server, except that the SIGINT / SIGTERM that started the graceful shutdown is
  not re-raised once it is done (uvicorn does, which kills the process or raises
  KeyboardInterrupt out of serve()): serve() returns and the CLI exits 0."""

  @contextlib.contextmanager
  def capture_signals(self):
    if threading.current_thread() is not threading.main_thread():
      yield  # signals reach the main thread only
      return
    original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
    try:
      yield
    finally:
      for sig, handler in original.items():
        signal.signal(sig, handler)


def make_server(app, *, host: str, port: int, log_level: str = "info",
                header_timeout_s: float = 10.0, body_timeout_s: float = 30.0,
                max_connections: int = 256, shutdown_timeout_s: float = 30.0) -> uvicorn.Server:
  """A uvicorn Server for ``app`` on the guarded protocol (not started)."""
  if not shutdown_timeout_s >= 0:
    raise ValueError(f"shutdown_timeout_s: expected seconds >= 0, got {shutdown_timeout_s!r}")
  proto = protocol_class(header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s,
                         max_connections=max_connections)
  # In-flight requests get shutdown_timeout_s to finish (uvicorn waits for their tasks before
  # the app's lifespan shutdown stops the engine thread).
  config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=proto,
                          lifespan="on", timeout_graceful_shutdown=shutdown_timeout_s)
  return _Server(config)


def serve(app, *, host: str, port: int, log_level: str = "info",
          header_timeout_s: float = 10.0, body_timeout_s: float = 30.0,
          max_connections: int = 256, shutdown_timeout_s: float = 30.0) -> None:
  """Serve ``app`` until SIGINT / SIGTERM, then shut down gracefully (in-flight requests get
  ``shutdown_timeout_s``; a second SIGINT forces the exit) and return."""
  make_server(app, host=host, port=port, log_level=log_level,
              header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s,
              max_connections=max_connections, shutdown_timeout_s=shutdown_timeout_s).run()


class ServerThread:
  """``app`` served in a daemon thread on ``host``:<ephemeral port> (tests, notebooks).

      with ServerThread(app, header_timeout_s=1.0) as srv:
        httpx.get(srv.url + "/health")
  """

  def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
               startup_timeout_s: float = 120.0, **limits):
    limits.setdefault("shutdown_timeout_s", 10.0)
    self.server = make_server(app, host=host, port=port, log_level=log_level, **limits)
    self.app = app
    self.host = host
    self.thread = threading.Thread(target=self.server.run, name="dllm-http", daemon=True)
    self.thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not self.server.started:
      if not self.thread.is_alive():
        raise RuntimeError("the HTTP server exited during startup")
      if time.monotonic() > deadline:
        self.stop()
        raise RuntimeError(f"the HTTP server did not start within {startup_timeout_s} s")
      time.sleep(0.02)
    self.port = self.server.servers[0].sockets[0].getsockname()[1]
    self.url = f"http://{host}:{self.port}"

  def stop(self, timeout: float = 30.0) -> None:
    self.server.should_exit = True
    self.thread.join(timeout)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()
