"""The budgeter's analytic memory model vs measured figures, and its choices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax.sampling import budgeter, variants

GIB, MIB = 2**30, 2**20


@pytest.mark.parametrize("variant,c,tv,measured", [
    ("rows", None, None, 3.89 * GIB),
    ("row_chunked", 1024, None, 534 * MIB),
    ("vocab_tiled", 8192, 8192, 352 * MIB),
])
def test_reproduces_h100_figures_within_15_percent(variant, c, tv, measured):
  # hidden [8192, 4096] bf16 x W [4096, 126464] -> per-row (argmax, max prob), measured on H100
  est = budgeter.estimate_bytes(variant, 8192, 4096, 126464, jnp.bfloat16, c, tv, backend="gpu")
  assert abs(est - measured) / measured <= 0.15, (variant, est / MIB, measured / MIB)


def _temp_bytes(variant, rows, d, vocab, dtype, c, tv):
  def f(h, w):
    p = variants.RowParams.create(jnp.arange(rows, dtype=jnp.int32))
    out = variants.decode_rows(h, w, p, variant=variant, chunk_rows=c or 1024,
                               vocab_tile=tv or 8192, impl="reference")
    return out.token, out.confidence
  comp = jax.jit(f).lower(jax.ShapeDtypeStruct((rows, d), dtype),
                          jax.ShapeDtypeStruct((d, vocab), dtype)).compile()
  return comp.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("rows,d,vocab,dtype", [
    (8192, 4096, 126464, jnp.bfloat16),   # the H100 programs, compiled (not run) for CPU
    (2048, 256, 32768, jnp.float32),
    (500, 512, 50000, jnp.bfloat16),      # padded rows (C does not divide R), ragged vocab
])
@pytest.mark.parametrize("variant,c,tv", [
    ("rows", None, None), ("row_chunked", 1024, None), ("vocab_tiled", None, 8192)])
def test_within_30_percent_of_cpu_memory_analysis(rows, d, vocab, dtype, variant, c, tv):
  c = c if variant != "vocab_tiled" else rows  # the H100 tile program is unchunked
  temp = _temp_bytes(variant, rows, d, vocab, dtype, c, tv)
  if temp == 0:
    pytest.skip("XLA:CPU reported no temp bytes for this program")
  est = budgeter.estimate_bytes(variant, rows, d, vocab, dtype, c, tv, backend="cpu")
  assert abs(est - temp) / temp <= 0.30, (variant, est / MIB, temp / MIB)


def test_never_over_budget_and_prefers_fewest_largest_tiles():
  rows, d, vocab = 4096, 4096, 126464
  mono = budgeter.estimate_bytes("rows", rows, d, vocab, jnp.bfloat16, backend="gpu")
  assert budgeter.choose(mono, rows, d, vocab, jnp.bfloat16, backend="gpu").variant == "rows"
  prev = None
  for budget in [mono // k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256)]:
    plan = budgeter.choose(budget, rows, d, vocab, jnp.bfloat16, backend="gpu")
    assert plan.est_bytes <= budget
    assert plan.est_bytes == budgeter.estimate_bytes(plan.variant, rows, d, vocab, jnp.bfloat16,
                                                     plan.chunk_rows, plan.vocab_tile,
                                                     backend="gpu")
    if prev is not None:
      assert plan.est_bytes <= prev.est_bytes  # less budget never buys a bigger plan
    prev = plan
  assert prev.variant == "vocab_tiled"


def test_measured_timings_refine_the_choice():
  budget = 1 << 40
  timings = {("row_chunked", 1024, None): 0.5, ("rows", None, None): 1.0}
  plan = budgeter.choose(budget, 4096, 256, 32768, jnp.float32, timings=timings)
  assert (plan.variant, plan.chunk_rows) == ("row_chunked", 1024)


def test_error_when_nothing_fits():
  with pytest.raises(ValueError, match="no logit plan fits"):
    budgeter.choose(1000, 8192, 4096, 126464, jnp.bfloat16)
  with pytest.raises(ValueError, match="variant"):
    budgeter.estimate_bytes("bogus", 1, 1, 1, jnp.float32)


def test_fused_kernel_estimate_is_over_50x_below_monolithic():
  args = (8192, 4096, 126464, jnp.bfloat16)
  mono = budgeter.estimate_bytes("rows", *args, backend="gpu")
  xla = budgeter.estimate_bytes("vocab_tiled", *args, 1024, 8192, backend="gpu")
  kern = budgeter.estimate_bytes("vocab_tiled", *args, backend="gpu", impl="pallas",
                                 vocab_splits=2)
  assert mono / xla >= 30 and mono / kern >= 50
  plan = budgeter.choose(8 * MIB, *args, backend="gpu", impl="pallas")
  assert plan.variant == "vocab_tiled" and plan.est_bytes <= 8 * MIB


def test_cost_rule_order():
  sizes = budgeter.plan_sizes(1024, 1000)
  assert sizes[0] == ("rows", None, None)
  chunked = [c for v, c, _ in sizes if v == "row_chunked"]
  assert chunked == sorted(chunked, reverse=True) and chunked[0] == 512
  tiled = [(c, t) for v, c, t in sizes if v == "vocab_tiled"]
  counts = [-(-1024 // c) * -(-1000 // t) for c, t in tiled]
  assert counts == sorted(counts) and tiled[0] == (1024, 512)
  order = [v for v, _, _ in sizes]
  assert order.index("vocab_tiled") > max(i for i, v in enumerate(order) if v == "row_chunked")


@pytest.mark.parametrize("rows,d,vocab,dtype,backend", [
    (8192, 4096, 126464, jnp.bfloat16, "gpu"), (1000, 3584, 152064, jnp.bfloat16, "gpu"),
    (256, 256, 4096, jnp.float32, "cpu"), (37, 64, 1000, jnp.float32, "cpu")])
def test_sweep_never_over_budget(rows, d, vocab, dtype, backend):
  smallest = min(p.est_bytes for p in budgeter.candidates(rows, d, vocab, dtype, backend))
  for budget in np.geomspace(smallest, 8 * rows * vocab * 4, 40).astype(np.int64):
    plan = budgeter.choose(int(budget), rows, d, vocab, dtype, backend=backend)
    assert plan.est_bytes <= budget
  with pytest.raises(ValueError, match="no logit plan fits"):
    budgeter.choose(smallest - 1, rows, d, vocab, dtype, backend=backend)


# ---- calibration: the choice follows measured time per backend / device ----

from dllm_jax.bench import logits_calibrate  # noqa: E402
from dllm_jax.sampling import calibration  # noqa: E402


def _table(backend, costs, ns=(64, 256, 1024), **key):
  key = key or {"device_kind": "cpu"}
  return {"format": 1, "entries": [{"key": {"backend": backend, **key}, "rows": list(ns),
                                    "cost": {k: [float(c)] * len(ns) for k, c in costs.items()}}]}


ARGS = (4096, 256, 32768, jnp.float32)  # R, d, V, dtype
BIG = 1 << 40


@pytest.mark.parametrize("costs,want", [
    (dict(rows=1.0, row_chunked=2.0, vocab_tiled=3.0), ("rows", None, None)),
    (dict(rows=2.0, row_chunked=1.0, vocab_tiled=3.0), ("row_chunked", 2048, None)),
    (dict(rows=2.0, row_chunked=3.0, vocab_tiled=1.0), ("vocab_tiled", 4096, 16384)),
    (dict(rows=1.0, row_chunked=0.97, vocab_tiled=0.98), ("rows", None, None)),  # within 5 %
    (dict(row_chunked=1.0), ("row_chunked", 2048, None)),  # untimed variants are not candidates
])
def test_choice_follows_an_injected_table(costs, want):
  plan = budgeter.choose(BIG, *ARGS, backend="cpu", calibration=_table("cpu", costs))
  assert (plan.variant, plan.chunk_rows, plan.vocab_tile) == want
  assert plan.impl == "xla" and plan.decode_impl == "reference"


def test_per_chunk_cost_curve_picks_the_chunk_size():
  """row_chunked per-row cost falls with the chunk size up to 256 rows, then rises: C = 256."""
  table = _table("cpu", dict(rows=10.0))
  table["entries"][0]["cost"]["row_chunked"] = [4.0, 1.0, 3.0]
  plan = budgeter.choose(BIG, *ARGS, backend="cpu", calibration=table)
  assert (plan.variant, plan.chunk_rows) == ("row_chunked", 256)


def test_gpu_table_can_pick_the_fused_kernel():
  table = _table("gpu", dict(rows=1.0, row_chunked=1.05, vocab_tiled=1.9, vocab_tiled_kernel=0.88),
                 device_kind="NVIDIA H200")
  plan = budgeter.choose(BIG, 1024, 4096, 126464, jnp.bfloat16, backend="gpu",
                         device_kind="NVIDIA H200", calibration=table)
  assert (plan.variant, plan.impl, plan.decode_impl) == ("vocab_tiled", "pallas", "pallas")
  assert plan.chunk_rows is None and plan.vocab_tile is None
  # impl="xla" removes the kernel from the candidates: the next fastest measured plan
  plan = budgeter.choose(BIG, 1024, 4096, 126464, jnp.bfloat16, backend="gpu", impl="xla",
                         device_kind="NVIDIA H200", calibration=table)
  assert plan.variant == "rows"


@pytest.mark.parametrize("costs", [
    dict(rows=0.1, row_chunked=1.0, vocab_tiled=9.0),   # favours the most memory
    dict(rows=9.0, row_chunked=0.1, vocab_tiled=1.0),
    dict(rows=9.0, row_chunked=9.0, vocab_tiled=0.1)])
def test_calibrated_choice_never_exceeds_the_budget(costs):
  rows, d, vocab, dtype = 1000, 512, 50000, jnp.bfloat16
  table = _table("cpu", costs)
  smallest = min(p.est_bytes for p in budgeter.candidates(rows, d, vocab, dtype, "cpu"))
  for budget in np.geomspace(smallest, 2 * rows * vocab * 4, 30).astype(np.int64):
    plan = budgeter.choose(int(budget), rows, d, vocab, dtype, backend="cpu", calibration=table)
    assert plan.est_bytes <= budget
    fits = [p for p in budgeter.candidates(rows, d, vocab, dtype, "cpu")
            if p.est_bytes <= budget]
    entry = budgeter.calibration_entry(table, "cpu")
    t = lambda p: entry.plan_time(p.variant, p.impl, rows, p.chunk_rows)
    assert t(plan) <= min(t(p) for p in fits) / (1 - budgeter.CALIBRATION_MARGIN)
  with pytest.raises(ValueError, match="no logit plan fits"):
    budgeter.choose(smallest - 1, rows, d, vocab, dtype, backend="cpu", calibration=table)


def test_falls_back_to_the_analytic_rule():
  rule = budgeter.choose(8 * MIB, *ARGS, backend="cpu", calibration=None)
  fits = [p for p in budgeter.candidates(*ARGS, "cpu") if p.est_bytes <= 8 * MIB]
  assert rule == fits[0]
  hopper = _table("gpu", dict(rows=1.0, vocab_tiled_kernel=0.5), generation="hopper")
  gpu = (1024, 4096, 126464, jnp.bfloat16)
  analytic = budgeter.choose(BIG, *gpu, backend="gpu", calibration=None)
  assert analytic.variant == "rows"
  for kind in ("NVIDIA A100-SXM4-80GB", "Some Future GPU"):  # no entry for these devices
    assert budgeter.choose(BIG, *gpu, backend="gpu", device_kind=kind,
                           calibration=hopper) == analytic
  assert budgeter.choose(BIG, *gpu, backend="gpu", device_kind="NVIDIA H100 PCIe",
                         calibration=hopper).impl == "pallas"  # the generation entry applies
  # an entry that times none of the fitting plans leaves the rule in charge
  only_rows = _table("cpu", dict(rows=1.0))
  assert budgeter.choose(8 * MIB, *ARGS, backend="cpu", calibration=only_rows) == rule


def test_an_entry_only_ranks_widths_near_the_one_it_measured():
  table = _table("cpu", dict(rows=2.0, row_chunked=1.0, vocab_tiled=3.0))
  table["entries"][0]["shape"] = {"d": 256, "vocab": 32768}
  rule = budgeter.choose(BIG, 1024, 128, 3072, jnp.float32, backend="cpu", calibration=None)
  for d, vocab, measured in ((256, 32768, True), (128, 8192, True), (4096, 16384, True),
                             (128, 3072, False), (4096, 126464, False)):
    plan = budgeter.choose(BIG, 1024, d, vocab, jnp.float32, backend="cpu", calibration=table)
    assert plan.variant == ("row_chunked" if measured else rule.variant), (d, vocab)


def test_kernel_estimate_uses_the_devices_row_block():
  d, v, b = 4096, 126464, jnp.bfloat16
  est = lambda r, kind: budgeter.estimate_bytes("vocab_tiled", r, d, v, b, backend="gpu",
                                                impl="pallas", device_kind=kind)
  pad = lambda r, c: -(-r // c) * c * (d * 2 + 16) if r % c else 0
  for r, kind, c in ((300, "NVIDIA H200", 128), (320, "NVIDIA H200", 128),
                     (320, "NVIDIA A100-SXM4-80GB", 64)):
    blk = budgeter.kernel_blocks_for(r, d, v, b, "gpu", kind)
    assert blk.block_rows == c
    want = blk.vocab_splits * -(-r // c) * c * budgeter.PARTIAL_BYTES + pad(r, c) + r * 64
    assert est(r, kind) == want
  assert est(320, None) == est(320, "NVIDIA H200")  # unknown GPU: the largest block bounds it
  assert est(320, None) > est(320, "NVIDIA A100-SXM4-80GB")


def test_shipped_table_parses_and_covers_cpu_and_hopper():
  entries = calibration.read(calibration.PACKAGE_TABLE)
  cpu = calibration.lookup(entries, "cpu", "cpu")
  assert cpu is not None and {"rows", "row_chunked", "vocab_tiled"} <= set(cpu.curves)
  assert "2 CPUs" in cpu.source and "x86_64" in cpu.source
  hopper = calibration.lookup(entries, "gpu", "NVIDIA H200")
  assert hopper is not None and "not yet calibrated" in hopper.source
  assert hopper.curves["vocab_tiled_kernel"].per_row(1024) == pytest.approx(0.88)
  assert calibration.lookup(entries, "gpu", "NVIDIA A100-SXM4-80GB") is None
  assert calibration.lookup(entries, "tpu", "TPU v5") is None
  plan = budgeter.choose(BIG, 1024, 4096, 126464, jnp.bfloat16, backend="gpu",
                         device_kind="NVIDIA H200", calibration=entries)
  assert plan.impl == "pallas"  # the probe's 0.88x makes the kernel the Hopper choice


def test_curve_interpolation():
  c = calibration.Curve((100, 400), (4.0, 1.0))
  assert c.per_row(100) == 4.0 and c.per_row(400) == 1.0
  assert c.per_row(200) == pytest.approx(2.0)   # log-log: halfway in log n -> sqrt(4 * 1)
  assert c.per_row(50) == pytest.approx(8.0)    # below: the call time (400) is held
  assert c.per_row(4000) == 1.0                 # above: the per-row cost is held


@pytest.mark.parametrize("bad,match", [
    ({"format": 2, "entries": []}, "format"),
    ({"format": 1, "entries": [{"key": {"backend": "cpu"}, "rows": [1], "cost": {"rows": [1]}}]},
     "device_kind or generation"),
    ({"format": 1, "entries": [{"key": {"backend": "cpu", "device_kind": "cpu"}, "rows": [4, 2],
                                "cost": {"rows": [1, 1]}}]}, "ascending"),
    ({"format": 1, "entries": [{"key": {"backend": "cpu", "device_kind": "cpu"}, "rows": [2],
                                "cost": {"rows": [-1]}}]}, "positive"),
    ({"format": 1, "entries": [{"key": {"backend": "cpu", "device_kind": "cpu"}, "rows": [2],
                                "cost": {"bogus": [1]}}]}, "unknown variant"),
])
def test_bad_tables_are_rejected(bad, match):
  with pytest.raises(ValueError, match=match):
    calibration.parse(bad)


def test_calibrate_at_toy_size_writes_a_table_the_budgeter_uses(tmp_path, monkeypatch):
  out = tmp_path / "cal.json"
  lines = []
  table = logits_calibrate.run(str(out), ns=(8, 32), d=32, vocab=512, dtype="float32",
                               repeats=1, log=lines.append)
  entries = calibration.read(out)
  assert len(entries) == 1 and table["entries"][0]["key"] == {"backend": "cpu",
                                                              "device_kind": "cpu"}
  e = calibration.lookup(entries, "cpu", "cpu")
  assert set(e.curves) == {"rows", "row_chunked", "vocab_tiled"} and e.curves["rows"].ns == (8, 32)
  assert any("to ship it" in line for line in lines)
  plan = budgeter.choose(BIG, 64, 32, 512, jnp.float32, backend="cpu", calibration=str(out))
  assert plan.variant in ("rows", "row_chunked", "vocab_tiled")
  # writing merges: an entry of the same key is replaced, the others are kept
  calibration.write_entry(out, {"key": {"backend": "gpu", "generation": "hopper"}, "rows": [1],
                                "cost": {"rows": [1.0]}})
  cpu = dict(table["entries"][0], rows=[8], cost={"rows": [1.0]})
  calibration.write_entry(out, cpu)
  assert [e.backend for e in calibration.read(out)] == ["gpu", "cpu"]
  # the user file (here via the environment) wins over the packaged table
  monkeypatch.setenv(calibration.ENV_PATH, str(out))
  loaded = calibration.load()
  assert calibration.lookup(loaded, "cpu", "cpu").curves["rows"].ns == (8,)
  assert len(loaded) == 2 + len(calibration.read(calibration.PACKAGE_TABLE))


def test_bench_logits_reports_every_variant_against_the_plain_matmul(tmp_path):
  import argparse
  import json

  from dllm_jax.bench import logits_bench
  p = argparse.ArgumentParser()
  logits_bench.add_args(p)
  out = tmp_path / "logits.json"
  args = p.parse_args(["--skip-8b", "--rows", "64", "--d", "32", "--vocab", "512",
                       "--repeats", "1", "--out", str(out)])
  assert logits_bench.run(args) == 0
  res = json.loads(out.read_text())
  assert res["backend"] == "cpu" and res["device_kind"] == "cpu"
  (size,) = res["sizes"]
  assert (size["rows"], size["d"], size["vocab"], size["ran"]) == (64, 32, 512, True)
  assert size["baseline"]["ms"] > 0 and size["baseline"]["tflops"] > 0
  by = {r["variant"]: r for r in size["variants"]}
  assert set(by) == {"rows", "row_chunked", "vocab_tiled", "vocab_tiled_kernel"}
  for name in ("rows", "row_chunked", "vocab_tiled"):
    r = by[name]
    assert r["ms"] > 0 and r["xla_temp_mib"] is not None
    assert r["vs_plain_matmul"] == pytest.approx(r["ms"] / size["baseline"]["ms"])
    assert r["tflops"] == pytest.approx(2 * 64 * 32 * 512 / (r["ms"] / 1e3) / 1e12)
  kern = by["vocab_tiled_kernel"]  # CPU: analytic only (the kernel runs on GPUs)
  assert "ms" not in kern and kern["kernel_blocks"]["block_rows"] >= 16
  plan = budgeter.choose(1 << 62, 64, 32, 512, jnp.float32)
  assert size["budgeter_choice"] == dict(variant=plan.variant, impl=plan.impl,
                                         chunk_rows=plan.chunk_rows, vocab_tile=plan.vocab_tile)
