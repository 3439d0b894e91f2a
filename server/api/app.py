"""`create_app`: the FastAPI app over an engine.

Middleware order (outermost first): API key, body size limit, then FastAPI. Both act
before the body is parsed. Engine, config, media loader, the token renderer, the autoscaling
`LoadMonitor` and the `Intake` (in-flight count and media memory budget, `server/api/intake.py`)
live on `app.state` and reach the routes through the `Annotated` aliases of `server/api/deps.py`.
"""

from __future__ import annotations

import time

from fastapi import FastAPI

from vlmserve.api.errors import install_exception_handlers
from vlmserve.api.intake import Intake
from vlmserve.api.logprobs import TokenRenderer
from vlmserve.api.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware
from vlmserve.api.routes import chat, completions, health, models, ops
from vlmserve.autoscale.admission import AdmissionPolicy
from vlmserve.autoscale.monitor import LoadMonitor
from vlmserve.config import ServerConfig
from vlmserve.engine.client import EngineClient
from vlmserve.multimodal.budget import MediaBudget
from vlmserve.multimodal.media import MediaConfig, MediaLoader


def create_app(engine: EngineClient, config: ServerConfig, media: MediaLoader | None = None) -> FastAPI:
    """`media` None: a `MediaLoader` with its default limits."""
    app = FastAPI(title="vlmserve", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.config = config
    app.state.media = media if media is not None else MediaLoader()
    app.state.token_renderer = TokenRenderer(getattr(engine, "tokenizer", None))
    media_config = getattr(app.state.media, "config", None) or MediaConfig()
    app.state.intake = Intake(
        config.max_pending_requests, MediaBudget(*config.media_memory_budget()),
        {"image": media_config.max_media_bytes, "video": media_config.max_video_bytes},
        separate_core_process=bool(getattr(engine, "core_in_other_process", False)), model_name=engine.model_name,
    )
    app.state.started_at = int(time.time())
    app.state.load_monitor = LoadMonitor(
        engine, model_name=engine.model_name, target_queue_wait_s=config.target_queue_wait_s,
        policy=AdmissionPolicy(config.max_queue_wait_s, config.max_waiting_requests), webhooks=config.scale_webhook,
        webhook_cooldown_s=config.scale_webhook_cooldown_s, webhook_sustain_s=config.scale_webhook_sustain_s,
    )

    for module in (chat, completions, models, health, ops):
        app.include_router(module.router)
    install_exception_handlers(app)

    # add_middleware prepends: the last added is the outermost.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    return app
