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
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import cast

from tether.config import Config
from tether.gateway.core import admission, auth
from tether.gateway.core import dial as dialling
from tether.gateway.core.registry import Registry
from tether.gateway.resolve import GatewayResolver
from tether.policy import Decider

log = logging.getLogger("tether.gateway")

# How often idle sockets are looked for: idle timeouts are minutes (App
# Engine's 10), so a second of slack is invisible and the scan is cheap.
SWEEP_INTERVAL = 1.0


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
        self.resolver = resolver or GatewayResolver.from_config(
            config, decider=lambda: self.decider, clock=clock
        )
        self.registry = Registry(clock or time.monotonic)
        self.decider = Decider(config.policy)
        # The gateway's own listening addresses: never a destination.
        self.own_addresses: list[tuple[str, int]] = []
        # App streams not (yet) relaying: hello, requests, UDP associations.
        # Aborted at shutdown; a relayed stream is closed with its socket.
        self.streams: set[asyncio.BaseTransport] = set()
        # Tasks whose dial the connect timeout cancelled (dial.expire).
        self._expired: set[asyncio.Task[None]] = set()
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
        self.decider = Decider(config.policy, self_addresses=self.own_addresses)
        log.info(
            "reloaded %s: %d apps, %d sockets kept open",
            config.source or "config",
            len(config.apps),
            len(self.registry),
        )

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


__all__ = ["SWEEP_INTERVAL", "GatewayCore"]
