"""``LLM``: load a model and generate with diffusion decoding.

    llm = LLM()                                   # the bundled demo model
    out = llm.generate(["The socket module"], SamplingParams(gen_length=64))
    print(out[0].text, out[0].nfe)

``generate`` never applies a chat template; ``chat`` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np

from dllm_jax.config import EngineConfig, SamplingParams, SparseConfig
from dllm_jax.sampling.plan import LogitPlan
from dllm_jax.engine.core import EngineCore
from dllm_jax.model.transformer import Transformer

DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "demo")


@dataclasses.dataclass
class GenerationOutput:
  """Result of one request.

  ``token_ids`` are all gen_length generated positions (after EOS fill); ``text`` decodes them up
  to the first EOS / EoT (special tokens skipped). ``trace`` (on request) holds the generated
  positions after every step, mask ids marking positions not yet committed.
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
    self.tokenizer = tokenizer
    if generation_config is None and path:
      gc = os.path.join(path, "generation_config.json")
      if os.path.isfile(gc):
        with open(gc) as fh:
          generation_config = json.load(fh)
    self.generation_config = dict(generation_config or {})
    self.logit_plan = logit_plan or LogitPlan()
    self.engine_config = engine_config or EngineConfig()
    self._core: EngineCore | None = None
    self._devices = devices
    self._outputs: dict[str, GenerationOutput] = {}
    self._collect: set[str] = set()

  @property
  def core(self) -> EngineCore:
    """The continuous-batching engine (built on first use)."""
    if self._core is None:
      self._core = EngineCore(self.model, self.engine_config, self._devices)
    return self._core

  # Continuous batching ------------------------------------------------------------------------
  def add_request(self, prompt, sampling_params: SamplingParams | None = None,
                  sparse: SparseConfig | None = None, *, request_id: str | None = None,
                  stream: Callable | None = None, return_trace: bool = False) -> str:
    """Queue one request; returns its id. ``prompt``: text or token ids. ``sparse``: this
    request's SparseConfig (default: the engine's). ``stream(request_id, token_ids, finished)``
    is called with the committed left prefix of the generation whenever it grows."""
    if not isinstance(prompt, (str, list, tuple, np.ndarray)):
      raise ValueError(f"prompt: expected text or a list of token ids, got {type(prompt).__name__}")
    if len(prompt) and not isinstance(prompt, str) and isinstance(prompt[0], (list, tuple,
                                                                               np.ndarray)):
      raise ValueError("add_request takes one prompt (text or token ids); use generate for many")
    texts, ids = self._prompt_ids([list(prompt)] if not isinstance(prompt, str) else [prompt])
    sp = self._sampling_params(sampling_params, 1)[0]
    sparse = self.engine_config.sparse if sparse is None else sparse
    callback = None
    if stream is not None:
      def callback(req, finished):
        stream(req.request_id, req.generated[:req.committed_prefix()].tolist(), finished)
    rid = self.core.add(ids[0], sp, sparse, request_id=request_id, callback=callback,
                        prompt=texts[0])
    if return_trace:
      self.core._requests[rid].trace = []
    return rid

  def step(self) -> list[GenerationOutput]:
    """One engine step; returns the outputs of the requests that finished in it."""
    outs = []
    for req in self.core.step():
      out = self._output(req)
      if req.request_id in self._collect:  # generate() is waiting for it
        self._outputs[req.request_id] = out
      outs.append(out)
    return outs

  def abort(self, request_id: str) -> bool:
    """Cancel a request; its KV pages are freed at the next step."""
    return self.core.abort(request_id)

  def has_unfinished(self) -> bool:
    return self._core is not None and self._core.has_unfinished()

  def generate(self, prompts, sampling_params=None, sparse=None, *, return_trace: bool = False,
               progress=None, stream: Callable | None = None) -> list[GenerationOutput]:
    """Generate with continuous batching (add_request + step until done), outputs in order.

    ``prompts``: a string, a list of strings, a list of token ids, or a list of token-id lists.
    ``sampling_params`` / ``sparse``: one for all, or a list with one per prompt.
    """
    texts, ids = self._prompt_ids(prompts)
    sps = self._sampling_params(sampling_params, len(ids))
    sparses = list(sparse) if isinstance(sparse, (list, tuple)) else [sparse] * len(ids)
    if len(sparses) != len(ids):
      raise ValueError(f"sparse: expected one SparseConfig or a list of {len(ids)}")
    for i, (p, sp, spc) in enumerate(zip(ids, sps, sparses)):  # validate all before queueing any
      try:
        self.core.validate(p, sp, self.engine_config.sparse if spc is None else spc)
      except ValueError as e:
        raise ValueError(f"prompt {i}: {e}") from None
    rids = [self.add_request(p, sp, spc, stream=stream, return_trace=return_trace)
            for p, sp, spc in zip(ids, sps, sparses)]
    self._collect.update(rids)
    pending = set(rids)
    while pending:
      for out in self.step():
        pending.discard(out.request_id)
        if progress is not None:
          progress(len(rids) - len(pending), len(rids))
    outs = [self._outputs.pop(r) for r in rids]
    self._collect.difference_update(rids)
    for i, (o, t) in enumerate(zip(outs, texts)):
      o.index, o.prompt = i, t
    return outs

  def _output(self, req) -> GenerationOutput:
    gen = req.generated.tolist()
    return GenerationOutput(
        index=0, prompt_token_ids=list(req.prompt_ids), token_ids=gen,
        text=self.text(gen), nfe=req.step, finish_reason=req.finish_reason or "length",
        prompt=req.prompt, trace=req.trace, request_id=req.request_id,
        metrics=dict(arrival=req.arrival, first_token=req.first_token_time,
                     finish=req.finish_time))

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
