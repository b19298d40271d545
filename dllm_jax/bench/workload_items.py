"""What the requests of a workload are: :class:`WorkItem`, and their content.

The content of a workload (:class:`Content`) is a category mix (:class:`Category`: weight,
lognormal prompt length in tokens, generation length), a prompt source (:class:`TextSource` cuts
prompts of a given token length from local text; :class:`TokenSource` draws random token ids
for random-weight models) and SamplingParams overrides. The arrival processes are in
:mod:`dllm_jax.bench.workloads`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
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
