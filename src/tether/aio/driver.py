"""The asyncio driver of the client handshake: the blocking client's steps, awaited.

A tether TCP socket is connected the same way as by its own ``connect()``
(tether.client.sock): the socket's fd is connected to the gateway, the hello
and the ``Connect`` go in one write, and the same sans-I/O
:class:`~tether.client.exchange.Exchange` decides the answer. Only the waits
differ: every one is a loop reader or writer callback (``add_reader`` /
``add_writer``, on the default loop and on uvloop alike), never a blocking
call, so the loop runs other tasks while the gateway resolves and dials.

The answer is read with ``MSG_PEEK`` and then exactly the frames' bytes are
consumed, as the blocking driver does (tether.client.stream): what the
target sent right behind the ``ConnectResult`` (an SMTP greeting) stays in
the kernel, so the socket handed to the loop afterwards carries the byte
stream from its first byte, and no "trailing bytes" need to be fed to a
protocol by hand (which ``create_connection(sock=...)`` offers no way to do).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import os
import socket as _socket_mod
from typing import Any

from tether.client.errors import closed, unreachable
from tether.client.exchange import Exchange
from tether.client.settings import Settings, current
from tether.client.sock import (
    GATEWAY_CONNECT_TIMEOUT,
    HANDOFF_TIMEOUT,
    PENDING_CONNECT_LIMIT,
    HandoffState,
    State,
    _check_address,
    _is_local_listener,
    _local_listeners,
    _Tether,
    socket,
)
from tether.client.stream import PEEK_SIZE
from tether.endpoint import host_port
from tether.wire import pb
from tether.wire.convert import FAMILY_TO_WIRE, OPTIONS, encode_option

_StdSocket = _socket_mod.socket
_DONTWAIT = _socket_mod.MSG_DONTWAIT
_PEEK = _socket_mod.MSG_PEEK | _DONTWAIT
_AF_INET6 = _socket_mod.AF_INET6
# Both loops set TCP_NODELAY on every TCP transport they make; asked for in
# the Connect, it is applied with the outbound socket's other options, and
# the loop's own setsockopt() then costs no control round trip (set_option).
_NODELAY = OPTIONS[(_socket_mod.IPPROTO_TCP, _socket_mod.TCP_NODELAY)]
# A Unix gateway whose listen queue is full refuses a non-blocking connect
# with EAGAIN instead of queueing it: retried this often until the deadline.
_UNIX_RETRY = 0.005


class _Deadline:
    """The loop's clock plus a limit, for waits that must not hang forever."""

    __slots__ = ("at", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.at = loop.time() + timeout

    def remaining(self) -> float:
        left = self.at - self.loop.time()
        if left <= 0:
            raise TimeoutError("timed out")
        return left


async def _wait_fd(
    loop: asyncio.AbstractEventLoop, fd: int, write: bool, deadline: _Deadline
) -> None:
    """Until `fd` is writable (readable), by a loop callback; TimeoutError at the deadline."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        async with asyncio.timeout(deadline.remaining()):
            await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def connect_gateway(
    loop: asyncio.AbstractEventLoop, fd: int, settings: Settings, deadline: _Deadline
) -> None:
    """Connect the kernel socket `fd` to the gateway (TCP or Unix) without blocking."""
    endpoint = settings.gateway
    raw = _socket.socket(endpoint.family, _socket_mod.SOCK_STREAM, 0, fileno=fd)
    try:
        raw.setblocking(False)
        while True:
            err = raw.connect_ex(endpoint.sockaddr)
            if err == errno.EAGAIN and endpoint.is_unix:
                await asyncio.sleep(min(_UNIX_RETRY, deadline.remaining()))
                continue
            if err == errno.EINPROGRESS:
                await _wait_fd(loop, fd, True, deadline)
                err = raw.getsockopt(_socket_mod.SOL_SOCKET, _socket_mod.SO_ERROR)
            break
        if err:
            raise unreachable(endpoint, OSError(err, os.strerror(err)))
        if not endpoint.is_unix:
            # As the blocking client (stream.connect_fd): no Nagle delay on the hop.
            raw.setsockopt(_socket_mod.IPPROTO_TCP, _socket_mod.TCP_NODELAY, 1)
    finally:
        raw.detach()


async def send_all(
    loop: asyncio.AbstractEventLoop, fd: int, data: bytes, deadline: _Deadline
) -> None:
    """Write all of `data` to the non-blocking `fd`, waiting for room by the loop."""
    view = memoryview(data)
    while view:
        try:
            sent = os.write(fd, view)
        except BlockingIOError:
            await _wait_fd(loop, fd, True, deadline)
            continue
        view = view[sent:]


async def read_answer(
    loop: asyncio.AbstractEventLoop, sock: _StdSocket, exchange: Exchange, deadline: _Deadline
) -> Any:
    """Peek, feed `exchange`, consume exactly the frames' bytes; until the answer.

    Raises what the exchange raises (the stdlib exception a refusal maps to),
    or TimeoutError at the deadline.
    """
    fd = sock.fileno()
    wire = exchange.wire
    while True:
        try:
            data = _socket.socket.recv(sock, PEEK_SIZE, _PEEK)
        except BlockingIOError:
            await _wait_fd(loop, fd, False, deadline)
            continue
        try:
            answer = exchange.receive(data)
        finally:
            # Consumed even for a refusal: the stream stays framed (in_step).
            consumed = len(data) - len(wire.trailing_data)
            while consumed > 0:
                # A peek showed these bytes queued: no wait is needed.
                chunk = _socket.socket.recv(sock, min(consumed, PEEK_SIZE), _DONTWAIT)
                if not chunk:
                    raise closed(exchange.gateway)
                consumed -= len(chunk)
        if answer is not None:
            return answer


async def connect(
    loop: asyncio.AbstractEventLoop,
    sock: socket,
    address: Any,
    *,
    family: int | None = None,
    timeout: float | None = None,
) -> None:
    """``sock.connect(address)`` for a tether TCP socket, awaited: NEW -> CONNECTED, or raise.

    `family` is the one the Connect asks for (AF_UNSPEC: any address of a
    name) if not the socket's. `timeout` is the gateway's outbound connect
    timeout (None: its default). On a failure the socket is NEW again, as
    after a failed blocking connect; on cancellation its stream is replaced.
    """
    t = sock._tether
    if t is None:
        raise OSError(errno.EINVAL, "tether: not a tether socket (made local, or not tether's)")
    if t.state is State.HANDED_OFF or sock.fileno() == -1:
        sock._check_open()  # raises
    host, port = _check_address(sock.family, address, "connect")
    if t.state is not State.NEW:
        if t.state is State.CONNECTED:
            raise OSError(errno.EISCONN, "Transport endpoint is already connected")
        raise BlockingIOError(errno.EALREADY, "Operation already in progress")
    settings = t.settings
    if settings is None:
        settings = t.settings = current()  # raises NotConfiguredError
    if settings.gateway.family != t.real_family:
        sock._reset_stream(t)  # configured after this socket was created
    sock.setblocking(False)
    fd = sock.fileno()
    target = host_port(host, port)
    options = dict(t.options)
    options.setdefault(_NODELAY, encode_option(_NODELAY, 1))
    request = pb.Connect(
        transport=pb.TRANSPORT_TCP,
        family=FAMILY_TO_WIRE[sock.family if family is None else family],
        host=host,
        port=port,
        timeout=timeout or 0.0,
        options=list(options.values()),
    )
    t.state = State.CONNECTING
    exchange = t.exchange
    try:
        if exchange is None:
            await connect_gateway(loop, fd, settings, _Deadline(loop, GATEWAY_CONNECT_TIMEOUT))
            exchange = t.exchange = Exchange(settings.gateway)
            first = exchange.open(settings)
        else:
            first = b""  # a stream left framed by a refused connect: try again on it
        deadline = _Deadline(loop, PENDING_CONNECT_LIMIT if timeout is None else timeout + 5.0)
        await send_all(loop, fd, first + exchange.send(request, target), deadline)
        result = await read_answer(loop, sock, exchange, deadline)
    except OSError:
        if exchange is None:
            sock._reset_stream(t)  # the hop to the gateway failed
        else:
            sock._answer_failed(t, exchange)
        raise
    except BaseException:
        sock._reset_stream(t)  # cancelled mid-answer: the stream is out of step
        raise
    t.options = options
    sock._take_result(t, result)


async def open_socket(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    *,
    family: int = 0,
    proto: int = 0,
    local_addr: Any = None,
    timeout: float | None = None,
) -> socket:
    """A new tether socket connected to `host`:`port` through the gateway.

    A name is sent to the gateway as is (one round trip; the policy judges
    the name and every address it resolves to) with `family` (0: any); the
    socket's own family is the peer's.
    """
    numeric = _numeric_family(host)
    sock_family = family or numeric or _socket_mod.AF_INET
    sock = socket(sock_family, _socket_mod.SOCK_STREAM, proto)
    try:
        if local_addr is not None:
            _bind(sock, local_addr, host_port(host, port))
        await connect(loop, sock, (host, port), family=family, timeout=timeout)
    except BaseException:
        sock.close()
        raise
    t = sock._tether
    assert t is not None and t.peer is not None
    if sock.family != _AF_INET6 and ":" in str(t.peer[0]):
        # A name answered with an IPv6 peer: the socket says so, as the stdlib's would.
        sock = _refamily(sock, _AF_INET6)
    return sock


def _bind(sock: socket, local_addr: Any, target: str) -> None:
    """create_connection's local_addr on a tether socket: only "any address, any port"."""
    sock.bind(local_addr)  # refuses anything but that or loopback, as a tether socket does
    if sock._tether is None:
        raise OSError(
            errno.EACCES,
            f"tether: local_addr={local_addr!r} would make the connection to {target} "
            "skip the gateway; only ('', 0) is allowed",
        )


def _refamily(sock: socket, family: int) -> socket:
    t = sock._tether
    assert t is not None and t.peer is not None and t.local is not None
    other = socket(family, sock.type, sock.proto, fileno=sock.detach())
    other._tether = t
    t.peer = (*t.peer[:2], 0, 0)
    t.local = (*t.local[:2], 0, 0)
    return other


def _numeric_family(host: str) -> int:
    for family in (_socket_mod.AF_INET, _AF_INET6):
        try:
            _socket_mod.inet_pton(family, host.split("%", 1)[0])
        except (OSError, ValueError):
            continue
        return family
    return 0


def is_local_listener(address: Any) -> bool:
    """A listener of this process (made local by tether): connected to without the gateway."""
    return bool(_local_listeners) and _is_local_listener(address)


async def finish_pending(loop: asyncio.AbstractEventLoop, sock: socket) -> None:
    """Await the answer to a non-blocking connect() made with the blocking API."""
    t = sock._tether
    assert t is not None
    deadline = _Deadline(loop, PENDING_CONNECT_LIMIT)
    while t.state is State.PENDING:
        if not sock._finish_pending(t, block=False):
            await _wait_fd(loop, sock.fileno(), False, deadline)
    if t.state is not State.CONNECTED:
        if t.error:
            raise sock._take_error(t)
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")


# -- handoff ---------------------------------------------------------------------------


async def resume(loop: asyncio.AbstractEventLoop, state: HandoffState) -> socket:
    """A live tether socket for a handed-off one, in this process, awaited.

    The blocking ``socket._resume`` step by step: a stream to the gateway,
    hello + ``Resume``, the answer, then the tail (echoed back by the
    gateway ahead of anything new from the peer).
    """
    sock, t, settings = socket._for_resume(state)
    try:
        sock.setblocking(False)
        fd = sock.fileno()
        deadline = _Deadline(loop, HANDOFF_TIMEOUT)
        await connect_gateway(loop, fd, settings, deadline)
        exchange = t.exchange = Exchange(settings.gateway)
        request = state.resume_request()
        target = host_port(state.peer[0], state.peer[1]) if state.peer else state.descriptor[:8]
        t.state = State.CONNECTING
        await send_all(loop, fd, exchange.open(settings) + exchange.send(request, target), deadline)
        result = await read_answer(loop, sock, exchange, deadline)
        sock._take_result(t, result)
        # Only now the tail: a refused Resume closes the stream (see socket._reattach).
        await send_all(loop, fd, state.tail, deadline)
    except BaseException:
        sock.close()
        raise
    t.restore_options(state.options)
    return sock


async def detach(
    loop: asyncio.AbstractEventLoop, t: _Tether, fd: int, prefix: bytes
) -> tuple[pb.Handoff, bytes]:
    """Detach the connected stream on `fd` (a descriptor the caller owns): (handoff, tail).

    The blocking ``socket._hand_off`` awaited: the gateway is asked to
    detach (on the control stream, in the loop's executor: it is the
    blocking client's, shared and locked), then the sending side is shut so
    everything written reaches the peer first, and the gateway's tail is
    read to its EOF by loop callbacks.
    """
    from tether.client import control

    assert t.settings is not None
    channel = control.channel(t.settings)
    request = pb.Request(detach=pb.Detach(descriptor=t.descriptor))
    response = await loop.run_in_executor(None, channel.request, request, HANDOFF_TIMEOUT)
    deadline = _Deadline(loop, HANDOFF_TIMEOUT)
    tail = bytearray(prefix)
    os.set_blocking(fd, False)
    raw = _socket.socket(fileno=fd)
    try:
        raw.shutdown(_socket_mod.SHUT_WR)
        while True:
            try:
                chunk = raw.recv(PEEK_SIZE)
            except BlockingIOError:
                try:
                    await _wait_fd(loop, fd, False, deadline)
                except TimeoutError as exc:
                    peer = host_port(*t.peer[:2]) if t.peer else t.descriptor[:8]
                    raise TimeoutError(
                        f"tether: handing off socket to {peer}: the gateway did not finish "
                        f"in {HANDOFF_TIMEOUT:g} s"
                    ) from exc
                continue
            if not chunk:
                break
            tail += chunk
    finally:
        raw.detach()
    return response.handoff, bytes(tail)


__all__ = [
    "State",
    "connect",
    "connect_gateway",
    "detach",
    "finish_pending",
    "is_local_listener",
    "open_socket",
    "read_answer",
    "resume",
    "send_all",
]
