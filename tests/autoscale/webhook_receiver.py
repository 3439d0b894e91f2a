"""A loopback HTTP listener that records the JSON bodies POSTed to it (the scale webhook's
receiver in tests). `statuses`: answers to give, in order (then 200)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookReceiver:
    def __init__(self, statuses: list[int] | None = None, delay_s: float = 0.0) -> None:
        self.events: list[tuple[float, dict]] = []  # (time.monotonic() on arrival, body)
        self.attempts = 0
        self._statuses = list(statuses or [])
        self._delay_s = delay_s
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.attempts += 1
                if receiver._delay_s:
                    time.sleep(receiver._delay_s)
                status = receiver._statuses.pop(0) if receiver._statuses else 200
                if status == 200:
                    receiver.events.append((time.monotonic(), json.loads(body)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/scale"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, count: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return [body for _, body in self.events]
