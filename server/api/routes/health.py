"""GET /health: 200 while the engine really serves, 503 after an engine fault.

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
    body = error_body("the engine is not healthy (it failed and cannot serve); restart the server", 503,
                      code="engine_unhealthy")
    return JSONResponse(body, status_code=503)
