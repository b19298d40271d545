"""The persistent compilation cache: on by default in the CLI, never changed unasked, and a
second identical run compiles nothing."""

import os
import re
import stat
import subprocess
import sys

import pytest

from dllm_jax import compile_cache

_CLEAN = {k: v for k, v in os.environ.items()
          if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "DLLM_JAX_"))}


def _py(code: str, env: dict):
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, env={**_CLEAN, **env})


def _files(path) -> set[str]:
  return {os.path.relpath(os.path.join(root, n), path)
          for root, _, names in os.walk(path) for n in names}


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.delenv("DLLM_JAX_CACHE_DIR", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.default_dir() == str(tmp_path / "xdg" / "dllm-jax" / "jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compile_cache.default_dir() == str(tmp_path / "home" / ".cache" / "dllm-jax" / "jax")
  monkeypatch.setenv("DLLM_JAX_CACHE_DIR", str(tmp_path / "moved"))
  assert compile_cache.default_dir() == str(tmp_path / "moved")


def test_library_changes_nothing_unasked_and_enable_sets_the_cache(tmp_path):
  code = ("import jax, dllm_jax.compile_cache, dllm_jax.engine.engine, dllm_jax.cli; "
          "c = jax.config; print(c.jax_compilation_cache_dir, "
          "c.jax_persistent_cache_min_compile_time_secs)")
  r = _py(code, {})
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["None", "1.0"]  # JAX's own defaults
  target = tmp_path / "cache"
  code = ("import jax; from dllm_jax import compile_cache as cc; "
          f"d = cc.enable({str(target)!r}); c = jax.config; "
          "print(d, c.jax_compilation_cache_dir, c.jax_persistent_cache_min_compile_time_secs, "
          "c.jax_persistent_cache_min_entry_size_bytes)")
  r = _py(code, {})
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == [str(target), str(target), "0.0", "-1"]
  assert stat.S_IMODE(os.stat(target).st_mode) == 0o700  # the cache is trusted code


@pytest.mark.parametrize("how", ["env", "config"])
def test_enable_keeps_a_directory_the_user_chose(tmp_path, how):
  mine, ours = tmp_path / "mine", tmp_path / "ours"
  env = {"JAX_COMPILATION_CACHE_DIR": str(mine)} if how == "env" else {}
  pre = "" if how == "env" else f"jax.config.update('jax_compilation_cache_dir', {str(mine)!r}); "
  code = (f"import jax; {pre}from dllm_jax import compile_cache as cc; "
          f"print(cc.enable({str(ours)!r}), jax.config.jax_compilation_cache_dir, "
          "jax.config.jax_persistent_cache_min_compile_time_secs)")
  r = _py(code, env)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == [str(mine), str(mine), "1.0"]
  assert not ours.exists()


def test_counting_sees_compiles_and_cache_hits(tmp_path):
  code = ("import jax, jax.numpy as jnp\nfrom dllm_jax import compile_cache as cc\n"
          f"cc.enable({str(tmp_path)!r})\n"
          "with cc.counting() as s:\n"
          "  jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0)).block_until_ready()\n"
          "print(s.executables, s.cache_hits, s.cache_writes, s.compiled)")
  first, second = _py(code, {}), _py(code, {})
  assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
  n, hits, writes, compiled = map(int, first.stdout.split())
  assert n >= 1 and hits == 0 and writes == n and compiled == n
  assert list(map(int, second.stdout.split())) == [n, n, 0, 0]


_STATS = re.compile(r"compile cache \((.*?)\): (\d+) executables: (\d+) loaded from the cache, "
                    r"(\d+) compiled, (\d+) written")


def _generate(cache, *extra):
  env = {**_CLEAN, "DLLM_JAX_CACHE_DIR": str(cache), "DLLM_JAX_COMPILE_STATS": "1"}
  r = subprocess.run([sys.executable, "-m", "dllm_jax.cli", "generate", "The socket module",
                      "--gen-length", "16", *extra], capture_output=True, text=True,
                     timeout=600, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  where, n, hits, compiled, written = _STATS.search(r.stderr).groups()
  return r.stdout, where, int(n), int(hits), int(compiled), int(written)


def test_second_identical_generate_compiles_nothing(tmp_path):
  cache = tmp_path / "cache"
  out1, where, n1, hits1, compiled1, written1 = _generate(cache)
  assert where == str(cache) and n1 > 0
  assert hits1 == 0 and compiled1 == n1 and written1 == n1
  files = _files(cache)
  assert len(files) >= n1
  steps = {f for f in files if f.startswith("dllm-jax-executables/step-")}
  assert steps  # the step executables are also kept serialized (engine/executable_store.py)
  out2, _, n2, hits2, compiled2, written2 = _generate(cache)
  assert out2 == out1
  # Everything JAX obtains comes from its cache; the step executables come from the store
  # without even being traced, so JAX sees fewer executables than in the first run.
  assert (hits2, compiled2, written2) == (n2, 0, 0) and 0 < n2 < n1
  assert _files(cache) == files, sorted(_files(cache) ^ files)  # nothing added


def test_no_compile_cache_leaves_the_directory_alone(tmp_path):
  cache = tmp_path / "cache"
  _, where, n, hits, compiled, written = _generate(cache, "--no-compile-cache")
  assert where == "off" and hits == 0 and written == 0 and compiled == n
  assert not cache.exists() or _files(cache) == set()


def test_commands_with_their_own_cache_flag_keep_it(monkeypatch):
  """ablate and bench e2e manage their cache with --compile-cache DIR: the CLI does not turn the
  default one on for them, and --no-compile-cache empties DIR."""
  from dllm_jax import cli
  from dllm_jax.bench import ablation
  seen = []
  monkeypatch.setattr(ablation, "run", lambda args: seen.append(args.compile_cache) or 0)
  p = cli.build_parser()
  on = p.parse_args(["ablate", "--out", "x"])
  off = p.parse_args(["ablate", "--out", "x", "--no-compile-cache"])
  assert on.own_compile_cache and on.compile_cache
  assert on.func(on) == 0 and off.func(off) == 0
  assert seen == [on.compile_cache, ""]
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  cli._enable_compile_cache(on)
  assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
  serve = p.parse_args(["bench", "serve"])
  assert not getattr(serve, "own_compile_cache", False) and serve.no_compile_cache is False
