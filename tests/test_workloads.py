"""Workload generators: determinism, documented statistics, trace replay and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dllm_jax.bench import workloads as W

TEXTS = ["The socket module provides access to the BSD socket interface. " * 20,
         "Return a new list containing all items from the iterable in ascending order. " * 20]
SRC = W.TokenSource(vocab_size=100, exclude=(0, 1, 2))


def arrivals(items):
  return np.asarray([it.arrival_s for it in items])


class CharTokenizer:
  """One token per character (id = code point % 97); enough to check exact-length cuts."""

  def encode(self, text, add_special_tokens=False):
    return [ord(c) % 97 for c in text]


# Determinism ---------------------------------------------------------------------------------

GENERATORS = [
    lambda seed: W.poisson(50, rate=3.0, seed=seed, content=W.Content(source=SRC)),
    lambda seed: W.livebench_like(50, rate=3.0, seed=seed, content=W.Content(source=SRC)),
    lambda seed: W.burst(50, burst_size=7, period_s=2.0, spread_s=0.5, seed=seed,
                         content=W.Content(source=W.TextSource(TEXTS))),
    lambda seed: W.osc(50, low_rate=0.5, high_rate=5.0, period_s=4.0, seed=seed,
                       content=W.Content(source=SRC)),
]


@pytest.mark.parametrize("gen", GENERATORS, ids=["poisson", "livebench", "burst", "osc"])
def test_generators_are_deterministic_for_a_seed(gen):
  a, b, c = gen(7), gen(7), gen(8)
  assert a == b
  assert a != c
  assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:]))


def test_content_does_not_depend_on_the_arrival_parameters():
  a = W.poisson(30, rate=1.0, seed=3, content=W.Content(source=SRC))
  b = W.poisson(30, rate=9.0, seed=3, content=W.Content(source=SRC))
  assert [it.prompt for it in a] == [it.prompt for it in b]
  assert not np.allclose(arrivals(a), arrivals(b))


def test_default_content_is_cut_from_the_heldout_corpus():
  from dllm_jax.train.corpus import load_corpus
  try:
    corpus = "\n\n".join(load_corpus("heldout"))
  except FileNotFoundError:
    pytest.skip("no corpus snapshot")
  items = W.livebench_like(5, seed=0, content=W.Content(max_prompt_tokens=40))
  for it in items:
    assert isinstance(it.prompt, str) and len(it.prompt) == 160  # 40 tokens x 4 chars
    assert it.prompt in corpus + corpus[:160]


# Statistics ----------------------------------------------------------------------------------

def test_poisson_mean_rate_and_exponential_gaps():
  items = W.poisson(20000, rate=4.0, seed=0, content=W.Content(mix=W.FIXED_MIX, source=SRC))
  t = arrivals(items)
  assert t[0] == 0.0
  gaps = np.diff(t)
  assert (len(t) - 1) / t[-1] == pytest.approx(4.0, rel=0.03)
  assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV = 1
  assert all(len(it.prompt) == 128 and it.gen_length == 128 for it in items[:50])


def test_poisson_infinite_rate_is_an_offline_batch():
  items = W.poisson(5, rate=float("inf"), content=W.Content(source=SRC))
  assert (arrivals(items) == 0).all()


def test_burst_sizes_and_period_are_exact():
  items = W.burst(23, burst_size=5, period_s=3.0, content=W.Content(source=SRC))
  t = arrivals(items)
  starts, counts = np.unique(t, return_counts=True)
  assert starts.tolist() == [0.0, 3.0, 6.0, 9.0, 12.0]
  assert counts.tolist() == [5, 5, 5, 5, 3]


def test_burst_spike_stays_within_its_spread():
  items = W.burst(40, burst_size=10, period_s=5.0, spread_s=0.5, seed=2,
                  content=W.Content(source=SRC))
  t = arrivals(items)
  k = np.floor(t / 5.0)
  assert np.bincount(k.astype(int)).tolist() == [10, 10, 10, 10]
  assert ((t - k * 5.0) < 0.5).all() and ((t - k * 5.0) >= 0).all()
  assert len(np.unique(t)) == 40


def test_osc_rate_in_high_and_low_phases():
  low, high, period = 1.0, 10.0, 20.0
  items = W.osc(6000, low_rate=low, high_rate=high, period_s=period, seed=1,
                content=W.Content(source=SRC))
  t = arrivals(items)
  full = np.floor(t[-1] / period) * period  # whole periods only
  t = t[t < full]
  phase = np.mod(t, period)
  half_time = full / 2
  assert (phase < period / 2).sum() / half_time == pytest.approx(low, rel=0.12)
  assert (phase >= period / 2).sum() / half_time == pytest.approx(high, rel=0.05)


def test_osc_sine_mean_rate():
  items = W.osc(4000, low_rate=1.0, high_rate=5.0, period_s=10.0, shape="sine", seed=4,
                content=W.Content(source=SRC))
  t = arrivals(items)
  full = np.floor(t[-1] / 10.0) * 10.0
  assert (t < full).sum() / full == pytest.approx(3.0, rel=0.05)
  assert W.osc_rate(5.0, 1.0, 5.0, 10.0, "sine") == pytest.approx(5.0)
  assert W.osc_rate(0.0, 1.0, 5.0, 10.0, "sine") == pytest.approx(1.0)


def test_livebench_category_mix_and_lengths():
  n = 6000
  items = W.livebench_like(n, rate=100.0, seed=5, content=W.Content(source=SRC))
  counts = {c: 0 for c in W.CATEGORIES}
  lens = {c: [] for c in W.CATEGORIES}
  for it in items:
    counts[it.category] += 1
    lens[it.category].append(len(it.prompt))
  for cat in W.LIVEBENCH_MIX:
    assert counts[cat.name] / n == pytest.approx(1 / 6, abs=0.02)
    logs = np.log(lens[cat.name])
    assert np.exp(np.median(logs)) == pytest.approx(cat.median_tokens, rel=0.1)
    assert logs.std() == pytest.approx(cat.sigma, rel=0.1)
  gen = {it.category: it.gen_length for it in items}
  assert gen == {c.name: c.gen_length for c in W.LIVEBENCH_MIX}


def test_custom_weights_scale_and_clip():
  mix = (W.Category("a", 3.0, 100, 0.5, 32), W.Category("b", 1.0, 100, 0.5, 64))
  content = W.Content(mix=mix, source=SRC, length_scale=0.5, max_prompt_tokens=60,
                      min_prompt_tokens=10, gen_length=16, params={"block_length": 8})
  items = W.poisson(4000, rate=10.0, seed=0, content=content)
  share_a = sum(it.category == "a" for it in items) / len(items)
  assert share_a == pytest.approx(0.75, abs=0.03)
  lens = np.asarray([len(it.prompt) for it in items])
  assert lens.min() >= 10 and lens.max() == 60
  assert np.median(lens) == pytest.approx(50, rel=0.1)
  assert {it.gen_length for it in items} == {16}
  assert all(it.params == {"block_length": 8} for it in items)


def test_text_source_cuts_exact_token_lengths_with_a_tokenizer():
  src = W.TextSource(TEXTS, tokenizer=CharTokenizer())
  rng = np.random.default_rng(0)
  for n in (1, 17, 300, 5000):  # 5000 > the stream: wraps around
    p = src.sample(rng, n)
    assert isinstance(p, tuple) and len(p) == n
  text = W.TextSource(TEXTS).sample(np.random.default_rng(0), 10)
  assert isinstance(text, str) and len(text) == 40


def test_token_source_excludes_special_ids():
  src = W.TokenSource(vocab_size=8, exclude=(0, 3, 7))
  ids = src.sample(np.random.default_rng(0), 2000)
  assert set(ids) == {1, 2, 4, 5, 6}


@pytest.mark.parametrize("call, msg", [
    (lambda: W.poisson(0, rate=1.0), "n:"),
    (lambda: W.poisson(3, rate=0.0), "rate"),
    (lambda: W.burst(3, burst_size=0), "burst_size"),
    (lambda: W.burst(3, period_s=1.0, spread_s=2.0), "spread_s"),
    (lambda: W.osc(3, shape="triangle"), "shape"),
    (lambda: W.osc(3, low_rate=-1.0), "low_rate"),
    (lambda: W.Content(mix=()), "mix"),
    (lambda: W.Category("x", 1.0, 0, 0.5), "median_tokens"),
])
def test_bad_arguments_raise(call, msg):
  with pytest.raises(ValueError, match=msg):
    call()


# Trace replay --------------------------------------------------------------------------------

def test_trace_round_trip(tmp_path):
  items = W.burst(9, burst_size=3, period_s=1.5, seed=1, content=W.Content(
      source=SRC, params={"block_length": 32, "temperature": 0.0}))
  items.append(W.WorkItem(arrival_s=9.0, prompt="plain text", gen_length=32, category="x"))
  path = tmp_path / "trace.jsonl"
  W.save_trace(items, path)
  assert W.trace(path) == items
  assert W.make_workload("trace", 4, trace_path=str(path)) == items[:4]


def test_trace_sorts_by_arrival_and_skips_blank_lines(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text('{"arrival_s": 2, "prompt": [5, 6], "gen_length": 8}\n\n'
                  '{"arrival_s": 1, "prompt": "hi", "gen_length": 8, "category": "c"}\n')
  items = W.trace(path)
  assert [it.arrival_s for it in items] == [1.0, 2.0]
  assert items[1].prompt == (5, 6) and items[0].category == "c"


@pytest.mark.parametrize("line, msg", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "x", "gen_length": 8}', "missing 'arrival_s'"),
    ('{"arrival_s": 0, "gen_length": 8}', "missing 'prompt'"),
    ('{"arrival_s": -1, "prompt": "x", "gen_length": 8}', "arrival_s must be"),
    ('{"arrival_s": "0", "prompt": "x", "gen_length": 8}', "arrival_s must be"),
    ('{"arrival_s": 0, "prompt": "", "gen_length": 8}', "prompt is empty"),
    ('{"arrival_s": 0, "prompt": [1, -2], "gen_length": 8}', "prompt must be"),
    ('{"arrival_s": 0, "prompt": "x", "gen_length": 0}', "gen_length must be"),
    ('{"arrival_s": 0, "prompt": "x", "gen_length": 8, "arival": 1}', "unknown key 'arival'"),
    ('{"arrival_s": 0, "prompt": "x", "gen_length": 8, "params": []}', "params must be"),
    ('{"arrival_s": 0, "prompt": "x", "gen_length": 8, "params": {"tmp": 1}}',
     "unknown key 'tmp'"),
    ('{"arrival_s": 0, "prompt": "x", "gen_length": 48, "params": {"block_length": 32}}',
     "multiple of block_length"),
    ('{"arrival_s": 0, "prompt": "x", "gen_length": 8, "category": 3}', "category must be"),
])
def test_trace_bad_lines_name_file_and_line(tmp_path, line, msg):
  path = tmp_path / "bad.jsonl"
  good = json.dumps({"arrival_s": 0, "prompt": "ok", "gen_length": 8})
  path.write_text(good + "\n" + line + "\n")
  with pytest.raises(W.TraceError, match=msg) as e:
    W.trace(path)
  assert f"{path}:2:" in str(e.value)


def test_trace_missing_or_empty(tmp_path):
  with pytest.raises(FileNotFoundError, match="trace not found"):
    W.trace(tmp_path / "nope.jsonl")
  (tmp_path / "e.jsonl").write_text("\n")
  with pytest.raises(W.TraceError, match="no requests"):
    W.trace(tmp_path / "e.jsonl")
  with pytest.raises(ValueError, match="--trace"):
    W.make_workload("trace", 3)
  with pytest.raises(ValueError, match="workload"):
    W.make_workload("zipf", 3)
