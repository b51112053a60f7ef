"""A gateway in a background thread, for tests and tools that inspect it.

The same :class:`~tether.gateway.server.Gateway`, policy and relay as
``tether serve``; only the process boundary is missing. Do not use it in a
process where :func:`tether.install` is active: the gateway must open real
stdlib sockets (development mode therefore runs a child process; see
tether.devmode).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from tether.config import Config
from tether.endpoint import Endpoint
from tether.gateway.server import Gateway, new_event_loop

T = TypeVar("T")


class EmbeddedGateway:
    def __init__(self, config: Config, *, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.clock = clock  # injectable, so idle reclamation is tested without sleeping
        self.gateway: Gateway | None = None
        self.endpoints: list[Endpoint] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    def start(self, timeout: float = 10.0) -> list[Endpoint]:
        ready: Future[list[Endpoint]] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="tether-gateway", daemon=True
        )
        self._thread.start()
        self.endpoints = ready.result(timeout)
        return self.endpoints

    def _run(self, ready: Future[list[Endpoint]]) -> None:
        loop = self._loop = new_event_loop()
        asyncio.set_event_loop(loop)

        async def main() -> None:
            self._stopped = asyncio.Event()
            self.gateway = Gateway(self.config, clock=self.clock)
            try:
                endpoints = await self.gateway.start()
            except BaseException as exc:
                ready.set_exception(exc)
                return
            ready.set_result(endpoints)
            await self._stopped.wait()
            await self.gateway.close()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run fn() on the gateway's loop and return its result (tests, tools)."""
        assert self._loop is not None

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._stopped is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> EmbeddedGateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
