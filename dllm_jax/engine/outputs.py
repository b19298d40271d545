"""What the engine emits per request, and the output processing that builds it.

``LLM.step()`` returns :class:`RequestOutput` s: a FINISHED one for every request that ended,
and, for a request added with ``stream=True``, a PREFIX one whenever its committed left prefix
grew and (with ``return_trace``) a STEP one with its canvas after every step. ``LLM.recover``
returns ERROR ones. :class:`OutputProcessor` builds them from the engine core's requests and
assembles their text with one :class:`TextAssembler` per request (incremental detokenising,
stop strings, a ``max_tokens`` cut), so ``LLM.generate`` and the server give the same text.
``generate`` returns :class:`GenerationOutput` s, the finished form.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable

from dllm_jax.engine.request import Request
from dllm_jax.engine.text import TextAssembler


class OutputKind(enum.Enum):
  PREFIX = "prefix"      # the committed left prefix grew (stream=True)
  STEP = "step"          # the request ran a step: ``canvas`` (stream=True and return_trace)
  FINISHED = "finished"  # it ended: finish_reason "eos", "length", "stop" or "abort"
  ERROR = "error"        # a failed engine step ended it (LLM.recover): finish_reason "error"


FINISH_REASONS = ("eos", "length", "stop", "abort", "error")


@dataclasses.dataclass(frozen=True)
class RequestOutput:
  """One event of one request.

  token_ids: the committed left prefix of the generation (PREFIX, STEP); once ended (FINISHED,
    ERROR) every generated position, EOS fill included (a request that ended early: stop,
    abort, error, keeps the mask id where nothing was committed).
  prefix_len: length of the committed left prefix.
  text: the request's text so far (never retracted; None without a tokenizer): the decode
    (special tokens skipped) of the prefix before the first EOS / EoT, cut to ``max_tokens``
    tokens and before the first stop string; text that may still change (an incomplete UTF-8
    sequence, the possible start of a stop string) is held back until it is final.
  delta: the text new since this request's previous output.
  num_text_tokens: generated tokens the text covers (before EOS / EoT or the stop string,
    within max_tokens): what an OpenAI ``usage.completion_tokens`` counts.
  finish_reason: None while running; "eos" (an EOS / EoT within the text's tokens), "length",
    "stop" (a stop string), "abort" or "error".
  nfe: forward passes run for it so far.
  time: ``time.perf_counter()`` when it was emitted.
  metrics: perf_counter times: arrival, first_token (first committed token), finish.
  canvas: STEP only: the generated positions after step ``nfe`` (mask id = not committed).
  trace: FINISHED with ``return_trace``: the canvas after every step.
  error: ERROR only: why.
  prompt: the prompt text (None for a token-id prompt).
  """

  request_id: str
  kind: OutputKind
  prompt_token_ids: list[int]
  token_ids: list[int]
  prefix_len: int
  nfe: int
  time: float
  text: str | None = None
  delta: str = ""
  num_text_tokens: int = 0
  finish_reason: str | None = None
  metrics: dict = dataclasses.field(default_factory=dict)
  canvas: list[int] | None = None
  trace: list[list[int]] | None = None
  error: str | None = None
  prompt: str | None = None

  @property
  def finished(self) -> bool:
    """Whether this is the request's last output."""
    return self.kind in (OutputKind.FINISHED, OutputKind.ERROR)

  def generation(self, index: int = 0) -> GenerationOutput:
    """The finished form (what ``LLM.generate`` returns)."""
    return GenerationOutput(
        index=index, prompt_token_ids=list(self.prompt_token_ids),
        token_ids=list(self.token_ids), text=self.text, nfe=self.nfe,
        finish_reason=self.finish_reason or "length", prompt=self.prompt, trace=self.trace,
        request_id=self.request_id, metrics=dict(self.metrics))


@dataclasses.dataclass
class GenerationOutput:
  """Result of one request (``LLM.generate``).

  ``token_ids`` are all gen_length generated positions (after EOS fill); ``text`` decodes them up
  to the first EOS / EoT (special tokens skipped) and before the first stop string. ``trace``
  (on request) holds the generated positions after every step, mask ids marking positions not
  yet committed.
  """

  index: int
  prompt_token_ids: list[int]
  token_ids: list[int]
  text: str | None
  nfe: int
  finish_reason: str
  prompt: str | None = None
  trace: list[list[int]] | None = None
  request_id: str | None = None
  metrics: dict | None = None


StepHook = Callable[[str, list, bool], None]


@dataclasses.dataclass
class _Track:
  """The output state of one request while the engine holds it."""

  prompt_ids: list[int]
  prompt: str | None
  asm: TextAssembler
  cut: bool                       # stop strings or max_tokens shape the text and finish reason
  stream: bool                    # PREFIX (and with trace STEP) outputs from step()
  trace: bool
  on_step: StepHook | None
  on_prefix: StepHook | None      # the legacy ``stream=callable`` form
  shown: int = 0                  # committed prefix already processed

  @property
  def incremental(self) -> bool:  # decode as the prefix grows
    return self.stream or bool(self.asm.stops) or self.on_prefix is not None

  @property
  def watched(self) -> bool:      # needs every step it runs
    return self.incremental or self.on_step is not None


class OutputProcessor:
  """Builds the :class:`RequestOutput` s of the requests an ``LLM`` added (one thread: the one
  that steps). ``tokenizer`` None: no text (``text`` None), ids and finish reasons only."""

  def __init__(self, tokenizer, eos_ids):
    self.tokenizer = tokenizer
    self.eos_ids = tuple(eos_ids)
    self._tracks: dict[str, _Track] = {}

  def add(self, request_id: str, prompt_ids: list[int], prompt: str | None, *,
          stream: bool = False, trace: bool = False, stop: list[str] | None = None,
          max_tokens: int | None = None, on_step: StepHook | None = None,
          on_prefix: StepHook | None = None) -> None:
    asm = TextAssembler(self.tokenizer, self.eos_ids, limit=max_tokens, stops=stop)
    self._tracks[request_id] = _Track(
        prompt_ids=list(prompt_ids), prompt=prompt, asm=asm,
        cut=bool(asm.stops) or max_tokens is not None, stream=stream, trace=trace,
        on_step=on_step, on_prefix=on_prefix)

  def request_ids(self) -> set[str]:
    return set(self._tracks)

  def watched(self, request_id: str) -> bool:
    t = self._tracks.get(request_id)
    return t is not None and t.watched

  # Events ----------------------------------------------------------------------------------------
  def ran(self, req: Request, now: float) -> tuple[list[RequestOutput], bool]:
    """The outputs of a request that ran a step and goes on, and whether a stop string ended
    it (its last output is among them and it is forgotten: the caller ends it in the engine)."""
    t = self._tracks.get(req.request_id)
    if t is None:
      return [], False
    outs, stopped = [], False
    canvas = req.trace[-1] if req.trace else None
    if t.stream and t.trace:
      outs.append(self._output(req, t, OutputKind.STEP, now, canvas=canvas))
    n = req.committed_prefix()
    if n > t.shown and t.incremental:
      t.shown = n
      ids = req.generated[:n].tolist()
      delta = t.asm.update(ids)
      if t.asm.final and t.asm.stopped:  # a stop string ended the text: end the request
        stopped = True
        del self._tracks[req.request_id]
        outs.append(self._output(req, t, OutputKind.FINISHED, now, delta=delta,
                                 reason="stop", finish=now))
      elif t.stream:
        outs.append(self._output(req, t, OutputKind.PREFIX, now, delta=delta, prefix=ids))
      if t.on_prefix is not None:
        t.on_prefix(req.request_id, ids, stopped)
    if t.on_step is not None:
      t.on_step(req.request_id, canvas if canvas is not None else req.generated.tolist(),
                stopped)
    return outs, stopped

  def ended(self, req: Request, now: float) -> list[RequestOutput]:
    """The outputs of a request the engine released: its last step's STEP (when it streams a
    trace and ran that step) and its last output; forgets the request."""
    t = self._tracks.pop(req.request_id, None)
    if t is None:  # added to the engine core directly: no options
      t = _Track(list(req.prompt_ids), req.prompt, TextAssembler(self.tokenizer, self.eos_ids),
                 cut=False, stream=False, trace=req.trace is not None, on_step=None,
                 on_prefix=None)
    reason = req.finish_reason or "length"
    n = req.committed_prefix()
    delta = t.asm.update(req.generated[:n].tolist(), True)
    if reason in ("eos", "length") and t.cut:
      reason = "stop" if t.asm.stopped else ("eos" if t.asm.eos else "length")
    kind = OutputKind.ERROR if reason == "error" else OutputKind.FINISHED
    stepped = req.finish_reason in ("eos", "length")  # it ended in a step it ran
    outs = []
    if stepped and t.stream and t.trace and req.trace:
      outs.append(self._output(req, t, OutputKind.STEP, now, canvas=req.trace[-1],
                               prefix=req.generated[:n].tolist()))
    outs.append(self._output(req, t, kind, now, delta=delta, reason=reason,
                             finish=req.finish_time or now))
    if t.on_step is not None and stepped:
      t.on_step(req.request_id, req.generated.tolist(), True)
    if t.on_prefix is not None:
      t.on_prefix(req.request_id, req.generated[:n].tolist(), True)
    return outs

  def lost(self, request_id: str, error: str, now: float) -> RequestOutput | None:
    """An ERROR output for a request whose end a failed step swallowed (nothing but its id and
    prompt is known any more); forgets it."""
    t = self._tracks.pop(request_id, None)
    if t is None:
      return None
    return RequestOutput(request_id, OutputKind.ERROR, list(t.prompt_ids), [], 0, 0, now,
                         text=None if self.tokenizer is None else t.asm.sent,
                         finish_reason="error", error=error, prompt=t.prompt)

  def _output(self, req: Request, t: _Track, kind: OutputKind, now: float, *, delta: str = "",
              prefix: list[int] | None = None, canvas: list[int] | None = None,
              reason: str | None = None, finish: float | None = None) -> RequestOutput:
    ended = kind in (OutputKind.FINISHED, OutputKind.ERROR)
    if prefix is None:
      prefix = req.generated.tolist() if ended else req.generated[:req.committed_prefix()].tolist()
    return RequestOutput(
        request_id=req.request_id, kind=kind, prompt_token_ids=list(t.prompt_ids),
        token_ids=prefix, prefix_len=req.committed_prefix(), nfe=req.step, time=now,
        text=None if self.tokenizer is None else t.asm.sent, delta=delta,
        num_text_tokens=t.asm.n_tokens, finish_reason=reason,
        metrics=dict(arrival=req.arrival, first_token=req.first_token_time, finish=finish),
        canvas=canvas if kind == OutputKind.STEP else None,
        trace=req.trace if ended and t.trace else None,
        error=req.error if kind == OutputKind.ERROR else None, prompt=t.prompt)
