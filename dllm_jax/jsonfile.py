"""JSON objects with errors that name where they came from (config.json, presets, trace lines)."""

from __future__ import annotations

import json
import os
from typing import Any


def parse_object(text: str, where: str, error: type[ValueError] = ValueError) -> dict[str, Any]:
  """The JSON object in ``text``; ``error`` naming ``where`` when it is not valid JSON or not an
  object."""
  try:
    d = json.loads(text)
  except json.JSONDecodeError as e:
    raise error(f"{where}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise error(f"{where}: expected a JSON object, got {type(d).__name__}")
  return d


def read_object(path: str | os.PathLike) -> dict[str, Any]:
  """The JSON object in the file ``path`` (:func:`parse_object`; FileNotFoundError from
  ``open`` when it is missing)."""
  p = os.fspath(path)
  with open(p, encoding="utf-8") as fh:
    try:
      text = fh.read()
    except UnicodeDecodeError as e:
      raise ValueError(f"{p}: not valid JSON ({e})") from None
  return parse_object(text, p)
