"""Every third-party module the code needs is declared in pyproject.toml, in the right place.

The import graph is built from the source (ast over dllm_jax/, pallas_kernels/, tests/ and the
notebooks' code cells; module-level and function-level imports, ``importlib.import_module`` /
``__import__`` / ``pytest.importorskip`` with a literal name). Module -> distribution comes from
``importlib.metadata.packages_distributions()``. A module of the core needs only the core
dependencies; a module under an extra's subpackage (``EXTRA_OF``) needs core + that extra; tests
and notebooks need core + [test]. What a module needs includes what the package modules it imports
need, except an import into another extra's subpackage: that one is a gated feature (``dllm-jax
serve`` from the core CLI) and must sit inside a function, never at module level.

Needs that no ``import`` statement reveals are listed in ``RUNTIME_NEEDS`` with their reason.
The slow test installs the package with only [serve] into a fresh virtualenv (no torch, no system
site-packages) and sends a chat request through the server.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dllm_jax", "pallas_kernels")
# Subpackages whose modules may use an extra on top of the core dependencies.
EXTRA_OF = {"dllm_jax.server": "serve", "dllm_jax.bench": "bench"}
CORE, TEST = "core", "test"

# (distribution, where it must be declared, why) for needs that no import statement shows.
RUNTIME_NEEDS = [
    ("jinja2", CORE, "Tokenizer.apply_chat_template -> transformers renders the chat template "
                     "with jinja2, which transformers imports only then (without it every chat "
                     "request fails with 'apply_chat_template requires jinja2')"),
    ("tokenizers", CORE, "transformers.PreTrainedTokenizerFast (dllm_jax/tokenizer.py) is a "
                         "tokenizers.Tokenizer underneath"),
    ("ipykernel", TEST, "tests/test_notebooks.py runs the notebooks on the 'python3' kernel, "
                        "which ipykernel provides"),
]
# Python's own modules that sys.stdlib_module_names leaves out.
_NOT_THIRD_PARTY = {"__future__"}
_NETWORK_ERRORS = ("Failed to establish a new connection", "Temporary failure in name resolution",
                   "Network is unreachable", "NewConnectionError", "ReadTimeoutError",
                   "Could not fetch URL", "ConnectTimeoutError")


def _norm(dist: str) -> str:
  return re.sub(r"[-_.]+", "-", dist).lower()


# pyproject.toml ---------------------------------------------------------------------------------
def _req_name(req: str) -> tuple[str, list[str]]:
  m = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", req)
  assert m, f"unparsable requirement {req!r}"
  return _norm(m.group(1)), [e.strip() for e in (m.group(2) or "").split(",") if e.strip()]


@lru_cache(maxsize=None)
def _project() -> dict:
  with open(ROOT / "pyproject.toml", "rb") as fh:
    return tomllib.load(fh)["project"]


def _raw_groups() -> dict[str, list[str]]:
  return {CORE: list(_project()["dependencies"]), **_project()["optional-dependencies"]}


@lru_cache(maxsize=None)
def _declared(group: str) -> frozenset[str]:
  """Distributions the group declares, with self-references (``dllm-jax[serve]``) expanded."""
  me = _norm(_project()["name"])
  out: set[str] = set()
  for req in _raw_groups()[group]:
    name, extras = _req_name(req)
    if name == me:
      for extra in extras:
        out |= _declared(extra)
    else:
      out.add(name)
  return frozenset(out)


def _allowed(group: str) -> frozenset[str]:
  return _declared(CORE) | (_declared(group) if group != CORE else frozenset())


# The import graph -------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[0] == "tests":
    return parts[-1]  # tests import their helpers by file name (rootdir on sys.path)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
  t = node.test
  return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
      isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


_DYNAMIC = {("importlib", "import_module"), (None, "import_module"), (None, "__import__"),
            ("pytest", "importorskip")}
# A string that is exactly a package module's dotted name: a lazy-import table (the CLI's
# sub-commands name their modules this way and import them when the command runs).
_MODULE_STRING = re.compile(r"(%s)(\.\w+)+" % "|".join(PACKAGES))


class Found(NamedTuple):
  name: str  # absolute dotted module name
  top: bool  # runs at module import (not inside a function)
  optional: bool  # under ``try: ... except ImportError:`` with a fallback (no re-raise)


def _has_fallback(node: ast.Try) -> bool:
  """The try block catches ImportError and carries on (a handler that raises is a clearer
  error, not a fallback: the import is still needed)."""
  for h in node.handlers:
    names = [] if h.type is None else [
        getattr(t, "id", getattr(t, "attr", "")) for t in
        (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type])]
    if {"ImportError", "ModuleNotFoundError"} & set(names):
      return not any(isinstance(n, ast.Raise) for n in ast.walk(h))
  return False


def _imports(tree: ast.AST, module: str, is_pkg: bool) -> list[Found]:
  """Every import in ``tree`` (statements, literal dynamic imports, module-name strings)."""
  found: list[Found] = []

  def absolute(node: ast.ImportFrom) -> str:
    if not node.level:
      return node.module or ""
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))

  def visit(node: ast.AST, top: bool, opt: bool) -> None:
    if isinstance(node, ast.If) and _is_type_checking(node):
      for child in node.orelse:
        visit(child, top, opt)
      return
    if isinstance(node, ast.Try) and _has_fallback(node):
      for child in node.body:
        visit(child, top, True)
      for child in [*node.handlers, *node.orelse, *node.finalbody]:
        visit(child, top, opt)
      return
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      top = False
    if isinstance(node, ast.Import):
      found.extend(Found(a.name, top, opt) for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = absolute(node)
      found.extend(Found(f"{base}.{a.name}", top, opt) for a in node.names if a.name != "*")
      found.append(Found(base, top, opt))
    elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
        and isinstance(node.args[0].value, str):
      f = node.func
      key = ((f.value.id if isinstance(f.value, ast.Name) else None, f.attr)
             if isinstance(f, ast.Attribute) else (None, getattr(f, "id", None)))
      if key in _DYNAMIC:
        found.append(Found(node.args[0].value, top, opt))
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
        and _MODULE_STRING.fullmatch(node.value):
      found.append(Found(node.value, False, opt))
    for child in ast.iter_child_nodes(node):
      visit(child, top, opt)

  visit(tree, True, False)
  return found


def _notebook_source(path: Path) -> str:
  cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
  code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
  # IPython magics / shell lines are not Python: drop them (they import nothing).
  return "\n".join(line for cell in code for line in cell.splitlines()
                   if not line.lstrip().startswith(("%", "!")))


class Graph:
  """Modules of the repository, their groups, internal edges and third-party imports."""

  def __init__(self) -> None:
    self.group: dict[str, str] = {}
    self.edges: dict[str, list[tuple[str, bool]]] = {}
    self.third: dict[str, set[str]] = {}  # module -> top-level third-party module names
    self.optional: dict[str, set[str]] = {}  # the same, imported with a fallback
    sources = [(p, _module_name(p)) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    sources += [(p, _module_name(p)) for p in sorted((ROOT / "tests").glob("*.py"))]
    sources += [(p, f"notebook:{p.name}") for p in sorted((ROOT / "notebooks").glob("*.ipynb"))]
    parsed = []
    for path, name in sources:
      text = _notebook_source(path) if path.suffix == ".ipynb" else path.read_text("utf-8")
      parsed.append((name, path.name == "__init__.py", ast.parse(text, filename=str(path))))
      self.group[name] = self._group_of(name, path)
    for name, is_pkg, tree in parsed:
      self.edges[name], self.third[name], self.optional[name] = [], set(), set()
      for imp in _imports(tree, name, is_pkg):
        self._add(name, imp)

  @staticmethod
  def _group_of(name: str, path: Path) -> str:
    if path.suffix == ".ipynb" or path.parent.name == "tests":
      return TEST
    for prefix, extra in EXTRA_OF.items():
      if name == prefix or name.startswith(prefix + "."):
        return extra
    return CORE

  def _add(self, src: str, imp: Found) -> None:
    head = imp.name.split(".")[0]
    if not head:
      return
    if head in PACKAGES or self.group.get(head) == TEST:
      parts = imp.name.split(".")
      # Importing a.b.c runs a, a.b and a.b.c; ``from a.b import name`` may name an attribute.
      for i in range(1, len(parts) + 1):
        mod = ".".join(parts[:i])
        if mod in self.group and mod != src:
          self.edges[src].append((mod, imp.top))
    elif head in sys.stdlib_module_names or head in _NOT_THIRD_PARTY:
      return
    elif imp.optional:
      self.optional[src].add(head)
    else:
      self.third[src].add(head)

  def crossings(self) -> list[tuple[str, str, bool]]:
    """Imports from one group into another extra's subpackage (gated features)."""
    return [(m, n, top) for m, es in self.edges.items() for n, top in es
            if self.group[m] != TEST and self.group[n] not in (CORE, self.group[m])]

  def needs(self, module: str) -> dict[str, str]:
    """Third-party top-level module -> the module that imports it, over what ``module`` reaches
    (tests follow every edge; package modules stop at another extra's subpackage)."""
    out: dict[str, str] = {}
    seen, stack = {module}, [module]
    while stack:
      m = stack.pop()
      for t in self.third[m]:
        out.setdefault(t, m)
      for n, _ in self.edges[m]:
        gated = self.group[module] != TEST and self.group[n] not in (CORE, self.group[module])
        if n not in seen and not gated:
          seen.add(n)
          stack.append(n)
    return out


@lru_cache(maxsize=None)
def _graph() -> Graph:
  return Graph()


@lru_cache(maxsize=None)
def _dists_of_modules() -> dict[str, list[str]]:
  return {k: [_norm(d) for d in v] for k, v in metadata.packages_distributions().items()}


def _dists(top_module: str) -> list[str]:
  return _dists_of_modules().get(top_module) or [_norm(top_module)]


# Tests ------------------------------------------------------------------------------------------
def test_scanner_on_a_known_source():
  src = "\n".join([
      "import numpy as np",
      "from . import sibling",
      "from ..pkg import mod",
      "if TYPE_CHECKING:",
      "  import typing_only",
      "try:",
      "  import fast_json",
      "except ImportError:",
      "  fast_json = None",
      "try:",
      "  import needed",
      "except ImportError as e:",
      "  raise ValueError('pip install needed') from e",
      "class C:",
      "  import in_class_body",
      "  def m(self):",
      "    import lazy_dep",
      "    importlib.import_module('dyn')",
      "    return 'dllm_jax.server.app', 'dllm_jax server app'",
  ])
  got = _imports(ast.parse(src), "dllm_jax.a.b", is_pkg=False)
  assert set(got) == {
      Found("numpy", True, False), Found("dllm_jax.a.sibling", True, False),
      Found("dllm_jax.a", True, False), Found("dllm_jax.pkg.mod", True, False),
      Found("dllm_jax.pkg", True, False), Found("fast_json", True, True),
      Found("needed", True, False), Found("in_class_body", True, False),
      Found("lazy_dep", False, False), Found("dyn", False, False),
      Found("dllm_jax.server.app", False, False)}


def test_graph_sees_the_known_imports():
  """The scan of the repository finds imports of each kind (not a scan that finds nothing)."""
  g = _graph()
  assert "safetensors" in g.third["dllm_jax.model.loader"]  # module level
  assert "transformers" in g.third["dllm_jax.tokenizer"]  # inside a function
  assert "fastapi" in g.third["dllm_jax.server.app"]
  assert "torch" in g.needs("test_model_oracle")  # pytest.importorskip / tests/hf_oracle.py
  assert "matplotlib" in g.third["notebook:quickstart.ipynb"]
  assert g.group["dllm_jax.server.app"] == "serve" and g.group["dllm_jax.engine.engine"] == CORE
  assert "transformers" in g.needs("dllm_jax.engine.engine")  # through dllm_jax.tokenizer
  assert "fastapi" not in g.needs("dllm_jax.cli")  # ``serve`` is gated, not a core need
  assert "fastapi" in g.needs("test_server_openai")  # tests follow every edge


def test_every_group_in_pyproject():
  groups = set(_raw_groups())
  assert {CORE, TEST, *EXTRA_OF.values()} <= groups, groups


def test_every_third_party_import_is_declared():
  g = _graph()
  missing: dict[tuple[str, str, str], list[str]] = {}
  for module in sorted(g.group):
    allowed = _allowed(g.group[module])
    for top, via in sorted(g.needs(module).items()):
      if not set(_dists(top)) & allowed:
        missing.setdefault((g.group[module], top, via), []).append(module)
  lines = [f"[{grp}] {top!r} ({' or '.join(_dists(top))}), imported by {via}, needed by "
           f"{', '.join(mods[:3])}{' ...' if len(mods) > 3 else ''}"
           for (grp, top, via), mods in sorted(missing.items())]
  assert not lines, "undeclared in pyproject.toml:\n" + "\n".join(lines)


def test_imports_into_an_extra_are_inside_functions():
  """The core (and each extra) reaches another extra's subpackage only inside a function: the
  CLI's ``serve`` / ``bench`` commands, never at import time of a core module."""
  bad = [f"{m} imports {n} at module level" for m, n, top in _graph().crossings() if top]
  assert not bad, "\n".join(bad)
  assert _graph().crossings(), "the CLI's gated commands should show up as crossings"


def test_package_never_imports_torch():
  g = _graph()
  users = [m for m in g.group if g.group[m] != TEST and "torch" in g.third[m]]
  assert not users, f"torch is a test-time oracle only, imported by {users}"


@pytest.mark.parametrize("dist,group,reason", RUNTIME_NEEDS, ids=[r[0] for r in RUNTIME_NEEDS])
def test_runtime_needs_are_declared(dist, group, reason):
  assert _norm(dist) in _allowed(group), f"{dist} must be declared in {group}: {reason}"


def test_every_declaration_is_used():
  """No stale entry: each declared distribution is imported somewhere or is a listed run-time
  need (a removed import should take its dependency along)."""
  g = _graph()
  used = {d for m in g.group for t in g.third[m] for d in _dists(t)}
  used |= {_norm(d) for d, _, _ in RUNTIME_NEEDS}
  groups = [grp for grp in _raw_groups() if grp != "cuda12"]  # cuda12 is jax[cuda12]
  stale = sorted(d for grp in groups for d in _declared(grp) if d not in used)
  assert not stale, f"declared but never used: {stale}"


def test_every_requirement_has_both_bounds():
  """A fresh install must get versions the suite passed with: a lower and an upper bound (or
  ``==``) on every requirement."""
  me = _norm(_project()["name"])
  loose = []
  for grp, reqs in _raw_groups().items():
    for req in reqs:
      if _req_name(req)[0] == me:
        continue
      spec = req.split(";")[0]
      if "==" not in spec and not (">=" in spec and "<" in spec):
        loose.append(f"[{grp}] {req}")
  assert not loose, "requirements without a lower and an upper bound:\n" + "\n".join(loose)


def test_package_data_ships_every_data_file():
  """A non-Python file inside the package (presets, the demo model, calibration tables, the demo
  page) is read at run time, so a non-editable install must carry it: a package-data glob
  matches it."""
  globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
      "package-data"]
  left_out = []
  for pkg in PACKAGES:
    for path in sorted((ROOT / pkg).rglob("*")):
      rel = path.relative_to(ROOT / pkg).as_posix()
      if path.is_dir() or path.suffix in (".py", ".pyc") or "__pycache__" in rel:
        continue
      if not any(fnmatch.fnmatch(rel, g) for g in globs.get(pkg, [])):
        left_out.append(f"{pkg}/{rel}")
  assert not left_out, f"not in [tool.setuptools.package-data]: {left_out}"


# A fresh virtualenv with only [serve] -----------------------------------------------------------
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
  data = None if body is None else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
  direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
  try:
    with direct.open(req, timeout=timeout) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read() or b"{}")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
  return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_serve_extra_alone_in_a_fresh_venv(tmp_path):
  """``pip install ".[serve]"`` in a real virtualenv (no torch, no system site-packages): importing
  prints no 'PyTorch was not found' and a chat request through the server works (jinja2)."""
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", venv], check=True)
  py, bin_dir = venv / "bin" / "python", venv / "bin"
  src = tmp_path / "src"  # a copy, so the build leaves nothing in the working tree
  shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
      ".git", "__pycache__", "*.egg-info", "build", "dist", "results", "runs", ".pytest_cache"))
  pip = _run([py, "-m", "pip", "install", "-q", f"{src}[serve]"], timeout=1800)
  if pip.returncode and any(s in pip.stdout + pip.stderr for s in _NETWORK_ERRORS):
    pytest.skip(f"no package index reachable: {pip.stderr.strip().splitlines()[-1]}")
  assert pip.returncode == 0, pip.stdout + pip.stderr

  probe = _run([py, "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
               check=True)
  assert probe.stdout.split() == ["True"], "[serve] must not bring torch"
  imp = _run([py, "-c", "import dllm_jax, dllm_jax.engine.engine, dllm_jax.server.app\n"
                        "from dllm_jax.tokenizer import load_tokenizer\n"
                        "from dllm_jax.engine.engine import DEMO_MODEL_DIR\n"
                        "load_tokenizer(DEMO_MODEL_DIR)"], cwd=tmp_path, timeout=600)
  assert imp.returncode == 0, imp.stderr
  assert "PyTorch was not found" not in imp.stdout + imp.stderr, imp.stderr

  port = _free_port()
  log = open(tmp_path / "serve.log", "w+")
  server = subprocess.Popen(
      [str(bin_dir / "dllm-jax"), "serve", "--port", str(port), "--max-queue", "4",
       "--max-running", "1", "--token-budget", "1024", "--log-level", "warning"],
      cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
  base = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 600
    while True:
      assert server.poll() is None, (tmp_path / "serve.log").read_text()
      try:
        if _http(base + "/health", timeout=5)[0] == 200:
          break
      except OSError:
        pass
      assert time.monotonic() < deadline, "server not healthy in 600 s"
      time.sleep(1)
    status, out = _http(base + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "What is a generator?"}],
        "max_tokens": 16, "temperature": 0})
    assert status == 200, out
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert out["usage"]["prompt_tokens"] > 0 and out["usage"]["completion_tokens"] > 0
  finally:
    server.terminate()
    try:
      server.wait(timeout=60)
    except subprocess.TimeoutExpired:
      server.kill()
      server.wait()
    log.close()
  assert "PyTorch was not found" not in (tmp_path / "serve.log").read_text()

