"""The Mosaic GPU head-sparse kernel (kernel_mgpu.py) without a GPU.

1. Lowering for 'cuda' (jax.export) at the engine's shapes: Dream GQA 28:4 on the stacked pool
   (S 64 and 256, traced layer, q_rows), LLaDA MHA (QB 32: one compute warpgroup), the shared and
   head-major pools, under both lowering semantics (Lane: jax 0.10's default; Warpgroup: 0.11's,
   the GPU machine's). This runs Mosaic GPU's whole jax-side lowering down to NVVM (wgmma, TMA,
   mbarriers) into the custom call `mosaic_gpu_v2`; ptxas and the hardware are left to
   scripts/gqa_kernel_check.py on a GPU.
2. Mosaic-specific limits raise ValueError before anything is lowered.
3. The kernel under jax's Mosaic GPU interpreter (CPU): the same TMA ring, barriers, page
   addressing and masking, with jnp matmuls in place of wgmma (kernel_mgpu._Interpreted), against
   the jnp reference, with the dummy page, page tails, unused pages and fresh padding all NaN.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.head_sparse_attention import kernel_mgpu as km
from pallas_kernels.head_sparse_attention import pack_queries, query_rows
from pallas_kernels.head_sparse_attention.reference import head_sparse_attention_reference
from pallas_kernels.impls import KERNEL_IMPLS

MOSAIC_TARGET = "mosaic_gpu_v2"
sds, i32 = jax.ShapeDtypeStruct, jnp.int32


def specs(*, batch=2, kv_heads=4, q_rows=256, head_dim=128, page_size=64, max_pages=16,
          num_pages=65, layers=3, num_fresh=33, dtype=jnp.bfloat16, layout="stacked"):
  pool = {"stacked": (layers, num_pages, page_size, head_dim),
          "shared": (num_pages, page_size, head_dim),
          "head": (kv_heads, num_pages, page_size, head_dim)}[layout]
  fresh = sds((batch, kv_heads, num_fresh, head_dim), dtype)
  return [sds((batch, kv_heads, q_rows, head_dim), dtype), sds(pool, dtype), sds(pool, dtype),
          sds((batch, kv_heads, max_pages), i32), sds((batch, kv_heads), i32), fresh, fresh,
          sds((batch,), i32)]


def lower(layout="stacked", semantics=None, **spec):
  """Exported cuda module text of the kernel wrapper (stacked pools get layer and q_rows)."""
  args = specs(layout=layout, **spec)
  params = None
  if semantics is not None:
    params = km.plgpu.CompilerParams(
        approx_math=True, lowering_semantics=getattr(km.plgpu.LoweringSemantics, semantics))
  call = lambda *a, **kw: km.head_sparse_attention_mosaic_kernel(
      *a, scale=1 / math.sqrt(args[0].shape[-1]), compiler_params=params, **kw)
  if layout == "stacked":
    fn = lambda *a: call(*a[:8], layer=a[8], q_rows=a[9])
    args += [sds((), i32), sds((args[0].shape[0],), i32)]
  else:
    fn = call
  return export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()


DREAM_QB = query_rows(33, 7)                                  # 231 rows -> QB 256
LOWERING_CASES = {
    "dream_S64": dict(q_rows=DREAM_QB, page_size=64, max_pages=16),
    "dream_S256": dict(q_rows=DREAM_QB, page_size=256, max_pages=4, num_pages=17, num_fresh=32),
    "llada_mha_S64": dict(q_rows=query_rows(32, 1), num_fresh=32, kv_heads=8),
    "dream_shared": dict(layout="shared", q_rows=DREAM_QB),
    "dream_head_major": dict(layout="head", q_rows=DREAM_QB, page_size=128, max_pages=8),
    "d64_S128_two_fresh_steps": dict(head_dim=64, num_fresh=70, page_size=128, max_pages=4),
}


@pytest.mark.parametrize("semantics", ["Lane", "Warpgroup"])
@pytest.mark.parametrize("case", sorted(LOWERING_CASES))
def test_lowers_to_a_mosaic_gpu_call(case, semantics):
  text = lower(semantics=semantics, **LOWERING_CASES[case])
  assert set(re.findall(r"custom_call @(\w+)\(", text)) == {MOSAIC_TARGET}
  for op in ("wgmma", "cp.async.bulk.tensor", "mbarrier", "setmaxregister"):  # Hopper paths
    assert op in text, f"{op} missing from the lowered Mosaic GPU module"


def test_dream_call_is_the_custom_call_alone():
  """Dream (QB 256, 32 fresh rows): the [L, P, S, D] pool reaches the custom call as is (no slice,
  gather or copy of a plane) and nothing else runs around it but the layer index's reshape."""
  text = lower(q_rows=DREAM_QB, num_fresh=32)
  call = next(line for line in text.splitlines() if f"@{MOSAIC_TARGET}(" in line)
  operand_types = call.rsplit(" : (", 1)[1]
  assert operand_types.count("tensor<3x65x64x128xbf16>") == 2          # k and v pools
  ops = [re.search(r"stablehlo\.(\w+)", line).group(1) for line in text.splitlines()
         if re.search(r"= stablehlo\.\w+", line)]
  assert sorted(ops) == ["custom_call", "reshape"], ops


BAD_CONFIGS = [
    (dict(dtype=jnp.float32), "bf16 or f16"),
    (dict(head_dim=96), "head dim D=96"),
    (dict(head_dim=512), "head dim D=512"),
    (dict(page_size=32), "page size S=32"),
    (dict(page_size=192, block_kv=128), "block_kv=128"),
    (dict(block_kv=96), "block_kv=96"),
    (dict(block_kv=512, page_size=512), "block_kv=512"),
    (dict(num_stages=1), "num_stages=1"),
    (dict(block_kv=256, page_size=256, num_stages=3), "bytes of SMEM"),
    (dict(head_dim=256, block_kv=128, num_stages=2), "bytes of SMEM"),
]


@pytest.mark.parametrize("config,message", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_configs_raise_before_lowering(monkeypatch, config, message):
  knobs = {k: config.pop(k) for k in ("block_kv", "num_stages") if k in config}

  def no_lowering(*args, **kwargs):
    raise AssertionError("plgpu.kernel reached with a bad configuration")

  monkeypatch.setattr(km.plgpu, "kernel", no_lowering)
  args = specs(layout="shared", **config)
  with pytest.raises(ValueError, match=re.escape(message)):
    jax.eval_shape(lambda *a: km.head_sparse_attention_mosaic_kernel(*a, scale=0.1, **knobs),
                   *args)


@pytest.mark.skipif("mosaic" not in KERNEL_IMPLS,
                    reason="ops.py has no impl='mosaic' dispatch yet (the gqa task's report)")
def test_ops_dispatch():
  """ops.head_sparse_attention(impl="mosaic"): its own argument checks, then the Mosaic limits,
  both before lowering; lowers to the Mosaic custom call; "auto" off a GPU is the reference."""
  from pallas_kernels.head_sparse_attention import ops
  op = lambda impl: lambda *a: ops.head_sparse_attention(*a, impl=impl)
  bad = specs(layout="shared")
  bad[4] = sds((3, 4), i32)                                     # kv_len batch 3 != 2
  with pytest.raises(ValueError, match="kv_len"):
    jax.eval_shape(op("mosaic"), *bad)
  with pytest.raises(ValueError, match="bf16 or f16"):
    jax.eval_shape(op("mosaic"), *specs(layout="shared", dtype=jnp.float32))
  args = specs(q_rows=DREAM_QB, num_fresh=32) + [sds((), i32), sds((2,), i32)]
  targets = {}
  for impl in ("mosaic", "auto"):
    text = jax.jit(op(impl)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    targets[impl] = set(re.findall(r"custom_call @(\w+)\(", text))
  assert targets == {"mosaic": {MOSAIC_TARGET}, "auto": set()}


def test_mosaic_unsupported_on_this_cpu_machine():
  assert not km.mosaic_supported()
  assert "cpu" in km.mosaic_unsupported_reason()


def test_default_tiles():
  """Dream on 64- or 256-token pages: 128-token steps, a 3-slot ring, two compute warpgroups;
  the whole configuration fits Hopper's 227 KiB of SMEM."""
  for page_size in (64, 256):
    tiles = km.mosaic_tiles((32, 4, DREAM_QB, 128), (28, 100, page_size, 128), (32, 4, 33, 128),
                            jnp.bfloat16)
    assert (tiles.block_kv, tiles.num_stages, tiles.compute_wgs) == (128, 3, 2)
    assert tiles.q_rows == 256 and tiles.fresh_rows == 64
    assert tiles.smem_bytes <= km.SMEM_BYTES - km.SMEM_RESERVE
  mha = km.mosaic_tiles((32, 32, 32, 128), (28, 100, 64, 128), (32, 32, 32, 128), jnp.bfloat16)
  assert (mha.compute_wgs, mha.q_rows) == (1, 64)


# ---- the kernel under jax's (private) Mosaic GPU interpreter ------------------------------------
# Each case runs in a child process with a time limit: a barrier-protocol bug deadlocks the
# simulated kernel (it hangs, it does not fail), and must fail the test, not hang the suite.

INTERPRETER = "jax._src.pallas.mosaic_gpu.interpret"
DEADLOCK_S = 600


def poisoned_inputs(*, kv_len, new_len, num_fresh=33, q_rows=128, head_dim=64, page_size=64,
                    layers=2, layout="stacked", seed=0):
  """Random bf16 inputs; every (b, h) owns distinct pages; page 0, rows past kv_len, pages past it
  and fresh rows past new_len are NaN. Returns (args, layer or None)."""
  rng = np.random.default_rng(seed)
  kv_len = np.asarray(kv_len, np.int32)
  batch, heads = kv_len.shape
  max_pages = max(1, -(-int(kv_len.max()) // page_size)) + 1
  num_pages = 1 + batch * heads * max_pages
  planes = {"stacked": layers, "shared": 1, "head": heads}[layout]   # layers / one / per head
  shape = (planes, num_pages, page_size, head_dim)
  k_pages, v_pages = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
  owned = rng.permutation(np.arange(1, num_pages)).reshape(batch, heads, max_pages)
  table = np.zeros((batch, heads, max_pages), np.int32)
  for x in (k_pages, v_pages):                                 # ids are distinct in every plane
    x[:, 0] = np.nan
    for b in range(batch):
      for h in range(heads):
        n = int(kv_len[b, h])
        used = -(-n // page_size)
        table[b, h, :used] = owned[b, h, :used]
        x[:, owned[b, h, used:]] = np.nan                     # owned but past kv_len
        if n % page_size:
          x[:, table[b, h, used - 1], n % page_size:] = np.nan
  if layout == "shared":
    k_pages, v_pages = k_pages[0], v_pages[0]
  q = rng.standard_normal((batch, heads, q_rows, head_dim)).astype(np.float32)
  k_new, v_new = (rng.standard_normal((batch, heads, num_fresh, head_dim)).astype(np.float32)
                  for _ in range(2))
  new_len = np.asarray(new_len, np.int32)
  for b in range(batch):
    k_new[b, :, new_len[b]:] = v_new[b, :, new_len[b]:] = np.nan
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  args = (bf(q), bf(k_pages), bf(v_pages), jnp.asarray(table), jnp.asarray(kv_len), bf(k_new),
          bf(v_new), jnp.asarray(new_len))
  return args, (jnp.int32(layers - 1) if layout == "stacked" else None)


def check_against_reference(args, layer, *, q_rows=None, **knobs):
  """The kernel (interpreted, race detector on) vs the reference; whole CTA tiles are computed,
  tiles wholly past q_rows must be zeros."""
  import importlib
  params = importlib.import_module(f"{INTERPRETER}.params")
  races = importlib.import_module(f"{INTERPRETER}.interpret_pallas_call")
  params = params.InterpretGPUParams(detect_races=True)
  scale = 1 / math.sqrt(args[0].shape[-1])
  run = jax.jit(lambda *a: km.head_sparse_attention_mosaic_kernel(
      *a[:8], layer=a[8], q_rows=a[9], scale=scale, interpret=params, **knobs))
  out = np.asarray(run(*args, layer, q_rows), np.float32)
  assert not races.get_races().races_found
  ref = np.asarray(head_sparse_attention_reference(*args, layer=layer, scale=scale), np.float32)
  assert not np.isnan(ref).any() and not np.isnan(out).any(), "NaN leaked from a poisoned row"
  total_rows = args[0].shape[2]
  tile_knobs = {k: v for k, v in knobs.items() if k in ("block_kv", "num_stages")}
  tile = km.mosaic_tiles(args[0].shape, args[1].shape, args[5].shape, jnp.bfloat16,
                         **tile_knobs).compute_wgs * km.ROWS
  used = np.full(args[0].shape[0], total_rows) if q_rows is None else np.asarray(q_rows)
  for b, n in enumerate(used):
    n = min(total_rows, -(-int(n) // tile) * tile)                # whole CTA tiles are computed
    err = out[b, :, :n] - ref[b, :, :n]
    assert np.linalg.norm(err) <= 5e-3 * np.linalg.norm(ref[b, :, :n]), (b, np.abs(err).max())
    assert np.abs(err).max() <= 2e-2
    assert (out[b, :, n:] == 0).all(), "a q tile wholly past q_rows must be zeros"


INTERPRETER_CASES = {
    # One persistent CTA runs both items (the K/V ring and its barrier phases carry over); 128 q
    # rows (two compute warpgroups, ping-pong); 64-token pages fetched two per 128-token step;
    # kv_len 100 (partial second page) and 50 (second piece past kv_len: arrive only); 32 fresh
    # rows (Dream: TMA'd unpadded into a 64-row step), 20 valid.
    "persistent_two_items": dict(inputs=dict(kv_len=[[100, 50]], new_len=[20], num_fresh=32),
                                 q_rows=[128], knobs=dict(num_ctas=1)),
    # two 64-token steps per 128-token page, 3-slot ring; 256 q rows = two q tiles, the second
    # request's second tile wholly past q_rows; one request without fresh rows; 8 items on 3 CTAs
    "S128_bk64_qrows": dict(inputs=dict(kv_len=[[300, 128], [0, 257]], new_len=[0, 33],
                                        q_rows=256, page_size=128),
                            q_rows=[256, 100], knobs=dict(block_kv=64, num_ctas=3)),
    # shared page space, 70 fresh rows (two fresh steps), two-slot ring
    "shared_two_fresh_steps": dict(inputs=dict(kv_len=[[65, 1]], new_len=[70], num_fresh=70,
                                               layout="shared"), knobs=dict(num_stages=2)),
    # head-major pools, 32 q rows (one compute warpgroup, rows padded to 64), 64-token steps
    "head_major_one_warpgroup": dict(inputs=dict(kv_len=[[130, 64], [7, 0]], new_len=[32, 0],
                                                 num_fresh=32, q_rows=32, layout="head"),
                                     knobs=dict(block_kv=64)),
    # Dream's packing: 33 tokens x 7 query heads of one KV head -> 231 used rows of QB 256, D 128
    "dream_packing": dict(inputs=dict(kv_len=[[200]], new_len=[32], num_fresh=32, q_rows=256,
                                      head_dim=128), q_rows=[33 * 7], pack=True),
}
FAST_CASES = ("persistent_two_items", "S128_bk64_qrows", "dream_packing")


def run_interpreter_case(name):
  """One case, in this process (the child's entry point)."""
  spec = INTERPRETER_CASES[name]
  args, layer = poisoned_inputs(**spec["inputs"])
  if spec.get("pack"):
    q_model = np.random.default_rng(1).standard_normal((1, 33, 7, args[0].shape[-1]))
    args = (pack_queries(jnp.asarray(q_model, jnp.bfloat16), 1),) + args[1:]
    assert args[0].shape[2] == DREAM_QB
  q_rows = None if "q_rows" not in spec else jnp.asarray(spec["q_rows"], i32)
  check_against_reference(args, layer, q_rows=q_rows, **spec.get("knobs", {}))


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in FAST_CASES else pytest.mark.slow)
                                  for c in INTERPRETER_CASES])
def test_interpreter_matches_reference(case):
  pytest.importorskip(f"{INTERPRETER}.params", reason="this jax has no Mosaic GPU interpreter")
  code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
          f"import test_head_sparse_mgpu as t; t.run_interpreter_case({case!r})")
  try:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=DEADLOCK_S)
  except subprocess.TimeoutExpired:
    pytest.fail(f"{case}: no result after {DEADLOCK_S} s (a deadlocked barrier protocol?)")
  assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]


# ---- scripts/gqa_kernel_check.py on this CPU ---------------------------------------------------

def _check_script():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "gqa_kernel_check.py"
  spec = importlib.util.spec_from_file_location("gqa_kernel_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_check_script_dry_run_lowers_every_timed_kernel(tmp_path):
  import json
  script = _check_script()
  out = tmp_path / "gqa.json"
  assert script.main(["--dry-run", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["status"] == "pass" and result["dry_run"]
  lowered = result["lowered"]
  assert len(lowered) == len(script.PAGE_SIZES) * len(script.KEPT) * len(script.KERNELS)
  assert all(r["pass"] for r in lowered)
  assert {c for r in lowered if r["kernel"].startswith("mosaic") for c in r["custom_calls"]} == {
      MOSAIC_TARGET}


def test_check_script_reports_unsupported_machine(tmp_path, capsys):
  import json
  out = tmp_path / "gqa.json"
  assert _check_script().main([str(out)]) == 2
  assert "cannot run here" in capsys.readouterr().err
  result = json.loads(out.read_text())
  assert result["status"] == "unsupported" and "cpu" in result["reason"]
