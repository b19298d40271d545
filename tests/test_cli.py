"""The dllm-jax command line, run as a subprocess on the bundled model."""

import subprocess
import sys

import pytest


def _cli(*args, timeout=600, **kw):
  return subprocess.run([sys.executable, "-m", "dllm_jax.cli", *args], capture_output=True,
                        text=True, timeout=timeout, **kw)


def test_generate_is_deterministic_for_a_seed():
  args = ["generate", "The socket module", "--gen-length", "16", "--block-length", "8",
          "--temperature", "0.8", "--seed", "3", "--quiet", "--verbose", "--echo"]
  a, b = _cli(*args), _cli(*args)
  assert a.returncode == 0, a.stderr[-2000:]
  assert a.stdout == b.stdout
  assert a.stdout.startswith("The socket module") and "nfe" in a.stdout


def test_generate_reads_stdin_and_shows_steps():
  r = _cli("generate", "--gen-length", "8", "--block-length", "8", "--show-steps", "--quiet",
           input="Decorators\n")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "[step   1]" in r.stdout and "[step   8]" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["generate", "x", "--model", "/no/such/dir"], "model directory not found"),
    (["generate", "x", "--gen-length", "10", "--block-length", "4"], "multiple of block_length"),
    (["generate", "x", "--threshold", "2", "--rule", "threshold"], "threshold"),
    (["info", "/no/such/config.json"], "no such file"),
    (["generate", "--file", "/no/such/prompts.txt"], "cannot read prompt file"),
])
def test_errors_are_one_line_without_traceback(args, msg):
  r = _cli(*args)
  assert r.returncode == 2
  assert msg in r.stderr and "Traceback" not in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


def test_bad_flag_and_help():
  assert _cli("generate", "--no-such-flag").returncode == 2
  for cmd in ("generate", "info", "convert", "train-demo", "profile"):
    assert _cli(cmd, "--help").returncode == 0


def test_info_prints_exact_count():
  r = _cli("info", "configs/dream-7b.json")
  assert r.returncode == 0 and "7,615,616,512" in r.stdout
