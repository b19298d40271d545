"""The import graph of dllm_jax/ and pallas_kernels/ keeps the layering docs/architecture.md states.

The graph is read from the source (``ast``), not by importing anything: every ``import`` and
``from ... import`` of the two packages, relative ones resolved, each edge marked "module" (runs
when the module is imported: module level, including module-level ``if`` / ``try`` bodies) or
"deferred" (inside a function or lambda, or under ``if __name__ == "__main__":``).
``from pkg import name`` is an edge to the submodule ``pkg.name`` when there is one, else to
``pkg``. Importing ``a.b.c`` also initialises ``a`` and ``a.b``; those implicit parent edges are
not listed (Python resolves them before the module runs, so they cannot form a cycle of their
own). Modules loaded by name through importlib (the CLI's commands, ``dllm_jax.__getattr__``)
are not edges.

Checks: the layer rules (RULES, every edge, deferred ones included), no import cycle through
module-level edges, and no cycle through deferred edges beyond the known ones listed in
KNOWN_DEFERRED_CYCLES (each with its reason; a deferred cycle still ties two modules together,
so a new one fails and a listed one that is gone must be deleted from the list). Each check is
also run on a graph with an injected edge, which it must catch.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dllm_jax", "pallas_kernels")

# The configuration layer: jax-free (the CLI builds its parser from it without importing jax).
CONFIG_LAYER = ("dllm_jax", "dllm_jax.checks", "dllm_jax.jsonfile", "dllm_jax.model_config",
                "dllm_jax.sampling_params", "dllm_jax.config", "dllm_jax.presets",
                "dllm_jax.engine_flags", "dllm_jax.compile_cache", "dllm_jax.sampling",
                "dllm_jax.sampling.plan", "pallas_kernels", "pallas_kernels.impls")
CLI = ("dllm_jax.cli", "dllm_jax.cli_commands", "dllm_jax.cli_generate")
APPS = ("dllm_jax.server", "dllm_jax.bench", "dllm_jax.train", "dllm_jax.testing") + CLI

# (importer prefix, forbidden target prefixes, why). A prefix names a module and its submodules.
RULES = (
    ("pallas_kernels", ("dllm_jax",), "the kernels know nothing of the application"),
    ("dllm_jax.model", ("dllm_jax.engine",) + APPS, "the model is below the engine"),
    ("dllm_jax.sampling", ("dllm_jax.model", "dllm_jax.cache", "dllm_jax.engine") + APPS,
     "the decode head is a leaf the model and engine use"),
    ("dllm_jax.cache", ("dllm_jax.model", "dllm_jax.sampling", "dllm_jax.engine") + APPS,
     "the KV cache's state and selection are a leaf the model and engine use"),
    ("dllm_jax.engine", APPS, "the engine serves the applications, never the reverse"),
    ("dllm_jax.server", ("dllm_jax.bench", "dllm_jax.train", "dllm_jax.testing"),
     "the server runs on the engine alone"),
    ("dllm_jax.bench", ("dllm_jax.server", "dllm_jax.testing"),
     "benchmarks drive the engine (or a server over HTTP), not the server's code"),
    ("dllm_jax.train", ("dllm_jax.engine", "dllm_jax.server", "dllm_jax.bench",
                        "dllm_jax.testing"), "training needs the model only"),
    ("dllm_jax", ("dllm_jax.testing",), "test-only code is imported by tests alone"),
)

# Cycles that exist only through deferred imports, each a set of modules, with the reason.
KNOWN_DEFERRED_CYCLES = {
    frozenset({"dllm_jax.model.transformer", "dllm_jax.model.fused"}):
        "Transformer.__call__ runs the fused step forward, which is built from the Transformer's "
        "blocks",
    frozenset({"dllm_jax.model.loader", "dllm_jax.model.checkpoint"}):
        "load_model reads orbax directories too; checkpoint builds models with the loader",
}


@dataclasses.dataclass(frozen=True)
class Edge:
  src: str
  dst: str
  kind: str     # "module" or "deferred"
  line: int


def _modules(root: str, packages) -> dict[str, str]:
  """Module name -> file, for every .py under the packages."""
  out = {}
  for pkg in packages:
    for d, dirs, files in os.walk(os.path.join(root, pkg)):
      dirs[:] = [x for x in dirs if x != "__pycache__"]
      for f in files:
        if f.endswith(".py"):
          parts = os.path.relpath(os.path.join(d, f), root)[:-3].split(os.sep)
          if parts[-1] == "__init__":
            parts = parts[:-1]
          out[".".join(parts)] = os.path.join(d, f)
  return out


def _is_main_block(node) -> bool:
  t = node.test if isinstance(node, ast.If) else None
  return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name)
          and t.left.id == "__name__" and len(t.comparators) == 1
          and isinstance(t.comparators[0], ast.Constant) and t.comparators[0].value == "__main__")


def build_graph(root: str = REPO, packages=PACKAGES) -> tuple[dict[str, str], list[Edge]]:
  mods = _modules(root, packages)
  edges: list[Edge] = []
  for name, path in mods.items():
    with open(path, encoding="utf-8") as fh:
      tree = ast.parse(fh.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]

    def add(dst: str, kind: str, node) -> None:
      if dst.split(".")[0] in packages:
        edges.append(Edge(name, dst, kind, node.lineno))

    def visit(node, kind: str) -> None:
      for child in ast.iter_child_nodes(node):
        k = kind
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or \
            _is_main_block(child):
          k = "deferred"
        if isinstance(child, ast.Import):
          for alias in child.names:
            add(alias.name, k, child)
        elif isinstance(child, ast.ImportFrom):
          base = child.module or ""
          if child.level:
            parts = package.split(".")
            parts = parts[:len(parts) - (child.level - 1)]
            base = ".".join(parts + ([base] if base else []))
          for alias in child.names:
            sub = f"{base}.{alias.name}"
            add(sub if sub in mods else base, k, child)
        visit(child, k)

    visit(tree, "module")
  return mods, edges


def _under(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix + ".")


def rule_violations(edges) -> list[str]:
  out = []
  for e in edges:
    for src, banned, why in RULES:
      if not _under(e.src, src):
        continue
      for b in banned:
        if _under(e.dst, b) and not _under(e.src, b):
          out.append(f"{e.src}:{e.line} imports {e.dst} ({e.kind}): {why}")
  for e in edges:
    if e.src in CONFIG_LAYER and e.dst not in CONFIG_LAYER:
      out.append(f"{e.src}:{e.line} imports {e.dst}: the configuration layer imports only "
                 f"itself ({', '.join(CONFIG_LAYER)})")
  return out


def cycles(nodes, edges) -> list[frozenset]:
  """Strongly connected components with more than one module (self-imports are ignored)."""
  graph: dict[str, set] = {n: set() for n in nodes}
  for e in edges:
    if e.src != e.dst and e.dst in graph:
      graph[e.src].add(e.dst)
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = iter(range(10**9))

  def strong(v):  # Tarjan, iterative over successors via recursion depth = SCC chain length
    index[v] = low[v] = next(counter)
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = set()
      while True:
        w = stack.pop()
        on.discard(w)
        comp.add(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(frozenset(comp))

  for v in sorted(graph):
    if v not in index:
      strong(v)
  return out


def _external_module_imports(path: str) -> set[str]:
  """Top-level names of the packages a file imports at module level (not deferred)."""
  with open(path, encoding="utf-8") as fh:
    tree = ast.parse(fh.read(), path)
  out = set()
  for node in tree.body:
    if isinstance(node, ast.Import):
      out |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
      out.add(node.module.split(".")[0])
  return out


@pytest.fixture(scope="module")
def graph():
  return build_graph()


# The real graph -------------------------------------------------------------------------------


def test_graph_is_read(graph):
  """Sanity: the walker sees the packages and the edges the rules are about."""
  mods, edges = graph
  assert {"dllm_jax.config", "dllm_jax.engine.core", "pallas_kernels.impls"} <= set(mods)
  pairs = {(e.src, e.dst, e.kind) for e in edges}
  assert ("dllm_jax.config", "pallas_kernels.impls", "module") in pairs
  assert ("dllm_jax.model.transformer", "dllm_jax.model.fused", "deferred") in pairs


def test_layer_rules(graph):
  _, edges = graph
  assert rule_violations(edges) == []


def test_no_module_level_cycle(graph):
  mods, edges = graph
  assert cycles(mods, [e for e in edges if e.kind == "module"]) == []


def test_deferred_cycles_are_the_known_ones(graph):
  mods, edges = graph
  found = set(cycles(mods, edges))
  new = [sorted(c) for c in found - set(KNOWN_DEFERRED_CYCLES)]
  gone = [sorted(c) for c in set(KNOWN_DEFERRED_CYCLES) - found]
  assert not new, f"new import cycles through deferred imports: {new}"
  assert not gone, f"fixed cycles still listed in KNOWN_DEFERRED_CYCLES (delete them): {gone}"


def test_configuration_layer_imports_no_jax():
  mods, _ = build_graph()
  for name in CONFIG_LAYER:
    heavy = _external_module_imports(mods[name]) & {"jax", "jaxlib", "flax", "numpy", "optax"}
    assert not heavy, f"{name} imports {sorted(heavy)} at module level"


# Each check catches an injected edge ----------------------------------------------------------


@pytest.mark.parametrize("src,dst", [
    ("pallas_kernels.common", "dllm_jax.config"),
    ("dllm_jax.model.layers", "dllm_jax.engine.core"),
    ("dllm_jax.engine.scheduler", "dllm_jax.server.app"),
    ("dllm_jax.engine.core", "dllm_jax.bench.metrics"),
    ("dllm_jax.config", "dllm_jax.engine.memory"),
    ("dllm_jax.sampling.decode", "dllm_jax.model.transformer"),
])
def test_rules_catch_an_injected_edge(graph, src, dst):
  _, edges = graph
  for kind in ("module", "deferred"):
    bad = rule_violations(edges + [Edge(src, dst, kind, 1)])
    assert any(v.startswith(f"{src}:1 imports {dst}") for v in bad), (kind, bad)


def test_cycle_check_catches_an_injected_edge(graph):
  mods, edges = graph
  module = [e for e in edges if e.kind == "module"]
  # engine_flags imports config at module level; config importing engine_flags closes a loop.
  found = cycles(mods, module + [Edge("dllm_jax.config", "dllm_jax.engine_flags", "module", 1)])
  assert frozenset({"dllm_jax.config", "dllm_jax.engine_flags"}) in found
  deferred = cycles(mods, edges + [Edge("dllm_jax.engine.memory", "dllm_jax.engine.core",
                                        "deferred", 1)])
  assert set(deferred) - set(KNOWN_DEFERRED_CYCLES)


# The walker on a package written for the test -------------------------------------------------


def test_walker_resolves_relative_deferred_and_main_imports(tmp_path):
  files = {
      "pkg/__init__.py": "from . import a\n",
      "pkg/a.py": """
          import os
          from pkg.sub import b
          from .sub.b import helper
          try:
            from pkg import c
          except ImportError:
            c = None

          def f():
            from ..pkg import c  # noqa

          if __name__ == "__main__":
            import pkg.a
      """,
      "pkg/c.py": "from .sub import NAME\nfrom pkg.sub.b import *\n",
      "pkg/sub/__init__.py": "NAME = 1\n",
      "pkg/sub/b.py": "from pkg import a  # closes a -> c -> b -> a\nhelper = None\n",
  }
  for rel, text in files.items():
    p = tmp_path / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
  mods, edges = build_graph(str(tmp_path), ("pkg",))
  assert set(mods) == {"pkg", "pkg.a", "pkg.c", "pkg.sub", "pkg.sub.b"}
  got = {(e.src, e.dst, e.kind) for e in edges}
  assert got == {
      ("pkg", "pkg.a", "module"),
      ("pkg.a", "pkg.sub.b", "module"),        # from pkg.sub import b: the submodule
      ("pkg.a", "pkg.c", "module"),            # inside a module-level try
      ("pkg.a", "pkg.c", "deferred"),          # from ..pkg import c inside a function
      ("pkg.a", "pkg.a", "deferred"),          # the __main__ block
      ("pkg.c", "pkg.sub", "module"),          # from .sub import NAME: a name of pkg.sub
      ("pkg.c", "pkg.sub.b", "module"),
      ("pkg.sub.b", "pkg.a", "module"),
  }
  assert cycles(mods, [Edge(*t, 1) for t in got]) == [frozenset({"pkg.a", "pkg.c", "pkg.sub.b"})]
