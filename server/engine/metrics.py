"""Prometheus metrics of the engine, under vLLM's names where vLLM has one (dashboards carry
over), plus vlmserve's encoder and media metrics.

Request-level series (latencies, token counts, finish reasons) are recorded by the
AsyncEngine on the event loop as outputs arrive; engine-level series (queue sizes, KV usage,
cache hits) are read at scrape time from the scheduler snapshot the engine loop publishes
after each step, so a scrape never touches the scheduler's live structures.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
# vLLM's buckets for the request phase histograms (queue, prefill, decode, inference).
_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                            120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N_BUCKETS = (1, 2, 5, 10, 20)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_MEDIA_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MEDIA_STAGES = ("fetch", "decode", "resize", "render")
MEDIA_FAILURE_REASONS = ("fetch_failed", "too_large", "decode_failed", "render_failed")


def one_two_five_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's buckets for token-count histograms)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


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
        pending = GaugeMetricFamily(
            "vlmserve:pending_prefill_tokens",
            "Prefill work queued or running but not yet computed, in token-equivalents, by the modality that "
            "causes it: LM prompt tokens at its positions plus (image, video) vision encoder rows.",
            labels=["model_name", "modality"])
        for modality in ("text", "image", "video"):
            pending.add_metric([self.model_name, modality], s.get(f"pending_work_{modality}", 0))
        yield pending
        yield gauge("vlmserve:pending_encoder_rows", "Vision encoder rows still to compute for queued requests.",
                    s.get("num_pending_encoder_rows", 0))
        yield counter("vlmserve:encoder_items", "Images and videos run through the vision encoder.",
                      s.get("encoded_items", 0))
        yield counter("vlmserve:engine_steps", "Engine steps (one forward pass each).", s.get("steps", 0))
        yield counter("vlmserve:media_cache_hits", "Decoded media served from the cache.", s.get("media_cache_hits", 0))
        yield counter("vlmserve:media_cache_misses", "Media decoded (cache misses).", s.get("media_cache_misses", 0))


class EngineMetrics:
    def __init__(self, model_name: str, snapshot: Callable[[], dict[str, float]], max_model_len: int = 1 << 17) -> None:
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
        for reason in ("stop", "length", "abort", "tool_calls"):
            self._success.labels(model_name, reason)  # every series exists from the start, at 0
        self._errors = Counter("vlmserve:request_errors", "Requests ended by a failed engine step.", labels,
                               registry=r).labels(model_name)
        r.register(_SnapshotCollector(model_name, snapshot))

        def hist(name: str, doc: str, buckets, extra: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, labels + list(extra), buckets=buckets, registry=r)

        # vLLM's request phase histograms: queue = arrival to first scheduled, prefill = first
        # scheduled to first token, decode = first to last token, inference = prefill + decode.
        self.queue_time = hist("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                               _REQUEST_LATENCY_BUCKETS).labels(model_name)
        self.prefill_time = hist("vllm:request_prefill_time_seconds",
                                 "Histogram of time spent in PREFILL phase for request.",
                                 _REQUEST_LATENCY_BUCKETS).labels(model_name)
        self.decode_time = hist("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
                                _REQUEST_LATENCY_BUCKETS).labels(model_name)
        self.inference_time = hist("vllm:request_inference_time_seconds",
                                   "Histogram of time spent in RUNNING phase for request.",
                                   _REQUEST_LATENCY_BUCKETS).labels(model_name)
        self.iteration_tokens = hist("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                     _ITERATION_TOKEN_BUCKETS).labels(model_name)
        self.params_n = hist("vllm:request_params_n", "Histogram of the n request parameter.", _N_BUCKETS).labels(model_name)
        self.params_max_tokens = hist("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
                                      one_two_five_buckets(max_model_len)).labels(model_name)
        # vlmserve's own.
        self.step_duration = hist("vlmserve:engine_step_duration_seconds",
                                  "Engine step wall time (schedule, forward pass, update).", _STEP_BUCKETS).labels(model_name)
        self.vision_tokens = hist("vlmserve:request_vision_tokens",
                                  "Prompt tokens of image and video placeholders per request.", _TOKEN_BUCKETS).labels(model_name)
        self._media_stage = hist("vlmserve:media_stage_seconds",
                                 "Media latency by stage: fetch (bytes in), decode (bytes to pixels), resize (the "
                                 "family's image processor), render (template, tokenizer and image processing).",
                                 _MEDIA_BUCKETS, ("stage",))
        self._media_failures = Counter("vlmserve:media_failures", "Media items refused, by reason.",
                                       labels + ["reason"], registry=r)
        self._startup = Gauge("vlmserve:startup_phase_seconds", "Duration of each startup phase (frontend: "
                              "tokenizer and processor; engine_load: weights and KV cache; warmup).",
                              labels + ["phase"], registry=r)
        for stage in MEDIA_STAGES:
            self._media_stage.labels(model_name, stage)
        for reason in MEDIA_FAILURE_REASONS:
            self._media_failures.labels(model_name, reason)

    def media_stage(self, stage: str, seconds: float) -> None:
        self._media_stage.labels(self.model_name, stage).observe(seconds)

    def media_failure(self, reason: str) -> None:
        self._media_failures.labels(self.model_name, reason).inc()

    def startup_phase(self, phase: str, seconds: float) -> None:
        self._startup.labels(self.model_name, phase).set(seconds)

    def request_params(self, n: int, max_tokens: int) -> None:
        self.params_n.observe(n)
        self.params_max_tokens.observe(max_tokens)

    def step(self, step_s: float, num_tokens: int) -> None:
        self.step_duration.observe(step_s)
        self.iteration_tokens.observe(num_tokens)

    def request_phases(self, arrival: float, scheduled: float | None, first_token: float | None, last_token: float) -> None:
        """Monotonic timestamps of one finished request (`scheduled` None: never reported)."""
        if scheduled is None or first_token is None:
            return
        scheduled = min(max(scheduled, arrival), first_token)
        self.queue_time.observe(scheduled - arrival)
        self.prefill_time.observe(first_token - scheduled)
        self.decode_time.observe(last_token - first_token)
        self.inference_time.observe(last_token - scheduled)

    def request_finished(self, finish_reason: str, prompt_tokens: int, output_tokens: int, latency_s: float) -> None:
        if finish_reason == "error":
            self._errors.inc()
            return
        self._success.labels(self.model_name, finish_reason).inc()
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(output_tokens)
        self.e2e.observe(latency_s)
