"""Prometheus metrics of the engine, under vLLM's names where vLLM has one (dashboards carry
over), plus vlmserve's encoder and media metrics.

Request-level series (latencies, token counts, finish reasons) are recorded by the
AsyncEngine on the event loop as outputs arrive; engine-level series (queue sizes, KV usage,
cache hits) are read at scrape time from the scheduler snapshot the engine loop publishes
after each step, so a scrape never touches the scheduler's live structures.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class _SnapshotCollector:
    """Scheduler/runner/media state as gauges and counters, read at scrape time."""

    def __init__(self, model_name: str, snapshot: Callable[[], dict[str, float]]) -> None:
        self.model_name = model_name
        self.snapshot = snapshot

    def collect(self):
        s = self.snapshot()
        labels = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", s.get("num_running", 0))
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.get("num_waiting", 0))
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", s.get("kv_cache_usage", 0.0))
        yield counter("vllm:num_preemptions", "Preemptions (by recompute).", s.get("num_preemptions", 0))
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", s.get("prefix_cache_queries", 0))
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", s.get("prefix_cache_hits", 0))
        yield counter("vllm:mm_cache_queries", "Encoder cache queries, in items.", s.get("encoder_cache_queries", 0))
        yield counter("vllm:mm_cache_hits", "Encoder cache hits, in items.", s.get("encoder_cache_hits", 0))
        yield gauge("vlmserve:pending_prefill_tokens", "Prompt tokens admitted or queued but not yet computed.",
                    s.get("num_pending_prefill_tokens", 0))
        yield gauge("vlmserve:pending_encoder_rows", "Vision encoder rows still to compute for queued requests.",
                    s.get("num_pending_encoder_rows", 0))
        yield counter("vlmserve:encoder_items", "Images and videos run through the vision encoder.",
                      s.get("encoded_items", 0))
        yield counter("vlmserve:engine_steps", "Engine steps (one forward pass each).", s.get("steps", 0))
        yield counter("vlmserve:media_cache_hits", "Decoded media served from the cache.", s.get("media_cache_hits", 0))
        yield counter("vlmserve:media_cache_misses", "Media decoded (cache misses).", s.get("media_cache_misses", 0))


class EngineMetrics:
    def __init__(self, model_name: str, snapshot: Callable[[], dict[str, float]]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             labels, buckets=_ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels,
                                         registry=r).labels(model_name)
        self.request_prompt_tokens = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", labels,
                                               buckets=_TOKEN_BUCKETS, registry=r).labels(model_name)
        self.request_generation_tokens = Histogram("vllm:request_generation_tokens", "Tokens generated per request.",
                                                   labels, buckets=_TOKEN_BUCKETS, registry=r).labels(model_name)
        self._success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self._errors = Counter("vlmserve:request_errors", "Requests ended by a failed engine step.", labels,
                               registry=r).labels(model_name)
        r.register(_SnapshotCollector(model_name, snapshot))

    def request_finished(self, finish_reason: str, prompt_tokens: int, output_tokens: int, latency_s: float) -> None:
        if finish_reason == "error":
            self._errors.inc()
            return
        self._success.labels(self.model_name, finish_reason).inc()
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(output_tokens)
        self.e2e.observe(latency_s)
