"""Field checks of the static configs: one wording for every config's ValueError.

Every message starts with the field's name, so a caller (CLI, HTTP) can report it as is.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


def require_int(name: str, v: Any, lo: int = 1, *, optional: bool = False) -> None:
  """``v`` is an int >= ``lo`` (a bool is not an int here); None passes when ``optional``."""
  if v is None and optional:
    return
  if isinstance(v, bool) or not isinstance(v, int) or v < lo:
    null = " or null" if optional else ""
    raise ValueError(f"{name}: expected an integer >= {lo}{null}, got {v!r}")


def require_ints(obj: Any, names: Iterable[str], lo: int = 1, *, optional: bool = False) -> None:
  """:func:`require_int` for each attribute ``names`` of ``obj``."""
  for name in names:
    require_int(name, getattr(obj, name), lo, optional=optional)


def require_choice(name: str, v: Any, choices: tuple) -> None:
  if v not in choices:
    raise ValueError(f"{name}: expected one of {choices}, got {v!r}")


def require_number(name: str, v: Any) -> float:
  """``v`` as a float: a finite or infinite real, not a bool and not NaN."""
  if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
    raise ValueError(f"{name}: expected a number, got {v!r}")
  return float(v)


def require_bool(name: str, v: Any) -> None:
  if not isinstance(v, bool):
    raise ValueError(f"{name}: expected true or false, got {v!r}")
