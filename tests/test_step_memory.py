"""A step moves and keeps only what it reads: no pool-sized traffic (issue: GPU step anatomy).

The KV pool ``k, v [L, P, S, D]`` is read in place by the Reuse kernel (the whole buffer and a
traced layer index go to the custom call) and written in place by Select's scatter; nothing
slices a per-layer plane out of it. A plane sliced for a custom call is a copy XLA must make
every step (measured on an H200: 58 ms a step at 88k pages, and two pools alive): step time and
memory would then grow with the pool.

(a) The whole jitted step, forced onto the Pallas kernel (``attn_impl="pallas"``) and the XLA
    Refresh path, lowered for the ``cuda`` platform on this CPU: it holds a Triton custom call,
    no op anywhere in the module (private functions included) takes a pool-typed value and
    returns a smaller slice of it except Select's scatter, and the pool arguments are donated.
    The old ``pool[layer]`` operand (a mutation of the Reuse attention) fails the same check.
(b) ``attn_impl="callback"`` hands the kernel's exact operand list to an opaque
    ``jax.pure_callback`` (as the GPU custom call is opaque): the compiled CPU step's
    temporaries are the same at 64 and 4096 pages; the sliced mutation's grow with the pool.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import jax.numpy as jnp
import pytest

from dllm_jax.config import EngineConfig, ModelConfig
from dllm_jax.engine.batch import dummy_step
from dllm_jax.engine.engine import LLM
from dllm_jax.engine.grid import Shapes
from dllm_jax.model import fused
from dllm_jax.model.transformer import init_model
from pallas_kernels.head_sparse_attention import (head_sparse_attention, pack_queries,
                                                  unpack_outputs)

LLADA = dict(model_type="llada", d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
             mlp_hidden_size=96, vocab_size=64, embedding_size=64, max_sequence_length=128,
             rope_theta=5e5, rms_norm_eps=1e-5, mask_token_id=63, eos_token_id=62)
SHAPES = Shapes(64, 32)  # a bucket with a Refresh (+ Select) part and a Reuse part
ALLOWED = {"stablehlo.scatter", "stablehlo.custom_call", "func.call", "func.return",
           "stablehlo.return", "stablehlo.while"}


@pytest.fixture(scope="module")
def model():
  return init_model(ModelConfig.from_dict(LLADA), seed=0)


def engine(model, impl: str, pages: int):
  cfg = EngineConfig(max_running=4, token_budget=128, max_model_len=64, max_refresh_rows=2,
                     max_reuse_rows=2, num_pages=pages, page_size=16, max_block_length=16,
                     attn_impl=impl, logits="rows")
  return LLM(model, engine_config=cfg).core


def step_parts(core):
  key = core.step_key(SHAPES)
  inp = dummy_step(core.mcfg, core.layout(SHAPES), max_slots=core.pool_cfg.max_slots,
                   reserved_width=core.reserved_width)
  return key, inp


def sliced_reuse_attention(cache, layer, q, k, v, u, st):
  """The mutation: the kernel gets ``pool[layer]``, a per-layer plane sliced out of the pool."""
  q, k, v = (jnp.take(a, u.index, axis=0) for a in (q, k, v))  # the Reuse layout
  lq, hq, hkv = q.shape[1], q.shape[2], k.shape[2]
  table = cache.page_table[u.slots, layer]
  kv_len = cache.kv_len[u.slots, layer]
  out = head_sparse_attention(
      pack_queries(q, hkv), cache.k[layer], cache.v[layer], table, kv_len,
      k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), u.new_len, impl=st.attn_impl)
  return unpack_outputs(out, lq, hq)


@contextlib.contextmanager
def mutated(monkeypatch, on: bool):
  if on:
    monkeypatch.setattr(fused, "reuse_attention", sliced_reuse_attention)
  yield


def walk(op):
  yield op
  for region in op.regions:
    for block in region.blocks:
      for inner in block.operations:
        yield from walk(inner.operation)


def n_elements(t) -> int:
  return math.prod(t.shape)


def pool_slices(module, pool_type: str) -> list[str]:
  """Ops that take a pool-typed operand and return a smaller tensor (a slice of it), other
  than the allowed consumers (Select's scatter returns the pool; the kernel's custom call and
  calls into functions, which are walked too)."""
  bad = []
  pool_n = None
  for op in walk(module.operation):
    operands = [str(v.type) for v in op.operands]
    if pool_type not in operands or op.name in ALLOWED:
      continue
    for r in op.results:
      t = r.type
      if pool_n is None:
        pool_n = n_elements(next(v.type for v in op.operands if str(v.type) == pool_type))
      if hasattr(t, "shape") and n_elements(t) < pool_n:
        bad.append(f"{op.name}: {operands} -> {t}")
  return bad


def lowered_for_cuda(core):
  key, inp = step_parts(core)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    return core.runner.jitted(key[1], inp).trace(core.runner.params, core.cache, inp).lower(
        lowering_platforms=("cuda",))


def pool_type(core) -> str:
  k = core.cache.k
  return f"tensor<{'x'.join(map(str, k.shape))}x{ {'float32': 'f32', 'bfloat16': 'bf16'}[str(k.dtype)]}>"


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("mutation", [False, True], ids=["in_place", "sliced_mutation"])
def test_cuda_step_reads_the_pool_in_place(model, monkeypatch, mutation):
  core = engine(model, "pallas", 64)
  assert core.refresh_impl == "xla_rows"  # the XLA Refresh path (never cuDNN on a CPU)
  with mutated(monkeypatch, mutation):
    lowered = lowered_for_cuda(core)
  text = lowered.as_text()
  assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text
  with lowered.compiler_ir("stablehlo").context:
    bad = pool_slices(lowered.compiler_ir("stablehlo"), pool_type(core))
  if mutation:
    assert bad and any("dynamic_slice" in b for b in bad), bad
  else:
    assert not bad, bad
  # The pool (k, v, page tables, lengths) is donated: every cache argument aliases an output.
  main = next(line for line in text.splitlines() if "func.func public @main" in line)
  args = main.split(") -> ")[0].split("%arg")[1:]
  cache_args = [a for a in args if pool_type(core) in a.split("{")[0]]
  assert len(cache_args) == 2 and all("tf.aliasing_output" in a or "jax.buffer_donor" in a
                                      for a in cache_args), main[:400]


def temp_bytes(model, monkeypatch, pages: int, mutation: bool) -> int:
  core = engine(model, "callback", pages)
  key, inp = step_parts(core)
  with mutated(monkeypatch, mutation):
    exe = core.runner.jitted(key[1], inp).lower(core.runner.params, core.cache, inp).compile()
  return exe.memory_analysis().temp_size_in_bytes


def test_step_temporaries_do_not_grow_with_the_pool(model, monkeypatch):
  small, large = (temp_bytes(model, monkeypatch, p, False) for p in (64, 4096))
  assert small == large, (small, large)


def test_sliced_mutation_temporaries_grow_with_the_pool(model, monkeypatch):
  small, large = (temp_bytes(model, monkeypatch, p, True) for p in (64, 4096))
  page_plane = 16 * 16 * 4  # one page of one layer plane (S x D f32)
  assert large - small >= (4096 - 64) * page_plane, (small, large)
