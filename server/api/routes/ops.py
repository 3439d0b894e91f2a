"""Operations endpoints, open without an API key: GET /ready (readiness: 503 while the model
loads and warms up, while draining, and once the engine is dead), GET /metrics (Prometheus:
the engine's series and the load monitor's), GET /v1/load (the autoscaling signals as JSON)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vlmserve.api.deps import EngineDep, IntakeDep

router = APIRouter()


@router.get("/ready", response_model=None)
async def ready(engine: EngineDep) -> JSONResponse:
    is_ready = getattr(engine, "is_ready", engine.is_healthy)()
    body = {"ready": is_ready, "phase": getattr(engine, "phase", "serving" if is_ready else "dead")}
    return JSONResponse(body, status_code=200 if is_ready else 503)


@router.get("/metrics", response_model=None)
async def metrics(engine: EngineDep, intake: IntakeDep, request: Request) -> Response:
    registry = getattr(getattr(engine, "metrics", None), "registry", None)
    body = generate_latest(registry) if registry is not None else b""
    body += generate_latest(request.app.state.load_monitor.registry)
    # The API process's own gauges (in-flight count, media memory): their names are distinct.
    body += generate_latest(intake.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/load", response_model=None)
async def load(request: Request, intake: IntakeDep) -> JSONResponse:
    return JSONResponse({**request.app.state.load_monitor.load_report(), **intake.snapshot()})
