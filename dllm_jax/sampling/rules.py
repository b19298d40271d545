"""Confidence kinds and commit rules, per row, over a row's candidate positions [B, C].

Candidates not eligible (padding, already committed, outside the current block) carry -inf
confidence and are never committed. Ranking is by confidence, ties to the lowest position.

Rules:
- ``fixed``: commit the k most confident (k from the schedule).
- ``threshold`` (Fast-dLLM): commit every candidate with confidence >= tau, and always the most
  confident one (so each step commits at least one token).
- ``factor`` (Fast-dLLM v1): sort confidences c1 >= c2 >= ...; the i-th passes when
  c_i >= 1 - f / (i + 1) (the first always passes); commit the leading run that passes. Fast-dLLM's
  code also commits everything when the first failure is the last candidate; we do not copy that
  quirk (it commits a token that failed its own threshold).
"""

from __future__ import annotations

import jax.numpy as jnp

from dllm_jax.sampling_params import CONFIDENCE_KINDS, RULES, SCHEDULES

# The runtime ids of the options are their positions in the one list of each (config).
CONFIDENCE_IDS = {k: i for i, k in enumerate(CONFIDENCE_KINDS)}
RULE_IDS = {k: i for i, k in enumerate(RULES)}
SCHEDULE_IDS = {k: i for i, k in enumerate(SCHEDULES)}


def pick_confidence(kind, prob, rand, margin, entropy):
  """Per-row confidence kind [B] -> confidences [B, C]. Unused inputs may be None."""
  out = prob
  for kid, val in ((1, rand), (2, margin), (3, entropy)):
    if val is not None:
      out = jnp.where((kind == kid)[:, None], val, out)
  return out


def rank_of(conf):
  """0-based rank of each candidate by descending confidence, ties to the lowest position."""
  order = jnp.argsort(-conf, axis=-1, stable=True)
  c = conf.shape[-1]
  ranks = jnp.zeros_like(order)
  rows = jnp.arange(conf.shape[0])[:, None]
  return ranks.at[rows, order].set(jnp.broadcast_to(jnp.arange(c), order.shape)), order


def commit_mask(conf, eligible, rule, k, threshold, factor):
  """Which candidates to commit this step.

  conf [B, C] f32; eligible [B, C] bool; rule [B] int (RULE_IDS); k [B] int (fixed rule);
  threshold, factor [B] f32. Returns bool [B, C].
  """
  conf = jnp.where(eligible, conf, -jnp.inf)
  rank, order = rank_of(conf)
  fixed = rank < k[:, None]
  thresh = (conf >= threshold[:, None]) | (rank == 0)
  sorted_conf = jnp.take_along_axis(conf, order, axis=-1)
  sorted_ok = jnp.take_along_axis(eligible, order, axis=-1)
  i = jnp.arange(1, conf.shape[-1] + 1, dtype=jnp.float32)[None, :]
  passes = (sorted_conf >= 1.0 - factor[:, None] / (i + 1.0)) | (i == 1)
  lead = jnp.sum(jnp.cumprod(passes & sorted_ok, axis=-1), axis=-1)
  fac = rank < lead[:, None]
  chosen = jnp.where((rule == 0)[:, None], fixed, jnp.where((rule == 1)[:, None], thresh, fac))
  return chosen & eligible
