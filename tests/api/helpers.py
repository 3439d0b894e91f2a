"""Helpers for API tests (plain functions, importable from test modules)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

from PIL import Image

MODEL = "tiny-vlm"
API_KEY = "sk-test-key"


def png_data_url(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def parse_sse(body: str) -> list[Any]:
    """SSE body → list of decoded `data:` payloads ('[DONE]' kept as the string)."""
    events = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def drive_asgi(app: Any, path: str, payload: dict[str, Any], disconnect: asyncio.Event,
                     on_body: Any = None) -> tuple[int | None, list[bytes]]:
    """POSTs `payload` to `app` through raw ASGI; the client "disconnects" (receive returns
    http.disconnect) once `disconnect` is set. `on_body(chunks)` runs after each body chunk
    sent. Returns (status, body chunks). httpx's ASGITransport buffers whole responses and
    cannot disconnect mid-stream, hence this driver."""
    body = json.dumps(payload).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 12345), "server": ("test", 80),
    }
    body_sent = False
    status: int | None = None
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message.get("body"):
            chunks.append(message["body"])
            if on_body is not None:
                on_body(chunks)

    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return status, chunks
