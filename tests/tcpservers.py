"""Small threaded TCP servers on loopback for the tests (importable as `tcpservers`).

Every server listens on 127.0.0.1 (or ::1) on an ephemeral port and serves
each accepted connection in its own thread with one *handler*. The servers
use the stdlib's own socket class (captured from the MRO, so it is the real
one even while tether is installed): their listening and accepted sockets
never go through the gateway. Handlers never raise into the thread machinery
(that would be an unhandled-thread-exception error under pytest); failures
are collected in ``Server.errors`` for the test to look at.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trustme
from support import Running, StdSocket

MiB = 1024 * 1024
CONN_TIMEOUT = 30.0  # no server thread may block longer than this on one call
STOP_TIMEOUT = 10.0

Handler = Callable[["Server", socket.socket], None]


class Server(Running):
    """A listening socket, an accept thread and one thread per connection."""

    def __init__(
        self,
        handler: Handler,
        *,
        family: int = socket.AF_INET,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        self.tls = tls
        self.family = family
        self.listener = StdSocket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(64)
        self.host = host
        self.port: int = self.listener.getsockname()[1]
        self.results: queue.Queue[Any] = queue.Queue()
        self.errors: list[BaseException] = []
        self.peers: list[tuple[Any, ...]] = []  # the address of every accepted client
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"test-server-{self.port}")

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> Server:
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._acceptor.is_alive():
            self._acceptor.join(STOP_TIMEOUT)
        self.listener.close()
        with self._lock:
            live = list(self._live)
        for conn in live:
            # Wake handlers blocked in recv/send; they close their own sockets.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(STOP_TIMEOUT)

    # -- internals -------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.listener], [], [], 0.05)
            if not ready:
                continue
            try:
                # Not listener.accept(): that builds the accepted socket with
                # the module's `socket` class, which install() replaces.
                fd, addr = self.listener._accept()  # type: ignore[attr-defined]
            except OSError as exc:
                self.errors.append(exc)
                continue
            conn = StdSocket(self.family, socket.SOCK_STREAM, 0, fileno=fd)
            self.peers.append(addr)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name=f"test-conn-{self.port}")
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(CONN_TIMEOUT)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            self.track(conn)
            self.handler(self, conn)
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(exc)
        except BaseException as exc:  # reported through self.errors
            self.errors.append(exc)
        finally:
            self.untrack(conn)
            conn.close()

    def track(self, conn: socket.socket) -> None:
        with self._lock:
            self._live.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._live.discard(conn)

    def result(self, timeout: float = 10.0) -> Any:
        return self.results.get(timeout=timeout)


# -- handlers --------------------------------------------------------------------


def _chunks(conn: socket.socket) -> Iterator[memoryview]:
    """What `conn` receives, to its EOF, in one reused buffer."""
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    while n := conn.recv_into(buf):
        yield view[:n]


def echo(server: Server, conn: socket.socket) -> None:
    """Send back everything; pass the client's EOF on as our own."""
    for chunk in _chunks(conn):
        conn.sendall(chunk)
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)


def sink(server: Server, conn: socket.socket) -> None:
    """Read to EOF, then answer "<count> <sha256>\\n" (and report the same)."""
    digest = hashlib.sha256()
    total = 0
    for chunk in _chunks(conn):
        digest.update(chunk)
        total += len(chunk)
    server.results.put((total, digest.hexdigest()))
    # Still sending after the client's half-close.
    conn.sendall(f"{total} {digest.hexdigest()}\n".encode())


def source(size: int, chunk: int = MiB) -> Handler:
    """Send `size` random bytes as fast as possible, then report (size, sha256)."""

    def handler(server: Server, conn: socket.socket) -> None:
        digest = hashlib.sha256()
        left = size
        while left:
            block = os.urandom(min(chunk, left))
            digest.update(block)
            conn.sendall(block)
            left -= len(block)
        server.results.put((size, digest.hexdigest()))
        conn.shutdown(socket.SHUT_WR)
        # Wait for the client's close so nothing sent is lost to an RST.
        while conn.recv(65536):
            pass

    return handler


def silent(server: Server, conn: socket.socket) -> None:
    """Accept and say nothing until the client goes away."""
    while conn.recv(65536):
        pass


def whoami(server: Server, conn: socket.socket) -> None:
    """Say which address the connection comes from, then echo."""
    host, port = conn.getpeername()[:2]
    conn.sendall(f"{host} {port}\n".encode())
    echo(server, conn)


def greet_and_half_close(server: Server, conn: socket.socket) -> None:
    """Send a greeting and our FIN at once; then report everything the client sends."""
    conn.sendall(b"hello from the server\n")
    conn.shutdown(socket.SHUT_WR)
    got = bytearray()
    while chunk := conn.recv(65536):
        got += chunk
    server.results.put(bytes(got))


def http_page(body: bytes) -> Handler:
    """A web server in one handler: any request gets 200 and `body`, then the connection closes."""

    def handler(server: Server, conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                return
            request += chunk
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        conn.sendall(head % len(body) + body)

    return handler


def read_line(conn: socket.socket, limit: int = 4096) -> bytes:
    """One line, read a byte at a time so nothing after it is consumed."""
    line = bytearray()
    while not line.endswith(b"\n") and len(line) < limit:
        b = conn.recv(1)
        if not b:
            break
        line += b
    return bytes(line)


def starttls(context: ssl.SSLContext) -> Handler:
    """Plain "HELLO"/"STARTTLS" lines first, then TLS and echo on the same connection."""

    def handler(server: Server, conn: socket.socket) -> None:
        if read_line(conn) != b"HELLO\r\n":
            raise AssertionError("expected HELLO")
        conn.sendall(b"HELLO plain\r\n")
        if read_line(conn) != b"STARTTLS\r\n":
            raise AssertionError("expected STARTTLS")
        conn.sendall(b"OK go ahead\r\n")
        tls = context.wrap_socket(conn, server_side=True)  # takes conn's fd over
        server.track(tls)
        try:
            echo(server, tls)
        finally:
            server.untrack(tls)
            tls.close()

    return handler


# -- TLS material ----------------------------------------------------------------


class TLSMaterial:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1 / ::1."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("localhost", "127.0.0.1", "::1")
        self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.server)
        self.cafile = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.cafile))


# -- measuring the gateway ---------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, step: float = 0.02) -> Any:
    """Poll until predicate() is truthy (bounded); returns its last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(step)
        value = predicate()
    return value


@contextlib.contextmanager
def serving(handler: Handler, **kwargs: Any) -> Iterator[Server]:
    with Server(handler, **kwargs) as server:
        yield server
