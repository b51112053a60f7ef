"""The gateway process: listeners, policy, sockets, shutdown.

``Gateway`` is an asyncio object; :func:`serve` runs one until SIGINT or
SIGTERM (uvloop when installed); :class:`tether.gateway.embedded.EmbeddedGateway`
runs one in a thread for development mode and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import cast

from tether.config import Config
from tether.endpoint import Endpoint
from tether.gateway.registry import Registry
from tether.gateway.resolve import GatewayResolver
from tether.gateway.session import ClientSession
from tether.policy import Decider, Decision, Transport

log = logging.getLogger("tether.gateway")

# How often idle sockets are looked for: idle timeouts are minutes (App
# Engine's 10), so a second of slack is invisible and the scan is cheap.
SWEEP_INTERVAL = 1.0


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        resolver: GatewayResolver | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self.resolver = resolver or GatewayResolver.from_config(
            config, decider=lambda: self.decider, clock=clock
        )
        self.registry = Registry(clock or time.monotonic)
        self.sessions: set[ClientSession] = set()
        self.endpoints: list[Endpoint] = []
        self._servers: list[asyncio.Server] = []
        self._sweep_task: asyncio.Task[None] | None = None
        self.decider = Decider(config.policy)
        # The loop start() runs in, kept: asyncio.get_running_loop() costs a
        # getpid() system call on every call in Python 3.11.
        self.loop: asyncio.AbstractEventLoop = cast(asyncio.AbstractEventLoop, None)

    async def start(self) -> list[Endpoint]:
        """Listen on every configured endpoint; returns them with real ports."""
        loop = self.loop = asyncio.get_running_loop()
        for endpoint in self.config.listen:
            if endpoint.is_unix:
                with contextlib.suppress(FileNotFoundError):
                    if _is_socket(endpoint.path):
                        os.unlink(endpoint.path)  # a stale socket from a previous run
                server = await loop.create_unix_server(
                    lambda: ClientSession(self), path=endpoint.path
                )
                bound = endpoint
            else:
                server = await loop.create_server(
                    lambda: ClientSession(self),
                    host=endpoint.host,
                    port=endpoint.port,
                    family=endpoint.family,
                    reuse_address=True,
                )
                host, port = server.sockets[0].getsockname()[:2]
                bound = Endpoint(host=host, port=port)
            self._servers.append(server)
            self.endpoints.append(bound)
        # The gateway's own listening addresses are never a destination.
        self.decider = Decider(
            self.config.policy,
            self_addresses=[(e.host, e.port) for e in self.endpoints if not e.is_unix],
        )
        self._sweep_task = loop.create_task(self._sweeper())
        for bound in self.endpoints:
            log.info("listening on %s", bound)
        return list(self.endpoints)

    def idle_timeout(self, app: str) -> float:
        app_config = self.config.apps.get(app)
        if app_config is not None and app_config.idle_timeout is not None:
            return app_config.idle_timeout
        return self.config.idle_timeout

    def sweep(self) -> int:
        """Reclaim every socket idle past its timeout; returns how many."""
        reclaimed = 0
        for record, idle in self.registry.idle():
            reason = (
                f"reclaimed by the gateway after {idle:.0f} s idle "
                f"(idle_timeout {record.idle_timeout:g} s)"
            )
            log.info("socket %s of app %r %s", record.descriptor[:8], record.app, reason)
            if record.link is not None:
                record.link.abort(reason, reset_app=True)
            else:
                record.finish(reason)
            reclaimed += 1
        return reclaimed

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep()

    def reload(self, config: Config) -> None:
        """Take a new policy, apps and resolver table; open sockets stay open.

        Listeners and the frame limit are fixed at start-up: changing where
        the gateway listens needs a restart, and the log says so.
        """
        if config.listen != self.config.listen:
            log.warning("reload: gateway.listen changed; it takes effect at the next restart")
        self.config = replace(config, listen=self.config.listen, max_frame=self.config.max_frame)
        self.resolver = GatewayResolver.from_config(
            config, decider=lambda: self.decider, clock=self._clock
        )
        self.decider = Decider(
            config.policy,
            self_addresses=[(e.host, e.port) for e in self.endpoints if not e.is_unix],
        )
        log.info(
            "reloaded %s: %d apps, %d sockets kept open",
            config.source or "config",
            len(config.apps),
            len(self.registry),
        )

    async def decide(self, app: str, host: str, port: int, transport: Transport) -> Decision:
        """Normalise, decide what can be decided before a lookup, resolve, decide."""
        target = self.decider.normalize(host)
        if target.needs_lookup:
            early = self.decider.predecide(app, target, port, transport)
            if early is not None:
                decision = early
            else:
                assert target.name is not None
                addresses = await self.resolver.lookup(target.name)
                decision = self.decider.decide_resolved(app, target, port, transport, addresses)
        else:
            # A numeric target is its own candidate: no addresses to pass.
            decision = self.decider.decide_resolved(app, target, port, transport, ())
        return decision

    async def close(self) -> None:
        """Stop accepting, close every stream and socket."""
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        for server in self._servers:
            server.close()
        for record in list(self.registry):
            if record.link is not None:
                record.link.abort("gateway shutting down")
            else:
                record.finish("gateway shutting down")
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        for endpoint in self.endpoints:
            if endpoint.is_unix:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(endpoint.path)
        self._servers.clear()


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.stat(path).st_mode)


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard limit: each socket costs two fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# uvloop hands every read (up to 256 KiB) to the relay as a new bytes object.
# glibc serves allocations above its mmap threshold (128 KiB at start) with
# mmap and returns a freed heap top above its trim threshold to the kernel,
# so a busy relay page-faulted and zeroed every chunk: a Unix-socket
# download ran at ~650 MB/s instead of ~1,300 (bench/README.md). Reads
# fit under 1 MiB; 16 MiB bounds what an idle gateway keeps from a burst.
RELAY_MMAP_THRESHOLD = 1 << 20
RELAY_TRIM_THRESHOLD = 16 << 20


def tune_malloc() -> bool:
    """Keep relay-sized buffers in the heap (glibc; elsewhere a no-op). True if set."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, RELAY_MMAP_THRESHOLD)
        and mallopt(_M_TRIM_THRESHOLD, RELAY_TRIM_THRESHOLD)
    )


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed (a faster relay), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(config: Config, reload: Callable[[], Config] | None = None) -> int:
    """Run a gateway until SIGINT/SIGTERM; returns the exit status.

    On SIGHUP, `reload()` is called for a new config; if it raises (a bad
    file), the error is logged and the old config stays in force.
    """
    raise_fd_limit()
    tune_malloc()
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    gateway = Gateway(config)
    stop = asyncio.Event()

    def _reload() -> None:
        assert reload is not None
        try:
            new = reload()
        except Exception as exc:  # a bad file must never take the gateway down
            log.error("reload failed, keeping the current config: %s", exc)  # noqa: TRY400
            return
        gateway.reload(new)

    async def main() -> None:
        try:
            await gateway.start()
        except OSError as exc:
            log.error("cannot listen: %s", exc)  # noqa: TRY400 - the reason is enough
            raise SystemExit(1) from exc
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if reload is not None:
            loop.add_signal_handler(signal.SIGHUP, _reload)
        await stop.wait()
        log.info("shutting down: %d sockets open", len(gateway.registry))
        await gateway.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return 0


__all__ = ["Gateway", "new_event_loop", "raise_fd_limit", "serve", "socket", "tune_malloc"]
