"""Run the HTTP server: build the engine (its core in a child process or on a thread, per
`engine_mode`), wait until the core serves, then serve the app with uvicorn.

The listener opens before the engine has loaded (see `run_server`). The core is stopped on
every way out of `run_server`: uvicorn's SIGTERM/SIGINT shutdown (after
`--drain-seconds` of serving with /ready at 503, when set), an error, or a failed start. If
this process is killed outright, the engine-core process sees its pipe close and exits by
itself.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

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
    """The listener opens as soon as the tokenizer and processor are built: while the engine
    loads its weights and warms up, /health and /ready answer 503 and requests get a 503 with
    Retry-After, so probes and load balancers see the truth instead of refused connections."""
    t0 = time.monotonic()
    core, frontend = await asyncio.to_thread(build_core_client, config.engine)
    name = config.server.served_model_name or frontend.default_model_name
    engine = AsyncEngine(core, frontend.processor, model_name=name, watchdog_s=config.server.engine_watchdog_s)
    engine.metrics.startup_phase("frontend", time.monotonic() - t0)
    media = MediaLoader(config.media)
    engine.media_stats = media
    media.observer = engine.metrics
    app = create_app(engine, config.server, media)
    monitor = app.state.load_monitor
    server = _DrainingServer(
        uvicorn.Config(app, host=config.server.host, port=config.server.port, log_level=config.server.log_level),
        engine,
        config.server.drain_seconds,
    )
    # uvicorn stops on SIGTERM/SIGINT and then re-raises that signal once serve() returns,
    # which under the default handlers would end this process before the `finally` stops
    # the engine core in order. Handlers that ignore the re-raise let it run.
    previous = {sig: signal.signal(sig, _ignore_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    serving = asyncio.create_task(server.serve(), name="uvicorn")
    ticker = asyncio.create_task(monitor.run(), name="load-monitor")
    try:
        starting = asyncio.create_task(_start_engine(engine, core, name, config))
        await asyncio.wait({serving, starting}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and starting.exception() is not None:
            server.should_exit = True  # the engine cannot serve: stop listening, report its error
            await asyncio.gather(serving, return_exceptions=True)
            starting.result()
        await serving  # until SIGTERM/SIGINT (or a listener failure, re-raised here)
        if not starting.done():  # stopped while still loading: the core is shut down below
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ticker.cancel()
        monitor.close()
        await engine.shutdown()
        media.close()


async def _start_engine(engine: AsyncEngine, core: object, name: str, config: Config) -> None:
    await engine.start()
    where = f"process, pid {core.pid}" if isinstance(core, ProcessCoreClient) else "thread"
    logger.info("engine core serving %s (engine core: %s); warming up", name, where)
    await engine.warm_up()
    logger.info("serving %s on http://%s:%d (ready)", name, config.server.host, config.server.port)
