"""Blocking I/O for the client side of the wire protocol: the driver of an Exchange.

tether.client.exchange decides what a gateway stream's bytes mean; this
module moves them. The app's socket must carry exactly the remote byte
stream once connected, so the frames in front of it are read with MSG_PEEK
and then consumed to the byte: whatever the peer sent right behind the
ConnectResult (an SMTP greeting, say) stays in the kernel for the app's own
recv() and select().
"""

from __future__ import annotations

import _socket
import os
import select
import socket as _socket_mod
import time

from tether.client.errors import closed, unreachable
from tether.client.exchange import Answer, Exchange
from tether.client.settings import Settings

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


def open_stream(settings: Settings, deadline: Deadline) -> _StdSocket:
    """A new stream connected to the gateway (for the control stream and UDP associations)."""
    endpoint = settings.gateway
    sock = _StdSocket(endpoint.family, _socket_mod.SOCK_STREAM)
    try:
        connect_fd(sock.fileno(), settings, deadline)
    except OSError as exc:
        sock.close()
        if isinstance(exc, TimeoutError):
            raise
        raise unreachable(endpoint, exc) from exc
    # connect_fd() left the fd non-blocking; back in step with the socket's
    # timeout (None: blocking), as read_answer() and send_now() expect.
    _StdSocket.settimeout(sock, None)
    return sock


def roundtrip(sock: _StdSocket, exchange: Exchange, data: bytes, deadline: Deadline) -> Answer:
    """Send `data` (made by `exchange`) and read the answer it awaits."""
    send_now(sock, data, deadline)
    return read_answer(sock, exchange, deadline)


def read_answer(sock: _StdSocket, exchange: Exchange, deadline: Deadline) -> Answer:
    """Read frames, consuming exactly their bytes, until `exchange` has its answer.

    Raises what the exchange raises (a refusal, an Error frame, a closed
    or out-of-protocol stream), or TimeoutError at the deadline. Leaves the
    socket's timeout alone: no settimeout() pair (two ioctls); the wait is
    a poll() on the deadline, then a peek, and the frames' bytes are dropped
    without a second wait.
    """
    wire = exchange.wire
    receive = exchange.receive
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
        try:
            answer = receive(data)
        finally:
            # Consumed even when the answer is a refusal: the stream may carry
            # another request (the exchange's in_step).
            consumed = len(data) - len(wire.trailing_data)
            if consumed:
                _drop(sock, fd, timeout, consumed, deadline, exchange)
        if answer is not None:
            return answer


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
    sock: _StdSocket,
    fd: int,
    timeout: float | None,
    n: int,
    deadline: Deadline,
    exchange: Exchange,
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
            raise closed(exchange.gateway)
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


__all__ = [
    "Deadline",
    "connect_fd",
    "open_stream",
    "read_answer",
    "readable",
    "roundtrip",
    "send_all",
    "send_now",
    "wait_readable",
]
