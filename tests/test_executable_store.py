"""The serialized step-executable store (dllm_jax/engine/executable_store.py).

Each run is its own process (the store follows JAX's global cache setting): a second identical
run loads every step executable without tracing or compiling (Runner.compile_count stays 0) and
decodes the same tokens; a corrupt entry is dropped, never trusted; an executable JAX loaded from
its own cache is never stored (it would not run); the key changes with everything the program
depends on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dllm_jax.engine import executable_store

SCRIPT = """
import json, sys
from dllm_jax import compile_cache
compile_cache.enable(sys.argv[1])
from dllm_jax import LLM, SamplingParams
llm = LLM()
out = llm.generate(["The socket module"], SamplingParams(gen_length=16))[0]
print(json.dumps(dict(tokens=out.token_ids, compiles=llm.core.runner.compile_count)))
"""


def run(cache) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "DLLM_JAX"))}
  r = subprocess.run([sys.executable, "-c", SCRIPT, str(cache)], capture_output=True, text=True,
                     timeout=600, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def steps(cache) -> list[str]:
  d = cache / executable_store.SUBDIR
  return sorted(p for p in os.listdir(d) if p.startswith("step-")) if d.exists() else []


def test_second_run_loads_the_steps_and_a_corrupt_entry_is_replaced(tmp_path):
  cache = tmp_path / "cache"
  first = run(cache)
  saved = steps(cache)
  assert first["compiles"] == len(saved) >= 1
  second = run(cache)
  assert second == dict(tokens=first["tokens"], compiles=0)
  assert steps(cache) == saved
  path = cache / executable_store.SUBDIR / saved[0]
  path.write_bytes(b"not an executable")
  third = run(cache)
  assert third["tokens"] == first["tokens"] and third["compiles"] == 1
  # The corrupt entry is dropped, not trusted; the recompile came from JAX's own cache, which
  # does not re-serialize into a runnable program on XLA:CPU, so it is not stored again.
  assert not path.exists()
  fourth = run(cache)
  assert fourth["tokens"] == first["tokens"] and fourth["compiles"] == 1 and not path.exists()


def test_executables_loaded_from_jax_cache_are_not_stored(tmp_path):
  cache = tmp_path / "cache"
  run(cache)
  for f in steps(cache):
    os.remove(cache / executable_store.SUBDIR / f)
  again = run(cache)  # the step comes from JAX's persistent cache
  assert again["compiles"] >= 1 and steps(cache) == []


def test_key_covers_code_devices_shapes_and_statics(monkeypatch):
  import jax.numpy as jnp

  params = {"w": jnp.zeros((4, 8), jnp.float32)}
  cache = {"k": jnp.zeros((2, 3), jnp.float32)}
  inputs = {"x": jnp.zeros((5,), jnp.int32)}
  base = executable_store.key_of(("bucket", 1), params, cache, inputs)
  assert base == executable_store.key_of(("bucket", 1), params, cache, inputs)
  assert base != executable_store.key_of(("bucket", 2), params, cache, inputs)
  assert base != executable_store.key_of(("bucket", 1), {"w": jnp.zeros((4, 8), jnp.bfloat16)},
                                         cache, inputs)
  assert base != executable_store.key_of(("bucket", 1), params, cache,
                                         {"x": jnp.zeros((6,), jnp.int32)})
  monkeypatch.setattr(executable_store, "code_fingerprint", lambda: "other source")
  assert base != executable_store.key_of(("bucket", 1), params, cache, inputs)


def test_off_without_a_jax_cache_dir():
  import jax
  if jax.config.jax_compilation_cache_dir:
    pytest.skip("this process has JAX's persistent cache on")
  assert executable_store.store_dir() is None
