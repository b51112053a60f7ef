"""What every front-end's session does for the pre-auth guard and its requests, written once.

A stream is in the guard's table (tether.gateway.core.auth.Guard) from its
accept until :meth:`Guard.check` knows its app or the stream is lost; the
guard asks it who it comes from (``peer_key``) only when that matters (a
failure, a cap), and the answer is kept. Each front-end's session derives
from :class:`PreauthStream` and adds its protocol.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from tether.gateway.core.auth import peer_key

if TYPE_CHECKING:
    from tether.gateway.core.auth import Guard
    from tether.gateway.core.errors import Refusal
    from tether.gateway.core.gateway import GatewayCore


class PreauthStream(asyncio.Protocol):
    """An app stream of any front-end, as the core and the guard see it."""

    if not TYPE_CHECKING:
        # No slots of its own: TetherSession keeps its __slots__ (one stream
        # per connection, thousands at a time), the other sessions a __dict__.
        # (Hidden from mypy, which would take the empty tuple for this class's
        # every attribute.)
        __slots__ = ()
    core: GatewayCore
    transport: asyncio.Transport | None
    app: str | None  # None until Guard.check said which
    _guard: Guard
    _peer: str | None  # peer_key(), asked only when needed
    _task: asyncio.Task[None] | None  # the request being answered (one at a time)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport  # type: ignore[assignment]
        self.core.streams.add(transport)
        self._guard.arrived(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """Out of the core's streams, and of the guard's table if it never authenticated."""
        if self.transport is not None:
            self.core.streams.discard(self.transport)
        if self.app is None:
            self._guard.gone(self)

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Answer a request in a task; nothing more is read until it is answered.

        The app's next bytes wait in the kernel (flow control), in order:
        after a connect they are the destination's.
        """
        assert self.transport is not None
        self.transport.pause_reading()
        task = self.core.loop.create_task(coro)
        self._task = task
        task.add_done_callback(self._done)

    @abstractmethod
    def _done(self, task: asyncio.Task[None]) -> None:
        """The request's task ended: read on, or close if it failed."""

    @abstractmethod
    def end_preauth(self, refusal: Refusal) -> None:
        """The guard closes the stream before it authenticated (deadline, a cap): say why."""

    @property
    def peername(self) -> str:
        """The stream's address, for log lines (asked only when one is written)."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer) if peer else "unix"

    def peer_key(self) -> str:
        """Who the stream comes from, for the pre-auth caps and throttling.

        TCP: the source IP. A Unix socket: the peer's uid (SO_PEERCRED), so
        tenants under different uids are counted apart; "unix" if unknown.
        """
        if self._peer is None:
            self._peer = peer_key(self.transport)
        return self._peer


__all__ = ["PreauthStream"]
