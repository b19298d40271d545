"""The HTTP server through the real ``openai`` client on a live loopback uvicorn: completions,
chat, streaming (deltas concatenate to the non-streamed text of the same seed), stop strings,
errors, auth, /v1/models, /health and the /metrics format."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from server_fixtures import LiveServer, make_llm  # noqa: E402

API_KEY = "test-key-123"
GEN = dict(max_tokens=32, temperature=0.8, seed=7)


@pytest.fixture(scope="module")
def server():
  from dllm_jax.server.app import create_app
  llm = make_llm()
  app = create_app(llm, api_key=API_KEY, model_name="tiny", max_queue=8)
  with LiveServer(app) as srv:
    srv.llm = llm
    yield srv


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
  with httpx.Client(base_url=server.url, timeout=300,
                    headers={"Authorization": f"Bearer {API_KEY}"}) as c:
    yield c


def test_models_and_health(client, http):
  models = client.models.list()
  assert [m.id for m in models.data] == ["tiny"]
  assert client.models.retrieve("tiny").id == "tiny"
  r = http.get("/health")
  assert r.status_code == 200
  h = r.json()
  assert h["status"] == "ok" and h["engine_thread"] == "running"
  assert h["kv_pages_free"] == h["kv_pages_total"]


def test_completion_matches_native_endpoint(client, http, server):
  res = client.completions.create(model="tiny", prompt="The socket module", **GEN)
  choice = res.choices[0]
  assert isinstance(choice.text, str)
  assert choice.finish_reason in ("stop", "length")
  n_prompt = len(server.llm.tokenizer.encode("The socket module", add_special_tokens=False))
  assert res.usage.prompt_tokens == n_prompt
  assert 0 <= res.usage.completion_tokens <= 32
  assert res.usage.total_tokens == n_prompt + res.usage.completion_tokens
  native = http.post("/v1/diffusion/generate", json={
      "prompt": "The socket module", "gen_length": 32, "temperature": 0.8, "seed": 7}).json()
  assert native["text"] == choice.text
  assert native["nfe"] >= 1 and len(native["token_ids"]) == 32


def test_completion_streaming_concatenates_to_final_text(client):
  full = client.completions.create(model="tiny", prompt="Return a new list", **GEN)
  text = full.choices[0].text
  chunks = list(client.completions.create(model="tiny", prompt="Return a new list", stream=True,
                                          stream_options={"include_usage": True}, **GEN))
  deltas = [c.choices[0].text for c in chunks if c.choices]
  assert "".join(deltas) == text
  finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
  assert finals == [full.choices[0].finish_reason]
  assert chunks[-1].usage is not None
  assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_lines(http):
  body = {"prompt": "Open the file", "max_tokens": 32, "seed": 1, "temperature": 0.5,
          "stream": True}
  with http.stream("POST", "/v1/completions", json=body) as r:
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    raw = r.read().decode()
  events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]
  assert all(e.startswith("data: ") for e in events)
  assert events[-1] == "data: [DONE]"
  chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
  assert all(c["object"] == "text_completion" for c in chunks)
  assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
  assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
  streamed = "".join(c["choices"][0]["text"] for c in chunks)
  plain = http.post("/v1/completions", json={**body, "stream": False}).json()
  assert streamed == plain["choices"][0]["text"]


def test_chat_and_chat_streaming(client):
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "What is a list?"}]
  res = client.chat.completions.create(model="tiny", messages=messages, **GEN)
  msg = res.choices[0].message
  assert msg.role == "assistant" and isinstance(msg.content, str)
  assert res.object == "chat.completion"
  stream = client.chat.completions.create(model="tiny", messages=messages, stream=True, **GEN)
  chunks = list(stream)
  assert chunks[0].choices[0].delta.role == "assistant"
  content = "".join(c.choices[0].delta.content or "" for c in chunks)
  assert content == msg.content
  assert chunks[-1].choices[0].finish_reason == res.choices[0].finish_reason


def test_stop_string_cuts_text(client):
  base = client.completions.create(model="tiny", prompt="A dictionary maps", **GEN)
  text = base.choices[0].text
  if len(text) < 4:
    pytest.skip(f"the random model produced too short a text ({text!r})")
  stop = text[2:4]
  expected = text[:text.find(stop)]
  res = client.completions.create(model="tiny", prompt="A dictionary maps", stop=[stop], **GEN)
  assert res.choices[0].text == expected
  assert res.choices[0].finish_reason == "stop"
  chunks = list(client.completions.create(model="tiny", prompt="A dictionary maps", stop=stop,
                                          stream=True, **GEN))
  assert "".join(c.choices[0].text for c in chunks) == expected
  assert chunks[-1].choices[0].finish_reason == "stop"


def test_server_text_is_generate_text(client):
  """One text assembly (the engine's) behind the server and ``LLM.generate``: for the same
  request, with and without a stop string, the same text and finish reason."""
  from dllm_jax.config import SamplingParams
  other = make_llm()  # a second engine on the same model: the served one is the server's
  sp = SamplingParams(gen_length=32, temperature=0.8, seed=7)
  full = other.generate("A dictionary maps", sp)[0]
  if len(full.text) < 6:
    pytest.skip(f"the random model produced too short a text ({full.text!r})")
  for stop in (None, [full.text[3:5]], [full.text[4:6], full.text[2:3]]):
    want = other.generate("A dictionary maps", sp, stop=stop)[0]
    res = client.completions.create(model="tiny", prompt="A dictionary maps", stop=stop, **GEN)
    assert res.choices[0].text == want.text, stop
    assert res.choices[0].finish_reason == ("stop" if want.finish_reason in ("eos", "stop")
                                            else "length")
    assert (want.finish_reason == "stop") == (stop is not None)


def test_max_tokens_not_a_block_multiple(client):
  # 20 tokens in blocks of 16: a 32-token canvas, cut to 20 tokens.
  res = client.completions.create(model="tiny", prompt="The json module", max_tokens=20,
                                  temperature=0.8, seed=3, extra_body={"block_length": 16})
  assert res.usage.completion_tokens <= 20
  full = client.completions.create(model="tiny", prompt="The json module", max_tokens=32,
                                   temperature=0.8, seed=3, extra_body={"block_length": 16})
  assert full.choices[0].text.startswith(res.choices[0].text)


def test_bad_requests_through_client(client):
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model="tiny", prompt="x", max_tokens=8, n=2)
  assert e.value.status_code == 400 and e.value.body["param"] == "n"
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model="tiny", prompt="x", max_tokens=8,
                              extra_body={"no_such_param": 1})
  assert e.value.body["param"] == "no_such_param"
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model="tiny", prompt="word " * 400, max_tokens=32)
  assert e.value.body["code"] == "context_length_exceeded"
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model="gpt-4", prompt="x", max_tokens=8)


def test_auth(server):
  bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
  with pytest.raises(openai.AuthenticationError) as e:
    bad.models.list()
  assert e.value.status_code == 401
  assert e.value.body["code"] == "invalid_api_key"
  r = httpx.get(server.url + "/v1/models")
  assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
  assert httpx.get(server.url + "/health").status_code == 200  # liveness stays open


def test_metrics_format(http):
  from prometheus_client.parser import text_string_to_metric_families
  r = http.get("/metrics")
  assert r.status_code == 200
  assert r.headers["content-type"].startswith("text/plain")
  fams = {f.name: f for f in text_string_to_metric_families(r.text)}
  for name in ("dllm_queue_depth", "dllm_running_requests", "dllm_kv_pages_free",
               "dllm_kv_pages_used", "dllm_tokens_per_second", "dllm_phase_mix_fraction",
               "dllm_request_latency_seconds", "dllm_engine_steps", "dllm_committed_tokens"):
    assert name in fams, name
  assert fams["dllm_request_latency_seconds"].type == "histogram"
  count = [s for s in fams["dllm_request_latency_seconds"].samples
           if s.name.endswith("_count") and s.labels.get("endpoint") == "completions"]
  assert count and count[0].value >= 1
  steps = [s.value for s in fams["dllm_engine_steps"].samples if s.name.endswith("_total")]
  assert steps and steps[0] > 0
  used = fams["dllm_kv_pages_used"].samples[0].value
  assert used == 0


def test_text_assembler_deltas_concatenate(server):
  """Streaming property on its own: for any token sequence revealed prefix by prefix, the
  deltas concatenate to the final text (incomplete UTF-8 held back, stop strings honoured)."""
  hyp = pytest.importorskip("hypothesis")
  from hypothesis import strategies as st

  from dllm_jax.engine.text import TextAssembler
  tok, cfg = server.llm.tokenizer, server.llm.cfg
  vocab = cfg.vocab_size

  @hyp.settings(max_examples=300, deadline=None, derandomize=True, database=None)
  @hyp.given(ids=st.lists(st.integers(0, vocab - 1).filter(lambda t: t != cfg.mask_token_id),
                          max_size=40),
             cuts=st.lists(st.integers(0, 40), max_size=8),
             stop=st.lists(st.text(alphabet="kab\ufffd` ", min_size=1, max_size=3),
                           max_size=3),
             limit=st.one_of(st.none(), st.integers(1, 40)))
  def check(ids, cuts, stop, limit):
    stops = stop
    asm = TextAssembler(tok, cfg.eos_ids, limit=limit, stops=stops)
    streamed = "".join(asm.update(ids[:c]) for c in sorted(cuts))
    streamed += asm.update(ids, True)
    ref = TextAssembler(tok, cfg.eos_ids, limit=limit, stops=stops)
    ref.update(ids, True)
    assert streamed == ref.sent == asm.sent
    kept = ids[:limit] if limit else ids
    eos = next((j for j, t in enumerate(kept) if t in cfg.eos_ids), len(kept))
    plain = tok.decode(kept[:eos])
    if not stops or all(s not in plain for s in stops):
      assert ref.sent == plain
      assert ref.finish_reason == ("stop" if eos < len(kept) else "length")
    else:
      assert ref.finish_reason == "stop" and plain.startswith(ref.sent)
      assert not any(s in ref.sent for s in stops)

  check()
