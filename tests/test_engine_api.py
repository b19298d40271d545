"""The engine's public output API (engine/outputs.py, LLM.step / recover / claim) and the rule
that nothing outside ``dllm_jax/engine/`` touches an underscore name defined there.

The API tests run the bundled demo model (it has a tokenizer: text, stop strings) on CPU; the
references are independent: ``LLM.text`` (one whole decode of the ids), the same request run
without the option under test (decoding is deterministic and batch invariant), and a plain
re-scan of the canvases.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os

import numpy as np
import pytest

from dllm_jax.config import SamplingParams, SparseConfig
from dllm_jax.engine.engine import LLM
from dllm_jax.engine.outputs import GenerationOutput, OutputKind, RequestOutput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = os.path.join(ROOT, "dllm_jax", "engine")
# "Elsewhere": the package outside engine/, the kernels, the scripts and the notebooks' code.
SCANNED = ("dllm_jax", "pallas_kernels", "scripts", "notebooks")
ATTR_FUNCS = ("getattr", "setattr", "hasattr", "delattr")


# The AST rule ----------------------------------------------------------------------------------

def _private(name: str) -> bool:
  return name.startswith("_") and not name.endswith("__") and name != "_"


def defined_private_names(tree: ast.AST) -> set[str]:
  """Underscore names a module defines: functions / methods / classes, attributes assigned on
  any object (``self._x = ...``), module globals and class attributes."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
      names.add(node.attr)
  for scope in [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
    for stmt in scope.body:
      targets = (stmt.targets if isinstance(stmt, ast.Assign) else
                 [stmt.target] if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) else [])
      for t in targets:
        names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
  return {n for n in names if _private(n)}


def engine_private_names() -> set[str]:
  names = set()
  for f in sorted(os.listdir(ENGINE)):
    if f.endswith(".py"):
      with open(os.path.join(ENGINE, f), encoding="utf-8") as fh:
        names |= defined_private_names(ast.parse(fh.read()))
  return names


def _engine_imports(tree: ast.AST) -> set[str]:
  """Local names bound to something imported from dllm_jax.engine (classes one may subclass)."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dllm_jax.engine"):
      out.update(a.asname or a.name for a in node.names)
  return out


def _own_names(cls: ast.ClassDef) -> set[str]:
  """Names a class defines itself: its methods and class attributes, ``self.x = ...``."""
  names = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
  for node in ast.walk(cls):
    if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
      names.add(node.attr)
  for stmt in cls.body:
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
      for t in stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]:
        names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
  return names


def engine_private_uses(source: str, names: set[str], where: str = "<src>") -> list[str]:
  """Every access to one of ``names`` in ``source``: ``x.name`` whatever ``x`` is (aliases
  included), ``getattr(x, "name")`` and friends, ``from dllm_jax.engine... import name``. The
  one exception: ``self.name`` inside a class that defines ``name`` itself and does not derive
  from an engine class (its own attribute that happens to share the name)."""
  tree = ast.parse(source)
  engine_bases = _engine_imports(tree)
  hits = []

  def visit(node, cls):
    if isinstance(node, ast.ClassDef):
      bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", None) for b in node.bases}
      cls = None if bases & engine_bases else _own_names(node)
    if isinstance(node, ast.Attribute) and node.attr in names:
      own = (cls is not None and isinstance(node.value, ast.Name)
             and node.value.id in ("self", "cls") and node.attr in cls)
      if not own:
        hits.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id in ATTR_FUNCS and len(node.args) >= 2
          and isinstance(node.args[1], ast.Constant) and node.args[1].value in names):
      hits.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dllm_jax.engine"):
      hits.extend(f"{where}:{node.lineno}: import {a.name}" for a in node.names if a.name in names)
    for child in ast.iter_child_nodes(node):
      visit(child, cls)

  visit(tree, None)
  return hits


def _sources():
  for top in SCANNED:
    for d, _, files in os.walk(os.path.join(ROOT, top)):
      if os.path.abspath(d).startswith(ENGINE):
        continue
      for f in sorted(files):
        path = os.path.join(d, f)
        rel = os.path.relpath(path, ROOT)
        if f.endswith(".py"):
          with open(path, encoding="utf-8") as fh:
            yield rel, fh.read()
        elif f.endswith(".ipynb"):
          with open(path, encoding="utf-8") as fh:
            cells = json.load(fh)["cells"]
          code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
          # IPython magics and shell escapes are not Python.
          yield rel, "\n".join(ln for ln in code.splitlines()
                               if not ln.lstrip().startswith(("!", "%")))


def test_private_names_are_collected():
  names = engine_private_names()
  # Attributes, methods, module globals and class attributes of engine/ modules.
  assert {"_requests", "_lock", "_intake", "_drain", "_proc", "_core", "_tracks"} <= names
  assert not any(n.startswith("__") and n.endswith("__") for n in names)


def test_nothing_outside_the_engine_touches_its_private_names():
  names = engine_private_names()
  scanned, hits = 0, []
  for rel, src in _sources():
    scanned += 1
    hits += engine_private_uses(src, names, rel)
  assert scanned > 50, "the scan found too few files"
  assert not hits, "engine internals used outside dllm_jax/engine/:\n" + "\n".join(hits)


def test_the_rule_flags_accesses_aliases_included():
  names = engine_private_names()
  bad = '''
import dllm_jax.engine.core as ec
from dllm_jax.engine.core import EngineCore
from dllm_jax.engine.engine import _no_such_thing as fine
c = llm.core
c._requests.clear()
x = getattr(llm, "_proc")
ec.EngineCore._drain(c)

class Mine(EngineCore):
  def f(self):
    self._requests = {}
'''
  hits = engine_private_uses(bad, names)
  assert [h.split(": ", 1)[1] for h in hits] == [
      "c._requests", 'getattr(llm, \'_proc\')', "ec.EngineCore._drain", "self._requests"]
  assert engine_private_uses("from dllm_jax.engine.core import _step_ended\n", names)
  own = '''
import threading
class Router:
  def __init__(self):
    self._lock = threading.Lock()
  def f(self):
    with self._lock:
      return other._lock
'''
  assert [h.split(": ", 1)[1] for h in engine_private_uses(own, names)] == ["other._lock"]


# Typed outputs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm():
  return LLM()  # the bundled demo model: tokenizer, EOS / EoT, a real text


SP = SamplingParams(gen_length=32, block_length=16, steps=32, temperature=0.7, seed=11,
                    stop_on_eos=False)


@pytest.fixture(scope="module")
def reference(llm):
  """The request's finished output, run alone with no option (trace on)."""
  return llm.generate("The socket module", SP, return_trace=True)[0]


def _drain(llm, limit=200):
  outs = []
  for _ in range(limit):
    if not llm.has_unfinished():
      return outs
    outs += llm.step()
  raise AssertionError("engine did not drain")


def _idle(llm):
  core = llm.core
  assert not llm.has_unfinished() and not llm.request_ids() and not core.request_ids()
  assert core.pages.num_free == core.pages.capacity and core.num_running() == 0


def test_reference_is_a_real_text(llm, reference):
  assert isinstance(reference, GenerationOutput) and reference.finish_reason in ("eos", "length")
  assert len(reference.text) > 12 and reference.text == llm.text(reference.token_ids)


def test_stream_events_are_typed_and_add_up(llm, reference):
  plain = llm.add_request("The socket module", SP)
  rid = llm.add_request("The socket module", SP, stream=True, return_trace=True)
  outs = _drain(llm)
  assert [o.kind for o in outs if o.request_id == plain] == [OutputKind.FINISHED]
  mine = [o for o in outs if o.request_id == rid]
  assert all(isinstance(o, RequestOutput) for o in mine)
  with pytest.raises(dataclasses.FrozenInstanceError):
    mine[0].text = "x"
  final = mine[-1]
  assert final.kind is OutputKind.FINISHED and final.finished
  assert sum(o.finished for o in mine) == 1
  assert final.token_ids == reference.token_ids and final.nfe == reference.nfe
  assert final.text == reference.text and final.finish_reason == reference.finish_reason
  assert final.trace == reference.trace
  steps = [o for o in mine if o.kind is OutputKind.STEP]
  assert [o.nfe for o in steps] == list(range(1, reference.nfe + 1))  # every step, in order
  assert [o.canvas for o in steps] == reference.trace
  prefixes = [o for o in mine if o.kind is OutputKind.PREFIX]
  assert prefixes, "the committed prefix never grew before the end"
  lens = [o.prefix_len for o in prefixes]
  assert all(b > a for a, b in zip(lens, lens[1:]))  # emitted only when it grew
  for o in prefixes:
    assert o.token_ids == reference.token_ids[:o.prefix_len] and o.finish_reason is None
    assert llm.cfg.mask_token_id not in o.token_ids
  texts = [o for o in mine if o.kind in (OutputKind.PREFIX, OutputKind.FINISHED)]
  assert "".join(o.delta for o in texts) == reference.text  # deltas add up to the text
  acc = ""
  for o in texts:  # text is the concatenation so far, never retracted
    acc += o.delta
    assert o.text == acc
  assert final.metrics["arrival"] <= final.metrics["first_token"] <= final.metrics["finish"]
  _idle(llm)


def test_generate_stop_cuts_like_the_text_rule_and_frees_at_once(llm, reference):
  text = reference.text
  stop = text[len(text) // 3: len(text) // 3 + 3]
  expected = text[:text.find(stop)]
  out = llm.generate("The socket module", SP, stop=[stop, "\x00never"])[0]
  assert out.text == expected and out.finish_reason == "stop"
  assert out.nfe < reference.nfe  # it ended early ...
  _idle(llm)  # ... and its pages are free at once
  mask = llm.cfg.mask_token_id
  assert all(t == mask or t == r for t, r in zip(out.token_ids, reference.token_ids))
  assert llm.text(reference.token_ids[:out.token_ids.index(mask)]).startswith(expected)
  # The streamed form gives the same text through its deltas, and its last output says stop.
  rid = llm.add_request("The socket module", SP, stream=True, stop=stop)
  mine = [o for o in _drain(llm) if o.request_id == rid]
  assert "".join(o.delta for o in mine) == expected and mine[-1].finish_reason == "stop"
  assert not any(stop in o.text for o in mine)
  with pytest.raises(ValueError, match="stop"):
    llm.generate("x", SP, stop=[""])


def test_max_tokens_cuts_the_text(llm, reference):
  k = 9
  rid = llm.add_request("The socket module", SP, max_tokens=k)
  out = [o for o in _drain(llm) if o.request_id == rid][-1]
  assert out.token_ids == reference.token_ids  # the canvas still runs to gen_length
  eos = next((j for j, t in enumerate(reference.token_ids[:k]) if t in llm.cfg.eos_ids), None)
  assert out.text == llm.text(reference.token_ids[:k])
  assert out.num_text_tokens == (k if eos is None else eos)
  assert out.finish_reason == ("length" if eos is None else "eos")
  with pytest.raises(ValueError, match="max_tokens"):
    llm.add_request("x", SP, max_tokens=0)


def test_on_step_sees_every_canvas_as_it_happens(llm, reference):
  seen, steps_run = [], []
  core = llm.core

  def on_step(rid, canvas, finished):
    seen.append((list(canvas), finished))
    steps_run.append(core.stats.steps)

  llm.add_request("The socket module", SP, on_step=on_step)
  before = core.stats.steps
  _drain(llm)
  assert [c for c, _ in seen] == reference.trace
  assert [f for _, f in seen] == [False] * (len(seen) - 1) + [True]
  assert steps_run == list(range(before + 1, before + len(seen) + 1))  # during its own step


# Failure recovery ------------------------------------------------------------------------------

class _Boom(RuntimeError):
  pass


def test_recover_ends_the_failed_step_and_rebuilds_a_consumed_pool(llm, reference):
  core = llm.core
  real = core.runner.step
  before = _leaves(core.cache)

  def consumed(cache, *a):  # the device call took (donated) the pool, then failed
    for x in _leaves(cache):
      x.delete()
    raise _Boom("injected")

  sparse = SparseConfig(keep_ratio=0.5)
  ref_sparse = llm.generate("The socket module", SP, sparse)[0]  # KV pool in use
  rids = [llm.add_request("The socket module", SP, sparse),
          llm.add_request("The socket module", SP, stream=True)]
  llm.step()
  llm.step()
  core.runner.step = consumed
  try:
    with pytest.raises(_Boom):
      llm.step()
  finally:
    del core.runner.step  # the instance attribute; the class method again
  assert core.runner.step == real
  outs = llm.recover(_Boom("injected"))
  assert sorted(o.request_id for o in outs) == sorted(rids)
  assert all(o.kind is OutputKind.ERROR and o.finish_reason == "error" for o in outs)
  assert all("injected" in o.error for o in outs)
  _idle(llm)
  after = _leaves(core.cache)
  assert not any(x.is_deleted() for x in after)
  assert [(x.shape, x.dtype) for x in after] == [(x.shape, x.dtype) for x in before]
  assert all(x.sharding.is_equivalent_to(y.sharding, x.ndim) for x, y in zip(after, before))
  again = llm.generate(["The socket module"] * 2, SP, [sparse, None])  # the rebuilt pool works
  assert again[0].token_ids == ref_sparse.token_ids
  assert again[1].token_ids == reference.token_ids


def test_recover_delivers_what_finished_before_the_failure(llm, reference):
  short = SamplingParams(gen_length=16, block_length=16, steps=16, temperature=0.7, seed=11,
                         stop_on_eos=False)
  ref_short = llm.generate("The socket module", short)[0]
  core = llm.core
  a = llm.add_request("The socket module", short)
  b = llm.add_request("The socket module", SP)
  for _ in range(short.steps - 1):
    assert not [o for o in llm.step() if o.finished]

  class Fails(dict):  # the step's bookkeeping after the host update fails once
    def __setitem__(self, k, v):
      raise _Boom("after the update")

  counts = core.stats.shape_counts
  core.stats.shape_counts = Fails(counts)
  try:
    with pytest.raises(_Boom):
      llm.step()  # a finishes in it, b goes on
  finally:
    core.stats.shape_counts = counts
  outs = {o.request_id: o for o in llm.recover("step failed")}
  assert outs[a].kind is OutputKind.FINISHED and outs[a].token_ids == ref_short.token_ids
  assert outs[a].text == ref_short.text
  assert outs[b].kind is OutputKind.ERROR and outs[b].error == "step failed"
  _idle(llm)


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


# Claiming the engine ---------------------------------------------------------------------------

class _Owner:
  def __init__(self, alive=True):
    self.alive = alive


def test_claim_is_exclusive_while_the_owner_lives(llm):
  a, b = _Owner(), _Owner()
  llm.claim(a)
  llm.claim(a)  # again: fine
  with pytest.raises(RuntimeError, match="already served"):
    llm.claim(b)
  llm.unclaim(b)  # not the owner: nothing happens
  with pytest.raises(RuntimeError):
    llm.claim(b)
  a.alive = False  # a stopped owner's claim lapses
  llm.claim(b)
  llm.unclaim(b)
  llm.claim(a)
  llm.unclaim(a)


def test_step_returns_outputs_and_keeps_nothing(llm):
  rng = np.random.default_rng(0)
  prompts = [[int(t) for t in rng.integers(10, 200, 5)] for _ in range(3)]
  rids = [llm.add_request(p, SP) for p in prompts]
  outs = _drain(llm)
  assert sorted(o.request_id for o in outs) == sorted(rids) and all(o.finished for o in outs)
  assert all(o.prompt_token_ids == p for o, p in zip(sorted(outs, key=lambda o: rids.index(
      o.request_id)), prompts))
  _idle(llm)
