"""Run the HTTP server: build the engine (its core in a child process or on a thread, per
`engine_mode`), wait until the core serves, then serve the app with uvicorn.

The core is stopped on every way out of `run_server`: uvicorn's SIGTERM/SIGINT shutdown (after
`--drain-seconds` of serving with /ready at 503, when set), an error, or a failed start. If
this process is killed outright, the engine-core process sees its pipe close and exits by
itself.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from vlmserve.api.app import create_app
from vlmserve.config import Config
from vlmserve.engine.async_engine import AsyncEngine
from vlmserve.engine.core_client import build_core_client
from vlmserve.engine.core_client import ProcessCoreClient
from vlmserve.multimodal.media import MediaLoader

logger = logging.getLogger("vlmserve")


def _ignore_signal(signum: int, frame: object) -> None:
    logger.info("stopping (%s)", signal.Signals(signum).name)


class _DrainingServer(uvicorn.Server):
    """uvicorn, with a drain window before its shutdown: the first SIGTERM/SIGINT marks the
    engine draining (/ready answers 503, requests are still served) and starts uvicorn's
    graceful shutdown `drain_seconds` later; a second signal stops at once."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_seconds: float) -> None:
        super().__init__(config)
        self._engine = engine
        self._drain_seconds = drain_seconds
        self._drain_loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._drain_loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain_seconds <= 0 or self._engine.draining or self._drain_loop is None:
            super().handle_exit(sig, frame)
            return
        self._engine.start_draining()
        logger.info("draining for %.1f s (/ready answers 503), then stopping (%s)",
                    self._drain_seconds, signal.Signals(sig).name)
        # A signal handler may only hand work to the loop: call_soon_threadsafe is the one
        # loop method safe from it (it writes the loop's self-pipe).
        self._drain_loop.call_soon_threadsafe(
            self._drain_loop.call_later, self._drain_seconds, super().handle_exit, sig, None
        )


async def run_server(config: Config) -> None:
    core, frontend = await asyncio.to_thread(build_core_client, config.engine)
    name = config.server.served_model_name or frontend.default_model_name
    engine = AsyncEngine(core, frontend.processor, model_name=name)
    media = MediaLoader(config.media)
    engine.media_stats = media
    try:
        await engine.start()
        app = create_app(engine, config.server, media)
        server = _DrainingServer(
            uvicorn.Config(app, host=config.server.host, port=config.server.port, log_level=config.server.log_level),
            engine,
            config.server.drain_seconds,
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
