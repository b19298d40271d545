"""The continuous-batching engine core: intake, scheduler, one fused jitted step, host update.

``EngineCore.step()`` = schedule -> build bucketed inputs -> one device call -> read back the
(x0, commit) arrays of the scheduled rows (the only device->host transfer of the step) -> commit
on the host canvases, EOS rule, streaming callbacks, free finished requests at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from typing import Callable

import jax
import jax.numpy as jnp

from dllm_jax.cache.page_pool import (PoolConfig, ShardedPageAllocator, SlotAllocator,
                                      init_cache, max_keep, pages_needed)
from dllm_jax.cache.sparse_state import Phase, SparseConfig
from dllm_jax.config import EngineConfig, SamplingParams
from dllm_jax.decoding.dense import LogitPlan
from dllm_jax.engine import memory
from dllm_jax.engine.batch import Shapes, build_step, dummy_step, shapes_for
from dllm_jax.engine.request import Request, Status
from dllm_jax.engine.runner import Runner, StepStatic, bucket_sizes, pow2_at_least
from dllm_jax.engine.scheduler import Scheduler
from dllm_jax.model.fused import SparseStatic
from dllm_jax.model.transformer import Transformer
from dllm_jax.parallel import to_host


class QueueFull(RuntimeError):
  """The waiting queue is at its limit (the server answers 429)."""


@dataclasses.dataclass
class StepStats:
  """Accumulated engine telemetry."""

  steps: int = 0
  refresh_rows: int = 0
  select_rows: int = 0
  reuse_rows: int = 0
  committed_tokens: int = 0
  host_seconds: float = 0.0
  device_seconds: float = 0.0
  transfers: int = 0
  phase_mix: list = dataclasses.field(default_factory=list)  # (refresh, reuse), recent steps

  HISTORY = 100_000  # phase_mix keeps at most this many recent steps (a server runs forever)


class EngineCore:

  def __init__(self, model: Transformer, cfg: EngineConfig, devices=None):
    from dllm_jax import parallel

    self.model = model
    self.mcfg = model.cfg
    self.cfg = cfg
    self.max_len = min(cfg.max_model_len or self.mcfg.max_position, self.mcfg.max_position)
    self.max_len_bucket = pow2_at_least(self.max_len, 32)
    self.dtype = model.dtype
    self.runner = Runner(model, parallel.make_mesh(cfg.tp, devices))
    self.kv_heads = self.runner.layout.kv_heads_per_device
    self.pool_cfg = self._pool_config()
    self.cache = self.runner.shard_cache(init_cache(self.pool_cfg))
    self.pages = ShardedPageAllocator(self.pool_cfg.num_pages, cfg.tp)
    self.slots = SlotAllocator(self.pool_cfg.max_slots)
    self.scheduler = Scheduler(cfg, self.mcfg, self.pages, self.slots, self._fits_activation,
                               kv_heads=self.kv_heads)
    self.stats = StepStats()
    self._ids = itertools.count()
    self._lock = threading.Lock()
    self._intake: deque[Request] = deque()
    self._requests: dict[str, Request] = {}
    self._aborts: set[str] = set()
    self._plans: dict[tuple, LogitPlan] = {}

  # Sizing -------------------------------------------------------------------------------------
  def _pool_config(self) -> PoolConfig:
    m, cfg = self.mcfg, self.cfg
    mp = -(-self.max_len // cfg.page_size)
    per_request = pages_needed(max_keep(self.max_len, 0, self.max_len, 1, 1.0), self.kv_heads,
                               cfg.page_size, adaptive=True)
    self.reserved_per_device = pow2_at_least(max(per_request, 1))
    self.reserved_width = cfg.tp * self.reserved_per_device
    base = PoolConfig(num_pages=2, page_size=cfg.page_size, num_layers=m.num_layers,
                      num_kv_heads=self.runner.layout.num_kv_heads, head_dim=m.head_dim,
                      max_slots=cfg.max_running, max_pages_per_head=mp,
                      dtype=jnp.dtype(self.dtype).name, shards=cfg.tp)
    if cfg.num_pages is not None:
      n = cfg.num_pages
    elif cfg.memory_budget_bytes is not None:
      n = memory.pages_for_budget(cfg.memory_budget_bytes, self.mcfg, cfg, base, self.dtype,
                                  self.max_len_bucket)
      if n < 2:
        raise ValueError(
            f"memory_budget_bytes={cfg.memory_budget_bytes:,} leaves no room for a KV pool after "
            f"weights and activations; raise it or lower max_running / token_budget")
    else:
      # Enough for every running request at full length, capped at 512 MiB.
      n = min(1 + cfg.max_running * per_request, max(2, (512 << 20) // base.page_bytes))
    return dataclasses.replace(base, num_pages=int(n))

  def _logit_plan(self, rows: int) -> LogitPlan:
    key = rows
    plan = self._plans.get(key)
    if plan is None:
      plan = self._plans[key] = memory.logit_plan(self.cfg, self.mcfg, rows, self.dtype)
    return plan

  def step_activation_bytes(self, shapes: Shapes) -> int:
    rows = (shapes.refresh_rows + shapes.reuse_rows) * shapes.cand
    return memory.step_activation_bytes(self.mcfg, shapes, self._logit_plan(rows), self.dtype)

  def _fits_activation(self, refresh: list[Request], reuse: list[Request]) -> bool:
    budget = self.cfg.activation_budget_bytes
    if budget is None:
      return True
    return self.step_activation_bytes(shapes_for(refresh, reuse, self.mcfg,
                                                 self.max_len_bucket)) <= budget

  # Intake -------------------------------------------------------------------------------------
  def validate(self, prompt_ids: list[int], sp: SamplingParams, sparse: SparseConfig | None):
    """Reject at once what could never run (never queue a request that would livelock)."""
    self._check(Request("probe", list(prompt_ids), sp, sparse, self.mcfg.mask_token_id))

  def _check(self, req: Request) -> None:
    prompt_ids, sp = req.prompt_ids, req.params
    n = len(prompt_ids) + sp.gen_length
    if n > self.max_len:
      raise ValueError(f"prompt ({len(prompt_ids)} tokens) + gen_length ({sp.gen_length}) = {n} "
                       f"exceeds max_model_len {self.max_len}")
    if sp.block_length > self.cfg.max_block_length:
      raise ValueError(f"block_length {sp.block_length} exceeds the engine's max_block_length "
                       f"{self.cfg.max_block_length} (Dream's schedule needs block = gen_length)")
    if n > self.cfg.token_budget:
      raise ValueError(f"a Refresh of this request feeds {n} tokens, over the engine's token "
                       f"budget {self.cfg.token_budget}")
    if not self._fits_activation([req], []):
      raise ValueError(f"a Refresh of {n} tokens exceeds the activation budget "
                       f"{self.cfg.activation_budget_bytes:,} bytes")
    need = req.pages_needed(self.kv_heads, self.cfg.page_size)
    if need > self.pages.capacity or need > self.reserved_per_device:
      raise ValueError(f"this sparse request needs {need} KV pages; the pool holds "
                       f"{self.pages.capacity}")

  def add(self, prompt_ids: list[int], sp: SamplingParams, sparse: SparseConfig | None = None,
          *, request_id: str | None = None, callback: Callable | None = None,
          prompt: str | None = None) -> str:
    """Queue a request (thread-safe). Raises ValueError for one that can never run and
    QueueFull when the waiting queue is at its limit."""
    req = Request("", list(prompt_ids), sp, sparse, self.mcfg.mask_token_id, callback=callback,
                  prompt=prompt)
    self._check(req)
    with self._lock:
      rid = request_id if request_id is not None else f"req-{next(self._ids)}"
      if rid in self._requests:
        raise ValueError(f"request id {rid!r} is already in use")
      if len(self._intake) + len(self.scheduler.waiting) >= self.cfg.max_waiting:
        raise QueueFull(f"waiting queue is full ({self.cfg.max_waiting} requests)")
      req.request_id = rid
      self._requests[rid] = req
      self._intake.append(req)
    return rid

  def abort(self, request_id: str) -> bool:
    """Cancel a request; its pages return to the pool at the next step boundary."""
    with self._lock:
      if request_id not in self._requests:
        return False
      self._aborts.add(request_id)
      return True

  def has_unfinished(self) -> bool:
    with self._lock:
      return bool(self._intake or self.scheduler.waiting or self.scheduler.running)

  def num_waiting(self) -> int:
    return len(self._intake) + len(self.scheduler.waiting)

  def num_running(self) -> int:
    return len(self.scheduler.running)

  def _drain(self) -> list[Request]:
    done = []
    with self._lock:
      while self._intake:
        self.scheduler.waiting.append(self._intake.popleft())
      for rid in list(self._aborts):
        req = self._requests.pop(rid, None)
        if req is None:
          continue
        if req in self.scheduler.waiting:
          self.scheduler.waiting.remove(req)
        self.scheduler.release(req)
        req.status, req.finish_reason = Status.ABORTED, "abort"
        req.finish_time = time.perf_counter()
        done.append(req)
      self._aborts.clear()
    return done

  # Stepping -----------------------------------------------------------------------------------
  def _static(self, shapes: Shapes, want_margin: bool, want_entropy: bool) -> StepStatic:
    rows = (shapes.refresh_rows + shapes.reuse_rows) * shapes.cand
    return StepStatic(
        plan=self._logit_plan(rows),
        sparse=SparseStatic(block_width=shapes.cand,
                            select_width=self.pool_cfg.max_pages_per_head * self.cfg.page_size,
                            attn_impl=self.cfg.attn_impl),
        want_margin=want_margin, want_entropy=want_entropy)

  def warmup(self, lengths=(), block_lengths=(32,), *, margin: bool = False,
             entropy: bool = False) -> int:
    """Precompile the step for every bucket a workload with these canvas lengths and block
    lengths can reach (all row buckets up to the caps). Returns the number of new compiles."""
    before = self.runner.compile_count
    ns = sorted({min(pow2_at_least(n, 32), self.max_len_bucket) for n in lengths} or
                {self.max_len_bucket})
    cs = sorted({pow2_at_least(b, 8) for b in block_lengths})
    brs = [0] + bucket_sizes(1, self.cfg.max_refresh_rows)
    bus = [0] + bucket_sizes(1, self.cfg.max_reuse_rows)
    q_extra = 1 if self.mcfg.shifted_prediction else 0
    for c in cs:
      for br in brs:
        for n in (ns if br else [0]):
          for bu in bus:
            if br == 0 and bu == 0:
              continue
            shapes = Shapes(br, n, bu, c + q_extra, c)
            inp = dummy_step(self.mcfg, shapes, max_slots=self.pool_cfg.max_slots,
                             reserved_width=self.reserved_width)
            self.cache, x0, _ = self.runner.step(self.cache, inp,
                                                 self._static(shapes, margin, entropy))
            jax.block_until_ready(x0)
    return self.runner.compile_count - before

  def step(self) -> list[Request]:
    """Run one engine step; return the requests that finished (or were aborted) in it."""
    t0 = time.perf_counter()
    finished = self._drain()
    plan = self.scheduler.schedule()
    if plan.empty:
      for req in finished:
        self._notify(req)
      return finished
    shapes = shapes_for(plan.refresh, plan.reuse, self.mcfg, self.max_len_bucket)
    inputs, rows = build_step(plan.refresh, plan.reuse, self.mcfg, shapes, sparse_on=True,
                              max_slots=self.pool_cfg.max_slots,
                              reserved_width=self.reserved_width)
    reqs = rows.reqs
    static = self._static(shapes, any(r.params.confidence == "margin" for r in reqs),
                          any(r.params.confidence == "entropy" for r in reqs))
    n_select = sum(1 for r in plan.refresh if r.is_sparse and r.phase() == Phase.SELECT)
    t1 = time.perf_counter()
    self.cache, x0, commit = self.runner.step(self.cache, inputs, static)
    x0, commit = to_host(x0), to_host(commit)  # the step's one device->host transfer
    t2 = time.perf_counter()
    now = time.perf_counter()
    sel_all = commit[rows.index] & rows.valid  # [n, C], all rows at once
    x0 = x0[rows.index]
    self.stats.committed_tokens += int(sel_all.sum())
    for i, req in enumerate(reqs):
      sel = sel_all[i]
      is_done = req.apply(rows.positions[i][sel], x0[i][sel], self.mcfg.eos_ids,
                          self.mcfg.eos_token_id)
      if req.first_token_time is None and req.committed_prefix() > 0:
        req.first_token_time = now
      if is_done:
        req.status, req.finish_time = Status.FINISHED, now
        self.scheduler.release(req)
        with self._lock:
          self._requests.pop(req.request_id, None)
        finished.append(req)
      else:
        self._stream(req)
    for req in finished:
      self._notify(req)
    st = self.stats
    st.steps += 1
    st.refresh_rows += len(plan.refresh)
    st.select_rows += n_select
    st.reuse_rows += len(plan.reuse)
    st.transfers += 1
    st.device_seconds += t2 - t1
    st.host_seconds += (t1 - t0) + (time.perf_counter() - t2)
    st.phase_mix.append((len(plan.refresh), len(plan.reuse)))
    if len(st.phase_mix) > 2 * st.HISTORY:
      del st.phase_mix[:-st.HISTORY]
    return finished

  def _stream(self, req: Request) -> None:
    n = req.committed_prefix()
    if n > req.streamed and req.callback is not None:
      req.streamed = n
      req.callback(req, False)

  def _notify(self, req: Request) -> None:
    req.streamed = req.params.gen_length
    if req.callback is not None:
      req.callback(req, True)
