"""GET /v1/models: the one served model."""

from __future__ import annotations

from fastapi import APIRouter, Request

from vlmserve.api.deps import EngineDep
from vlmserve.api.protocol import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models")
async def list_models(engine: EngineDep, request: Request) -> ModelList:
    card = ModelCard(id=engine.model_name, created=request.app.state.started_at, max_model_len=engine.max_model_len)
    return ModelList(data=[card])
