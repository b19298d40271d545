"""The static on-device decoder: a TEST-ONLY reference for the engine (never used by it).

``generate_static(llm, prompts, ...)`` decodes a static batch densely, entirely on device (one
jitted step over the whole canvas per forward pass); ``LLM.generate`` (continuous batching) must
give the same tokens. It shares the engine's model forward (``Transformer.refresh`` is the fused
step's layer body) and decode head (sampling/variants.py, rules.py, schedule.py); it differs in
everything the engine adds: paging, buckets, the scheduler, the host-side canvas.

One dense decoding step for a static batch of heterogeneous requests, as a pure function.

Every row carries its own sampling parameters as arrays, so one compiled step serves a batch that
mixes lengths, block lengths, step counts, rules, confidence kinds and temperatures. Each step:
one full forward, candidates = the current block of each row (the first block that still holds a
mask; Dream's schedule has one block spanning the whole generation), (token, confidence) for the
candidate rows only from the logit module, commit per rule, committed tokens never re-masked,
EOS early finish.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax.sampling import rules, schedule, variants
from dllm_jax.sampling.plan import LogitPlan
from dllm_jax.model.transformer import Transformer, shift_for_prediction

_BIG = 2**30


@dataclasses.dataclass(frozen=True)
class StepStatic:
  """Compile-time constants of the step (hashable: part of the jit cache key)."""

  cand_width: int
  mask_id: int
  eos_id: int
  eos_ids: tuple[int, ...]
  shifted: bool
  plan: LogitPlan = LogitPlan()
  want_margin: bool = False
  want_entropy: bool = False


@flax.struct.dataclass
class RowSpec:
  """Per-row decoding parameters, all [B]."""

  gen_start: jax.Array      # int32: prompt length P
  gen_len: jax.Array        # int32: G (0 for padding rows)
  block_len: jax.Array      # int32
  steps: jax.Array          # int32: effective steps
  temperature: jax.Array    # f32
  confidence: jax.Array     # int32, rules.CONFIDENCE_IDS
  rule: jax.Array           # int32, rules.RULE_IDS
  threshold: jax.Array      # f32
  factor: jax.Array         # f32
  schedule: jax.Array       # int32, rules.SCHEDULE_IDS
  seed: jax.Array           # uint32
  stop_on_eos: jax.Array    # bool


@flax.struct.dataclass
class DecodeState:
  tokens: jax.Array   # [B, N] int32 canvas (prompt + generation, right-padded)
  lengths: jax.Array  # [B] int32 = P + G
  step: jax.Array     # [B] int32: forward passes this request has run
  done: jax.Array     # [B] bool


def current_block(tokens, spec: RowSpec, mask_id: int):
  """(block start [B], block length [B], masked-in-generation [B, N]) of each row."""
  n = tokens.shape[1]
  pos = jnp.arange(n, dtype=jnp.int32)[None, :]
  gen_end = spec.gen_start + spec.gen_len
  in_gen = (pos >= spec.gen_start[:, None]) & (pos < gen_end[:, None])
  masked = (tokens == mask_id) & in_gen
  block_of = (pos - spec.gen_start[:, None]) // jnp.maximum(spec.block_len, 1)[:, None]
  blk = jnp.min(jnp.where(masked, block_of, _BIG), axis=1)
  blk = jnp.where(blk == _BIG, 0, blk)
  start = spec.gen_start + blk * spec.block_len
  length = jnp.clip(jnp.minimum(spec.block_len, gen_end - start), 0)
  return blk, start, length, masked, in_gen


def fixed_counts(spec: RowSpec, state: DecodeState, blk, block_length, num_masked):
  """Tokens to commit this step under the fixed rule (LLaDA or Dream schedule), [B]."""
  num_blocks = jnp.maximum(spec.gen_len // jnp.maximum(spec.block_len, 1), 1)
  per_block = jnp.maximum(spec.steps // num_blocks, 1)
  k_llada = schedule.llada_count(block_length, per_block, state.step - blk * per_block)
  k_dream = schedule.dream_count(num_masked, spec.steps, state.step)
  return jnp.where(spec.schedule == rules.SCHEDULE_IDS["dream"], k_dream, k_llada)


def decode_candidates(model: Transformer, hidden, spec: RowSpec, state: DecodeState, cand_pos,
                      static: StepStatic):
  """(token, prob, rand, margin, entropy), each [B, C], for the candidate positions."""
  b, c = cand_pos.shape
  head = model.lm_head.kernel[...]
  plan = static.plan
  if plan.variant == "full":
    # Ablation baseline: score every canvas row, then keep the candidates' results.
    n = hidden.shape[1]
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    rows, row_pos = hidden.reshape(b * n, -1), pos
  else:
    rows = jnp.take_along_axis(hidden, cand_pos[..., None], axis=1).reshape(b * c, -1)
    row_pos = cand_pos
  width = row_pos.shape[1]
  params = variants.RowParams(
      temperature=jnp.repeat(spec.temperature, width),
      seed=jnp.repeat(spec.seed, width),
      step=jnp.repeat(state.step, width),
      position=row_pos.reshape(-1))
  out = variants.decode_rows(
      rows, head, params, variant="rows" if plan.variant == "full" else plan.variant,
      chunk_rows=plan.rows_per_chunk(rows.shape[0]), vocab_tile=plan.tile(head.shape[1]),
      want_margin=static.want_margin, want_entropy=static.want_entropy,
      exclude_id=static.mask_id, impl=plan.decode_impl)

  def back(x):
    if x is None:
      return None
    x = x.reshape(b, width)
    return jnp.take_along_axis(x, cand_pos, axis=1) if plan.variant == "full" else x

  return back(out.token), back(out.confidence), back(out.rand), back(out.margin), back(
      out.entropy)


def decode_step(model: Transformer, spec: RowSpec, state: DecodeState, static: StepStatic):
  """One forward + commit for every row; finished rows pass through unchanged."""
  tokens = state.tokens
  b, n = tokens.shape
  active = ~state.done
  pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  hidden = model.refresh(tokens, pos, state.lengths)
  if static.shifted:
    hidden = shift_for_prediction(hidden)

  blk, start, length, masked, in_gen = current_block(tokens, spec, static.mask_id)
  c = jnp.arange(static.cand_width, dtype=jnp.int32)[None, :]
  valid = (c < length[:, None]) & active[:, None]
  cand_pos = jnp.where(valid, start[:, None] + c, 0)
  cand_tok = jnp.take_along_axis(tokens, cand_pos, axis=1)
  eligible = valid & (cand_tok == static.mask_id)

  x0, prob, rand, margin, entropy = decode_candidates(model, hidden, spec, state, cand_pos, static)
  conf = rules.pick_confidence(spec.confidence, prob, rand, margin, entropy)
  k = fixed_counts(spec, state, blk, length, jnp.sum(masked, axis=1))
  commit = rules.commit_mask(conf, eligible, spec.rule, k, spec.threshold, spec.factor)

  write_pos = jnp.where(commit, cand_pos, n)  # out of range -> dropped
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], write_pos.shape)
  tokens = tokens.at[rows, write_pos].set(x0.astype(tokens.dtype), mode="drop")

  tokens, eos_done = eos_fill(tokens, in_gen, spec.stop_on_eos & active, static)
  still_masked = jnp.any((tokens == static.mask_id) & in_gen, axis=1)
  done = state.done | ~still_masked | eos_done
  return DecodeState(tokens=tokens, lengths=state.lengths,
                     step=state.step + active.astype(jnp.int32), done=done), commit


def eos_fill(tokens, in_gen, enabled, static: StepStatic):
  """EOS early finish.

  A row is finished once it holds an EOS/EoT id in its generation whose left side is fully
  committed; every generated position right of that token is then set to ``eos_id``.
  Returns (tokens, finished [B]).
  """
  is_eos = jnp.isin(tokens, jnp.asarray(static.eos_ids, tokens.dtype)) & in_gen
  masked = ((tokens == static.mask_id) & in_gen).astype(jnp.int32)
  masks_left = jnp.cumsum(masked, axis=1) - masked
  qualifies = is_eos & (masks_left == 0) & enabled[:, None]
  finished = jnp.any(qualifies, axis=1)
  first = jnp.argmax(qualifies, axis=1)
  pos = jnp.arange(tokens.shape[1])[None, :]
  fill = in_gen & (pos > first[:, None]) & finished[:, None]
  return jnp.where(fill, jnp.asarray(static.eos_id, tokens.dtype), tokens), finished


@functools.lru_cache(maxsize=None)
def make_step_fn(graphdef: nnx.GraphDef, static: StepStatic):
  """jit(params, spec, state) -> (state, commit) for one static configuration."""

  def fn(params, spec, state):
    model = nnx.merge(graphdef, params)
    return decode_step(model, spec, state, static)

  return jax.jit(fn, donate_argnums=(2,))


def _pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def generate_static(llm, prompts, sampling_params=None, *, return_trace: bool = False,
                    progress=None):
  """Dense decoding of a static batch with ``llm``'s model, tokenizer, defaults and logit plan.

  ``prompts``: a string, a list of strings, a list of token ids, or a list of token-id lists.
  ``sampling_params``: one for all or one per prompt. Returns ``GenerationOutput`` s in order.
  """
  from dllm_jax.engine.engine import GenerationOutput

  texts, ids, sps = llm.prepare(prompts, sampling_params)
  cfg = llm.cfg
  for i, (p, sp) in enumerate(zip(ids, sps)):
    if len(p) + sp.gen_length > cfg.max_position:
      raise ValueError(f"prompt {i}: {len(p)} prompt + {sp.gen_length} generated tokens exceed "
                       f"the model's {cfg.max_position} positions")
  b_real = len(ids)
  b = _pow2(b_real)
  n = -(-max(len(p) + sp.gen_length for p, sp in zip(ids, sps)) // 32) * 32
  width = _pow2(max(sp.block_length for sp in sps))
  tokens = np.full((b, n), cfg.pad_token_id, np.int32)
  lengths = np.ones((b,), np.int32)
  spec = {k: np.zeros((b,), np.int32) for k in ("gen_start", "gen_len", "block_len", "steps",
                                                  "confidence", "rule", "schedule")}
  spec.update(temperature=np.zeros((b,), np.float32), threshold=np.ones((b,), np.float32),
              factor=np.ones((b,), np.float32), seed=np.zeros((b,), np.uint32),
              stop_on_eos=np.zeros((b,), bool))
  spec["block_len"][:] = 1
  spec["steps"][:] = 1
  for i, (p, sp) in enumerate(zip(ids, sps)):
    tokens[i, :len(p)] = p
    tokens[i, len(p):len(p) + sp.gen_length] = cfg.mask_token_id
    lengths[i] = len(p) + sp.gen_length
    spec["gen_start"][i], spec["gen_len"][i] = len(p), sp.gen_length
    spec["block_len"][i], spec["steps"][i] = sp.block_length, sp.effective_steps
    spec["temperature"][i], spec["threshold"][i], spec["factor"][i] = (
        sp.temperature, sp.threshold, sp.factor)
    spec["confidence"][i] = rules.CONFIDENCE_IDS[sp.confidence]
    spec["rule"][i] = rules.RULE_IDS[sp.rule]
    spec["schedule"][i] = rules.SCHEDULE_IDS[sp.schedule]
    spec["seed"][i] = sp.seed
    spec["stop_on_eos"][i] = sp.stop_on_eos
  done = np.arange(b) >= b_real
  static = StepStatic(
      cand_width=width, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
      eos_ids=cfg.eos_ids, shifted=cfg.shifted_prediction, plan=llm.logit_plan,
      want_margin=any(sp.confidence == "margin" for sp in sps),
      want_entropy=any(sp.confidence == "entropy" for sp in sps))
  graphdef, params = nnx.split(llm.model)
  step = make_step_fn(graphdef, static)
  spec = RowSpec(**{k: jnp.asarray(v) for k, v in spec.items()})
  state = DecodeState(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths),
                      step=jnp.zeros((b,), jnp.int32), done=jnp.asarray(done))
  traces = [[] for _ in range(b_real)] if return_trace else None
  finished = done
  while not finished.all():
    state, _ = step(params, spec, state)
    finished = np.asarray(state.done)  # one small device->host read per step
    if traces is not None:
      canvas = np.asarray(state.tokens)
      for i in range(b_real):
        if not done[i]:
          traces[i].append(canvas[i, len(ids[i]):len(ids[i]) + sps[i].gen_length].tolist())
      done = finished.copy()
    if progress is not None:
      progress(int(finished[:b_real].sum()), b_real)
  canvas = np.asarray(state.tokens)
  nfe = np.asarray(state.step)
  outs = []
  for i, (p, sp) in enumerate(zip(ids, sps)):
    gen = canvas[i, len(p):len(p) + sp.gen_length].tolist()
    outs.append(GenerationOutput(
        index=i, prompt_token_ids=list(p), token_ids=gen, text=llm.text(gen), nfe=int(nfe[i]),
        finish_reason="eos" if any(t in cfg.eos_ids for t in gen) else "length",
        prompt=texts[i], trace=traces[i] if traces is not None else None))
  return outs
