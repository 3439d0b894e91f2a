"""The open-loop sender: every request goes out at its scheduled time whatever the server
is doing, and is timed from that intended time, so a slow server's queueing shows up in the
latencies instead of silently lowering the offered load (coordinated omission). The gap
between the intended and the actual send time is the client's own lag, reported apart.

Bodies are built before the clock starts (media encoding would otherwise be client lag).
Times in a RequestRecord are seconds from the run's t0 (time.perf_counter based).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from loadtests.workload import PlannedRequest


@dataclass
class RequestRecord:
    index: int
    kind: str
    cache: str | None
    media: tuple[str, ...]
    intended: float  # scheduled send time
    sent: float = float("nan")  # when the client actually sent it (sent - intended = client lag)
    first_token: float | None = None
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    status: int | None = None  # HTTP status; None when the transport failed first
    error: str | None = None  # None on success; else "http:429", "transport:ReadTimeout", "stream:..."
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    image_tokens: int | None = None  # from usage when the server reports it, else calibrated

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def lag(self) -> float:
        return self.sent - self.intended

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.intended

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.intended

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (chunks may carry several tokens)."""
        n = self.completion_tokens or len(self.chunk_times)
        if n < 2 or self.first_token is None or self.end is None:
            return None
        return (self.chunk_times[-1] - self.first_token) / (n - 1)


def error_key(rec: RequestRecord) -> str:
    return rec.error or "ok"


async def _consume_stream(resp: httpx.Response, rec: RequestRecord, t0: float) -> None:
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        now = time.perf_counter() - t0
        obj = json.loads(data)
        if "error" in obj:
            err = obj["error"] if isinstance(obj["error"], dict) else {"message": obj["error"]}
            rec.error = f"stream:{err.get('type') or err.get('code') or 'error'}"
            return
        for choice in obj.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                if rec.first_token is None:
                    rec.first_token = now
                rec.chunk_times.append(now)
        usage = obj.get("usage")
        if usage:
            rec.prompt_tokens = usage.get("prompt_tokens")
            rec.completion_tokens = usage.get("completion_tokens")
            details = usage.get("prompt_tokens_details") or {}
            rec.cached_tokens = details.get("cached_tokens")
            if details.get("image_tokens") is not None:
                rec.image_tokens = details["image_tokens"]


async def send_one(client: httpx.AsyncClient, url: str, req: PlannedRequest, rec: RequestRecord, t0: float,
                   timeout: float) -> None:
    async def exchange() -> None:
        async with client.stream("POST", url, json=req.body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                rec.error = f"http:{resp.status_code}"
            else:
                await _consume_stream(resp, rec, t0)
                if rec.error is None and rec.completion_tokens is None:
                    rec.error = "stream:no_usage"  # the stream ended without its final usage chunk

    rec.sent = time.perf_counter() - t0
    try:
        await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:
        rec.error = "transport:Timeout"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec.error = f"transport:{type(exc).__name__}"
    rec.end = time.perf_counter() - t0


async def run_open_loop(client: httpx.AsyncClient, url: str, plan: list[tuple[float, PlannedRequest]],
                        timeout: float, on_tick: Callable[[float, list[RequestRecord]], None] | None = None,
                        on_start: Callable[[float], None] | None = None) -> tuple[float, list[RequestRecord]]:
    """Send `plan` ((offset_s, request) sorted by offset) open loop; returns (t0, records).
    t0 is perf_counter at the run's start; records are in plan order. `on_start(t0)` runs
    once before the first send, `on_tick(now, records)` every 0.5 s."""
    records = [RequestRecord(r.index, r.kind, r.cache, r.media, intended=t) for t, r in plan]
    t0 = time.perf_counter() + 0.05
    if on_start:
        on_start(t0)
    tasks = []

    async def ticker() -> None:
        while True:
            if on_tick:
                on_tick(time.perf_counter() - t0, records)
            await asyncio.sleep(0.5)

    tick = asyncio.create_task(ticker())
    try:
        for (offset, req), rec in zip(plan, records):
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send_one(client, url, req, rec, t0, timeout)))
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        tick.cancel()
    return t0, records


async def calibrate_media_tokens(client: httpx.AsyncClient, url: str, pairs: dict[str, tuple[dict, dict]],
                                 timeout: float) -> dict[str, Any]:
    """Prompt tokens the server counts per media kind: usage(with item) - usage(without)."""
    out: dict[str, Any] = {}
    for key, (with_media, without) in pairs.items():
        counts = []
        for body in (with_media, without):
            rec = RequestRecord(-1, "calibration", None, (), 0.0)
            await send_one(client, url, PlannedRequest(-1, "calibration", body, (), None), rec, time.perf_counter(),
                           timeout)
            counts.append(rec.prompt_tokens if rec.ok else None)
        out[key] = None if None in counts else counts[0] - counts[1]
    return out


def assign_image_tokens(records: list[RequestRecord], per_item: dict[str, int | None]) -> None:
    """Image/video tokens of each successful request, where the server's usage did not say."""
    for rec in records:
        if rec.ok and rec.image_tokens is None and rec.media:
            counts = [per_item.get(k) for k in rec.media]
            if all(c is not None for c in counts):
                rec.image_tokens = sum(counts)
