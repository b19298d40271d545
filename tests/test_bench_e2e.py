"""``dllm-jax bench e2e`` at toy size: the JSON's fields and values, the single-phase timing
leaving the engine as it was, the analytic FLOP count by hand, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dllm_jax.bench import e2e
from dllm_jax.bench import e2e_phase as ph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, P, G, LB = 3, 20, 8, 4          # canvas 28 -> length bucket 32
TOY = ["--config", "bench-small", "--layers", "1", "--hidden-size", "64", "--batch", str(B),
       "--prompt-len", str(P), "--gen-length", str(G), "--block-length", str(LB),
       "--keep-ratio", "0.5", "--repeats", "2"]


def _linear_per_token(layers, d, hq, hkv, hd, f):
  return 2 * layers * (d * hq * hd + 2 * d * hkv * hd + hq * hd * d + 3 * d * f)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """One toy run in a fresh interpreter (so that it can check nothing of the server loads)."""
  out = str(tmp_path_factory.mktemp("e2e") / "e2e.json")
  argv = TOY + ["--modes", "dense,sparse", "--pool-sweep", "0.5,1", "--device-memory-gb",
                "0.05", "--out", out]
  code = ("import sys; from dllm_jax.bench import e2e; rc = e2e.main(sys.argv[1:]); "
          "bad = [m for m in sys.modules if m.startswith('dllm_jax.server')]; "
          "assert not bad, bad; sys.exit(rc)")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", code] + argv, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out) as fh:
    return json.load(fh), proc.stdout


def test_header_and_formula(toy_run):
  r, stdout = toy_run
  assert r["complete"] is True and r["version"] == e2e.RESULT_VERSION
  assert r["device"] == "cpu" and r["backend"] == "cpu" and r["jax"]
  assert r["workload"] == dict(batch=B, prompt_len=P, gen_length=G, block_length=LB, steps=G,
                               temperature=0.0, stop_on_eos=False, tokens_per_call=B * G, seed=0)
  m = r["model"]
  assert (m["layers"], m["hidden_size"], m["heads"], m["kv_heads"], m["head_dim"],
          m["intermediate_size"], m["vocab_size"]) == (1, 64, 2, 2, 32, 192, 4096)
  assert m["linear_flops_per_token"] == _linear_per_token(1, 64, 2, 2, 32, 192) == 106496
  assert set(r["flop_formula"]) >= {"linear_per_token", "refresh_step", "reuse_step", "symbols"}
  ec = r["engine_config"]
  assert (ec["max_model_len"], ec["max_running"], ec["token_budget"], ec["max_refresh_rows"],
          ec["max_reuse_rows"], ec["max_block_length"]) == (32, B, B * 32, B, B, LB)
  assert "| dense |" in stdout and "| sparse |" in stdout


def test_modes(toy_run):
  r, _ = toy_run
  modes = {m["mode"]: m for m in r["modes"]}
  assert list(modes) == ["dense", "sparse"]
  for name, m in modes.items():
    assert "error" not in m, m
    assert m["tokens"] == m["committed_tokens"] == B * G
    assert m["tokens_per_s"] == pytest.approx(B * G / m["timed_s"])
    assert m["tokens_per_s"] > 0 and m["first_call_s"] > m["timed_s"] > 0
    assert m["nfe_per_request"] == [G] and m["steps"] == G   # all rows move in lockstep
    assert m["timed_compiles"] == 0 and m["first_call_compiles"]["engine_executables"] >= 1
    assert m["first_call_compiles"]["count"] >= 1
    assert 0 < m["host_share"] < 1
    assert m["pool_pages"] >= 2 and m["pool_bytes"] == m["pool_pages"] * m["page_bytes"]
    assert m["padding_waste"] >= 1 and sum(m["buckets"].values()) == G  # steps per "TxN"
    ref = m["single_phase"]["refresh"]
    bucket = ref["bucket"]
    assert bucket["length"] == 32 and bucket["refresh_rows"] >= B and bucket["tokens"] >= B * 28
    assert bucket["candidates"] == B * LB and ref["keep_tokens"] is None
    lin = _linear_per_token(1, 64, 2, 2, 32, 192)
    t = B * (P + G)  # useful tokens: rows x canvas
    want = lin * t + 1 * 4 * t * (P + G) * 64 + 2 * 64 * 4096 * B * LB
    assert ref["flops"] == want
    assert ref["tflops"] == pytest.approx(want / ref["seconds"] / 1e12)
    assert ref["compiles"] == 0 and len(ref["runs_s"]) == 2
  assert modes["dense"]["sparse"] is None and modes["dense"]["single_phase"]["reuse"] is None
  assert modes["dense"]["refresh_rows"] == B * G and modes["dense"]["reuse_rows"] == 0
  sp = modes["sparse"]
  assert sp["sparse"]["selection"] == "per_head" and sp["sparse"]["keep_ratio"] == 0.5
  # delay 1: each block is Refresh, Refresh+Select, then Reuse.
  assert sp["refresh_rows"] == B * 2 * (G // LB) and sp["reuse_rows"] == B * (G - 2 * G // LB)
  reuse = sp["single_phase"]["reuse"]
  keep = int((P + G - LB) * 0.5)
  assert reuse["keep_tokens"] == keep and reuse["compiles"] == 0
  assert reuse["bucket"]["length"] == 0 and reuse["bucket"]["reuse_rows"] >= B
  assert reuse["bucket"]["candidates"] == B * LB
  lin = _linear_per_token(1, 64, 2, 2, 32, 192)
  t = B * LB
  assert reuse["flops"] == lin * t + 1 * 4 * t * (keep + LB) * 64 + 2 * 64 * 4096 * B * LB


def test_pool_sweep(toy_run):
  r, _ = toy_run
  sw = r["pool_sweep"]
  free = int(0.05 * 2**30)
  assert sw["mode"] == "sparse" and sw["free_device_bytes"] == free
  assert sw["free_source"] == "--device-memory-gb"
  a, b = sw["points"]
  assert (a["fraction"], b["fraction"]) == (0.5, 1.0)
  for pt in (a, b):
    assert "error" not in pt, pt
    assert pt["memory_budget_bytes"] == int(pt["fraction"] * free)
    assert pt["tokens"] == B * G and pt["tokens_per_s"] > 0 and "single_phase" not in pt
  # Same weights and activation peak: the extra budget all goes to pages.
  extra = (b["memory_budget_bytes"] - a["memory_budget_bytes"]) / a["page_bytes"]
  assert abs((b["pool_pages"] - a["pool_pages"]) - extra) <= 1


def test_single_phase_leaves_the_engine_as_it_was():
  import numpy as np

  from dllm_jax.config import EngineConfig, SamplingParams, SparseConfig
  from dllm_jax.engine.engine import LLM
  from dllm_jax.model.transformer import init_model

  mcfg = e2e.load_model_config("bench-small", 1, 64)
  cfg = EngineConfig(max_model_len=32, max_running=2, token_budget=64, max_refresh_rows=2,
                     max_reuse_rows=2, max_block_length=4,
                     sparse=SparseConfig(keep_ratio=0.5, selection="per_head"))
  llm = LLM(init_model(mcfg, seed=1), engine_config=cfg)
  prompts = e2e.random_prompts(mcfg, 2, 20, seed=3)
  sp = SamplingParams(gen_length=8, steps=8, block_length=4, temperature=0.0, stop_on_eos=False)
  first = [o.token_ids for o in llm.generate(prompts, sp)]
  table = np.asarray(llm.core.cache.page_table).copy()
  kv_len = np.asarray(llm.core.cache.kv_len).copy()
  for phase in ("refresh", "reuse"):
    t: dict = {}
    s = ph.single_phase_seconds(llm.core, phase, 2, 28, 4, 0.5, repeats=1, timings=t)
    assert s > 0 and t["compiles"] == 0 and len(t["runs_s"]) == 1
    assert t["keep_tokens"] == (12 if phase == "reuse" else 0)
    assert t["shapes"]["candidates"] == 2 * 4
    np.testing.assert_array_equal(np.asarray(llm.core.cache.page_table), table)
    np.testing.assert_array_equal(np.asarray(llm.core.cache.kv_len), kv_len)
  assert [o.token_ids for o in llm.generate(prompts, sp)] == first
  with pytest.raises(ValueError, match="phase"):
    ph.single_phase_seconds(llm.core, "select", 2, 28, 4, 0.5)
  with pytest.raises(ValueError, match="max_running"):
    ph.single_phase_seconds(llm.core, "reuse", 3, 28, 4, 0.5)
  with pytest.raises(ValueError, match="max_block_length"):
    ph.single_phase_seconds(llm.core, "refresh", 2, 28, 8, 0.5)


def test_step_flops_at_8b_dims_by_hand():
  mcfg = e2e.load_model_config("llada-8b")
  per_token = 2 * 32 * (4 * 4096 * 4096 + 3 * 4096 * 12288)
  assert ph.linear_flops_per_token(mcfg) == per_token == 13_958_643_712
  got = ph.step_flops(mcfg, "refresh", rows=32, length=256, block=32)
  assert got == per_token * 8192 + 32 * 4 * 8192 * 256 * 4096 + 2 * 4096 * 126464 * 32 * 32
  got = ph.step_flops(mcfg, "reuse", rows=32, length=256, block=32, keep=112)
  assert got == per_token * 1024 + 32 * 4 * 1024 * 144 * 4096 + 2 * 4096 * 126464 * 32 * 32
  dream = e2e.load_model_config("dream-7b")  # GQA 28:4, one query-only row per Reuse row
  per_token = 2 * 28 * (3584 * 3584 + 2 * 3584 * 512 + 3584 * 3584 + 3 * 3584 * 18944)
  got = ph.step_flops(dream, "reuse", rows=2, length=256, block=32, keep=100)
  assert got == per_token * 66 + 28 * 4 * 66 * 132 * 3584 + 2 * 3584 * 152064 * 2 * 32
  with pytest.raises(ValueError, match="phase"):
    ph.step_flops(mcfg, "select", rows=1, length=32, block=8)


def test_config_presets_and_shrinking(tmp_path):
  llada = e2e.load_model_config("llada-8b", 2, 256)
  assert (llada.num_layers, llada.hidden_size, llada.num_heads, llada.num_kv_heads,
          llada.head_dim, llada.intermediate_size) == (2, 256, 2, 2, 128, 768)
  dream = e2e.load_model_config("dream-7b", hidden_size=896)
  assert (dream.num_heads, dream.num_kv_heads, dream.head_dim, dream.intermediate_size) == (
      7, 1, 128, round(18944 * 896 / 3584))
  with pytest.raises(ValueError, match="multiple of head_dim x group = 128 x 7"):
    e2e.load_model_config("dream-7b", hidden_size=512)
  with pytest.raises(FileNotFoundError, match="no such file, directory or preset"):
    e2e.load_model_config("no-such-model")
  path = tmp_path / "config.json"
  path.write_text(open(os.path.join(REPO, "configs", "bench-small.json")).read())
  assert e2e.load_model_config(str(path)).hidden_size == 128


def test_random_prompts_avoid_special_ids():
  mcfg = e2e.load_model_config("bench-small")
  prompts = e2e.random_prompts(mcfg, 8, 512, seed=0)
  ids = {t for p in prompts for t in p}
  special = {mcfg.mask_token_id, mcfg.pad_token_id, mcfg.bos_token_id, *mcfg.eos_ids}
  assert not ids & special and len(ids) > 2000  # 4096 draws of 4092 ids: ~2590 distinct
  assert prompts == e2e.random_prompts(mcfg, 8, 512, seed=0)


@pytest.mark.parametrize("extra, msg", [
    (["--sparse", "shared"], "--sparse / --selection"),
    (["--gen-length", "6"], "multiple of --block-length"),
    (["--pool-sweep", "0.5,1.5"], "fractions must be in"),
    (["--hidden-size", "48"], "multiple of head_dim"),
    (["--prompt-len", "600"], "exceeds the model's 512 positions"),
    (["--memory-budget-gb", "1", "--memory-budget-mb", "10"], "give one of"),
    (["--modes", "none"], "nothing to run"),
])
def test_bad_input_is_a_clear_error(extra, msg, capsys):
  assert e2e.main(TOY + extra) == 2
  assert msg in capsys.readouterr().err


def test_bad_modes_are_rejected_by_the_parser(capsys):
  with pytest.raises(SystemExit):
    e2e.main(TOY + ["--modes", "dense,turbo"])
  assert "--modes" in capsys.readouterr().err
