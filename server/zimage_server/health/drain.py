"""Graceful drain on SIGTERM: stop taking work, finish what was accepted, then exit.

uvicorn's own shutdown closes the listening socket at once, so a request arriving during the
endpoint update would be refused at the TCP level. Here the first SIGTERM (or SIGINT) only
starts the drain: readiness turns 503 and new requests get 503 with ``Retry-After`` while
the socket stays open; when the engine is idle (or the drain time is up) uvicorn shuts down
as usual. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from types import FrameType

import uvicorn
from fastapi import FastAPI

from zimage_server.core.errors import draining_error
from zimage_server.core.metrics import Metrics
from zimage_server.core.state import ServerState
from zimage_server.engine.engine import Engine

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float) -> None:
        super().__init__(config)
        self.fastapi = app
        self.drain_seconds = drain_seconds
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0
        app.state.on_load_failure = self.fail

    def fail(self) -> None:
        """The model cannot be loaded: end the process non-zero (the reason is in the
        termination message), so the kubelet restarts it with backoff and the operator sees why."""
        self.exit_code = 1
        self.should_exit = True

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None:
            super().handle_exit(sig, frame)
            return
        if self._drain_task is not None:
            # A second signal: stop now. Not through uvicorn's shutdown, which would wait for
            # the connections, nor through the interpreter's, which joins the GPU thread and
            # with it the batch it is running.
            logger.warning("signal %d again: exiting now, without the work in hand", sig)
            logging.shutdown()
            os._exit(128 + sig)
        state: ServerState = self.fastapi.state.server_state
        state.draining = True
        metrics: Metrics = self.fastapi.state.metrics
        metrics.draining.set(1)
        logger.info("signal %d: draining (up to %.0fs), then exiting", sig, self.drain_seconds)
        self._drain_task = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        engine: Engine = self.fastapi.state.service.engine
        try:
            await asyncio.wait_for(engine.wait_idle(), self.drain_seconds)
            logger.info("drained: every accepted request is answered")
        except TimeoutError:
            count = engine.abandon(lambda: draining_error("could not finish this request in its drain time"))
            # A batch may still run on a GPU; its images have no one to go to now, and the
            # interpreter's exit would wait for it (cli.py ends the process without it).
            self.fastapi.state.abandoned = count
            logger.warning("drain time is up: %d requests not finished get 503 draining; exiting", count)
        # Let the handlers send the responses of the last batch before the server closes.
        await asyncio.sleep(0.2)
        self.should_exit = True
