"""Run the HTTP server: build the engine (its core in a child process or on a thread, per
`engine_mode`), wait until the core serves, then serve the app with uvicorn.

The core is stopped on every way out of `run_server`: uvicorn's SIGTERM/SIGINT shutdown, an
error, or a failed start. If this process is killed outright, the engine-core process sees
its pipe close and exits by itself.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from server.api.app import create_app
from server.config import Config
from server.engine.async_engine import AsyncEngine
from server.engine.builder import build_core_client
from server.engine.core_client import ProcessCoreClient
from server.multimodal.media import MediaLoader

logger = logging.getLogger("vlmserve")


def _ignore_signal(signum: int, frame: object) -> None:
    logger.info("stopping (%s)", signal.Signals(signum).name)


async def run_server(config: Config) -> None:
    core, frontend = await asyncio.to_thread(build_core_client, config.engine)
    name = config.server.served_model_name or frontend.default_model_name
    engine = AsyncEngine(core, frontend.processor, model_name=name)
    media = MediaLoader(config.media)
    engine.media_stats = media
    try:
        await engine.start()
        app = create_app(engine, config.server, media)
        server = uvicorn.Server(
            uvicorn.Config(app, host=config.server.host, port=config.server.port, log_level=config.server.log_level)
        )
        where = f"process, pid {core.pid}" if isinstance(core, ProcessCoreClient) else "thread"
        logger.info("serving %s on http://%s:%d (engine core: %s)", name, config.server.host, config.server.port, where)
        # uvicorn stops on SIGTERM/SIGINT and then re-raises that signal once serve() returns,
        # which under the default handlers would end this process before the `finally` stops
        # the engine core in order. Handlers that ignore the re-raise let it run.
        previous = {sig: signal.signal(sig, _ignore_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            await server.serve()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        await engine.shutdown()
        media.close()
