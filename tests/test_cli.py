"""The dllm-jax command line, run as a subprocess on the bundled model."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest

from dllm_jax import config as C
from dllm_jax import cli

ALL_COMMANDS = ("generate", "info", "convert", "profile", "serve", "bench", "ablate", "train-demo")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A private compile cache for this module's runs (shared by them: later runs load)."""
  return {**os.environ, "DLLM_JAX_CACHE_DIR": str(tmp_path_factory.mktemp("jax-cache"))}


def _cli(env, *args, timeout=600, **kw):
  return subprocess.run([sys.executable, "-m", "dllm_jax.cli", *args], capture_output=True,
                        text=True, timeout=timeout, env=env, **kw)


def _one_error_line(r, prefix):
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(prefix), r.stderr
  assert "Traceback" not in r.stderr
  return lines[0]


# generate -----------------------------------------------------------------------------------


def test_generate_is_deterministic_for_a_seed(env):
  args = ["generate", "The socket module", "--gen-length", "16", "--block-length", "8",
          "--temperature", "0.8", "--seed", "3", "--quiet", "--verbose", "--echo"]
  a, b = _cli(env, *args), _cli(env, *args)
  assert a.returncode == 0, a.stderr[-2000:]
  assert a.stdout == b.stdout
  assert a.stdout.startswith("The socket module") and "nfe" in a.stdout
  assert "==>" not in a.stdout  # one prompt: no header


_LIVE = """
import sys
from dllm_jax.engine.engine import LLM
step = LLM.step
def marked(self):
  out = step(self)
  print("<engine step>", flush=True)
  return out
LLM.step = marked
from dllm_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_show_steps_prints_each_step_as_it_happens(env):
  """Every '[step k]' line is written right after the engine step that made it (a marker
  line printed by a wrapped LLM.step), escaped onto one line and cut to $COLUMNS."""
  r = subprocess.run([sys.executable, "-c", _LIVE, "generate", "The socket module",
                      "--gen-length", "16", "--block-length", "8", "--show-steps", "--quiet"],
                     capture_output=True, text=True, timeout=600,
                     env={**env, "COLUMNS": "30"})
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.splitlines()
  steps = [(i, ln) for i, ln in enumerate(lines) if ln.startswith("[step")]
  nfe = int(re.search(r"\(nfe (\d+),", r.stdout).group(1))
  assert [int(ln[5:9]) for _, ln in steps] == list(range(1, nfe + 1))
  markers_before = [sum(1 for ln in lines[:i] if ln == "<engine step>") for i, _ in steps]
  assert markers_before == [k + markers_before[0] - 1 for k in range(1, nfe + 1)]
  assert markers_before[0] <= 1  # the first step's line comes before the second step runs
  assert all(len(ln) <= 30 for _, ln in steps)
  assert any(ln.endswith("…") for _, ln in steps)
  full = _cli(env, "generate", "The socket module", "--gen-length", "16", "--block-length", "8",
              "--show-steps", "--quiet")
  canvases = [ln for ln in full.stdout.splitlines() if ln.startswith("[step")]
  assert len(canvases) == nfe  # a newline in the text never splits a step line
  assert any("\\n" in c for c in canvases)  # ... it is shown escaped
  assert canvases[-1].count("_") < canvases[0].count("_")


def test_generate_reads_stdin_and_separates_prompts(env):
  r = _cli(env, "generate", "--gen-length", "8", "--block-length", "8", "--quiet",
           input="Decorators\nThe socket module\n")
  assert r.returncode == 0, r.stderr[-2000:]
  out = r.stdout.splitlines()
  first, second = out.index("==> [1/2] Decorators <=="), out.index("==> [2/2] The socket module <==")
  assert first == 0 and second > first + 1 and out[second - 1] == ""


def test_sampling_errors_name_the_values_in_effect(env):
  # The demo model's generation_config.json sets gen_length 64 (the built-in default is 128).
  r = _cli(env, "generate", "x", "--block-length", "7")
  line = _one_error_line(r, "dllm-jax generate: error:")
  assert "gen_length (64)" in line and "128" not in line
  assert "gen_length 64 from the model's generation_config.json" in line
  assert "block_length 7 from your --block-length" in line
  # Flags valid only with the model's defaults are accepted (no premature check at 128).
  r = _cli(env, "generate", "The socket module", "--block-length", "16", "--steps", "4",
           "--quiet", "--verbose")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "(nfe 4, finish" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["generate", "x", "--model", "/no/such/dir"], "model directory not found"),
    (["generate", "x", "--model", "llada-8b"], "preset without weights"),
    (["generate", "x", "--gen-length", "10", "--block-length", "4"], "multiple of block_length"),
    (["generate", "x", "--threshold", "2", "--rule", "threshold"], "threshold"),
    (["generate", "x", "--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["generate", "x", "--gen-length", "-3"], "--gen-length: expected a positive integer"),
    (["generate", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["info", "/no/such/config.json"], "no such file, directory or preset"),
    (["generate", "--file", "/no/such/prompts.txt"], "cannot read prompt file"),
    (["profile", "--device-memory-gb", "80"], "the following arguments are required: --config"),
    (["serve", "--keep-ratio", "0.5"], "need --sparse"),
    (["convert", "/no/such/dir", "out", "--to", "orbax"], "source directory not found"),
])
def test_errors_are_one_line_without_traceback(env, args, msg):
  r = _cli(env, *args)
  line = _one_error_line(r, f"dllm-jax {args[0]}: error:")
  assert r.returncode == 2 and msg in line


def test_usage_errors_point_to_help(env):
  line = _one_error_line(_cli(env, "generate", "--temperature"), "dllm-jax generate: error:")
  assert "see 'dllm-jax generate --help'" in line
  line = _one_error_line(_cli(env, "frobnicate"), "dllm-jax: error:")
  assert "see 'dllm-jax --help'" in line


# help, version, fast start -------------------------------------------------------------------


def test_help_lists_every_command_and_version(env):
  r = _cli(env, "--help")
  assert r.returncode == 0
  for name in ALL_COMMANDS:
    assert re.search(rf"^\s+{re.escape(name)}\b", r.stdout, re.M), name
  assert "`" not in r.stdout
  from dllm_jax import __version__
  v = _cli(env, "--version")
  assert v.returncode == 0 and v.stdout.strip() == f"dllm-jax {__version__}"
  for cmd in ALL_COMMANDS:
    h = _cli(env, cmd, "--help")
    assert h.returncode == 0 and h.stdout.startswith(f"usage: dllm-jax {cmd}"), h.stderr


def test_every_flag_has_help():
  owned = ("dllm-jax", "dllm-jax generate", "dllm-jax info", "dllm-jax convert",
           "dllm-jax profile", "dllm-jax serve", "dllm-jax train-demo", "dllm-jax bench")
  parser = cli.build_parser()
  parsers = dict([("dllm-jax", parser), *cli.all_parsers(parser)])
  assert set(owned) <= set(parsers)
  for prog in owned:
    missing = [a.option_strings or a.dest for a in parsers[prog]._actions
               if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not missing, (prog, missing)


_HEAVY = ("jax", "flax", "fastapi", "uvicorn", "dllm_jax.train.trainer", "dllm_jax.engine.engine")


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["serve", "--help"],
                                  ["bench", "--help"], ["info", "llada-8b"]])
def test_fast_start_imports_nothing_heavy(env, argv):
  """`python -X importtime` lists every module the command imported."""
  r = subprocess.run(
      [sys.executable, "-X", "importtime", "-m", "dllm_jax.cli", *argv], capture_output=True,
      text=True, timeout=120, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  imported = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines()
              if ln.startswith("import time:")}
  assert "dllm_jax.cli" in imported
  heavy = sorted(m for m in imported
                 if m in _HEAVY or m.startswith(("jax.", "flax.", "dllm_jax.bench.")))
  assert heavy == []


def test_build_parser_imports_nothing_heavy(env):
  code = ("import sys; from dllm_jax import cli; cli.build_parser(); "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'fastapi')"
          " or m.startswith(('dllm_jax.bench', 'dllm_jax.train', 'dllm_jax.server'))))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                     timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


# info, profile, presets ---------------------------------------------------------------------


def test_info_takes_presets_and_paths_from_any_directory(env, tmp_path):
  for ref, count in (("llada-8b", "8,015,581,184"), ("configs/dream-7b.json", "7,615,616,512")):
    r = _cli(env, "info", ref, cwd=tmp_path)
    assert r.returncode == 0 and count in r.stdout, r.stderr
  own = tmp_path / "mine.json"
  own.write_text(json.dumps(json.load(open(os.path.join(os.path.dirname(C.__file__), "configs",
                                                        "dream-7b.json")))))
  r = _cli(env, "info", str(own), cwd=tmp_path)
  assert r.returncode == 0 and "7,615,616,512" in r.stdout


def test_profile_says_when_the_model_does_not_fit(env, tmp_path):
  r = _cli(env, "profile", "--config", "llada-8b", "--device-memory-gb", "16", cwd=tmp_path)
  assert r.returncode == 1
  assert "llada-8b does not fit on 1 x 16 GiB" in r.stderr and "Traceback" not in r.stderr
  ok = _cli(env, "profile", "--config", "configs/llada-8b.json", "--device-memory-gb", "80",
            cwd=tmp_path)
  assert ok.returncode == 0, ok.stderr
  pages = int(re.search(r"KV pool: ([\d,]+) pages", ok.stdout).group(1).replace(",", ""))
  assert pages > 0 and "does not fit" not in ok.stdout + ok.stderr


# convert ------------------------------------------------------------------------------------


def test_convert_round_trip_generates_the_same_tokens(env, tmp_path):
  """HF (the demo) -> orbax -> HF: both results load in `generate --model` (tokenizer and
  generation_config.json carried along) and give the demo's tokens."""
  from dllm_jax.cli_generate import demo_model_dir
  orbax, hf = tmp_path / "orbax", tmp_path / "hf"
  r = _cli(env, "convert", demo_model_dir(), str(orbax), "--to", "orbax")
  assert r.returncode == 0, r.stderr[-2000:]
  r = _cli(env, "convert", str(orbax), str(hf), "--to", "hf")
  assert r.returncode == 0, r.stderr[-2000:]
  for d in (orbax, hf):
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
      assert (d / f).is_file(), (d, f)
  assert (hf / "generation_config.json").read_text() == open(
      os.path.join(demo_model_dir(), "generation_config.json")).read()
  gen = ["generate", "The socket module", "--gen-length", "16", "--quiet", "--verbose"]
  ref = _cli(env, *gen)
  assert ref.returncode == 0, ref.stderr[-2000:]
  for d in (orbax, hf):
    out = _cli(env, *gen, "--model", str(d))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == ref.stdout
  again = _cli(env, "convert", demo_model_dir(), str(orbax), "--to", "orbax")
  assert again.returncode == 2 and "already exists" in again.stderr


# engine flags and serve ------------------------------------------------------------------------


def _serve_parser():
  from dllm_jax.server import cli as server_cli
  return server_cli, server_cli.add_serve_args(cli.Parser(prog="dllm-jax serve"))


def test_engine_flags_build_one_engine_config():
  from dllm_jax import engine_flags
  server_cli, p = _serve_parser()
  choices = {a.dest: a.choices for a in p._actions}
  assert choices["scheduler"] is C.SCHEDULERS and choices["logits"] is C.LOGIT_VARIANTS
  assert choices["attn_impl"] is C.KERNEL_IMPLS
  args = p.parse_args(["--sparse", "--selection", "shared", "--keep-ratio", "0.25",
                       "--max-queue", "3", "--memory-budget-mb", "64", "--scheduler", "fcfs",
                       "--max-refresh-rows", "2"])
  cfg = server_cli.engine_config_from_args(args)
  assert cfg.sparse.selection == "shared" and cfg.sparse.keep_ratio == 0.25
  assert (cfg.max_waiting, cfg.memory_budget_bytes, cfg.scheduler, cfg.max_refresh_rows) == \
      (3, 64 * 2**20, "fcfs", 2)
  assert server_cli.engine_config_from_args(p.parse_args([])).sparse is None
  bench = argparse.ArgumentParser()
  engine_flags.add_engine_args(bench, sparse_default="per_head")
  assert engine_flags.engine_config_from_args(bench.parse_args([])).sparse.selection == "per_head"
  assert engine_flags.engine_config_from_args(bench.parse_args(["--sparse", "off"])).sparse is None
  with pytest.raises(ValueError, match="selection"):
    engine_flags.engine_config_from_args(bench.parse_args(["--sparse", "everything"]))
  with pytest.raises(ValueError, match="need --sparse"):
    engine_flags.engine_config_from_args(bench.parse_args(["--sparse", "off", "--delay", "2"]))


def test_serve_warms_up_and_serves_on_the_hardened_transport(monkeypatch):
  """run_serve passes --warmup to EngineCore.warmup(mode) and the timeouts and connection cap
  to transport.serve (both stubbed: no engine is built, nothing listens)."""
  from dllm_jax.server import app, transport
  server_cli, p = _serve_parser()
  calls = {}

  class Core:
    def warmup(self, mode, *, progress):
      calls.setdefault("warmup", []).append(mode)
      return 3

  class FakeLLM:
    tokenizer, core = object(), Core()

  monkeypatch.setattr(server_cli, "build_replicas", lambda model, cfg, n: [FakeLLM()] * n)
  monkeypatch.setattr(app, "create_app", lambda llm, **kw: ("app", llm, kw))
  monkeypatch.setattr(transport, "serve", lambda a, **kw: calls.setdefault("serve", (a, kw)))
  args = p.parse_args(["--warmup", "quick", "--header-timeout", "2.5", "--body-timeout", "7",
                       "--max-connections", "9", "--replicas", "2", "--no-compile-cache",
                       "--port", "8123"])
  assert server_cli.run_serve(args) == 0
  assert calls["warmup"] == ["quick", "quick"]
  (_, llms, kw_app), kw = calls["serve"]
  assert len(llms) == 2 and kw_app["max_queue"] == 64
  assert kw == dict(host="127.0.0.1", port=8123, log_level="info", header_timeout_s=2.5,
                    body_timeout_s=7.0, max_connections=9, shutdown_timeout_s=30.0)
  assert p.parse_args([]).warmup == "none" and p.parse_args(["--warmup"]).warmup == "full"
