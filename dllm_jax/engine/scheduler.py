"""Schedulers: which running requests run this step, in which phase, and who gets admitted.

Costs per step: a Refresh (or Refresh+Select) feeds all N canvas tokens; a Reuse feeds the block
(plus Dream's one query-only row). Three budgets bound a step: tokens (compute), KV pages
(memory; reserved at admission) and activation bytes (the runner's analytic estimate of the
step's bucketed shapes).

- ``phase`` (default, phase-multiplexed): admit FCFS while pages and slots allow; then each step
  takes every Reuse request it can (cheap, bandwidth-bound) and fills the rest of the token budget
  with Refresh requests (compute-bound), oldest first. A request that does not fit is skipped,
  not waited on, so one large Refresh never stalls the small Reuse steps of others; a request
  skipped ``aging_steps`` times in a row goes first on the next step, so nothing starves.
- ``fcfs`` (the reference's policy): strict FCFS over running then waiting under the token
  budget; it stops (breaks) at the first request that does not fit.
- ``static``: a batch is admitted only when nothing runs, and runs to completion.

Knobs (EngineConfig): token_budget, max_running, max_refresh_rows, max_reuse_rows,
activation_budget_bytes, aging_steps. Admission never livelocks: a request that could never fit
(tokens, pages, length) is rejected by the engine before it is queued, and the head of the queue
waits only for pages held by running requests, which always finish.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable

from dllm_jax.cache.page_pool import PageAllocator, SlotAllocator
from dllm_jax.cache.sparse_state import Phase
from dllm_jax.config import EngineConfig, ModelConfig
from dllm_jax.engine.request import Request, Status


@dataclasses.dataclass
class Plan:
  refresh: list[Request]   # Refresh and Refresh+Select rows
  reuse: list[Request]
  admitted: list[Request]

  @property
  def empty(self) -> bool:
    return not self.refresh and not self.reuse


class Scheduler:

  def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, pages: PageAllocator,
               slots: SlotAllocator, fits_activation: Callable[[list[Request], list[Request]], bool],
               *, kv_heads: int | None = None):
    self.cfg = cfg
    self.model_cfg = model_cfg
    self.kv_heads = kv_heads or model_cfg.num_kv_heads  # per device under tensor parallelism
    self.pages = pages
    self.slots = slots
    self.fits_activation = fits_activation
    self.waiting: deque[Request] = deque()
    self.running: list[Request] = []

  # Admission ----------------------------------------------------------------------------------
  def _try_admit(self, req: Request) -> bool:
    if len(self.running) >= self.cfg.max_running:
      return False
    if req.is_sparse:
      need = req.pages_needed(self.kv_heads, self.cfg.page_size)
      if not self.pages.can_allocate(need) or self.slots.num_free == 0:
        return False
      req.pages = self.pages.allocate(req.request_id, need)
      req.slot = self.slots.allocate(req.request_id)
    req.status = Status.RUNNING
    self.running.append(req)
    return True

  def release(self, req: Request) -> None:
    """Free a finished / aborted request's pages and slot at once."""
    self.pages.free(req.request_id)
    self.slots.free(req.request_id)
    req.pages, req.slot = [], None
    if req in self.running:
      self.running.remove(req)

  # Costs ----------------------------------------------------------------------------------------
  def _cost(self, req: Request, phase: Phase) -> int:
    return req.reuse_cost(self.model_cfg) if phase == Phase.REUSE else req.length

  def _fits(self, req, phase, refresh, reuse, used) -> bool:
    cost = self._cost(req, phase)
    if used + cost > self.cfg.token_budget:
      return False
    if phase == Phase.REUSE:
      if len(reuse) >= self.cfg.max_reuse_rows:
        return False
      return self.fits_activation(refresh, reuse + [req])
    if len(refresh) >= self.cfg.max_refresh_rows:
      return False
    return self.fits_activation(refresh + [req], reuse)

  # Policies -----------------------------------------------------------------------------------
  def schedule(self) -> Plan:
    for r in self.running:
      r.sync_block()
    return {"phase": self._phase, "fcfs": self._fcfs, "static": self._static}[self.cfg.scheduler]()

  def _admit_fcfs(self) -> list[Request]:
    admitted = []
    while self.waiting and self._try_admit(self.waiting[0]):
      req = self.waiting.popleft()
      req.sync_block()
      admitted.append(req)
    return admitted

  def _phase(self) -> Plan:
    admitted = self._admit_fcfs()
    aged = [r for r in self.running if r.skipped >= self.cfg.aging_steps]
    reuse_first = [r for r in self.running if r not in aged and r.phase() == Phase.REUSE]
    rest = [r for r in self.running if r not in aged and r.phase() != Phase.REUSE]
    refresh, reuse, used = [], [], 0
    for req in aged + reuse_first + rest:
      phase = req.phase()
      if self._fits(req, phase, refresh, reuse, used):
        (reuse if phase == Phase.REUSE else refresh).append(req)
        used += self._cost(req, phase)
    self._count_skips(refresh, reuse)
    return Plan(refresh, reuse, admitted)

  def _fcfs(self) -> Plan:
    refresh, reuse, used = [], [], 0
    for req in self.running:
      phase = req.phase()
      if not self._fits(req, phase, refresh, reuse, used):
        break
      (reuse if phase == Phase.REUSE else refresh).append(req)
      used += self._cost(req, phase)
    admitted = []
    while self.waiting:  # the reference admits even when a running request did not fit
      req = self.waiting[0]
      req.sync_block()
      if not self._fits(req, Phase.REFRESH, refresh, reuse, used) or not self._try_admit(req):
        break
      self.waiting.popleft()
      admitted.append(req)
      refresh.append(req)
      used += req.length
    self._count_skips(refresh, reuse)
    return Plan(refresh, reuse, admitted)

  def _static(self) -> Plan:
    admitted = []
    if not self.running:
      used = 0
      while (self.waiting and used + self.waiting[0].length <= self.cfg.token_budget
             and len(admitted) < min(self.cfg.max_refresh_rows, self.cfg.max_reuse_rows)
             and self.fits_activation(admitted + [self.waiting[0]], [])
             and self._try_admit(self.waiting[0])):
        req = self.waiting.popleft()
        req.sync_block()
        admitted.append(req)
        used += req.length
    refresh = [r for r in self.running if r.phase() != Phase.REUSE]
    reuse = [r for r in self.running if r.phase() == Phase.REUSE]
    return Plan(refresh, reuse, admitted)

  def _count_skips(self, refresh, reuse) -> None:
    chosen = set(map(id, refresh + reuse))
    for r in self.running:
      r.skipped = 0 if id(r) in chosen else r.skipped + 1
    if self.running and not chosen:
      raise RuntimeError("scheduler made no progress; a running request exceeds the budgets")
