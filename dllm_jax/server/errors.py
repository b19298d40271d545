"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

:class:`APIError` is what handlers raise; :func:`validation_error` turns a pydantic
``ValidationError`` into one that names the field (``messages[0].content``, ``sparse``) in plain
words; :func:`install` registers the app's exception handlers (a client that disconnects while
its body is read is a client abort, counted, never a traceback).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger("dllm_jax.server")


class APIError(Exception):
  """An OpenAI-style error response."""

  def __init__(self, status: int, message: str, *, type: str | None = None,
               param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.type = status, message, type or type_for(status)
    self.param, self.code, self.headers = param, code, headers


def client_closed() -> APIError:
  return APIError(499, "client closed the request", code="client_closed")


def clean(s: Any, limit: int = 500) -> str | None:
  """User-derived text made safe for a JSON body (lone surrogates escaped, length capped)."""
  if s is None:
    return None
  s = str(s).encode("utf-8", "backslashreplace").decode("utf-8")
  return s if len(s) <= limit else s[:limit] + "..."


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
  return {"error": {"message": clean(message), "type": type, "param": clean(param, 100),
                    "code": code}}


def error_response(e: APIError) -> JSONResponse:
  return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status,
                      headers=e.headers)


def type_for(status: int) -> str:
  if status == 401:
    return "authentication_error"
  if status == 404:
    return "not_found_error"
  if status == 429:
    return "rate_limit_error"
  if status >= 500:
    return "server_error"
  return "invalid_request_error"


# Validation errors -------------------------------------------------------------------------------
# Plain words for pydantic's type errors; a union's alternatives are joined with "or".
_EXPECTED = {
    "string_type": "a string", "int_type": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "bool_type": "true or false", "list_type": "an array",
    "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
    "none_required": "null",
}


def _json_type(v: Any) -> str:
  if v is None:
    return "null"
  if isinstance(v, bool):
    return "a boolean"
  if isinstance(v, (int, float)):
    return "a number"
  if isinstance(v, str):
    return "a string"
  if isinstance(v, list):
    return "an array"
  return "an object"


def _path(loc, branches: frozenset[str], keep_last: bool = False) -> tuple:
  """The field path of an error location without pydantic's union-branch names (``str``,
  ``list[int]``, ``constrained-str``, model names); ``keep_last``: the last element is a key
  the client sent (an unknown field), whatever it looks like."""
  loc = tuple(x for x in loc if x != "body")
  head, tail = (loc[:-1], loc[-1:]) if keep_last and loc else (loc, ())
  return tuple(x for x in head if not (isinstance(x, str) and (
      x in branches or "[" in x or x.startswith("constrained-")))) + tail


def field_name(path: tuple) -> str | None:
  out = ""
  for x in path:
    out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
  return out or None


def validation_error(e: ValidationError | RequestValidationError,
                     branches: frozenset[str] = frozenset()) -> APIError:
  """One 400 for a failed validation: the first problem, by the deepest field it reaches
  (a union reports the branch that got furthest, or its alternatives when none did)."""
  errs = list(e.errors())
  if not errs:
    return APIError(400, "invalid request body")
  branches = branches | {"str", "int", "float", "bool", "dict", "list", "none"}
  paths = [_path(err.get("loc", ()), branches, err.get("type") == "extra_forbidden")
           for err in errs]
  first = errs[0]
  kind = first.get("type", "")
  if kind == "json_invalid":
    return APIError(400, f"the request body is not valid JSON ({first.get('msg')})",
                    code="invalid_json")
  if kind in ("model_type", "dict_type") and not paths[0]:
    return APIError(400, "the request body must be a JSON object")
  # A shorter path that is a prefix of another is a union branch that failed earlier.
  kept = [i for i, p in enumerate(paths)
          if not any(len(q) > len(p) and q[:len(p)] == p for q in paths)]
  groups: dict[tuple, list[dict]] = {}
  for i in kept:
    groups.setdefault(paths[i], []).append(errs[i])
  path, group = next(iter(groups.items()))
  param = field_name(path)
  more = len(groups) - 1
  extra = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
  kinds = [g.get("type", "") for g in group]
  if "extra_forbidden" in kinds:
    return APIError(400, f"unknown parameter: {param}{extra}", param=param)
  if "missing" in kinds:
    return APIError(400, f"missing required parameter: {param}{extra}", param=param)
  if all(k in _EXPECTED for k in kinds):
    alts = list(dict.fromkeys(_EXPECTED[k] for k in kinds))
    msg = f"expected {' or '.join(alts)}, got {_json_type(group[0].get('input'))}"
  else:
    msgs = [str(g.get("msg", "invalid value")) for g in group
            if g.get("type", "") not in _EXPECTED] or [str(group[0].get("msg"))]
    msg = "; ".join(dict.fromkeys(m.removeprefix("Value error, ") for m in msgs))
  return APIError(400, f"invalid value for {param or 'the body'}: {msg}{extra}", param=param)


# Handlers ----------------------------------------------------------------------------------------
def install(app: FastAPI, metrics, branches: frozenset[str] = frozenset()) -> None:
  """Answer every failure with the OpenAI error body (and never a traceback for a client that
  went away)."""

  @app.exception_handler(APIError)
  async def _api_error(request: Request, e: APIError):
    return error_response(e)

  @app.exception_handler(ClientDisconnect)
  async def _client_disconnect(request: Request, e: ClientDisconnect):
    metrics.client_gone("body")
    return error_response(client_closed())

  @app.exception_handler(RequestValidationError)
  async def _validation_error(request: Request, e: RequestValidationError):
    return error_response(validation_error(e, branches))

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request: Request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(error_body(str(e.detail), type_for(e.status_code), None, code),
                        status_code=e.status_code, headers=getattr(e, "headers", None))

  @app.exception_handler(Exception)
  async def _internal_error(request: Request, e: Exception):
    log.exception("unhandled error")
    return JSONResponse(error_body("internal server error", "server_error", None,
                                   "internal_error"), status_code=500)
