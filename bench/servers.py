"""The benchmark's target servers, in a process of their own: ``python -m bench.servers``.

Four loopback listeners, each built so that it is not the bottleneck:

- ``source``: reads an 8-byte big-endian size, then sends that many bytes
  (``sendall`` of a reused 1 MiB buffer, a thread per connection: the loop
  runs in C with the GIL released);
- ``sink``: reads an 8-byte size, reads that many bytes into a reused
  buffer (``recv_into``), answers one byte;
- ``echo``: sends back whatever it receives (a thread per connection, so a
  round trip is one blocking recv and one send, no event loop in between);
- ``greet``: writes one byte on accept and closes (asyncio with uvloop:
  cheap to accept at tens of thousands per second). The server closes
  first, so the TIME_WAIT state stays on its side: thousands of
  connections a second would otherwise leave the proxies' outbound ports
  (Dante binds each one explicitly) in TIME_WAIT and exhaust them;
- ``hello``: writes one byte on accept, then holds the connection idle
  until the client sends anything (it then closes first, for the same
  reason) or closes.

Prints one JSON line ``{"source": PORT, ...}`` when ready; exits when its
stdin closes (the suite went away), on SIGTERM, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable

CHUNK = 1 << 20
_HEADER = struct.Struct("!Q")
_PAYLOAD = memoryview(bytes(CHUNK))


def _read_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed early")
        data += chunk
    return data


def _drain_to_eof(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


def _source(conn: socket.socket) -> None:
    (size,) = _HEADER.unpack(_read_exact(conn, _HEADER.size))
    left = size
    while left > 0:
        n = min(left, CHUNK)
        conn.sendall(_PAYLOAD[:n])
        left -= n
    _drain_to_eof(conn)


def _sink(conn: socket.socket) -> None:
    (size,) = _HEADER.unpack(_read_exact(conn, _HEADER.size))
    buf = memoryview(bytearray(CHUNK))
    left = size
    while left > 0:
        n = conn.recv_into(buf, min(left, CHUNK))
        if n == 0:
            raise ConnectionError("peer closed early")
        left -= n
    conn.sendall(b"k")
    _drain_to_eof(conn)


def _echo(conn: socket.socket) -> None:
    buf = memoryview(bytearray(65536))
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            return
        conn.sendall(buf[:n])


def _serve_threaded(listener: socket.socket, handler: Callable[[socket.socket], None],
                    stop: threading.Event) -> None:
    listener.settimeout(0.5)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_run, args=(handler, conn), daemon=True).start()


def _run(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        handler(conn)


class _Greet(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"!")  # type: ignore[attr-defined]
        transport.close()  # after the byte is written


class _Hello(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"!")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.transport.close()

    def eof_received(self) -> bool:
        return False  # close our side too


def _listener() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(4096)
    return s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument("--max-seconds", type=float, default=4 * 3600)
    args = parser.parse_args(argv)
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = threading.Event()
    ports: dict[str, int] = {}
    threads = []
    for name, handler in (("source", _source), ("sink", _sink), ("echo", _echo)):
        listener = _listener()
        ports[name] = listener.getsockname()[1]
        t = threading.Thread(target=_serve_threaded, args=(listener, handler, stop), daemon=True)
        t.start()
        threads.append((t, listener))
    servers = []
    for name, factory in (("greet", _Greet), ("hello", _Hello)):
        sock = _listener()
        ports[name] = sock.getsockname()[1]
        servers.append(loop.run_until_complete(
            loop.create_server(factory, sock=sock, backlog=4096)))

    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)

    def _stdin_closed() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            loop.remove_reader(sys.stdin.fileno())
            done.set()

    loop.add_reader(sys.stdin.fileno(), _stdin_closed)
    print(json.dumps(ports), flush=True)

    async def _wait() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), args.max_seconds)

    loop.run_until_complete(_wait())
    stop.set()
    for server in servers:
        server.close()
    for _, listener in threads:
        listener.close()
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
