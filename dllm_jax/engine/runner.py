"""The jitted step: one fused forward + candidate decoding per engine step, one executable per
shape bucket of the grid (dllm_jax/engine/grid.py).

The host builds a :class:`StepInputs` of small int/float arrays; the device runs the fused
forward over the flat tokens (Refresh and Reuse rows together, layers under ``lax.scan``), the
decode head over the real candidates only, each row's commit rule, and hands back (x0, commit)
— [R, C] each. Nothing [rows x vocab]-sized leaves the decode head.

Executables are compiled ahead of time (``jit(...).lower(...).compile()``) per bucket, so a warm
engine never traces or compiles again; ``compile_count`` counts every compilation (at trace
time), ``executables`` holds them. The step always runs under ``shard_map`` on a 1-D mesh (one
device unless tensor parallel), so the same local program serves tp = 1 and tp > 1
(dllm_jax/parallel.py). The KV pool is donated and updated in place.
"""

from __future__ import annotations

import dataclasses
import threading

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from dllm_jax import parallel
from dllm_jax.cache.page_pool import SparseCache
from dllm_jax.engine import executable_store
from dllm_jax.engine.batch import StepInputs
from dllm_jax.sampling.decode import DecodeStatic, decode_and_commit
from dllm_jax.model.fused import SparseStatic, flat_forward
from dllm_jax.model.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class StepStatic:
  """Everything compile-time about one bucket's step."""

  sparse: SparseStatic
  decode: DecodeStatic


class Runner:
  """Owns the step executables of one model; counts compilations."""

  def __init__(self, model: Transformer, mesh=None):
    self.mesh = mesh if mesh is not None else parallel.make_mesh(1)
    self.tp = self.mesh.shape[parallel.AXIS]
    self.layout = parallel.layout_for(model.cfg, self.tp)
    self.vocab_size = model.cfg.vocab_size
    self.graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    pure = parallel.pad_vocab(parallel.expand_kv_heads(pure, model.cfg,
                                                       self.layout.kv_replication),
                              self.layout.vocab_size)
    specs = parallel.param_specs(pure)
    self.params = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(self.params, parallel.shard_params(pure, self.mesh))
    self.param_specs = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(self.param_specs, specs)
    # (Layout, StepStatic) -> compiled step. Keyed by the full static description, so engines
    # with different configs may share one Runner (tests do) without mixing executables.
    self.executables: dict[tuple, object] = {}
    self._lock = threading.Lock()
    self.compile_count = 0

  @staticmethod
  def cache_specs() -> SparseCache:
    a = parallel.AXIS
    return SparseCache(k=P(None, a), v=P(None, a), page_table=P(None, None, a),
                       kv_len=P(None, None, a))

  def shard_cache(self, cache: SparseCache) -> SparseCache:
    return jax.tree.map(lambda x, s: parallel.put(x, self.mesh, s), cache, self.cache_specs())

  def _input_specs(self, inputs: StepInputs):
    specs = jax.tree.map(lambda _: P(), inputs)
    if inputs.select is not None:
      specs = specs.replace(select=specs.select.replace(reserved=P(None, parallel.AXIS)))
    return specs

  def jitted(self, static: StepStatic, inputs: StepInputs):
    """The jitted (not yet compiled) step for inputs of this structure."""
    graphdef, axis, tp = self.graphdef, parallel.AXIS, self.tp

    def local(params, cache, inp: StepInputs):
      model = nnx.merge(graphdef, params)
      hidden, cache = flat_forward(model, inp.flat, inp.refresh, inp.reuse, cache, inp.select,
                                   static.sparse, axis=axis)
      x0, commit = decode_and_commit(hidden, model.lm_head.kernel[...], inp.cand,
                                     static.decode, axis=axis if tp > 1 else None)
      return cache, x0, commit

    mapped = jax.shard_map(local, mesh=self.mesh,
                           in_specs=(self.param_specs, self.cache_specs(),
                                     self._input_specs(inputs)),
                           out_specs=(self.cache_specs(), P(), P()), check_vma=False)

    def fn(params, cache, inp):
      with self._lock:
        self.compile_count += 1  # runs at trace time only: one per compiled bucket
      return mapped(params, cache, inp)

    return jax.jit(fn, donate_argnums=(1,))

  def compile(self, key: tuple, static: StepStatic, cache, inputs: StepInputs):
    """Compile (ahead of time) and keep the executable of one bucket; returns it.
    ``key``: (Layout, StepStatic) of the bucket. With JAX's persistent cache on, the
    executable is loaded from / saved to the executable store (no tracing on a hit)."""
    with self._lock:
      exe = self.executables.get(key)
    if exe is None:
      inputs = self._global(inputs)
      directory = executable_store.store_dir()
      digest = directory and executable_store.key_of(key, self.params, cache, inputs)
      exe = directory and executable_store.load(directory, digest)
      if not exe:
        exe, fresh = executable_store.compile_fresh(
            lambda: self.jitted(static, inputs).lower(self.params, cache, inputs).compile())
        if directory and fresh:
          executable_store.save(directory, digest, exe)
      with self._lock:
        exe = self.executables.setdefault(key, exe)
    return exe

  def compiled_text(self, key: tuple, static: StepStatic, cache, inputs: StepInputs) -> str:
    """Optimised HLO of one bucket's step (to inspect its collectives)."""
    return self.compile(key, static, cache, inputs).as_text()

  def _global(self, inputs: StepInputs) -> StepInputs:
    if jax.process_count() > 1:  # multi-controller: every input must be a global array
      return jax.tree.map(lambda x, s: parallel.put(x, self.mesh, s), inputs,
                          self._input_specs(inputs))
    return inputs

  def step(self, cache, inputs: StepInputs, key: tuple, static: StepStatic):
    """Run one step: (new cache, x0 [R, C], commit [R, C]). Compiles the bucket if needed."""
    exe = self.compile(key, static, cache, inputs)
    return exe(self.params, cache, self._global(inputs))
