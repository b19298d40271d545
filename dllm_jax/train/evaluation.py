"""Held-out evaluation of a masked-diffusion model: masked-token accuracy and its unigram floor.

Both scorers read the same windows and masks (:func:`eval_windows`), so their figures compare.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax.model.transformer import Transformer, lm_head_logits
from dllm_jax.train.data import as_stream


def eval_windows(docs, *, seq_len: int, ratio: float, seed: int, tokenizer=None,
                 eos_id: int | None = None, num_windows: int | None = None):
  """Consecutive non-overlapping windows [W, S] of the documents and an exact-fraction mask [W, S]
  (``round(ratio * S)`` positions per window, chosen by a seeded RNG)."""
  if not 0 < ratio <= 1:
    raise ValueError(f"ratio: must be in (0, 1], got {ratio}")
  stream = as_stream(docs, tokenizer, eos_id)
  w = len(stream) // seq_len
  if num_windows is not None:
    w = min(w, num_windows)
  if w < 1:
    raise ValueError(f"held-out text has {len(stream)} tokens, fewer than seq_len {seq_len}")
  windows = stream[: w * seq_len].reshape(w, seq_len)
  rng = np.random.default_rng(seed)
  k = max(1, round(ratio * seq_len))
  mask = np.zeros((w, seq_len), bool)
  for i in range(w):
    mask[i, rng.permutation(seq_len)[:k]] = True
  return windows, mask


def masked_accuracy(model: Transformer, docs, ratio: float, seq_len: int = 128, seed: int = 0, *,
                    tokenizer=None, num_windows: int | None = None, batch: int = 16) -> float:
  """Argmax accuracy on masked positions of held-out windows, one forward pass per window.

  ``docs``: strings (tokenized with ``tokenizer``, eos between) or token-id lists.
  """
  windows, mask = eval_windows(docs, seq_len=seq_len, ratio=ratio, seed=seed, tokenizer=tokenizer,
                               eos_id=model.cfg.eos_token_id, num_windows=num_windows)
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, noisy):
    m = nnx.merge(graphdef, state)
    b, s = noisy.shape
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    h = m.refresh(noisy, pos, jnp.full((b,), s, jnp.int32))
    return jnp.argmax(lm_head_logits(m, h), axis=-1)

  correct = total = 0
  for i in range(0, len(windows), batch):
    x, msk = windows[i:i + batch], mask[i:i + batch]
    n = len(x)
    if n < batch:  # pad to one shape: one compilation
      x = np.concatenate([x, np.zeros((batch - n, seq_len), np.int32)])
      msk = np.concatenate([msk, np.zeros((batch - n, seq_len), bool)])
    noisy = np.where(msk, model.cfg.mask_token_id, x).astype(np.int32)
    pred = np.asarray(predict(state, jnp.asarray(noisy)))
    correct += int(np.sum((pred == x) & msk))
    total += int(np.sum(msk))
  return correct / total


def most_frequent_token(train_docs, tokenizer=None, eos_id: int | None = None) -> int:
  stream = as_stream(train_docs, tokenizer, eos_id)
  return int(np.argmax(np.bincount(stream)))


def unigram_baseline_accuracy(train_docs, heldout_docs, tokenizer=None, *, ratio: float = 0.5,
                              seq_len: int = 128, seed: int = 0, num_windows: int | None = None,
                              eos_id: int | None = None, top_token: int | None = None) -> float:
  """Accuracy of always predicting the single most frequent token of the TRAIN stream (eos
  separators included), on exactly the masked positions :func:`masked_accuracy` scores with the
  same arguments. (A context-free predictor cannot do better than the best single token.)
  ``top_token`` skips re-counting the train documents."""
  top = most_frequent_token(train_docs, tokenizer, eos_id) if top_token is None else top_token
  windows, mask = eval_windows(heldout_docs, seq_len=seq_len, ratio=ratio, seed=seed,
                               tokenizer=tokenizer, eos_id=eos_id, num_windows=num_windows)
  return float(np.sum((windows == top) & mask) / np.sum(mask))
