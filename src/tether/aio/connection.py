"""Connections for a loop: the driver's connected socket, given to the loop's own transport.

``create_connection`` / ``open_connection`` connect a tether socket with the
driver (tether.aio.driver), then let the loop wrap it exactly as it wraps a
socket the app connected itself (``loop.create_connection(sock=...)``), TLS
included: the loop's transport reads and writes the fd at its own speed, and
the gateway only relays.

uvloop builds a libuv TCP handle on a socket of family AF_INET/AF_INET6,
which fails (EOPNOTSUPP, from TCP_NODELAY) on the AF_UNIX fd of a ``unix:``
gateway. uvloop is therefore given a plain socket object of the fd's real
family there and makes its Unix transport on it; the bytes are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket as _socket_mod
import sys
import weakref
from collections.abc import Callable
from typing import Any

from tether.aio import driver
from tether.aio.hooks import ORIGINALS
from tether.aio.transport import TetherTransport, announcing
from tether.client.sock import State, socket

_StdSocket = _socket_mod.socket
# asyncio's StreamReader limit (asyncio.streams._DEFAULT_LIMIT, 64 KiB).
DEFAULT_LIMIT = 2**16


# The tether socket behind each plain transport made here, for hand_off():
# uvloop's transports do not show the socket object they were given.
_SOCKETS: weakref.WeakKeyDictionary[Any, socket] = weakref.WeakKeyDictionary()

# Arguments of loop.create_connection that choose among a name's addresses
# locally; the gateway does that (it tries the addresses it admitted in
# order), so they are accepted and not passed on (uvloop has no such
# parameters).
_ADDRESS_CHOICE = ("happy_eyeballs_delay", "interleave", "all_errors", "flags")


def original(loop: asyncio.AbstractEventLoop, name: str) -> Callable[..., Any]:
    """The loop's own method `name`, bound, whether or not the hooks are installed.

    The hooks, this module and the explicit API reach the loop's own method
    through this, so a hooked method never calls itself.
    """
    for cls in type(loop).__mro__:
        method = ORIGINALS.get((cls, name))
        if method is not None:
            return method.__get__(loop, type(loop))  # type: ignore[no-any-return]
    return getattr(loop, name)  # type: ignore[no-any-return]


def is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    module = sys.modules.get("uvloop.loop")
    return module is not None and isinstance(loop, module.Loop)


def loop_socket(loop: asyncio.AbstractEventLoop, sock: socket) -> _StdSocket:
    """The socket object to give `loop` for the connected tether socket `sock`."""
    t = sock._tether
    if t is not None and t.real_family == _socket_mod.AF_UNIX and is_uvloop(loop):
        sock.setblocking(False)
        return _StdSocket(_socket_mod.AF_UNIX, _socket_mod.SOCK_STREAM, 0, sock.detach())
    return sock


def tether_socket(transport: Any) -> socket | None:
    """The tether socket a plain transport carries, if it carries one."""
    sock = _SOCKETS.get(transport)
    if sock is not None:
        return sock
    if isinstance(transport, TetherTransport):
        transport = transport.inner
    # The default loop's transports show theirs (a TransportSocket around it).
    inner = getattr(transport.get_extra_info("socket"), "_sock", None)
    return inner if isinstance(inner, socket) and inner._tether is not None else None


async def start(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    sock: socket,
    **kwargs: Any,
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """The loop's own create_connection(sock=...) on a tether socket, connected or pending."""
    t = sock._tether
    assert t is not None
    if t.state is State.PENDING:
        await driver.finish_pending(loop, sock)  # a connect_ex() of the blocking API
    made: list[TetherTransport] = []
    if is_uvloop(loop):
        family, type_, proto = int(sock.family), int(sock.type), int(sock.proto)
        protocol_factory = announcing(
            protocol_factory, lambda inner: TetherTransport(inner, t, family, type_, proto), made
        )
    given = loop_socket(loop, sock)
    transport, protocol = await original(loop, "create_connection")(
        protocol_factory, sock=given, **kwargs
    )
    if made:
        transport = made[0]
    if kwargs.get("ssl") is None:
        # A transport without weak references: hand_off() refuses it by name.
        with contextlib.suppress(TypeError):
            _SOCKETS[transport] = sock
    return transport, protocol


async def start_tls(
    loop: asyncio.AbstractEventLoop, transport: Any, protocol: Any, sslcontext: Any, **kwargs: Any
) -> Any:
    """``loop.start_tls`` that takes a TetherTransport (uvloop accepts only its own)."""
    inner = transport.inner if isinstance(transport, TetherTransport) else transport
    tls = await original(loop, "start_tls")(inner, protocol, sslcontext, **kwargs)
    if isinstance(transport, TetherTransport) and tls is not None:
        view = transport._view
        return TetherTransport(tls, transport.tether, view.family, view.type, view.proto)
    return tls


def _port(port: Any) -> int:
    """asyncio takes a port as int or text (a number or a service name, /etc/services)."""
    if isinstance(port, int):
        return port
    text = port.decode() if isinstance(port, bytes) else str(port)
    if text.isdigit():
        return int(text)
    return _socket_mod.getservbyname(text, "tcp")


async def create_connection(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | None = None,
    port: Any = None,
    *,
    ssl: Any = None,
    family: int = 0,
    proto: int = 0,
    sock: Any = None,
    local_addr: Any = None,
    server_hostname: str | None = None,
    **kwargs: Any,
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """``loop.create_connection`` through the gateway; same arguments and result.

    With `sock`, a tether socket (connected, or still connecting) is given
    to the loop; any other socket is the loop's business. Otherwise the
    gateway resolves `host` and connects, and the loop makes its transport
    (and TLS, with `ssl`) on the socket.
    """
    for name in _ADDRESS_CHOICE:
        kwargs.pop(name, None)
    if sock is not None:
        if host is not None or port is not None:
            raise ValueError("host/port and sock can not be specified at the same time")
        if isinstance(sock, socket) and sock._tether is not None:
            return await start(
                loop, protocol_factory, sock, ssl=ssl, server_hostname=server_hostname, **kwargs
            )
        return await original(loop, "create_connection")(  # type: ignore[no-any-return]
            protocol_factory, sock=sock, ssl=ssl, server_hostname=server_hostname, **kwargs
        )
    if host is None or port is None:
        raise ValueError("host and port was not specified and no sock specified")
    number = _port(port)
    if driver.is_local_listener((host, number)):
        # A listener of this process (tether made it local): no gateway, as for connect().
        return await original(loop, "create_connection")(  # type: ignore[no-any-return]
            protocol_factory, host, number, ssl=ssl, family=family, proto=proto,
            server_hostname=server_hostname, **kwargs,
        )
    connected = await driver.open_socket(
        loop, host, number, family=family, proto=proto, local_addr=local_addr
    )
    if ssl and server_hostname is None:
        server_hostname = host  # as asyncio: the name asked for is the one verified
    try:
        return await start(
            loop, protocol_factory, connected, ssl=ssl, server_hostname=server_hostname, **kwargs
        )
    except BaseException:
        connected.close()
        raise


async def open_connection(
    host: str | None = None, port: Any = None, *, limit: int = DEFAULT_LIMIT, **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` through the gateway, on the running loop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(loop, lambda: protocol, host, port, **kwargs)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
    return reader, writer


def refuse_plain(sock: Any, address: Any, what: str) -> OSError:
    """A plain (not tether) Internet socket would connect past the gateway: say so."""
    return OSError(
        errno.EACCES,
        f"tether: {what} was given a plain socket.socket (made before tether.install(), or "
        f"not by the socket module) to connect to {address!r}; it would bypass the gateway. "
        "Create the socket after tether.install() (or with tether.socket.socket)",
    )


__all__ = [
    "DEFAULT_LIMIT",
    "create_connection",
    "is_uvloop",
    "loop_socket",
    "open_connection",
    "original",
    "start",
    "tether_socket",
]
