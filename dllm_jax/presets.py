"""Presets: the model and engine configs shipped inside the package (``dllm_jax/configs/``).

Every ``--config`` / ``--model-config`` / ``--engine-config`` flag and ``dllm-jax info`` take a
path or a preset name, resolved here:

    resolve("llada-8b")               # -> .../dllm_jax/configs/llada-8b.json
    resolve("configs/llada-8b.json")  # the documented repository path, from any directory
    resolve("my/config.json")         # an existing path is returned unchanged

Model presets (``llada-8b``, ``dream-7b``, ``bench-small``) are HF ``config.json`` files: an
architecture, no weights. Engine presets (``engine-*``) are EngineConfig fields. Keys starting
with ``_`` are comments.
"""

from __future__ import annotations

import os
from importlib import resources

from dllm_jax import jsonfile

SUFFIX = ".json"
ENGINE_PREFIX = "engine-"  # engine presets (EngineConfig fields); the others are model configs
_REPO_DIR = "configs"  # the repository's top-level symlink to the package directory


def preset_dir() -> str:
  """The directory holding the presets (package data)."""
  return str(resources.files("dllm_jax") / "configs")


def names() -> tuple[str, ...]:
  """Preset names, sorted (file names without .json)."""
  try:
    files = os.listdir(preset_dir())
  except OSError:
    return ()
  return tuple(sorted(f[:-len(SUFFIX)] for f in files if f.endswith(SUFFIX)))


def model_names() -> tuple[str, ...]:
  """The model presets (every preset but the ``engine-*`` ones)."""
  return tuple(n for n in names() if not n.startswith(ENGINE_PREFIX))


def preset_path(name: str) -> str:
  """The file of preset ``name``; FileNotFoundError (listing the presets) if there is none."""
  path = os.path.join(preset_dir(), name + SUFFIX)
  if name and os.sep not in name and os.path.isfile(path):
    return path
  raise FileNotFoundError(f"no preset named {name!r} (presets: {', '.join(names())})")


def _preset_name(ref: str) -> str | None:
  """``ref`` as a preset name, if it spells one: 'llada-8b', 'llada-8b.json' or
  'configs/llada-8b.json'."""
  head, tail = os.path.split(os.path.normpath(ref))
  if head not in ("", _REPO_DIR):
    return None
  stem = tail[:-len(SUFFIX)] if tail.endswith(SUFFIX) else tail
  return stem if stem in names() else None


def is_preset(ref: str) -> bool:
  """True when ``ref`` names a preset and is not an existing path."""
  return not os.path.exists(ref) and _preset_name(ref) is not None


def resolve(ref: str | os.PathLike) -> str:
  """An existing file or directory unchanged, else the preset ``ref`` names.

  Raises FileNotFoundError naming ``ref`` and the presets when it is neither.
  """
  ref = os.fspath(ref)
  if os.path.exists(ref):
    return ref
  name = _preset_name(ref)
  if name is None:
    raise FileNotFoundError(f"no such file, directory or preset: {ref} "
                            f"(presets: {', '.join(names())})")
  return preset_path(name)


def load_dict(ref: str | os.PathLike) -> dict:
  """The JSON object of a preset or config file, without its ``_`` comment keys."""
  path = resolve(ref)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  return {k: v for k, v in jsonfile.read_object(path).items() if not k.startswith("_")}


def model_config(ref: str | os.PathLike):
  """The ModelConfig of a preset name, a config.json or a model directory (named after the
  preset, the file's stem or the directory)."""
  from dllm_jax.config import ModelConfig

  path = resolve(ref)
  if os.path.isdir(path):
    return ModelConfig.from_json(path)
  name = os.path.splitext(os.path.basename(path))[0]
  if name == "config":  # a model directory's config.json: named after the directory
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
  return ModelConfig.from_dict(load_dict(path), name=name)
