"""scripts/gpu-check.sh: the dry run (every stage at toy size on the CPU) and its JSON (slow), the
time guard, failure handling, refusing a CPU backend, and that the parity stages can fail."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")


def _module(name: str):
  """scripts/NAME.py as module ``scripts_NAME`` (scripts/ is not a package)."""
  key = f"scripts_{name}"
  if key not in sys.modules:
    spec = importlib.util.spec_from_file_location(key, os.path.join(SCRIPTS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
  return sys.modules[key]


gpu_check = _module("gpu_check")


def _load(out, stage):
  with open(os.path.join(out, f"{stage}.json")) as fh:
    return json.load(fh)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("gpu-check"))
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "PYTHONPATH")}
  proc = subprocess.run([os.path.join(SCRIPTS, "gpu-check.sh"), "--dry-run", out], cwd="/",
                        env=env, capture_output=True, text=True, timeout=900)
  return out, proc


# The dry run takes ~1 minute on 2 idle cores, ~2.5 minutes with the machine loaded: slow.
@pytest.mark.slow
def test_dry_run_passes_every_stage(dry_run):
  out, proc = dry_run
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  with open(os.path.join(out, "summary.json")) as fh:
    summary = json.load(fh)
  assert summary["passed"] and summary["dry_run"] and summary["device"] == "cpu"
  assert [s["stage"] for s in summary["stages"]] == list(gpu_check.STAGE_NAMES)
  for s in summary["stages"]:  # bench logits --calibrate may not have landed in this checkout
    assert s["status"] == "pass" or (s["stage"] == "logits_calibrate" and s["status"] ==
                                     "skipped" and s["reason"] == "this checkout has no "
                                     "--calibrate"), s
  for name in gpu_check.STAGE_NAMES:
    rec = _load(out, name)
    if rec["status"] == "skipped":
      continue
    assert rec["stage"] == name and rec["status"] == "pass" and rec["returncode"] == 0
    assert rec["device"] == "cpu" and rec["backend"] == "cpu" and rec["jax"]
    assert rec["dry_run"] is True and rec["result"] is not None and rec["seconds"] > 0
    assert os.path.isfile(rec["log"])


@pytest.mark.slow
def test_dry_run_stage_results(dry_run):
  out, _ = dry_run
  kern = _load(out, "kernels")["result"]
  assert kern["impl"] == "interpret" and kern["passed"] and len(kern["cases"]) == 8
  assert {(c["kernel"], c["dtype"]) for c in kern["cases"]} == {
      (k, d) for k in ("head_sparse_attention", "fused_lm_head") for d in ("bfloat16", "float32")}
  att = _load(out, "refresh_attention")["result"]
  assert att["passed"] and att["impls"] == ["xla"] and att["skipped"] == ["cudnn (no GPU)"]
  assert all(0 in c["lengths"] for c in att["cases"])  # a length-0 row is in every case
  assert _load(out, "bench_attention")["result"]["rows"]
  assert _load(out, "bench_logits")["result"]["backend"] == "cpu"  # its own format
  cal = _load(out, "logits_calibrate")
  assert cal["status"] == "skipped" or cal["result"]
  e256 = _load(out, "e2e_n256")["result"]
  assert e256["complete"] and [m["mode"] for m in e256["modes"]] == ["dense", "dual", "sparse"]
  for m in e256["modes"]:
    assert m["tokens"] == m["committed_tokens"] == 2 * 8 and m["tokens_per_s"] > 0
  dual = e256["modes"][1]
  assert dual["sparse"]["keep_ratio"] == 1.0 and dual["sparse"]["selection"] == "shared"
  assert dual["single_phase"]["reuse"]["keep_tokens"] == 32 - 4   # keep 1.0: every token
  e2048 = _load(out, "e2e_n2048")["result"]
  assert [m["mode"] for m in e2048["modes"]] == ["dual", "sparse"]
  assert e2048["engine_config"]["max_model_len"] == 64
  sweep = _load(out, "pool_sweep")["result"]["pool_sweep"]
  assert [p["fraction"] for p in sweep["points"]] == [0.5, 1.0]
  assert sweep["points"][0]["pool_pages"] < sweep["points"][1]["pool_pages"]
  cold, cached = _load(out, "warmup_cold")["result"], _load(out, "warmup_cached")["result"]
  assert cold["cache_entries_before"] == 0 < cold["cache_entries_after"]
  assert cached["cache_entries_before"] == cold["cache_entries_after"]
  assert cold["executables"] == cached["executables"] >= 1
  # the cold start compiles every executable; the second start loads them all from the store
  assert cold["compiled"] == cold["executables"] and cold["loaded"] == 0
  assert cached["compiled"] == 0 and cached["loaded"] == cached["executables"]


def _run(args, timeout=300):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(SCRIPTS, "gpu_check.py")] + args,
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_time_guard_skips_every_stage_when_the_budget_is_spent(tmp_path):
  proc = _run(["--dry-run", "--budget-s", "0", str(tmp_path)])
  assert proc.returncode == 0, proc.stderr
  for name in gpu_check.STAGE_NAMES:
    rec = _load(tmp_path, name)
    assert rec["status"] == "skipped" and rec["device"] == "cpu"
    assert ("time budget spent" in rec["reason"]) or ("needs warmup_cold" in rec["reason"])
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["counts"]["skipped"] == len(gpu_check.STAGES) and summary["passed"]


def test_without_a_gpu_the_real_check_refuses(tmp_path):
  proc = _run([str(tmp_path)])  # no --dry-run, but JAX_PLATFORMS=cpu would give a CPU backend
  assert proc.returncode == 2
  summary = json.load(open(tmp_path / "summary.json"))
  assert not summary["passed"] and summary["error"].startswith("assertion failed")
  assert not os.path.exists(tmp_path / "kernels.json")


def test_failures_are_recorded_and_the_next_stage_still_runs(tmp_path, monkeypatch):
  ok = ("-c", "import json, sys; json.dump({'x': 1}, open(sys.argv[2], 'w'))")
  crash = ("-c", "raise SystemExit(3)")
  fail = ("-c", "import json, sys; json.dump({'passed': False}, open(sys.argv[2], 'w')); "
                "sys.exit(1)")
  slow = ("-c", "import time; time.sleep(60)")
  stages = (gpu_check.Stage("crash", crash, crash, 5, 0),
            gpu_check.Stage("checks_fail", fail, fail, 5, 0),
            gpu_check.Stage("slow", slow, slow, 1, 0),
            gpu_check.Stage("fine", ok, ok, 30, 0),
            gpu_check.Stage("after_slow", ok, ok, 30, 0, needs="slow"))
  monkeypatch.setattr(gpu_check, "STAGES", stages)
  monkeypatch.setattr(gpu_check, "STAGE_NAMES", tuple(s.name for s in stages))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", REPO)
  assert gpu_check.main(["--dry-run", str(tmp_path)]) == 1
  status = {n: _load(tmp_path, n)["status"] for n in gpu_check.STAGE_NAMES}
  assert status == dict(crash="error", checks_fail="fail", slow="timeout", fine="pass",
                        after_slow="skipped")
  assert _load(tmp_path, "fine")["result"] == {"x": 1}
  assert _load(tmp_path, "checks_fail")["result"] == {"passed": False}


def test_unknown_stage_is_rejected(tmp_path):
  proc = _run(["--dry-run", "--stages", "kernels,nope", str(tmp_path)])
  assert proc.returncode == 2 and "unknown" in proc.stderr


def test_kernel_cases_fail_on_a_wrong_kernel(monkeypatch):
  cases = _module("gpu_kernel_cases")
  from pallas_kernels.head_sparse_attention import ops as attn_ops
  real = attn_ops.head_sparse_attention

  def off_by_a_bit(*args, impl, **kw):
    out = real(*args, impl=impl, **kw)
    return out if impl == "reference" else out * 1.02

  spec = cases.ATTN["toy"]["dream_gqa"]
  good = cases.attention_case("dream_gqa", spec, np.float32, "interpret")
  assert good["passed"] and good["rel_l2"] < 1e-5
  monkeypatch.setattr(attn_ops, "head_sparse_attention", off_by_a_bit)
  bad = cases.attention_case("dream_gqa", spec, np.float32, "interpret")
  assert not bad["passed"] and bad["rel_l2"] == pytest.approx(0.02, rel=1e-3)


def test_refresh_attention_check_fails_on_a_wrong_implementation(monkeypatch):
  check = _module("gpu_refresh_attention")
  from dllm_jax.model import attention
  spec = check.SHAPES["toy"]["dream_gqa"]
  assert check.check("dream_gqa", spec, ["xla"])["passed"]
  real = attention.refresh_attention
  monkeypatch.setattr(attention, "refresh_attention",
                      lambda q, k, v, n, impl: real(q, k, v, n, impl=impl)[:, ::-1])
  row = check.check("dream_gqa", spec, ["xla"])
  assert not row["passed"] and row["impls"]["xla"]["rel_l2_vs_oracle"] > 0.1
