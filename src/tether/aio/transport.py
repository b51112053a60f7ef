"""What a uvloop transport says about a tether connection: the target, not the gateway hop.

The default loop's transports ask the socket object they were given (the
tether socket) for the peer, the local address and options. uvloop's ask
the kernel through the fd, which is the stream to the gateway: the peer
was the gateway's address, and ``get_extra_info('socket').setsockopt(
TCP_NODELAY)`` (redis.asyncio, aiomysql) failed with EOPNOTSUPP on the
AF_UNIX fd of a ``unix:`` gateway. So on uvloop the app's protocol is given
a :class:`TetherTransport` around the loop's: every call goes to the loop's
transport (the bound methods themselves, so a write costs no extra call),
and ``get_extra_info`` answers ``peername``, ``sockname`` and ``socket``
(a :class:`SocketView`) as the tether socket would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket as _socket_mod
from collections.abc import Callable
from typing import Any

from tether.client.sock import _Tether, get_option, set_option

# The loop transport's methods an app may call: bound onto the view at creation.
_DELEGATED = (
    "write",
    "writelines",
    "write_eof",
    "can_write_eof",
    "close",
    "is_closing",
    "abort",
    "pause_reading",
    "resume_reading",
    "is_reading",
    "set_write_buffer_limits",
    "get_write_buffer_size",
    "get_write_buffer_limits",
    "set_protocol",
    "get_protocol",
)


class SocketView:
    """``get_extra_info('socket')`` of a tether connection on uvloop.

    Like asyncio's TransportSocket (what the default loop returns): the
    socket's identity and options, no I/O. Options go to the gateway's
    outbound socket, as a tether socket's do.
    """

    __slots__ = ("_fileno", "_t", "family", "proto", "type")

    def __init__(self, t: _Tether, family: int, type: int, proto: int, fileno: int) -> None:
        self._t = t
        self.family = _socket_mod.AddressFamily(family)
        self.type = _socket_mod.SocketKind(type)
        self.proto = proto
        self._fileno = fileno

    def fileno(self) -> int:
        return self._fileno

    def getpeername(self) -> Any:
        return self._t.peer

    def getsockname(self) -> Any:
        return self._t.local

    def setsockopt(self, level: int, optname: int, value: Any, *optlen: Any) -> None:
        set_option(self._t, level, optname, value, *optlen)

    def getsockopt(self, level: int, optname: int, buflen: int | None = None) -> Any:
        return get_option(self._t, int(self.type), level, optname, buflen)

    def gettimeout(self) -> float:
        return 0.0  # the loop's: non-blocking

    def setblocking(self, flag: bool) -> None:
        if flag:
            raise ValueError("setblocking(True) is not supported on a transport's socket")

    def settimeout(self, value: float | None) -> None:
        if value:
            raise ValueError("settimeout(): only 0 is supported on a transport's socket")

    def __repr__(self) -> str:
        return f"<tether socket view fd={self._fileno} peer={self._t.peer}>"


class TetherTransport(asyncio.Transport):
    """A uvloop transport (plain or TLS) of a tether connection; see the module docstring."""

    def __init__(self, inner: Any, t: _Tether, family: int, type: int, proto: int) -> None:
        super().__init__()
        self.inner = inner
        self.tether = t
        for name in _DELEGATED:
            setattr(self, name, getattr(inner, name))
        sock = inner.get_extra_info("socket")
        self._view = SocketView(t, family, type, proto, sock.fileno() if sock else -1)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.tether.peer
        if name == "sockname":
            return self.tether.local
        if name == "socket":
            return self._view
        return self.inner.get_extra_info(name, default)

    def __repr__(self) -> str:
        return f"<TetherTransport {self.inner!r} peer={self.tether.peer}>"


def announcing(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    wrap: Callable[[Any], TetherTransport],
    made: list[TetherTransport],
) -> Callable[[], asyncio.BaseProtocol]:
    """`protocol_factory`, whose protocol is introduced to ``wrap(loop's transport)``.

    uvloop calls ``protocol.connection_made(its transport)``; for that one
    call the protocol's own method is shadowed by an instance attribute
    that passes the view instead (and records it in `made`). The data path
    (data_received, buffer_updated) is the protocol's own: nothing is added
    per read. A protocol without an instance dict gets the loop's transport.
    """

    def factory() -> asyncio.BaseProtocol:
        protocol = protocol_factory()
        own = protocol.connection_made

        def connection_made(transport: Any) -> None:
            del protocol.connection_made
            view = wrap(transport)
            made.append(view)
            own(view)

        # A protocol with __slots__ and no __dict__ gets the loop's transport, as is.
        with contextlib.suppress(AttributeError):
            protocol.connection_made = connection_made  # type: ignore[method-assign]
        return protocol

    return factory


__all__ = ["SocketView", "TetherTransport", "announcing"]
