"""Bounded overload and failure handling on loopback.

The engine holds 4 requests (max_running 2 + max_queue 2); 12 concurrent sparse requests arrive
at once. Every request either completes with exactly the text it gets alone, or gets 429 with
Retry-After (and then retries); none is lost or hung, and the KV page pool is full again
afterwards. Also: a client that disconnects frees its request's pages, an engine failure in one
request fails only that request, and shutdown is graceful.
"""

import concurrent.futures as cf
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from server_fixtures import LiveServer, make_llm  # noqa: E402

MAX_RUNNING, MAX_QUEUE = 2, 2
CONCURRENT = 12  # 3x what the engine holds
TIME_LIMIT = 240.0
PROMPTS = ["The socket module", "Return a new list", "Open the file", "A dictionary maps"]
POISON = 7  # prompt token id that makes the injected engine failure fire


def _body(i: int) -> dict:
  return {"prompt": PROMPTS[i % 4], "max_tokens": 32, "temperature": 0.7, "seed": 100 + i % 4}


@pytest.fixture(scope="module")
def server():
  from dllm_jax.config import SparseConfig
  from dllm_jax.server.app import create_app
  llm = make_llm(max_running=MAX_RUNNING, max_waiting=MAX_QUEUE, sparse=SparseConfig())
  srv = LiveServer(create_app(llm, model_name="tiny", max_queue=MAX_QUEUE,
                              shutdown_timeout=30))
  srv.llm = llm
  yield srv
  srv.stop()


@pytest.fixture(scope="module")
def references(server):
  """Each case's text when it runs alone."""
  with httpx.Client(base_url=server.url, timeout=120) as c:
    out = []
    for i in range(4):
      r = c.post("/v1/completions", json=_body(i))
      assert r.status_code == 200, r.text
      out.append(r.json()["choices"][0]["text"])
  return out


def _wait_idle(llm, timeout=30.0):
  core = llm.core
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if (core.num_running() == 0 and core.num_waiting() == 0
        and core.pages.num_free == core.pages.capacity):
      return True
    time.sleep(0.05)
  return False


def test_overload_every_request_completes_or_gets_429(server, references):
  start = threading.Barrier(CONCURRENT)
  deadline = time.monotonic() + TIME_LIMIT

  def client(i):
    statuses = []
    with httpx.Client(base_url=server.url, timeout=120) as c:
      start.wait()
      while time.monotonic() < deadline:
        r = c.post("/v1/completions", json=_body(i))
        statuses.append(r.status_code)
        if r.status_code == 429:
          assert "retry-after" in r.headers
          assert r.json()["error"]["code"] == "queue_full"
          time.sleep(min(float(r.headers["retry-after"]), 0.2))
          continue
        return statuses, r
    return statuses, None

  with cf.ThreadPoolExecutor(CONCURRENT) as pool:
    futs = [pool.submit(client, i) for i in range(CONCURRENT)]
    done, not_done = cf.wait(futs, timeout=TIME_LIMIT + 60)
  assert not not_done, "requests hung"
  first_429 = 0
  for i, f in enumerate(futs):
    statuses, r = f.result()
    assert r is not None, f"request {i} never got through: {statuses}"
    assert set(statuses) <= {200, 429}, statuses
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == references[i % 4]
    first_429 += statuses[0] == 429
  assert first_429 >= 1, "the burst never hit the queue limit"
  assert first_429 <= CONCURRENT - MAX_QUEUE  # at least a full queue got in at once
  assert _wait_idle(server.llm), "pages not returned to the pool"


def _slow_engine(llm, delay=0.05):
  orig = llm.step

  def slow():
    time.sleep(delay)
    return orig()
  llm.step = slow
  return lambda: llm.__dict__.pop("step", None)


def test_stream_disconnect_frees_pages(server):
  llm = server.llm
  restore = _slow_engine(llm)
  try:
    steps0 = llm.core.stats.steps
    with httpx.Client(base_url=server.url, timeout=60) as c:
      body = {"prompt": "The socket module", "gen_length": 32, "stream": True,
              "return_trace": True, "sparse": True}
      with c.stream("POST", "/v1/diffusion/generate", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
          if line.startswith("data: ") and json.loads(line[6:])["object"] == "diffusion.step":
            break  # one step seen: now hang up
    assert _wait_idle(llm, 10.0), "the disconnected request still holds pages"
    assert llm.core.stats.steps - steps0 < 32, "the request ran to completion"
  finally:
    restore()


def test_nonstream_disconnect_aborts(server):
  llm = server.llm
  restore = _slow_engine(llm, 0.1)
  try:
    steps0 = llm.core.stats.steps
    with pytest.raises(httpx.ReadTimeout):
      httpx.post(server.url + "/v1/completions", json=_body(0), timeout=0.5)
    assert _wait_idle(llm, 10.0)
    assert llm.core.stats.steps - steps0 < 32
  finally:
    restore()


def test_engine_failure_fails_only_that_request(server, references):
  llm = server.llm
  sched = llm.core.scheduler
  orig = sched.schedule

  def poisoned():
    plan = orig()
    if any(POISON in r.prompt_ids for r in plan.refresh + plan.reuse):
      raise RuntimeError("injected engine failure")
    return plan

  gate = threading.Event()
  orig_step = llm.step

  def gated():
    gate.wait(30)
    return orig_step()

  worker = server.app.state.dllm.worker
  retried0 = worker.requests_retried
  sched.schedule = poisoned
  llm.step = gated  # hold the engine until both requests are queued: one batch, one failure
  try:
    with cf.ThreadPoolExecutor(2) as pool:
      fb = pool.submit(httpx.post, server.url + "/v1/diffusion/generate", timeout=120,
                       json={"prompt": [POISON, 9, 10], "gen_length": 32})
      fg = pool.submit(httpx.post, server.url + "/v1/completions", json=_body(0), timeout=120)
      deadline = time.monotonic() + 30
      while llm.core.num_waiting() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
      gate.set()
      rb, rg = fb.result(timeout=180), fg.result(timeout=180)
  finally:
    gate.set()
    llm.__dict__.pop("step", None)
    sched.__dict__.pop("schedule", None)
  assert rb.status_code == 500
  assert rb.json()["error"]["code"] == "engine_error"
  assert rg.status_code == 200, rg.text  # batched with the failing request, retried, same text
  assert rg.json()["choices"][0]["text"] == references[0]
  assert worker.requests_retried - retried0 == 2  # both were retried once, alone
  assert _wait_idle(llm)
  h = httpx.get(server.url + "/health").json()
  assert h["status"] == "ok" and h["step_errors"] >= 1
  r = httpx.post(server.url + "/v1/completions", json=_body(2), timeout=120)
  assert r.status_code == 200 and r.json()["choices"][0]["text"] == references[2]


def test_graceful_shutdown(server, references):
  """Stopping the server lets in-flight requests finish, then joins the engine thread."""
  llm = server.llm
  restore = _slow_engine(llm, 0.02)
  try:
    with cf.ThreadPoolExecutor(2) as pool:
      futs = [pool.submit(httpx.post, server.url + "/v1/completions", json=_body(i),
                          timeout=120) for i in (0, 1)]
      deadline = time.monotonic() + 30
      while llm.core.num_running() + llm.core.num_waiting() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
      server.stop()
      rs = [f.result(timeout=60) for f in futs]
  finally:
    restore()
  for i, r in enumerate(rs):
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == references[i]
  assert not server.app.state.dllm.worker.alive
  assert _wait_idle(llm, 5.0)
  with pytest.raises(httpx.ConnectError):
    httpx.get(server.url + "/health", timeout=2)
