"""The per-process control stream: lookups and options on open sockets.

A data stream carries only the remote bytes once connected, so requests
about a socket (setsockopt after connect) and name lookups go over one
framed stream per (gateway, app) per process, opened on first use, guarded
by a lock, reopened after a fork or when the gateway has gone away.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket as _socket_mod
import threading

from tether.client.errors import gateway_error, unreachable
from tether.client.settings import Settings
from tether.client.stream import Deadline, connect_fd, new_wire, read_until, send_all, send_hello
from tether.wire import Connection, ConnectionClosed, RemoteProtocolError, pb

_StdSocket = _socket_mod.socket

# Lookups in the stdlib block without a timeout; a gateway that stops
# answering must still not hang the app forever. 30 s is above glibc's
# default resolver budget (5 s x 2 attempts x up to 3 servers).
REQUEST_TIMEOUT = 30.0


class ControlChannel:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._sock: _StdSocket | None = None
        self._wire: Connection | None = None
        self._ids = itertools.count(1)
        self._pid = os.getpid()

    def request(self, req: pb.Request, timeout: float = REQUEST_TIMEOUT) -> pb.Response:
        """Send one request and wait for its response; errors become OSError."""
        with self._lock:
            if self._pid != os.getpid():
                # After fork the stream belongs to the parent: never share it.
                self._sock = None
                self._pid = os.getpid()
            for attempt in (1, 2):
                fresh = self._sock is None
                try:
                    if fresh:
                        self._open(Deadline(timeout))
                    return self._roundtrip(req, Deadline(timeout))
                except (ConnectionError, BrokenPipeError) as exc:
                    self._close()
                    # A stream that was fine before may have been closed by a
                    # gateway restart: one retry on a fresh stream.
                    if fresh or attempt == 2:
                        raise
                    del exc
                except BaseException:
                    self._close()
                    raise
        raise AssertionError("unreachable")

    def _open(self, deadline: Deadline) -> None:
        endpoint = self.settings.gateway
        sock = _StdSocket(endpoint.family, _socket_mod.SOCK_STREAM)
        try:
            connect_fd(sock.fileno(), self.settings, deadline)
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            raise unreachable(str(endpoint), exc) from exc
        wire = new_wire()
        try:
            send_all(sock, send_hello(wire, self.settings), deadline)
            events = read_until(sock, wire, deadline, pb.ServerHello)
        except BaseException:
            sock.close()
            raise
        last = events[-1]
        if isinstance(last, pb.ServerHello) and last.HasField("error"):
            sock.close()
            raise gateway_error(last.error, str(endpoint))
        if not isinstance(last, pb.ServerHello):
            sock.close()
            raise _closed(last, str(endpoint))
        self._sock, self._wire = sock, wire

    def _roundtrip(self, req: pb.Request, deadline: Deadline) -> pb.Response:
        assert self._sock is not None and self._wire is not None
        req.id = next(self._ids)
        try:
            send_all(self._sock, self._wire.send(req), deadline)
            events = read_until(self._sock, self._wire, deadline, pb.Response)
        except RemoteProtocolError as exc:
            raise ConnectionError(
                errno.EPROTO, f"tether: gateway broke the protocol: {exc}"
            ) from exc
        last = events[-1]
        if not isinstance(last, pb.Response):
            raise _closed(last, str(self.settings.gateway))
        if last.HasField("error"):
            raise gateway_error(last.error, str(self.settings.gateway))
        return last

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._wire = None

    def close(self) -> None:
        with self._lock:
            self._close()


def _closed(event: object, gateway: str) -> OSError:
    if isinstance(event, pb.Error):
        return gateway_error(event, gateway)
    if isinstance(event, ConnectionClosed):
        return ConnectionError(errno.ECONNRESET, f"tether: gateway {gateway} closed the stream")
    return ConnectionError(errno.EPROTO, f"tether: unexpected answer from gateway {gateway}")


_channels: dict[Settings, ControlChannel] = {}
_channels_lock = threading.Lock()


def channel(settings: Settings) -> ControlChannel:
    with _channels_lock:
        ch = _channels.get(settings)
        if ch is None:
            ch = _channels[settings] = ControlChannel(settings)
        return ch


def close_all() -> None:
    """Close every control stream of this process (uninstall(); they reopen on use)."""
    with _channels_lock:
        channels = list(_channels.values())
        _channels.clear()
    for ch in channels:
        ch.close()


def _after_fork() -> None:
    global _channels_lock
    _channels_lock = threading.Lock()
    for ch in _channels.values():
        ch._lock = threading.Lock()  # a lock held at fork time would never be released
        if ch._sock is not None:
            # Only this process's copy of the fd: the parent's stream stays open.
            with contextlib.suppress(OSError):
                ch._sock.close()
        ch._sock = None
        ch._wire = None
        ch._pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)
