"""The continuous-batching engine (dllm_jax/engine) against the static dense reference.

CPU float32, tiny random models. ``LLM.generate_static`` (one jitted dense step over a static
batch) is the reference: for dense requests the engine must give the same tokens, step counts
and finish reasons whatever the arrival order, batch mix and scheduler policy (decoding is batch
invariant: noise is a pure function of (seed, step, position, token)). Also: streaming, abort,
EOS early finish, validation at intake, a long mixed dense/sparse workload with no leak, and the
memory / activation budgets.

Compilation dominates the run time on CPU, so engines of the same model share one ``Runner``
(its jitted executables) and every shape stays in one bucket where possible (canvas <= 32,
blocks <= 8).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from dllm_jax.cache.sparse_state import SparseConfig
from dllm_jax.config import EngineConfig, ModelConfig, SamplingParams
from dllm_jax.engine.grid import Shapes
from dllm_jax.engine.core import QueueFull
from dllm_jax.engine.engine import LLM
from dllm_jax.engine.runner import Runner
from dllm_jax.model.transformer import init_model
from dllm_jax.testing.static_decoder import generate_static

MASK, EOS = 63, 62
LLADA = dict(model_type="llada", d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
             mlp_hidden_size=48, vocab_size=64, embedding_size=64, max_sequence_length=128,
             rope_theta=5e5, rms_norm_eps=1e-5, mask_token_id=MASK, eos_token_id=EOS)
DREAM = dict(model_type="Dream", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=48, vocab_size=64,
             max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-6,
             mask_token_id=MASK, eos_token_id=EOS)

# One engine shape for every test that shares the runner (the pool shapes are part of the
# compile key): canvases <= 32 tokens, blocks <= 8, 23 usable pages of 16 tokens.
BASE = EngineConfig(max_running=8, token_budget=256, max_model_len=64, max_refresh_rows=2,
                    max_reuse_rows=2, num_pages=24, page_size=16, max_block_length=8,
                    logits="rows")
# margin / entropy add executables (flags of the compiled step): covered by one test of their own.
LOW_RANDOM = ("low_confidence", "random")
POLICIES = ["phase", "fcfs", "static"]


# Helpers -------------------------------------------------------------------------------------

def random_params(rng: np.random.Generator, *, kinds=LOW_RANDOM) -> SamplingParams:
  """Random but valid per-request settings (canvas <= 24 with prompts <= 8, blocks <= 8)."""
  gen = int(rng.choice([8, 16]))
  schedule = "dream" if gen == 8 and rng.random() < 0.2 else "llada"
  block = gen if schedule == "dream" else int(rng.choice([4, 8]))
  rule = str(rng.choice(["fixed", "fixed", "threshold", "factor"]))
  nb = gen // block
  if rule == "fixed":
    steps = int(rng.choice([nb * m for m in range(1, gen // nb + 1)] + [2 * gen]))
  else:
    steps = gen
  hot = rng.random() < 0.5
  return SamplingParams(
      gen_length=gen, block_length=block, steps=steps, schedule=schedule, rule=rule,
      temperature=float(np.round(rng.uniform(0.3, 1.5), 3)) if hot else 0.0,
      seed=int(rng.integers(0, 2**31)), confidence=str(rng.choice(list(kinds))),
      threshold=float(np.round(rng.uniform(0.2, 0.95), 3)),
      factor=float(np.round(rng.uniform(0.5, 2.0), 3)), stop_on_eos=bool(rng.random() < 0.5))


def random_prompt(rng, lo=1, hi=8) -> list[int]:
  return [int(t) for t in rng.integers(0, 62, int(rng.integers(lo, hi + 1)))]


def random_sparse(rng) -> SparseConfig:
  return SparseConfig(keep_ratio=float(rng.choice([0.0, 0.25, 0.5, 1.0])),
                      pool_kernel=int(rng.choice([1, 3])), delay=int(rng.choice([0, 1, 2])),
                      selection=str(rng.choice(["shared", "per_head", "per_head_adaptive"])))


def same(out, ref) -> bool:
  return (out.token_ids == ref.token_ids and out.nfe == ref.nfe
          and out.finish_reason == ref.finish_reason)


def assert_same(outs, refs):
  bad = [(i, o.token_ids, r.token_ids, o.nfe, r.nfe, o.finish_reason, r.finish_reason)
         for i, (o, r) in enumerate(zip(outs, refs)) if not same(o, r)]
  assert not bad, bad


def assert_idle(llm: LLM):
  """Nothing queued or running, every page and slot back in the pool."""
  core = llm.core
  assert not llm.has_unfinished()
  assert not core.scheduler.running and not core.scheduler.waiting and core.num_waiting() == 0
  assert core.pages.num_free == core.pages.capacity
  assert core.slots.num_free == core.slots.num_slots
  assert not core.request_ids() and not llm.request_ids()


def run_interleaved(llm: LLM, prompts, sps, arrive, sparses=None, max_steps=2000):
  """add_request at step ``arrive[i]``, step until all done; outputs in submission order."""
  order = sorted(range(len(prompts)), key=lambda i: arrive[i])
  rids, outs, step, k = {}, {}, 0, 0
  while (k < len(order) or llm.has_unfinished()) and step < max_steps:
    while k < len(order) and arrive[order[k]] <= step:
      i = order[k]
      rids[i] = llm.add_request(prompts[i], sps[i], None if sparses is None else sparses[i])
      k += 1
    for out in llm.step():
      outs[out.request_id] = out
    step += 1
  assert step < max_steps, "engine did not drain"
  return [outs[rids[i]] for i in range(len(prompts))]


class _Planned(Exception):
  """Raised by a non-executing recorder after the first step's inputs are built."""


@dataclasses.dataclass(frozen=True)
class Seen:
  """One step as run: its bucket (read off the StepInputs themselves) and its real rows."""

  shapes: Shapes
  refresh_rows: int   # Refresh rows with a canvas (not padding)
  reuse_rows: int


class _Recorder:
  """Delegates to a Runner and records every step the engine runs (``execute=False``: record
  the first step and stop before compiling anything)."""

  def __init__(self, inner, execute: bool = True):
    self._inner, self._execute, self.seen = inner, execute, []

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def step(self, cache, inp, key, static):
    n = inp.refresh.index.shape[1] if inp.refresh is not None else 0
    br = int((inp.refresh.lengths > 0).sum()) if inp.refresh is not None else 0
    self.seen.append(Seen(Shapes(inp.flat.tokens.shape[0], n), br,
                          int((inp.reuse.n_query > 0).sum())))
    if not self._execute:
      raise _Planned
    return self._inner.step(cache, inp, key, static)


def capture_steps(llm: LLM, execute: bool = True) -> list[Seen]:
  """Record the steps the engine runs (from the StepInputs themselves)."""
  core = llm.core
  rec = _Recorder(core.runner, execute)
  core.runner = rec
  return rec.seen


def share_executables(runner: Runner, model) -> Runner:
  """A runner for ``model`` (same architecture) reusing ``runner``'s compiled step functions:
  the jitted steps take the parameters as an argument, so only the parameters differ."""
  other = copy.copy(runner)  # shares the dict of jitted functions
  other.params = Runner(model).params
  return other


# Fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
  return init_model(ModelConfig.from_dict(LLADA), seed=0)


@pytest.fixture(scope="module")
def runner(model):
  return Runner(model)


@pytest.fixture(scope="module")
def ref_llm(model):
  return LLM(model)  # generate_static only


@pytest.fixture
def make_llm(model, runner):
  def make(**kw) -> LLM:
    llm = LLM(model, engine_config=BASE.replace(**kw))
    llm.core.runner = runner  # same model, same pool shapes: reuse compiled executables
    return llm
  return make


@pytest.fixture(scope="module")
def cases(ref_llm):
  """Every dense request the shared-model tests compare, with its static reference output
  (one static batch: one compilation).

  - ``workload``: 8 requests with random per-request settings (low_confidence / random);
  - ``kinds``: a margin and an entropy request that run and finish together;
  - ``many``: 30 random requests, dense or sparse with random per-request SparseConfigs.
  """
  rng = np.random.default_rng(1234)
  workload = ([random_prompt(rng) for _ in range(8)], [random_params(rng) for _ in range(8)])
  kinds = ([random_prompt(rng, 3, 8), random_prompt(rng, 3, 8)],
           [SamplingParams(gen_length=16, block_length=8, steps=8, confidence=k,
                           temperature=t, seed=5, stop_on_eos=False)
            for k, t in (("margin", 0.0), ("entropy", 0.8))])
  rng = np.random.default_rng(2024)
  n = 30
  many_p = [random_prompt(rng) for _ in range(n)]
  many_sp = [random_params(rng) for _ in range(n)]
  many_sparse = [random_sparse(rng) if rng.random() < 0.6 else None for _ in range(n)]
  many_sparse[0] = SparseConfig(enabled=False)  # a disabled config means dense
  dense = [i for i, c in enumerate(many_sparse) if c is None or not c.enabled]
  prompts = workload[0] + kinds[0] + [many_p[i] for i in dense]
  sps = workload[1] + kinds[1] + [many_sp[i] for i in dense]
  refs = generate_static(ref_llm, prompts, sps)
  return dict(workload=(*workload, refs[:8]), kinds=(*kinds, refs[8:10]),
              many=(many_p, many_sp, many_sparse, dict(zip(dense, refs[10:]))))


@pytest.fixture(scope="module")
def workload(cases):
  return cases["workload"]


# Equivalence with the static reference ----------------------------------------------------------

def test_workload_is_diverse(workload):
  _, sps, refs = workload
  assert {sp.confidence for sp in sps} == set(LOW_RANDOM)
  assert any(sp.temperature > 0 for sp in sps) and any(sp.temperature == 0 for sp in sps)
  assert len({sp.rule for sp in sps}) >= 2 and len({sp.gen_length for sp in sps}) == 2
  assert len({sp.block_length for sp in sps}) >= 2 and len({sp.steps for sp in sps}) >= 3
  assert all(MASK not in r.token_ids for r in refs)


@pytest.mark.parametrize("policy", POLICIES)
def test_generate_matches_static_any_order(make_llm, workload, policy):
  prompts, sps, refs = workload
  llm = make_llm(scheduler=policy)
  perm = np.random.default_rng(POLICIES.index(policy)).permutation(len(prompts))
  outs = llm.generate([prompts[i] for i in perm], [sps[i] for i in perm])
  assert [o.index for o in outs] == list(range(len(prompts)))
  assert_same(outs, [refs[i] for i in perm])
  assert_idle(llm)


@pytest.mark.parametrize("policy", POLICIES)
def test_interleaved_arrivals_match_static(make_llm, workload, policy):
  prompts, sps, refs = workload
  llm = make_llm(scheduler=policy, token_budget=48)
  rng = np.random.default_rng(10 + POLICIES.index(policy))
  arrive = [int(a) for a in rng.integers(0, 12, len(prompts))]
  outs = run_interleaved(llm, prompts, sps, arrive)
  assert_same(outs, refs)
  assert_idle(llm)
  assert max(r for r, _ in llm.core.stats.phase_mix) == 2  # rows really were batched


def test_margin_and_entropy_rows_match_static(make_llm, cases):
  prompts, sps, refs = cases["kinds"]
  llm = make_llm()
  assert_same(llm.generate(prompts, sps), refs)
  assert_idle(llm)


def test_dream_engine_matches_static():
  model = init_model(ModelConfig.from_dict(DREAM), seed=1)
  llm = LLM(model, engine_config=BASE.replace(max_running=2))
  rng = np.random.default_rng(99)
  prompts = [random_prompt(rng) for _ in range(4)]
  sps = [random_params(rng) for _ in range(4)]
  sps[0] = SamplingParams(gen_length=8, schedule="dream", temperature=0.7, seed=1)
  refs = generate_static(llm, prompts, sps)
  outs = run_interleaved(llm, prompts, sps, arrive=[0, 0, 2, 3])
  assert_same(outs, refs)
  assert_idle(llm)


# Streaming -------------------------------------------------------------------------------------

def test_stream_gets_growing_committed_prefix(make_llm, workload):
  prompts, sps, refs = workload
  llm = make_llm()
  calls: dict[str, list] = {}

  def stream(rid, ids, finished):
    calls.setdefault(rid, []).append((list(ids), finished))

  rids = [llm.add_request(prompts[i], sps[i], stream=stream) for i in range(4)]
  outs = {}
  while llm.has_unfinished():
    for o in llm.step():
      outs[o.request_id] = o
  for i, rid in enumerate(rids):
    seq = calls[rid]
    final = outs[rid].token_ids
    assert final == refs[i].token_ids
    assert seq[-1] == (final, True)  # ends with the final tokens, flagged finished
    assert all(not f for _, f in seq[:-1])  # finished exactly once, last
    lens = [len(ids) for ids, _ in seq]
    assert all(b > a for a, b in zip(lens, lens[1:]))  # called only when the prefix grew
    for ids, _ in seq:  # a prefix of the final tokens: committed tokens never change
      assert ids == final[:len(ids)] and MASK not in ids
  assert_idle(llm)


# Abort -----------------------------------------------------------------------------------------

def test_abort_running_sparse_frees_pages(make_llm, workload):
  prompts, sps, refs = workload
  llm = make_llm()
  core = llm.core
  cap = core.pages.capacity
  sp = SamplingParams(gen_length=16, block_length=8, steps=16, stop_on_eos=False)
  victim = llm.add_request([1, 2, 3, 4, 5], sp, SparseConfig(keep_ratio=1.0,
                                                            selection="per_head_adaptive"))
  others = [llm.add_request(prompts[i], sps[i]) for i in range(3)]
  outs = {}
  for _ in range(3):  # Refresh, Select, Reuse: the victim holds pages and a slot
    outs.update((o.request_id, o) for o in llm.step())
  req = next(r for r in core.scheduler.running if r.request_id == victim)
  assert req.pages and req.slot is not None and core.pages.num_free < cap
  assert llm.abort(victim)
  aborted = [o for o in llm.step() if o.finish_reason == "abort"]
  assert [o.request_id for o in aborted] == [victim]
  assert req not in core.scheduler.running
  assert core.pages.num_free == cap and core.slots.num_free == core.slots.num_slots
  assert not llm.abort(victim)  # gone
  while llm.has_unfinished():
    outs.update((o.request_id, o) for o in llm.step())
  assert_same([outs[r] for r in others], refs[:3])  # neighbours unaffected
  assert_idle(llm)


def test_abort_waiting_and_queued_requests(make_llm):
  llm = make_llm()
  core = llm.core
  sp = SamplingParams(gen_length=8, block_length=4, steps=4, stop_on_eos=False)
  running = {llm.add_request([1 + i, 2, 3], sp) for i in range(core.cfg.max_running)}
  waiting = llm.add_request([7, 8], sp, SparseConfig())  # max_running reached: waits
  llm.step()
  assert [r.request_id for r in core.scheduler.waiting] == [waiting]
  assert core.pages.num_free == core.pages.capacity
  queued = llm.add_request([9], sp, SparseConfig())  # still in the intake queue
  assert llm.abort(waiting) and llm.abort(queued)
  done = llm.step()
  assert sorted(o.request_id for o in done if o.finish_reason == "abort") == sorted(
      [waiting, queued])
  assert not core.scheduler.waiting and core.num_waiting() == 0
  assert {r.request_id for r in core.scheduler.running} == running
  while llm.has_unfinished():
    llm.step()
  assert_idle(llm)


# EOS --------------------------------------------------------------------------------------------

@pytest.fixture
def eos_llm(runner, ref_llm):
  """A model that predicts EOS everywhere: a large constant feature in the residual stream and
  an LM-head row that maps it onto the EOS column."""
  m = init_model(ModelConfig.from_dict(LLADA), seed=1)
  m.embed[...] = m.embed[...].at[:, 0].add(30.0)
  m.lm_head.kernel[...] = m.lm_head.kernel[...].at[0, :].set(0.0).at[0, EOS].set(5.0)
  llm = LLM(m, engine_config=BASE)
  llm.core.runner = share_executables(runner, m)
  return llm


def test_eos_early_finish_frees_resources_at_once(eos_llm):
  llm = eos_llm
  core = llm.core
  cap = core.pages.capacity
  sp_stop = SamplingParams(gen_length=16, block_length=8, steps=16, confidence="random", seed=3)
  sp_run = SamplingParams(gen_length=16, block_length=8, steps=16, stop_on_eos=False)
  prompts = [[1, 2, 3], [4, 5, 6, 7]]
  ref = generate_static(llm, prompts, sp_stop)
  assert all(r.finish_reason == "eos" and r.nfe < 16 for r in ref)
  assert_same(llm.generate(prompts, sp_stop), ref)  # dense: the same early finish
  # Sparse: the stopping request frees its pages and slot in the step it finishes, while the
  # other (stop_on_eos off) keeps running with its own.
  stopper = llm.add_request(prompts[0], sp_stop, SparseConfig())
  other = llm.add_request(prompts[1], sp_run, SparseConfig())
  step, finished = 0, False
  while not finished:
    done = llm.step()
    step += 1
    assert step < 16
    for out in done:
      assert out.request_id == stopper
      assert out.finish_reason == "eos" and out.token_ids == [EOS] * 16 and out.nfe == step
      assert [r.request_id for r in core.scheduler.running] == [other]
      held = core.scheduler.running[0].pages_needed(core.mcfg.num_kv_heads, core.cfg.page_size)
      assert 0 < held == cap - core.pages.num_free
      assert core.slots.num_free == core.slots.num_slots - 1
      finished = True
  while llm.has_unfinished():
    llm.step()
  assert_idle(llm)


# Validation at intake ---------------------------------------------------------------------------

@pytest.fixture
def strict_llm(model):
  cfg = EngineConfig(max_running=4, token_budget=24, max_model_len=32, max_block_length=4,
                     num_pages=4, page_size=16, max_waiting=2, logits="rows")
  return LLM(model, engine_config=cfg)


def _nothing_queued(llm):
  core = llm.core
  assert core.num_waiting() == 0 and not core.request_ids() and not llm.has_unfinished()


@pytest.mark.parametrize("prompt_len, sp, sparse, match", [
    (20, SamplingParams(gen_length=16, block_length=4), None, "max_model_len"),
    (2, SamplingParams(gen_length=8, block_length=8), None, "max_block_length"),
    (12, SamplingParams(gen_length=16, block_length=4), None, "token budget"),
    # keep 1.0 of 20 candidates, 2 KV heads, pages of 16: 4 pages > 3 usable
    (8, SamplingParams(gen_length=16, block_length=4), SparseConfig(keep_ratio=1.0), "KV pages"),
], ids=["too-long", "block", "tokens", "pages"])
def test_oversize_rejected_at_add(strict_llm, prompt_len, sp, sparse, match):
  with pytest.raises(ValueError, match=match):
    strict_llm.add_request(list(range(1, prompt_len + 1)), sp, sparse)
  _nothing_queued(strict_llm)


def test_invalid_prompts_rejected(strict_llm):
  sp = SamplingParams(gen_length=8, block_length=4)
  with pytest.raises(ValueError, match="mask"):
    strict_llm.add_request([1, MASK, 2], sp)
  with pytest.raises(ValueError, match="outside"):
    strict_llm.add_request([1, 64], sp)
  with pytest.raises(ValueError, match="prompt 1"):  # generate validates all before queueing
    strict_llm.generate([[1, 2], list(range(1, 30))], sp)
  _nothing_queued(strict_llm)


def test_queue_limit_and_duplicate_ids(strict_llm):
  sp = SamplingParams(gen_length=8, block_length=4)
  strict_llm.add_request([1, 2], sp, request_id="a")
  with pytest.raises(ValueError, match="already in use"):
    strict_llm.add_request([1, 2], sp, request_id="a")
  # max_waiting counts the requests beyond the free running slots (4 here): 4 + 2 fit.
  for t in range(3, 8):
    strict_llm.add_request([t], sp)
  with pytest.raises(QueueFull):
    strict_llm.add_request([9], sp)
  core = strict_llm.core
  assert core.num_waiting() == 6 and core.num_waiting_for_slot() == 2
  assert len(core.request_ids()) == 6


def test_activation_budget_rejects_oversize_refresh(model):
  llm = LLM(model, engine_config=BASE.replace(activation_budget_bytes=1))
  with pytest.raises(ValueError, match="activation budget"):
    llm.add_request([1, 2, 3], SamplingParams(gen_length=8, block_length=4))
  _nothing_queued(llm)


def test_empty_prompt(make_llm):
  """An empty prompt is a valid request (as in generate_static). Sparse with G <= block: no
  candidates outside the block at all (dLLM-Serve never tested it: zero-row kernels) -- it must
  still finish cleanly. (Tokens are not compared with the static path: on an all-mask canvas the
  confidences of the tiny model tie to 1e-8, so float noise of the batch shape picks the order.)"""
  sps = [SamplingParams(gen_length=8, block_length=8, stop_on_eos=False),
         SamplingParams(gen_length=8, block_length=4, temperature=1.0, seed=9)]
  llm = make_llm()
  for sparse in (None, SparseConfig(keep_ratio=0.5)):
    outs = llm.generate([[1, 2], []], sps, sparse=sparse)
    assert [len(o.token_ids) for o in outs] == [8, 8] and outs[1].prompt_token_ids == []
    assert all(MASK not in o.token_ids for o in outs)
    assert outs[0].nfe == 8 and outs[0].finish_reason == "length"
  assert_idle(llm)


# Many requests, dense and sparse ----------------------------------------------------------------

def test_many_mixed_requests_finish_without_leak(make_llm, cases):
  prompts, sps, sparses, refs = cases["many"]
  arrive = sorted(int(a) for a in np.random.default_rng(3).integers(0, 40, len(prompts)))
  llm = make_llm(scheduler="phase", token_budget=96)
  core = llm.core
  peak_pages = 0
  inner = core.step

  def step():
    nonlocal peak_pages
    out = inner()
    peak_pages = max(peak_pages, core.pages.capacity - core.pages.num_free)
    assert len(core.scheduler.running) <= core.cfg.max_running
    return out

  core.step = step
  outs = run_interleaved(llm, prompts, sps, arrive, sparses)
  assert_idle(llm)
  assert peak_pages > 0 and sum(c is not None and c.enabled for c in sparses) >= 10
  assert any(r and u for r, u in core.stats.phase_mix), "no step mixed Refresh and Reuse rows"
  for o, sp in zip(outs, sps):
    assert len(o.token_ids) == sp.gen_length and MASK not in o.token_ids
    assert o.finish_reason in ("eos", "length")
  # Dense requests are not changed by sparse neighbours in their batches.
  assert_same([outs[i] for i in refs], list(refs.values()))


def test_step_loop_does_not_retain_results(make_llm, workload):
  """step() hands results to its caller and keeps nothing (the reference's results dict grew
  without bound)."""
  prompts, sps, refs = workload
  llm = make_llm()
  outs = run_interleaved(llm, prompts[:4], sps[:4], arrive=[0, 1, 2, 3])
  assert_same(outs, refs[:4])  # step() handed every result to its caller
  assert_idle(llm)
  assert not llm.request_ids(), f"{llm.request_ids()} retained after delivery"


# Memory budgets ---------------------------------------------------------------------------------

def _largest_step_estimate(core) -> int:
  """Activation estimate of the largest step the configuration allows: the largest over every
  bucket of the engine's shape grid (each bucket's layout is its largest step)."""
  return max(core.step_activation_bytes(s) for s in core.grid.shapes())


def test_memory_budget_sizes_the_pool(model):
  from dllm_jax.engine import memory
  cfg = BASE.replace(num_pages=None)  # token budget 256 >= 2 rows x 64: no row cap by tokens
  probe = LLM(model, engine_config=cfg).core
  weights = memory.weights_bytes(probe.mcfg, probe.dtype)
  peak = _largest_step_estimate(probe)
  page = probe.pool_cfg.page_bytes
  budget = weights + peak + 37 * page + page // 2
  core = LLM(model, engine_config=cfg.replace(memory_budget_bytes=budget)).core
  assert core.pool_cfg.num_pages == 37
  assert weights + core.pool_cfg.pool_bytes + peak <= budget
  assert weights + core.pool_cfg.pool_bytes + page + peak > budget  # the pool takes what is left
  with pytest.raises(ValueError, match="memory_budget_bytes"):
    LLM(model, engine_config=cfg.replace(memory_budget_bytes=weights)).core



def test_memory_budget_holds_for_every_step(model):
  """weights + pool + the activation estimate of a step the engine runs stay within
  memory_budget_bytes (no activation budget set: the pool sizing is the only guard)."""
  from dllm_jax.engine import memory
  cfg = BASE.replace(num_pages=None, max_model_len=64, token_budget=128, max_refresh_rows=4)
  probe = LLM(model, engine_config=cfg).core
  weights = memory.weights_bytes(probe.mcfg, probe.dtype)
  budget = weights + _largest_step_estimate(probe) + 40 * probe.pool_cfg.page_bytes
  llm = LLM(model, engine_config=cfg.replace(memory_budget_bytes=budget))
  core = llm.core
  seen = capture_steps(llm, execute=False)  # the first step's inputs, built but not run
  rng = np.random.default_rng(5)
  sp = SamplingParams(gen_length=8, block_length=8, steps=2, stop_on_eos=False)
  prompts = [random_prompt(rng, 25, 32) for _ in range(3)]
  for p in prompts:
    llm.add_request(p, sp)
  with pytest.raises(_Planned):
    llm.step()
  # Three Refresh rows of 33..40 tokens: the first token bucket (32, 48, 64, 96, 128) holding
  # them all, at the 64-token length bucket.
  total = sum(len(p) + 8 for p in prompts)
  assert seen == [Seen(Shapes(min(b for b in (96, 128) if b >= total), 64), 3, 0)]
  used = weights + core.pool_cfg.pool_bytes + core.step_activation_bytes(seen[0].shapes)
  assert used <= budget, (seen[0], used, budget)


@pytest.mark.parametrize("policy", POLICIES)
def test_activation_budget_bounds_every_step(make_llm, policy):
  probe = make_llm().core
  # One 32-token bucket step (one Refresh row of <= 32 tokens, or Reuse rows) fits; the next
  # token bucket, needed by two Refresh rows of > 24 tokens, does not: the budget binds.
  budget = probe.step_activation_bytes(Shapes(32, 32))
  assert probe.step_activation_bytes(Shapes(48, 32)) > budget
  llm = make_llm(scheduler=policy, activation_budget_bytes=int(budget))
  core = llm.core
  seen = capture_steps(llm)
  rng = np.random.default_rng(77)
  prompts = [random_prompt(rng) for _ in range(5)]
  sps = [random_params(rng) for _ in range(5)]
  sparses = [SparseConfig() if i % 2 else None for i in range(5)]
  outs = llm.generate(prompts, sps, sparses)
  assert len(outs) == 5 and all(MASK not in o.token_ids for o in outs)
  over = [(s, core.step_activation_bytes(s.shapes)) for s in seen
          if core.step_activation_bytes(s.shapes) > budget]
  assert seen and not over, over
  assert max(s.shapes.tokens for s in seen) == 32
  assert_idle(llm)


# Request's cached host state (request.py keeps the first mask, mask count, block and leftmost
# EOS incrementally) against a plain re-scan of the canvas after every apply.

def _rescan(req):
  gen = req.canvas[req.prompt_len:]
  masked = np.flatnonzero(gen == MASK)
  first = int(masked[0]) if len(masked) else req.params.gen_length
  bl = req.params.block_length
  b = first // bl if len(masked) else 0
  start = req.prompt_len + b * bl
  return (b, start, min(bl, req.length - start)), first, len(masked)


@pytest.mark.parametrize("seed", range(6))
def test_request_caches_match_a_plain_rescan(seed):
  from dllm_jax.engine.request import Request
  rng = np.random.default_rng(seed)
  eos_ids = (EOS, 61)
  sp = SamplingParams(gen_length=24, block_length=8, steps=24, stop_on_eos=bool(seed % 2))
  req = Request("r", [int(t) for t in rng.integers(0, 60, 5)], sp, None, MASK)
  done = False
  while not done:
    blk, first, n_masked = _rescan(req)
    assert req.current_block() == blk and req.committed_prefix() == first
    assert req._num_masked == n_masked
    # Commit 0-3 masked positions of the current block, sometimes an EOS / EoT.
    _, start, lb = blk
    cand = [q for q in range(start, start + lb) if req.canvas[q] == MASK]
    pos = np.array(sorted(rng.choice(cand, size=min(len(cand), int(rng.integers(0, 4))),
                                     replace=False)), np.int64)
    toks = rng.choice([EOS, 61] + list(range(10)), size=len(pos)).astype(np.int32)
    before = req.canvas.copy()
    done = req.apply(pos, toks, eos_ids, EOS)
    # The plain rule: an EOS with everything left of it committed ends it, rest filled.
    gen = before[req.prompt_len:].copy()
    gen[pos - req.prompt_len] = toks
    hit = next((i for i in range(len(gen)) if gen[i] in eos_ids and (gen[:i] != MASK).all()),
               None)
    if sp.stop_on_eos and hit is not None:
      gen[hit + 1:] = EOS
      assert done and req.finish_reason == "eos"
    elif (gen == MASK).any():
      assert not done
    else:
      assert done and req.finish_reason == ("eos" if np.isin(gen, eos_ids).any() else "length")
    assert req.canvas[req.prompt_len:].tolist() == gen.tolist()
  assert req._num_masked == 0 and req.committed_prefix() == sp.gen_length
