"""JAX's persistent compilation cache, on by default for the CLI and the server.

    from dllm_jax import compile_cache
    compile_cache.enable()           # -> the directory in use (None: JAX cannot cache here)

Every executable JAX compiles is written to the cache directory (thresholds at zero, so the many
small step executables are cached too), and a later process that needs the same executable loads
it instead of compiling: a second identical ``dllm-jax generate`` compiles nothing.

Where: ``$DLLM_JAX_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/dllm-jax/jax`` (``~/.cache/
dllm-jax/jax``). A directory the user already gave JAX (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config.update("jax_compilation_cache_dir", ...)``) is respected, with the user's
thresholds. Importing this module changes nothing: only :func:`enable` touches JAX's
configuration (the library never does so unasked). The cache is trusted code: it is created
readable by its owner only.

:func:`counting` reports what a block of code compiled (JAX's monitoring events); the CLI prints
it when ``DLLM_JAX_COMPILE_STATS=1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Iterator

ENV_DIR = "DLLM_JAX_CACHE_DIR"
ENV_STATS = "DLLM_JAX_COMPILE_STATS"

# JAX's monitoring events (jax/_src/compiler.py, compilation_cache.py, dispatch.py).
_EXECUTABLE = "/jax/core/compile/backend_compile_duration"   # every executable obtained
_HIT = "/jax/compilation_cache/cache_hits"                   # ... loaded from the cache
_WRITE = "/jax/compilation_cache/cache_misses"               # ... compiled and written to it
_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"  # ... looked up in the cache


def default_dir() -> str:
  """The cache directory :func:`enable` uses when given none (see the module docstring)."""
  env = os.environ.get(ENV_DIR)
  if env:
    return os.path.abspath(os.path.expanduser(env))
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(os.path.abspath(base), "dllm-jax", "jax")


def _make_dir(path: str | None) -> str | None:
  """The cache directory (``path`` or :func:`default_dir`), created readable by its owner only;
  None when it cannot be created."""
  target = os.path.abspath(os.path.expanduser(path)) if path else default_dir()
  try:
    os.makedirs(target, mode=0o700, exist_ok=True)
  except OSError:
    return None
  return target


def enable(path: str | None = None) -> str | None:
  """Turn JAX's persistent compilation cache on at ``path`` (default :func:`default_dir`).

  Returns the directory in use. If JAX already has a cache directory configured, that one is
  kept (and returned) and nothing is changed. Returns None, changing nothing, when the
  directory cannot be created.
  """
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  target = _make_dir(path)
  if target is None:
    return None
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor
  jax.config.update("jax_compilation_cache_dir", target)
  cc.reset_cache()  # a process that compiled before still picks the directory up
  return target


def enable_for_process(path: str | None = None) -> str | None:
  """:func:`enable` for a program's entry point (the CLI), without importing jax: if jax is not
  imported yet, the cache is configured through JAX's environment variables, which it reads on
  import (child processes inherit them). Same precedence and return value as :func:`enable`."""
  if "jax" in sys.modules:
    return enable(path)
  current = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if current:
    return current
  target = _make_dir(path)
  if target is None:
    return None
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = target
  return target


@dataclasses.dataclass
class CompileStats:
  """What JAX compiled while :func:`counting` was active."""

  executables: int = 0   # executables obtained (compiled, or loaded from the cache)
  lookups: int = 0       # of those, looked up in the persistent cache
  cache_hits: int = 0    # of those, loaded from the cache
  cache_writes: int = 0  # compiled and written to the cache

  @property
  def compiled(self) -> int:
    """Executables XLA compiled (not loaded)."""
    return self.executables - self.cache_hits

  def summary(self) -> str:
    return (f"{self.executables} executables: {self.cache_hits} loaded from the cache, "
            f"{self.compiled} compiled, {self.cache_writes} written")


@contextlib.contextmanager
def counting() -> Iterator[CompileStats]:
  """Count JAX's compilations and cache hits inside the block."""
  import jax.monitoring as mon

  stats = CompileStats()
  fields = {_HIT: "cache_hits", _WRITE: "cache_writes", _REQUEST: "lookups"}

  def on_event(event: str, **_):
    if event in fields:
      setattr(stats, fields[event], getattr(stats, fields[event]) + 1)

  def on_duration(event: str, duration_secs: float, **_):
    if event == _EXECUTABLE:
      stats.executables += 1

  mon.register_event_listener(on_event)
  mon.register_event_duration_secs_listener(on_duration)
  try:
    yield stats
  finally:
    mon.unregister_event_listener(on_event)
    mon.unregister_event_duration_listener(on_duration)

