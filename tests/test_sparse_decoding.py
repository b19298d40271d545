"""Sparse decoding end to end on CPU float32 (Refresh -> Select -> Reuse, once per block).

- (a) ``step_forward`` directly: a Reuse of a block over the stored K/V equals the dense Refresh
  rows of the same canvas at keep ratio 1.0 (any layer count, every selection mode; Dream's
  query-only row too); at keep ratio 0.5 the pages hold exactly the K/V a numpy re-implementation
  of the selection picks per layer and KV head, and the Reuse rows equal a numpy attention over
  those per-head key sets.
- (b) a 1-layer model at ratio 1.0 decodes token-identically to dense ``generate_static`` (the
  non-block K/V of a 1-layer model depend only on the unchanged non-block tokens), for LLaDA and
  Dream layouts, every selection mode, T = 0 and seeded T > 0, fixed and threshold rules.
- (c) a 2-layer model at ratio 1.0 decodes token-identically to an independent numpy dual-cache
  reference written here (per block: full forwards while s < delay; at s == delay a full forward
  that freezes every layer's post-RoPE K/V of the non-block positions; then block-only forwards
  attending to [frozen K/V ; fresh block K/V]), delays 0, 1, 2, LLaDA and Dream.
- (d) agreement with dense decoding of the three selection modes at ratio 0.5 on the bundled demo
  model (``dllm_jax.bench.sparse_quality``).
- the state machine's phase sequence, page release, an empty prompt (K = 0 candidates) and blocks
  the threshold rule finishes before their Select step.

The numpy decision helpers (x0 / confidence / commit rules) come from ``decoding_reference.py``.
"""

from __future__ import annotations

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decoding_reference import Gap, choose_commits, decide_position, llada_transfer_counts  # noqa: E402
from test_selection import ref_select  # noqa: E402

from dllm_jax.cache.page_pool import PoolConfig, init_cache, pages_needed  # noqa: E402
from dllm_jax.cache.selection import MODES, n_keep  # noqa: E402
from dllm_jax.cache.sparse_state import SparseConfig  # noqa: E402
from dllm_jax.config import EngineConfig, ModelConfig, SamplingParams  # noqa: E402
from dllm_jax.engine.engine import DEMO_MODEL_DIR, LLM  # noqa: E402
from dllm_jax.model.fused import ReusePart, SelectPart, SparseStatic, step_forward  # noqa: E402
from dllm_jax.model.transformer import RefreshPart, init_model  # noqa: E402
from dllm_jax.testing.static_decoder import generate_static

MASK, EOS, EOT = 63, 62, 61
VOCAB = 64
HEAD_SCALE = 4.0  # peakier, more varied confidences on random weights


def model_dict(family: str, layers: int) -> dict:
  if family == "llada":
    return dict(model_type="llada", d_model=32, n_layers=layers, n_heads=4, n_kv_heads=4,
                mlp_hidden_size=64, vocab_size=VOCAB, embedding_size=VOCAB,
                max_sequence_length=128, rope_theta=5e5, rms_norm_eps=1e-5, mask_token_id=MASK,
                eos_token_id=EOS, pad_token_id=EOS, dllm_jax_token_ids=dict(eot_token_id=EOT))
  return dict(model_type="Dream", hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
              max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-6, mask_token_id=MASK,
              eos_token_id=EOS, pad_token_id=EOS, dllm_jax_token_ids=dict(eot_token_id=EOT))


@functools.lru_cache(maxsize=None)
def tiny(family: str, layers: int, seed: int = 0):
  """Random tiny model; LM head scaled, mask-id column zero (the mask never wins the argmax)."""
  m = init_model(ModelConfig.from_dict(model_dict(family, layers)), seed=seed)
  k = m.lm_head.kernel[...] * HEAD_SCALE
  m.lm_head.kernel[...] = k.at[:, MASK].set(0.0)
  return m


# Few row buckets (Br <= 1, Bu <= 2) and one candidate bucket (blocks <= 8) keep the number of
# compiled step executables small: on CPU compilation dominates these tests.
ENGINE = dict(max_running=16, token_budget=2048, max_model_len=64, page_size=16,
              max_block_length=16, max_refresh_rows=1, max_reuse_rows=2, logits="rows")


@functools.lru_cache(maxsize=None)
def llm_for(family: str, layers: int) -> LLM:
  """One engine per model, shared by the tests (its compiled steps are reused)."""
  return LLM(tiny(family, layers), engine_config=EngineConfig(**ENGINE))


def assert_idle(llm: LLM):
  core = llm.core
  assert not core.has_unfinished()
  assert core.pages.num_free == core.pages.capacity, "KV pages not all returned"
  assert core.slots.num_free == core.slots.num_slots


def rand_prompt(rng, n: int) -> list[int]:
  return rng.integers(0, VOCAB - 4, n).tolist()  # never mask / eos / eot


# Independent numpy model --------------------------------------------------------------------------


class NpModel:
  """The transformer in float64 numpy from the model's weights (no dllm_jax code)."""

  def __init__(self, model):
    c = model.cfg
    f = lambda p: np.asarray(p[...], np.float64)
    self.hq, self.hkv, self.d = c.num_heads, c.num_kv_heads, c.head_dim
    self.theta, self.eps, self.shifted = c.rope_theta, c.rms_norm_eps, c.shifted_prediction
    self.embed = f(model.embed)
    self.layers = []
    for layer in (model.layer(i) for i in range(c.num_layers)):
      a = layer.attn
      bias = lambda lin: f(lin.bias) if lin.bias is not None else 0.0
      self.layers.append(dict(
          n1=f(layer.attn_norm.weight), wq=f(a.q_proj.kernel), bq=bias(a.q_proj),
          wk=f(a.k_proj.kernel), bk=bias(a.k_proj), wv=f(a.v_proj.kernel), bv=bias(a.v_proj),
          wo=f(a.o_proj.kernel), n2=f(layer.mlp_norm.weight), gate=f(layer.mlp.gate_proj.kernel),
          up=f(layer.mlp.up_proj.kernel), down=f(layer.mlp.down_proj.kernel)))
    self.final = f(model.final_norm.weight)
    self.head = f(model.lm_head.kernel)

  def norm(self, x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

  def rope(self, x, pos):
    d = x.shape[-1]
    inv = 1.0 / self.theta ** (np.arange(0, d, 2) / d)
    ang = np.asarray(pos, np.float64)[:, None] * inv
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

  def qkv(self, li, x, pos):
    w = self.layers[li]
    h = self.norm(x, w["n1"])
    t = len(x)
    q = (h @ w["wq"] + w["bq"]).reshape(t, self.hq, self.d)
    k = (h @ w["wk"] + w["bk"]).reshape(t, self.hkv, self.d)
    v = (h @ w["wv"] + w["bv"]).reshape(t, self.hkv, self.d)
    return self.rope(q, pos), self.rope(k, pos), v

  def attend(self, q, keys):
    """q [T, Hq, D]; keys[j] = (K [S_j, D], V [S_j, D]) of KV head j (GQA: head h uses h // g)."""
    g = self.hq // self.hkv
    out = np.empty_like(q)
    for h in range(self.hq):
      kk, vv = keys[h // g]
      s = q[:, h] @ kk.T / math.sqrt(self.d)
      p = np.exp(s - s.max(axis=-1, keepdims=True))
      out[:, h] = (p / p.sum(axis=-1, keepdims=True)) @ vv
    return out

  def finish(self, li, x, o):
    w = self.layers[li]
    x = x + o.reshape(len(x), -1) @ w["wo"]
    h = self.norm(x, w["n2"])
    a = h @ w["gate"]
    return x + ((a / (1 + np.exp(-a))) * (h @ w["up"])) @ w["down"]

  def full(self, tokens):
    """All N rows -> (final hidden [N, d], per layer (q, k, v) post-RoPE)."""
    pos = np.arange(len(tokens))
    x = self.embed[np.asarray(tokens)]
    per_layer = []
    for li in range(len(self.layers)):
      q, k, v = self.qkv(li, x, pos)
      per_layer.append((q, k, v))
      x = self.finish(li, x, self.attend(q, [(k[:, j], v[:, j]) for j in range(self.hkv)]))
    return self.norm(x, self.final), per_layer

  def reuse(self, tokens, pos, n_fresh, cache):
    """Query rows only; cache[l][j] = (K, V) of KV head j in layer l; the first n_fresh rows'
    fresh K/V join the keys."""
    x = self.embed[np.asarray(tokens)]
    for li in range(len(self.layers)):
      q, k, v = self.qkv(li, x, np.asarray(pos))
      keys = [(np.concatenate([cache[li][j][0], k[:n_fresh, j]]),
               np.concatenate([cache[li][j][1], v[:n_fresh, j]])) for j in range(self.hkv)]
      x = self.finish(li, x, self.attend(q, keys))
    return self.norm(x, self.final)

  def logits(self, h):
    return h @ self.head


def ref_sparse_decode(npm: NpModel, prompt, sp: SamplingParams, delay: int, *,
                      check_dense: bool = False):
  """Dual-cache decoding at keep ratio 1.0 (no dllm_jax code besides the decision helpers).

  Returns (generated tokens, phases per step, decision gaps, max |frozen - dense| logits over
  the Reuse steps when check_dense).
  """
  p, g, bl = len(prompt), sp.gen_length, sp.block_length
  assert sp.schedule == "llada"
  spb = max(min(sp.steps, g) // (g // bl), 1)
  canvas = np.asarray(list(prompt) + [MASK] * g, np.int64)
  n = len(canvas)
  step, block_index, block_step, counts, frozen = 0, -1, 0, None, None
  phases, gaps, dense_gap = [], [], 0.0
  while True:
    masked = np.flatnonzero(canvas[p:] == MASK)
    if masked.size == 0:
      break
    b = int(masked[0]) // bl
    if b != block_index:
      block_index, block_step, frozen = b, 0, None
      counts = llada_transfer_counts(int(np.sum(canvas[p + b * bl:p + (b + 1) * bl] == MASK)),
                                     spb)
    start = p + b * bl
    lb = min(bl, n - start)
    block = np.arange(start, start + lb)
    if block_step <= delay:
      hidden, per_layer = npm.full(canvas)
      if npm.shifted:
        hidden = np.concatenate([hidden[:1], hidden[:-1]])
      rows = hidden[block]
      if block_step == delay:
        rest = np.setdiff1d(np.arange(n), block)
        frozen = [[(k[rest, j], v[rest, j]) for j in range(npm.hkv)] for _, k, v in per_layer]
        phases.append("select")
      else:
        phases.append("refresh")
    else:
      pos = block
      if npm.shifted and start > 0:
        pos = np.append(block, start - 1)  # query-only row: its K/V is in the frozen cache
      h = npm.reuse(canvas[pos], pos, lb, frozen)
      if npm.shifted:
        src = [lb if start > 0 else 0] + list(range(lb - 1))
        rows = h[src]
      else:
        rows = h[:lb]
      phases.append("reuse")
      if check_dense:
        hd, _ = npm.full(canvas)
        if npm.shifted:
          hd = np.concatenate([hd[:1], hd[:-1]])
        dense_gap = max(dense_gap, float(np.abs(npm.logits(hd[block]) - npm.logits(rows)).max()))
    logits = npm.logits(rows)
    x0, conf = {}, {}
    for q in block:
      if canvas[q] != MASK:
        continue
      x0[q], conf[q], gap, _ = decide_position(
          logits[q - start], temperature=sp.temperature, seed=sp.seed, step=step, position=int(q),
          confidence=sp.confidence, mask_id=MASK)
      gaps.append(Gap(gap, step, int(q), "vocab argmax"))
    k = counts[block_step] if block_step < len(counts) else 0
    for q in choose_commits(conf, rule=sp.rule, k=k, threshold=sp.threshold, factor=sp.factor,
                            step=step, gaps=gaps):
      canvas[q] = x0[q]
    step += 1
    block_step += 1
  return canvas[p:].tolist(), phases, gaps, dense_gap


# (a) step_forward: Select then Reuse on the same canvas ---------------------------------------------

N_BUCKET = 48
PAGE = 16
# (prompt len, gen len, block len, current block index, tokens committed in the current block)
ROWS = [(20, 16, 8, 1, 2), (13, 24, 8, 0, 0), (30, 16, 8, 1, 5)]
PERM = [2, 0, 1]   # reuse row r serves refresh row PERM[r]
SLOTS = [3, 0, 2]  # page-table slot of refresh row i


def _canvases(seed: int):
  rng = np.random.default_rng(seed)
  out = []
  for p, g, bl, blk, done in ROWS:
    c = np.asarray(rand_prompt(rng, p) + [MASK] * g, np.int32)
    start = p + blk * bl
    c[p:start] = rand_prompt(rng, start - p)                    # earlier blocks committed
    pos = rng.choice(np.arange(start, start + bl), done, replace=False)
    c[pos] = rand_prompt(rng, done)                              # part of the current block
    out.append((c, start, min(bl, len(c) - start)))
  return out


@functools.lru_cache(maxsize=None)
def _jitted(family: str, layers: int, st: SparseStatic):
  graphdef, _ = nnx.split(tiny(family, layers))

  @jax.jit
  def select_fn(params, refresh, cache, select):
    h, _, cache = step_forward(nnx.merge(graphdef, params), refresh, None, cache, select, st)
    return h, cache

  @jax.jit
  def reuse_fn(params, reuse, cache):
    _, h, _ = step_forward(nnx.merge(graphdef, params), None, reuse, cache, None, st)
    return h

  return select_fn, reuse_fn


def run_select_reuse(family: str, layers: int, ratio: float, modes, seed: int = 0):
  model = tiny(family, layers)
  mcfg = model.cfg
  hkv = mcfg.num_kv_heads
  rows = _canvases(seed)
  keeps = [n_keep(len(c) - lb, ratio) for c, _, lb in rows]
  reserve = [pages_needed(k, hkv, PAGE, adaptive=True) for k in keeps]
  width = max(reserve)
  pool = PoolConfig(num_pages=1 + sum(reserve), page_size=PAGE, num_layers=mcfg.num_layers,
                    num_kv_heads=hkv, head_dim=mcfg.head_dim, max_slots=4,
                    max_pages_per_head=N_BUCKET // PAGE)
  cache = init_cache(pool)
  br = len(rows)
  tokens = np.full((br, N_BUCKET), mcfg.pad_token_id, np.int32)
  reserved = np.zeros((br, width), np.int32)
  nxt = 1
  for i, ((c, _, _), r) in enumerate(zip(rows, reserve)):
    tokens[i, :len(c)] = c
    reserved[i, :r] = np.arange(nxt, nxt + r)
    nxt += r
  refresh = RefreshPart(jnp.asarray(tokens),
                        jnp.broadcast_to(jnp.arange(N_BUCKET, dtype=jnp.int32), (br, N_BUCKET)),
                        jnp.asarray([len(c) for c, _, _ in rows], jnp.int32))
  select = SelectPart(
      slots=jnp.asarray(SLOTS, jnp.int32),
      block_start=jnp.asarray([s for _, s, _ in rows], jnp.int32),
      block_len=jnp.asarray([lb for _, _, lb in rows], jnp.int32),
      keep=jnp.asarray(keeps, jnp.int32),
      mode=jnp.asarray([MODES.index(m) for m in modes], jnp.int32),
      pool_kernel=jnp.full((br,), 3, jnp.int32), reserved=jnp.asarray(reserved))
  st = SparseStatic(block_width=8, select_width=N_BUCKET, attn_impl="reference")
  select_fn, reuse_fn = _jitted(family, layers, st)
  params = nnx.split(model)[1]
  h_r, cache = select_fn(params, refresh, cache, select)

  shifted = mcfg.shifted_prediction
  lq = 8 + (1 if shifted else 0)
  u_tok = np.full((br, lq), mcfg.pad_token_id, np.int32)
  u_pos = np.zeros((br, lq), np.int32)
  for r, i in enumerate(PERM):
    c, start, lb = rows[i]
    u_tok[r, :lb], u_pos[r, :lb] = c[start:start + lb], np.arange(start, start + lb)
    if shifted:
      u_tok[r, lb], u_pos[r, lb] = c[start - 1], start - 1
  reuse = ReusePart(jnp.asarray(u_tok), jnp.asarray(u_pos),
                    jnp.asarray([rows[i][2] for i in PERM], jnp.int32),
                    jnp.asarray([SLOTS[i] for i in PERM], jnp.int32))
  h_u = reuse_fn(params, reuse, cache)
  return rows, keeps, np.asarray(h_r), np.asarray(h_u), jax.device_get(cache)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("layers", [1, 2])
def test_reuse_over_all_cached_kv_equals_dense(family, layers):
  """Ratio 1.0: the Reuse rows over [every cached non-block K/V ; fresh block K/V] equal the
  dense Refresh rows of the same canvas, in every layer (so for any layer count)."""
  modes = ["shared", "per_head", "per_head_adaptive"]
  rows, keeps, h_r, h_u, cache = run_select_reuse(family, layers, 1.0, modes)
  hkv = tiny(family, layers).cfg.num_kv_heads
  for r, i in enumerate(PERM):
    c, start, lb = rows[i]
    assert keeps[i] == len(c) - lb
    kv_len = np.asarray(cache.kv_len)[SLOTS[i]]
    assert kv_len.tolist() == [[keeps[i]] * hkv] * layers, modes[i]
    np.testing.assert_allclose(h_u[r, :lb], h_r[i, start:start + lb], atol=1e-5, rtol=0,
                               err_msg=f"row {i} ({modes[i]})")
    if tiny(family, layers).cfg.shifted_prediction:
      np.testing.assert_allclose(h_u[r, lb], h_r[i, start - 1], atol=1e-5, rtol=0,
                                 err_msg=f"query-only row of row {i}")


def _stored(cache, slot, layer, head):
  """(K, V) rows stored for (slot, layer, head), in slot order."""
  n = int(cache.kv_len[slot, layer, head])
  t = np.arange(n)
  pages = np.asarray(cache.page_table)[slot, layer, head, t // PAGE]
  assert (pages > 0).all(), "a kept token landed in the dummy page 0"
  return np.asarray(cache.k)[layer, pages, t % PAGE], np.asarray(cache.v)[layer, pages, t % PAGE]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_select_stores_reference_kv_and_reuse_attends_to_it(family):
  """Ratio 0.5, 2 layers: each (layer, KV head)'s pages hold exactly the K/V of the positions the
  numpy selection picks (same order), and the Reuse rows equal numpy attention over those sets."""
  layers = 2
  modes = ["shared", "per_head", "per_head_adaptive"]
  rows, keeps, h_r, h_u, cache = run_select_reuse(family, layers, 0.5, modes, seed=1)
  npm = NpModel(tiny(family, layers))
  all_pages = []
  for r, i in enumerate(PERM):
    c, start, lb = rows[i]
    hid, per_layer = npm.full(c)
    np.testing.assert_allclose(h_r[i, :len(c)], hid, atol=1e-4, rtol=0)  # Refresh rows: dense
    cached = []
    for li, (q, k, v) in enumerate(per_layer):
      counts = np.asarray(cache.kv_len)[SLOTS[i], li]
      if modes[i] == "per_head_adaptive":
        ref = ref_select(q[start:start + lb], k, start, lb, len(c), 1.0, "per_head", 3)
        assert counts.sum() <= npm.hkv * keeps[i] and (counts >= 1).all()
        ref = [ref[j][:counts[j]] for j in range(npm.hkv)]
      else:
        ref = ref_select(q[start:start + lb], k, start, lb, len(c), 0.5, modes[i], 3)
        assert counts.tolist() == [keeps[i]] * npm.hkv
      heads = []
      for j in range(npm.hkv):
        ks, vs = _stored(cache, SLOTS[i], li, j)
        np.testing.assert_allclose(ks, k[ref[j], j], atol=1e-4, rtol=0,
                                   err_msg=f"row {i} layer {li} head {j} ({modes[i]})")
        np.testing.assert_allclose(vs, v[ref[j], j], atol=1e-4, rtol=0)
        heads.append((ks.astype(np.float64), vs.astype(np.float64)))
        pg = np.asarray(cache.page_table)[SLOTS[i], li, j, :-(-len(ref[j]) // PAGE)]
        all_pages.append((i, li, tuple(pg)))
      cached.append(heads)
    pos = np.arange(start, start + lb)
    if npm.shifted:
      pos = np.append(pos, start - 1)
    want = npm.reuse(c[pos], pos, lb, cached)
    np.testing.assert_allclose(h_u[r, :len(pos)], want, atol=1e-4, rtol=0,
                               err_msg=f"Reuse row {i} ({modes[i]})")
  # within one (request, layer), heads use disjoint pages inside the request's reservation
  for i in range(len(rows)):
    for li in range(layers):
      used = [p for (ii, ll, pg) in all_pages if ii == i and ll == li for p in pg]
      assert len(used) == len(set(used))


# (b) 1 layer, ratio 1.0: identical to dense ------------------------------------------------------


def _matrix(family: str):
  rng = np.random.default_rng(11 if family == "llada" else 12)
  prompts, sps, sparses = [], [], []
  i = 0
  for mode in MODES:
    for temp in (0.0, 0.8):
      for rule in ("fixed", "threshold"):
        prompts.append(rand_prompt(rng, int(rng.integers(3, 15))))
        sps.append(SamplingParams(gen_length=16, block_length=8, steps=16 if i % 2 else 8,
                                  temperature=temp, seed=i + 1, rule=rule, threshold=0.5))
        sparses.append(SparseConfig(keep_ratio=1.0, delay=0, selection=mode))
        i += 1
  # other delays, and a Dream-style block-less schedule (one block = the whole generation)
  for delay, sp in [(1, SamplingParams(gen_length=16, block_length=8, seed=3)),
                    (2, SamplingParams(gen_length=16, block_length=8, rule="threshold",
                                       threshold=0.3, temperature=0.5, seed=4)),
                    (1, SamplingParams(gen_length=8, schedule="dream", steps=6, seed=5,
                                       temperature=0.7))]:
    prompts.append(rand_prompt(rng, int(rng.integers(3, 15))))
    sps.append(sp)
    sparses.append(SparseConfig(keep_ratio=1.0, delay=delay, selection="per_head"))
  return prompts, sps, sparses


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_one_layer_ratio_one_matches_dense(family):
  llm = llm_for(family, 1)
  prompts, sps, sparses = _matrix(family)
  dense = generate_static(llm, prompts, sps)
  before = (llm.core.stats.select_rows, llm.core.stats.reuse_rows)
  outs = llm.generate(prompts, sps, sparse=sparses)
  assert llm.core.stats.select_rows > before[0] and llm.core.stats.reuse_rows > before[1]
  for i, (o, d) in enumerate(zip(outs, dense)):
    assert o.token_ids == d.token_ids, (i, sps[i], sparses[i])
    assert o.nfe == d.nfe and o.finish_reason == d.finish_reason, i
    assert MASK not in o.token_ids
  assert_idle(llm)


# (c) multi-layer, ratio 1.0: identical to the numpy dual-cache reference -------------------------


def _c_requests(family: str, delay: int):
  rng = np.random.default_rng(100 + 10 * delay + (family == "dream"))
  prompts = [rand_prompt(rng, 6), rand_prompt(rng, 11), rand_prompt(rng, 3)]
  sps = [SamplingParams(gen_length=16, block_length=8, steps=16, stop_on_eos=False),
         SamplingParams(gen_length=16, block_length=8, steps=8, stop_on_eos=False),
         SamplingParams(gen_length=24, block_length=8, steps=24, temperature=0.8, seed=7,
                        stop_on_eos=False)]
  return prompts, sps


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("delay", [0, 1, 2])
def test_two_layers_ratio_one_match_dual_cache_reference(family, delay):
  llm = llm_for(family, 2)
  npm = NpModel(tiny(family, 2))
  prompts, sps = _c_requests(family, delay)
  modes = ["per_head", "shared", "per_head_adaptive"]
  outs = llm.generate(prompts, sps, sparse=[SparseConfig(keep_ratio=1.0, delay=delay,
                                                         selection=m) for m in modes])
  dense_gap = 0.0
  for i, (o, p, sp) in enumerate(zip(outs, prompts, sps)):
    want, phases, gaps, gap = ref_sparse_decode(npm, p, sp, delay, check_dense=True)
    dense_gap = max(dense_gap, gap)
    assert "reuse" in phases and phases.count("select") == sp.gen_length // sp.block_length
    if o.token_ids != want:
      near = sorted(gaps, key=lambda g_: g_.value)[:3]
      pytest.fail(f"request {i} ({modes[i]}): engine {o.token_ids} != reference {want}; "
                  f"smallest decision margins {near}")
    assert o.nfe == len(phases)
  # the frozen K/V really matter at 2 layers: the reference is not dense decoding in disguise
  assert dense_gap > 1e-3, dense_gap
  assert_idle(llm)


# State machine, pages, edge cases ---------------------------------------------------------------


@pytest.mark.parametrize("delay", [0, 1, 2])
def test_phase_sequence_per_block(delay):
  """One request, fixed rule with one token per step: per block `delay` Refreshes, one
  Refresh+Select, then Reuse until the block is done."""
  llm = llm_for("llada", 1)
  stats = llm.core.stats
  sp = SamplingParams(gen_length=16, block_length=8, steps=16, stop_on_eos=False)
  llm.add_request(rand_prompt(np.random.default_rng(delay), 5), sp,
                  SparseConfig(keep_ratio=0.5, delay=delay), return_trace=True)
  phases, outs = [], []
  while llm.has_unfinished():
    before = (stats.refresh_rows, stats.select_rows, stats.reuse_rows)
    outs += llm.step()
    d = (stats.refresh_rows - before[0], stats.select_rows - before[1],
         stats.reuse_rows - before[2])
    phases.append({(1, 0, 0): "refresh", (1, 1, 0): "select", (0, 0, 1): "reuse"}[d])
  block = ["refresh"] * delay + ["select"] + ["reuse"] * (8 - delay - 1)
  assert phases == block * 2
  (out,) = outs
  masks = [sum(t == MASK for t in step) for step in out.trace]
  assert masks == list(range(15, -1, -1))  # one token per step
  assert_idle(llm)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("delay", [0, 1])
def test_empty_prompt_single_block_has_no_candidates(family, delay):
  """P = 0 and G <= block: K = 0 candidates, n_keep 0, no pages; Reuse attends to the block
  only, which is all there is, so even a 2-layer model decodes exactly as dense."""
  llm = llm_for(family, 2)
  sp = SamplingParams(gen_length=8, block_length=8, steps=8, stop_on_eos=False)
  (dense,) = generate_static(llm, [[]], sp)
  before = llm.core.stats.reuse_rows
  # generate() rejects an empty prompt (a known add_request bug, see tests/test_engine.py), so the
  # engine core is driven directly
  rid = llm.core.add([], sp, SparseConfig(keep_ratio=0.5, delay=delay))
  assert llm.core.pages.num_free == llm.core.pages.capacity  # 0 pages reserved at intake
  outs = []
  while llm.has_unfinished():
    outs += llm.step()
    assert llm.core.pages.num_free == llm.core.pages.capacity  # and none while running
  (out,) = [o for o in outs if o.request_id == rid]
  assert out.token_ids == dense.token_ids
  assert llm.core.stats.reuse_rows - before == 8 - delay - 1
  assert_idle(llm)


@pytest.mark.parametrize("delay", [1, 2])
def test_blocks_finished_by_threshold_before_select(delay):
  """A tiny threshold commits a whole block at its first forward: no Select, no Reuse, and the
  output is dense decoding's; a mid threshold mixes blocks that do and do not reach Select."""
  llm = llm_for("llada", 1)
  stats = llm.core.stats
  rng = np.random.default_rng(delay)
  prompts = [rand_prompt(rng, 7), rand_prompt(rng, 4)]
  sp_all = SamplingParams(gen_length=16, block_length=8, rule="threshold", threshold=1e-6)
  dense = generate_static(llm, prompts, sp_all)
  before = (stats.select_rows, stats.reuse_rows, stats.refresh_rows)
  outs = llm.generate(prompts, sp_all, sparse=SparseConfig(keep_ratio=0.5, delay=delay))
  assert [o.token_ids for o in outs] == [d.token_ids for d in dense]
  assert (stats.select_rows, stats.reuse_rows) == before[:2]
  assert all(o.nfe <= 2 for o in outs)
  assert_idle(llm)

  sp_mid = SamplingParams(gen_length=16, block_length=8, rule="threshold", threshold=0.35,
                          temperature=0.6, seed=9)
  dense = generate_static(llm, prompts, sp_mid)
  outs = llm.generate(prompts, sp_mid, sparse=SparseConfig(keep_ratio=1.0, delay=delay))
  assert [o.token_ids for o in outs] == [d.token_ids for d in dense]
  assert_idle(llm)


def test_pages_returned_after_sparse_generate_at_every_ratio():
  llm = llm_for("dream", 1)
  rng = np.random.default_rng(5)
  prompts = [rand_prompt(rng, int(n)) for n in (2, 9, 17, 30)]
  sps = SamplingParams(gen_length=16, block_length=8)
  sparses = [SparseConfig(keep_ratio=r, selection=m) for r, m in
             [(0.0, "shared"), (0.3, "per_head"), (0.7, "per_head_adaptive"), (1.0, "per_head")]]
  outs = llm.generate(prompts, sps, sparse=sparses)
  assert all(MASK not in o.token_ids for o in outs)
  assert_idle(llm)


# (d) selection modes on the demo model ---------------------------------------------------------

DEMO_WEIGHTS = os.path.join(DEMO_MODEL_DIR, "model.safetensors")


@pytest.mark.slow
def test_selection_modes_agreement_on_demo_model(capsys):
  if not os.path.isfile(DEMO_WEIGHTS):
    pytest.skip("the bundled demo model is not trained yet")
  from dllm_jax.bench import sparse_quality as sq
  llm = sq.build_llm(None, 32 + 32)
  prompts = sq.heldout_prompts(llm.tokenizer, 2, 32)
  res = sq.measure(llm, prompts, gen_length=32, block_length=16, keep_ratio=0.5)
  assert set(res["modes"]) == set(MODES)
  for mode, r in res["modes"].items():
    assert isinstance(r["agreement"], float) and 0.0 <= r["agreement"] <= 1.0, mode
    assert len(r["per_prompt"]) == 2
  with capsys.disabled():
    print("\n" + sq.markdown_table(res))
  assert_idle(llm)


def test_sparse_quality_agreement_helper():
  from dllm_jax.bench import sparse_quality as sq
  assert sq.agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
  assert sq.agreement([], []) == 1.0
  with pytest.raises(ValueError):
    sq.agreement([1], [1, 2])
