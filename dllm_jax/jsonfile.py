"""Reading a JSON object file with errors that name the file (config.json, presets, ...)."""

from __future__ import annotations

import json
import os
from typing import Any


def read_object(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON object in ``path``. ValueError naming the file when it is not valid JSON or not an
  object; FileNotFoundError (from ``open``) when it is missing."""
  p = os.fspath(path)
  with open(p) as fh:
    try:
      d = json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"{p}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise ValueError(f"{p}: expected a JSON object")
  return d
