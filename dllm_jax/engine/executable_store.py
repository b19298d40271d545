"""A disk store of compiled step executables, beside JAX's persistent compilation cache.

JAX's cache saves XLA's compile but not the tracing and lowering that compute its key: for the
engine's step that is most of a cached start (~0.9 s of the bundled model's ~1.3 s first step).
This store keeps each step executable serialized (``jax.experimental.serialize_executable``)
under a key computed without tracing: a digest of everything the compiled program depends on —
the source of ``dllm_jax`` and ``pallas_kernels``, the jax / jaxlib versions, the devices, the
parameter / pool / input shapes, dtypes and shardings, and the bucket's static description.

Only executables XLA compiled in this process are stored: one JAX loaded from its own persistent
cache does not re-serialize into a runnable program on XLA:CPU ("Function ... not found" when
run), so such a compile is not saved (:func:`compile_fresh` tells the two apart).

It is on exactly when JAX's persistent cache is (the CLI and the server turn that on by default;
``LLM(compile_cache=...)`` or ``dllm_jax.compile_cache.enable()`` in a notebook): the files live
in ``<jax cache dir>/dllm-jax-executables``. A file that cannot be read or loaded is deleted (a
stale or corrupt entry costs one compile, never a wrong program: the key covers the code).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tempfile
import threading

import jax

SUBDIR = "dllm-jax-executables"


def store_dir() -> str | None:
  """Where executables go: a subdirectory of JAX's persistent cache, or None when it is off."""
  base = jax.config.jax_compilation_cache_dir
  return os.path.join(base, SUBDIR) if base else None


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
  """Digest of every Python source file of the two packages (a code change is a new key).
  Taken when this module is imported, i.e. when the engine's code is loaded, so later edits on
  disk cannot key a running process's programs as new code."""
  import dllm_jax
  import pallas_kernels

  h = hashlib.sha256()
  for pkg in (dllm_jax, pallas_kernels):
    root = os.path.dirname(pkg.__file__)
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      for name in sorted(filenames):
        if name.endswith(".py"):
          path = os.path.join(dirpath, name)
          h.update(os.path.relpath(path, root).encode())
          with open(path, "rb") as fh:
            h.update(fh.read())
  return h.hexdigest()


def _describe(tree) -> str:
  leaves, treedef = jax.tree.flatten(tree)
  desc = [(tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", ""))) for x in leaves]
  return f"{treedef}|{desc}"


def key_of(static_key, params, cache, inputs) -> str:
  """The store key of one step executable (no tracing)."""
  devices = jax.devices()
  parts = [code_fingerprint(), jax.__version__, jax.lib.__version__, jax.default_backend(),
           repr([(d.platform, d.device_kind) for d in devices]), repr(static_key),
           _describe(params), _describe(cache), _describe(inputs)]
  return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load(directory: str, key: str):
  """The stored executable, or None (absent, unreadable or not loadable here)."""
  from jax.experimental import serialize_executable

  path = os.path.join(directory, f"step-{key}.bin")
  try:
    with open(path, "rb") as fh:
      payload, in_tree, out_tree = pickle.load(fh)
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
  except FileNotFoundError:
    return None
  except Exception:  # a corrupt or incompatible entry: drop it and compile again
    try:
      os.remove(path)
    except OSError:
      pass
    return None


def save(directory: str, key: str, compiled) -> None:
  """Write one executable (atomically; a failure to write only costs the next start)."""
  from jax.experimental import serialize_executable

  try:
    blob = pickle.dumps(serialize_executable.serialize(compiled))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
      fh.write(blob)
    os.replace(tmp, os.path.join(directory, f"step-{key}.bin"))
  except Exception:
    pass


# JAX reports a persistent-cache hit through its monitoring events, in the compiling thread.
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_compiling = threading.local()


def _on_event(event: str, **_) -> None:
  if event == _HIT_EVENT:
    _compiling.hit = True


@functools.lru_cache(maxsize=1)
def _listen() -> None:
  import jax.monitoring
  jax.monitoring.register_event_listener(_on_event)


def compile_fresh(compile_fn):
  """(compile_fn(), whether XLA compiled it here rather than JAX loading it from its cache)."""
  _listen()
  _compiling.hit = False
  compiled = compile_fn()
  return compiled, not _compiling.hit


code_fingerprint()  # at import: the code this process runs
