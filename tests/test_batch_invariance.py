"""Batch invariance: a request decodes to the same tokens alone and inside any batch.

CPU float32, tiny random LLaDA and Dream models (``decoding_reference.tiny_model``). A request is
run alone, then inside a batch of requests with other prompt lengths, generation lengths, block
lengths, temperatures, seeds, rules and confidence kinds (right-padded canvases; with a long
neighbour the canvas bucket doubles, so the request is padded further), at several batch
positions. Tokens, per-step traces, nfe and finish reason must be identical, at T = 0 and T > 0
(the noise is a pure function of (seed, step, position, token)). The alone run is also checked
against the numpy reference, so invariance is not satisfied by a consistently wrong answer.

Compile economy: the neighbours all take the same number of forwards (8), so each batch keeps one
row bucket; the engines share compiled steps with test_decoding_golden.py in one pytest run.
"""

from __future__ import annotations

import pytest

import decoding_reference as R
from dllm_jax.config import SamplingParams
from dllm_jax.testing.static_decoder import generate_static

MASK, EOS, EOT = R.MASK, R.EOS, R.EOT

NEIGHBOURS = [  # every one takes 8 forwards
    ([5, 6, 7], SamplingParams(gen_length=16, block_length=8, steps=8, temperature=0.9, seed=3,
                               confidence="random", stop_on_eos=False)),
    ([11] * 10, SamplingParams(gen_length=8, block_length=4, steps=8, stop_on_eos=False)),
    ([20, 21], SamplingParams(gen_length=16, block_length=4, steps=8, temperature=1.2, seed=77,
                              stop_on_eos=False)),
]
LONG = ([(7 * i) % 60 for i in range(30)],  # 30 + 16 > 32: the canvas bucket becomes 64
        SamplingParams(gen_length=16, block_length=8, steps=8, stop_on_eos=False))

TARGETS = {
    "llada": [
        ("greedy", [3, 17, 29, 5], SamplingParams(gen_length=12, block_length=4, steps=6,
                                                  stop_on_eos=False)),
        ("sampled", [8, 9], SamplingParams(gen_length=16, block_length=8, steps=8,
                                           temperature=0.7, seed=12345, stop_on_eos=False)),
        ("threshold", [40, 41, 42], SamplingParams(gen_length=16, block_length=8,
                                                   rule="threshold", threshold=0.5,
                                                   temperature=0.6, seed=2024,
                                                   stop_on_eos=False)),
    ],
    "dream": [
        ("greedy", [3, 17, 29, 5], SamplingParams(gen_length=8, schedule="dream", steps=5,
                                                  stop_on_eos=False)),
        ("sampled", [8, 9], SamplingParams(gen_length=12, block_length=4, steps=6,
                                           temperature=0.8, seed=99, confidence="random",
                                           stop_on_eos=False)),
        ("sampled_eos", [40, 41, 42], SamplingParams(gen_length=16, block_length=8, steps=8,
                                                     temperature=0.5, seed=7,
                                                     stop_on_eos=True)),
    ],
}


def key(out):
  return out.token_ids, out.trace, out.nfe, out.finish_reason


@pytest.fixture(scope="module", params=["llada", "dream"])
def family(request):
  model = R.tiny_model(request.param)
  return request.param, model, R.make_llm(model), R.make_llm(model, max_refresh_rows=8)


def _alone(llm, model, prompt, sp):
  out = llm.generate([prompt], sp, return_trace=True)[0]
  ref = R.reference_for(R.logits_fn_for(model), prompt, sp, mask_id=MASK, eos_ids=(EOS, EOT),
                        eos_id=EOS)
  assert not ref.fixture_problems(), ref.fixture_problems()
  assert key(out) == (ref.tokens, ref.trace, ref.nfe, ref.finish_reason), (
      f"alone run differs from the reference: {out.token_ids} vs {ref.tokens}")
  return out


@pytest.mark.parametrize("which", [0, 1, 2])
def test_alone_equals_in_batch_any_position(family, which):
  name, model, serial, batched = family
  label, prompt, sp = TARGETS[name][which]
  alone = _alone(serial, model, prompt, sp)
  for pos in (0, 1, 3):
    others = list(NEIGHBOURS)
    batch = others[:pos] + [(prompt, sp)] + others[pos:]
    outs = batched.generate([p for p, _ in batch], [s for _, s in batch], return_trace=True)
    got = outs[pos]
    assert got.prompt_token_ids == prompt
    assert key(got) == key(alone), (
        f"{name}/{label} at batch position {pos}: {got.token_ids} (nfe {got.nfe}) vs alone "
        f"{alone.token_ids} (nfe {alone.nfe})")
  if name == "dream" and label == "sampled_eos":
    assert alone.finish_reason == "eos"


@pytest.mark.parametrize("which", [0, 1])
def test_padding_to_a_longer_canvas(family, which):
  """A much longer neighbour doubles the canvas bucket: the request's rows are padded further
  (masked keys) and must still decode identically."""
  name, model, serial, batched = family
  label, prompt, sp = TARGETS[name][which]
  alone = serial.generate([prompt], sp, return_trace=True)[0]
  batch = [NEIGHBOURS[0], LONG, (prompt, sp), NEIGHBOURS[2]]
  outs = batched.generate([p for p, _ in batch], [s for _, s in batch], return_trace=True)
  assert len(LONG[0]) + LONG[1].gen_length > 32
  assert key(outs[2]) == key(alone), f"{name}/{label}: {outs[2].token_ids} vs {alone.token_ids}"


def test_static_path_batch_invariance():
  """The dense static path (``generate_static``: pow2 rows, canvas rounded up to 32) as well."""
  model = R.tiny_model("llada")
  llm = R.make_llm(model)
  _, prompt, sp = TARGETS["llada"][1]
  alone = generate_static(llm, [prompt], sp, return_trace=True)[0]
  batch = [NEIGHBOURS[0], LONG, (prompt, sp)]
  outs = generate_static(llm, [p for p, _ in batch], [s for _, s in batch], return_trace=True)
  assert key(outs[2]) == key(alone)
  assert key(alone) == key(_alone(llm, model, prompt, sp))
