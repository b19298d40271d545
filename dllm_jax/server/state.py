"""What every handler of one app shares: the engine(s), the worker, names, limits, metrics."""

from __future__ import annotations

import time


class ServerState:
  def __init__(self, llm, worker, model_name: str, api_key: str | None, max_body_bytes: int,
               metrics, *, shutdown_timeout: float = 30.0):
    self.llm = llm
    self.worker = worker
    self.model_name = model_name
    self.api_key = api_key
    self.max_body_bytes = max_body_bytes
    self.metrics = metrics
    self.shutdown_timeout = shutdown_timeout
    self.created = int(time.time())
    self.max_len = worker.core.max_len
    self.mask_id = llm.cfg.mask_token_id
    self.eos_ids = tuple(llm.cfg.eos_ids)
    self._pieces: dict[int, str] = {}

  @property
  def tokenizer(self):
    return self.llm.tokenizer

  def piece(self, tid: int) -> str | None:
    """The text of one token id on the demo canvas (None for the mask id); cached."""
    if tid == self.mask_id:
      return None
    p = self._pieces.get(tid)
    if p is None:
      tok = self.llm.tokenizer
      p = tok.decode([tid], skip_special_tokens=False) if tok is not None else f"[{tid}]"
      if len(self._pieces) < 1 << 18:
        self._pieces[tid] = p
    return p
