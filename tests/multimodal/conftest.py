"""Media made by the tests themselves, and a tiny HTTP server on 127.0.0.1.

No test sends traffic outside 127.0.0.0/8: names like `public.example` are mapped to the local
server by an injected resolver, and refused addresses are refused before any connection.
"""

from __future__ import annotations

import base64
import gzip
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import av
import numpy as np
import pytest
from PIL import Image


def image_bytes(img: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_args)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def gray_clip(n: int = 16, rate: int = 8, size: tuple[int, int] = (64, 48), codec: str = "mpeg4",
              fmt: str = "mp4") -> bytes:
    """n frames; frame i is a flat gray of level 15*i, so a sampled frame tells its index."""
    w, h = size
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 15 * i % 256, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        parts = urlsplit(self.path)
        self.server.log.append((parts.path, self.headers.get("Host")))
        route = self.server.routes.get(parts.path)
        if route is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status, headers, body = route(parse_qs(parts.query))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers:
            self.send_header("Connection", "close")  # body ends when the connection closes
            self.close_connection = True
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading past its byte cap: expected

    def log_message(self, *args) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # clients that hang up early (timeouts, byte caps) are what the tests exercise


class LocalServer:
    def __init__(self) -> None:
        self.httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self.httpd.routes = {}
        self.httpd.log = []
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def log(self) -> list[tuple[str, str]]:
        return self.httpd.log

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def route(self, path: str, status: int = 200, body: bytes = b"", headers: dict | None = None,
              delay: float = 0.0, length: bool = True) -> None:
        def handler(query):
            if delay:
                time.sleep(delay)
            h = dict(headers or {})
            if length:
                h["Content-Length"] = str(len(body))
            return status, h, body
        self.httpd.routes[path] = handler

    def redirect(self, path: str, location: str) -> None:
        self.route(path, status=302, headers={"Location": location})


@pytest.fixture
def server():
    srv = LocalServer()
    srv.thread.start()
    red = Image.new("RGB", (8, 6), (200, 10, 10))
    srv.route("/img.png", body=image_bytes(red), headers={"Content-Type": "image/png"})
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def gzip_body(nbytes: int) -> bytes:
    return gzip.compress(b"\0" * nbytes, compresslevel=9)
