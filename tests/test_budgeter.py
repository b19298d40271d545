"""The budgeter's analytic memory model vs measured figures, and its choices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm_jax.logits import budgeter, variants

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
