"""The gate every generation request passes first, before its body's media is fetched: 503 when
the engine cannot serve (still loading, or dead), 429 with Retry-After when admission control
(`vlmserve.autoscale.admission`) sheds load. Then the request parameters vLLM histograms.

A streamed request is refused here too, so its client gets the status line it can act on
(503 / 429) instead of a 200 followed by an error event.
"""

from __future__ import annotations

from fastapi import Request

from vlmserve.api.errors import APIError
from vlmserve.autoscale.monitor import LoadMonitor
from vlmserve.engine.sampling_params import SamplingParams

LOADING_RETRY_AFTER_S = 5
# Not serving yet: requests get 503 + Retry-After, /health and /ready 503.
STARTING_PHASES = ("loading", "warming_up")


def check_admission(request: Request) -> None:
    engine = request.app.state.engine
    monitor: LoadMonitor = request.app.state.load_monitor
    phase = getattr(engine, "phase", None)
    if not engine.is_healthy() or phase in STARTING_PHASES:
        monitor.count_rejection("not_ready")
        if phase in STARTING_PHASES:
            raise APIError("the model is still loading; retry in a few seconds (GET /ready answers 200 once it "
                           "serves)", 503, code="model_loading", type="server_error",
                           headers={"Retry-After": str(LOADING_RETRY_AFTER_S)})
        reason = getattr(engine, "dead_reason", None) or "it failed and cannot serve"
        raise APIError(f"the engine is not healthy: {reason}. Retry on another replica",
                       503, code="engine_unhealthy", type="server_error")
    rejection = monitor.admit()
    if rejection is not None:
        raise APIError(rejection.message, rejection.status_code, code=f"overloaded_{rejection.reason}",
                       type="server_overloaded", headers={"Retry-After": str(rejection.retry_after_s)})


def record_request_params(request: Request, params: SamplingParams) -> None:
    """vllm:request_params_n / _max_tokens, once per API request (the engine sees n=1 children)."""
    metrics = getattr(request.app.state.engine, "metrics", None)
    if metrics is not None and hasattr(metrics, "request_params"):
        metrics.request_params(params.n, params.max_tokens)
