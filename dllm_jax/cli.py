"""dllm-jax command line: generate, info, convert, profile, serve, bench, ablate, train-demo.

Building the parser imports nothing heavy: each command's flags are added, and its module
imported, only when that command is parsed (``dllm-jax --help`` never imports jax). Bad flags and
unreadable paths exit 2 with one line (``dllm-jax CMD: error: ...``), no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

PROG = "dllm-jax"

# name, one-line help, "module:setup" (adds the flags and sets ``func``). Order = --help order.
COMMANDS = (
    ("generate", "generate text with diffusion decoding (default: the bundled demo model)",
     "dllm_jax.cli_commands:setup_generate"),
    ("info", "architecture and exact parameter count of a preset, config.json or model",
     "dllm_jax.cli_commands:setup_info"),
    ("convert", "convert a checkpoint: HF safetensors <-> orbax",
     "dllm_jax.cli_commands:setup_convert"),
    ("profile", "offline memory profile and KV pool sizing of a model on a device",
     "dllm_jax.cli_commands:setup_profile"),
    ("serve", "OpenAI-compatible HTTP server with a live demo page",
     "dllm_jax.cli_commands:setup_serve"),
    ("bench", "benchmarks: serve, e2e, logits, attention, sparse-quality",
     "dllm_jax.cli_commands:setup_bench"),
    ("ablate", "the ablation ladder at an equal memory budget, with plots",
     "dllm_jax.cli_commands:setup_ablate"),
    ("train-demo", "train the bundled demo model (masked diffusion)",
     "dllm_jax.cli_commands:setup_train"),
)


class CLIError(ValueError):
  """An error the user can fix; printed as one line."""


class Parser(argparse.ArgumentParser):
  """An ArgumentParser whose usage errors are one line plus a pointer to --help."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

  def parse_args(self, args=None, namespace=None):
    ns, extras = self.parse_known_args(args, namespace)
    if extras:  # reported by the (sub-)command they were given to
      _command_parser(self, ns).error(f"unrecognized arguments: {' '.join(extras)}")
    return ns


def _command_parser(parser: argparse.ArgumentParser, ns) -> argparse.ArgumentParser:
  """The innermost sub-command parser ``ns`` was parsed by."""
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      sub = action.choices.get(getattr(ns, action.dest, None))
      if sub is not None:
        return _command_parser(sub, ns)
  return parser


class LazyParser(Parser):
  """A sub-command parser that adds its flags (``setup``, "module:function") on first use."""

  def __init__(self, *args, setup=None, **kw):
    super().__init__(*args, **kw)
    self._setup = setup  # "module:function" or a callable, called with this parser

  def populate(self) -> "LazyParser":
    setup, self._setup = self._setup, None
    if isinstance(setup, str):
      module, func = setup.split(":")
      setup = getattr(importlib.import_module(module), func)
    if setup is not None:
      setup(self)
    return self

  def parse_known_args(self, args=None, namespace=None):
    self.populate()
    return super().parse_known_args(args, namespace)

  def format_help(self):
    self.populate()
    return super().format_help()

  def format_usage(self):
    self.populate()
    return super().format_usage()


def add_lazy_commands(parser: argparse.ArgumentParser, commands, *, dest: str, title: str,
                      metavar: str):
  """Sub-commands ``(name, help, setup)`` whose flags load on demand (``setup``: see
  :class:`LazyParser`)."""
  sub = parser.add_subparsers(dest=dest, required=True, metavar=metavar, title=title,
                              parser_class=LazyParser)
  for name, help_, setup in commands:
    sub.add_parser(name, help=help_, description=help_[:1].upper() + help_[1:] + ".",
                   setup=setup)
  return sub


def _version() -> str:
  from dllm_jax import __version__
  return f"{PROG} {__version__}"


def build_parser() -> Parser:
  p = Parser(prog=PROG, description=__doc__.splitlines()[0],
             epilog=f"Run '{PROG} COMMAND --help' for a command's flags. Presets (for --config, "
                    f"--model-config, info): see '{PROG} info --help'.")
  p.add_argument("--version", action="version", version=_version())
  add_lazy_commands(p, COMMANDS, dest="command", title="commands", metavar="COMMAND")
  return p


def all_parsers(parser: argparse.ArgumentParser):
  """Every (sub-)command parser, populated (for help checks): yields (prog, parser)."""
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for sub in dict.fromkeys(action.choices.values()):
        if hasattr(sub, "populate"):
          sub.populate()
        yield sub.prog, sub
        yield from all_parsers(sub)


def _enable_compile_cache(args) -> None:
  """Commands with ``--no-compile-cache`` use JAX's persistent cache unless it is given."""
  if getattr(args, "no_compile_cache", True) or getattr(args, "own_compile_cache", False):
    return
  from dllm_jax import compile_cache
  compile_cache.enable_for_process()


def _run(args) -> int:
  if not os.environ.get("DLLM_JAX_COMPILE_STATS"):
    return int(args.func(args) or 0)
  from dllm_jax import compile_cache
  with compile_cache.counting() as stats:
    rc = int(args.func(args) or 0)
  jax = sys.modules.get("jax")
  where = (jax.config.jax_compilation_cache_dir if jax else None) or "off"
  print(f"{PROG} {args.command}: compile cache ({where}): {stats.summary()}", file=sys.stderr)
  return rc


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    _enable_compile_cache(args)
    return _run(args)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  except (CLIError, OSError, ValueError) as e:
    print(f"{PROG} {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return 2


def _one_line(e: BaseException) -> str:
  msg = str(e) or type(e).__name__
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    msg = f"{e.strerror}: {e.filename}"
  return " ".join(msg.split())


if __name__ == "__main__":  # python -m dllm_jax.cli: run the importable copy of this module
  from dllm_jax.cli import main as _main
  sys.exit(_main())
