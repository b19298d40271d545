"""Open-loop, seeded workload generators: LiveBench-like, Burst, OSC, Poisson, trace replay.

A workload is a list of :class:`WorkItem` sorted by arrival time (seconds from the start of the
run). Generators are *open loop*: arrival times never depend on how fast the engine answers.
Every generator is a pure function of its arguments and ``seed`` (``numpy.random.Generator``);
the arrival process and the request content draw from two independent child streams of the
seed, so changing e.g. the rate does not change the prompts.

Two independent parts make a request stream:

- the **arrival process** (this module's generators): ``poisson`` (constant rate), ``burst``
  (``burst_size`` requests at once every ``period_s``, or spread over a short high-rate spike),
  ``osc`` (Poisson whose rate oscillates between ``low_rate`` and ``high_rate``),
  ``livebench_like`` (Poisson at ``rate``, LiveBench-like content), ``trace`` (JSONL replay);
- the **content** (:class:`Content`): a category mix (:class:`Category`: weight, lognormal
  prompt length in tokens, generation length), a :class:`PromptSource` that cuts prompts of a
  given token length from local text (or draws random token ids for random-weight models), and
  SamplingParams overrides.

The paper's workloads are named but not defined (decoding-semantics.md §6): these are labelled
"-like" and every parameter is explicit. Burst and OSC use the LiveBench-like mix by default;
Poisson defaults to one fixed-length category so that it isolates the arrival process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Protocol, Sequence

import numpy as np

# WorkItem ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkItem:
  """One request of a workload.

  arrival_s: when it arrives, seconds after the start of the run (>= 0).
  prompt: text, or token ids (a tuple of ints).
  gen_length: generated positions (tokens) to decode.
  params: SamplingParams overrides for this request (e.g. {"block_length": 32}); read-only.
  category: a label for per-category reporting (e.g. "math").
  """

  arrival_s: float
  prompt: str | tuple[int, ...]
  gen_length: int
  params: dict = dataclasses.field(default_factory=dict)
  category: str = "default"

  def to_json(self) -> dict:
    prompt = self.prompt if isinstance(self.prompt, str) else list(self.prompt)
    return dict(arrival_s=self.arrival_s, prompt=prompt, gen_length=self.gen_length,
                params=dict(self.params), category=self.category)


# Content -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Category:
  """A request category: its share of the mix and its length distributions.

  weight: relative frequency (the mix is normalised to sum 1).
  median_tokens: median prompt length in tokens (the lognormal's exp(mu)).
  sigma: log-space standard deviation of the prompt length (0 = always ``median_tokens``).
  gen_length: generated tokens of this category's requests.
  The mean prompt length is median_tokens * exp(sigma**2 / 2).
  """

  name: str
  weight: float
  median_tokens: float
  sigma: float
  gen_length: int = 128

  def __post_init__(self):
    if not self.weight >= 0 or not self.median_tokens > 0 or not self.sigma >= 0:
      raise ValueError(f"category {self.name!r}: weight >= 0, median_tokens > 0 and sigma >= 0 "
                       f"required")
    if isinstance(self.gen_length, bool) or not isinstance(self.gen_length, int) or \
        self.gen_length < 1:
      raise ValueError(f"category {self.name!r}: gen_length must be a positive integer")

  @property
  def mean_tokens(self) -> float:
    return self.median_tokens * math.exp(self.sigma ** 2 / 2)


CATEGORIES = ("math", "coding", "reasoning", "data_analysis", "language",
              "instruction_following")

# LiveBench's real prompt-length distribution is not available offline (no network, and the
# paper ships no trace), so this mix is an ASSUMPTION, documented here, not a measurement:
# - weights are uniform: LiveBench scores its six categories with equal weight;
# - prompt lengths (LLaDA/GPT-style subword tokens) are lognormal per category -- lognormal because
#   prompt lengths are positive and right-skewed -- with medians from the character of each task:
#   math (competition problems, short statements) ~250; reasoning (zebra / web-of-lies puzzles,
#   a paragraph of premises) ~350; language (typo fixing, connections, plot unscrambling over a
#   passage; very variable) ~500; coding (LeetCode-style statement plus starter code) ~600;
#   instruction following (a news article plus formatting constraints) ~700; data analysis
#   (tables to reformat, join or annotate; the longest and most variable) ~800;
# - generation lengths: 256 for the tasks that reason step by step or write code, 128 otherwise.
# Scale the lengths to a small model with ``Content.length_scale`` / ``max_prompt_tokens``.
LIVEBENCH_MIX: tuple[Category, ...] = (
    Category("math", 1.0, 250, 0.6, 256),
    Category("coding", 1.0, 600, 0.5, 256),
    Category("reasoning", 1.0, 350, 0.5, 256),
    Category("data_analysis", 1.0, 800, 0.8, 128),
    Category("language", 1.0, 500, 0.8, 128),
    Category("instruction_following", 1.0, 700, 0.5, 128),
)

# Poisson's default content: one category of fixed length, so only arrivals vary.
FIXED_MIX: tuple[Category, ...] = (Category("default", 1.0, 128, 0.0, 128),)


class PromptSource(Protocol):
  """Makes one prompt of about ``n_tokens`` tokens from ``rng``."""

  def sample(self, rng: np.random.Generator, n_tokens: int) -> str | tuple[int, ...]:
    ...


class TextSource:
  """Prompts cut from local text.

  texts: the documents; default ``dllm_jax.train.corpus.load_corpus("heldout")`` (the demo
    model's committed held-out split). They are joined with blank lines into one stream and a
    prompt is a window of it at a uniformly drawn offset (wrapping around when shorter).
  tokenizer: if given (anything with ``encode(text, add_special_tokens=False)``), the stream is
    tokenized once and prompts are exact-length token-id tuples; otherwise prompts are strings
    of ``round(n_tokens * chars_per_token)`` characters (4 characters per token is the usual
    English BPE ratio).
  """

  def __init__(self, texts: Sequence[str] | None = None, tokenizer=None,
               chars_per_token: float = 4.0):
    if texts is None:
      texts = _default_texts()
    texts = [t for t in texts if t]
    if not texts:
      raise ValueError("TextSource: no text to cut prompts from")
    self.stream = "\n\n".join(texts)
    self.tokenizer = tokenizer
    self.chars_per_token = float(chars_per_token)
    self._ids: np.ndarray | None = None

  def _token_stream(self) -> np.ndarray:
    if self._ids is None:
      # HF tokenizers warn that the stream exceeds the model's length; only windows are used.
      log = logging.getLogger("transformers.tokenization_utils_base")
      level = log.level
      log.setLevel(logging.ERROR)
      try:
        ids = self.tokenizer.encode(self.stream, add_special_tokens=False)
      finally:
        log.setLevel(level)
      self._ids = np.asarray(ids, np.int64)
    return self._ids

  def sample(self, rng: np.random.Generator, n_tokens: int) -> str | tuple[int, ...]:
    if self.tokenizer is not None:
      ids = self._token_stream()
      return tuple(_window(ids, int(rng.integers(len(ids))), n_tokens).tolist())
    n_chars = max(1, round(n_tokens * self.chars_per_token))
    off = int(rng.integers(len(self.stream)))
    return "".join(_window(self.stream, off, n_chars))


class TokenSource:
  """Uniformly random token ids in [0, vocab_size) minus ``exclude`` (for random-weight models,
  whose prompts need no meaning). :meth:`for_model` excludes the model's special ids."""

  def __init__(self, vocab_size: int, exclude: Sequence[int] = ()):
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(exclude), np.int64))
    if not len(allowed):
      raise ValueError("TokenSource: no token id left to draw")
    self.allowed = allowed

  @classmethod
  def for_model(cls, cfg) -> "TokenSource":
    special = [cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.eot_token_id,
               cfg.bos_token_id]
    return cls(cfg.vocab_size, [i for i in special if i is not None])

  def sample(self, rng: np.random.Generator, n_tokens: int) -> tuple[int, ...]:
    return tuple(self.allowed[rng.integers(len(self.allowed), size=n_tokens)].tolist())


def _window(seq, offset: int, n: int):
  """``n`` consecutive elements of ``seq`` from ``offset``, wrapping around."""
  reps = -(-(offset + n) // len(seq))
  if reps == 1:
    return seq[offset:offset + n]
  if isinstance(seq, str):
    return (seq * reps)[offset:offset + n]
  return np.tile(seq, reps)[offset:offset + n]


def _default_texts() -> list[str]:
  from dllm_jax.train.corpus import load_corpus
  try:
    return load_corpus("heldout")
  except FileNotFoundError as e:
    raise ValueError(f"no default prompt text ({e}); pass TextSource(texts=[...])") from None


@dataclasses.dataclass(frozen=True)
class Content:
  """What the requests of a workload contain.

  mix: the categories (default: :data:`LIVEBENCH_MIX`).
  source: where prompts come from (default: ``TextSource()``, text cut from the held-out corpus).
  length_scale: multiplies every drawn prompt length (to fit a small model's context).
  min_prompt_tokens / max_prompt_tokens: clip of the scaled prompt length (tokens; None = no
    upper clip). Lengths are ``clip(round(lognormal(ln median, sigma) * length_scale))``.
  gen_length: if set, replaces every category's generation length.
  params: SamplingParams overrides put on every item (e.g. {"block_length": 32}).
  """

  mix: tuple[Category, ...] = LIVEBENCH_MIX
  source: Any = None
  length_scale: float = 1.0
  min_prompt_tokens: int = 4
  max_prompt_tokens: int | None = None
  gen_length: int | None = None
  params: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not self.mix:
      raise ValueError("Content.mix: at least one category required")
    if sum(c.weight for c in self.mix) <= 0:
      raise ValueError("Content.mix: weights must not all be 0")
    if not self.length_scale > 0:
      raise ValueError(f"Content.length_scale: must be > 0, got {self.length_scale}")
    if self.min_prompt_tokens < 1:
      raise ValueError("Content.min_prompt_tokens: must be >= 1")
    if self.max_prompt_tokens is not None and self.max_prompt_tokens < self.min_prompt_tokens:
      raise ValueError("Content.max_prompt_tokens: must be >= min_prompt_tokens")

  @property
  def probabilities(self) -> np.ndarray:
    w = np.asarray([c.weight for c in self.mix], np.float64)
    return w / w.sum()


def sample_content(rng: np.random.Generator, n: int, content: Content) -> list[tuple]:
  """``n`` (category, prompt, gen_length) triples drawn from ``content``."""
  source = content.source if content.source is not None else TextSource()
  cats = rng.choice(len(content.mix), size=n, p=content.probabilities)
  medians = np.asarray([content.mix[c].median_tokens for c in cats], np.float64)
  sigmas = np.asarray([content.mix[c].sigma for c in cats], np.float64)
  lengths = rng.lognormal(np.log(medians), sigmas) * content.length_scale
  hi = content.max_prompt_tokens if content.max_prompt_tokens is not None else np.inf
  lengths = np.clip(np.round(lengths), content.min_prompt_tokens, hi).astype(np.int64)
  out = []
  for c, n_tok in zip(cats, lengths):
    cat = content.mix[c]
    gen = content.gen_length if content.gen_length is not None else cat.gen_length
    out.append((cat.name, source.sample(rng, int(n_tok)), int(gen)))
  return out


def _assemble(arrivals: np.ndarray, rng: np.random.Generator, content: Content) -> list[WorkItem]:
  bodies = sample_content(rng, len(arrivals), content)
  items = [WorkItem(arrival_s=float(t), prompt=p, gen_length=g, params=dict(content.params),
                    category=c) for t, (c, p, g) in zip(arrivals, bodies)]
  return sorted(items, key=lambda it: it.arrival_s)


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
  """(arrivals, content) generators: independent child streams of ``seed``."""
  a, c = np.random.SeedSequence(seed).spawn(2)
  return np.random.default_rng(a), np.random.default_rng(c)


def _check_n(n: int) -> None:
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"n: expected a positive number of requests, got {n!r}")


def _check_rate(name: str, rate: float) -> None:
  if not rate > 0:
    raise ValueError(f"{name}: expected a rate > 0 requests/s, got {rate!r}")


# Arrival processes ---------------------------------------------------------------------------


def poisson_arrivals(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
  """``n`` arrival times (s) of a Poisson process of ``rate`` requests/s; the first at t = 0
  (as a benchmark client sends its first request at once), then exponential gaps of mean
  1/rate. ``rate = inf`` puts every arrival at 0 (an offline batch)."""
  if math.isinf(rate):
    return np.zeros(n)
  gaps = rng.exponential(1.0 / rate, size=n - 1)
  return np.concatenate([[0.0], np.cumsum(gaps)])


def poisson(n: int, *, rate: float = 2.0, seed: int = 0,
            content: Content | None = None) -> list[WorkItem]:
  """Constant-rate Poisson arrivals.

  n: requests. rate: mean arrivals per second (inf = all at t = 0); the first arrives at t = 0
  and the mean gap is 1/rate s, so (n - 1) / last arrival -> rate. content: default one
  fixed-length category (:data:`FIXED_MIX`: 128 prompt tokens, 128 generated).
  """
  _check_n(n)
  _check_rate("rate", rate)
  ra, rc = _streams(seed)
  return _assemble(poisson_arrivals(ra, n, rate), rc, content or Content(mix=FIXED_MIX))


def livebench_like(n: int, *, rate: float = 2.0, seed: int = 0,
                   content: Content | None = None) -> list[WorkItem]:
  """LiveBench-like: Poisson arrivals at ``rate`` requests/s with the LiveBench-like prompt mix.

  The content defaults to :data:`LIVEBENCH_MIX` (six categories, uniform weights, per-category
  lognormal prompt lengths; an assumption documented there) with prompts cut from the held-out
  corpus. Pass ``Content(length_scale=..., max_prompt_tokens=...)`` to fit a small model.
  """
  _check_n(n)
  _check_rate("rate", rate)
  ra, rc = _streams(seed)
  return _assemble(poisson_arrivals(ra, n, rate), rc, content or Content())


def burst_arrivals(rng: np.random.Generator, n: int, burst_size: int, period_s: float,
                   spread_s: float) -> np.ndarray:
  """Burst k (k = 0, 1, ...) holds requests k*burst_size .. (k+1)*burst_size - 1 (the last one
  may be partial) and starts at k * period_s. spread_s = 0: all arrive at that instant;
  spread_s > 0: they arrive uniformly at random within [start, start + spread_s) -- a short
  spike of about burst_size / spread_s requests/s."""
  k = np.arange(n) // burst_size
  offsets = rng.uniform(0.0, spread_s, size=n) if spread_s > 0 else np.zeros(n)
  return k * period_s + offsets


def burst(n: int, *, burst_size: int = 8, period_s: float = 10.0, spread_s: float = 0.0,
          seed: int = 0, content: Content | None = None) -> list[WorkItem]:
  """Bursty arrivals: ``burst_size`` requests every ``period_s`` seconds.

  spread_s: 0 (default) sends each burst at one instant; > 0 spreads it uniformly over the
  first ``spread_s`` seconds of its period (a high-rate spike). Mean rate = burst_size /
  period_s requests/s. content: default the LiveBench-like mix.
  """
  _check_n(n)
  if isinstance(burst_size, bool) or not isinstance(burst_size, int) or burst_size < 1:
    raise ValueError(f"burst_size: expected a positive integer, got {burst_size!r}")
  if not period_s > 0:
    raise ValueError(f"period_s: expected > 0 seconds, got {period_s!r}")
  if not 0 <= spread_s <= period_s:
    raise ValueError(f"spread_s: expected 0 <= spread_s <= period_s, got {spread_s!r}")
  ra, rc = _streams(seed)
  return _assemble(burst_arrivals(ra, n, burst_size, period_s, spread_s), rc,
                   content or Content())


OSC_SHAPES = ("square", "sine")


def osc_rate(t, low_rate: float, high_rate: float, period_s: float, shape: str = "square",
             high_fraction: float = 0.5):
  """The OSC rate (requests/s) at time ``t`` (s; scalar or array). Each period starts low.

  square: ``low_rate`` for the first (1 - high_fraction) of each period, ``high_rate`` for the
  rest. sine: low + (high - low) * (1 - cos(2 pi t / period)) / 2 (low at 0, high at period/2).
  """
  phase = np.mod(t, period_s) / period_s
  if shape == "square":
    return np.where(phase >= 1.0 - high_fraction, high_rate, low_rate)
  return low_rate + (high_rate - low_rate) * (1.0 - np.cos(2 * np.pi * phase)) / 2


def osc_arrivals(rng: np.random.Generator, n: int, low_rate: float, high_rate: float,
                 period_s: float, shape: str, high_fraction: float) -> np.ndarray:
  """``n`` arrivals of the non-homogeneous Poisson process of :func:`osc_rate`, by thinning
  (Lewis-Shedler): candidates at rate max(low, high), each kept with probability
  rate(t) / max rate."""
  peak = max(low_rate, high_rate)
  out, t = [], 0.0
  while sum(len(o) for o in out) < n:
    m = max(64, 2 * n)  # candidates per batch, vectorised
    cand = t + np.cumsum(rng.exponential(1.0 / peak, size=m))
    keep = rng.uniform(size=m) * peak < osc_rate(cand, low_rate, high_rate, period_s, shape,
                                                 high_fraction)
    out.append(cand[keep])
    t = cand[-1]
  return np.concatenate(out)[:n]


def osc(n: int, *, low_rate: float = 0.5, high_rate: float = 4.0, period_s: float = 20.0,
        shape: str = "square", high_fraction: float = 0.5, seed: int = 0,
        content: Content | None = None) -> list[WorkItem]:
  """Oscillating load: Poisson arrivals whose rate alternates between ``low_rate`` and
  ``high_rate`` (requests/s) with period ``period_s`` seconds (see :func:`osc_rate`; square
  wave by default, high for the last ``high_fraction`` of each period). The mean rate is
  low + (high - low) * high_fraction for the square wave, (low + high) / 2 for the sine.
  content: default the LiveBench-like mix.
  """
  _check_n(n)
  _check_rate("low_rate", low_rate)
  _check_rate("high_rate", high_rate)
  if not period_s > 0:
    raise ValueError(f"period_s: expected > 0 seconds, got {period_s!r}")
  if shape not in OSC_SHAPES:
    raise ValueError(f"shape: expected one of {OSC_SHAPES}, got {shape!r}")
  if not 0 < high_fraction < 1:
    raise ValueError(f"high_fraction: expected in (0, 1), got {high_fraction!r}")
  ra, rc = _streams(seed)
  arrivals = osc_arrivals(ra, n, low_rate, high_rate, period_s, shape, high_fraction)
  return _assemble(arrivals, rc, content or Content())


# Trace replay --------------------------------------------------------------------------------

TRACE_KEYS = ("arrival_s", "prompt", "gen_length", "params", "category")
PARAM_KEYS = ("steps", "block_length", "temperature", "confidence", "rule", "threshold",
              "factor", "schedule", "seed", "stop_on_eos")


class TraceError(ValueError):
  """A malformed trace line; the message names the file and line."""


def save_trace(items: Sequence[WorkItem], path: str | os.PathLike) -> None:
  """Write ``items`` as JSONL, one :meth:`WorkItem.to_json` object per line."""
  with open(path, "w") as fh:
    for it in items:
      fh.write(json.dumps(it.to_json()) + "\n")


def trace(path: str | os.PathLike) -> list[WorkItem]:
  """Replay a JSONL trace: one JSON object per line (blank lines are skipped) with

  arrival_s (number >= 0, seconds from the start), prompt (a string or a list of token ids >= 0),
  gen_length (integer >= 1), optional params (an object of SamplingParams overrides: any of
  :data:`PARAM_KEYS`) and optional category (a string). Unknown keys are errors (they are
  usually typos). Items are returned sorted by arrival (stable). Raises :class:`TraceError`
  naming ``path:line`` for a bad line and FileNotFoundError for a missing file.
  """
  p = os.fspath(path)
  if not os.path.isfile(p):
    raise FileNotFoundError(f"trace not found: {p}")
  items = []
  with open(p) as fh:
    for lineno, line in enumerate(fh, 1):
      if line.strip():
        items.append(_parse_line(line, f"{p}:{lineno}"))
  if not items:
    raise TraceError(f"{p}: the trace has no requests")
  return sorted(items, key=lambda it: it.arrival_s)


def _parse_line(line: str, where: str) -> WorkItem:
  try:
    d = json.loads(line)
  except json.JSONDecodeError as e:
    raise TraceError(f"{where}: not valid JSON ({e.msg})") from None
  if not isinstance(d, dict):
    raise TraceError(f"{where}: expected a JSON object, got {type(d).__name__}")
  unknown = sorted(set(d) - set(TRACE_KEYS))
  if unknown:
    raise TraceError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(TRACE_KEYS)})")
  for key in ("arrival_s", "prompt", "gen_length"):
    if key not in d:
      raise TraceError(f"{where}: missing {key!r}")
  return WorkItem(arrival_s=_arrival(d["arrival_s"], where), prompt=_prompt(d["prompt"], where),
                  gen_length=_gen_length(d["gen_length"], where),
                  params=_params(d.get("params", {}), d["gen_length"], where),
                  category=_category(d.get("category", "default"), where))


def _arrival(v, where: str) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
    raise TraceError(f"{where}: arrival_s must be a finite number >= 0, got {v!r}")
  return float(v)


def _prompt(v, where: str) -> str | tuple[int, ...]:
  if isinstance(v, str):
    if not v:
      raise TraceError(f"{where}: prompt is empty")
    return v
  if isinstance(v, list) and v and all(
      isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
    return tuple(v)
  raise TraceError(f"{where}: prompt must be a non-empty string or a non-empty list of token "
                   f"ids >= 0")


def _gen_length(v, where: str) -> int:
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    raise TraceError(f"{where}: gen_length must be an integer >= 1, got {v!r}")
  return v


def _params(v, gen_length: int, where: str) -> dict:
  if not isinstance(v, dict):
    raise TraceError(f"{where}: params must be an object, got {type(v).__name__}")
  unknown = sorted(set(v) - set(PARAM_KEYS))
  if unknown:
    raise TraceError(f"{where}: params: unknown key {unknown[0]!r} "
                     f"(expected any of {', '.join(PARAM_KEYS)})")
  from dllm_jax.config import SamplingParams
  try:
    SamplingParams(gen_length=gen_length, **v)
  except ValueError as e:
    raise TraceError(f"{where}: params: {e}") from None
  return dict(v)


def _category(v, where: str) -> str:
  if not isinstance(v, str) or not v:
    raise TraceError(f"{where}: category must be a non-empty string, got {v!r}")
  return v


# Dispatch (CLI) ------------------------------------------------------------------------------

WORKLOADS = ("livebench-like", "burst", "osc", "poisson", "trace")


def make_workload(name: str, n: int, *, seed: int = 0, content: Content | None = None,
                  trace_path: str | None = None, **kw: Any) -> list[WorkItem]:
  """Build workload ``name`` (one of :data:`WORKLOADS`) from keyword arguments of its
  generator; ``trace`` replays ``trace_path`` and keeps its first ``n`` items."""
  if name == "trace":
    if not trace_path:
      raise ValueError("workload 'trace' needs a trace file (--trace PATH)")
    return trace(trace_path)[:n]
  fns = {"livebench-like": livebench_like, "burst": burst, "osc": osc, "poisson": poisson}
  if name not in fns:
    raise ValueError(f"workload: expected one of {WORKLOADS}, got {name!r}")
  return fns[name](n, seed=seed, content=content, **kw)


def summarize(items: Sequence[WorkItem]) -> dict:
  """Counts and spans of a workload (JSON-able): requests, arrival span, per-category counts,
  mean prompt length (tokens for id prompts, characters for text)."""
  cats: dict[str, int] = {}
  for it in items:
    cats[it.category] = cats.get(it.category, 0) + 1
  lens = [len(it.prompt) for it in items]
  return dict(requests=len(items), first_arrival_s=items[0].arrival_s if items else None,
              last_arrival_s=items[-1].arrival_s if items else None, categories=cats,
              mean_prompt_len=float(np.mean(lens)) if lens else None,
              mean_gen_length=float(np.mean([it.gen_length for it in items])) if items else None)
