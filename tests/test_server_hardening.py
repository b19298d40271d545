"""HTTP hardening on a real server (``transport.serve``'s protocol, loopback, ephemeral port):
clients that disconnect mid-body, incomplete requests (header / body read timeouts, here 1 s),
the connection cap, JSON-only POST bodies, the max_queue count under a burst, /health without
the key, the trailing-slash route, error messages that name what the client sent, and the
request bodies in the OpenAPI schema. Raw sockets where a well-behaved client cannot misbehave.
"""

import concurrent.futures as cf
import json
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from server_fixtures import LiveServer, make_llm  # noqa: E402

TIMEOUT_S = 1.0          # header / body read timeouts of the main server
MAX_RUNNING, ENGINE_WAITING, MAX_QUEUE = 8, 4, 4
CAP = 4                  # connections of the keyed server
API_KEY = "hardening-key"
WAIT_S = 30.0            # generous bound for anything the server must do by itself


@pytest.fixture(scope="module")
def server():
  from dllm_jax.server.app import create_app
  llm = make_llm(max_running=MAX_RUNNING, max_waiting=ENGINE_WAITING)
  app = create_app(llm, model_name="tiny", max_queue=MAX_QUEUE)
  with LiveServer(app, header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S,
                  max_connections=64) as srv:
    srv.llm = llm
    yield srv


@pytest.fixture(scope="module")
def keyed():
  from dllm_jax.server.app import create_app
  app = create_app(make_llm(), model_name="tiny", api_key=API_KEY)
  with LiveServer(app, header_timeout_s=WAIT_S, max_connections=CAP) as srv:
    yield srv


@pytest.fixture(scope="module")
def http(server):
  with httpx.Client(base_url=server.url, timeout=120) as c:
    yield c


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.DEBUG)
    self.records: list[logging.LogRecord] = []

  def emit(self, record):
    self.records.append(record)

  def errors(self) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in self.records
            if r.levelno >= logging.ERROR or r.exc_info]


@pytest.fixture
def server_log(server):
  """Records of the server's loggers during one test (attached after uvicorn configured its
  logging, which replaces the handlers of the loggers it names)."""
  h = _Records()
  names = ("uvicorn", "uvicorn.error", "dllm_jax.server")
  for n in names:
    logging.getLogger(n).addHandler(h)
  yield h
  for n in names:
    logging.getLogger(n).removeHandler(h)


def _connect(srv) -> socket.socket:
  s = socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT_S)
  return s


def _read_to_eof(s: socket.socket) -> bytes:
  """Everything the server sends until it closes (a socket timeout fails the test)."""
  out = b""
  while True:
    chunk = s.recv(65536)
    if not chunk:
      return out
    out += chunk


def _metric(http, name: str, **labels) -> float:
  from prometheus_client.parser import text_string_to_metric_families
  for fam in text_string_to_metric_families(http.get("/metrics").text):
    for smp in fam.samples:
      if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
        return smp.value
  return 0.0


def _wait_metric(http, name: str, at_least: float, **labels) -> float:
  deadline = time.monotonic() + WAIT_S
  while True:
    v = _metric(http, name, **labels)
    if v >= at_least or time.monotonic() > deadline:
      return v
    time.sleep(0.05)


PARTIAL_BODY = (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 500\r\n\r\n" + b'{"prompt": "' + b"a" * 18)
assert len(PARTIAL_BODY.split(b"\r\n\r\n", 1)[1]) == 30


# Disconnects and read timeouts -----------------------------------------------------------------
def test_disconnect_while_body_is_read_is_a_counted_abort(server, http, server_log):
  name = "dllm_client_disconnects_total"
  before = _metric(http, name, stage="body")
  for _ in range(3):
    s = _connect(server)
    s.sendall(PARTIAL_BODY)
    s.close()
  assert _wait_metric(http, name, before + 3, stage="body") == before + 3
  assert server_log.errors() == []
  assert http.get("/health").json()["status"] == "ok"


def test_incomplete_body_times_out(server, http, server_log):
  name = "dllm_client_disconnects_total"
  before = _metric(http, name, stage="body")
  with _connect(server) as s:
    s.sendall(PARTIAL_BODY)
    reply = _read_to_eof(s)
  assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
  body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
  assert body["error"]["code"] == "request_timeout" and "body" in body["error"]["message"]
  assert _wait_metric(http, name, before + 1, stage="body") == before + 1
  assert server_log.errors() == []


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n",
                                  b"GET /hea"])
def test_incomplete_headers_time_out(server, sent):
  with _connect(server) as s:
    s.sendall(sent)
    reply = _read_to_eof(s)
  assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
  assert b"request_timeout" in reply


def test_many_slow_header_connections_are_all_closed(server, http):
  socks = [_connect(server) for _ in range(20)]
  try:
    for i, s in enumerate(socks):
      s.sendall(b"GET /health HTTP/1.1\r\nX-Slow: " + str(i).encode())
    replies = [_read_to_eof(s) for s in socks]
  finally:
    for s in socks:
      s.close()
  assert all(r.startswith(b"HTTP/1.1 408 ") for r in replies)
  assert http.get("/health").status_code == 200


def test_kept_alive_connection_is_not_cut_by_the_header_timeout(server):
  req = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
  with _connect(server) as s:
    f = s.makefile("rb")
    for _ in range(2):
      s.sendall(req)
      assert f.readline().startswith(b"HTTP/1.1 200 ")
      length = 0
      while (line := f.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
          length = int(line.split(b":")[1])
      f.read(length)
      time.sleep(TIMEOUT_S * 1.5)  # idle past the header timeout, within uvicorn's keep-alive


def test_connection_cap_answers_503_then_closes(keyed):
  socks = [_connect(keyed) for _ in range(CAP)]
  try:
    with _connect(keyed) as extra:
      reply = _read_to_eof(extra)
    assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
    assert b"too_many_connections" in reply
  finally:
    for s in socks:
      s.close()
  deadline = time.monotonic() + WAIT_S
  while True:  # the closed connections are released, and the server serves again
    try:
      r = httpx.get(keyed.url + "/health", timeout=WAIT_S)
      if r.status_code == 200:
        break
    except httpx.TransportError:
      pass
    assert time.monotonic() < deadline, "the server did not recover from the cap"
    time.sleep(0.05)


# Requests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "application/jsonx",
                                   "application/json; charset=latin-1"])
def test_post_bodies_must_be_json(http, ctype):
  body = json.dumps({"prompt": "Hello", "max_tokens": 16}).encode()
  headers = {"Content-Type": ctype} if ctype else {}
  for path in ("/v1/completions", "/v1/chat/completions", "/v1/diffusion/generate"):
    r = http.post(path, content=body, headers=headers)
    assert r.status_code == 415, (path, ctype, r.text)
    assert r.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("ctype", ["application/json", "Application/JSON",
                                   "application/json; charset=utf-8",
                                   'application/json;charset="UTF-8"'])
def test_json_content_types_pass_the_gate(http, ctype):
  r = http.post("/v1/completions", content=b"{}", headers={"Content-Type": ctype})
  assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_burst_within_free_slots_is_never_refused(server, http):
  """max_queue counts only requests waiting for a running slot: with the engine held before
  its first step, MAX_RUNNING + MAX_QUEUE requests of a burst are accepted (even though the
  engine's own intake takes ENGINE_WAITING at a time) and every further one gets 429."""
  llm = server.llm
  gate = threading.Event()
  orig = llm.step

  def held():
    gate.wait(WAIT_S)
    return orig()

  n = MAX_RUNNING + MAX_QUEUE + 3
  llm.step = held
  try:
    with cf.ThreadPoolExecutor(n) as pool:
      futs = [pool.submit(httpx.post, server.url + "/v1/completions", timeout=300,
                          json={"prompt": "The socket module", "max_tokens": 16, "seed": i})
              for i in range(n)]
      rejected = [f.result() for f in futs if f.done()]  # 429s come back at once
      deadline = time.monotonic() + WAIT_S
      while len(rejected) < n - MAX_RUNNING - MAX_QUEUE and time.monotonic() < deadline:
        time.sleep(0.02)
        rejected = [f.result() for f in futs if f.done()]
      assert http.get("/health").json()["in_flight"] == MAX_RUNNING + MAX_QUEUE
      gate.set()
      rs = [f.result(timeout=300) for f in futs]
  finally:
    gate.set()
    llm.__dict__.pop("step", None)
  codes = sorted(r.status_code for r in rs)
  assert codes == [200] * (MAX_RUNNING + MAX_QUEUE) + [429] * 3, codes
  assert all(r.headers["retry-after"] for r in rs if r.status_code == 429)
  core = llm.core
  deadline = time.monotonic() + WAIT_S
  while core.pages.num_free != core.pages.capacity and time.monotonic() < deadline:
    time.sleep(0.05)
  assert core.pages.num_free == core.pages.capacity


def test_health_details_need_the_key(keyed):
  for headers in ({}, {"Authorization": "Bearer wrong"}):
    r = httpx.get(keyed.url + "/health", headers=headers)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
  r = httpx.get(keyed.url + "/health", headers={"Authorization": f"Bearer {API_KEY}"})
  h = r.json()
  assert h["status"] == "ok" and h["kv_pages_free"] == h["kv_pages_total"] and "waiting" in h


def test_trailing_slash_is_served_not_redirected(http):
  for path in ("/metrics/", "/v1/models/", "/health/"):
    r = http.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 200, (path, r.status_code)
    assert "location" not in r.headers
    assert "evil.example" not in r.text
  assert http.get("/metrics/").text.startswith("# HELP")
  assert http.get("/v1/models/").json()["data"][0]["id"] == "tiny"


def _error(http, path, body) -> dict:
  r = http.post(path, json=body)
  assert r.status_code == 400, r.text
  return r.json()["error"]


def test_errors_name_what_was_sent(http, server):
  mask = server.llm.cfg.mask_token_id
  for path, body in (("/v1/diffusion/generate", {"prompt": [5, mask, 7], "gen_length": 32}),
                     ("/v1/completions", {"prompt": [5, mask], "max_tokens": 16}),
                     ("/v1/completions", {"prompt": "Hi <|mask|>", "max_tokens": 16})):
    e = _error(http, path, body)
    assert e["param"] == "prompt" and f"mask token id {mask}" in e["message"], e
  e = _error(http, "/v1/completions", {"prompt": "Hello", "max_tokens": 250})
  assert e["code"] == "context_length_exceeded" and "max_tokens (250" in e["message"], e
  assert "256 tokens" in e["message"]
  e = _error(http, "/v1/completions", {"prompt": "Hello", "max_tokens": 100, "steps": 10,
                                       "block_length": 32})
  assert e["param"] == "steps" and e["message"].startswith("max_tokens (100)"), e
  e = _error(http, "/v1/diffusion/generate", {"prompt": "Hello", "sparse": {"keep_ratio": 1.5}})
  assert e["param"] == "sparse.keep_ratio" and "keep_ratio" in e["message"], e
  assert "1.5" in e["message"] and "boolean" not in e["message"] and "errors" not in e["message"]
  e = _error(http, "/v1/diffusion/generate", {"prompt": "Hello", "sparse": {"keep_ratio": "x"}})
  assert e["param"] == "sparse.keep_ratio" and "boolean" not in e["message"], e
  e = _error(http, "/v1/diffusion/generate", {"prompt": "Hello", "sparse": "x"})
  assert e["param"] == "sparse" and "true or false or an object" in e["message"], e
  e = _error(http, "/v1/diffusion/generate", {"prompt": "Hello", "threshold": 1.5})
  assert e["param"] == "threshold" and "(0, 1]" in e["message"], e


def test_request_bodies_are_in_the_openapi_schema(http):
  from dllm_jax.config import CONFIDENCE_KINDS
  from dllm_jax.server import protocol as P
  schema = http.get("/openapi.json").json()
  comps = schema["components"]["schemas"]
  for path, model in (("/v1/completions", P.CompletionRequest),
                      ("/v1/chat/completions", P.ChatCompletionRequest),
                      ("/v1/diffusion/generate", P.GenerateRequest)):
    body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    name = body["schema"]["$ref"].rsplit("/", 1)[1]
    assert name == model.__name__
    assert set(comps[name]["properties"]) == set(model.model_fields)
  for name in ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest", "SparseOptions",
               "ChatMessage", "ContentPart", "StreamOptions"):
    for field, prop in comps[name]["properties"].items():
      assert prop.get("description"), (name, field)
  assert comps["GenerateRequest"]["properties"]["confidence"]["enum"] == list(CONFIDENCE_KINDS)
  assert http.get("/docs").status_code == 200


# The transport itself ----------------------------------------------------------------------------
def test_transport_refuses_other_uvicorn_versions(monkeypatch):
  import importlib.util

  import uvicorn

  from dllm_jax.server import transport
  monkeypatch.setattr(uvicorn, "__version__", "0.56.0")
  spec = importlib.util.spec_from_file_location("transport_under_test", transport.__file__)
  with pytest.raises(ImportError, match=r"uvicorn 0\.56\.0 is installed.*uvicorn>=0\.55,<0\.56"):
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


SERVE_SCRIPT = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from dllm_jax.server.transport import serve

async def hello(request):
  return PlainTextResponse("hello")

serve(Starlette(routes=[Route("/", hello)]), host="127.0.0.1", port=0, log_level="info",
      header_timeout_s=1.0)
print("serve returned", flush=True)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_serve_blocks_until_a_signal_then_shuts_down_and_returns(sig):
  import re
  import signal
  import subprocess
  import sys

  proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    port = None
    lines = []
    for line in proc.stdout:  # uvicorn logs the port it bound
      lines.append(line)
      m = re.search(r"running on http://127\.0\.0\.1:(\d+)", line)
      if m:
        port = int(m.group(1))
        break
    assert port, "".join(lines)
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=WAIT_S).text == "hello"
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
      s.sendall(b"GET / HTTP/1.1\r\n")  # the header timeout applies in serve() too
      assert _read_to_eof(s).startswith(b"HTTP/1.1 408 ")
    proc.send_signal(getattr(signal, sig))
    out = proc.communicate(timeout=WAIT_S)[0]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, out
  assert "Finished server process" in out and "serve returned" in out  # no re-raised signal
  assert "Traceback" not in out
