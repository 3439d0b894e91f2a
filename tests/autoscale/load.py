"""A small open-loop load generator for the loopback e2e tests: requests start on a schedule
(whatever the server's answers), each streamed, with its status, Retry-After, time to first
token and whether it finished recorded."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx


@dataclass
class Outcome:
    start: float  # seconds since the run began
    phase: str
    status: int = 0
    retry_after: str | None = None
    ttft: float | None = None
    finish_reason: str | None = None
    done: bool = False  # [DONE] seen
    error: str | None = None


def chat_body(max_tokens: int, stream: bool = True, text: str = "Tell me a story about a cat.") -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "stream": stream, "ignore_eos": True, "temperature": 0}


async def _one(client: httpx.AsyncClient, url: str, body: dict, out: Outcome, t0: float) -> None:
    try:
        async with client.stream("POST", url, json=body) as r:
            out.status = r.status_code
            out.retry_after = r.headers.get("retry-after")
            if r.status_code != 200:
                await r.aread()
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    out.done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = chunk["error"]["message"]
                    continue
                for choice in chunk["choices"]:
                    if choice["delta"].get("content") and out.ttft is None:
                        out.ttft = time.monotonic() - t0 - out.start
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
    except httpx.HTTPError as e:
        out.error = repr(e)


async def run_phases(base: str, phases: list[tuple[str, float, float]], body: dict) -> list[Outcome]:
    """`phases`: (name, requests per second, seconds), one after another, open loop."""
    url = base + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    outcomes: list[Outcome] = []
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        t0 = time.monotonic()
        tasks = []
        at = 0.0
        for name, rate, seconds in phases:
            end = at + seconds
            while at < end:
                delay = t0 + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                out = Outcome(start=at, phase=name)
                outcomes.append(out)
                tasks.append(asyncio.create_task(_one(client, url, body, out, t0)))
                at += 1.0 / rate
        await asyncio.gather(*tasks)
    return outcomes


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
