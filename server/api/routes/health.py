"""GET /health: 200 while the engine really serves; 503 while the model loads and warms up, when the engine
process is gone, or when its step loop stalled with work pending (the watchdog).

Open without an API key (probes carry none). Readiness (`/ready`) and `/metrics` belong to
other modules."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from vlmserve.api.deps import EngineDep
from vlmserve.api.errors import error_body
from vlmserve.api.load_gate import STARTING_PHASES

router = APIRouter()


@router.get("/health", response_model=None)
async def health(engine: EngineDep) -> JSONResponse:
    phase = getattr(engine, "phase", None)
    if engine.is_healthy() and phase not in STARTING_PHASES:
        return JSONResponse({"status": "ok"})
    if phase in STARTING_PHASES:
        body = error_body(f"the server is starting ({phase.replace('_', ' ')})", 503, code="model_loading")
    else:
        reason = getattr(engine, "dead_reason", None) or "it failed and cannot serve; restart the server"
        body = error_body(f"the engine is not healthy: {reason}", 503, code="engine_unhealthy")
    return JSONResponse(body, status_code=503)
