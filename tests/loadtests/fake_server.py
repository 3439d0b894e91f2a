"""A deliberately slow OpenAI-style chat server for the load tester's own tests: one request
at a time (a lock), a fixed service time, and outcomes chosen by the prompt text (OK, 429,
503, 500, an error event mid-stream, a stream without usage). It logs when each request
was served, on the same perf_counter clock as the client (same process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    def __init__(self, service_s: float, tokens: int = 4) -> None:
        self.service_s, self.tokens = service_s, tokens
        self.log: list[dict] = []  # {"tag", "outcome", "start", "finish"} per request served
        self._lock: asyncio.Lock | None = None

    def _chunk(self, delta: dict, usage: dict | None = None) -> str:
        obj = {"id": "x", "object": "chat.completion.chunk", "model": "fake",
               "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": None}]}
        if usage:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"

    async def chat(self, request: Request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        tag, _, outcome = text.partition(":")
        if self._lock is None:
            self._lock = asyncio.Lock()
        if outcome in ("429", "503", "500"):
            self.log.append({"tag": tag, "outcome": outcome, "start": time.perf_counter(), "finish": time.perf_counter()})
            return JSONResponse({"error": {"message": "fake", "type": "fake", "code": int(outcome)}},
                                status_code=int(outcome), headers={"Retry-After": "1"})
        await self._lock.acquire()
        entry = {"tag": tag, "outcome": outcome, "start": time.perf_counter()}

        async def stream():
            try:
                step = self.service_s / self.tokens
                for i in range(self.tokens):
                    await asyncio.sleep(step)
                    if outcome == "stream-error" and i == 1:
                        yield 'data: {"error": {"message": "boom", "type": "internal_error", "code": 500}}\n\n'
                        return
                    yield self._chunk({"content": f"t{i} "})
                if outcome != "no-usage":
                    yield self._chunk({}, usage={"prompt_tokens": 10, "completion_tokens": self.tokens,
                                                 "total_tokens": 10 + self.tokens})
                yield "data: [DONE]\n\n"
            finally:
                entry["finish"] = time.perf_counter()
                self.log.append(entry)
                self._lock.release()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @contextlib.contextmanager
    def running(self):
        app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "fake server did not start"
            time.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(10)
