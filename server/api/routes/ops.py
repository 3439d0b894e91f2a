"""Operations endpoints, open without an API key: GET /ready (readiness: 503 while the
engine is down or draining), GET /metrics (Prometheus), GET /v1/load (the autoscaling
signals as JSON)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vlmserve.api.deps import EngineDep, IntakeDep

router = APIRouter()


@router.get("/ready", response_model=None)
async def ready(engine: EngineDep) -> JSONResponse:
    is_ready = getattr(engine, "is_ready", engine.is_healthy)()
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/metrics", response_model=None)
async def metrics(engine: EngineDep, intake: IntakeDep) -> Response:
    registry = getattr(getattr(engine, "metrics", None), "registry", None)
    body = generate_latest(registry) if registry is not None else b""
    # The API process's own gauges (in-flight count, media memory): their names are distinct.
    body += generate_latest(intake.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/load", response_model=None)
async def load(engine: EngineDep, intake: IntakeDep) -> JSONResponse:
    snapshot = getattr(engine, "snapshot", None)
    return JSONResponse({**(snapshot() if snapshot is not None else {}), **intake.snapshot()})
