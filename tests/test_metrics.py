"""Benchmark metrics on a synthetic trace with hand-computed answers; the driver end to end."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from dllm_jax.bench import driver
from dllm_jax.bench import metrics as M
from dllm_jax.bench import workloads as W

EOS = 1


def record(i, arrival, first, finish, tokens, nfe, reason="eos"):
  counted, fill = M.count_generated(tokens, [EOS])
  return M.RequestRecord(
      request_id=f"r{i}", category="a" if i % 2 else "b", arrival_s=arrival, submit_s=arrival,
      first_token_s=first, finish_s=finish, prompt_tokens=5, gen_length=len(tokens),
      generated_tokens=counted, eos_fill=fill, nfe=nfe, finish_reason=reason)


def synthetic_records():
  rejected = M.RequestRecord(
      request_id="r3", category="a", arrival_s=3.0, submit_s=None, first_token_s=None,
      finish_s=None, prompt_tokens=5, gen_length=8, generated_tokens=0, eos_fill=0, nfe=0,
      finish_reason="rejected", error="too long")
  return [
      record(0, 0.0, 1.0, 2.0, [5, 6, 7, EOS, EOS, EOS, EOS, EOS], 8),   # 4 counted, 4 fill
      record(1, 1.0, 1.5, 4.0, [5, 6, 7, 8, 9, 10, 11, 12], 8, "length"),  # 8 counted
      record(2, 2.0, 4.0, 7.0, [5, 6, 7, 8, 9, EOS, EOS, EOS], 4),        # 6 counted, 2 fill
      rejected,
      record(4, 4.0, 5.0, 8.0, [5, EOS, EOS, EOS, EOS, EOS, EOS, EOS], 2),  # 2 counted, 6 fill
  ]


def test_count_generated_stops_at_the_first_eos():
  assert M.count_generated([3, 4, 5], [EOS]) == (3, 0)
  assert M.count_generated([3, EOS, EOS, EOS], [EOS]) == (2, 2)
  assert M.count_generated([EOS, 3, 3], [EOS]) == (1, 2)
  assert M.count_generated([3, 9, 3, EOS], [EOS, 9]) == (2, 2)  # EoT ends it too
  assert M.count_generated([], [EOS]) == (0, 0)


def test_percentile_is_numpy_linear():
  v = [4.0, 1.0, 3.0, 2.0]
  assert M.percentile(v, 50) == pytest.approx(2.5)
  assert M.percentile(v, 90) == pytest.approx(3.7)   # rank 0.9 * 3 = 2.7: 3 + 0.7 * (4 - 3)
  assert M.percentile(v, 99) == pytest.approx(3.97)
  assert M.percentile(v, 0) == 1.0 and M.percentile(v, 100) == 4.0
  assert M.percentile([7.0], 99) == 7.0
  assert M.percentile([], 50) is None


def test_metrics_on_a_synthetic_trace():
  m = M.compute_metrics(synthetic_records())
  assert m["requests"] == 5 and m["finished"] == 4 and m["rejected"] == 1
  assert m["wall_s"] == pytest.approx(8.0)             # last finish 8 - first arrival 0
  assert m["generated_tokens"] == 20                   # 4 + 8 + 6 + 2: EOS fill not counted
  assert m["eos_fill_tokens"] == 12
  assert m["throughput_tok_s"] == pytest.approx(2.5)   # 20 / 8
  assert m["requests_per_s"] == pytest.approx(0.5)     # 4 / 8
  lat = m["latency_s"]                                 # latencies 2, 3, 5, 4
  assert lat["mean"] == pytest.approx(3.5) and lat["max"] == pytest.approx(5.0)
  assert lat["p50"] == pytest.approx(3.5)
  assert lat["p90"] == pytest.approx(4.7)
  assert lat["p99"] == pytest.approx(4.97)
  ttft = m["ttft_s"]                                   # TTFTs 1, 0.5, 2, 1
  assert ttft["p50"] == pytest.approx(1.0)
  assert ttft["p99"] == pytest.approx(1.97)
  assert m["nfe_per_token"] == pytest.approx(22 / 20)
  assert m["per_category"]["b"]["requests"] == 3 and m["per_category"]["a"]["requests"] == 1
  assert m["per_category"]["b"]["generated_tokens"] == 12     # r0, r2, r4: 4 + 6 + 2
  assert m["per_category"]["b"]["latency_p50_s"] == pytest.approx(4.0)  # 2, 5, 4
  assert "engine" not in m
  json.dumps(m)


def test_explicit_wall_time_wins():
  m = M.compute_metrics(synthetic_records(), wall_s=10.0)
  assert m["throughput_tok_s"] == pytest.approx(2.0)
  assert m["requests_per_s"] == pytest.approx(0.4)


def test_engine_metrics_host_overhead_and_phase_mix():
  stats = dict(steps=4, refresh_rows=5, select_rows=1, reuse_rows=9, committed_tokens=30,
               host_seconds=0.2, device_seconds=0.6, transfers=4,
               phase_mix=[(2, 0), (1, 3), (0, 4), (2, 2)])
  m = M.compute_metrics(synthetic_records(), stats=stats, compile_count=3)
  e = m["engine"]
  assert m["compilations"] == 3 and e["compilations"] == 3
  assert e["host_ms_per_step"] == pytest.approx(50.0)
  assert e["device_ms_per_step"] == pytest.approx(150.0)
  assert e["host_pct_of_step"] == pytest.approx(25.0)
  assert e["refresh_rows_per_step"] == pytest.approx(1.25)
  assert e["reuse_rows_per_step"] == pytest.approx(2.25)
  assert e["reuse_share_of_rows"] == pytest.approx(9 / 14)
  assert (e["refresh_only_steps"], e["reuse_only_steps"], e["mixed_steps"]) == (0.25, 0.25, 0.5)
  assert e["select_rows"] == 1


def test_stats_delta_subtracts_counters_and_keeps_new_steps():
  before = dict(steps=2, host_seconds=1.0, phase_mix=[(1, 0), (1, 1)])
  after = dict(steps=5, host_seconds=1.5, phase_mix=[(1, 0), (1, 1), (0, 2), (2, 0), (1, 1)])
  d = M.stats_delta(before, after)
  assert d["steps"] == 3 and d["host_seconds"] == pytest.approx(0.5)
  assert d["phase_mix"] == [(0, 2), (2, 0), (1, 1)]


def test_empty_run_has_no_rates():
  m = M.compute_metrics([])
  assert m["finished"] == 0 and m["throughput_tok_s"] is None
  assert m["latency_s"]["p99"] is None


# The driver -----------------------------------------------------------------------------------

TINY = dict(model_type="llada", d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
            mlp_hidden_size=64, vocab_size=64, max_sequence_length=128, rope_theta=10000.0,
            rms_norm_eps=1e-5, mask_token_id=63, eos_token_id=1, pad_token_id=0)

RESULT_KEYS = {"version", "mode", "workload", "engine_config", "model", "machine", "memory",
               "requests", "metrics", "engine_stats"}
METRIC_KEYS = {"requests", "finished", "rejected", "wall_s", "generated_tokens",
               "eos_fill_tokens", "throughput_tok_s", "requests_per_s", "latency_s", "ttft_s",
               "nfe_per_token", "per_category", "engine", "compilations"}


def test_run_workload_end_to_end_on_a_tiny_model():
  from dllm_jax.config import EngineConfig, ModelConfig
  from dllm_jax.engine.engine import LLM
  from dllm_jax.model.transformer import init_model

  cfg = ModelConfig.from_dict(TINY)
  llm = LLM(init_model(cfg, seed=0),
            engine_config=EngineConfig(max_running=4, max_block_length=8, logits="rows"))
  mix = (W.Category("short", 1.0, 10, 0.3, 8),)
  items = W.poisson(4, rate=float("inf"), seed=0,  # one batch: a single shape bucket
                    content=W.Content(mix=mix, source=W.TokenSource.for_model(cfg)))
  # A bad request is recorded as rejected, not raised.
  items.append(W.WorkItem(arrival_s=0.0, prompt=(5,) * 200, gen_length=8, category="short"))
  result = driver.run_workload(llm, items, time_scale=0.0, progress=False, workload="poisson",
                               base_params={"block_length": 8})
  json.dumps(result)
  assert RESULT_KEYS <= set(result)
  assert METRIC_KEYS <= set(result["metrics"])
  m = result["metrics"]
  assert m["requests"] == 5 and m["finished"] == 4 and m["rejected"] == 1
  reqs = result["requests"]
  assert reqs[4]["finish_reason"] == "rejected" and "max_model_len" in reqs[4]["error"]
  for r in reqs[:4]:
    assert r["finish_reason"] in ("eos", "length")
    assert 0 <= r["arrival_s"] <= r["submit_s"] <= r["first_token_s"] <= r["finish_s"]
    assert r["generated_tokens"] + r["eos_fill"] == 8 and r["nfe"] >= 1
  assert m["generated_tokens"] == sum(r["generated_tokens"] for r in reqs)
  assert m["throughput_tok_s"] > 0 and m["latency_s"]["p99"] > 0
  assert result["engine_config"]["logits"] == "rows" and result["engine_config"]["sparse"] is None
  assert result["memory"]["weights_bytes"] == cfg.num_params() * 4
  assert result["memory"]["kv_pool_bytes"] == llm.core.pool_cfg.pool_bytes
  assert {"platform", "cpu_count", "jax_version", "backend", "device_kind"} <= set(
      result["machine"])
  es = result["engine_stats"]
  assert es["steps"] == len(es["phase_mix"]) == m["engine"]["steps"] >= 1
  assert m["engine"]["compilations"] >= 0
  assert result["workload"]["requests"] == 5


def test_run_http_against_a_mock_server():
  httpx = pytest.importorskip("httpx")
  seen = []

  def handler(request):
    body = json.loads(request.content)
    seen.append(body)
    if body["prompt"] == "fail":
      return httpx.Response(500, json={"error": "boom"})
    return httpx.Response(200, json={"choices": [{"text": "x", "finish_reason": "stop"}],
                                     "usage": {"completion_tokens": body["max_tokens"] // 2}})

  items = [W.WorkItem(0.0, "hello", 16, {"steps": 16}), W.WorkItem(0.01, (5, 6, 7), 8),
           W.WorkItem(0.02, "fail", 8)]
  result = driver.run_http("http://test", items, time_scale=1.0, progress=False,
                           base_params={"block_length": 8}, transport=httpx.MockTransport(handler))
  json.dumps(result)
  m = result["metrics"]
  assert m["finished"] == 2 and m["rejected"] == 1 and m["generated_tokens"] == 12
  assert result["requests"][2]["finish_reason"] == "error"
  first = next(b for b in seen if b["prompt"] == "hello")
  assert first["max_tokens"] == 16 and first["steps"] == 16 and first["block_length"] == 8
  assert next(b for b in seen if b["max_tokens"] == 8 and b["prompt"] != "fail")["prompt"] == \
      [5, 6, 7]


def test_cli_flags_build_engine_config_and_workload():
  p = argparse.ArgumentParser()
  driver.add_args(p)
  args = p.parse_args(["--workload", "burst", "--requests", "5", "--sparse", "shared",
                       "--keep-ratio", "0.25", "--memory-budget-mb", "64", "--max-running", "3",
                       "--token-budget", "512", "--scheduler", "static", "--logits", "full",
                       "--gen-length", "16", "--block-length", "8", "--burst-size", "2"])
  cfg = driver.engine_config_from_args(args)
  assert (cfg.scheduler, cfg.logits, cfg.max_running, cfg.token_budget) == ("static", "full", 3,
                                                                          512)
  assert cfg.memory_budget_bytes == 64 * 2**20
  assert cfg.sparse.selection == "shared" and cfg.sparse.keep_ratio == 0.25
  assert driver.base_params_from_args(args) == {"block_length": 8}
  items = driver.workload_from_args(args, W.TokenSource(50, exclude=(0,)), max_len=64)
  assert len(items) == 5 and {it.gen_length for it in items} == {16}
  assert max(len(it.prompt) for it in items) <= 48
  assert np.unique([it.arrival_s for it in items]).tolist() == [0.0, 10.0, 20.0]
  off = driver.engine_config_from_args(p.parse_args(["--sparse", "off"]))
  assert off.sparse is None
