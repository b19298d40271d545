"""Tensor parallelism on 4 simulated CPU devices (in a subprocess, so other tests keep one)."""

import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module", params=["llada", "dream"])
def run(request):
  proc = subprocess.run([sys.executable, os.path.join(HERE, "tp_worker.py"), request.param],
                        capture_output=True, text=True, timeout=1200,
                        cwd=os.path.dirname(HERE))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return request.param, json.loads(proc.stdout.strip().splitlines()[-1])


def test_tp_outputs_identical_to_tp1(run):
  family, r = run
  for mode in ("dense", "sparse"):
    base = r["tokens"][f"1-{mode}"]
    for tp in (2, 4):
      assert r["tokens"][f"{tp}-{mode}"] == base, (family, mode, tp)


def test_pages_return_to_every_device(run):
  _, r = run
  assert all(r["pages_back"].values())


def test_each_device_pool_holds_only_its_heads(run):
  _, r = run
  for tp, info in r["shards"].items():
    tp = int(tp)
    pools, tables = info["pool"], info["table"]
    assert len(pools) == tp and len(tables) == tp
    # The page axis is split between devices; each device's tables cover only its KV heads.
    assert len({tuple(p) for p in pools}) == 1
    assert all(t[2] == info["layout_kv_heads"] // tp for t in tables)


def _dims(shape: str) -> list[int]:
  m = re.search(r"\[([0-9,]*)\]", shape)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def test_collectives_and_no_logit_all_gather(run):
  _, r = run
  hlo = r["hlo"]
  # Row-parallel o_proj / down_proj and the vocab-parallel embedding reduce with all-reduce.
  assert len(hlo["all-reduce"]) >= 2
  # The logit statistics cross devices as [tp, rows] all-gathers (rows: one decode chunk of
  # candidate rows); no collective carries a
  # vocab-sized axis, i.e. the [rows x V] logits are never gathered.
  assert hlo["all-gather"], "expected the per-row statistics all-gather"
  for shape in hlo["all-gather"]:
    assert _dims(shape) == [2, hlo["rows"]], shape
  for shape in hlo["all-gather"] + hlo["all-reduce"]:
    dims = _dims(shape)
    assert hlo["vocab"] not in dims and hlo["vocab_local"] not in dims, shape
