"""A loopback HTTP server of PNG images for media tests: it records every GET path, and holds
the answers to paths under /slow/ (before any header) until `gate` is set, so a test can keep
requests in the fetch stage for as long as it likes."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def noise_png(size: int, seed: int) -> bytes:
    """A size x size RGB PNG of random noise (it barely compresses: ~3 bytes a pixel)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class GatedMediaServer:
    def __init__(self, image: bytes, gate_timeout_s: float = 60.0) -> None:
        self.image = image
        self.gate = threading.Event()
        self.requested: list[str] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with owner._lock:
                    owner.requested.append(self.path)
                if self.path.startswith("/slow/"):
                    owner.gate.wait(gate_timeout_s)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(owner.image)))
                    self.end_headers()
                    self.wfile.write(owner.image)
                except OSError:  # the fetcher gave up (its request was refused or its client left)
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def count(self, prefix: str = "/") -> int:
        with self._lock:
            return sum(1 for p in self.requested if p.startswith(prefix))

    def __enter__(self) -> GatedMediaServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()
