"""Request dependencies as `Annotated` aliases over what `create_app` puts on `app.state`.

Authentication is not among them: it runs as `ApiKeyMiddleware`, before the body is
read (see `server/api/middleware.py`).

They are `async def` on purpose: FastAPI runs a plain `def` dependency in its thread pool,
a thread hop and two event-loop turns per dependency per request for an attribute read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from vlmserve.api.intake import Intake
from vlmserve.api.logprobs import TokenRenderer
from vlmserve.config import ServerConfig
from vlmserve.engine.client import EngineClient
from vlmserve.multimodal.media import MediaLoader


async def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


async def get_config(request: Request) -> ServerConfig:
    return request.app.state.config


async def get_media(request: Request) -> MediaLoader:
    return request.app.state.media


async def get_intake(request: Request) -> Intake:
    return request.app.state.intake


async def get_token_renderer(request: Request) -> TokenRenderer:
    return request.app.state.token_renderer


EngineDep = Annotated[EngineClient, Depends(get_engine)]
ConfigDep = Annotated[ServerConfig, Depends(get_config)]
MediaDep = Annotated[MediaLoader, Depends(get_media)]
TokenRendererDep = Annotated[TokenRenderer, Depends(get_token_renderer)]
IntakeDep = Annotated[Intake, Depends(get_intake)]
