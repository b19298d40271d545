"""Data-parallel replicas behind one front end: least-loaded routing, same answers as one."""

import concurrent.futures as cf

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from server_fixtures import LiveServer, make_llm  # noqa: E402

PROMPTS = ["The socket module", "Return a new list", "Open the file", "A dictionary maps"]


def _body(i: int) -> dict:
  return {"prompt": PROMPTS[i % 4], "max_tokens": 16, "temperature": 0.7, "seed": 10 + i}


def test_two_replicas_route_by_load_and_answer_like_one():
  from dllm_jax.server.app import create_app

  single = make_llm()
  replicas = [make_llm(), make_llm()]
  with LiveServer(create_app(single, model_name="tiny")) as one:
    expected = [httpx.post(f"{one.url}/v1/completions", json=_body(i), timeout=300).json()
                ["choices"][0]["text"] for i in range(6)]
  app = create_app(replicas, model_name="tiny")
  router = app.state.dllm.worker
  with LiveServer(app) as srv:
    with cf.ThreadPoolExecutor(6) as pool:
      futs = [pool.submit(httpx.post, f"{srv.url}/v1/completions", json=_body(i), timeout=300)
              for i in range(6)]
      got = [f.result() for f in futs]
    assert all(r.status_code == 200 for r in got)
    assert [r.json()["choices"][0]["text"] for r in got] == expected
    # Concurrent requests were spread: both engines ran some, and nothing is left routed.
    assert all(r.core.stats.steps > 0 for r in replicas)
    assert router.in_flight() == 0 and not router._owner
    assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"
  for r in replicas:
    assert r.core.pages.num_free == r.core.pages.capacity
