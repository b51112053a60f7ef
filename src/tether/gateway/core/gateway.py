"""The gateway's core: what every front-end shares, with no wire protocol in it.

A front-end (``frontends/tether.py`` for the Tether protocol) reads its own
protocol and calls the core to authenticate an app, admit a destination,
dial it, hand a socket off, and inspect the sockets; the relay
(``gateway/relay.py``) and the UDP association (``gateway/udp.py``) carry
the data and meter it on the registry's records. ``server.Gateway`` adds
the listeners.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import resource
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol, cast

from tether.config import AppConfig, Config
from tether.gateway.core import admission, auth
from tether.gateway.core import dial as dialling
from tether.gateway.core.errors import Refusal
from tether.gateway.core.registry import (
    FDS_PER_SOCKET,
    TOMBSTONE_LIMIT,
    TOMBSTONE_TTL,
    Registry,
)
from tether.gateway.metrics import GatewayMetrics
from tether.gateway.resolve import GatewayResolver
from tether.policy import Decider
from tether.quota import QuotaBook
from tether.usage.ledger import Ledger
from tether.wire import pb

if TYPE_CHECKING:
    from tether.gateway.core.peers import Peers

log = logging.getLogger("tether.gateway")

# How often idle sockets are looked for: idle timeouts are minutes (App
# Engine's 10), so a second of slack is invisible and the scan is cheap.
SWEEP_INTERVAL = 1.0

# The descriptors kept for the gateway's own work when gateway.fd_reserve is
# not set: a tenth of the open-files limit, at least 64. They hold the
# listeners, the audit file, resolver queries, control streams and streams
# still in their hello: what must still work when the apps' sockets are at
# their cap, so an app over it is told why instead of being reset.
MIN_FD_RESERVE = 64
FD_RESERVE_FRACTION = 10
# Credentials a reload revoked, remembered (bounded, like tombstones) so the
# hello of a process still holding one is refused with the real reason.
REVOKED_LIMIT = TOMBSTONE_LIMIT
SHUTTING_DOWN = "gateway shutting down"


class Stream(Protocol):
    """A front-end's app stream as the core ends it (revocation, shutdown)."""

    app: str | None

    def end(self, refusal: Refusal) -> None: ...


def derive_caps(config: Config, fd_limit: int) -> tuple[int, int, int]:
    """(fd reserve, gateway max_sockets, the per-app default) for `fd_limit` open files.

    An unset cap is derived: the reserve as above; max_sockets from what is
    left, two descriptors a socket; the per-app default half of that, so no
    one app can take the whole gateway.
    """
    reserve = config.fd_reserve
    if reserve is None:
        reserve = max(MIN_FD_RESERVE, fd_limit // FD_RESERVE_FRACTION)
    max_sockets = config.max_sockets
    if max_sockets is None:
        max_sockets = max(1, (fd_limit - reserve) // FDS_PER_SOCKET)
    per_app = config.max_sockets_per_app
    if per_app is None:
        per_app = max(1, max_sockets // 2)
    return reserve, max_sockets, per_app


class GatewayCore:
    """Config, policy, resolver, the socket registry and clock; the core services.

    The services are written one concern to a module and bound here as
    methods (auth.authenticate, admission.admit, dial.dial), so a front-end calls
    ``core.admit(...)`` with no layer of calls in between.
    """

    def __init__(
        self,
        config: Config,
        *,
        resolver: GatewayResolver | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        # This gateway's name in the usage ledger and in a cluster ([cluster]
        # node_id sets it); the host's name when it is the only one.
        self.node_id = socket.gethostname()
        self.resolver = resolver or GatewayResolver.from_config(
            config, decider=lambda: self.decider, clock=clock
        )
        self.registry = Registry(clock or time.monotonic)
        # Per-app quotas ([quota], docs/quotas.md): asked by admission, the relay, UDP.
        self.quota = QuotaBook(config.quota, clock=clock or time.monotonic, wall=clock or time.time)
        # The durable usage ledger ([usage], docs/usage.md); None when not configured.
        self.ledger = Ledger.from_config(config.usage, self.registry) if config.usage else None
        self.decider = Decider(config.policy)
        # The gateway's own listening addresses: never a destination.
        self.own_addresses: list[tuple[str, int]] = []
        # The standard proxy front-ends' URLs ("http://127.0.0.1:3128",
        # "socks5h://..."; "" when not offered), set by server.Gateway.start
        # once their listeners are bound: every ServerHello offers them.
        self.http_proxy = ""
        self.socks5_proxy = ""
        # App streams not (yet) relaying: hello, requests, UDP associations.
        # Aborted at shutdown; a relayed stream is closed with its socket.
        self.streams: set[asyncio.BaseTransport] = set()
        # Tasks whose dial the connect timeout cancelled (dial.expire).
        self._expired: set[asyncio.Task[None]] = set()
        # Outbound connects being dialled, all apps (per app: AppUsage.connecting).
        self.connecting = 0
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_reserve, self.max_sockets, self.max_sockets_per_app = derive_caps(
            config, self.fd_limit
        )
        # app -> app_cap(): read on every connect (admission.capacity), derived
        # from the config, so worked out once per app and config (reload clears it).
        self.app_caps: dict[str, tuple[int, str]] = {}
        # (app, sha256 of a revoked key) -> why it was revoked (reload).
        self._revoked: OrderedDict[tuple[str, bytes], tuple[str, float]] = OrderedDict()
        # Streams not yet authenticated: their deadline, caps, failed keys.
        self.guard = auth.Guard(self)
        # The latency histograms observed per connection; every other metric
        # is read from the core when /metrics is scraped (gateway/metrics.py).
        self.metrics = GatewayMetrics()
        self.shutting_down = False
        # SIGTERM's drain (gateway/drain.py): new connects and resumes are
        # refused with UNAVAILABLE while live sockets finish.
        self.draining = False
        # The gateways this one serves with (core/peers.py): a cluster's node
        # ([cluster]; tether.cluster.node) or a host's workers (workerlink.py),
        # set by server.Gateway.start; None: a gateway on its own.
        self.cluster: Peers | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        # The loop the gateway runs in, kept: asyncio.get_running_loop() costs a
        # getpid() system call on every call in Python 3.11.
        self.loop: asyncio.AbstractEventLoop = cast(asyncio.AbstractEventLoop, None)

    authenticate = auth.authenticate
    admit = admission.admit
    dial = dialling.dial
    _expire = dialling.expire

    def begin(self, own_addresses: Iterable[tuple[str, int]]) -> None:
        """Start on `loop` (set by the owner): never dial `own_addresses`; sweep idle sockets."""
        self.own_addresses = list(own_addresses)
        self.decider = Decider(self.config.policy, self_addresses=self.own_addresses)
        self._sweep_task = self.loop.create_task(self._sweeper())
        if self.ledger is not None:
            self.ledger.start(self.loop, self.node_id)

    def app_cap(self, entry: AppConfig) -> tuple[int, str]:
        """An app's sockets quota and the config key it comes from (derived when unset)."""
        found = self.app_caps.get(entry.name)
        if found is None:
            limits = self.quota.limits(entry.name)
            if limits.sockets is not None:
                found = limits.sockets, limits.source("sockets")
            else:
                found = self.max_sockets_per_app, "gateway.max_sockets_per_app"
            self.app_caps[entry.name] = found
        return found

    def log_caps(self) -> None:
        """One line at start-up: the open-files limit and the caps derived from it."""
        log.info(
            "open files: limit %d, %d kept for the gateway's own work; max_sockets %d for all "
            "apps, %d per app unless [apps.NAME] max_sockets says otherwise (a TCP socket "
            "costs 2 descriptors, a UDP association 2 + 1 per destination)",
            self.fd_limit, self.fd_reserve, self.max_sockets, self.max_sockets_per_app,
        )
        if self.max_sockets * FDS_PER_SOCKET > self.fd_limit - self.fd_reserve:
            log.warning(
                "gateway.max_sockets %d needs %d descriptors, more than the %d the open-files "
                "limit leaves: apps may meet 'Too many open files' before the cap",
                self.max_sockets, self.max_sockets * FDS_PER_SOCKET,
                self.fd_limit - self.fd_reserve,
            )

    def revoked(self, app: str, key: str) -> str | None:
        """Why `app`'s `key` is no longer accepted, if a reload revoked it."""
        found = self._revoked.get((app, _digest(key)))
        if found is None or self.registry.clock() - found[1] > TOMBSTONE_TTL:
            return None
        return found[0]

    def idle_timeout(self, app: str) -> float:
        app_config = self.config.apps.get(app)
        if app_config is not None and app_config.idle_timeout is not None:
            return app_config.idle_timeout
        return self.config.idle_timeout

    def sweep(self) -> int:
        """Reclaim every socket idle past its timeout; returns how many."""
        self.metrics.fold()  # the latency observations of the last second into buckets
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

        Except an app's that was removed or whose key changed: its sockets
        and its streams are closed, each with the reason (revoke()).
        Listeners and the frame limit are fixed at start-up: changing where
        the gateway listens needs a restart, and the log says so.
        """
        if config.listen != self.config.listen:
            log.warning("reload: gateway.listen changed; it takes effect at the next restart")
        if config.admin_listen != self.config.admin_listen:
            log.warning(
                "reload: gateway.admin_listen changed; it takes effect at the next restart"
            )
        if config.usage != self.config.usage:
            log.warning("reload: [usage] changed; the ledger keeps its store until a restart")
        old = self.config
        self.config = replace(
            config, listen=self.config.listen, max_frame=self.config.max_frame,
            http_proxy_listen=self.config.http_proxy_listen,
            socks5_listen=self.config.socks5_listen,
            cluster=self.config.cluster,  # a node's identity and links are fixed at start-up
        )
        self.fd_reserve, self.max_sockets, self.max_sockets_per_app = derive_caps(
            self.config, self.fd_limit
        )
        self.app_caps.clear()  # the caps and quotas just read (the book's below, no await between)
        for name, entry in old.apps.items():
            new = config.apps.get(name)
            if new is None:
                self.revoke(name, entry.key, f"app '{name}' was removed from the gateway's config")
            elif not hmac.compare_digest(new.key.encode(), entry.key.encode()):
                self.revoke(name, entry.key, f"app '{name}''s key changed")
        if old.admin_key is not None and old.admin_key != config.admin_key:
            self.revoke(auth.ADMIN_APP, old.admin_key, "the admin key changed")
        self.resolver = GatewayResolver.from_config(
            config, decider=lambda: self.decider, clock=self._clock
        )
        self.decider = Decider(config.policy, self_addresses=self.own_addresses)
        admission.reconfigure(self, old)
        log.info(
            "reloaded %s: %d apps, %d sockets kept open",
            config.source or "config",
            len(config.apps),
            len(self.registry),
        )

    def revoke(self, app: str, key: str, cause: str) -> None:
        """End what `app` holds under `key`: its sockets and streams, each told `cause`.

        The sockets' tombstones read "revoked: CAUSE"; a stream gets an Error
        frame; a hello with the old key is refused with the cause (revoked()).
        """
        self._revoked[(app, _digest(key))] = (cause, self.registry.clock())
        while len(self._revoked) > REVOKED_LIMIT:
            self._revoked.popitem(last=False)
        reason = f"revoked: {cause}"
        sockets = self._end(reason, app)
        streams = self._end_streams(
            Refusal(pb.Error.AUTH_FAILED, errno.EACCES, f"tether: {cause}"), app
        )
        log.warning("reload: %s: %d sockets and %d streams closed", cause, sockets, streams)

    def _end(self, reason: str, app: str | None = None) -> int:
        """Reset every socket (of `app`, or all): the app's next call reads `reason`."""
        ended = 0
        for record in list(self.registry):
            if app is not None and record.app != app:
                continue
            if record.link is not None:
                record.link.abort(reason, reset_app=True)
            else:
                record.finish(reason)  # a UDP association: an Error frame, then closed
            ended += 1
        return ended

    def _end_streams(self, refusal: Refusal, app: str | None = None) -> int:
        """Send every framed stream (of `app`, or all) an Error frame and close it."""
        ended = 0
        for transport in list(self.streams):
            stream = transport.get_protocol()
            if app is not None and getattr(stream, "app", None) != app:
                continue
            if hasattr(stream, "end"):
                cast(Stream, stream).end(refusal)
            else:
                transport.close()
            ended += 1
        return ended

    def begin_shutdown(self, reason: str = SHUTTING_DOWN) -> int:
        """Stop sweeping; reset every socket (tombstone `reason`) and end every stream,
        saying why. Returns how many sockets were reset (whose apps may come and ask why)."""
        self.shutting_down = True
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        reset = self._end(reason)
        if self.cluster is not None:
            reset += self.cluster.end_forwarded(reason)  # their apps may ask why, too
        self._end_streams(
            Refusal(pb.Error.CLOSED, errno.ESHUTDOWN, "tether: the gateway is shutting down")
        )
        return reset

    def abort_all(self, reason: str) -> None:
        """Stop sweeping; drop every socket and every app stream now (shutdown)."""
        if self._sweep_task is not None:
            self._sweep_task.cancel()
        for record in list(self.registry):
            if record.link is not None:
                record.link.abort(reason)
            else:
                record.finish(reason)
        for stream in list(self.streams):
            stream.abort()  # type: ignore[attr-defined]  # a stream transport
        if self.ledger is not None:
            # Its last sample, now that every socket's close line is written;
            # server.Gateway.close awaits the final flush (ledger.close()).
            self.ledger.stop()


def _digest(key: str) -> bytes:
    # Only a digest of a revoked key is kept, never the key itself.
    return hashlib.sha256(key.encode()).digest()


__all__ = ["SHUTTING_DOWN", "SWEEP_INTERVAL", "GatewayCore", "Stream", "derive_caps"]
