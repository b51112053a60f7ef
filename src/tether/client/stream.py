"""Blocking I/O for the client side of the wire protocol.

The app's socket must carry exactly the remote byte stream once connected,
so the frames in front of it are read with MSG_PEEK and then consumed to
the byte: whatever the peer sent right behind the ConnectResult (an SMTP
greeting, say) stays in the kernel for the app's own recv() and select().
"""

from __future__ import annotations

import _socket
import errno
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
    pb,
)
from tether.wire.protocol import _Sentinel

_StdSocket = _socket_mod.socket
PEEK_SIZE = 64 * 1024  # one peek holds the hello answer and any connect result


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


def hello(settings: Settings) -> pb.ClientHello:
    return pb.ClientHello(
        protocol_version=PROTOCOL_VERSION,
        app=settings.app,
        key=settings.key,
        client_version=__version__,
    )


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
    saved = sock.gettimeout()
    try:
        while True:
            _StdSocket.settimeout(sock, deadline.remaining())
            try:
                data = _StdSocket.recv(sock, PEEK_SIZE, _socket_mod.MSG_PEEK)
            except TimeoutError as exc:
                raise TimeoutError("timed out") from exc
            wire.receive_data(data)
            done = False
            while True:
                event = wire.next_event()
                if event is NEED_DATA or event is PAUSED:
                    break  # PAUSED never happens on the client side
                assert not isinstance(event, _Sentinel)
                events.append(event)
                if isinstance(event, want | pb.Error | ConnectionClosed):
                    done = True
                    break
                if isinstance(event, pb.ServerHello) and event.HasField("error"):
                    done = True
                    break
            consumed = len(data) - len(wire.trailing_data)
            _consume(sock, consumed)
            if done:
                return events
            if not data:
                raise ConnectionError(errno.ECONNRESET, "tether: gateway closed the stream")
    finally:
        _StdSocket.settimeout(sock, saved)


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


def new_wire() -> Connection:
    return Connection(Role.CLIENT)


__all__ = [
    "Deadline",
    "RemoteProtocolError",
    "connect_fd",
    "hello",
    "new_wire",
    "read_until",
    "send_all",
]
