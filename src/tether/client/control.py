"""The per-process control stream: lookups and options on open sockets.

A data stream carries only the remote bytes once connected, so requests
about a socket (setsockopt after connect) and name lookups go over one
framed stream per (gateway, app) per process, opened on first use, guarded
by a lock, reopened after a fork or when the gateway has gone away.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket as _socket_mod
import threading

from tether.client.exchange import Exchange
from tether.client.settings import Settings
from tether.client.stream import Deadline, open_stream, roundtrip
from tether.wire import pb

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
        self._exchange: Exchange | None = None
        self._ids = itertools.count(1)
        self._pid = os.getpid()

    def request(self, req: pb.Request, timeout: float = REQUEST_TIMEOUT) -> pb.Response:
        """Send one request and wait for its response; errors become OSError."""
        with self._lock:
            if self._pid != os.getpid():
                # After fork the stream belongs to the parent: never share it.
                self._sock, self._exchange = None, None
                self._pid = os.getpid()
            for attempt in (1, 2):
                fresh = self._sock is None
                try:
                    return self._roundtrip(req, Deadline(timeout))
                except BaseException as exc:
                    if self._exchange is not None and self._exchange.in_step:
                        raise  # the gateway's answer: a refusal, on a stream still good
                    self._close()
                    # A stream that was fine before may have been closed by a
                    # gateway restart: one retry on a fresh stream.
                    if fresh or attempt == 2 or not isinstance(exc, ConnectionError):
                        raise
                    del exc
        raise AssertionError("unreachable")

    def _roundtrip(self, req: pb.Request, deadline: Deadline) -> pb.Response:
        """`req` on the stream, opened first if need be (the hello pipelined ahead)."""
        req.id = next(self._ids)
        if self._sock is None:
            self._sock = open_stream(self.settings, deadline)
            exchange = self._exchange = Exchange(self.settings.gateway)
            data = exchange.open(self.settings) + exchange.send(req)
        else:
            assert self._exchange is not None
            exchange = self._exchange
            data = exchange.send(req)
        answer = roundtrip(self._sock, exchange, data, deadline)
        assert isinstance(answer, pb.Response)
        return answer

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._exchange = None

    def close(self) -> None:
        with self._lock:
            self._close()


_channels: dict[Settings, ControlChannel] = {}
_channels_lock = threading.Lock()


def channel(settings: Settings) -> ControlChannel:
    with _channels_lock:
        ch = _channels.get(settings)
        if ch is None:
            ch = _channels[settings] = ControlChannel(settings)
        return ch


def close_all(*, wait: bool = True) -> None:
    """Close every control stream of this process (uninstall(); they reopen on use).

    With wait=False (at interpreter exit) a stream in use by another thread
    (a daemon thread mid-lookup) is left alone rather than waited for.
    """
    with _channels_lock:
        channels = list(_channels.values())
        _channels.clear()
    for ch in channels:
        if wait:
            ch.close()
        elif ch._lock.acquire(blocking=False):
            try:
                ch._close()
            finally:
                ch._lock.release()


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
        ch._exchange = None
        ch._pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)
