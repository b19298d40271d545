"""Offline text corpus for the bundled demo model: English prose that ships with Python.

Documents are ``pydoc_data.topics.topics`` entries (one per topic) plus stdlib docstrings (one per
module / class / function docstring of at least ``MIN_DOC_CHARS`` characters). They are split ONCE
into train / held-out by document (seeded) and the snapshot is committed, xz-compressed, under
``dllm_jax/assets/corpus/`` so the data -- and everything trained on it -- does not change with
the Python version. :func:`load_corpus` only reads that snapshot; :func:`build_snapshot`
regenerates it (run once, by hand)::

  python -m dllm_jax.train.corpus dllm_jax/assets/corpus
"""

from __future__ import annotations

import ast
import json
import lzma
import os
import random
import sys
import warnings

SPLITS = ("train", "heldout")
CORPUS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "assets", "corpus")
MIN_DOC_CHARS = 200      # shorter docstrings are mostly one-liners ("Return self.")
MAX_DOC_CHARS = 20_000   # a few huge module docstrings would dominate the windows
HELDOUT_FRACTION = 0.05
SPLIT_SEED = 0
MAX_TOTAL_CHARS = 2_600_000  # keeps the committed snapshot well under a few MB compressed

# Directories of the stdlib tree that are tests, tools or third-party code, not prose.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "lib2to3", "turtledemo", "ensurepip", "config-3.11-x86_64-linux-gnu"}


def _path(split: str, corpus_dir: str | None = None) -> str:
  if split not in SPLITS:
    raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
  return os.path.join(corpus_dir or CORPUS_DIR, f"{split}.jsonl.xz")


def load_corpus(split: str, corpus_dir: str | None = None) -> list[str]:
  """The committed documents of ``split`` ("train" or "heldout"), in snapshot order."""
  p = _path(split, corpus_dir)
  if not os.path.isfile(p):
    raise FileNotFoundError(f"corpus snapshot not found: {p} (build it with "
                            f"python -m dllm_jax.train.corpus {os.path.dirname(p)})")
  with lzma.open(p, "rt", encoding="utf-8") as fh:
    return [json.loads(line)["text"] for line in fh if line.strip()]


# Building the snapshot (uses the running Python's stdlib) ------------------------------------

def _clean(text: str) -> str:
  lines = [ln.rstrip() for ln in text.strip().splitlines()]
  return "\n".join(lines)


def topic_documents() -> list[str]:
  """One document per pydoc topic, in sorted topic order."""
  from pydoc_data.topics import topics
  return [_clean(topics[k]) for k in sorted(topics)]


def _walk_py_files(root: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    for f in sorted(filenames):
      if f.endswith(".py") and not f.startswith("test_"):
        out.append(os.path.join(dirpath, f))
  return sorted(out)


def docstring_documents(root: str | None = None, min_chars: int = MIN_DOC_CHARS) -> list[str]:
  """Module / class / function docstrings of the stdlib under ``root`` (default: ``os``'s dir).

  Deduplicated (first occurrence wins), in sorted file order then source order.
  """
  root = root or os.path.dirname(os.__file__)
  docs, seen = [], set()
  for path in _walk_py_files(root):
    try:
      with open(path, encoding="utf-8") as fh:
        src = fh.read()
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old modules
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    for node in ast.walk(tree):
      if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      doc = ast.get_docstring(node)
      if not doc:
        continue
      doc = _clean(doc)
      if len(doc) < min_chars or doc in seen:
        continue
      seen.add(doc)
      docs.append(doc[:MAX_DOC_CHARS])
  return docs


def split_documents(docs: list[str], heldout_fraction: float = HELDOUT_FRACTION,
                    seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
  """Seeded split by document; both parts keep the input order."""
  idx = list(range(len(docs)))
  random.Random(seed).shuffle(idx)
  n_held = max(1, round(len(docs) * heldout_fraction))
  held = set(idx[:n_held])
  train = [d for i, d in enumerate(docs) if i not in held]
  heldout = [d for i, d in enumerate(docs) if i in held]
  return train, heldout


def build_snapshot(out_dir: str = CORPUS_DIR, *, max_total_chars: int = MAX_TOTAL_CHARS) -> dict:
  """Regenerate ``train.jsonl.xz`` / ``heldout.jsonl.xz`` in ``out_dir``; returns a summary.

  Used once; the result is committed. Depends on the running Python's stdlib.
  """
  docs = topic_documents() + docstring_documents()
  total, kept = 0, []
  for d in docs:  # topics first, then docstrings, until the size cap
    if total + len(d) > max_total_chars:
      break
    kept.append(d)
    total += len(d)
  train, heldout = split_documents(kept)
  os.makedirs(out_dir, exist_ok=True)
  summary = {"python": sys.version.split()[0]}
  for split, part in (("train", train), ("heldout", heldout)):
    p = _path(split, out_dir)
    # preset 9 + no timestamps in the xz container: byte-stable output for the same input.
    with lzma.open(p, "wt", encoding="utf-8", preset=9) as fh:
      for d in part:
        fh.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    summary[split] = {"docs": len(part), "chars": sum(map(len, part)),
                      "bytes_xz": os.path.getsize(p)}
  return summary


if __name__ == "__main__":
  print(json.dumps(build_snapshot(sys.argv[1] if len(sys.argv) > 1 else CORPUS_DIR), indent=2))
