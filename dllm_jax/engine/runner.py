"""Bucketed, jitted step functions: one fused forward + candidate decoding per engine step.

The host builds a :class:`StepInputs` of small int/float arrays whose shapes come from a small
set of buckets; the device runs the fused forward (Refresh and Reuse rows together), gathers the
hidden rows of the candidate positions only, turns them into (token, confidence) through the
logit plan, applies each row's commit rule, and hands back (x0, commit) — [rows, C] each.
Nothing [rows x vocab]-sized leaves the logit module.

Buckets (all powers of two, capped by the engine config):
  Br  Refresh rows        0 (no Refresh part) or 1, 2, 4, ... pow2(max_refresh_rows)
  N   Refresh length      32, 64, ... pow2(max_model_len)
  Bu  Reuse rows          0 (no Reuse part) or 1, 2, 4, ... pow2(max_reuse_rows)
  C   candidates per row  8, 16, ... pow2(max_block_length)   (the step's longest block)
  Lq  Reuse query rows    C (+1 for Dream's query-only row): follows C
so for one logit plan and one (margin, entropy) flag pair the number of executables is at most
  |C| * ((|Br| * |N| + 1) * (|Bu| + 1) - 1)
(``executable_bound``). Every compilation is counted at trace time (``compile_count``);
``EngineCore.warmup`` precompiles the buckets a workload will reach.
"""

from __future__ import annotations

import dataclasses
import threading

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from dllm_jax.decoding import rules
from dllm_jax.decoding.dense import LogitPlan
from dllm_jax.logits import variants
from dllm_jax.model.fused import ReusePart, SelectPart, SparseStatic, step_forward
from dllm_jax.model.transformer import RefreshPart, Transformer
from jax.sharding import PartitionSpec as P

from pallas_kernels.common import MASK_VALUE
from pallas_kernels.fused_lm_head.reference import finalize, map_row_chunks, merge, tile_stats


def pow2_at_least(x: int, lo: int = 1) -> int:
  return max(lo, 1 << max(0, int(x) - 1).bit_length())


def bucket_sizes(lo: int, hi: int) -> list[int]:
  """Powers of two from lo up to the first >= hi."""
  out, v = [], pow2_at_least(lo)
  while True:
    out.append(v)
    if v >= hi:
      return out
    v *= 2


def executable_bound(max_refresh_rows: int, max_len: int, max_reuse_rows: int,
                     max_block_length: int) -> int:
  """Upper bound on step executables per logit plan and flag pair (module docstring)."""
  br = len(bucket_sizes(1, max_refresh_rows))
  n = len(bucket_sizes(32, max_len))
  bu = len(bucket_sizes(1, max_reuse_rows))
  c = len(bucket_sizes(8, max_block_length))
  return c * ((br * n + 1) * (bu + 1) - 1)


@flax.struct.dataclass
class CandidateInputs:
  """Per decoded row (Refresh rows first, then Reuse rows), all [R] or [R, C].

  src [R, C]: index of the hidden row (within the row's own fed tokens) that predicts candidate c
  (Dream's shift is folded in here by the host); pos [R, C]: absolute canvas position (noise key);
  eligible [R, C]: still masked and inside the current block.
  """

  src: jax.Array
  pos: jax.Array
  eligible: jax.Array
  temperature: jax.Array
  seed: jax.Array
  step: jax.Array
  confidence: jax.Array
  rule: jax.Array
  k: jax.Array
  threshold: jax.Array
  factor: jax.Array


@flax.struct.dataclass
class StepInputs:
  refresh: RefreshPart | None
  select: SelectPart | None
  reuse: ReusePart | None
  cand: CandidateInputs


@dataclasses.dataclass(frozen=True)
class StepStatic:
  plan: LogitPlan
  sparse: SparseStatic | None
  want_margin: bool
  want_entropy: bool


def _full_logits_rows(flat, idx, head, params: variants.RowParams, static: StepStatic,
                      mask_id: int):
  """The `full` baseline: logits for EVERY fed row ([rows_fed, V] f32 live, like the reference's
  level 0), then the candidate rows' decisions from those logits."""
  logits = jnp.dot(flat.astype(head.dtype), head, preferred_element_type=jnp.float32)
  return variants.decode_logits(jnp.take(logits, idx, axis=0), params,
                                want_margin=static.want_margin, want_entropy=static.want_entropy,
                                exclude_id=mask_id)


def decode_and_commit(model: Transformer, h_refresh, h_reuse, c: CandidateInputs,
                      static: StepStatic, *, axis: str | None = None, vocab_size: int = 0):
  """(x0 [R, C] int32, commit [R, C] bool) from the hidden states of both parts.

  Under tensor parallelism (``axis``) the LM head is this device's vocab slice and the
  decisions come from :func:`_sharded_decode`."""
  feeds = [h for h in (h_refresh, h_reuse) if h is not None]
  flat = jnp.concatenate([h.reshape(-1, h.shape[-1]) for h in feeds], axis=0)
  # Row r's fed tokens start at base[r] in the flat buffer (Refresh rows first, then Reuse).
  base, off = [], 0
  for h in feeds:
    base.append(off + jnp.arange(h.shape[0], dtype=jnp.int32) * h.shape[1])
    off += h.shape[0] * h.shape[1]
  base = jnp.concatenate(base)
  r, cw = c.src.shape
  idx = (base[:, None] + c.src).reshape(-1)
  head = model.lm_head.kernel[...]
  mask_id = model.cfg.mask_token_id  # never a decision (variants.py)
  plan = static.plan
  params = variants.RowParams(
      temperature=jnp.repeat(c.temperature, cw), seed=jnp.repeat(c.seed, cw),
      step=jnp.repeat(c.step, cw), position=c.pos.reshape(-1))
  if axis is not None:
    out = _sharded_decode(jnp.take(flat, idx, axis=0), head, params, static, axis, vocab_size,
                          mask_id)
  elif plan.variant == "full":
    out = _full_logits_rows(flat, idx, head, params, static, mask_id)
  else:
    out = variants.decode_rows(jnp.take(flat, idx, axis=0), head, params, variant=plan.variant,
                               chunk_rows=plan.chunk_rows, vocab_tile=plan.vocab_tile,
                               want_margin=static.want_margin, want_entropy=static.want_entropy,
                               exclude_id=mask_id, impl=plan.impl)
  shape = lambda x: None if x is None else x.reshape(r, cw)
  conf = rules.pick_confidence(c.confidence, shape(out.confidence), shape(out.rand),
                               shape(out.margin), shape(out.entropy))
  commit = rules.commit_mask(conf, c.eligible, c.rule, c.k, c.threshold, c.factor)
  return shape(out.token), commit


def _sharded_decode(hidden, head, params: variants.RowParams, static: StepStatic, axis: str,
                    vocab_size: int, mask_id: int):
  """Vocab-parallel decode: each device scores its vocab slice in row chunks, keeps per-row
  online statistics, and only those [rows]-sized statistics cross devices (all_gather, then a
  merge in vocab order) — the [rows x V] logits are never gathered."""
  v_local = head.shape[1]
  offset = jax.lax.axis_index(axis) * v_local
  p = params.normalized()
  cols = offset + jnp.arange(v_local, dtype=jnp.int32)

  def chunk(h, t, sd, stp, pos):
    logits = jnp.dot(h.astype(head.dtype), head, preferred_element_type=jnp.float32)
    logits = jnp.where(cols[None, :] < vocab_size, logits, MASK_VALUE)  # padded vocab ids
    return tile_stats(logits, offset, None, t, sd, stp, pos, hot=jnp.any(t > 0),
                      want_margin=static.want_margin, want_entropy=static.want_entropy,
                      exclude_id=mask_id)

  st = map_row_chunks(chunk, (hidden, p.temperature, p.seed, p.step, p.position),
                      static.plan.chunk_rows)
  every = jax.lax.all_gather(st, axis)  # each field [tp, R]
  merged = jax.tree.map(lambda x: x[0], every)
  for i in range(1, every.m.shape[0]):
    merged = merge(merged, jax.tree.map(lambda x, i=i: x[i], every))
  return variants.with_rand(finalize(merged, static.want_margin, static.want_entropy), p,
                           vocab_size)


class Runner:
  """Owns the jitted step functions of one model; counts compilations.

  The step always runs under ``shard_map`` on a 1-D mesh (one device unless tensor parallel), so
  the same local program serves tp = 1 and tp > 1 (dllm_jax/parallel.py).
  """

  def __init__(self, model: Transformer, mesh=None):
    from dllm_jax import parallel

    self.mesh = mesh if mesh is not None else parallel.make_mesh(1)
    self.tp = self.mesh.shape[parallel.AXIS]
    self.layout = parallel.layout_for(model.cfg, self.tp)
    self.vocab_size = model.cfg.vocab_size
    self.graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    pure = parallel.pad_vocab(parallel.expand_kv_heads(pure, model.cfg,
                                                       self.layout.kv_replication),
                              self.layout.vocab_size)
    specs = parallel.param_specs(pure)
    self.params = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(self.params, parallel.shard_params(pure, self.mesh))
    self.param_specs = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(self.param_specs, specs)
    self._fns: dict[StepStatic, object] = {}
    self._lock = threading.Lock()
    self.compile_count = 0

  @staticmethod
  def cache_specs():
    from dllm_jax import parallel
    from dllm_jax.cache.page_pool import SparseCache

    a = parallel.AXIS
    return SparseCache(k=P(None, a), v=P(None, a), page_table=P(None, None, a),
                       kv_len=P(None, None, a))

  def shard_cache(self, cache):
    from dllm_jax import parallel
    return jax.tree.map(lambda x, s: parallel.put(x, self.mesh, s), cache, self.cache_specs())

  def _input_specs(self, inputs: StepInputs):
    from dllm_jax import parallel
    specs = jax.tree.map(lambda _: P(), inputs)
    if inputs.select is not None:
      specs = specs.replace(select=specs.select.replace(reserved=P(None, parallel.AXIS)))
    return specs

  def _make(self, static: StepStatic, inputs: StepInputs):
    from dllm_jax import parallel

    graphdef, axis, vocab = self.graphdef, parallel.AXIS, self.vocab_size

    def local(params, cache, inp: StepInputs):
      model = nnx.merge(graphdef, params)
      h_r, h_u, cache = step_forward(model, inp.refresh, inp.reuse, cache, inp.select,
                                     static.sparse or SparseStatic(), axis=axis)
      x0, commit = decode_and_commit(model, h_r, h_u, inp.cand, static,
                                     axis=axis if self.tp > 1 else None, vocab_size=vocab)
      return cache, x0, commit

    in_specs = self._input_specs(inputs)
    mapped = jax.shard_map(local, mesh=self.mesh,
                           in_specs=(self.param_specs, self.cache_specs(), in_specs),
                           out_specs=(self.cache_specs(), P(), P()), check_vma=False)

    def fn(params, cache, inp):
      self.compile_count += 1  # runs at trace time only: one per new shape / static config
      return mapped(params, cache, inp)

    return jax.jit(fn, donate_argnums=(1,))

  def compiled_text(self, cache, inp: StepInputs, static: StepStatic) -> str:
    """Optimised HLO of the step for these inputs (to inspect its collectives)."""
    key = (static, jax.tree.structure(inp))
    fn = self._fns.get(key) or self._make(static, inp)
    return fn.lower(self.params, cache, inp).compile().as_text()

  def step(self, cache, inp: StepInputs, static: StepStatic):
    key = (static, jax.tree.structure(inp))
    with self._lock:
      fn = self._fns.get(key)
      if fn is None:
        fn = self._fns[key] = self._make(static, inp)
    if jax.process_count() > 1:  # multi-controller: every input must be a global array
      from dllm_jax import parallel
      inp = jax.tree.map(lambda x, s: parallel.put(x, self.mesh, s), inp, self._input_specs(inp))
    return fn(self.params, cache, inp)
