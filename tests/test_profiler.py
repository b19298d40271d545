import json
import subprocess
import sys

import pytest

from dllm_jax.config import ModelConfig
from dllm_jax.engine import profiler

GIB = 2**30


@pytest.fixture(scope="module")
def llada():
  return ModelConfig.from_json("configs/llada-8b.json")


def test_weights_exact_and_page_formula(llada):
  p = profiler.profile(llada, batch=4, seq_len=4096, device_memory_bytes=80 * GIB,
                       utilization=0.9, dtype="bfloat16", page_size=64)
  assert p.weights_bytes == 8_015_581_184 * 2
  assert p.page_bytes == 2 * 32 * 64 * 128 * 2  # K and V, all layers, one head, bf16 = 1 MiB
  free = int(80 * GIB * 0.9) - p.weights_bytes - p.activation_peak_bytes
  assert p.kv_pages == free // p.page_bytes
  assert p.kv_bytes == p.kv_pages * p.page_bytes


def test_lower_logit_peak_means_more_pages(llada):
  kw = dict(batch=4, seq_len=4096, device_memory_bytes=80 * GIB, dtype="bfloat16")
  full = profiler.profile(llada, logits="full", **kw)
  tiled = profiler.profile(llada, logits="vocab_tiled", **kw)
  assert full.logit_bytes["full"] > 50 * full.logit_bytes["rows"]
  assert tiled.kv_pages > full.kv_pages


def test_tensor_parallel_is_per_device(llada):
  kw = dict(batch=4, seq_len=4096, device_memory_bytes=24 * GIB, dtype="bfloat16")
  one = profiler.profile(llada, **kw)
  eight = profiler.profile(llada, tp=8, **kw)
  assert eight.weights_bytes == -(-one.weights_bytes // 8)
  assert one.kv_pages == 0  # 16 GB of weights do not leave 24 GB x 0.9 for anything much
  assert eight.kv_pages > 0


def test_json_round_trip(llada, tmp_path):
  p = profiler.profile(llada, batch=1, seq_len=1024, device_memory_bytes=40 * GIB)
  path = tmp_path / "profile.json"
  profiler.write_profile(p, str(path))
  assert json.loads(path.read_text()) == json.loads(p.to_json())


def test_cli_reports_fit(tmp_path):
  out = subprocess.run([sys.executable, "-m", "dllm_jax.cli", "profile", "--config",
                        "configs/llada-8b.json", "--tp", "8", "--device-memory-gb", "24",
                        "--kv-budget-gb", "8", "--out", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "llada-8b on 8 x 24 GiB with 8 GiB KV per device: fits" in out.stdout
  bad = subprocess.run([sys.executable, "-m", "dllm_jax.cli", "profile", "--config",
                        "configs/llada-8b.json"], capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "device-memory-gb" in bad.stderr
