"""Running an app under uvicorn with a graceful drain on SIGTERM.

uvicorn, on SIGTERM, stops listening at once and then waits for connections, so a balancer's
probe sees a refused connection and a new caller no answer at all. Here the first SIGTERM
instead starts a drain on every mounted ``VoiceService``: ``/readyz`` answers 503 and new calls
get the draining answer while the server keeps listening; calls in progress go on for up to
``drain_timeout_s``, then hear the persona's goodbye. Only then does uvicorn shut down (its
lifespan closes the turn store, which flushes its queue or spools it) and the process exits 0.
A second SIGTERM, or SIGINT, is uvicorn's usual immediate shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import uvicorn

from voicebot.server.service import services_of

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5
"""After the drain, how long uvicorn waits for connections (SSE, keep-alive) to close."""
CALL_THREADS_WAIT_S = 30.0
"""After shutdown, how long the calls' own threads (a transcription, a reply still being
synthesized) may take to finish: exiting while one runs inside a native library aborts."""


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose first SIGTERM drains the app's calls before shutting down."""

    def __init__(self, config: uvicorn.Config, *, app: Any, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self._started_threads: set[int] = set()

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        # Threads alive once the app is up (models, pools) are not the calls' threads.
        self._started_threads = {t.ident for t in threading.enumerate() if t.ident is not None}

    def wait_for_call_threads(self, timeout_s: float) -> None:
        """Wait for threads started after start-up (the calls') to finish, up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        current = threading.current_thread()
        while True:
            left = [
                t
                for t in threading.enumerate()
                if t.ident not in self._started_threads and t is not current and t.is_alive()
            ]
            if not left or time.monotonic() >= deadline:
                break
            left[0].join(max(0.0, min(1.0, deadline - time.monotonic())))
        if left:
            logger.warning("exiting with %d call threads still running", len(left))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain is None and self._loop is not None:
            if not self.should_exit and services_of(self._app):
                # A signal handler: only schedule; the drain runs on the event loop.
                self._loop.call_soon_threadsafe(self._start_drain)
                return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self._drain is None:
            logger.info("SIGTERM: draining (up to %.0f s)", self._drain_timeout_s)
            self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            results = await asyncio.gather(
                *(service.drain(self._drain_timeout_s) for service in services_of(self._app)),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    logger.error("drain failed", exc_info=result)
        finally:
            self.should_exit = True


def run(app: Any, *, host: str, port: int, drain_timeout_s: float) -> None:
    """Serve ``app`` until SIGTERM (drained) or SIGINT."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = DrainingServer(config, app=app, drain_timeout_s=drain_timeout_s)
    server.run()
    server.wait_for_call_threads(CALL_THREADS_WAIT_S)


__all__ = ["DrainingServer", "run"]
