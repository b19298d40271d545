"""The demo model's training data: the corpus as one token stream, and random windows of it."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np


def encode_all(tok, docs: Sequence[str]) -> list[list[int]]:
  """Token ids of each document (no special tokens)."""
  fast = getattr(getattr(tok, "hf", None), "backend_tokenizer", None)
  if fast is not None:  # the Rust batch encoder: same ids as tok.encode, much faster
    return [e.ids for e in fast.encode_batch(list(docs), add_special_tokens=False)]
  return [tok.encode(d, add_special_tokens=False) for d in docs]


def token_stream(docs: Sequence[str], tok, *, chat_fraction: float = 0.0,
                 seed: int = 0) -> np.ndarray:
  """All documents as one int32 stream [T], each followed by eos.

  A seeded ``chat_fraction`` of the documents is written in the chat format instead (first line as
  the user turn, the rest as the assistant turn, each closed by eot), so the demo model has seen
  its chat markers. Needs ``tok.bos_token_id`` / ``eot_token_id`` when ``chat_fraction > 0``.
  """
  docs = list(docs)
  chat = np.random.default_rng(seed).random(len(docs)) < chat_fraction
  if chat.any():
    user_id, asst_id = (tok.token_id(t) for t in ("<|user|>", "<|assistant|>"))
    if None in (user_id, asst_id, tok.bos_token_id, tok.eot_token_id):
      raise ValueError("chat_fraction > 0 needs bos, eot, <|user|> and <|assistant|> tokens")
  texts, heads = [], []
  for d, c in zip(docs, chat):
    first, _, rest = d.partition("\n")
    rest = re.sub(r"\A[*=~^-]+\n", "", rest)  # a reST title underline belongs to neither turn
    if c and rest.strip():
      heads.append((first.strip(), rest.lstrip("\n")))
      texts.extend([heads[-1][0], heads[-1][1]])
    else:
      heads.append(None)
      texts.append(d)
  ids = iter(encode_all(tok, texts))
  eos = tok.eos_token_id
  out: list[int] = []
  nl = encode_all(tok, ["\n"])[0]
  for h in heads:
    if h is None:
      out.extend(next(ids))
    else:
      user, answer = next(ids), next(ids)
      # <|bos|><|user|>\n{first line}<|eot|><|assistant|>\n{rest}<|eot|>, as the chat template.
      out += [tok.bos_token_id, user_id] + nl + user
      out += [tok.eot_token_id, asst_id] + nl + answer
      out.append(tok.eot_token_id)
    out.append(eos)
  return np.asarray(out, np.int32)


def sample_windows(rng: np.random.Generator, stream: np.ndarray, batch: int,
                   seq_len: int) -> np.ndarray:
  """``batch`` random windows [batch, seq_len] int32 of ``stream`` (advances ``rng``)."""
  if len(stream) <= seq_len:
    raise ValueError(f"token stream of {len(stream)} tokens is shorter than seq_len {seq_len}")
  starts = rng.integers(0, len(stream) - seq_len + 1, size=batch)
  return stream[starts[:, None] + np.arange(seq_len)[None, :]]


def as_stream(docs, tok, eos_id: int | None) -> np.ndarray:
  """Documents (strings, or token-id lists) -> one stream with eos between documents."""
  docs = list(docs)
  if docs and isinstance(docs[0], str):
    if tok is None:
      raise ValueError("text documents need a tokenizer")
    docs = encode_all(tok, docs)
    eos_id = tok.eos_token_id if eos_id is None else eos_id
  out: list[int] = []
  for d in docs:
    out.extend(int(i) for i in d)
    if eos_id is not None:
      out.append(eos_id)
  return np.asarray(out, np.int32)
