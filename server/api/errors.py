"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`.

Status policy: 400 bad content, 401 auth, 404 unknown model or route, 413 body too large,
422 schema (pydantic) errors with the field path in `param`, 503 request dropped by the
server, 500 only for our own faults, with a message that exposes no internals.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmserve.multimodal.types import MediaError

logger = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 404: "not_found_error", 500: "server_error", 503: "server_error"}
INTERNAL_ERROR_MESSAGE = "internal server error; the request failed on our side, retry it or report it"


def error_type(status_code: int) -> str:
    return _TYPES.get(status_code, "invalid_request_error")


class APIError(Exception):
    """An error answered to the client as-is. Raise it anywhere in the API layer."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.type = type or error_type(status_code)
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status_code, param=self.param, code=self.code, type=self.type)


def internal_error() -> APIError:
    return APIError(INTERNAL_ERROR_MESSAGE, 500, code="internal_error")


def error_body(
    message: str, status_code: int, *, param: str | None = None, code: str | None = None, type: str | None = None
) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": type or error_type(status_code), "param": param, "code": code}
    }


def error_json_bytes(status_code: int, message: str, *, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps(error_body(message, status_code, param=param, code=code)).encode()


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


def format_loc(loc: Sequence[str | int]) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content' (OpenAI's param style)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_TYPE_LABELS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_field(part: str | int) -> bool:
    """False for the labels pydantic puts in a loc for union alternatives (`str`,
    `list[...]`, model class names, tagged-union tags, which are class names here)."""
    if isinstance(part, int):
        return True
    return not ("[" in part or "(" in part or part[:1].isupper() or part in _TYPE_LABELS)


def validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    if not errors:
        return APIError("invalid request body", 422)
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "malformed JSON")
        return APIError(f"request body is not valid JSON: {detail}", 400, code="invalid_json")
    if first.get("type") == "missing" and tuple(first.get("loc", ())) in ((), ("body",)):
        return APIError("request body is empty; send a JSON object with Content-Type: application/json", 400,
                        code="invalid_json")
    if first.get("type") == "model_attributes_type" and tuple(first.get("loc", ())) in ((), ("body",)):
        return APIError("request body must be a JSON object sent with Content-Type: application/json", 422)
    # A union reports one error per alternative: the deepest path is the most specific one,
    # and alternatives failing at that same path are listed together.
    located = [(format_loc([p for p in e.get("loc", ()) if _is_field(p)]), e) for e in errors]
    depth = max(param.count(".") + param.count("[") for param, _ in located)
    param = next(p for p, _ in located if p.count(".") + p.count("[") == depth)
    messages = list(dict.fromkeys(e.get("msg", "invalid value") for p, e in located if p == param))
    where = f"{param}: " if param else ""
    return APIError(f"{where}{' or '.join(messages)}", 422, param=param or None, code="invalid_schema")


async def _api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _validation_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(exc))


async def _media_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MediaError)
    return error_response(APIError(str(exc), exc.status_code, param=exc.param))


def _body_parse_error(cause: BaseException) -> APIError:
    """FastAPI answers any failure to read the body as JSON other than a syntax error with a
    bare "There was an error parsing the body"; say which failure it was."""
    if isinstance(cause, UnicodeDecodeError):
        why = f"is not valid UTF-8 ({cause.reason} at byte {cause.start})"
    elif isinstance(cause, RecursionError):
        why = "nests arrays or objects too deeply to parse"
    else:
        why = f"could not be parsed ({type(cause).__name__})"
    return APIError(f"request body {why}; send a JSON object encoded as UTF-8 (no Content-Encoding)", 400,
                    code="invalid_json")


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 400 and exc.__cause__ is not None:
        return error_response(_body_parse_error(exc.__cause__))
    if exc.status_code == 404:
        message = "no such route; this server serves /v1/chat/completions, /v1/completions, /v1/models, /health"
    if exc.status_code == 405:
        allowed = (headers or {}).get("allow") or (headers or {}).get("Allow") or "another method"
        message = f"method {request.method} is not allowed on {request.url.path}; use {allowed}"
    return error_response(APIError(message, exc.status_code, headers=headers))


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(internal_error())


def install_exception_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(MediaError, _media_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unhandled_handler)
