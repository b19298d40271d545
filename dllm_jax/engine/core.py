"""The continuous-batching engine core: intake, scheduler, one fused jitted step, host update.

``EngineCore.step()`` = schedule -> build bucketed inputs -> one device call -> read back the
(x0, commit) arrays of the scheduled rows (the only device->host transfer of the step) -> commit
on the host canvases, EOS rule, free finished requests at once; it returns a :class:`StepResult`
(the requests that ended, the ones that ran on). What a caller sees of a request (text, events)
is built from that by ``LLM`` (engine/outputs.py). After a step raised, :meth:`EngineCore.recover`
ends what the step may have left half done and rebuilds a consumed KV pool.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque

import jax
import jax.numpy as jnp

from dllm_jax.cache.page_pool import (PoolConfig, ShardedPageAllocator, SlotAllocator,
                                      init_cache, max_keep, pages_needed)
from dllm_jax.cache.sparse_state import Phase
from dllm_jax.config import EngineConfig, SamplingParams, SparseConfig
from dllm_jax.sampling.plan import LogitPlan
from dllm_jax.engine import memory
from dllm_jax.engine.batch import Layout, build_step, dummy_step, step_tokens
from dllm_jax.sampling.decode import DecodeStatic, chunk_rows
from dllm_jax.engine.grid import Grid, Shapes, pow2_at_least
from dllm_jax.engine.request import Request, Status
from dllm_jax.engine.runner import Runner, StepStatic
from dllm_jax.engine.scheduler import Scheduler
from dllm_jax.model.attention import resolve_refresh_impl
from dllm_jax.model.fused import SparseStatic
from dllm_jax.model.transformer import Transformer
from dllm_jax.parallel import to_host


WARMUP_MODES = ("none", "quick", "full")


class QueueFull(RuntimeError):
  """The waiting queue is at its limit (the server answers 429)."""


@dataclasses.dataclass(frozen=True)
class StepResult:
  """What one :meth:`EngineCore.step` did to the requests.

  finished: the requests that ended in it (finished, or aborted at its start); their pages and
    slots are already free and the engine no longer holds them.
  ran: the requests it ran that go on (their canvases may have changed).
  """

  finished: list[Request]
  ran: list[Request]


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
  tokens: int = 0          # tokens fed (real)
  bucket_tokens: int = 0   # tokens fed with the bucket's padding: padding waste = this / tokens
  kv_pages_peak: int = 0   # most KV pages reserved at once (per device)
  running_peak: int = 0
  shape_counts: dict = dataclasses.field(default_factory=dict)  # Shapes -> steps run
  phase_mix: list = dataclasses.field(default_factory=list)  # (refresh, reuse), recent steps

  HISTORY = 100_000  # phase_mix keeps at most this many recent steps (a server runs forever)

  @property
  def padding_waste(self) -> float | None:
    """Tokens fed with bucket padding per real token (1.0 = no padding)."""
    return self.bucket_tokens / self.tokens if self.tokens else None

  def as_dict(self) -> dict:
    """A JSON-able snapshot (``shape_counts`` keyed "TxN")."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["shape_counts"] = {f"{s.tokens}x{s.length}": n for s, n in self.shape_counts.items()}
    d["phase_mix"] = list(self.phase_mix)
    return d


class EngineCore:

  def __init__(self, model: Transformer, cfg: EngineConfig, devices=None):
    from dllm_jax import parallel

    self.model = model
    self.mcfg = model.cfg
    self.cfg = cfg
    self.max_len = min(cfg.max_model_len or self.mcfg.max_position, self.mcfg.max_position)
    self.max_len_bucket = pow2_at_least(self.max_len, 32)
    self.dtype = model.dtype
    self.grid = Grid.of(cfg, self.mcfg)
    # cuDNN flash attention on GPUs; elsewhere the XLA path over the rows in use only.
    self.refresh_impl = resolve_refresh_impl("auto", self.dtype, self.mcfg.head_dim,
                                             fallback="xla_rows")
    self.runner = Runner(model, parallel.make_mesh(cfg.tp, devices))
    self.kv_heads = self.runner.layout.kv_heads_per_device
    self._plans: dict[int, LogitPlan] = {}
    self._layouts: dict[Shapes, Layout] = {}
    self._keys: dict[Shapes, tuple] = {}
    self.pool_cfg = self._pool_config()
    self.cache = self.runner.shard_cache(init_cache(self.pool_cfg))
    self.pages = ShardedPageAllocator(self.pool_cfg.num_pages, cfg.tp)
    self.slots = SlotAllocator(self.pool_cfg.max_slots)
    self.scheduler = Scheduler(cfg, self.mcfg, self.pages, self.slots, self._fits,
                               kv_heads=self.kv_heads)
    self.stats = StepStats()
    self._ids = itertools.count()
    self._lock = threading.Lock()
    self._intake: deque[Request] = deque()
    self._requests: dict[str, Request] = {}
    self._aborts: set[str] = set()
    self._step_ended: list[Request] = []  # ended in the step under way (for recover)

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
      peak = cfg.activation_budget_bytes
      if peak is None:  # the largest step of the grid
        peak = max(self.step_activation_bytes(s) for s in self.grid.shapes())
      n = memory.pages_for_budget(cfg.memory_budget_bytes, self.mcfg, peak, base)
      if n < 2:
        raise ValueError(
            f"memory_budget_bytes={cfg.memory_budget_bytes:,} leaves no room for a KV pool after "
            f"weights and activations; raise it or lower max_running / token_budget")
    else:
      # Enough for every running request at full length, capped at 512 MiB.
      n = min(1 + cfg.max_running * per_request, max(2, (512 << 20) // base.page_bytes))
    return dataclasses.replace(base, num_pages=int(n))

  def _logit_plan(self, rows: int) -> LogitPlan:
    plan = self._plans.get(rows)
    if plan is None:
      plan = self._plans[rows] = memory.logit_plan(self.cfg, self.mcfg, rows, self.dtype)
    return plan

  def layout(self, shapes: Shapes) -> Layout:
    """The static sizes of one bucket (its candidate slots follow its logit plan's chunk)."""
    lay = self._layouts.get(shapes)
    if lay is None:
      capacity = self.grid.candidates(shapes, 1)
      chunk = chunk_rows(self._logit_plan(capacity), capacity)
      lay = self._layouts[shapes] = Layout.of(self.grid, shapes, chunk)
    return lay

  def step_activation_bytes(self, shapes: Shapes) -> int:
    lay = self.layout(shapes)
    return memory.step_activation_bytes(self.mcfg, lay, self._logit_plan(lay.candidates),
                                        self.dtype, flash_refresh=self.refresh_impl == "cudnn")

  def shapes_for(self, refresh: list[Request], reuse: list[Request]) -> Shapes | None:
    """The grid bucket of a step of these rows, or None when no bucket holds it."""
    return self.grid.choose(step_tokens(refresh, reuse, self.mcfg),
                            max([r.length for r in refresh] + [0]), len(refresh), len(reuse))

  def _fits(self, refresh: list[Request], reuse: list[Request]) -> bool:
    """Whether a step of these rows fits a bucket of the grid and the activation budget."""
    shapes = self.shapes_for(refresh, reuse)
    if shapes is None:
      return False
    budget = self.cfg.activation_budget_bytes
    return budget is None or self.step_activation_bytes(shapes) <= budget

  def shapes(self) -> list[Shapes]:
    """Every bucket a step of this engine can have: the grid's, less those over the activation
    budget (the scheduler never runs them)."""
    budget = self.cfg.activation_budget_bytes
    return [s for s in self.grid.shapes()
            if budget is None or self.step_activation_bytes(s) <= budget]

  def executable_bound(self) -> int:
    """Step executables this engine can ever compile: one per bucket of :meth:`shapes`."""
    return len(self.shapes())

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
    if not self._fits([req], []):
      raise ValueError(f"a Refresh of {n} tokens exceeds the activation budget "
                       f"{self.cfg.activation_budget_bytes:,} bytes")
    need = req.pages_needed(self.kv_heads, self.cfg.page_size)
    if need > self.pages.capacity or need > self.reserved_per_device:
      raise ValueError(f"this sparse request needs {need} KV pages; the pool holds "
                       f"{self.pages.capacity}")

  def add(self, prompt_ids: list[int], sp: SamplingParams, sparse: SparseConfig | None = None,
          *, request_id: str | None = None, prompt: str | None = None,
          trace: bool = False) -> str:
    """Queue a request (thread-safe). Raises ValueError for one that can never run and
    QueueFull when the waiting queue is at its limit. ``trace``: keep the generated positions
    after every step (``Request.trace``)."""
    req = Request("", list(prompt_ids), sp, sparse, self.mcfg.mask_token_id, prompt=prompt)
    if trace:
      req.trace = []
    self._check(req)
    with self._lock:
      rid = request_id if request_id is not None else f"req-{next(self._ids)}"
      if rid in self._requests:
        raise ValueError(f"request id {rid!r} is already in use")
      if self.num_waiting_for_slot() >= self.cfg.max_waiting:
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

  def end(self, request_id: str, reason: str) -> Request | None:
    """End a request at once, with ``reason`` (e.g. "stop": a stop string ended its text): its
    pages and slot return to the pool now. Call it between steps from the thread that steps
    (:meth:`abort` is the thread-safe, deferred form). Returns the request, or None when the
    engine does not hold it."""
    with self._lock:
      req = self._requests.pop(request_id, None)
      if req is None:
        return None
      self._aborts.discard(request_id)
      for queue in (self._intake, self.scheduler.waiting):
        if req in queue:
          queue.remove(req)
      self.scheduler.release(req)
      req.status = Status.ABORTED if reason == "abort" else Status.FINISHED
      req.finish_reason, req.finish_time = reason, time.perf_counter()
    return req

  def request_ids(self) -> set[str]:
    """Ids of the requests the engine holds: queued, waiting, running, or aborted and not yet
    released (thread-safe)."""
    with self._lock:
      return set(self._requests)

  def has_unfinished(self) -> bool:
    with self._lock:
      return bool(self._intake or self.scheduler.waiting or self.scheduler.running)

  def num_waiting(self) -> int:
    return len(self._intake) + len(self.scheduler.waiting)

  def num_running(self) -> int:
    return len(self.scheduler.running)

  def num_waiting_for_slot(self) -> int:
    """Queued requests beyond the free running slots: those that really wait (a burst that the
    free slots can take is not a queue)."""
    free = max(0, self.cfg.max_running - len(self.scheduler.running))
    return max(0, self.num_waiting() - free)

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
  def step_key(self, shapes: Shapes) -> tuple:
    """(Layout, StepStatic) of a bucket: what identifies its executable."""
    key = self._keys.get(shapes)
    if key is None:
      key = self._keys[shapes] = (self.layout(shapes), self._static(shapes))
    return key

  def _static(self, shapes: Shapes) -> StepStatic:
    lay = self.layout(shapes)
    plan = self._logit_plan(lay.candidates)
    return StepStatic(
        sparse=SparseStatic(block_width=lay.cand_width,
                            select_width=self.pool_cfg.max_pages_per_head * self.cfg.page_size,
                            attn_impl=self.cfg.attn_impl, refresh_impl=self.refresh_impl),
        decode=DecodeStatic(plan=plan, chunk=chunk_rows(plan, lay.candidates),
                            cand_width=lay.cand_width, mask_id=self.mcfg.mask_token_id,
                            vocab_size=self.mcfg.vocab_size))

  def warmup_shapes(self, mode: str = "full", lengths=None) -> list[Shapes]:
    """The buckets ``warmup(mode)`` compiles: "full" every bucket of the grid; "quick" the
    steady-state ones (Reuse-only steps, and steps whose Refresh rows are at the longest
    length bucket); "none" nothing. ``lengths`` (canvas lengths of a workload) keeps only the
    Refresh length buckets those canvases can reach."""
    if mode not in WARMUP_MODES:
      raise ValueError(f"warmup mode: expected one of {WARMUP_MODES}, got {mode!r}")
    if mode == "none":
      return []
    shapes = self.shapes()
    if lengths is not None:
      longest = max(pow2_at_least(n, 32) for n in lengths)
      shapes = [s for s in shapes if s.length <= longest]
    if mode == "quick":
      top = max(s.length for s in shapes)
      shapes = [s for s in shapes if s.length in (0, top)]
    return shapes

  def warmup(self, mode: str = "full", *, lengths=None, threads: int | None = None,
             progress: bool = False) -> int:
    """Compile the buckets of ``warmup_shapes(mode, lengths)`` ahead of time, in parallel
    threads (XLA compiles outside the GIL), with an optional progress bar and estimate.
    Returns the number of new compilations; afterwards no step of those buckets compiles."""
    import concurrent.futures
    import os

    todo = [s for s in self.warmup_shapes(mode, lengths)
            if self.step_key(s) not in self.runner.executables]
    before = self.runner.compile_count
    if not todo:
      return 0
    bar = None
    if progress:
      from tqdm import tqdm
      bar = tqdm(total=len(todo), desc="warm-up (step executables)", unit="exe")

    def one(shapes):
      inp = dummy_step(self.mcfg, self.layout(shapes), max_slots=self.pool_cfg.max_slots,
                       reserved_width=self.reserved_width)
      key = self.step_key(shapes)
      self.runner.compile(key, key[1], self.cache, inp)
      if bar is not None:
        bar.update(1)

    workers = threads or min(len(todo), max(1, (os.cpu_count() or 1)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      list(pool.map(one, todo))
    if bar is not None:
      bar.close()
    return self.runner.compile_count - before

  def step(self) -> StepResult:
    """Run one engine step: the requests that ended in it (finished, or aborted before it) and
    the ones it ran that go on."""
    t0 = time.perf_counter()
    finished = self._step_ended = self._drain()
    plan = self.scheduler.schedule()
    if plan.empty:
      self._step_ended = []
      return StepResult(finished, [])
    shapes = self.shapes_for(plan.refresh, plan.reuse)
    inputs, rows = build_step(plan.refresh, plan.reuse, self.mcfg, self.layout(shapes),
                              sparse_on=True, max_slots=self.pool_cfg.max_slots,
                              reserved_width=self.reserved_width)
    reqs = rows.reqs
    n_select = sum(1 for r in plan.refresh if r.is_sparse and r.phase() == Phase.SELECT)
    t1 = time.perf_counter()
    key = self.step_key(shapes)
    self.cache, x0, commit = self.runner.step(self.cache, inputs, key, key[1])
    x0, commit = to_host(x0), to_host(commit)  # the step's one device->host transfer
    t2 = time.perf_counter()
    now = time.perf_counter()
    sel_all = commit[rows.index] & rows.valid  # [n, C], all rows at once
    x0 = x0[rows.index]
    self.stats.committed_tokens += int(sel_all.sum())
    ran = []
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
        ran.append(req)
    st = self.stats
    st.steps += 1
    st.refresh_rows += len(plan.refresh)
    st.select_rows += n_select
    st.reuse_rows += len(plan.reuse)
    st.transfers += 1
    st.device_seconds += t2 - t1
    st.host_seconds += (t1 - t0) + (time.perf_counter() - t2)
    st.tokens += step_tokens(plan.refresh, plan.reuse, self.mcfg)
    st.bucket_tokens += shapes.tokens
    st.kv_pages_peak = max(st.kv_pages_peak, self.pages.capacity - self.pages.num_free)
    st.running_peak = max(st.running_peak, len(self.scheduler.running))
    st.shape_counts[shapes] = st.shape_counts.get(shapes, 0) + 1
    st.phase_mix.append((len(plan.refresh), len(plan.reuse)))
    if len(st.phase_mix) > 2 * st.HISTORY:
      del st.phase_mix[:-st.HISTORY]
    self._step_ended = []
    return StepResult(finished, ran)

  # Failure recovery -----------------------------------------------------------------------------
  def recover(self, error: str) -> list[Request]:
    """Make the engine usable again after :meth:`step` raised (call it from the thread that
    steps). The requests the failed step may have left half done end with status ABORTED,
    finish_reason "error" and ``error``, their pages and slots freed: every running one (the
    step may have half written its KV state), or the waiting ones when nothing was running (it
    failed before admitting any). Queued requests not yet drained are untouched. A KV pool the
    failed step consumed (donated to the device call) is rebuilt with the runner's sharding.
    Returns those requests, after the ones that had ended in the failed step before it
    failed (their results are whole)."""
    now = time.perf_counter()
    with self._lock:
      ended, self._step_ended = list(self._step_ended), []
      victims = list(self.scheduler.running) or list(self.scheduler.waiting)
      for req in victims:
        if req in self.scheduler.waiting:
          self.scheduler.waiting.remove(req)
        self.scheduler.release(req)
        self._requests.pop(req.request_id, None)
        self._aborts.discard(req.request_id)
        req.status, req.finish_reason, req.error = Status.ABORTED, "error", error
        req.finish_time = now
    if any(x.is_deleted() for x in jax.tree.leaves(self.cache) if hasattr(x, "is_deleted")):
      self.cache = self.runner.shard_cache(init_cache(self.pool_cfg))
    return ended + victims
