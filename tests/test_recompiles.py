"""No recompilation in steady state (fixed bucketed shapes, every compile counted).

``EngineCore.warmup("full")`` compiles every bucket of the configuration's shape grid once
(dllm_jax/engine/grid.py), exactly ``executable_bound()`` executables; a steady mixed workload
(dense and sparse requests, Refresh / Select / Reuse rows in the same steps) then runs a warm-up
pass, and the same workload shape again (other tokens, other seeds) must compile nothing:
``Runner.compile_count`` does not move, no XLA compilation happens at all (jax.monitoring), and
the loop runs under ``jax.no_tracing()``. A mixed workload of 200 requests (random lengths,
blocks, rules, confidence kinds incl. margin / entropy, sparse settings) compiles nothing either.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest

from dllm_jax.cache.sparse_state import SparseConfig
from dllm_jax.config import EngineConfig, ModelConfig, SamplingParams
from dllm_jax.engine.engine import LLM

from dllm_jax.model.transformer import init_model

MASK, EOS = 63, 62
LLADA = dict(model_type="llada", d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
             mlp_hidden_size=48, vocab_size=64, embedding_size=64, max_sequence_length=128,
             rope_theta=5e5, rms_norm_eps=1e-5, mask_token_id=MASK, eos_token_id=EOS)
# Buckets: T in {32, 48, 64, 96} (two per octave up to the most a step can feed: 2 Refresh rows
# of 32 + 2 Reuse rows of 8 = 80 tokens, under the 128-token budget), N in {0, 32}
# (max_model_len 32): 8 executables.
CFG = EngineConfig(max_running=4, token_budget=128, max_model_len=32, max_refresh_rows=2,
                   max_reuse_rows=2, num_pages=24, page_size=16, max_block_length=8,
                   logits="rows")
BOUND = 8

PROMPT_LENS = [5, 9, 3, 12, 7, 4]
ARRIVE = [0, 0, 1, 3, 4, 6]
SPARSE = [None, SparseConfig(), None, SparseConfig(keep_ratio=0.25, selection="shared"),
          SparseConfig(delay=0, selection="per_head_adaptive"), SparseConfig(keep_ratio=1.0)]


def workload(seed: int):
  """The steady workload's shape is fixed; only the tokens and the sampling seeds vary. Fixed
  rule, one token per step, no EOS stop: every pass schedules exactly the same steps."""
  rng = np.random.default_rng(seed)
  prompts = [[int(t) for t in rng.integers(0, 62, n)] for n in PROMPT_LENS]
  sps = [SamplingParams(gen_length=16, block_length=8, steps=16, stop_on_eos=False,
                        temperature=0.9 if i % 2 else 0.0, seed=int(rng.integers(0, 2**31)),
                        confidence="random" if i == 2 else "low_confidence")
         for i in range(len(prompts))]
  return prompts, sps


def run(llm: LLM, prompts, sps, arrive=ARRIVE, sparses=SPARSE, max_steps=5000):
  """add_request at the arrival steps, step until drained; returns (outputs, step shapes)."""
  core = llm.core
  shapes = []
  order = sorted(range(len(prompts)), key=lambda i: arrive[i])
  outs, step, k = {}, 0, 0
  while k < len(order) or llm.has_unfinished():
    while k < len(order) and arrive[order[k]] <= step:
      i = order[k]
      llm.add_request(prompts[i], sps[i], sparses[i], request_id=f"w{i}")
      k += 1
    ran = core.stats.steps
    for o in llm.step():
      outs[o.request_id] = o
    if core.stats.steps > ran:
      shapes.append(core.stats.phase_mix[-1])
    step += 1
    assert step < max_steps
  assert core.pages.num_free == core.pages.capacity and not core.scheduler.running
  return [outs[f"w{i}"] for i in range(len(prompts))], shapes


class Recorder:
  """Wraps the runner and records each compiled and each executed step's bucket (T, N, Br, Bu,
  Lq, K), read off the StepInputs themselves."""

  def __init__(self, inner):
    self._inner, self.buckets, self.compiled = inner, [], []

  def __getattr__(self, name):
    return getattr(self._inner, name)

  @staticmethod
  def bucket(inp):
    br, n = inp.refresh.index.shape if inp.refresh is not None else (0, 0)
    bu, lq = inp.reuse.index.shape
    return (inp.flat.tokens.shape[0], n, br, bu, lq, inp.cand.src.shape[0])

  def compile(self, key, static, cache, inp):
    if key not in self._inner.executables:
      self.compiled.append(self.bucket(inp))
    return self._inner.compile(key, static, cache, inp)

  def step(self, cache, inp, key, static):
    self.buckets.append(self.bucket(inp))
    return self._inner.step(cache, inp, key, static)


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
STEP = "jit(fn)"  # the runner's jitted step (runner.py: ``def fn(params, cache, inp)``)


@contextlib.contextmanager
def backend_compiles():
  """Names of every XLA compilation in the block, host-side jnp conversions included (a
  process-wide counter that, unlike jax.no_tracing, leaves JAX's dispatch caches alone)."""
  names: list[str] = []

  def listener(event, duration, **kw):
    if event == COMPILE_EVENT:
      names.append(str(kw.get("fun_name", "?")))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def all_compiles():
  """Every XLA compilation from the engine's creation to the end of the module. JAX's caches
  are process-wide (host-side conversions compiled by other test modules would hide ours), so
  the module starts from empty caches, and with the executable store off (it follows
  ``jax_compilation_cache_dir``): a server test earlier in the run turns JAX's persistent cache
  on for the process (tests/server_fixtures.py), and then the engine would load its steps from
  the store (tracing, compiling and counting none of them) when an earlier run on this machine
  left them there. JAX's own cache, once in use, stays in use for the process; that is harmless
  here: a hit in it still traces the step and still emits the backend-compile event counted."""
  saved = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  jax.clear_caches()
  try:
    with backend_compiles() as names:
      yield names
  finally:
    jax.config.update("jax_compilation_cache_dir", saved)


@pytest.fixture(scope="module")
def llm(all_compiles):
  model = init_model(ModelConfig.from_dict(LLADA), seed=0)
  llm = LLM(model, engine_config=CFG)
  llm.core.runner = Recorder(llm.core.runner)
  return llm


@pytest.fixture(scope="module")
def warmed(llm):
  """EngineCore.warmup over every bucket of the configuration: its new compiles."""
  assert llm.core.runner.compile_count == 0
  return llm.core.warmup("full")


@pytest.fixture(scope="module")
def first_pass(llm, warmed):
  """The steady workload's first pass after warm-up (the warm-up pass of the later tests)."""
  runner = llm.core.runner
  traces = runner.compile_count
  with backend_compiles() as names:
    outs, mix = run(llm, *workload(0))
  return dict(outs=outs, mix=mix, traces=runner.compile_count - traces, compiles=names)


def test_documented_bound(llm):
  # grid.py: one executable per (T, N); T in {32, 48, 64, 96}, N in {0, 32} for each.
  assert llm.core.grid.tokens == (32, 48, 64, 96)
  assert all(llm.core.grid.lengths_for(t) == [0, 32] for t in llm.core.grid.tokens)
  assert llm.core.executable_bound() == BOUND


def test_warmup_compiles_every_bucket_once(llm, warmed):
  runner = llm.core.runner
  assert warmed == BOUND == runner.compile_count
  assert len(set(runner.compiled)) == len(runner.compiled) == BOUND
  for t, n, br, bu, lq, k in runner.compiled:
    assert t in (32, 48, 64, 96) and n in (0, 32)
    # Br(T, N) = min(2, T // 16), Bu(T) = min(2, T // 4), Lq = 8, K = min(T, (Br + Bu) * 8)
    assert br == (min(2, t // 16) if n else 0) and bu == 2 and lq == 8
    assert k == min(t, (br + bu) * 8)


def test_first_pass_is_mixed_and_bucketed(llm, first_pass):
  assert any(r and u for r, u in first_pass["mix"]), "the workload never mixed phases"
  assert all(MASK not in o.token_ids for o in first_pass["outs"])
  assert first_pass["traces"] == 0  # every bucket it reached was compiled by warmup
  assert set(llm.core.runner.buckets) <= set(llm.core.runner.compiled)


def test_first_pass_after_warmup_compiles_no_step(first_pass):
  assert first_pass["traces"] == 0 and STEP not in first_pass["compiles"]


def test_first_pass_after_warmup_compiles_nothing_on_the_host(first_pass):
  """Not even host-side conversions: batch.build_step hands numpy to the jitted step (a
  jnp.asarray per input compiled one conversion per new shape after warm-up)."""
  assert first_pass["compiles"] == [], first_pass["compiles"]


def test_same_workload_shape_compiles_nothing(llm, first_pass):
  runner = llm.core.runner
  before = runner.compile_count
  with backend_compiles() as names, jax.no_tracing():
    outs, mix = run(llm, *workload(1))
  assert names == [] and runner.compile_count == before == BOUND
  assert mix == first_pass["mix"]  # the very same schedule
  assert [o.token_ids for o in outs] != [o.token_ids for o in first_pass["outs"]]
  assert all(MASK not in o.token_ids for o in outs)


def test_other_mix_within_the_buckets_compiles_nothing(llm, first_pass):
  runner = llm.core.runner
  rng = np.random.default_rng(3)
  prompts = [[int(t) for t in rng.integers(0, 62, int(rng.integers(1, 17)))] for _ in range(7)]
  sps = [SamplingParams(gen_length=int(g), block_length=int(b), steps=int(g),
                        temperature=float(t), seed=i, stop_on_eos=False)
         for i, (g, b, t) in enumerate(zip(rng.choice([8, 16], 7), rng.choice([4, 8], 7),
                                           rng.choice([0.0, 1.0], 7)))]
  sparses = [SparseConfig(keep_ratio=0.5, delay=int(d)) if d >= 0 else None
             for d in rng.integers(-1, 3, 7)]
  with backend_compiles() as names:
    outs, _ = run(llm, prompts, sps, [int(a) for a in rng.integers(0, 10, 7)], sparses)
  assert names == [] and runner.compile_count == BOUND
  assert all(MASK not in o.token_ids for o in outs)


def mixed_workload(rng, n: int):
  """``n`` random requests: prompt 0-24 tokens, gen 8 / 16 / 24 (canvas <= 32), blocks 4 / 8,
  every rule and confidence kind (margin / entropy included), temperatures, EOS stop or not,
  dense or sparse with random keep / selection / delay."""
  prompts, sps, sparses = [], [], []
  for i in range(n):
    gen = int(rng.choice([8, 16, 24]))
    block = int(rng.choice([b for b in (4, 8) if gen % b == 0]))
    rule = str(rng.choice(["fixed", "threshold", "factor"]))
    prompts.append([int(t) for t in rng.integers(0, 62, int(rng.integers(0, 32 - gen + 1)))])
    sps.append(SamplingParams(
        gen_length=gen, block_length=block, steps=gen, rule=rule,
        confidence=str(rng.choice(["low_confidence", "random", "margin", "entropy"])),
        temperature=float(rng.choice([0.0, 0.8])), seed=i, stop_on_eos=bool(rng.random() < .5)))
    sparses.append(None if rng.random() < 0.4 else SparseConfig(
        keep_ratio=float(rng.choice([0.25, 0.5, 1.0])), delay=int(rng.integers(0, 3)),
        selection=str(rng.choice(["shared", "per_head", "per_head_adaptive"]))))
  return prompts, sps, sparses


def test_mixed_workload_of_200_requests_compiles_nothing(llm, first_pass):
  runner = llm.core.runner
  rng = np.random.default_rng(200)
  prompts, sps, sparses = mixed_workload(rng, 200)
  arrive = sorted(int(a) for a in rng.integers(0, 400, 200))
  with backend_compiles() as names:
    outs, _ = run(llm, prompts, sps, arrive, sparses)
  assert names == [] and runner.compile_count == BOUND
  assert len(outs) == 200 and all(MASK not in o.token_ids for o in outs)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_long_randomized_workloads_compile_nothing(llm, first_pass, seed):
  runner = llm.core.runner
  rng = np.random.default_rng(1000 + seed)
  prompts, sps, sparses = mixed_workload(rng, 1000)
  arrive = sorted(int(a) for a in rng.integers(0, 1500, 1000))
  with backend_compiles() as names:
    outs, _ = run(llm, prompts, sps, arrive, sparses, max_steps=20000)
  assert names == [] and runner.compile_count == BOUND
  assert len(outs) == 1000 and all(MASK not in o.token_ids for o in outs)


def test_step_executables_within_documented_bound(llm, first_pass, all_compiles):
  """Every XLA compilation of the step in this module (warm-up, passes, other mixes) is one of
  the documented buckets and is counted by compile_count."""
  runner = llm.core.runner
  assert all_compiles.count(STEP) == runner.compile_count <= BOUND
