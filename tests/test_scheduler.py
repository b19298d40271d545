"""Scheduler policies (dllm_jax/engine/scheduler.py).

Unit tests drive ``Scheduler`` directly with real ``Request`` objects (no model, no device): the
phase-multiplexed policy (Reuse first, Refresh fills the token budget, skip-not-break, aging),
the reference's FCFS (break at the first misfit), static batching, and admission under pages,
slots and ``max_running``. The adversarial tests run the real engine on a tiny model: one huge
request (most of the KV pool, nearly the whole token budget) among a stream of small ones, under
every policy: everything finishes, the huge one within a bounded number of steps (no starvation,
no livelock: dLLM-Serve's scheduler returns nothing forever when its queue's head does not fit).
"""

from __future__ import annotations

import numpy as np
import pytest

from dllm_jax.cache.page_pool import PageAllocator, SlotAllocator
from dllm_jax.cache.sparse_state import Phase, SparseConfig
from dllm_jax.config import EngineConfig, ModelConfig, SamplingParams
from dllm_jax.engine.request import Request, Status
from dllm_jax.engine.scheduler import Scheduler

MASK, EOS = 63, 62
HF = dict(model_type="llada", d_model=32, n_layers=1, n_heads=4, n_kv_heads=4,
          mlp_hidden_size=48, vocab_size=64, embedding_size=64, max_sequence_length=128,
          rope_theta=5e5, rms_norm_eps=1e-5, mask_token_id=MASK, eos_token_id=EOS)
MCFG = ModelConfig.from_dict(HF)
SPARSE = SparseConfig(keep_ratio=0.5)  # N <= 32 -> n_keep <= 16 -> 4 pages of 16 (Hkv = 4)


def _cfg(**kw) -> EngineConfig:
  base = dict(max_running=16, token_budget=100, max_refresh_rows=16, max_reuse_rows=16,
              page_size=16, max_block_length=8, aging_steps=8)
  base.update(kw)
  return EngineConfig(**base)


def _sched(cfg: EngineConfig, num_pages: int = 64, num_slots: int | None = None,
           fits=lambda refresh, reuse: True) -> Scheduler:
  return Scheduler(cfg, MCFG, PageAllocator(num_pages), SlotAllocator(num_slots or cfg.max_running),
                   fits_activation=fits)


_ids = iter(range(10**6))


def _req(length: int, gen: int = 8, sparse: SparseConfig | None = None, block: int = 8) -> Request:
  """A request whose canvas is ``length`` tokens (prompt = length - gen)."""
  sp = SamplingParams(gen_length=gen, block_length=block, steps=gen, stop_on_eos=False)
  return Request(f"r{next(_ids)}", [1] * (length - gen), sp, sparse, MASK)


def _run(s: Scheduler, *reqs: Request, reuse: tuple[Request, ...] = ()) -> None:
  """Admit ``reqs`` (in order) and put the ``reuse`` ones in their Reuse phase."""
  for r in reqs:  # admission as every policy does it (pages, slot, RUNNING), in order
    assert s._try_admit(r)
    r.sync_block()
  assert all(r.status == Status.RUNNING for r in reqs) and s.running == list(reqs)
  for r in reuse:
    assert r.is_sparse
    r.block_step = r.sparse.delay + 1
    assert r.phase() == Phase.REUSE
  for r in s.running:
    r.skipped = 0


def _ids_of(reqs):
  return [r.request_id for r in reqs]


# Phase-multiplexed policy --------------------------------------------------------------------

def test_phase_reuse_first_then_refresh_fills_budget():
  s = _sched(_cfg(token_budget=100))
  d1, d2, d3 = _req(30), _req(30), _req(30)
  s1, s2 = _req(24, sparse=SPARSE), _req(24, sparse=SPARSE)
  _run(s, d1, d2, d3, s1, s2, reuse=(s1, s2))
  plan = s.schedule()
  # Reuse (8 tokens each) first, whatever their place in the queue; then Refresh oldest first
  # while the budget allows: 16 + 30 + 30 = 76, d3 would make 106 > 100.
  assert _ids_of(plan.reuse) == _ids_of([s1, s2])
  assert _ids_of(plan.refresh) == _ids_of([d1, d2])
  assert d3.skipped == 1 and d1.skipped == 0 and s1.skipped == 0
  # Same running set under the reference's FCFS: strict queue order, break at s2.
  f = _sched(_cfg(token_budget=100, scheduler="fcfs"))
  e1, e2, e3 = _req(30), _req(30), _req(30)
  t1, t2 = _req(24, sparse=SPARSE), _req(24, sparse=SPARSE)
  _run(f, e1, e2, e3, t1, t2, reuse=(t1, t2))
  plan = f.schedule()
  assert _ids_of(plan.refresh) == _ids_of([e1, e2, e3]) and _ids_of(plan.reuse) == _ids_of([t1])


def test_phase_skips_a_refresh_that_does_not_fit():
  s = _sched(_cfg(token_budget=100))
  a, big, c = _req(30), _req(80), _req(20)
  _run(s, a, big, c)
  plan = s.schedule()
  assert _ids_of(plan.refresh) == _ids_of([a, c])  # skipped big, did not stop at it
  assert plan.reuse == [] and big.skipped == 1
  assert sum(r.length for r in plan.refresh) <= 100


def test_phase_respects_row_caps():
  s = _sched(_cfg(token_budget=1000, max_refresh_rows=2, max_reuse_rows=1))
  d = [_req(20) for _ in range(3)]
  u = [_req(20, sparse=SPARSE) for _ in range(2)]
  _run(s, *d, *u, reuse=tuple(u))
  plan = s.schedule()
  assert _ids_of(plan.refresh) == _ids_of(d[:2]) and _ids_of(plan.reuse) == _ids_of(u[:1])


def test_phase_aging_puts_a_starved_request_first():
  s = _sched(_cfg(token_budget=100, aging_steps=3))
  a, b, big = _req(30), _req(30), _req(80)
  _run(s, a, b, big)
  for k in range(1, 4):
    plan = s.schedule()
    assert _ids_of(plan.refresh) == _ids_of([a, b])
    assert big.skipped == k
  plan = s.schedule()  # skipped aging_steps times: goes first, the others do not fit beside it
  assert _ids_of(plan.refresh) == _ids_of([big])
  assert big.skipped == 0 and a.skipped == 1 and b.skipped == 1
  plan = s.schedule()
  assert _ids_of(plan.refresh) == _ids_of([a, b])


def test_phase_activation_check_skips_too():
  # A request whose addition breaks the activation budget is skipped like a token misfit.
  big = _req(30)
  s = _sched(_cfg(token_budget=1000),
             fits=lambda refresh, reuse: big not in refresh or len(refresh) == 1)
  a, c = _req(20), _req(20)
  _run(s, a, big, c)
  plan = s.schedule()
  assert _ids_of(plan.refresh) == _ids_of([a, c]) and big.skipped == 1


# FCFS (the reference) ------------------------------------------------------------------------

def test_fcfs_breaks_at_first_misfit():
  s = _sched(_cfg(token_budget=100, scheduler="fcfs"))
  a, big, c = _req(30), _req(80), _req(20)
  _run(s, a, big, c)
  plan = s.schedule()
  assert _ids_of(plan.refresh) == _ids_of([a])  # c would fit, but FCFS does not skip
  assert plan.reuse == []


def test_fcfs_admission_breaks_at_head_of_waiting():
  s = _sched(_cfg(token_budget=100, scheduler="fcfs"))
  a = _req(30)
  s.waiting.extend([a])
  assert _ids_of(s.schedule().refresh) == _ids_of([a])
  big, c = _req(80), _req(21)
  s.waiting.extend([big, c])
  plan = s.schedule()
  # a (30) runs; big (80) does not fit beside it -> admission stops, c waits behind big.
  assert _ids_of(plan.refresh) == _ids_of([a]) and plan.admitted == []
  assert list(s.waiting) == [big, c]
  s.release(a)
  plan = s.schedule()
  assert _ids_of(plan.admitted) == _ids_of([big]) and _ids_of(plan.refresh) == _ids_of([big])


# Static batching -----------------------------------------------------------------------------

def test_static_admits_only_when_nothing_runs():
  s = _sched(_cfg(token_budget=100, scheduler="static"))
  a, b = _req(30), _req(30)
  s.waiting.extend([a, b])
  plan = s.schedule()
  assert _ids_of(plan.admitted) == _ids_of([a, b])
  c = _req(20)
  s.waiting.append(c)
  for _ in range(3):
    plan = s.schedule()
    assert plan.admitted == [] and _ids_of(plan.refresh) == _ids_of([a, b])
    assert list(s.waiting) == [c]
  s.release(a)
  plan = s.schedule()  # b still runs: c keeps waiting
  assert plan.admitted == [] and _ids_of(plan.refresh) == _ids_of([b])
  s.release(b)
  plan = s.schedule()
  assert _ids_of(plan.admitted) == _ids_of([c]) and not s.waiting


def test_static_batch_respects_token_budget():
  s = _sched(_cfg(token_budget=100, scheduler="static"))
  reqs = [_req(30) for _ in range(4)]
  s.waiting.extend(reqs)
  plan = s.schedule()
  assert _ids_of(plan.admitted) == _ids_of(reqs[:3])
  assert list(s.waiting) == reqs[3:]


# Admission ------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["phase", "fcfs", "static"])
def test_admission_never_exceeds_max_running(policy):
  s = _sched(_cfg(token_budget=10_000, max_running=2, scheduler=policy))
  reqs = [_req(20) for _ in range(5)]
  s.waiting.extend(reqs)
  for _ in range(3):
    s.schedule()
    assert len(s.running) == 2 and len(s.waiting) == 3
  assert _ids_of(s.running) == _ids_of(reqs[:2])


@pytest.mark.parametrize("policy", ["phase", "fcfs"])
def test_admission_waits_for_pages(policy):
  s = _sched(_cfg(token_budget=10_000, scheduler=policy), num_pages=9)  # 8 usable pages
  a, b, c = (_req(24, sparse=SPARSE) for _ in range(3))
  need = a.pages_needed(MCFG.num_kv_heads, 16)
  assert need == 4
  d = _req(20)  # dense, needs no pages, but queued behind c
  s.waiting.extend([a, b, c, d])
  s.schedule()
  assert _ids_of(s.running) == _ids_of([a, b]) and s.pages.num_free == 0
  assert list(s.waiting) == [c, d]  # FCFS admission: c waits for pages, d waits behind it
  assert c.pages == [] and c.slot is None and c.status == Status.WAITING
  for _ in range(2):
    s.schedule()
    assert list(s.waiting) == [c, d]
  s.release(a)
  assert s.pages.num_free == 4
  s.schedule()
  assert _ids_of(s.running) == _ids_of([b, c, d]) and not s.waiting
  assert len(c.pages) == 4 and sorted(c.pages) == sorted(set(c.pages))
  assert not set(c.pages) & set(b.pages) and 0 not in c.pages + b.pages  # page 0 is the dummy
  s.release(b), s.release(c), s.release(d)
  assert s.pages.num_free == 8 and s.slots.num_free == s.slots.num_slots and not s.running


def test_admission_waits_for_slots():
  s = _sched(_cfg(token_budget=10_000), num_pages=64, num_slots=2)
  a, b, c = (_req(24, sparse=SPARSE) for _ in range(3))
  s.waiting.extend([a, b, c])
  s.schedule()
  assert _ids_of(s.running) == _ids_of([a, b]) and list(s.waiting) == [c]
  assert {a.slot, b.slot} == {0, 1}
  s.release(a)
  s.schedule()
  assert c.slot == 0 and not s.waiting


def test_release_is_idempotent_and_frees_everything():
  s = _sched(_cfg(), num_pages=9)
  a = _req(24, sparse=SPARSE)
  s.waiting.append(a)
  s.schedule()
  assert s.pages.num_free == 4 and s.slots.num_free == s.slots.num_slots - 1
  s.release(a)
  s.release(a)
  assert s.pages.num_free == 8 and s.slots.num_free == s.slots.num_slots
  assert a.pages == [] and a.slot is None and not s.running


# Adversarial mix through the real engine ------------------------------------------------------

@pytest.fixture(scope="module")
def shared_runner():
  from dllm_jax.model.transformer import init_model
  from dllm_jax.engine.runner import Runner
  model = init_model(MCFG, seed=0)
  return model, Runner(model)


def _engine(shared_runner, policy: str, **kw):
  from dllm_jax.engine.engine import LLM
  model, runner = shared_runner
  # token budget 32, pool of 10 usable pages: the huge request (N = 30, keep ratio 1 -> 22 kept
  # tokens -> 8 pages) needs nearly all of both; small requests need 0 (dense) or 4 pages.
  cfg = EngineConfig(scheduler=policy, max_running=4, token_budget=32, max_model_len=32,
                     max_refresh_rows=2, max_reuse_rows=2, num_pages=11, page_size=16,
                     max_block_length=8, aging_steps=4, logits="rows")
  cfg = cfg.replace(**kw)
  llm = LLM(model, engine_config=cfg)
  llm.core.runner = runner  # same model and pool shapes: share compiled executables
  return llm


@pytest.mark.parametrize("policy", ["phase", "fcfs", "static"])
def test_huge_request_among_small_ones_is_not_starved(shared_runner, policy):
  llm = _engine(shared_runner, policy)
  core = llm.core
  rng = np.random.default_rng(7)
  huge_sp = SamplingParams(gen_length=16, block_length=8, steps=8, stop_on_eos=False)
  huge_prompt = [int(t) for t in rng.integers(0, 60, 14)]
  # Two huge requests: a sparse one needing 8 of the 10 pages (and 30 of the 32 tokens), and a
  # dense one needing 30 of the 32 tokens (it is admitted at once and must win the budget).
  huge = {3: SparseConfig(keep_ratio=1.0), 12: None}
  for sparse in huge.values():
    assert core.validate(huge_prompt, huge_sp, sparse) is None  # valid, but barely
  probe = Request("p", huge_prompt, huge_sp, huge[3], MASK)
  assert probe.length == 30 and probe.pages_needed(4, 16) == 8 == core.pages.capacity - 2

  def small(i):
    sp = SamplingParams(gen_length=8, block_length=4, steps=4, stop_on_eos=False,
                        temperature=float(i % 2), seed=i)
    sparse = SparseConfig(keep_ratio=0.25) if i % 3 == 0 else None
    return [int(t) for t in rng.integers(0, 60, int(rng.integers(2, 9)))], sp, sparse

  arrivals_until = 40  # adversary: a new small request every step for 40 steps
  finished, arrival, finish, max_skipped, small_arrival = {}, {}, {}, {}, {}
  order = []  # request ids in submission order
  step, max_steps = 0, 400
  while step < max_steps:
    if step < arrivals_until:
      rid = llm.add_request(*small(step))
      small_arrival[rid] = step
      order.append(rid)
      if step in huge:  # a huge one arrives while small ones run
        rid = llm.add_request(huge_prompt, huge_sp, huge[step])
        arrival[rid] = step
        order.append(rid)
    outs = llm.step()
    for r in core.scheduler.running:
      if r.request_id in arrival:
        max_skipped[r.request_id] = max(max_skipped.get(r.request_id, 0), r.skipped)
    for out in outs:
      assert out.finish_reason == "length", out
      assert MASK not in out.token_ids
      finished[out.request_id] = step
      if out.request_id in arrival:
        finish[out.request_id] = step
    step += 1
    if step >= arrivals_until and not llm.has_unfinished():
      break
  assert not llm.has_unfinished(), f"{policy}: livelock (work left after {max_steps} steps)"
  assert len(finished) == arrivals_until + len(huge)
  assert core.pages.num_free == core.pages.capacity and core.slots.num_free == core.slots.num_slots
  assert not core.scheduler.running and not core.scheduler.waiting
  # Bounded wait, measured against the queue rather than the clock (the small stream alone
  # overloads the engine, so everything queues): a huge request finishes within its own 8
  # forwards (+ aging_steps skips under phase, + one small's 4 forwards of slack) after the last
  # request that arrived before it, and only requests running alongside it overtake it.
  for rid, t0 in arrival.items():
    assert rid in finish, f"{policy}: {rid} never finished"
    ahead = max(finished[q] for q in order[:order.index(rid)])
    assert finish[rid] <= ahead + 8 + core.cfg.aging_steps + 4, (policy, rid, finish[rid], ahead)
    overtook = sum(1 for q, t in small_arrival.items() if t > t0 and finished[q] < finish[rid])
    assert overtook <= (core.cfg.max_running - 1) * (8 + core.cfg.aging_steps) // 4, (
        policy, rid, overtook)
  if policy == "phase":  # contended (skipped), but never more than aging_steps times in a row
    assert 0 < max(max_skipped.values()) <= core.cfg.aging_steps
