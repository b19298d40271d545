"""SamplingParams: validation messages, defaults, generation_config defaults, effective steps."""

from __future__ import annotations

import dataclasses

import pytest

from dllm_jax.config import SamplingParams


# Defaults -----------------------------------------------------------------------------------------

def test_defaults():
  sp = SamplingParams()
  assert sp.gen_length == 128
  assert sp.steps == 128  # steps = gen_length
  assert sp.block_length == 32
  assert sp.temperature == 0.0
  assert sp.confidence == "low_confidence"
  assert sp.rule == "fixed"
  assert sp.threshold == 0.9
  assert sp.factor == 1.0
  assert sp.schedule == "llada"
  assert sp.seed == 0
  assert sp.stop_on_eos is True
  assert sp.num_blocks == 4 and sp.steps_per_block == 32 and sp.effective_steps == 128
  assert isinstance(sp.temperature, float) and isinstance(sp.threshold, float)


def test_steps_default_follows_gen_length():
  assert SamplingParams(gen_length=64).steps == 64
  assert SamplingParams(gen_length=64, steps=16).steps == 16


def test_unset_block_length_follows_short_generations_and_dream():
  assert SamplingParams(gen_length=16).block_length == 16       # never longer than G
  assert SamplingParams(gen_length=64, schedule="dream").block_length == 64  # block-less
  assert SamplingParams(gen_length=64).block_length == 32


def test_frozen_and_replace():
  sp = SamplingParams(gen_length=16, block_length=8, steps=8)
  with pytest.raises(dataclasses.FrozenInstanceError):
    sp.steps = 4
  sp2 = sp.replace(temperature=0.5, seed=3)
  assert (sp2.gen_length, sp2.block_length, sp2.steps, sp2.temperature, sp2.seed) == (
      16, 8, 8, 0.5, 3)
  assert sp.temperature == 0.0


# effective steps ------------------------------------------------------------------------------------

@pytest.mark.parametrize("gen,block,steps,eff", [
    (16, 8, 32, 16), (16, 4, 20, 16), (8, 8, 9, 8), (16, 8, 16, 16), (16, 8, 8, 8),
    (12, 4, 6, 6),
])
def test_effective_steps_llada(gen, block, steps, eff):
  sp = SamplingParams(gen_length=gen, block_length=block, steps=steps)
  assert sp.steps == steps  # what the caller asked for is kept
  assert sp.effective_steps == eff
  assert sp.steps_per_block == eff // (gen // block)


def test_effective_steps_dream_keeps_every_step():
  sp = SamplingParams(gen_length=8, schedule="dream", steps=12)
  assert sp.effective_steps == 12


# Validation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,pattern", [
    (dict(steps=0), r"steps: expected an integer >= 1, got 0"),
    (dict(steps=-3), r"steps: expected an integer >= 1"),
    (dict(gen_length=0), r"gen_length: expected an integer >= 1"),
    (dict(block_length=0), r"block_length: expected an integer >= 1"),
    (dict(seed=-1), r"seed: expected an integer >= 0"),
    (dict(seed=2**32), r"seed: expected an integer in \[0, 2\*\*32\)"),
    (dict(temperature=-0.1), r"temperature: must be >= 0"),
    (dict(threshold=0.0), r"threshold: must be in \(0, 1\]"),
    (dict(threshold=1.5), r"threshold: must be in \(0, 1\]"),
    (dict(threshold=-0.2), r"threshold: must be in \(0, 1\]"),
    (dict(factor=0.0), r"factor: must be > 0"),
    (dict(confidence="topk"), r"confidence: expected one of .*low_confidence.*got 'topk'"),
    (dict(rule="greedy"), r"rule: expected one of .*fixed.*threshold.*factor.*got 'greedy'"),
    (dict(schedule="cosine"), r"schedule: expected one of .*llada.*dream.*got 'cosine'"),
])
def test_invalid_values(kw, pattern):
  with pytest.raises(ValueError, match=pattern):
    SamplingParams(**kw)


def test_threshold_one_is_allowed():
  assert SamplingParams(threshold=1.0, rule="threshold").threshold == 1.0


def test_gen_length_not_a_multiple_of_block_length_suggests_a_fix():
  with pytest.raises(ValueError) as e:
    SamplingParams(gen_length=100, block_length=32)
  msg = str(e.value)
  assert "gen_length (100) must be a multiple of block_length (32)" in msg
  assert "block_length=" in msg and "gen_length=128" in msg  # next multiple of 32
  suggested = int(msg.split("block_length=")[1].split()[0])
  assert 100 % suggested == 0  # the suggested block length is valid
  SamplingParams(gen_length=100, block_length=suggested, steps=100)


def test_steps_not_a_multiple_of_blocks_for_fixed_rule():
  with pytest.raises(ValueError) as e:
    SamplingParams(gen_length=64, block_length=16, steps=30)
  msg = str(e.value)
  assert "steps (30) must be a multiple of the number of blocks" in msg and "4" in msg
  suggested = int(msg.split("steps=")[1].split()[0])
  SamplingParams(gen_length=64, block_length=16, steps=suggested)
  # the threshold / factor rules do not use the fixed schedule: any steps is fine
  assert SamplingParams(gen_length=64, block_length=16, steps=30, rule="threshold").steps == 30
  assert SamplingParams(gen_length=64, block_length=16, steps=30, rule="factor").steps == 30


def test_dream_schedule_needs_block_length_equal_gen_length():
  with pytest.raises(ValueError, match=r"block-less.*block_length \(16\) must equal gen_length "
                                       r"\(64\).*block_length=64"):
    SamplingParams(gen_length=64, block_length=16, schedule="dream")
  sp = SamplingParams(gen_length=64, block_length=64, schedule="dream", steps=7)
  assert sp.steps == 7  # no blocks: any number of steps


@pytest.mark.parametrize("kw,field", [
    (dict(steps=2.0), "steps"),
    (dict(steps="8"), "steps"),
    (dict(gen_length=True), "gen_length"),
    (dict(block_length=8.5), "block_length"),
    (dict(seed=1.5), "seed"),
    (dict(temperature="hot"), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(threshold="0.9"), "threshold"),
    (dict(factor=None, threshold=[0.5]), "threshold"),
    (dict(stop_on_eos="yes"), "stop_on_eos"),
    (dict(stop_on_eos=1), "stop_on_eos"),
    (dict(confidence=0), "confidence"),
    (dict(rule=None, schedule=1), "schedule"),
])
def test_bad_types_name_the_field(kw, field):
  with pytest.raises(ValueError, match=rf"^{field}:"):
    SamplingParams(**kw)


def test_int_temperature_is_accepted_as_float():
  sp = SamplingParams(temperature=1, threshold=1, factor=2)
  assert (sp.temperature, sp.threshold, sp.factor) == (1.0, 1.0, 2.0)
  assert all(isinstance(x, float) for x in (sp.temperature, sp.threshold, sp.factor))


# with_defaults (generation_config.json) ---------------------------------------------------------------

GC = {"gen_length": 64, "steps": 32, "block_length": 16, "temperature": 0.7,
      "confidence": "margin", "rule": "threshold", "threshold": 0.8, "factor": 2.0,
      "schedule": "llada", "seed": 5, "stop_on_eos": False,
      # HF / Dream keys that are not ours: ignored
      "eps": 1e-3, "alg": "entropy", "top_p": None, "max_new_tokens": 256}


def test_with_defaults_fills_everything_unset():
  sp = SamplingParams().with_defaults(GC)
  assert (sp.gen_length, sp.steps, sp.block_length) == (64, 32, 16)
  assert (sp.temperature, sp.confidence, sp.rule, sp.threshold, sp.factor) == (
      0.7, "margin", "threshold", 0.8, 2.0)
  assert (sp.schedule, sp.seed, sp.stop_on_eos) == ("llada", 5, False)


def test_with_defaults_keeps_what_the_caller_set():
  sp = SamplingParams(temperature=0.0, seed=11, confidence="random", stop_on_eos=True,
                      threshold=0.95).with_defaults(GC)
  assert sp.temperature == 0.0 and sp.seed == 11 and sp.confidence == "random"
  assert sp.stop_on_eos is True and sp.threshold == 0.95
  # the unset ones come from the config
  assert (sp.gen_length, sp.steps, sp.block_length, sp.rule, sp.factor) == (
      64, 32, 16, "threshold", 2.0)


def test_with_defaults_caller_gen_length_implies_its_own_steps_and_block():
  sp = SamplingParams(gen_length=8).with_defaults(GC)
  assert sp.gen_length == 8 and sp.steps == 8 and sp.block_length == 8
  assert sp.temperature == 0.7  # other fields still filled


def test_with_defaults_none_values_and_empty_config():
  sp = SamplingParams(steps=None).with_defaults({"temperature": None, "steps": None})
  assert sp == SamplingParams()
  assert SamplingParams(gen_length=32, steps=8, block_length=8).with_defaults({}) == \
      SamplingParams(gen_length=32, steps=8, block_length=8)


def test_with_defaults_is_repeatable():
  """Filling twice (e.g. engine defaults then model defaults) still only touches unset fields."""
  sp = SamplingParams(temperature=0.2).with_defaults({"seed": 3}).with_defaults(
      {"seed": 4, "temperature": 0.9, "factor": 3.0})
  assert sp.temperature == 0.2 and sp.seed == 4 and sp.factor == 3.0


def test_with_defaults_validates_the_result():
  with pytest.raises(ValueError, match="threshold"):
    SamplingParams().with_defaults({"threshold": 2.0})
  with pytest.raises(ValueError, match="multiple of block_length"):
    SamplingParams().with_defaults({"gen_length": 100})
