"""Blocking I/O for the client side of the wire protocol.

The app's socket must carry exactly the remote byte stream once connected,
so the frames in front of it are read with MSG_PEEK and then consumed to
the byte: whatever the peer sent right behind the ConnectResult (an SMTP
greeting, say) stays in the kernel for the app's own recv() and select().
"""

from __future__ import annotations

import _socket
import errno
import os
import select
import socket as _socket_mod
import time

from tether import __version__
from tether.client.settings import Settings
from tether.wire import (
    NEED_DATA,
    PAUSED,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    Event,
    RemoteProtocolError,
    Role,
    encode_frame,
    pb,
)
from tether.wire.protocol import _Sentinel

_StdSocket = _socket_mod.socket
PEEK_SIZE = 64 * 1024  # one peek holds the hello answer and any connect result
_MSG_PEEK = _socket_mod.MSG_PEEK
_MSG_DONTWAIT = _socket_mod.MSG_DONTWAIT


class Deadline:
    """Time left for a blocking operation; None = wait forever."""

    __slots__ = ("at",)

    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left


# The last Settings' hello and its frame: a process has one Settings object
# in force, and the message only ever goes to Connection.send().
_hello: tuple[Settings, pb.ClientHello, bytes] | None = None


def _hello_and_frame(settings: Settings) -> tuple[Settings, pb.ClientHello, bytes]:
    global _hello
    cached = _hello
    if cached is None or cached[0] is not settings:
        message = pb.ClientHello(
            protocol_version=PROTOCOL_VERSION,
            app=settings.app,
            key=settings.key,
            client_version=__version__,
        )
        cached = _hello = (settings, message, encode_frame(message))
    return cached


def hello(settings: Settings) -> pb.ClientHello:
    return _hello_and_frame(settings)[1]


def send_hello(wire: Connection, settings: Settings) -> bytes:
    """The bytes that open a stream: the hello, encoded once per Settings."""
    _, message, frame = _hello_and_frame(settings)
    return wire.send(message, frame=frame)


def connect_fd(fd: int, settings: Settings, deadline: Deadline) -> None:
    """Connect the kernel socket `fd` to the gateway (TCP or Unix)."""
    endpoint = settings.gateway
    # The C-level class: no socket.py object (and its Python __init__) per connect.
    tmp = _socket.socket(endpoint.family, _socket_mod.SOCK_STREAM, 0, fileno=fd)
    try:
        tmp.settimeout(deadline.remaining())
        tmp.connect(endpoint.sockaddr)
        if not endpoint.is_unix:
            # The hop to the gateway must not add Nagle delays of its own; the
            # app's TCP_NODELAY choice is applied to the outbound socket.
            tmp.setsockopt(_socket_mod.IPPROTO_TCP, _socket_mod.TCP_NODELAY, 1)
    finally:
        tmp.detach()


def read_until(
    sock: _StdSocket, wire: Connection, deadline: Deadline, want: type
) -> list[Event]:
    """Read frames (consuming exactly their bytes) until an event of type `want`.

    Returns every event read, the wanted one last. Raises TimeoutError,
    ConnectionError (the gateway hung up) or RemoteProtocolError.
    """
    events: list[Event] = []
    stop = (want, pb.Error, ConnectionClosed)
    saved = sock.gettimeout()
    try:
        while True:
            _StdSocket.settimeout(sock, deadline.remaining())
            try:
                data = _StdSocket.recv(sock, PEEK_SIZE, _MSG_PEEK)
            except TimeoutError as exc:
                raise TimeoutError("timed out") from exc
            done = _take_events(wire, data, events, stop)
            consumed = len(data) - len(wire.trailing_data)
            _consume(sock, consumed)
            if done:
                return events
            if not data:
                raise ConnectionError(errno.ECONNRESET, "tether: gateway closed the stream")
    finally:
        _StdSocket.settimeout(sock, saved)


def read_answer(
    sock: _StdSocket, wire: Connection, deadline: Deadline, want: type
) -> list[Event]:
    """read_until() on a socket whose fd is in step with its timeout, which it leaves alone.

    No settimeout() pair (two ioctls): the wait is a poll() on the deadline,
    then a peek, and the frames' bytes are dropped without a second wait.
    """
    events: list[Event] = []
    stop = (want, pb.Error, ConnectionClosed)
    fd = sock.fileno()
    timeout = sock.gettimeout()
    # A socket with a timeout has CPython's recv() wait by that timeout, not
    # by the deadline, so the deadline is waited on first; a non-blocking
    # one (timeout 0) peeks first, as its pending answer is usually there.
    wait_first = deadline.at is not None and timeout != 0.0
    while True:
        if wait_first:
            wait_readable(fd, deadline)
        try:
            data = _StdSocket.recv(sock, PEEK_SIZE, _MSG_PEEK)
        except BlockingIOError:
            wait_readable(fd, deadline)
            continue
        except TimeoutError as exc:
            raise TimeoutError("timed out") from exc
        done = _take_events(wire, data, events, stop)
        consumed = len(data) - len(wire.trailing_data)
        if consumed:
            _drop(sock, fd, timeout, consumed, deadline)
        if done:
            return events
        if not data:
            raise ConnectionError(errno.ECONNRESET, "tether: gateway closed the stream")


def _take_events(
    wire: Connection, data: bytes, events: list[Event], stop: tuple[type, ...]
) -> bool:
    """Feed `data` to the wire and append its events; True once one of `stop` is in."""
    wire.receive_data(data)
    while True:
        event = wire.next_event()
        if event is NEED_DATA or event is PAUSED:
            return False  # PAUSED never happens on the client side
        assert not isinstance(event, _Sentinel)
        events.append(event)
        if isinstance(event, stop):
            return True
        if isinstance(event, pb.ServerHello) and event.HasField("error"):
            return True


def wait_readable(fd: int, deadline: Deadline) -> None:
    """Wait until `fd` is readable (or hung up, or failed); TimeoutError at the deadline."""
    remaining = deadline.remaining()
    if not readable(fd, None if remaining is None else remaining * 1000.0):
        raise TimeoutError("timed out")


def readable(fd: int, wait_ms: float | None = 0) -> bool:
    """Whether `fd` is readable (or hung up, or failed) within `wait_ms` (None: forever).

    poll(), not select(): select() refuses descriptors of FD_SETSIZE (1024)
    and above, which a busy process's sockets reach. poll() retries EINTR
    with the time left (PEP 475).
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(wait_ms))


def _drop(
    sock: _StdSocket, fd: int, timeout: float | None, n: int, deadline: Deadline
) -> None:
    """Drop exactly n bytes that a peek has shown are queued, without a poll() first."""
    while n > 0:
        try:
            if timeout is None:
                # A blocking fd: the flag, not the fd's mode, keeps this from blocking.
                chunk = _StdSocket.recv(sock, min(n, PEEK_SIZE), _MSG_DONTWAIT)
            else:
                # The fd is non-blocking; CPython's recv() would poll() first.
                chunk = os.read(fd, min(n, PEEK_SIZE))
        except BlockingIOError:
            wait_readable(fd, deadline)  # only if another reader took them meanwhile
            continue
        if not chunk:
            raise ConnectionError(errno.ECONNRESET, "tether: gateway closed the stream")
        n -= len(chunk)


def _consume(sock: _StdSocket, n: int) -> None:
    """Drop exactly n bytes that a peek has shown are already queued."""
    while n > 0:
        chunk = _StdSocket.recv(sock, min(n, PEEK_SIZE))
        if not chunk:
            raise ConnectionError(errno.ECONNRESET, "tether: gateway closed the stream")
        n -= len(chunk)


def send_all(sock: _StdSocket, data: bytes, deadline: Deadline) -> None:
    saved = sock.gettimeout()
    try:
        _StdSocket.settimeout(sock, deadline.remaining())
        _StdSocket.sendall(sock, data)
    except TimeoutError as exc:
        raise TimeoutError("timed out") from exc
    finally:
        _StdSocket.settimeout(sock, saved)


def send_now(sock: _StdSocket, data: bytes, deadline: Deadline) -> None:
    """send_all() on a socket whose fd is in step with its timeout, which it leaves alone.

    A request is small and a fresh stream's send buffer empty, so one
    non-blocking send normally takes it all: no settimeout() pair (two
    ioctls) and no poll(). What it leaves goes through send_all().
    """
    try:
        if sock.gettimeout() is None:
            # A blocking fd: the flag keeps this one send from blocking.
            sent = _StdSocket.send(sock, data, _MSG_DONTWAIT)
        else:
            # The fd is non-blocking; CPython's send() would poll() first.
            sent = os.write(sock.fileno(), data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        send_all(sock, data[sent:], deadline)


def new_wire() -> Connection:
    return Connection(Role.CLIENT)


__all__ = [
    "Deadline",
    "RemoteProtocolError",
    "connect_fd",
    "hello",
    "new_wire",
    "read_answer",
    "read_until",
    "readable",
    "send_all",
    "send_now",
    "wait_readable",
]
