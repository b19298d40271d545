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
_PLAIN = ("max_running", "token_budget", "max_model_len", "scheduler", "logits", "num_pages",
          "page_size", "memory_budget_bytes", "activation_budget_bytes", "max_block_length",
          "max_refresh_rows", "max_reuse_rows", "attn_impl", "tp")
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
  g.add_argument("--max-running", type=positive_int, help="requests decoded concurrently")
  g.add_argument("--token-budget", type=positive_int, help="tokens fed to the model per step")
  g.add_argument("--max-model-len", type=positive_int, help="cap on prompt + gen_length tokens")
  g.add_argument("--scheduler", choices=C.SCHEDULERS,
                 help="phase = phase-multiplexed (default), fcfs = token-budget FCFS, "
                      "static = a batch runs to completion before the next is admitted")
  g.add_argument("--logits", choices=C.LOGIT_VARIANTS,
                 help="logit variant: auto = the budgeter's choice (default); full = the "
                      "no-budgeting baseline")
  g.add_argument("--num-pages", type=positive_int,
                 help="KV pool pages per device (overrides the memory budget)")
  g.add_argument("--page-size", type=positive_int, help="tokens per KV page (a power of two)")
  mem = g.add_mutually_exclusive_group()
  mem.add_argument("--memory-budget-mb", type=positive_float,
                   help="weights + KV pool + activation peak per device, MiB")
  mem.add_argument("--memory-budget-bytes", type=positive_int,
                   help="the same budget in bytes")
  g.add_argument("--activation-budget-bytes", type=positive_int,
                 help="activation peak the logit budgeter plans within")
  g.add_argument("--max-block-length", type=positive_int,
                 help="largest block_length a request may use")
  g.add_argument("--max-refresh-rows", type=positive_int,
                 help="Refresh rows per step (caps the step shapes to compile)")
  g.add_argument("--max-reuse-rows", type=positive_int,
                 help="Reuse rows per step (caps the step shapes to compile)")
  g.add_argument("--attn-impl", choices=C.KERNEL_IMPLS,
                 help="kernel implementation: auto (default: Pallas on a GPU, jnp elsewhere), "
                      "pallas, reference (jnp), interpret (the kernel on the CPU interpreter)")
  g.add_argument("--tp", type=positive_int, help="tensor-parallel devices per engine")
  s = parser.add_argument_group("default sparse cache (requests may bring their own)")
  s.add_argument("--sparse", nargs="?", const="per_head", default=sparse_default,
                 metavar="MODE",
                 help="sparse KV caching for requests that do not choose: a selection mode "
                      "(per_head, shared, per_head_adaptive; a bare --sparse means per_head) "
                      f"or '{SPARSE_OFF}' for dense (default: {sparse_default})")
  s.add_argument("--selection", help="selection mode, same as --sparse MODE")
  s.add_argument("--keep-ratio", type=float, help="fraction of the KV kept per head (0-1)")
  s.add_argument("--pool-kernel", type=positive_int, help="max-pool width over key scores")
  s.add_argument("--delay", type=nonneg_int, help="Refresh steps of a block before Select")
  return parser


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
