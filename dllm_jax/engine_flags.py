"""The engine's command-line flags, shared by ``serve``, ``bench serve`` and ``bench e2e``.

    add_engine_args(parser)              # the EngineConfig flags (+ the default sparse cache)
    cfg = engine_config_from_args(args)  # unset flags keep EngineConfig's defaults

Imports nothing heavy (no jax) so that building the CLI's parser stays fast; choices come from
the value lists in :mod:`dllm_jax.config`. The sparse selection mode (a free-form ``--sparse
MODE``, since a bare ``--sparse`` means per_head) is checked by SparseConfig, whose ValueError
names the allowed values.
"""

from __future__ import annotations

import argparse

from dllm_jax import config as C

SPARSE_OFF = "off"
# EngineConfig's integer fields, each with a flag of its own (--max-running, ...): (field, help).
_INT_FIELDS = (
    ("max_running", "requests decoded concurrently"),
    ("token_budget", "tokens fed to the model per step"),
    ("max_model_len", "cap on prompt + gen_length tokens"),
    ("num_pages", "KV pool pages per device (overrides the memory budget)"),
    ("page_size", "tokens per KV page (a power of two)"),
    ("activation_budget_bytes", "activation peak the logit budgeter plans within"),
    ("max_block_length", "largest block_length a request may use"),
    ("max_refresh_rows", "Refresh rows per step (caps the step shapes to compile)"),
    ("max_reuse_rows", "Reuse rows per step (caps the step shapes to compile)"),
    ("tp", "tensor-parallel devices per engine"),
)
_PLAIN = tuple(f for f, _ in _INT_FIELDS) + ("scheduler", "logits", "attn_impl",
                                              "memory_budget_bytes")
_SPARSE = ("keep_ratio", "pool_kernel", "delay")


def _number_type(kind: type, ok, what: str):
  """An argparse type: ``kind(v)`` when ``ok`` of it holds, else an error naming ``what``."""
  def parse(v: str):
    try:
      x = kind(v)
    except ValueError:
      x = None
    if x is None or not ok(x):
      raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}")
    return x
  return parse


positive_int = _number_type(int, lambda n: n >= 1, "a positive integer")
nonneg_int = _number_type(int, lambda n: n >= 0, "an integer >= 0")
positive_float = _number_type(float, lambda x: 0 < x < float("inf"), "a positive number")


def add_engine_args(parser: argparse.ArgumentParser, *,
                    sparse_default: str = SPARSE_OFF) -> argparse.ArgumentParser:
  """Add the EngineConfig flags to ``parser``. ``sparse_default``: the default sparse mode of
  requests that do not choose ("off" = dense; a selection mode such as "per_head")."""
  g = parser.add_argument_group("engine (EngineConfig; unset flags keep its defaults)")
  for field, text in _INT_FIELDS:
    g.add_argument("--" + field.replace("_", "-"), type=positive_int, help=text)
  g.add_argument("--scheduler", choices=C.SCHEDULERS,
                 help="phase = phase-multiplexed (default), fcfs = token-budget FCFS, "
                      "static = a batch runs to completion before the next is admitted")
  g.add_argument("--logits", choices=C.LOGIT_VARIANTS,
                 help="logit variant: auto = the budgeter's choice (default); full = the "
                      "no-budgeting baseline")
  mem = g.add_mutually_exclusive_group()
  mem.add_argument("--memory-budget-mb", type=positive_float,
                   help="weights + KV pool + activation peak per device, MiB")
  mem.add_argument("--memory-budget-bytes", type=positive_int, help="the same budget in bytes")
  g.add_argument("--attn-impl", choices=C.KERNEL_IMPLS,
                 help="kernel implementation: auto (default: Pallas on a GPU, jnp elsewhere), "
                      "pallas, reference (jnp), interpret (the kernel on the CPU interpreter)")
  s = parser.add_argument_group("default sparse cache (requests may bring their own)")
  s.add_argument("--sparse", nargs="?", const="per_head", default=sparse_default,
                 metavar="MODE",
                 help="sparse KV caching for requests that do not choose: a selection mode "
                      "(per_head, shared, per_head_adaptive; a bare --sparse means per_head) "
                      f"or '{SPARSE_OFF}' for dense (default: {sparse_default})")
  s.add_argument("--selection", help="selection mode, same as --sparse MODE")
  add_sparse_knobs(s)
  return parser


def add_sparse_knobs(parser, defaults: C.SparseConfig | None = None) -> None:
  """The flags of SparseConfig's knobs (--keep-ratio, --pool-kernel, --delay). ``defaults``: the
  values they take when not given (None: unset, so SparseConfig's own defaults apply)."""
  shown = "" if defaults is None else " (default %(default)s)"
  parser.add_argument("--keep-ratio", type=float, default=defaults and defaults.keep_ratio,
                      help="fraction of the context kept per KV head, 0-1" + shown)
  parser.add_argument("--pool-kernel", type=positive_int, default=defaults and defaults.pool_kernel,
                      help="max-pool width over the key scores before selection" + shown)
  parser.add_argument("--delay", type=nonneg_int, default=defaults and defaults.delay,
                      help="Refresh steps of a block before its Select step" + shown)


def engine_config_from_args(args: argparse.Namespace, **overrides):
  """The EngineConfig the flags of :func:`add_engine_args` describe; ``overrides`` (e.g.
  ``max_waiting``) win. Raises ValueError for a contradictory or invalid combination."""
  kw = {k: getattr(args, k) for k in _PLAIN if getattr(args, k, None) is not None}
  mb = getattr(args, "memory_budget_mb", None)
  if mb is not None:
    kw["memory_budget_bytes"] = int(mb * 2**20)
  mode = getattr(args, "sparse", SPARSE_OFF) or SPARSE_OFF
  selection = getattr(args, "selection", None)
  sparse_kw = {k: getattr(args, k) for k in _SPARSE if getattr(args, k, None) is not None}
  if mode == SPARSE_OFF:
    if selection is not None or sparse_kw:
      given = ["--" + k.replace("_", "-") for k in (["selection"] if selection else [])
               + list(sparse_kw)]
      raise ValueError(f"{' / '.join(given)} need --sparse (the sparse cache is off)")
  else:
    kw["sparse"] = C.SparseConfig(selection=selection or mode, **sparse_kw)
  kw.update(overrides)
  return C.EngineConfig(**kw)
