"""Golden tests: the engine's decoding against an independent numpy re-implementation.

``decoding_reference.reference_generate`` re-implements LLaDA's ``generate()`` loop, the
Fast-dLLM threshold / factor rules and Dream's schedule and shift in plain numpy (float64), from
the semantics documents, consuming our model's float32 logits. For every case the engine's
``LLM.generate`` (and ``generate_static`` for the mixed batch) must give token-identical
results, identical per-step traces and the same number of forward passes (nfe).

Before any comparison the fixture is checked for near-ties (every vocab-argmax gap, ranking gap at
the commit boundary, and threshold / factor margin must be >= 1e-6): a near-tie is the only
accepted source of a token difference between float32 (engine) and float64 (reference), and the
assertion message says so when one occurs.

Tiny random models (vocab 64, d 32, 2 layers; LM head scaled x4, mask-id column zeroed so the
mask id never wins on these fixtures; see ``decoding_reference.tiny_model``). All engines of one
model family share their compiled step (canvas <= 32, blocks <= 8): compiles dominate on CPU.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

import decoding_reference as R
from dllm_jax.config import SamplingParams
from dllm_jax.sampling import schedule
from dllm_jax.testing.static_decoder import generate_static

MASK, EOS, EOT = R.MASK, R.EOS, R.EOT
PA, PB, PC = [3, 17, 29, 5], [8, 9], [40, 41, 42, 43, 44, 45]


# Fixtures / helpers -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llada():
  return R.tiny_model("llada")


@pytest.fixture(scope="module")
def dream():
  return R.tiny_model("dream")


@pytest.fixture(scope="module")
def llada_llm(llada):
  return R.make_llm(llada)  # one request per step: a single row bucket


@pytest.fixture(scope="module")
def dream_llm(dream):
  return R.make_llm(dream)


def reference(model, prompt, sp, **kw):
  return R.reference_for(R.logits_fn_for(model), prompt, sp, mask_id=MASK, eos_ids=(EOS, EOT),
                         eos_id=EOS, **kw)


def first_diff(a, b):
  for t, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return t, x, y
  return (min(len(a), len(b)), "<end>", "<end>") if len(a) != len(b) else None


def assert_matches(out, ref, label=""):
  """Fixture sanity first (near-ties, mask predicted), then tokens, trace, nfe, finish reason."""
  problems = ref.fixture_problems()
  mg = ref.min_gap()
  assert not problems, f"{label}: fixture unusable for exact comparison: {problems}"
  ctx = (f"{label}: engine {out.token_ids} (nfe {out.nfe}) vs reference {ref.tokens} "
         f"(nfe {ref.nfe}); fixture has no near-ties (min decision gap {mg.value:.2e} at "
         f"{mg.what}, step {mg.step}, position {mg.position}), so this is a real difference")
  assert out.token_ids == ref.tokens, ctx
  assert out.trace is not None and len(out.trace) == out.nfe, ctx
  assert out.trace == ref.trace, f"{ctx}; first differing step: {first_diff(out.trace, ref.trace)}"
  assert out.nfe == ref.nfe, ctx
  assert out.finish_reason == ref.finish_reason, ctx


def run_one(llm, model, prompt, sp, label=""):
  out = llm.generate([prompt], sp, return_trace=True)[0]
  ref = reference(model, prompt, sp)
  assert_matches(out, ref, label or repr(sp))
  return out, ref


def check_trace_invariants(trace, sp, *, eos_fill=False):
  """Committed tokens never re-masked or changed; every step commits only inside the current
  block (the first block still holding a mask at the step start); the fixed rule commits exactly
  its scheduled count per step."""
  g, bl = sp.gen_length, sp.block_length
  prev = [MASK] * g
  steps_in_block, block = 0, -1
  for t, cur in enumerate(trace):
    last = t == len(trace) - 1
    masked = [i for i in range(g) if prev[i] == MASK]
    assert masked, f"step {t} ran with nothing left to decode"
    b = masked[0] // bl
    if b != block:
      block, steps_in_block = b, 0
    new = [i for i in range(g) if prev[i] == MASK and cur[i] != MASK]
    if not (eos_fill and last):
      for i in range(g):
        if prev[i] != MASK:
          assert cur[i] == prev[i], f"step {t}: committed position {i} changed"
      assert all(b * bl <= i < (b + 1) * bl for i in new), (
          f"step {t}: committed {new} outside the current block {b}")
      if sp.rule != "fixed" or sp.schedule == "llada":
        assert new, f"step {t} committed nothing"  # (Dream's schedule may commit 0 early on)
      if sp.rule == "fixed":
        if sp.schedule == "dream":
          k = schedule.dream_counts_host(len(masked), sp.steps, t)
        else:
          k = schedule.llada_block_counts(bl, min(sp.steps, g) // (g // bl))[steps_in_block]
        assert len(new) == k, f"step {t}: committed {len(new)}, the schedule says {k}"
    steps_in_block += 1
    prev = cur


# Schedules --------------------------------------------------------------------------------------

def test_llada_schedule_counts():
  assert schedule.llada_block_counts(32, 5) == [7, 7, 6, 6, 6]
  assert schedule.llada_block_counts(4, 2) == [2, 2]
  assert schedule.llada_block_counts(5, 3) == [2, 2, 1]
  for n in range(1, 41):
    for s in range(1, 41):
      c = schedule.llada_block_counts(n, s)
      assert c == R.llada_transfer_counts(n, s) and sum(c) == n
  # the per-row jnp version
  n = jnp.asarray([32, 5, 4, 7], jnp.int32)
  s = jnp.asarray([5, 3, 2, 7], jnp.int32)
  for j in range(7):
    got = np.asarray(schedule.llada_count(n, s, jnp.full((4,), j, jnp.int32)))
    want = [R.llada_transfer_counts(int(a), int(b))[j] if j < int(b) else int(a) // int(b)
            for a, b in zip(n, s)]
    assert got.tolist() == want


def test_dream_schedule_integer_vs_float():
  """Dream's float64 count int(m (1 - t[i+1]/t[i])) equals (999 m) // (1000 S - 999 i) except
  at exact-integer values of the ratio, where float64 rounds just below the integer."""
  m = np.arange(0, 513)
  boundary = 0
  for steps in range(1, 97):
    ts = np.linspace(1.0, 1e-3, steps + 1, dtype=np.float64)
    for i in range(steps - 1):
      kf = np.trunc(m * (1 - ts[i + 1] / ts[i])).astype(np.int64)
      denom = 1000 * steps - 999 * i
      ki = (999 * m) // denom
      for x in (0, 1, 7, 100, 512):
        assert schedule.dream_counts_host(x, steps, i) == ki[x]
      diff = np.flatnonzero(kf != ki)
      exact = (999 * m[diff]) % denom == 0
      assert exact.all() and np.all(ki[diff] - kf[diff] == 1), (steps, i, m[diff][~exact])
      boundary += diff.size
    # the last step commits everything left
    assert schedule.dream_counts_host(17, steps, steps - 1) == 17
  assert boundary > 0  # the exact-boundary cases exist (documented in sampling/schedule.py)
  # small canvases (our fixtures): the two forms agree
  for steps in range(1, 33):
    for i in range(steps):
      for mm in range(0, 33):
        assert R.dream_count_float(mm, steps, i) == R.dream_count_int(mm, steps, i)
  got = schedule.dream_count(jnp.asarray([8, 8, 30]), jnp.asarray([5, 5, 7]),
                             jnp.asarray([0, 4, 3]))
  assert np.asarray(got).tolist() == [schedule.dream_counts_host(8, 5, 0),
                                      8, schedule.dream_counts_host(30, 7, 3)]


# LLaDA layout, fixed rule -----------------------------------------------------------------------

FIXED_T0 = [
    (PA, dict(gen_length=12, block_length=4, steps=6)),    # 2 steps per block of 4: 2, 2
    (PB, dict(gen_length=10, block_length=5, steps=6)),    # 3 steps per block of 5: 2, 2, 1
    (PA, dict(gen_length=8, block_length=8, steps=16)),    # steps > gen_length: 8 forwards
    (PC, dict(gen_length=16, block_length=8, steps=4)),    # 4 per step
    (PB, dict(gen_length=12, block_length=4, steps=12)),   # 1 per step
    (PA, dict(gen_length=8, block_length=4, steps=2)),     # a whole block per step
    (PC, dict(gen_length=16, block_length=4, steps=20)),   # steps > gen_length, 4 blocks
]


@pytest.mark.parametrize("prompt,kw", FIXED_T0, ids=lambda x: str(x))
def test_llada_greedy_fixed(llada, llada_llm, prompt, kw):
  sp = SamplingParams(stop_on_eos=False, **kw)
  out, ref = run_one(llada_llm, llada, prompt, sp)
  assert out.nfe == min(sp.steps, sp.gen_length) == sp.effective_steps
  check_trace_invariants(out.trace, sp)


@pytest.mark.parametrize("prompt,kw", [
    (PA, dict(gen_length=12, block_length=4, steps=12, temperature=0.7, seed=5)),
    (PB, dict(gen_length=16, block_length=8, steps=8, temperature=1.0, seed=123456789)),
    (PC, dict(gen_length=12, block_length=4, steps=6, temperature=0.3, seed=2**32 - 1)),
], ids=lambda x: str(x))
def test_llada_sampled_fixed(llada, llada_llm, prompt, kw):
  sp = SamplingParams(stop_on_eos=False, **kw)
  out, _ = run_one(llada_llm, llada, prompt, sp)
  check_trace_invariants(out.trace, sp)
  # the seed matters (different noise, different tokens) and T > 0 differs from greedy
  other = reference(llada, prompt, sp.replace(seed=(sp.seed + 1) % 2**32))
  greedy = reference(llada, prompt, sp.replace(temperature=0.0))
  assert other.tokens != out.token_ids or greedy.tokens != out.token_ids


def test_confidence_kinds(llada):
  """Every confidence kind at T = 0 and T > 0, as one batch (each row against its own
  reference): one compiled step with margin and entropy on (shared with the mixed-batch test)."""
  cases = [(kind, t) for kind in ("low_confidence", "random", "margin", "entropy")
           for t in (0.0, 0.9)]
  sps = [SamplingParams(gen_length=12, block_length=4, steps=6, confidence=kind, temperature=t,
                        seed=11, stop_on_eos=False) for kind, t in cases]
  llm = R.make_llm(llada, max_refresh_rows=8)
  outs = llm.generate([PA] * len(sps), sps, return_trace=True)
  for (kind, t), sp, out in zip(cases, sps, outs):
    assert_matches(out, reference(llada, PA, sp), f"confidence={kind} T={t}")
    check_trace_invariants(out.trace, sp)


def test_confidence_kinds_differ(llada):
  """The kinds really rank differently on this fixture (otherwise the test above is weak)."""
  traces = {kind: reference(llada, PB, SamplingParams(
      gen_length=12, block_length=4, steps=6, confidence=kind, stop_on_eos=False)).trace
            for kind in ("low_confidence", "random", "margin", "entropy")}
  assert len({str(t) for t in traces.values()}) >= 3


# Fast-dLLM rules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,kw", [
    (PA, dict(threshold=0.5)),
    (PB, dict(threshold=0.5, temperature=0.8, seed=21)),
    (PC, dict(threshold=0.9)),
    (PB, dict(threshold=1.0)),  # only the top-1 each step
    (PA, dict(threshold=0.5, confidence="random", seed=4)),
], ids=lambda x: str(x))
def test_threshold_rule(llada, llada_llm, prompt, kw):
  sp = SamplingParams(gen_length=16, block_length=8, rule="threshold", stop_on_eos=False, **kw)
  out, ref = run_one(llada_llm, llada, prompt, sp)
  check_trace_invariants(out.trace, sp)
  if sp.threshold == 1.0:
    assert ref.counts == [1] * 16
  if sp.threshold == 0.5 and sp.confidence == "low_confidence":
    assert max(ref.counts) > 1, "low threshold: several tokens per step expected"


@pytest.mark.parametrize("prompt,kw", [
    (PA, dict(factor=3.0)),
    (PB, dict(factor=3.0, temperature=0.6, seed=8)),
    (PC, dict(factor=1.0)),
    (PB, dict(factor=0.5, confidence="random", seed=6)),
], ids=lambda x: str(x))
def test_factor_rule(llada, llada_llm, prompt, kw):
  sp = SamplingParams(gen_length=16, block_length=8, rule="factor", stop_on_eos=False, **kw)
  out, ref = run_one(llada_llm, llada, prompt, sp)
  check_trace_invariants(out.trace, sp)
  if sp.factor == 3.0:
    assert max(ref.counts) > 1, "large factor: several tokens per step expected"


def test_factor_rule_does_not_copy_fast_dllm_quirk():
  """Fast-dLLM commits all n when the first failure is the last candidate; we commit the
  leading passing run only (checked on the reference rule itself)."""
  conf = {10: 0.99, 11: 0.95, 12: 0.1}  # thresholds: -, 1 - 1/3, 1 - 1/4
  assert R.choose_commits(conf, rule="factor", k=0, threshold=0.9, factor=1.0, step=0,
                          gaps=[]) == [10, 11]
  conf = {10: 0.3, 11: 0.2}
  assert R.choose_commits(conf, rule="factor", k=0, threshold=0.9, factor=1.0, step=0,
                          gaps=[]) == [10]
  conf = {10: 0.3, 11: 0.3, 12: 0.95}  # ties -> lowest position; the threshold keeps the top-1
  assert R.choose_commits(conf, rule="threshold", k=0, threshold=0.9, factor=1.0, step=0,
                          gaps=[]) == [12]
  assert R.choose_commits({10: 0.3, 11: 0.3}, rule="threshold", k=0, threshold=0.9,
                          factor=1.0, step=0, gaps=[]) == [10]


# Dream layout -------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,kw", [
    (PA, dict(gen_length=8, schedule="dream", steps=5)),
    (PB, dict(gen_length=8, schedule="dream", steps=8, temperature=0.8, seed=3)),
    (PC, dict(gen_length=8, schedule="dream", steps=12)),  # steps > gen: every step is kept
    (PA, dict(gen_length=8, schedule="dream", steps=3, confidence="random", seed=9)),
], ids=lambda x: str(x))
def test_dream_schedule_and_shift(dream, dream_llm, prompt, kw):
  sp = SamplingParams(stop_on_eos=False, **kw)
  assert sp.block_length == sp.gen_length
  out, ref = run_one(dream_llm, dream, prompt, sp)
  assert out.nfe == sp.steps  # Dream's schedule runs every step, all remaining at the last
  check_trace_invariants(out.trace, sp)
  assert sum(ref.counts) == sp.gen_length
  if sp.steps > sp.gen_length:
    assert 0 in ref.counts  # steps that commit nothing are still run (and counted)


EMPTY_SP = SamplingParams(gen_length=8, schedule="dream", steps=4, confidence="random", seed=3,
                          stop_on_eos=False)  # an all-mask canvas ties the probabilities


def test_dream_empty_prompt_static_path(dream, dream_llm):
  """No prompt: canvas position 0 is a candidate and keeps its own logits row (Dream's shift)."""
  out = generate_static(dream_llm, [[]], EMPTY_SP, return_trace=True)[0]
  assert_matches(out, reference(dream, [], EMPTY_SP), "static, empty prompt")


def test_dream_empty_prompt_engine(dream, dream_llm):
  out = dream_llm.generate([[]], EMPTY_SP, return_trace=True)[0]
  assert_matches(out, reference(dream, [], EMPTY_SP), "engine, empty prompt")


@pytest.mark.parametrize("prompt,kw", [
    (PA, dict(gen_length=12, block_length=4, steps=6)),
    (PB, dict(gen_length=16, block_length=8, steps=8, temperature=0.9, seed=77)),
    (PC, dict(gen_length=16, block_length=8, rule="threshold", threshold=0.5)),
    (PA, dict(gen_length=16, block_length=8, rule="factor", factor=3.0, temperature=0.5)),
], ids=lambda x: str(x))
def test_dream_shift_with_llada_blocks(dream, dream_llm, prompt, kw):
  sp = SamplingParams(stop_on_eos=False, **kw)
  out, _ = run_one(dream_llm, dream, prompt, sp)
  check_trace_invariants(out.trace, sp)


def test_dream_shift_matters(dream):
  """The shifted reference differs from an unshifted decode of the same model (so the Dream
  tests above do exercise the shift)."""
  sp = SamplingParams(gen_length=8, schedule="dream", steps=5, stop_on_eos=False)
  shifted = R.logits_fn_for(dream)
  unshifted = lambda c: np.concatenate([shifted(c)[1:], shifted(c)[-1:]], axis=0)
  a = R.reference_for(shifted, PA, sp, mask_id=MASK)
  b = R.reference_for(unshifted, PA, sp, mask_id=MASK)
  assert a.tokens != b.tokens


# Mixed batch ----------------------------------------------------------------------------------------

# Every row here happens to take 8 forwards (so the batch keeps one row bucket: one compile);
# nothing in the comparison depends on that.
MIXED = [
    (PA, SamplingParams(gen_length=16, block_length=4, steps=8, stop_on_eos=False)),
    ([7], SamplingParams(gen_length=16, block_length=8, steps=8, temperature=0.8, seed=99,
                         confidence="entropy", stop_on_eos=False)),
    (PA, SamplingParams(gen_length=16, block_length=8, rule="threshold", threshold=0.7,
                        confidence="random", temperature=0.5, seed=5, stop_on_eos=False)),
    (PC, SamplingParams(gen_length=16, block_length=8, rule="factor", factor=3.0,
                        confidence="margin", temperature=0.4, seed=1, stop_on_eos=False)),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams(gen_length=8, block_length=8, steps=16,
                                                 stop_on_eos=False)),
    (PB, SamplingParams(gen_length=16, block_length=8, rule="threshold", threshold=0.3,
                        temperature=0.5, seed=5, stop_on_eos=False)),
]


@pytest.mark.parametrize("path", ["generate", "generate_static"])
def test_mixed_batch_each_row_matches_its_reference(llada, path):
  llm = R.make_llm(llada, max_refresh_rows=8)
  prompts = [p for p, _ in MIXED]
  sps = [sp for _, sp in MIXED]
  run = llm.generate if path == "generate" else functools.partial(generate_static, llm)
  outs = run(prompts, sps, return_trace=True)
  for i, (out, (p, sp)) in enumerate(zip(outs, MIXED)):
    assert out.prompt_token_ids == p and len(out.token_ids) == sp.gen_length
    assert_matches(out, reference(llada, p, sp), f"{path} row {i} {sp!r}")
    check_trace_invariants(out.trace, sp)


# EOS early finish -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dst", [EOS, EOT], ids=["eos", "eot"])
def test_eos_early_finish(llada, dst):
  """A head rigged so that EOS (or EoT) wins wherever token 50 won: once an EOS/EoT with a fully
  committed left side exists, the rest becomes eos_token_id and no further step runs."""
  model = R.rigged_copy(llada, {dst: (50, 1.2)})
  llm = R.make_llm(model)
  sp = SamplingParams(gen_length=16, block_length=4, steps=8, stop_on_eos=True)
  out = llm.generate([PB], sp, return_trace=True)[0]
  ref = reference(model, PB, sp)
  assert_matches(out, ref, f"stop_on_eos rig {dst}")
  assert out.finish_reason == "eos"
  gen = out.token_ids
  hit = next(i for i, t in enumerate(gen) if t in (EOS, EOT))
  assert gen[hit] == dst and MASK not in gen[:hit]
  assert gen[hit + 1:] == [EOS] * (len(gen) - hit - 1) and hit + 1 < len(gen)
  assert out.nfe < sp.effective_steps, "the fixture must finish early"
  check_trace_invariants(out.trace, sp, eos_fill=True)
  # the step before the last still had masks right of the EOS (so the fill did something)
  assert MASK in out.trace[-2][hit + 1:] if len(out.trace) > 1 else True

  # stop_on_eos=False: the same model decodes every step, EOS tokens stay where decoded
  sp2 = sp.replace(stop_on_eos=False)
  out2 = llm.generate([PB], sp2, return_trace=True)[0]
  ref2 = reference(model, PB, sp2)
  assert_matches(out2, ref2, f"no stop rig {dst}")
  assert out2.nfe == sp2.effective_steps and out2.finish_reason == "eos"
  check_trace_invariants(out2.trace, sp2)


def test_eos_waits_for_left_side(llada):
  """EOS committed while masks remain to its left: decoding continues until the left side is
  complete (token 21 -> EOS rig, prompt PB: the EOS lands in block 2 of 4)."""
  model = R.rigged_copy(llada, {EOS: (21, 1.2)})
  llm = R.make_llm(model)
  sp = SamplingParams(gen_length=16, block_length=4, steps=8, stop_on_eos=True)
  out = llm.generate([PB], sp, return_trace=True)[0]
  ref = reference(model, PB, sp)
  assert_matches(out, ref, "eos waits")
  assert out.finish_reason == "eos" and out.nfe < sp.effective_steps
  hit = out.token_ids.index(EOS)
  first_seen = next(t for t, tr in enumerate(out.trace) if EOS in tr)
  assert hit >= sp.block_length  # not in the first block: blocks before it had to finish first
  assert first_seen <= out.nfe - 1


# The mask id is never a decision -----------------------------------------------------------------

@pytest.mark.parametrize("logits", ["rows", "row_chunked", "vocab_tiled", "full"])
def test_mask_id_prediction_still_finishes(llada, logits):
  """A head rigged so that the mask id has the top score wherever token 50 won. LLaDA would
  "commit" the mask id (a no-op) and leave masks behind; we exclude it from x0 (it stays in the
  softmax), so the request finishes in effective_steps forwards, never returns a mask id, and
  matches the reference, which applies the same rule. Every logit variant must agree."""
  model = R.rigged_copy(llada, {MASK: (50, 1.2)})
  sp = SamplingParams(gen_length=12, block_length=4, steps=6, stop_on_eos=False)
  ref = reference(model, PA, sp)
  assert ref.mask_excluded, "the rig must make the mask id win somewhere, else this tests nothing"
  llm = R.make_llm(model, logits=logits, chunk_rows=2, vocab_tile=48)
  rid = llm.add_request(PA, sp)
  finished = []
  for _ in range(sp.effective_steps + 4):  # a cap instead of generate(), which would hang
    finished += llm.step()
    if finished:
      break
  if not finished:
    llm.abort(rid)
    llm.step()
  assert finished, f"not finished after {sp.effective_steps + 4} forwards (hangs)"
  out = finished[0]
  assert MASK not in out.token_ids and out.nfe == sp.effective_steps
  assert out.token_ids == ref.tokens, f"{logits}: {out.token_ids} vs reference {ref.tokens}"
  static = generate_static(llm, [PA], sp)[0]  # the dense path applies the same rule
  assert static.token_ids == ref.tokens
