"""Run the HTTP server: build the engine, start its loop, serve the app with uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from server.api.app import create_app
from server.config import Config
from server.engine.async_engine import AsyncEngine
from server.engine.builder import build_engine
from server.multimodal.media import MediaLoader

logger = logging.getLogger("vlmserve")


async def run_server(config: Config) -> None:
    parts = build_engine(config.engine)
    name = config.server.served_model_name or parts.default_model_name
    engine = AsyncEngine(parts.core, parts.processor, model_name=name, max_model_len=parts.max_model_len)
    engine.start()
    media = MediaLoader(config.media)
    engine.media_stats = media
    app = create_app(engine, config.server, media)
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.server.host, port=config.server.port, log_level=config.server.log_level)
    )
    logger.info("serving %s on http://%s:%d", name, config.server.host, config.server.port)
    try:
        await server.serve()
    finally:
        await engine.shutdown()
        media.close()
