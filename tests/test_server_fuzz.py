"""Fuzzing the live server with malformed requests (hypothesis): bad JSON, non-object bodies,
wrong types, unknown fields, out-of-range values, unsupported OpenAI parameters, bad chat content
shapes, huge prompts, wrong methods and paths. Every answer must be a 4xx with an OpenAI-style
error body, never a 5xx, and the server must be healthy afterwards: the last test tops the
module's malformed requests up to at least 1000 itself (so it does not depend on how many the
others sent) before it checks. Derandomized, no example database, no deadline."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from server_fixtures import LiveServer, make_llm  # noqa: E402

SENT = {"n": 0}  # malformed requests answered in this module (all must be 4xx)
MIN_MALFORMED = 1000
JSON = {"Content-Type": "application/json"}
FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.filter_too_much])

ENDPOINTS = {
    "/v1/completions": {"prompt": "Hello", "max_tokens": 32},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32},
    "/v1/diffusion/generate": {"prompt": "Hello", "gen_length": 32},
}

# Field -> kind, per endpoint (what a wrong type / out-of-range value is for it).
COMMON = {"model": "str", "temperature": "float", "seed": "int", "stream": "bool",
          "steps": "int", "block_length": "int", "confidence": "literal", "rule": "literal",
          "threshold": "float", "factor": "float", "schedule": "literal", "stop_on_eos": "bool",
          "sparse": "sparse"}
OPENAI = {**COMMON, "max_tokens": "int", "n": "int", "top_p": "float", "stop": "stop",
          "presence_penalty": "float", "frequency_penalty": "float", "user": "str",
          "stream_options": "obj", "logit_bias": "obj"}
FIELDS = {
    "/v1/completions": {**OPENAI, "prompt": "prompt", "echo": "bool", "logprobs": "int",
                        "best_of": "int", "suffix": "str"},
    "/v1/chat/completions": {**OPENAI, "messages": "messages", "max_completion_tokens": "int",
                             "logprobs": "bool", "top_logprobs": "int"},
    "/v1/diffusion/generate": {**COMMON, "prompt": "prompt", "messages": "messages",
                               "gen_length": "int", "return_trace": "bool"},
}

# Chat content shapes the server must refuse (400 naming messages[0].content): OpenAI's shapes
# are a string or a non-empty list of {"type": "text", "text": str} parts with some text.
BAD_CONTENT = [
    [], [{"type": "text", "text": ""}], [{"type": "text", "text": ""}] * 2,
    [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
    [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}],
    [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
    [{"type": "text"}], [{"text": "a"}], [{"type": "text", "text": 5}],
    [{"type": "text", "text": None}], [{"type": "text", "text": "a", "cache": 1}],
    [{"type": "TEXT", "text": "a"}], ["a"], [["a"]], [None], {"type": "text", "text": "a"},
    5, 1.5, True, None,
]


def valid_content(c) -> bool:
  if isinstance(c, str):
    return True
  return (isinstance(c, list) and bool(c)
          and all(isinstance(p, dict) and set(p) == {"type", "text"} and p["type"] == "text"
                  and isinstance(p["text"], str) for p in c)
          and any(p["text"] for p in c))


# Out-of-range values that are certainly rejected (the tiny model has 256 positions, 300 ids).
BAD_VALUES = {
    "max_tokens": [0, -1, 257, 10**6, 10**30], "gen_length": [0, -5, 257, 10**9, 2**70],
    "max_completion_tokens": [0, -3, 100000],
    "steps": [0, -1, 257, 10**12], "block_length": [0, -2, 257, 10**9],
    "seed": [-1, 2**32, 2**64, -(2**40)], "temperature": [-0.1, -100, 1e308],
    "threshold": [0, -0.5, 1.5, 1e9], "factor": [0, -1.0, 1e7],
    "n": [0, 2, 5, -1], "top_p": [0.5, 0, 2.0], "presence_penalty": [1.0, -2.0],
    "frequency_penalty": [0.3], "best_of": [2, 0], "logprobs": [1, 5], "echo": [True],
    "suffix": ["tail"], "top_logprobs": [3], "logit_bias": [{"5": 1.0}],
    "confidence": ["", "high", "LOW_CONFIDENCE", "random "], "rule": ["x", "Fixed"],
    "schedule": ["mdlm", ""], "model": ["gpt-4", "", "tiny "],
    "stop": ["", ["a", "b", "c", "d", "e"], ["x" * 65]],
    "sparse": [{"keep_ratio": 1.5}, {"keep_ratio": -0.1}, {"pool_kernel": 0},
               {"pool_kernel": 16}, {"delay": -1}, {"selection": "all"}, {"bogus": 1}],
    "stream_options": [{"include_usage": "yes"}, {"x": 1}],
    "prompt": ["", [], [-1], [300], [2], [1, 2, 3], [[1], [4]], ["a", "b"], [10**9]],
    "messages": [[], [{"role": "robot", "content": "x"}], [{"content": "x"}],
                 [{"role": "user"}], [{"role": "user", "content": [{"type": "image"}]}],
                 [{"role": "user", "content": "x", "extra": 1}]]
    + [[{"role": "user", "content": c}] for c in BAD_CONTENT],
}

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=12)


def wrong_type(kind: str):
  """Values of a JSON type the field certainly does not accept (null excluded: optional
  fields allow it)."""
  strs = st.text(max_size=12)
  nums = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False))
  lists = st.lists(json_leaf, min_size=1, max_size=3)
  dicts = st.dictionaries(st.text(max_size=5), json_leaf, min_size=1, max_size=3)
  if kind == "int":
    return st.one_of(strs, st.booleans(), st.floats(allow_nan=False, allow_infinity=False)
                     .filter(lambda f: f != int(f)), lists, dicts)
  if kind == "float":
    return st.one_of(strs, st.booleans(), lists, dicts)
  if kind == "bool":
    return st.one_of(strs, nums, lists, dicts)
  if kind in ("str", "literal"):
    return st.one_of(nums, st.booleans(), lists, dicts)
  if kind == "prompt":
    return st.one_of(nums, st.booleans(), dicts,
                     st.lists(st.one_of(st.booleans(), st.floats(0.5, 1.5), dicts), min_size=1,
                              max_size=3))
  if kind == "messages":
    return st.one_of(strs, nums, st.booleans(), dicts,
                     st.lists(st.one_of(strs, nums, st.booleans()), min_size=1, max_size=3))
  if kind == "stop":
    return st.one_of(nums, st.booleans(), dicts, st.lists(nums, min_size=1, max_size=3))
  if kind == "sparse":
    return st.one_of(strs, nums, st.lists(json_leaf, max_size=3))
  return st.one_of(strs, nums, st.booleans(), lists)  # obj


@st.composite
def malformed_request(draw):
  path = draw(st.sampled_from(sorted(ENDPOINTS)))
  body = json.loads(json.dumps(ENDPOINTS[path]))
  fields = FIELDS[path]
  kind = draw(st.sampled_from(["unknown", "wrong_type", "range", "missing", "bad_json",
                               "not_object", "nested"]))
  if kind == "unknown":
    key = draw(st.text(min_size=1, max_size=16).filter(lambda k: k not in fields))
    body[key] = draw(json_value)
  elif kind == "wrong_type":
    field = draw(st.sampled_from(sorted(fields)))
    body[field] = draw(wrong_type(fields[field]))
    if path == "/v1/diffusion/generate" and field == "messages":
      body.pop("prompt")
  elif kind == "range":
    field = draw(st.sampled_from(sorted(f for f in BAD_VALUES if f in fields)))
    body[field] = draw(st.sampled_from(BAD_VALUES[field]))
    if path == "/v1/diffusion/generate" and field == "messages":
      body.pop("prompt")
  elif kind == "missing":
    body.pop("messages" if "messages" in body else "prompt")
    body.update(draw(st.dictionaries(st.sampled_from(
        sorted(f for f in fields if f not in ("prompt", "messages", "stream", "model"))),
        st.none(), max_size=3)))
  elif kind == "bad_json":
    raw = json.dumps(body)
    cut = draw(st.integers(0, len(raw) - 1))
    junk = draw(st.sampled_from(["", "}", ",", "\x00", "{{", "'", "NaN", "]"]))
    text = raw[:cut] + junk
    try:
      json.loads(text)
      hypothesis.assume(False)  # the cut happened to leave valid JSON
    except ValueError:
      pass
    return path, text.encode("utf-8", "surrogatepass")
  elif kind == "not_object":
    return path, json.dumps(draw(st.one_of(json_leaf, st.lists(json_value, max_size=3)))).encode()
  else:  # nested: a valid-looking body with a broken sub-object
    if "messages" in body:
      body["messages"] = [draw(st.fixed_dictionaries(
          {"role": st.sampled_from(["user", "assistant", "tool", "x"])},
          optional={"content": st.one_of(json_value, st.sampled_from(BAD_CONTENT)),
                    "foo": json_value}).filter(
              lambda m: not (m["role"] in ("user", "assistant") and "foo" not in m
                             and "content" in m and valid_content(m["content"]))))]
    else:
      body["sparse"] = draw(st.dictionaries(st.text(max_size=10), json_value, min_size=1,
                                            max_size=3).filter(
          lambda d: any(k not in ("enabled", "keep_ratio", "pool_kernel", "delay", "selection")
                        for k in d)))
  return path, json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def server():
  from dllm_jax.server.app import create_app
  llm = make_llm()
  with LiveServer(create_app(llm, model_name="tiny", max_queue=8)) as srv:
    srv.llm = llm
    yield srv


@pytest.fixture(scope="module")
def http(server):
  with httpx.Client(base_url=server.url, timeout=60) as c:
    yield c


def _check(r, path=""):
  SENT["n"] += 1
  assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
  if r.status_code != 413 or r.headers.get("content-type", "").startswith("application/json"):
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]


def _chat_body(content, path="/v1/chat/completions") -> tuple[str, bytes]:
  body = {"messages": [{"role": "user", "content": content}]}
  body.update({"max_tokens": 32} if path != "/v1/diffusion/generate" else {"gen_length": 32})
  return path, json.dumps(body).encode()


def _with_content_examples(test):
  """An explicit @example per refused content shape, on both endpoints that take messages."""
  for c in reversed(BAD_CONTENT):
    for path in ("/v1/diffusion/generate", "/v1/chat/completions"):
      test = example(req=_chat_body(c, path))(test)
  return test


@settings(max_examples=900, **FUZZ)
@_with_content_examples
@given(req=malformed_request())
def test_malformed_bodies(http, req):
  path, body = req
  r = http.post(path, content=body, headers=JSON)
  _check(r, path)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/diffusion/generate"])
def test_bad_content_shapes_name_the_field(http, path):
  for c in BAD_CONTENT:
    r = http.post(path, content=_chat_body(c, path)[1], headers=JSON)
    _check(r, path)
    assert r.status_code == 400, (c, r.text)
    assert r.json()["error"]["param"] == "messages[0].content", (c, r.text)


def test_content_parts_join_with_a_newline(http):
  """A list of text parts is the string of their texts joined by "\n" (same answer)."""
  gen = {"max_tokens": 32, "temperature": 0.7, "seed": 5}
  parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": ""},
           {"type": "text", "text": "a list?"}]
  a = http.post("/v1/chat/completions", json={
      "messages": [{"role": "user", "content": parts}], **gen})
  b = http.post("/v1/chat/completions", json={
      "messages": [{"role": "user", "content": "What is\n\na list?"}], **gen})
  c = http.post("/v1/chat/completions", json={
      "messages": [{"role": "user", "content": "What isa list?"}], **gen})
  assert a.status_code == b.status_code == c.status_code == 200, (a.text, b.text)
  assert a.json()["usage"] == b.json()["usage"]
  assert a.json()["choices"] == b.json()["choices"]
  assert a.json()["usage"]["prompt_tokens"] != c.json()["usage"]["prompt_tokens"]


@settings(max_examples=150, **FUZZ)
@given(path=st.sampled_from(sorted(ENDPOINTS)), body=st.binary(max_size=64))
def test_random_bytes(http, path, body):
  try:
    parsed = json.loads(body)
  except ValueError:
    parsed = None
  if isinstance(parsed, dict) and parsed:
    hypothesis.assume(False)  # a non-empty JSON object may be a valid request
  _check(http.post(path, content=body, headers=JSON), path)


@settings(max_examples=60, **FUZZ)
@given(path=st.sampled_from(sorted(ENDPOINTS)), n=st.integers(3000, 20000),
       text=st.text(min_size=1, max_size=8), as_ids=st.booleans())
def test_huge_prompts(http, path, n, text, as_ids):
  body = json.loads(json.dumps(ENDPOINTS[path]))
  if as_ids and path != "/v1/chat/completions":
    body["prompt"] = [5 + (i % 250) for i in range(n // 10)]  # >= 300 ids: over 256 positions
  elif "messages" in body:
    body["messages"][0]["content"] = (text * n)[:n]
  else:
    body["prompt"] = (text * n)[:n]
  r = http.post(path, content=json.dumps(body).encode("utf-8", "surrogatepass"), headers=JSON)
  _check(r, path)
  if r.status_code == 400:
    assert r.json()["error"]["code"] in ("context_length_exceeded", None)


@settings(max_examples=40, **FUZZ)
@given(method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]),
       path=st.sampled_from(sorted(ENDPOINTS) + ["/v1/nothing", "/v2/completions",
                                                 "/v1/models/other", "/metricsx"]))
def test_wrong_methods_and_paths(http, method, path):
  _check(http.request(method, path), path)


def test_body_too_large_and_empty(http):
  big = json.dumps({"prompt": "a" * ((1 << 20) + 10)}).encode()
  for path in ENDPOINTS:
    for body in (big, b"", b"{}"):
      r = http.post(path, content=body, headers=JSON)
      _check(r, path)
      assert r.status_code == (413 if body is big else 400), r.text


def known_bad_requests():
  """Deterministic malformed requests (every listed out-of-range value on every endpoint that
  takes the field), cycled for as long as needed."""
  while True:
    for path, fields in sorted(FIELDS.items()):
      for field in sorted(f for f in BAD_VALUES if f in fields):
        for value in BAD_VALUES[field]:
          body = json.loads(json.dumps(ENDPOINTS[path]))
          body[field] = value
          if path == "/v1/diffusion/generate" and field == "messages":
            body.pop("prompt")
          yield path, json.dumps(body).encode()


def test_server_healthy_afterwards(http, server):
  """Healthy after at least MIN_MALFORMED malformed requests in this module, however many the
  tests above sent (run alone, this test sends them all)."""
  bad = known_bad_requests()
  while SENT["n"] < MIN_MALFORMED:
    path, body = next(bad)
    _check(http.post(path, content=body, headers=JSON), path)
  assert SENT["n"] >= MIN_MALFORMED
  h = http.get("/health")
  assert h.status_code == 200 and h.json()["status"] == "ok"
  r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 32, "seed": 1})
  assert r.status_code == 200, r.text
  m = http.get("/metrics").text
  assert 'status="500"' not in m
  core = server.llm.core
  assert core.pages.num_free == core.pages.capacity and core.num_running() == 0
