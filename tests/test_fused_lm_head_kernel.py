"""Fused LM head kernel: interpret mode vs the jnp reference, and lowering for 'cuda' on CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import cuda_lowering_text
from pallas_kernels.fused_lm_head import kernel, ops, tiles

S = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton"


def _inputs(rng, r, d, v, dtype, dyadic):
  if dyadic:  # exact GEMMs: kernel K-chunking and XLA's GEMM give identical logits
    h = rng.integers(-8, 9, (r, d)) / 8.0
    w = rng.integers(-8, 9, (d, v)) / 32.0
  else:
    h = rng.standard_normal((r, d))
    w = rng.standard_normal((d, v)) / np.sqrt(d)
  t = rng.uniform(0.3, 1.5, r) * (rng.uniform(size=r) < 0.6)
  return (jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(t, jnp.float32),
          jnp.asarray(rng.integers(0, 2**32, r, dtype=np.uint64).astype(np.uint32)),
          jnp.asarray(rng.integers(0, 64, r), jnp.int32), jnp.arange(r, dtype=jnp.int32))


# (R, d, V, dtype, block_rows, block_vocab, block_k, vocab_splits, dyadic)
CASES = [
    (37, 96, 1000, jnp.float32, 16, 128, 32, 1, True),     # ragged rows, K tail, vocab tail
    (64, 128, 512, jnp.float32, 32, 128, 64, 2, True),     # exact multiples, 2 splits
    (20, 64, 700, jnp.float32, 16, 256, 64, None, False),  # auto splits, random weights
    (32, 256, 384, jnp.bfloat16, 16, 128, 128, 3, True),   # bf16, 3 tiles in 3 splits
]


@pytest.mark.parametrize("r,d,v,dtype,br,bv,bk,splits,dyadic", CASES)
def test_interpret_matches_reference(r, d, v, dtype, br, bv, bk, splits, dyadic):
  args = _inputs(np.random.default_rng(r + d), r, d, v, dtype, dyadic)
  kw = dict(want_margin=True, want_entropy=True)
  ref = ops.fused_lm_head(*args, chunk_rows=16, vocab_tile=128, impl="reference", **kw)
  out = ops.fused_lm_head(*args, impl="interpret", block_rows=br, block_vocab=bv, block_k=bk,
                          vocab_splits=splits, **kw)
  np.testing.assert_array_equal(out.token, ref.token)
  for a, b in ((out.confidence, ref.confidence), (out.margin, ref.margin)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  np.testing.assert_allclose(out.entropy, ref.entropy, atol=1e-5, rtol=1e-6)
  for x in out:
    assert np.isfinite(np.asarray(x)).all()


@pytest.mark.parametrize("excl,bv", [(300, 128), (999, 128), (0, 256)])
def test_exclude_id_is_never_chosen_but_stays_in_the_softmax(excl, bv):
  """Column ``excl`` (the mask id in the engine) is rigged to win every row; the token must be
  the best other column, the confidence its probability under the FULL softmax (numpy, f64)."""
  r, d, v = 24, 64, 1000
  h, w, t, seed, step, pos = _inputs(np.random.default_rng(excl), r, d, v, jnp.float32, True)
  w = w.at[:, excl].set(4.0 * jnp.sign(h.sum(0)))  # dyadic: exact logits
  t = jnp.zeros_like(t)
  logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
  assert (logits.argmax(1) == excl).any(), "rig failed: the excluded id must win somewhere"
  others = np.where(np.arange(v) == excl, -np.inf, logits)
  want = others.argmax(1)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  args = (h, w, t, seed, step, pos)
  ref = ops.fused_lm_head(*args, chunk_rows=16, vocab_tile=bv, impl="reference", exclude_id=excl)
  out = ops.fused_lm_head(*args, impl="interpret", block_rows=16, block_vocab=bv, block_k=32,
                          vocab_splits=2, exclude_id=excl)
  for got in (ref, out):
    np.testing.assert_array_equal(got.token, want)
    np.testing.assert_allclose(got.confidence, p[np.arange(r), want], atol=1e-6, rtol=0)


def test_interpret_is_deterministic_and_skips_unwanted_outputs():
  args = _inputs(np.random.default_rng(9), 24, 64, 300, jnp.float32, False)
  kw = dict(impl="interpret", block_rows=16, block_vocab=128, block_k=64)
  a = ops.fused_lm_head(*args, **kw)
  b = ops.fused_lm_head(*args, **kw)
  assert a.margin is None and a.entropy is None
  np.testing.assert_array_equal(a.token, b.token)
  np.testing.assert_array_equal(a.confidence, b.confidence)


def test_block_validation():
  args = _inputs(np.random.default_rng(0), 8, 32, 64, jnp.float32, True)
  with pytest.raises(ValueError, match="power of two"):
    ops.fused_lm_head(*args, impl="interpret", block_rows=48)
  with pytest.raises(ValueError, match="temperature"):
    ops.fused_lm_head(args[0], args[1], args[2][:4], *args[3:], impl="reference")
  with pytest.raises(ValueError, match="impl"):
    ops.fused_lm_head(*args, impl="gpu")
  tiny = _inputs(np.random.default_rng(0), 8, 8, 64, jnp.float32, True)
  with pytest.raises(ValueError, match="tl.dot"):  # a K block of 8 would not compile on a GPU
    ops.fused_lm_head(*tiny, impl="pallas")
  with pytest.raises(ValueError, match="num_warps"):
    ops.fused_lm_head(*args, impl="interpret", num_warps=6)
  # CPU / unknown devices: the conservative default (64 x 128 x 64, 4 warps, 2 stages)
  assert ops.kernel_blocks(5, 4096, 126464, device_kind="cpu") == (16, 128, 64, 264, 4, 2)
  assert ops.kernel_blocks(8192, 4096, 126464, device_kind="cpu") == (64, 128, 64, 2, 4, 2)
  assert ops.kernel_blocks(300, 100, 100, block_vocab=256, device_kind="cpu")[:4] == (64, 64, 64, 2)
  # Hopper, 132 SMs: the probe's blocks from 256 rows, two waves of programs
  h200 = dict(device_kind="NVIDIA H200", core_count=132)
  assert ops.kernel_blocks(1024, 4096, 126464, **h200) == (128, 256, 32, 33, 8, 4)
  assert ops.kernel_blocks(8192, 4096, 126464, **h200) == (128, 256, 32, 4, 8, 4)
  assert ops.kernel_blocks(100, 4096, 126464, **h200) == (64, 256, 32, 132, 4, 4)
  # explicit arguments override single fields
  assert ops.kernel_blocks(1024, 4096, 126464, block_rows=64, num_stages=3,
                           **h200) == (64, 256, 32, 16, 8, 3)


def _numpy_decisions(h, w, exclude_id=None):
  """float64 reference of the greedy decisions: token, probabilities [R, V], margin, entropy."""
  logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  pickable = logits if exclude_id is None else np.where(
      np.arange(logits.shape[1]) == exclude_id, -np.inf, logits)
  token = pickable.argmax(1)  # first maximum: ties -> lowest id
  top2 = np.sort(p, axis=1)[:, -2:]
  entropy = (p * np.log(np.where(p > 0, p, 1.0))).sum(1)
  return token, p, top2[:, 1] - top2[:, 0], entropy


# Every configuration tiles.py can return, picked through device_kind as the engine would:
# (device kind, R, the config it must select). R and V are not multiples of the tiles, d not of
# block_k (ragged rows, vocab tail and K tail in one case).
CONFIG_CASES = [
    ("NVIDIA H200", 300, tiles.HOPPER),        # 3 row blocks of 128, 84 padded rows
    ("NVIDIA H100 80GB HBM3", 37, tiles.HOPPER_SMALL),  # R < 256: 64-row block, 27 padded
    ("NVIDIA A100-SXM4-80GB", 100, tiles.DEFAULT),
    ("Some Future GPU", 40, tiles.DEFAULT),
]


@pytest.mark.parametrize("kind,r,cfg", CONFIG_CASES, ids=[f"{c[0]}-{c[1]}" for c in CONFIG_CASES])
@pytest.mark.parametrize("dtype,splits,excl", [(jnp.float32, None, None), (jnp.bfloat16, 2, 517)])
def test_every_shipped_config_is_exact_in_interpret_mode(kind, r, cfg, dtype, splits, excl):
  d, v = 100, 1100  # K tail 100 % 32 = 4; vocab tail 1100 % 256 = 76 (% 128 = 76)
  itemsize = jnp.dtype(dtype).itemsize
  blk = ops.kernel_blocks(r, d, v, itemsize=itemsize, device_kind=kind)
  picked = tiles.tile_config(r, itemsize, kind)  # cfg, with k / stages fitted to shared memory
  assert picked.replace(block_k=cfg.block_k, num_stages=cfg.num_stages) == cfg
  assert (blk.block_rows, blk.block_vocab, blk.num_warps) == (
      cfg.block_rows, cfg.block_vocab, cfg.num_warps)
  assert blk.block_k == min(picked.block_k, 64) and blk.num_stages == picked.num_stages
  assert r % blk.block_rows and v % blk.block_vocab and d % blk.block_k  # all ragged
  h, w, t, seed, step, pos = _inputs(np.random.default_rng(r), r, d, v, dtype, True)
  if excl is not None:  # rig the excluded id to be the clean argmax of many rows
    w = w.at[:, excl].set(2.0 * jnp.sign(h.astype(jnp.float32).sum(0)).astype(dtype))
  args = (h, w, t, seed, step, pos)
  kw = dict(want_margin=True, want_entropy=True, exclude_id=excl)
  out = ops.fused_lm_head(*args, impl="interpret", device_kind=kind, vocab_splits=splits, **kw)
  ref = ops.fused_lm_head(*args, chunk_rows=64, vocab_tile=256, impl="reference", **kw)
  token, p, margin, entropy = _numpy_decisions(h, w, excl)
  greedy = np.asarray(t) == 0
  assert greedy.sum() >= 10 and (~greedy).sum() >= 10
  if excl is not None:
    assert (np.asarray(h, np.float64) @ np.asarray(w, np.float64)).argmax(1).tolist().count(
        excl) >= 5, "rig failed"
    assert (np.asarray(out.token) != excl).all()
  np.testing.assert_array_equal(np.asarray(out.token)[greedy], token[greedy])
  np.testing.assert_array_equal(out.token, ref.token)  # noisy rows: the same hash
  # confidence = clean probability of the chosen token (greedy and sampled rows alike)
  np.testing.assert_allclose(out.confidence, p[np.arange(r), np.asarray(out.token)], atol=2e-6,
                             rtol=0)
  np.testing.assert_allclose(out.margin, margin, atol=2e-6, rtol=0)
  np.testing.assert_allclose(out.entropy, entropy, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,cc,rows,itemsize,want", [
    ("NVIDIA H200", None, 256, 2, tiles.HOPPER),
    ("NVIDIA H100 80GB HBM3", None, 8192, 2, tiles.HOPPER),
    ("NVIDIA GH200 480GB", None, 4096, 2, tiles.HOPPER),
    ("NVIDIA H200", None, 255, 2, tiles.HOPPER_SMALL),
    ("whatever", "9.0", 1024, 2, tiles.HOPPER),         # compute capability decides
    ("NVIDIA A100-SXM4-40GB", None, 1024, 2, tiles.DEFAULT),
    ("NVIDIA B200", "10.0", 1024, 2, tiles.DEFAULT),      # unknown generation: conservative
    ("cpu", None, 1024, 2, tiles.DEFAULT),
    # f32 on Hopper: 4 stages of (128 + 256) x 32 x 4 B = 192 KiB > 3/4 of 227 KiB -> 3 stages
    ("NVIDIA H200", None, 1024, 4, tiles.HOPPER.replace(num_stages=3)),
])
def test_tile_config_per_generation_and_rows(kind, cc, rows, itemsize, want):
  assert tiles.tile_config(rows, itemsize, kind, cc) == want


def test_shipped_configs_respect_triton_limits():
  """Powers of two, dot dims >= 16, pipelined shared memory within the generation's share."""
  for gen, cfg in (("hopper", tiles.HOPPER), ("hopper", tiles.HOPPER_SMALL),
                   ("other", tiles.DEFAULT)):
    for itemsize in (2, 4):
      fitted = tiles._fit_smem(cfg, itemsize, gen)
      for x in (fitted.block_rows, fitted.block_vocab, fitted.block_k, fitted.num_warps):
        assert x & (x - 1) == 0
      assert min(fitted.block_rows, fitted.block_vocab, fitted.block_k) >= 16
      assert fitted.num_stages >= 2
      assert fitted.smem_bytes(itemsize) <= tiles.SMEM_SHARE * tiles.SMEM_BYTES[gen]
      assert fitted.source  # where the numbers came from
  with pytest.raises(ValueError, match="power of two"):
    tiles.TileConfig(96, 256, 32, 8, 4)
  assert tiles.target_programs(114) == 228 and tiles.target_programs(None) == 264


def _lower(r, d, v, dtype, br, bv, bk, splits, **kw):
  fn = functools.partial(kernel.fused_lm_head_partials, block_rows=br, block_vocab=bv,
                         block_k=bk, vocab_splits=splits, **kw)
  return cuda_lowering_text(fn, S((r, d), dtype), S((d, v), dtype), S((r,), jnp.float32),
                            S((r,), jnp.uint32), S((r,), jnp.int32), S((r,), jnp.int32))


@pytest.mark.parametrize("label,r,d,v,dtype,br,bv,bk,splits,flags", [
    # the engine's configuration: bf16, d = 4096 in K chunks of 64, a small vocabulary
    ("bf16-d4096", 128, 4096, 1024, jnp.bfloat16, 64, 128, 64, 2, (False, False)),
    ("bf16-d4096-margin-entropy", 64, 4096, 1000, jnp.bfloat16, 64, 128, 64, 1, (True, True)),
    ("f32", 64, 256, 4096, jnp.float32, 32, 128, 32, 4, (True, False)),
    ("f32-ragged-k", 32, 100, 700, jnp.float32, 16, 256, 64, 1, (False, True)),
    ("bf16-exclude-mask-id", 64, 256, 1000, jnp.bfloat16, 64, 128, 64, 2, (False, False, 126)),
])
def test_lowers_for_cuda(label, r, d, v, dtype, br, bv, bk, splits, flags):
  text = _lower(r, d, v, dtype, br, bv, bk, splits, want_margin=flags[0],
                want_entropy=flags[1], exclude_id=flags[2] if len(flags) > 2 else None)
  assert TRITON in text, label


def test_non_power_of_two_block_fails_lowering():
  with pytest.raises(Exception, match="power of 2"):
    _lower(96, 256, 512, jnp.float32, 48, 128, 64, 1)
