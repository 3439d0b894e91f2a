"""Samples the server's /metrics during a run (optional): the queue and cache gauges, summed
over label sets, at a fixed interval. Any Prometheus text endpoint works; series the server
does not export are simply absent."""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Gauges worth plotting against the client's view (vLLM's names; vlmserve's own where it has one).
GAUGES = (
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vlmserve:estimated_queue_wait_seconds",
    "vlmserve:pending_prefill_tokens",
    "vlmserve:pending_encoder_rows",
)


def parse_gauges(text: str, names: tuple[str, ...] = GAUGES) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in names:
            out[family.name] = sum(s.value for s in family.samples if s.name == family.name)
    return out


class MetricsSampler:
    def __init__(self, client: httpx.AsyncClient, url: str, interval: float) -> None:
        self.client, self.url, self.interval = client, url, interval
        self.samples: list[dict] = []  # {"t": seconds from t0, name: value, ...}
        self.errors = 0
        self._task: asyncio.Task | None = None

    async def _loop(self, t0: float) -> None:
        while True:
            try:
                resp = await self.client.get(self.url, timeout=max(self.interval, 2.0))
                resp.raise_for_status()
                self.samples.append({"t": round(time.perf_counter() - t0, 3), **parse_gauges(resp.text)})
            except (httpx.HTTPError, ValueError):
                self.errors += 1
            await asyncio.sleep(self.interval)

    def start(self, t0: float) -> None:
        self._task = asyncio.create_task(self._loop(t0))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
