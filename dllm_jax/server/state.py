"""What every handler of one app shares: the engine(s), the worker, names, limits, metrics."""

from __future__ import annotations

import dataclasses
import time
from typing import Any


@dataclasses.dataclass(eq=False)
class ServerState:
  llm: Any
  worker: Any
  model_name: str
  api_key: str | None
  max_body_bytes: int
  metrics: Any
  shutdown_timeout: float = 30.0
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))
  _pieces: dict[int, str] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.max_len = self.worker.core.max_len
    self.mask_id = self.llm.cfg.mask_token_id
    self.eos_ids = tuple(self.llm.cfg.eos_ids)

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
