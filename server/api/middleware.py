"""Pure ASGI middlewares that must act before FastAPI reads and parses the body.

- `ApiKeyMiddleware`: `/v1/*` needs `Authorization: Bearer <key>`. It is a middleware and
  not a route dependency because FastAPI reads and validates the body before it runs
  dependencies: an unauthenticated client would otherwise get 413/422 answers and make
  us parse up to `max_request_body_bytes` of JSON.
- `BodySizeLimitMiddleware`: 413 when Content-Length exceeds the limit, and also while
  reading a body sent without one (chunked) or with a false one.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vlmserve.api.errors import error_json_bytes

PROTECTED_PREFIX = "/v1"


async def send_error(send: Send, status_code: int, message: str, *, code: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_json_bytes(status_code, message, code=code)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status_code, "headers": raw_headers + (headers or [])})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


# Read by autoscalers (KEDA, HPA adapters), which carry no API key, like /health and /metrics.
OPEN_PATHS = frozenset({"/v1/load"})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        protected = (path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")) and path not in OPEN_PATHS
        if not protected or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = (_header(scope, b"authorization") or b"").strip()
        # The scheme is case-insensitive (RFC 9110 section 11.1); the token is compared exactly.
        scheme, _, token = given.partition(b" ")
        is_bearer = scheme.lower() == b"bearer"
        if not (is_bearer and secrets.compare_digest(token.strip(), self._key)):
            if not given:
                message = "missing API key: send it as 'Authorization: Bearer <key>'"
            elif not is_bearer:
                message = "the Authorization header must use the Bearer scheme: 'Authorization: Bearer <key>'"
            else:
                message = "invalid API key: the Bearer token does not match the server's --api-key"
            await send_error(send, 401, message, code="invalid_api_key",
                             headers=[(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return (
            f"request body of {size} exceeds the limit of {self.max_bytes} bytes; send smaller or fewer "
            "images (or image URLs instead of inline data), or raise the server's --max-request-body-bytes"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, 413, self._message(f"{int(declared)} bytes"), code="request_too_large")
            return

        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            # Whatever the app answers after the body overflowed (FastAPI turns a failed
            # body read into a 400), the client gets the 413.
            if exceeded:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if exceeded and not started:
            await send_error(send, 413, self._message(f"more than {self.max_bytes} bytes"), code="request_too_large")
