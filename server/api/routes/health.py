"""GET /health: 200 while the engine really serves; 503 while the model loads, when the engine
process is gone, or when its step loop stalled with work pending (the watchdog).

Open without an API key (probes carry none). Readiness (`/ready`) and `/metrics` belong to
other modules."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from vlmserve.api.deps import EngineDep
from vlmserve.api.errors import error_body

router = APIRouter()


@router.get("/health", response_model=None)
async def health(engine: EngineDep) -> JSONResponse:
    if engine.is_healthy():
        return JSONResponse({"status": "ok"})
    if getattr(engine, "phase", None) == "loading":
        body = error_body("the model is still loading", 503, code="model_loading")
    else:
        reason = getattr(engine, "dead_reason", None) or "it failed and cannot serve; restart the server"
        body = error_body(f"the engine is not healthy: {reason}", 503, code="engine_unhealthy")
    return JSONResponse(body, status_code=503)
