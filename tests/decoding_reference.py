"""Independent plain-numpy re-implementation of our decoding semantics (the golden reference).

Written from the reference samplers' semantics: LLaDA's ``generate()`` (ML-GSAI/LLaDA), Fast-dLLM's
threshold and factor rules (NVlabs/Fast-dLLM) and Dream's ``diffusion_generate`` (timestep schedule
and logit shift), with the engine's documented choices (SamplingParams docstring,
``dllm_jax.sampling``):

- canvas = prompt + [mask] * G; one full forward of the canvas per step (``logits_fn``);
- current block = the first block (of ``block_length``, from the prompt end) still holding a
  mask; candidates = its masked positions only;
- x0 = argmax_v (logits_v + T * g_v), g = -log(-log u), u = noise.uniform(seed, step, position,
  lane=v) with ``step`` the request's own forward counter (from 0) and ``position`` the absolute
  canvas position; T = 0: plain argmax; ties -> lowest token id; the mask id is never x0 (it
  stays in the softmax): a deliberate difference from LLaDA, where committing it is a no-op and
  our engine, which finishes when nothing is masked, would never finish;
- confidence: low_confidence = clean softmax probability of x0; random = noise.uniform(seed,
  step, position, lane=V); margin = p1 - p2; entropy = sum p log p (all in float64 here);
- ranking by confidence descending, ties -> lowest position;
- fixed rule + llada schedule: LLaDA's ``get_num_transfer_tokens`` per block over
  s = steps / num_blocks steps (steps > gen_length: steps = gen_length, the trailing no-op steps
  of LLaDA are skipped); fixed rule + dream schedule: k = int(m * (1 - t[i+1] / t[i])) with
  t = linspace(1, 1e-3, steps + 1) in float64, m = the row's masked count, all on the last step;
- threshold: every candidate with conf >= tau plus always the top-1; factor: the leading run of
  the sorted confidences with c_i >= 1 - f / (i + 1) (the first always passes; Fast-dLLM's
  "commit all when the first failure is the last candidate" quirk is NOT reproduced);
- EOS early finish (``stop_on_eos``): once the generation holds an EOS/EoT id whose left side is
  fully committed, every generated position right of it becomes ``eos_id`` and decoding stops.

Only ``pallas_kernels.noise`` (the shared counter-based random function) is imported from the
package. Every decision's margin to flipping is recorded (``RefResult.gaps``) so a test can tell a
genuine mismatch from a near-tie of float32 (engine) versus float64 (here) arithmetic.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from pallas_kernels import noise

NEAR_TIE = 1e-6


@dataclasses.dataclass
class Gap:
  """One decision's distance to flipping."""

  value: float
  step: int
  position: int
  what: str


@dataclasses.dataclass
class RefResult:
  tokens: list[int]          # the G generated positions
  trace: list[list[int]]     # generated positions after every step
  nfe: int
  finish_reason: str
  gaps: list[Gap]            # every decision's margin (see module docstring)
  mask_excluded: list[tuple[int, int]]  # (step, position) where the mask id had the top score
  counts: list[int]          # tokens committed at each step (before any EOS fill)
  dream_int_mismatch: list[tuple[int, int, int, int]]  # (m, steps, i, k_float) float != int form

  def min_gap(self) -> Gap | None:
    return min(self.gaps, key=lambda g: g.value) if self.gaps else None

  def near_ties(self, eps: float = NEAR_TIE) -> list[Gap]:
    return [g for g in self.gaps if g.value < eps]

  def fixture_problems(self, eps: float = NEAR_TIE) -> str:
    """A human-readable description of what could legitimately make the engine differ."""
    msgs = []
    nt = self.near_ties(eps)
    if nt:
      msgs.append(f"NEAR-TIE decisions (gap < {eps:g}; the only accepted source of a token "
                  f"difference): {nt[:5]}")
    if self.dream_int_mismatch:
      msgs.append(f"dream float vs integer count differ: {self.dream_int_mismatch[:5]}")
    return "; ".join(msgs)


# Schedules -------------------------------------------------------------------------------------

def llada_transfer_counts(n: int, s: int) -> list[int]:
  """LLaDA's get_num_transfer_tokens for one row: n masked tokens over s steps."""
  base = n // s
  rem = n % s
  counts = [base] * s
  for j in range(rem):
    counts[j] += 1
  return counts


def dream_count_float(m: int, steps: int, i: int, eps: float = 1e-3) -> int:
  """Dream's count at step i (float64 linspace timesteps, as Dream's code), all at the last."""
  ts = np.linspace(1.0, eps, steps + 1, dtype=np.float64)
  if i >= steps - 1:
    return m
  t, s = ts[i], ts[i + 1]
  return int(m * (1 - s / t))


def dream_count_int(m: int, steps: int, i: int) -> int:
  """The exact integer form (999 m) // (1000 S - 999 i) of the same count."""
  if i >= steps - 1:
    return m
  return (999 * m) // (1000 * steps - 999 * i)


# Per-position decisions ------------------------------------------------------------------------

def _softmax(l: np.ndarray) -> np.ndarray:
  z = l - l.max()
  e = np.exp(z)
  return e / e.sum()


def _top2_gap(x: np.ndarray) -> float:
  if x.size < 2:
    return np.inf
  part = np.partition(x, -2)
  return float(part[-1] - part[-2])


def decide_position(logits: np.ndarray, *, temperature: float, seed: int, step: int,
                    position: int, confidence: str, mask_id: int | None = None):
  """(x0, confidence, noisy-argmax gap, mask id had the top score) of one candidate position
  from float64 logits [V]. x0 is never ``mask_id``; the softmax still includes it."""
  v = logits.shape[0]
  lanes = np.arange(v)
  if temperature > 0:
    u = noise.uniform(seed, step, position, lanes, xp=np).astype(np.float64)
    g = -np.log(-np.log(u))
    score = logits + temperature * g
  else:
    score = logits
  mask_top = mask_id is not None and int(np.argmax(score)) == mask_id
  if mask_id is not None:
    score = np.where(lanes == mask_id, -np.inf, score)
  x0 = int(np.argmax(score))  # first maximum: ties -> lowest token id
  gap = _top2_gap(score[np.isfinite(score)])
  p = _softmax(logits)
  if confidence == "low_confidence":
    conf = float(p[x0])
  elif confidence == "random":
    conf = float(noise.uniform(seed, step, position, v, xp=np))
  elif confidence == "margin":
    ps = np.sort(p)
    conf = float(ps[-1] - ps[-2])
  elif confidence == "entropy":
    conf = float(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)))
  else:
    raise ValueError(confidence)
  return x0, conf, gap, mask_top


def rank_positions(conf: dict[int, float]) -> list[int]:
  """Candidates by descending confidence, ties -> lowest position."""
  return sorted(conf, key=lambda q: (-conf[q], q))


def choose_commits(conf: dict[int, float], *, rule: str, k: int, threshold: float, factor: float,
                   step: int, gaps: list[Gap]) -> list[int]:
  """The positions committed this step (records the ranking / threshold margins in gaps)."""
  order = rank_positions(conf)
  c = [conf[q] for q in order]
  n = len(order)
  if rule == "fixed":
    k = min(k, n)
    if 0 < k < n:
      gaps.append(Gap(c[k - 1] - c[k], step, order[k - 1], f"rank boundary k={k}"))
    return order[:k]
  if rule == "threshold":
    chosen = [q for q in order if conf[q] >= threshold]
    for q in order:
      gaps.append(Gap(abs(conf[q] - threshold), step, q, f"threshold {threshold}"))
    if not chosen:
      chosen = order[:1]
      if n > 1:
        gaps.append(Gap(c[0] - c[1], step, order[0], "threshold top-1"))
    return chosen
  if rule == "factor":
    run = 1
    for i in range(2, n + 1):  # 1-based rank i
      thr = 1.0 - factor / (i + 1)
      gaps.append(Gap(abs(c[i - 1] - thr), step, order[i - 1], f"factor rank {i}"))
      if c[i - 1] >= thr:
        run = i
      else:
        break
    if run < n:
      gaps.append(Gap(c[run - 1] - c[run], step, order[run - 1], f"factor run boundary {run}"))
    return order[:run]
  raise ValueError(rule)


# The decision loop -----------------------------------------------------------------------------

def reference_generate(logits_fn: Callable[[np.ndarray], np.ndarray], prompt: list[int], *,
                       gen_length: int, block_length: int, steps: int, mask_id: int,
                       temperature: float = 0.0, confidence: str = "low_confidence",
                       rule: str = "fixed", threshold: float = 0.9, factor: float = 1.0,
                       schedule: str = "llada", seed: int = 0, stop_on_eos: bool = False,
                       eos_ids: tuple[int, ...] = (), eos_id: int | None = None,
                       max_forwards: int = 10_000) -> RefResult:
  """Decode one request. ``logits_fn(canvas [N] int) -> float64 [N, V]`` gives the logits that
  predict each canvas position (already shifted for Dream: row j from hidden j-1, row 0 its own).
  """
  g, bl = gen_length, block_length
  assert g % bl == 0, "gen_length must be a multiple of block_length"
  num_blocks = g // bl
  if schedule == "dream":
    assert bl == g, "the dream schedule is block-less"
    total_steps = steps
  else:
    # LLaDA: s = steps / num_blocks; steps > gen_length leaves trailing no-op steps, skipped.
    total_steps = min(steps, g)
    assert total_steps % num_blocks == 0 or rule != "fixed"
  steps_per_block = max(total_steps // num_blocks, 1)

  p = len(prompt)
  canvas = np.asarray(list(prompt) + [mask_id] * g, np.int64)
  trace, gaps, mask_top, counts, mism = [], [], [], [], []
  step = 0
  block_index, block_step, block_counts = -1, 0, None
  finish = "length"
  while True:
    gen = canvas[p:]
    masked = np.flatnonzero(gen == mask_id)
    if masked.size == 0:
      break
    if step >= max_forwards:
      raise RuntimeError(f"reference did not finish in {max_forwards} forwards")
    b = int(masked[0]) // bl
    if b != block_index:
      block_index, block_step = b, 0
      n_block = int(np.sum(gen[b * bl:(b + 1) * bl] == mask_id))
      block_counts = llada_transfer_counts(n_block, steps_per_block)
    start = p + b * bl
    cand = [q for q in range(start, start + bl) if canvas[q] == mask_id]

    logits = np.asarray(logits_fn(canvas.copy()), np.float64)
    assert logits.shape[0] == canvas.shape[0]
    x0, conf = {}, {}
    for q in cand:
      x0[q], conf[q], gap, top = decide_position(
          logits[q], temperature=temperature, seed=seed, step=step, position=q,
          confidence=confidence, mask_id=mask_id)
      gaps.append(Gap(gap, step, q, "vocab argmax"))
      if top:
        mask_top.append((step, q))

    k = 0
    if rule == "fixed":
      if schedule == "dream":
        m = int(masked.size)
        k = dream_count_float(m, steps, step)
        if k != dream_count_int(m, steps, step):
          mism.append((m, steps, step, k))
      else:
        k = block_counts[block_step] if block_step < len(block_counts) else 0
    chosen = choose_commits(conf, rule=rule, k=k, threshold=threshold, factor=factor, step=step,
                            gaps=gaps)
    for q in chosen:
      canvas[q] = x0[q]
    counts.append(len(chosen))
    step += 1
    block_step += 1

    if stop_on_eos:
      gen = canvas[p:]
      hit = None
      for i in range(g):
        if gen[i] == mask_id:
          break  # everything further right has a mask on its left
        if int(gen[i]) in eos_ids:
          hit = i
          break
      if hit is not None:
        canvas[p + hit + 1:] = eos_id
        trace.append(canvas[p:].tolist())
        finish = "eos"
        break
    trace.append(canvas[p:].tolist())

  gen = canvas[p:].tolist()
  if finish != "eos" and any(t in eos_ids for t in gen):
    finish = "eos"
  return RefResult(tokens=gen, trace=trace, nfe=step, finish_reason=finish, gaps=gaps,
                   mask_excluded=mask_top, counts=counts, dream_int_mismatch=mism)


def reference_for(logits_fn, prompt, sp, *, mask_id: int, eos_ids=(), eos_id=None,
                  stop_on_eos: bool | None = None) -> RefResult:
  """Convenience: take the fields of a SamplingParams (nothing derived from it is used)."""
  return reference_generate(
      logits_fn, prompt, gen_length=sp.gen_length, block_length=sp.block_length, steps=sp.steps,
      mask_id=mask_id, temperature=sp.temperature, confidence=sp.confidence, rule=sp.rule,
      threshold=sp.threshold, factor=sp.factor, schedule=sp.schedule, seed=sp.seed,
      stop_on_eos=sp.stop_on_eos if stop_on_eos is None else stop_on_eos, eos_ids=eos_ids,
      eos_id=eos_id)


# Model adapters (the tests' logits_fn) ----------------------------------------------------------

_FWD: dict = {}


def model_logits_fn(model, *, pad_to: int = 32) -> Callable[[np.ndarray], np.ndarray]:
  """``logits_fn`` from one of our models: ``lm_head_logits(model, model.refresh(...))`` in float32
  over the canvas (positions 0..N-1, right-padded to a multiple of ``pad_to`` with the key-padding
  length N), cast to float64; for shifted-prediction (Dream) models row j takes row j-1 and row 0
  keeps its own. The model's parameters are read at every call (tests may rig them)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from dllm_jax.model.transformer import lm_head_logits

  graphdef, _ = nnx.split(model)
  shifted = bool(model.cfg.shifted_prediction)
  pad_id = int(model.cfg.pad_token_id)
  fwd = _FWD.get(model.cfg)  # one compiled forward per architecture (params are an argument)
  if fwd is None:

    @jax.jit
    def fwd(params, tokens, length):
      m = nnx.merge(graphdef, params)
      n = tokens.shape[1]
      pos = jnp.arange(n, dtype=jnp.int32)[None, :]
      return lm_head_logits(m, m.refresh(tokens, pos, length))

    _FWD[model.cfg] = fwd

  def logits_fn(canvas: np.ndarray) -> np.ndarray:
    n = int(canvas.shape[0])
    width = -(-n // pad_to) * pad_to
    tokens = np.full((1, width), pad_id, np.int32)
    tokens[0, :n] = canvas
    _, params = nnx.split(model)
    out = np.asarray(fwd(params, jnp.asarray(tokens), jnp.asarray([n], jnp.int32)))[0, :n]
    out = out.astype(np.float64)
    if shifted:
      out = np.concatenate([out[:1], out[:-1]], axis=0)
    return out

  return logits_fn


# Shared test fixtures (models, engines) ---------------------------------------------------------
# Kept here so that test_decoding_golden.py and test_batch_invariance.py, run in one pytest
# process, reuse one model per family and one compiled engine step per bucket: on CPU the jit
# compiles dominate the run time.

MASK, EOS, EOT = 63, 62, 61
HEAD_SCALE = 4.0
LLADA_CFG = dict(model_type="llada", d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
                 mlp_hidden_size=64, vocab_size=64, embedding_size=64, max_sequence_length=128,
                 rope_theta=5e5, rms_norm_eps=1e-5, mask_token_id=MASK, eos_token_id=EOS,
                 pad_token_id=EOS, dllm_jax_token_ids=dict(eot_token_id=EOT))
DREAM_CFG = dict(model_type="Dream", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                 max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-6,
                 mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS,
                 dllm_jax_token_ids=dict(eot_token_id=EOT))

_CACHE: dict = {}


def engine_config(**kw):
  """One engine shape for every golden / invariance test (the pool shapes are part of the compile
  key): canvases <= 32 tokens, blocks <= 8, the monolithic `rows` logit variant."""
  from dllm_jax.config import EngineConfig
  base = dict(max_running=8, token_budget=256, max_model_len=64, max_refresh_rows=1,
              max_reuse_rows=4, num_pages=4, page_size=16, max_block_length=16, logits="rows")
  base.update(kw)
  return EngineConfig(**base)


def tiny_model(family: str, seed: int = 0):
  """A random tiny model whose LM head is scaled by HEAD_SCALE (peakier, more varied
  confidences) and whose mask-id column is zero (logit 0: the mask id rarely has the top score;
  it is excluded from x0 anyway, see ``rigged_copy`` tests for the case where it wins)."""
  from dllm_jax.config import ModelConfig
  from dllm_jax.model.transformer import init_model
  key = ("model", family, seed)
  if key not in _CACHE:
    m = init_model(ModelConfig.from_dict(LLADA_CFG if family == "llada" else DREAM_CFG),
                   seed=seed)
    k = m.lm_head.kernel[...] * HEAD_SCALE
    m.lm_head.kernel[...] = k.at[:, MASK].set(0.0)
    _CACHE[key] = m
  return _CACHE[key]


def rigged_copy(model, columns: dict[int, tuple[int, float]]):
  """A copy of ``model`` whose LM-head column ``dst`` is ``scale * column[src]`` for each
  ``dst: (src, scale)``: token dst then wins wherever src won with a positive logit."""
  from flax import nnx
  m = nnx.clone(model)
  k = m.lm_head.kernel[...]
  for dst, (src, scale) in columns.items():
    k = k.at[:, dst].set(scale * k[:, src])
  m.lm_head.kernel[...] = k
  return m


def make_llm(model, **cfg_kw):
  """LLM(model) whose engine reuses the compiled step executables of every other engine built
  here for the same model family (same graph and pool shapes; only the parameters differ)."""
  import copy

  from dllm_jax.engine.engine import LLM
  llm = LLM(model, engine_config=engine_config(**cfg_kw))
  key = ("runner", model.cfg.family)
  shared = _CACHE.get(key)
  if shared is None:
    _CACHE[key] = llm.core.runner
  else:
    # Share the jitted functions (the parameters are a call argument); the parameters are laid
    # out by a Runner of this model on the shared runner's mesh, exactly as the engine does.
    try:
      kw = {"mesh": shared.mesh} if hasattr(shared, "mesh") else {}
      runner = copy.copy(shared)
      runner.params = type(shared)(model, **kw).params
      llm.core.runner = runner
    except Exception:  # pragma: no cover - a Runner API change: just compile again
      pass
  return llm


def logits_fn_for(model):
  key = ("logits_fn", id(model))
  if key not in _CACHE:
    _CACHE[key] = (model, model_logits_fn(model))
  return _CACHE[key][1]
