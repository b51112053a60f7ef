"""The floor: the least a Python asyncio+uvloop relay can cost on this machine.

``python -m bench.floor`` is a relay with nothing of Tether's on it: no
authentication, no policy, no metering, no audit log, no handoff. The client
sends the target port (2 bytes), the relay connects to 127.0.0.1:PORT and
answers one byte, then relays both ways with flow control (pause/resume)
and half-close, as Tether's relay does. Its figures, from the same run, show
how much of Tether's cost is the event loop and the kernel (two hops instead
of one) and how much is Tether's own work; see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import struct
import sys
from pathlib import Path as FsPath
from typing import Any, cast

from bench.procs import Child, Pinning, free_port, port_open, python, python_env, wait_until

_PORT = struct.Struct("!H")
ACK = b"\x00"


class _Half(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Half | None = None
        self.held: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.other is not None
        if self.other.transport is None:
            self.held.append(data)
        else:
            self.other.transport.write(data)

    def eof_received(self) -> bool:
        assert self.other is not None
        if self.other.transport is not None and self.other.transport.can_write_eof():
            self.other.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()


class _Front(asyncio.Protocol):
    """A new client stream: read the port, connect, ack, then become a relay half."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= _PORT.size:
            self.transport.pause_reading()
            (port,) = _PORT.unpack_from(self.buf)
            self.task = asyncio.ensure_future(self._connect(port, self.buf[_PORT.size :]))

    async def _connect(self, port: int, early: bytes) -> None:
        loop = asyncio.get_running_loop()
        app, peer = _Half(), _Half()
        app.other, peer.other = peer, app
        try:
            await loop.create_connection(lambda: peer, "127.0.0.1", port)
        except OSError:
            self.transport.close()
            return
        self.transport.write(ACK)
        self.transport.set_protocol(app)
        app.connection_made(self.transport)
        for chunk in peer.held:
            self.transport.write(chunk)
        if early:
            app.data_received(early)
        self.transport.resume_reading()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(_Front, "127.0.0.1", args.port, backlog=4096)
    )
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    loop.run_until_complete(done.wait())
    server.close()
    return 0


class FloorRelay:
    """A running floor relay child on 127.0.0.1:`port`."""

    def __init__(self, workdir: FsPath, pinning: Pinning, tag: str = "") -> None:
        self.port = free_port()
        self.log_path = workdir / f"floor{tag}.log"
        self._log = self.log_path.open("w")
        self.child = Child(
            "floor",
            [python(), "-m", "bench.floor", "--port", str(self.port)],
            pinning=pinning,
            env=python_env(),
            stdout=self._log,
            stderr=self._log,
            cwd=FsPath(__file__).resolve().parent.parent,
        )

    @property
    def pid(self) -> int:
        return self.child.pid

    def wait_ready(self, timeout: float = 20.0) -> None:
        wait_until(lambda: port_open(self.port), timeout, "floor relay", alive=self.child.alive)

    def stop(self) -> None:
        self.child.stop()
        self._log.close()


def open_through(relay_port: int, port: int, timeout: float) -> Any:
    """A plain socket connected through the floor relay to 127.0.0.1:`port`."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect(("127.0.0.1", relay_port))
        s.sendall(_PORT.pack(port))
        ack = s.recv(1)
    except BaseException:
        s.close()
        raise
    if ack != ACK:
        s.close()
        raise ConnectionError(f"floor relay could not connect to port {port}")
    return s


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
