"""Data-parallel replicas behind one front end: N engines on disjoint device sets.

``ReplicaRouter`` offers the :class:`EngineWorker` surface the app uses, over one worker (engine
thread) per replica, and sends each new request to the least-loaded replica (fewest requests in
flight, ties to the lowest index); if that replica's queue is full it tries the next. Aborts go to
the replica that owns the request. /health and /metrics report replica 0's pool plus the totals
the router sums (in flight, tokens/s, errors).
"""

from __future__ import annotations

import asyncio
import threading

from dllm_jax.server.worker import EngineWorker, QueueFull


class ReplicaRouter:

  def __init__(self, workers: list[EngineWorker]):
    if not workers:
      raise ValueError("need at least one replica")
    self.workers = workers
    self._owner: dict[str, EngineWorker] = {}
    self._lock = threading.Lock()

  # The surface of EngineWorker that the app and metrics use ------------------------------------
  @property
  def core(self):
    return self.workers[0].core

  @property
  def llm(self):
    return self.workers[0].llm

  @property
  def max_queue(self) -> int:  # per replica
    return self.workers[0].max_queue

  @property
  def alive(self) -> bool:
    return all(w.alive for w in self.workers)

  @property
  def accepting(self) -> bool:
    return all(w.accepting for w in self.workers)

  # Counters summed over the replicas (the metrics endpoint reads them like a worker's).
  step_errors = property(lambda self: sum(w.step_errors for w in self.workers))
  requests_failed = property(lambda self: sum(w.requests_failed for w in self.workers))
  requests_retried = property(lambda self: sum(w.requests_retried for w in self.workers))

  def start(self) -> None:
    for w in self.workers:
      w.start()

  async def aclose(self, drain_timeout: float = 30.0) -> None:
    await asyncio.gather(*(w.aclose(drain_timeout) for w in self.workers))

  def in_flight(self) -> int:
    return sum(w.in_flight() for w in self.workers)

  def waiting(self) -> int:
    return sum(w.waiting() for w in self.workers)

  def tokens_per_second(self, window: float = 10.0) -> float:
    return sum(w.tokens_per_second(window) for w in self.workers)

  def new_id(self, prefix: str) -> str:
    return self.workers[0].new_id(prefix)

  def load(self) -> list[int]:
    return [w.in_flight() for w in self.workers]

  def submit(self, handle) -> None:
    """Least-loaded routing; QueueFull only when every replica's queue is full."""
    order = sorted(range(len(self.workers)), key=lambda i: (self.workers[i].in_flight(), i))
    last = None
    for i in order:
      try:
        self.workers[i].submit(handle)
      except QueueFull as e:
        last = e
        continue
      with self._lock:
        self._owner[handle.rid] = self.workers[i]
      handle.replica = i
      return
    raise last

  def abort(self, handle) -> None:
    with self._lock:
      w = self._owner.pop(handle.rid, None)
    (w or self.workers[0]).abort(handle)

  def forget(self, rid: str) -> None:
    with self._lock:
      self._owner.pop(rid, None)
