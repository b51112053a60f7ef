"""The gateway process: listeners, signals, shutdown.

``Gateway`` is the :class:`~tether.gateway.core.gateway.GatewayCore` with
its listeners, one Tether front-end session per accepted stream; :func:`serve`
runs one until SIGINT or SIGTERM (uvloop when installed);
:class:`tether.gateway.embedded.EmbeddedGateway` runs one in a thread for
development mode and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from tether.config import Config, check_listen
from tether.endpoint import Endpoint
from tether.errors import ConfigError
from tether.gateway.core.drain import drain, live
from tether.gateway.core.gateway import SHUTTING_DOWN, SWEEP_INTERVAL, GatewayCore
from tether.gateway.frontends import socks5
from tether.gateway.frontends.http_proxy import HttpProxySession, proxy_url
from tether.gateway.frontends.tether import TetherSession
from tether.gateway.resolve import GatewayResolver

if TYPE_CHECKING:
    from tether.gateway.admin import AdminServer
    from tether.gateway.supervisor import WorkerSpec

log = logging.getLogger("tether.gateway")

# After SIGTERM, how long the gateway answers apps asking why their sockets
# were reset: an app blocked in recv() asks within milliseconds; 2 s bounds
# the exit. SHUTDOWN_QUIET: no stream came or went for this long, nobody is
# asking.
SHUTDOWN_GRACE = 2.0
SHUTDOWN_QUIET = 0.3
# Out of descriptors at accept(): asyncio logs each retry (once a second,
# with a traceback); one line per this many seconds is enough to see it.
EMFILE_LOG_WINDOW = 10.0


class Gateway(GatewayCore):
    """The core and its listeners: one TetherSession per accepted stream."""

    def __init__(
        self,
        config: Config,
        *,
        resolver: GatewayResolver | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(config, resolver=resolver, clock=clock)
        self.endpoints: list[Endpoint] = []
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []  # removed at close
        self.out_of_fds = _ResourceLog()
        # One of `tether serve --workers N` (gateway/supervisor.py): TCP
        # listeners share their port (SO_REUSEPORT), Unix ones are the
        # supervisor's, inherited by path (it removes them at its exit).
        self.worker: WorkerSpec | None = None
        self.reuse_port = False
        self.inherited: dict[str, socket.socket] = {}
        self.admin: AdminServer | None = None  # [gateway] admin_listen

    def sweep(self) -> int:
        """Reclaim idle sockets; and look whether a descriptor is free (see _ResourceLog)."""
        try:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.out_of_fds.report(self.loop, exc)
        else:
            os.close(fd)
        return super().sweep()

    async def start(self) -> list[Endpoint]:
        """Listen on every configured endpoint; returns them with real ports.

        Raises ConfigError, before binding anything, for a TCP listener off
        loopback that the config does not accept keys in clear on.
        """
        check_listen(self.config)
        self.loop = asyncio.get_running_loop()
        listeners: list[tuple[Endpoint, str | None]] = [(e, None) for e in self.config.listen]
        listeners += self.config.app_listeners  # each app's own Unix sockets
        for endpoint, app in listeners:
            self.endpoints.append(await self._listen(
                endpoint, functools.partial(TetherSession, self, unix=endpoint.is_unix, app=app)
            ))
        # The standard proxy front-ends (docs/proxies.md); their addresses are
        # the gateway's own too, never a destination.
        proxies = [
            await self._listen(e, functools.partial(HttpProxySession, self, unix=e.is_unix))
            for e in self.config.http_proxy_listen
        ]
        self.http_proxy = proxy_url(proxies)
        socks = [
            await self._listen(e, functools.partial(socks5.Socks5Session, self, unix=e.is_unix))
            for e in self.config.socks5_listen
        ]
        self.socks5_proxy = socks5.proxy_url(socks)
        proxies += socks
        if self.config.cluster is not None:
            # Imported only in a cluster: it needs redis-py (the `cluster` extra).
            from tether.cluster.node import start_node

            await start_node(self, functools.partial(TetherSession, self, linked=True))
        elif self.worker is not None and self.worker.count > 1:
            # Workers of one host with no Redis: they answer for each other.
            from tether.gateway.workerlink import start_worker_links

            await start_worker_links(self, self.worker)
        admin: list[Endpoint] = []  # up before "listening on": a supervisor may scrape then
        if self.config.admin_listen is not None:
            # Imported only when on: h11 and prometheus_client cost ~80 ms.
            from tether.gateway.admin import AdminServer

            self.admin = AdminServer(self, self.config.admin_listen)
            admin.append(await self.admin.start())
        self.begin(
            (e.host, e.port) for e in [*self.endpoints, *proxies, *admin] if not e.is_unix
        )
        apps = dict(self.config.app_listeners)
        for bound in self.endpoints:
            if bound in apps:
                log.info("listening on %s (app %r only)", bound, apps[bound])
            else:
                log.info("listening on %s", bound)
        for bound in proxies:
            kind = "SOCKS5" if bound in socks else "HTTP proxy"
            log.info("%s front-end at %s", kind, bound)
        return list(self.endpoints)

    async def _listen(
        self, endpoint: Endpoint, factory: Callable[[], asyncio.Protocol]
    ) -> Endpoint:
        """Listen on `endpoint` (a stale Unix socket replaced); the bound endpoint, real port."""
        loop = self.loop
        inherited = self.inherited.pop(endpoint.path, None) if endpoint.is_unix else None
        if inherited is not None:
            server = await loop.create_unix_server(factory, sock=inherited)
            bound = endpoint
        elif endpoint.is_unix:
            with contextlib.suppress(FileNotFoundError):
                if _is_socket(endpoint.path):
                    os.unlink(endpoint.path)  # a stale socket from a previous run
            server = await loop.create_unix_server(factory, path=endpoint.path)
            bound = endpoint
        else:
            server = await loop.create_server(
                factory,
                host=endpoint.host,
                port=endpoint.port,
                family=endpoint.family,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
            host, port = server.sockets[0].getsockname()[:2]
            bound = Endpoint(host=host, port=port)
        self._servers.append(server)
        if endpoint.is_unix and inherited is None:
            self._unix_paths.append(endpoint.path)
        return bound

    async def close(self, grace: float = SHUTDOWN_GRACE, reason: str = SHUTTING_DOWN) -> None:
        """Reset every socket (tombstone `reason`) and end every stream saying why, then
        stop listening.

        If sockets were reset, their apps' next calls ask the gateway why
        (a CloseReason on a new stream), so it keeps answering for up to
        `grace` seconds, until no stream has come or gone for SHUTDOWN_QUIET.
        New connects in that time are refused: the gateway is shutting down.
        """
        if self.begin_shutdown(reason) and grace > 0:
            deadline = self.loop.time() + grace
            seen, quiet_since = set(self.streams), self.loop.time()
            while self.loop.time() < deadline:
                await asyncio.sleep(0.05)
                if set(self.streams) != seen:
                    seen, quiet_since = set(self.streams), self.loop.time()
                elif self.loop.time() - quiet_since >= SHUTDOWN_QUIET:
                    break
        for server in self._servers:
            server.close()
        self.abort_all(SHUTTING_DOWN)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        for path in self._unix_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._servers.clear()
        if self.cluster is not None:
            await self.cluster.stop()  # leaves the cluster: its heartbeat key is removed
        if self.ledger is not None:
            await self.ledger.close()  # the final flush: SIGTERM loses no counts
        if self.admin is not None:
            await self.admin.close()  # last: /readyz answers 503 until the end


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.stat(path).st_mode)


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard limit (each socket costs two fds); logged."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = soft
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            raised = hard
    log.info("open files: soft limit %d (was %d), hard limit %d", raised, soft, hard)
    return raised


class _ResourceLog:
    """The loop's exception handler: "accept() out of system resource" once per window.

    asyncio's loop stops accepting for a second when accept() fails with
    EMFILE/ENFILE and then tries again (connections wait in the backlog), and
    reports every attempt; uvloop (libuv) accepts and closes the waiting
    connections instead, silently, so the sweep (once a second) also looks
    whether a descriptor is free. Either way the gateway lives on and
    serves again once descriptors are freed; this keeps the log to one line
    per window saying so.
    """

    def __init__(self) -> None:
        self.last = -EMFILE_LOG_WINDOW
        self.suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            self.report(loop, exc)
            return
        loop.default_exception_handler(context)

    def report(self, loop: asyncio.AbstractEventLoop, exc: OSError) -> None:
        now = loop.time()
        if now - self.last < EMFILE_LOG_WINDOW:
            self.suppressed += 1
            return
        log.error(
            "out of file descriptors (%s): new app connections are refused or wait until "
            "some are freed (%d more such errors in the last %g s)",
            exc.strerror, self.suppressed, EMFILE_LOG_WINDOW,
        )
        self.last, self.suppressed = now, 0


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


def serve(
    config: Config,
    reload: Callable[[], Config] | None = None,
    worker: WorkerSpec | None = None,
) -> int:
    """Run a gateway until SIGINT/SIGTERM; returns the exit status.

    On SIGHUP, `reload()` is called for a new config; if it raises (a bad
    file), the error is logged and the old config stays in force. Without
    `reload` (no --config) SIGHUP is logged and changes nothing. SIGTERM
    drains first (core/drain.py: new work refused, live sockets finish for
    up to gateway.drain_timeout); SIGINT, or a second signal, does not.
    Then every socket is reset and every stream ended with the reason
    (Gateway.close), and the status is 0. `worker`: one of `tether serve
    --workers N` (gateway/supervisor.py).
    """
    raise_fd_limit()
    tune_malloc()
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    gateway = Gateway(config)
    if worker is not None:
        worker.attach(gateway)
    loop.set_exception_handler(gateway.out_of_fds)
    gateway.log_caps()
    stop = asyncio.Event()
    interrupt = asyncio.Event()  # a second signal, or SIGINT: no (more) draining

    def _stop(sig: signal.Signals) -> None:
        if stop.is_set() or sig == signal.SIGINT:
            interrupt.set()
        stop.set()

    def _reload() -> None:
        if reload is None:
            log.warning(
                "SIGHUP: nothing to reload: the gateway was started without --config "
                "(built-in defaults); it keeps running as it is"
            )
            return
        try:
            new = reload()
        except Exception as exc:  # a bad file must never take the gateway down
            log.error("reload failed, keeping the current config: %s", exc)  # noqa: TRY400
            return
        gateway.reload(new)

    async def main() -> None:
        # Before "listening on" is logged: a supervisor may signal as soon as
        # it reads that line. SIGHUP is always handled: its default action
        # would end the gateway.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _stop, sig)
        loop.add_signal_handler(signal.SIGHUP, _reload)
        try:
            await gateway.start()
        except OSError as exc:
            log.error("cannot listen: %s", exc)  # noqa: TRY400 - the reason is enough
            raise SystemExit(1) from exc
        except ConfigError as exc:
            log.error("refusing to listen: %s", exc)  # noqa: TRY400 - the reason is enough
            raise SystemExit(2) from exc
        if worker is not None:
            worker.started(gateway)
        await stop.wait()
        log.info("shutting down: %d sockets open", len(gateway.registry))
        reason = None
        if live(gateway) and gateway.config.drain_timeout > 0 and not interrupt.is_set():
            reason = await drain(gateway, gateway.config.drain_timeout, interrupt)
        await gateway.close(reason=reason or SHUTTING_DOWN)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return 0


__all__ = [
    "SHUTDOWN_GRACE",
    "SWEEP_INTERVAL",
    "Gateway",
    "new_event_loop",
    "raise_fd_limit",
    "serve",
    "socket",
    "tune_malloc",
]
