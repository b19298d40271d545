"""Logit variants: token-identical, confidences within 1e-6, margin/entropy vs numpy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import noise
from dllm_jax.sampling import variants

R, D, V = 50, 64, 1000          # R not a multiple of C, V not a multiple of Tv
C, TV = 16, 128
# (variant, chunk_rows, vocab_tile, impl)
CONFIGS = [
    ("full", C, TV, "auto"),
    ("rows", C, TV, "auto"),
    ("row_chunked", C, TV, "auto"),
    ("vocab_tiled", C, TV, "reference"),
    ("vocab_tiled", 64, 4096, "reference"),   # Tv > V, one chunk
    ("vocab_tiled", C, TV, "interpret"),      # the Pallas kernel, interpreted
]


def _dyadic(rng, shape, scale):
  """Small multiples of 1/8 x scale: every GEMM of these is exact in f32, whatever its tiling."""
  return (rng.integers(-8, 9, shape) / 8.0 * scale).astype(np.float32)


def _params(rng, r, hot=True):
  t = rng.uniform(0.2, 2.0, r) * (rng.uniform(size=r) < 0.7) * hot  # some greedy rows
  return variants.RowParams(
      jnp.asarray(t, jnp.float32), jnp.asarray(rng.integers(0, 2**32, r, dtype=np.uint64).astype(np.uint32)),
      jnp.asarray(rng.integers(0, 50, r), jnp.int32), jnp.asarray(rng.integers(0, 4096, r),
                                                                  jnp.int32))


def _numpy(h, w, p):
  """Independent float64 oracle from the full logits."""
  l = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
  r, v = l.shape
  g = noise.gumbel(np.asarray(p.seed)[:, None], np.asarray(p.step)[:, None],
                   np.asarray(p.position)[:, None], np.arange(v)[None, :], xp=np)
  s = l + np.asarray(p.temperature, np.float64)[:, None] * g
  tok = s.argmax(1)  # first maximum
  z = l - l.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  prob = np.exp(logp)
  top = np.sort(prob, 1)
  return dict(token=tok, confidence=prob[np.arange(r), tok], margin=top[:, -1] - top[:, -2],
              entropy=(prob * logp).sum(1),
              rand=noise.uniform(np.asarray(p.seed), np.asarray(p.step), np.asarray(p.position),
                                 v, xp=np))


def _decode(cfg, h, w, p):
  variant, c, tv, impl = cfg
  return variants.decode_rows(h, w, p, variant=variant, chunk_rows=c, vocab_tile=tv,
                              want_margin=True, want_entropy=True, impl=impl)


@pytest.fixture(scope="module")
def dyadic_case():
  rng = np.random.default_rng(0)
  h = jnp.asarray(_dyadic(rng, (R, D), 1.0))
  w = jnp.asarray(_dyadic(rng, (D, V), 0.25))
  return h, w, _params(rng, R)


@pytest.fixture(scope="module")
def dyadic_outs(dyadic_case):
  h, w, p = dyadic_case
  return [_decode(cfg, h, w, p) for cfg in CONFIGS]


def test_all_variants_match_numpy_exactly_computable_logits(dyadic_case, dyadic_outs):
  h, w, p = dyadic_case
  ref = _numpy(h, w, p)
  assert (np.asarray(p.temperature) > 0).any() and (np.asarray(p.temperature) == 0).any()
  for cfg, out in zip(CONFIGS, dyadic_outs):
    np.testing.assert_array_equal(np.asarray(out.token), ref["token"], err_msg=str(cfg))
    np.testing.assert_allclose(out.confidence, ref["confidence"], atol=1e-6, err_msg=str(cfg))
    np.testing.assert_allclose(out.margin, ref["margin"], atol=1e-6, err_msg=str(cfg))
    np.testing.assert_allclose(out.entropy, ref["entropy"], atol=2e-5, rtol=1e-5,
                               err_msg=str(cfg))
    np.testing.assert_array_equal(np.asarray(out.rand), ref["rand"], err_msg=str(cfg))
    for x in (out.confidence, out.margin, out.entropy, out.rand):
      assert np.isfinite(np.asarray(x)).all()


def test_variants_agree_with_each_other(dyadic_outs):
  base = dyadic_outs[1]  # rows
  for cfg, out in zip(CONFIGS, dyadic_outs):
    np.testing.assert_array_equal(out.token, base.token, err_msg=str(cfg))
    np.testing.assert_allclose(out.confidence, base.confidence, atol=1e-6, rtol=0,
                               err_msg=str(cfg))


@pytest.mark.parametrize("dtype,hot", [(jnp.float32, True), (jnp.bfloat16, False)],
                         ids=["f32-seeded", "bf16-T0"])
def test_random_weights_token_identical(dtype, hot):
  rng = np.random.default_rng(1 + hot)
  h = jnp.asarray(rng.standard_normal((R, D)), dtype)
  w = jnp.asarray(rng.standard_normal((D, V)) / np.sqrt(D), dtype)
  p = _params(rng, R, hot)
  outs = [variants.decode_rows(h, w, p, variant=v, chunk_rows=c, vocab_tile=tv, impl=impl)
          for v, c, tv, impl in CONFIGS if impl != "interpret"]
  ref = _numpy(h, w, p)
  for out in outs:
    np.testing.assert_array_equal(out.token, outs[0].token)
    np.testing.assert_allclose(out.confidence, outs[0].confidence, atol=1e-6, rtol=0)
    assert out.margin is None and out.entropy is None
  np.testing.assert_array_equal(outs[0].token, ref["token"])
  np.testing.assert_allclose(outs[0].confidence, ref["confidence"], atol=1e-5)


def test_exact_ties_lowest_id_wins_everywhere():
  """Tied maxima across tiles (and in the re-read ragged tail) -> the lowest token id."""
  v, d = 300, 8  # Tv = 128: tiles [0,128), [128,256), and the tail read at 172 masking < 256
  rng = np.random.default_rng(3)
  w = _dyadic(rng, (d, v), 0.125)
  cases = [(7, 140, 290), (141, 291), (200,), (292, 299), (5, 6), ()]
  h = np.zeros((6, d), np.float32)
  h[:, 0] = 1.0
  for r, cols in enumerate(cases):
    h[r, 2 + r] = 1.0  # row r alone sees its peak columns through hidden dim 2 + r
    w[2 + r] = 0.0
    for c in cols:
      w[:, c] = 0.0
      w[2 + r, c] = 6.0
  want = [min(c) if c else None for c in cases]
  p = variants.RowParams.create(jnp.arange(6))
  ref = _numpy(h, w, p)
  for cfg in CONFIGS:
    out = _decode(cfg, jnp.asarray(h), jnp.asarray(w), p)
    tok = np.asarray(out.token)
    np.testing.assert_array_equal(tok, ref["token"], err_msg=str(cfg))
    for r, c in enumerate(want):
      if c is not None:
        assert tok[r] == c, (cfg, r, tok[r], c)
    marg = np.asarray(out.margin)
    assert (marg[[0, 1, 3, 4]] == 0).all(), (cfg, marg)  # two equal top probabilities
    assert marg[2] > 0.1, (cfg, marg)  # col 200 is re-read by the tail tile: not a tie
    np.testing.assert_allclose(marg, ref["margin"], atol=1e-6, err_msg=str(cfg))


def test_no_nan_for_extreme_rows():
  """Zero rows (padding), huge logits, huge temperatures: finite everywhere."""
  rng = np.random.default_rng(4)
  h = _dyadic(rng, (5, D), 1.0)
  h[0] = 0.0                      # every logit 0: token 0, conf 1/V, margin 0, entropy -log V
  h[1] *= 2.0**10                 # logits ~ 1e3-1e4
  w = jnp.asarray(_dyadic(rng, (D, V), 0.25))
  p = variants.RowParams(jnp.asarray([0.0, 0.0, 1e6, 3.0, 0.0], jnp.float32),
                         jnp.arange(5, dtype=jnp.uint32), jnp.zeros(5, jnp.int32),
                         jnp.arange(5, dtype=jnp.int32))
  for cfg in CONFIGS[:-1]:  # the kernel: tests/test_fused_lm_head_kernel.py
    out = _decode(cfg, jnp.asarray(h), w, p)
    for x in (out.confidence, out.margin, out.entropy):
      assert np.isfinite(np.asarray(x)).all(), cfg
    assert int(out.token[0]) == 0
    np.testing.assert_allclose(out.confidence[0], 1.0 / V, rtol=1e-6)
    assert float(out.margin[0]) == 0.0
    np.testing.assert_allclose(out.entropy[0], -np.log(V), rtol=1e-6)


def test_rows_are_independent_of_the_batch(dyadic_case):
  h, w, p = dyadic_case
  sub = jnp.asarray([3, 17, 40])
  ps = jax.tree.map(lambda x: x[sub], p)
  for cfg in CONFIGS[:4]:
    whole = _decode(cfg, h, w, p)
    part = _decode(cfg, h[sub], w, ps)
    np.testing.assert_array_equal(part.token, whole.token[sub])
    np.testing.assert_array_equal(part.confidence, whole.confidence[sub])


def test_decode_full_matches_rows(dyadic_case):
  h, w, p = dyadic_case
  b, n = 5, 10
  full = variants.decode_full(h.reshape(b, n, D), w, jax.tree.map(lambda x: x.reshape(b, n), p),
                              want_margin=True)
  rows = variants.decode_rows(h, w, p, variant="rows", want_margin=True)
  assert full.token.shape == (b, n)
  np.testing.assert_array_equal(full.token.reshape(-1), rows.token)
  np.testing.assert_array_equal(full.margin.reshape(-1), rows.margin)
  assert full.entropy is None


def test_bad_arguments():
  h = jnp.zeros((4, 8))
  w = jnp.zeros((8, 16))
  p = variants.RowParams.create(jnp.arange(4))
  with pytest.raises(ValueError, match="variant"):
    variants.decode_rows(h, w, p, variant="bogus")
  with pytest.raises(ValueError, match="hidden"):
    variants.decode_rows(h, jnp.zeros((9, 16)), p, variant="rows")
  with pytest.raises(ValueError, match="chunk_rows"):
    variants.decode_rows(h, w, p, variant="row_chunked", chunk_rows=0)
