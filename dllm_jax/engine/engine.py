"""``LLM``: load a model and generate with diffusion decoding.

    llm = LLM()                                   # the bundled demo model
    out = llm.generate(["The socket module"], SamplingParams(gen_length=64))
    print(out[0].text, out[0].nfe)

    rid = llm.add_request("Decorators", SamplingParams(gen_length=32), stream=True)
    while llm.has_unfinished():
      for o in llm.step():                        # typed RequestOutputs (engine/outputs.py)
        print(o.kind.value, repr(o.delta), o.finish_reason)

``generate`` never applies a chat template; ``chat`` does.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from dllm_jax import jsonfile
from dllm_jax.config import EngineConfig, SamplingParams, SparseConfig
from dllm_jax.engine.core import EngineCore, StepResult
from dllm_jax.engine.outputs import (GenerationOutput, OutputKind, OutputProcessor,
                                     RequestOutput, StepHook)
from dllm_jax.model.transformer import Transformer
from dllm_jax.sampling.plan import LogitPlan

__all__ = ["LLM", "GenerationOutput", "RequestOutput", "OutputKind", "DEMO_MODEL_DIR"]

DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "demo")


class LLM:
  """A diffusion LM ready to generate.

  model: a directory in HF layout (config.json + safetensors [+ tokenizer files,
    generation_config.json]), a :class:`Transformer`, or None for the bundled demo model.
  tokenizer: optional; loaded from the model directory when there is one.
  logit_plan: how (token, confidence) are computed from hidden rows (see dllm_jax.sampling).
  compile_cache: opt in to JAX's persistent compilation cache (dllm_jax/compile_cache.py):
    True for the default directory, or a directory. None / False (default) changes nothing in
    JAX's global configuration; a directory the user already gave JAX is always respected.
  """

  def __init__(self, model: str | os.PathLike | Transformer | None = None, tokenizer=None, *,
               param_dtype=None, generation_config: dict | None = None,
               logit_plan: LogitPlan | None = None, engine_config: EngineConfig | None = None,
               devices=None, compile_cache: bool | str | os.PathLike | None = None):
    if compile_cache:
      from dllm_jax import compile_cache as cc
      self.compile_cache_dir = cc.enable(None if compile_cache is True else os.fspath(compile_cache))
    else:
      self.compile_cache_dir = None
    path = None
    if model is None:
      model = DEMO_MODEL_DIR
    if isinstance(model, (str, os.PathLike)):
      from dllm_jax.model.loader import load_model
      path = os.fspath(model)
      model = load_model(path, param_dtype=param_dtype)
    if not isinstance(model, Transformer):
      raise TypeError(f"model: expected a path or a Transformer, got {type(model).__name__}")
    self.model = model
    self.cfg = model.cfg
    self.path = path
    if tokenizer is None and path and os.path.isfile(os.path.join(path, "tokenizer.json")):
      from dllm_jax.tokenizer import load_tokenizer
      tokenizer = load_tokenizer(path)
    self._proc = OutputProcessor(tokenizer, self.cfg.eos_ids)
    if generation_config is None and path:
      gc = os.path.join(path, "generation_config.json")
      if os.path.isfile(gc):
        generation_config = jsonfile.read_object(gc)
    self.generation_config = dict(generation_config or {})
    self.logit_plan = logit_plan or LogitPlan()
    self.engine_config = engine_config or EngineConfig()
    self._core: EngineCore | None = None
    self._devices = devices
    self._stepper = None  # who steps this engine (claim)

  @property
  def tokenizer(self):
    return self._proc.tokenizer

  @tokenizer.setter
  def tokenizer(self, tok) -> None:
    self._proc.tokenizer = tok

  @property
  def core(self) -> EngineCore:
    """The continuous-batching engine (built on first use)."""
    if self._core is None:
      self._core = EngineCore(self.model, self.engine_config, self._devices)
    return self._core

  # Continuous batching ------------------------------------------------------------------------
  def add_request(self, prompt, sampling_params: SamplingParams | None = None,
                  sparse: SparseConfig | None = None, *, request_id: str | None = None,
                  stream: bool | StepHook = False, return_trace: bool = False,
                  stop: str | list[str] | None = None, max_tokens: int | None = None,
                  on_step: StepHook | None = None) -> str:
    """Queue one request; returns its id. ``prompt``: text or token ids. ``sparse``: this
    request's SparseConfig (default: the engine's).

    stream: True: :meth:`step` also returns a PREFIX output whenever the committed left prefix
      grows (its text delta included) and, with ``return_trace``, a STEP output with the canvas
      after every step. A callable (the older form) is called as ``stream(request_id,
      token_ids, finished)`` with the committed prefix whenever it grows, and once at the end.
    return_trace: the finished output carries the canvas after every step.
    stop: stop strings (OpenAI ``stop``): the text ends before the first one, which ends the
      request at once (finish_reason "stop", its pages freed). Needs a tokenizer.
    max_tokens: cut the text to this many generated tokens (the canvas still runs to
      gen_length; an EOS beyond the cut does not count).
    on_step: ``on_step(request_id, canvas_ids, finished)`` after every step the request runs
      (canvas_ids: its generated positions, the mask id where nothing is committed yet;
      ``finished`` True on the step that ends it). Called in :meth:`step`: keep it cheap.
    """
    if not isinstance(prompt, (str, list, tuple, np.ndarray)):
      raise ValueError(f"prompt: expected text or a list of token ids, got {type(prompt).__name__}")
    if len(prompt) and not isinstance(prompt, str) and isinstance(prompt[0], (list, tuple,
                                                                               np.ndarray)):
      raise ValueError("add_request takes one prompt (text or token ids); use generate for many")
    stops = self._stops(stop)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(
        max_tokens, (int, np.integer)) or max_tokens < 1):
      raise ValueError(f"max_tokens: expected a positive integer, got {max_tokens!r}")
    for name, fn in (("stream", stream), ("on_step", on_step)):
      if fn is not None and not isinstance(fn, bool) and not callable(fn):
        raise ValueError(f"{name}: expected {'True/False or ' if name == 'stream' else ''}"
                         f"a callable, got {type(fn).__name__}")
    texts, ids = self._prompt_ids([list(prompt)] if not isinstance(prompt, str) else [prompt])
    sp = self._sampling_params(sampling_params, 1)[0]
    sparse = self.engine_config.sparse if sparse is None else sparse
    rid = self.core.add(ids[0], sp, sparse, request_id=request_id, prompt=texts[0],
                        trace=return_trace)
    self._proc.add(rid, ids[0], texts[0], stream=stream is True, trace=return_trace,
                   stop=stops, max_tokens=max_tokens, on_step=on_step,
                   on_prefix=stream if callable(stream) else None)
    return rid

  def step(self) -> list[RequestOutput]:
    """One engine step. Returns the outputs it produced: a FINISHED one for every request that
    ended (finished, stopped or aborted), and PREFIX / STEP ones of the requests added with
    ``stream=True``. Nothing is kept after it returns them."""
    return self._outputs_of(self.core.step())

  def _outputs_of(self, res: StepResult) -> list[RequestOutput]:
    now = time.perf_counter()
    outs = []
    for req in res.ran:
      if self._proc.watched(req.request_id):
        got, stopped = self._proc.ran(req, now)
        outs += got
        if stopped:
          self.core.end(req.request_id, "stop")  # its pages are free at once
    for req in res.finished:
      outs += self._proc.ended(req, now)
    return outs

  def abort(self, request_id: str) -> bool:
    """Cancel a request; its KV pages are freed at the next step, which returns its FINISHED
    output (finish_reason "abort")."""
    return self.core.abort(request_id)

  def has_unfinished(self) -> bool:
    return self._core is not None and self._core.has_unfinished()

  def request_ids(self) -> set[str]:
    """Ids of the requests whose last output :meth:`step` has not returned yet."""
    return self._proc.request_ids()

  def recover(self, error: BaseException | str) -> list[RequestOutput]:
    """Call after :meth:`step` raised, from the thread that steps: the engine ends what the
    failed step may have left half done (every running request, see ``EngineCore.recover``)
    and rebuilds a KV pool the step consumed, with its sharding. Returns the outputs of the
    requests that ended: ERROR ones (``error`` says why) and FINISHED ones that completed in
    the failed step before it failed. Decoding is deterministic: an ERROR request added again
    gives the same tokens."""
    if self._core is None:
      return []
    msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    now = time.perf_counter()
    ended = self.core.recover(msg)
    outs = [o for r in ended for o in self._proc.ended(r, now)]
    for rid in sorted(self._proc.request_ids() - self.core.request_ids()):
      # the failed step released it (or its output processing failed): its output is lost
      out = self._proc.lost(rid, msg, now)
      if out is not None:
        outs.append(out)
    return outs

  def claim(self, owner) -> None:
    """Reserve stepping this engine for ``owner`` (a server's engine thread): the engine is
    stepped by one thread only. RuntimeError when another owner holds it and is alive (an
    ``alive`` attribute that is false releases a claim)."""
    other = self._stepper
    if other is not None and other is not owner and getattr(other, "alive", True):
      raise RuntimeError("this LLM is already served by another running app; the engine "
                         "must be stepped by one thread only")
    self._stepper = owner

  def unclaim(self, owner) -> None:
    """Give up ``owner``'s claim (nothing happens when someone else holds it)."""
    if self._stepper is owner:
      self._stepper = None

  def generate(self, prompts, sampling_params=None, sparse=None, *, return_trace: bool = False,
               progress=None, stream: Callable | None = None,
               stop: str | list[str] | None = None) -> list[GenerationOutput]:
    """Generate with continuous batching (add_request + step until done), outputs in order.

    ``prompts``: a string, a list of strings, a list of token ids, or a list of token-id lists.
    ``sampling_params`` / ``sparse``: one for all, or a list with one per prompt.
    ``stop``: stop strings for every prompt (see :meth:`add_request`); a stopped request's
    ``token_ids`` hold the mask id where nothing was committed when it stopped.
    """
    texts, ids = self._prompt_ids(prompts)
    sps = self._sampling_params(sampling_params, len(ids))
    sparses = list(sparse) if isinstance(sparse, (list, tuple)) else [sparse] * len(ids)
    if len(sparses) != len(ids):
      raise ValueError(f"sparse: expected one SparseConfig or a list of {len(ids)}")
    self._stops(stop)
    for i, (p, sp, spc) in enumerate(zip(ids, sps, sparses)):  # validate all before queueing any
      try:
        self.core.validate(p, sp, self.engine_config.sparse if spc is None else spc)
      except ValueError as e:
        raise ValueError(f"prompt {i}: {e}") from None
    rids = [self.add_request(p, sp, spc, stream=stream or False, return_trace=return_trace,
                             stop=stop)
            for p, sp, spc in zip(ids, sps, sparses)]
    done: dict[str, RequestOutput] = {}
    want = set(rids)
    while len(done) < len(rids):
      for out in self.step():
        if out.finished and out.request_id in want:
          done[out.request_id] = out
          if progress is not None:
            progress(len(done), len(rids))
    outs = [done[r].generation(i) for i, r in enumerate(rids)]
    for o, t in zip(outs, texts):
      o.prompt = t
    return outs

  def _stops(self, stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
      raise ValueError(f"stop: expected a non-empty string or a list of them, got {stop!r}")
    if stops and self.tokenizer is None:
      raise ValueError("stop strings need a tokenizer; pass tokenizer= or a model directory "
                       "with one")
    return stops

  # Public API ---------------------------------------------------------------------------------
  def default_sampling_params(self) -> SamplingParams:
    return SamplingParams().with_defaults(self.generation_config)

  def chat(self, messages, sampling_params=None, sparse=None, **kw) -> list[GenerationOutput]:
    """Apply the tokenizer's chat template, then :meth:`generate`. ``messages``: one
    conversation (a list of {"role", "content"} dicts) or a list of conversations."""
    if self.tokenizer is None:
      raise ValueError("chat needs a tokenizer; pass tokenizer= or a model directory with one")
    if messages and isinstance(messages[0], dict):
      messages = [messages]
    prompts = [self.tokenizer.apply_chat_template(m) for m in messages]
    ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    outs = self.generate(ids, sampling_params, sparse, **kw)
    for o, p in zip(outs, prompts):
      o.prompt = p
    return outs

  # Internals ----------------------------------------------------------------------------------
  def _prompt_ids(self, prompts) -> tuple[list[str | None], list[list[int]]]:
    if isinstance(prompts, str):
      prompts = [prompts]
    elif isinstance(prompts, (list, tuple)) and prompts and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompts):
      prompts = [list(prompts)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
      raise ValueError("prompts: expected a string, a list of strings or of token-id lists")
    texts, ids = [], []
    for i, p in enumerate(prompts):
      if isinstance(p, str):
        if self.tokenizer is None:
          raise ValueError("string prompts need a tokenizer; pass token ids or a tokenizer")
        texts.append(p)
        ids.append(self.tokenizer.encode(p, add_special_tokens=False))
      elif isinstance(p, (list, tuple, np.ndarray)):
        row = [int(t) for t in p]
        bad = [t for t in row if not 0 <= t < self.cfg.vocab_size]
        if bad:
          raise ValueError(f"prompt {i}: token id {bad[0]} outside [0, {self.cfg.vocab_size})")
        if self.cfg.mask_token_id in row:
          raise ValueError(f"prompt {i}: contains the mask token id {self.cfg.mask_token_id}")
        texts.append(None)
        ids.append(row)
      else:
        raise ValueError(f"prompt {i}: expected a string or a list of token ids, "
                         f"got {type(p).__name__}")
    return texts, ids

  def _sampling_params(self, sp, n: int) -> list[SamplingParams]:
    if sp is None:
      sp = SamplingParams()
    if isinstance(sp, SamplingParams):
      sps = [sp] * n
    else:
      sps = list(sp)
      if len(sps) != n or not all(isinstance(s, SamplingParams) for s in sps):
        raise ValueError(f"sampling_params: expected one SamplingParams or a list of {n}")
    return [s.with_defaults(self.generation_config) for s in sps]

  def text(self, token_ids: list[int]) -> str | None:
    """The text of generated ids up to the first EOS / EoT (special tokens skipped), or None
    without a tokenizer."""
    if self.tokenizer is None:
      return None
    stop = next((j for j, t in enumerate(token_ids) if t in self.cfg.eos_ids), len(token_ids))
    return self.tokenizer.decode(token_ids[:stop], skip_special_tokens=True)

  def prepare(self, prompts, sampling_params=None):
    """(texts, token-id lists, SamplingParams with the model's defaults) for ``generate``-style
    arguments, validated (ValueError naming the prompt)."""
    texts, ids = self._prompt_ids(prompts)
    return texts, ids, self._sampling_params(sampling_params, len(ids))
