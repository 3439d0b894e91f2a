"""Request dependencies as `Annotated` aliases over what `create_app` puts on `app.state`.

Authentication is not among them: it runs as `ApiKeyMiddleware`, before the body is
read (see `server/api/middleware.py`).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.api.logprobs import TokenRenderer
from server.config import ServerConfig
from server.engine.client import EngineClient
from server.multimodal.media import MediaLoader


def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


def get_config(request: Request) -> ServerConfig:
    return request.app.state.config


def get_media(request: Request) -> MediaLoader:
    return request.app.state.media


def get_token_renderer(request: Request) -> TokenRenderer:
    return request.app.state.token_renderer


EngineDep = Annotated[EngineClient, Depends(get_engine)]
ConfigDep = Annotated[ServerConfig, Depends(get_config)]
MediaDep = Annotated[MediaLoader, Depends(get_media)]
TokenRendererDep = Annotated[TokenRenderer, Depends(get_token_renderer)]
