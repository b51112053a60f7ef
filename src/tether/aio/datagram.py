"""UDP endpoints on an event loop through the gateway: ``create_datagram_endpoint``.

A tether UDP socket (tether.client.dgram) keeps a real kernel fd, but what
the fd talks to is the gateway's relay for each destination, not the
destination: ``sendto(d)`` must go through the socket's own method (which
picks the relay and, for a new destination, asks the gateway first) and
``recvfrom`` translates the relay's address back into ``d``. uvloop's own
datagram transport uses the fd in C, whatever socket object it was given:
handed a tether socket (``sock=``), it would send each datagram straight to
its destination, past the policy, and report replies from the relays'
addresses. The default loop's calls the socket's methods, but would wait
for each new destination's decision on the loop's thread. This module's
transport is asyncio's ``_SelectorDatagramTransport`` rebuilt over the
tether socket's methods with ``add_reader``/``add_writer``, which both
loops offer, so it behaves the same on both.

Nothing here blocks the loop. A destination the socket has already been
allowed costs a kernel ``sendto`` (plus one non-blocking peek at the
association's stream, which notices a reclaim). A new one needs the
gateway's decision, a round trip on the association's blocking stream
(and, for the socket's first, opening that stream): it runs in the loop's
default executor, and the destination's datagrams wait in order in a queue
of their own, at most the fd's ``SO_SNDBUF`` bytes, as the kernel's send
buffer would hold them; past that they are dropped and counted in
``transport.dropped``, as a full kernel buffer drops UDP. A refusal
(``tether.PolicyDenied``, an unknown name, a timeout) reaches
``protocol.error_received(exc)``, asyncio's way for a failed ``sendto``, and
none of that destination's datagrams is sent. The queued bytes count in
``get_write_buffer_size()``, so ``pause_writing()``/``resume_writing()``
hold back a protocol that floods a destination still being decided.

An association the gateway has ended (idle reclamation, shutdown) shows at
the next send: ``error_received(ConnectionResetError(<the gateway's
reason>))``, then the transport closes with ``connection_lost`` of the same
exception (every later send would fail the same way). ``close()`` sends
what is buffered, ``abort()`` drops it; both then close the socket, which
ends the association (the gateway writes its close line).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import socket as _socket_mod
import warnings
from asyncio import trsock
from asyncio.constants import LOG_THRESHOLD_FOR_CONNLOST_WRITES
from collections.abc import Callable
from typing import Any, TypeVar

from tether.aio.connection import original
from tether.client.dgram import DatagramSocket, decide, known_destination

logger = logging.getLogger(__name__)

_P = TypeVar("_P", bound=asyncio.BaseProtocol)

# One recvfrom() takes a whole datagram: UDP's length field is 16 bits, so
# none carries more than 65,535 bytes (asyncio's 256 KiB would be allocated
# per datagram for nothing).
MAX_DATAGRAM = 65_535
# asyncio's default write buffer limits (transports._FlowControlMixin).
HIGH_WATER = 64 * 1024

_AF_INET = _socket_mod.AF_INET
_AF_INET6 = _socket_mod.AF_INET6
_AF_UNIX = _socket_mod.AF_UNIX


class _Waiting:
    """A destination's datagrams while the gateway decides it, in the order they were sent."""

    __slots__ = ("address", "datagrams", "limit", "size")

    def __init__(self, address: Any, limit: int) -> None:
        self.address = address
        self.datagrams: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.limit = limit  # bytes: the fd's SO_SNDBUF, what the kernel would queue


class TetherDatagramTransport(asyncio.DatagramTransport):
    """A datagram transport over a tether UDP socket, on any loop with add_reader (see module)."""

    max_size = MAX_DATAGRAM
    _sock: DatagramSocket | None = None  # for __del__, should __init__ fail early

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: DatagramSocket,
        protocol: asyncio.BaseProtocol,
        address: Any = None,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol: Any = protocol
        try:
            self._peer: Any = sock.getpeername()
        except OSError:
            self._peer = None
        # Connected: sendto() takes None, the address as the app gave it, or the peer's.
        self._address: Any = address if address is not None else self._peer
        self._trsock = trsock.TransportSocket(sock)
        self._sockname: Any = sock.getsockname()  # kept for after close, as asyncio keeps it
        self._buffer: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._waiting: dict[tuple[str, int], _Waiting] = {}
        self._deciding = 0  # decisions running in the executor (they use the socket)
        self._unclosed: DatagramSocket | None = None  # closed when the last decision returns
        self._buffer_size = 0  # bytes in _buffer and _waiting
        self._conn_lost = 0
        self._closing = False
        self._reading_paused = False
        self._protocol_paused = False
        self._high_water = HIGH_WATER
        self._low_water = HIGH_WATER // 4
        self.dropped = 0  # datagrams dropped because their destination's queue was full
        loop.call_soon(self._connection_made)
        # Read only once connection_made() has run, as asyncio does.
        loop.call_soon(self._add_reader)

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "closing" if self._closing else "open"
        return (
            f"<{type(self).__name__} {state} fd={self._fd} bufsize={self._buffer_size} "
            f"deciding={self._deciding}>"
        )

    # -- BaseTransport -----------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._trsock
        if name == "sockname":
            # The socket's answer now: the gateway's outbound address once in use.
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sockname = self._sock.getsockname()
            return self._sockname
        if name == "peername":
            return self._peer
        return super().get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol: asyncio.BaseProtocol = self._protocol
        return protocol

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        self._maybe_finish_close()

    def abort(self) -> None:
        self._force_close(None)

    # -- reading -------------------------------------------------------------------

    def is_reading(self) -> bool:
        return not self._closing and not self._reading_paused

    def pause_reading(self) -> None:
        if self.is_reading():
            self._reading_paused = True
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._closing and self._reading_paused:
            self._reading_paused = False
            self._add_reader()

    def _add_reader(self) -> None:
        if self.is_reading():
            self._loop.add_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        if self._conn_lost or self._sock is None:
            return
        try:
            # The socket's recvfrom: the relay's address becomes the
            # destination's, and a datagram from no relay of ours is dropped.
            data, addr = self._sock.recvfrom(self.max_size)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._protocol.error_received(exc)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on datagram transport")
        else:
            self._protocol.datagram_received(data, addr)

    # -- writing -------------------------------------------------------------------

    def sendto(self, data: Any, addr: Any = None) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        if not data:
            return  # as asyncio's and uvloop's transports: no empty datagram
        if self._peer is not None:
            if addr not in (None, self._address, self._peer):
                raise ValueError(f"Invalid address: must be None or {self._address}")
            addr = None
        if self._conn_lost:
            if self._conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        sock = self._sock
        assert sock is not None
        if addr is None and self._peer is None:
            error = OSError(errno.EDESTADDRREQ, "Destination address required")
            self._protocol.error_received(error)
            return
        if addr is not None:
            # A malformed address raises here, to the caller, as uvloop's does.
            key, known = known_destination(sock, addr)
            # While its datagrams wait, a destination stays in _waiting even
            # once the thread has the route: they go first, in order.
            if not known or key in self._waiting:
                self._wait_for_decision(key, addr, bytes(data))
                return
        if not self._buffer:
            if self._send(data, addr):
                return
            self._loop.add_writer(self._fd, self._sendto_ready)
        self._buffer.append((bytes(data), addr))  # bytes(): the app may reuse its buffer
        self._buffer_size += len(data)
        self._maybe_pause_protocol()

    def _send(self, data: Any, addr: Any) -> bool:
        """Send one datagram to a decided destination; False if the kernel has no room now."""
        sock = self._sock
        assert sock is not None
        try:
            if addr is None:
                sock.send(data)
            else:
                sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._send_failed(exc)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal write error on datagram transport")
        return True

    def _send_failed(self, exc: OSError) -> None:
        self._protocol.error_received(exc)
        if isinstance(exc, ConnectionResetError):
            # The association is over (the gateway reclaimed it, or went away):
            # every later send would fail the same way.
            self._force_close(exc)

    def _sendto_ready(self) -> None:
        while self._buffer and not self._conn_lost:
            data, addr = self._buffer.popleft()
            self._buffer_size -= len(data)
            if not self._send(data, addr):
                self._buffer.appendleft((data, addr))  # the kernel has no room yet
                self._buffer_size += len(data)
                break
        if self._conn_lost:
            return
        self._maybe_resume_protocol()  # may append to the buffer
        if not self._buffer:
            self._loop.remove_writer(self._fd)
            self._maybe_finish_close()

    # -- new destinations ------------------------------------------------------------

    def _wait_for_decision(self, key: tuple[str, int], addr: Any, data: bytes) -> None:
        waiting = self._waiting.get(key)
        if waiting is None:
            assert self._sock is not None
            limit = self._sock.getsockopt(_socket_mod.SOL_SOCKET, _socket_mod.SO_SNDBUF)
            waiting = self._waiting[key] = _Waiting(addr, limit)
            self._decide(key, addr)
        if waiting.size >= waiting.limit:
            # The kernel takes a datagram while its send buffer is below the
            # limit and drops it after that; so does this queue.
            self.dropped += 1
            return
        waiting.datagrams.append(data)
        waiting.size += len(data)
        self._buffer_size += len(data)
        self._maybe_pause_protocol()

    def _decide(self, key: tuple[str, int], addr: Any) -> None:
        assert self._sock is not None
        self._deciding += 1
        future = self._loop.run_in_executor(None, decide, self._sock, addr)
        future.add_done_callback(functools.partial(self._decided, key))

    def _decided(self, key: tuple[str, int], future: asyncio.Future[None]) -> None:
        self._deciding -= 1
        exc = None if future.cancelled() else future.exception()
        if self._conn_lost:
            # Aborted meanwhile: nothing is sent; the socket closes once unused.
            if self._unclosed is not None and not self._deciding:
                self._unclosed.close()
                self._unclosed = None
            return
        waiting = self._waiting.pop(key)
        self._buffer_size -= waiting.size
        if future.cancelled():
            exc = ConnectionAbortedError(errno.ECONNABORTED, "tether: the decision was cancelled")
        if exc is None:
            for data in waiting.datagrams:  # in order, behind anything the kernel refused
                if self._buffer or not self._send(data, waiting.address):
                    if not self._buffer:
                        self._loop.add_writer(self._fd, self._sendto_ready)
                    self._buffer.append((data, waiting.address))
                    self._buffer_size += len(data)
                if self._conn_lost:
                    return
        elif isinstance(exc, OSError):
            # Refused (PolicyDenied, an unknown name, a timeout): none of it is sent.
            self._send_failed(exc)
            if self._conn_lost:
                return
        else:
            self._fatal_error(exc, "Fatal error deciding a datagram destination")
            return
        self._maybe_resume_protocol()
        self._maybe_finish_close()

    # -- flow control (asyncio's _FlowControlMixin, over both queues) ----------------

    def get_write_buffer_size(self) -> int:
        return self._buffer_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low_water, self._high_water)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water, self._low_water = high, low
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if self._buffer_size <= self._high_water or self._protocol_paused:
            return
        self._protocol_paused = True
        self._call_protocol("pause_writing")

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self._buffer_size <= self._low_water:
            self._protocol_paused = False
            self._call_protocol("resume_writing")

    def _call_protocol(self, method: str) -> None:
        try:
            getattr(self._protocol, method)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler({
                "message": f"protocol.{method}() failed",
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            })

    # -- the end -------------------------------------------------------------------

    def _connection_made(self) -> None:
        self._protocol.connection_made(self)

    def _maybe_finish_close(self) -> None:
        """After close(): connection_lost once nothing is left to send or decide."""
        if self._closing and not self._conn_lost and not self._buffer and not self._waiting:
            self._conn_lost += 1
            self._loop.call_soon(self._call_connection_lost, None)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        if not isinstance(exc, OSError):
            self._loop.call_exception_handler({
                "message": message,
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            })
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        if self._buffer:
            self._buffer.clear()
            self._loop.remove_writer(self._fd)
        self._waiting.clear()
        self._buffer_size = 0
        if not self._closing:
            self._closing = True
            self._loop.remove_reader(self._fd)
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        sock = self._sock
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock = None
            if sock is not None:
                if self._deciding:
                    # A decision thread is in a round trip on the association's
                    # stream: the socket closes when it returns (within the
                    # decision's deadline), not under its feet.
                    self._unclosed = sock
                else:
                    sock.close()  # ends the association: the gateway logs its close

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if self._sock is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()


async def create_datagram_endpoint(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], _P],
    local_addr: Any = None,
    remote_addr: Any = None,
    *,
    family: int = 0,
    proto: int = 0,
    flags: int = 0,
    reuse_port: bool | None = None,
    allow_broadcast: bool | None = None,
    sock: Any = None,
) -> tuple[asyncio.DatagramTransport, _P]:
    """``loop.create_datagram_endpoint`` through the gateway, with the stdlib's arguments.

    `remote_addr` makes a connected endpoint (its destination decided here:
    a refusal raises, as the stdlib's connect does); `local_addr` can only be
    "any" (``('', 0)``, ``('0.0.0.0', 0)``, ``('::', 0)``), as tether
    sockets are outbound only; `allow_broadcast` and `reuse_port` are
    refused as the socket refuses SO_BROADCAST and SO_REUSEPORT. `sock` must
    be a tether UDP socket. Names in the addresses are resolved by the
    gateway, so `flags` (getaddrinfo's) has nothing to act on. With
    `family` 0 a name is tried as IPv4, then as IPv6 if it has no IPv4
    address. An AF_UNIX endpoint never leaves the host: it is the loop's own.
    """
    if family == _AF_UNIX or getattr(sock, "family", None) == _AF_UNIX:
        own = original(loop, "create_datagram_endpoint")
        return await own(  # type: ignore[no-any-return]
            protocol_factory, local_addr, remote_addr, family=family, proto=proto,
            flags=flags, reuse_port=reuse_port, allow_broadcast=allow_broadcast, sock=sock,
        )
    if sock is not None:
        _check_sock(sock)
        given = {
            "local_addr": local_addr, "remote_addr": remote_addr, "family": family,
            "proto": proto, "flags": flags, "reuse_port": reuse_port,
            "allow_broadcast": allow_broadcast,
        }
        problems = ", ".join(f"{k}={v}" for k, v in given.items() if v)
        if problems:
            raise ValueError(
                f"socket modifier keyword arguments can not be used when sock is specified. "
                f"({problems})"
            )
        sock.setblocking(False)
    else:
        sock = await _open_socket(
            loop, local_addr, remote_addr, family, proto, reuse_port, allow_broadcast
        )
    try:
        protocol = protocol_factory()
    except BaseException:
        sock.close()
        raise
    transport = TetherDatagramTransport(loop, sock, protocol, remote_addr)
    waiter: asyncio.Future[None] = loop.create_future()
    loop.call_soon(_wake, waiter)  # after connection_made(), scheduled first
    try:
        await waiter
    except BaseException:
        transport.close()
        raise
    return transport, protocol


def _check_sock(sock: Any) -> None:
    if isinstance(sock, DatagramSocket):
        return
    if getattr(sock, "type", None) != _socket_mod.SOCK_DGRAM:
        raise ValueError(f"A UDP Socket was expected, got {sock!r}")
    raise OSError(
        errno.EACCES,
        f"tether: loop.create_datagram_endpoint() was given a plain socket.socket (made "
        f"before tether.install(), or not by the socket module): {sock!r}; its datagrams "
        f"would bypass the gateway. Create the socket after tether.install() (or with "
        f"tether.socket.socket)",
    )


async def _open_socket(
    loop: asyncio.AbstractEventLoop,
    local_addr: Any,
    remote_addr: Any,
    family: int,
    proto: int,
    reuse_port: bool | None,
    allow_broadcast: bool | None,
) -> DatagramSocket:
    """A non-blocking tether UDP socket, bound and connected as asked (off the loop)."""
    if local_addr is not None and local_addr[0] is None:
        local_addr = ("", local_addr[1])  # getaddrinfo's None host: any address
    families = _families(family, local_addr, remote_addr)
    for i, fam in enumerate(families):
        sock = DatagramSocket(fam, _socket_mod.SOCK_DGRAM, proto)
        try:
            # As the stdlib does; the socket refuses both with its reason.
            if reuse_port:
                sock.setsockopt(_socket_mod.SOL_SOCKET, _socket_mod.SO_REUSEPORT, 1)
            if allow_broadcast:
                sock.setsockopt(_socket_mod.SOL_SOCKET, _socket_mod.SO_BROADCAST, 1)
            sock.setblocking(False)
            if local_addr is not None or remote_addr is not None:
                # bind() opens the association, connect() asks for a decision:
                # round trips to the gateway, so off the loop.
                await _off_loop(loop, sock, _bind_and_connect, sock, local_addr, remote_addr)
        except asyncio.CancelledError:
            raise  # _off_loop closes the socket once its thread is done with it
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EAFNOSUPPORT and i + 1 < len(families):
                continue  # a name with no address of this family: try the next
            raise
        except BaseException:
            sock.close()
            raise
        return sock
    raise AssertionError("unreachable: the last family returns or raises")


def _families(family: int, local_addr: Any, remote_addr: Any) -> list[int]:
    """The socket families to try, in order, as the stdlib picks them from the addresses."""
    given = [a for a in (local_addr, remote_addr) if a is not None]
    for addr in given:
        if not (isinstance(addr, tuple) and len(addr) == 2):
            raise TypeError("2-tuple is expected")
    if family:
        if family not in (_AF_INET, _AF_INET6):
            raise ValueError(
                f"tether: datagram endpoints through the gateway are AF_INET or AF_INET6, "
                f"not {_socket_mod.AddressFamily(family).name}"
            )
        return [family]
    if not given:
        raise ValueError("unexpected address family")
    literal = {f for f in (_literal_family(addr[0]) for addr in given) if f is not None}
    if len(literal) > 1:
        raise ValueError("can not get address information")
    if literal:
        return [literal.pop()]
    return [_AF_INET, _AF_INET6]


def _literal_family(host: Any) -> int | None:
    """AF_INET or AF_INET6 for an address literal; None for a name or "any" ('')."""
    if not isinstance(host, str) or not host:
        return None
    for fam in (_AF_INET, _AF_INET6):
        try:
            _socket_mod.inet_pton(fam, host.partition("%")[0])
        except OSError:
            continue
        return fam
    return None


def _bind_and_connect(sock: DatagramSocket, local_addr: Any, remote_addr: Any) -> None:
    if local_addr is not None:
        sock.bind(local_addr)
    if remote_addr is not None:
        sock.connect(remote_addr)


async def _off_loop(
    loop: asyncio.AbstractEventLoop, sock: DatagramSocket, fn: Callable[..., None], *args: Any
) -> None:
    """Run a blocking call on `sock` in the default executor.

    If the caller is cancelled, the call runs on (a thread cannot be
    interrupted) and the socket is closed when it returns, not under it.
    """
    future = loop.run_in_executor(None, fn, *args)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda _: sock.close())
        raise


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.cancelled():
        waiter.set_result(None)


__all__ = ["MAX_DATAGRAM", "TetherDatagramTransport", "create_datagram_endpoint"]
