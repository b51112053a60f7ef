"""Socket semantics of tether sockets through a real gateway process.

Each test talks to a small threaded server on loopback (tests/integration/
_servers.py) through the session's `tether serve` child. The servers are
the stdlib's sockets; only the client side is tether's. Nothing here talks
to anything but 127.0.0.1 / ::1.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import select
import selectors
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from support import Gateway, gateway_config, start_gateway
from tcpservers import (
    MiB,
    Server,
    StdSocket,
    TLSMaterial,
    echo,
    greet_and_half_close,
    read_line,
    rss_bytes,
    silent,
    sink,
    source,
    starttls,
    wait_for,
    whoami,
)

import tether
from tether.client.sock import socket as TetherSocket

TIMEOUT = 10.0  # generous per-operation ceiling; no test should get near it


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture
def echo_server() -> Iterator[Server]:
    with Server(echo) as server:
        yield server


@pytest.fixture
def silent_server() -> Iterator[Server]:
    with Server(silent) as server:
        yield server


@pytest.fixture
def sink_server() -> Iterator[Server]:
    with Server(sink) as server:
        yield server


@pytest.fixture
def whoami_server() -> Iterator[Server]:
    with Server(whoami) as server:
        yield server


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, never listening."""
    holder = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    return TLSMaterial(tmp_path_factory.mktemp("tls"))


def _connect(port: int, host: str = "127.0.0.1", timeout: float = TIMEOUT) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    assert isinstance(sock, TetherSocket)  # the patched module really made it
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


def _relay_is_up(sock: socket.socket) -> None:
    """One echo round trip: the gateway has finished setting up this socket's relay.

    (It resumes reading the app's stream only at the very end of that setup.)
    """
    sock.sendall(b"?")
    assert _recv_exactly(sock, 1) == b"?"


def _hop(sock: socket.socket) -> tuple[object, ...]:
    """The kernel's own view of the fd: the hop to the gateway."""
    return StdSocket.getsockname(sock)


def _gateway_addr(gateway: Gateway) -> tuple[str, int]:
    host, _, port = gateway.address.rpartition(":")
    return host.strip("[]"), int(port)


def _audit(gateway: Gateway, event: str) -> list[dict[str, object]]:
    records = []
    for line in gateway.log_text().splitlines():
        if "tether.audit" not in line or f'"event":"{event}"' not in line:
            continue
        records.append(json.loads(line[line.index("{"):]))
    return records


# -- readiness: select, selectors, poll ----------------------------------------------


def test_select_readiness(tethered: Gateway, echo_server: Server) -> None:
    with _connect(echo_server.port) as sock:
        r, w, _ = select.select([sock], [sock], [], 0.3)
        # Connected: writable; nothing sent yet, so not readable (the gateway's
        # answer frames were consumed to the byte).
        assert w == [sock]
        assert r == []
        sock.sendall(b"ping")
        r, _, _ = select.select([sock], [], [], TIMEOUT)
        assert r == [sock]
        assert _recv_exactly(sock, 4) == b"ping"
        r, _, _ = select.select([sock], [], [], 0.2)
        assert r == []


def test_selectors_readiness(tethered: Gateway, echo_server: Server) -> None:
    with _connect(echo_server.port) as sock, selectors.DefaultSelector() as sel:
        key = sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        events = sel.select(0.3)
        assert [(k.fileobj, mask) for k, mask in events] == [(sock, selectors.EVENT_WRITE)]
        sel.modify(sock, selectors.EVENT_READ)
        assert sel.select(0.2) == []
        sock.sendall(b"hello")
        events = sel.select(TIMEOUT)
        assert [(k.fd, mask) for k, mask in events] == [(key.fd, selectors.EVENT_READ)]
        assert _recv_exactly(sock, 5) == b"hello"


def test_poll_readiness(tethered: Gateway, echo_server: Server) -> None:
    with _connect(echo_server.port) as sock:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLOUT)
        assert poller.poll(300) == [(sock.fileno(), select.POLLOUT)]
        poller.modify(sock, select.POLLIN)
        assert poller.poll(200) == []
        sock.sendall(b"x" * 100)
        events = poller.poll(int(TIMEOUT * 1000))
        assert events
        assert events[0][0] == sock.fileno()
        assert events[0][1] & select.POLLIN
        assert _recv_exactly(sock, 100) == b"x" * 100


def test_peer_close_makes_the_socket_readable_with_eof(
    tethered: Gateway, sink_server: Server
) -> None:
    with _connect(sink_server.port) as sock:
        sock.shutdown(socket.SHUT_WR)
        r, _, _ = select.select([sock], [], [], TIMEOUT)
        assert r == [sock]
        assert _recv_all(sock).startswith(b"0 ")  # the sink's answer, then EOF


# -- timeouts and blocking modes -------------------------------------------------------


def test_recv_timeout_on_a_silent_peer(tethered: Gateway, silent_server: Server) -> None:
    assert socket.timeout is TimeoutError
    with _connect(silent_server.port) as sock:
        sock.settimeout(0.5)
        assert sock.gettimeout() == 0.5
        assert sock.getblocking() is True
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert 0.3 <= time.monotonic() - start <= 3.0
        # A timeout does not break the socket.
        sock.settimeout(TIMEOUT)
        sock.sendall(b"still open")


def test_nonblocking_recv_raises_blocking_io_error(
    tethered: Gateway, silent_server: Server
) -> None:
    with _connect(silent_server.port) as sock:
        sock.setblocking(False)
        assert sock.gettimeout() == 0.0
        assert sock.getblocking() is False
        with pytest.raises(BlockingIOError):
            sock.recv(1)
        sock.setblocking(True)
        assert sock.gettimeout() is None
        assert sock.getblocking() is True


def test_setdefaulttimeout_applies_to_new_tether_sockets(
    tethered: Gateway, silent_server: Server
) -> None:
    saved = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.5)
    try:
        sock = socket.socket()
    finally:
        socket.setdefaulttimeout(saved)
    with sock:
        assert isinstance(sock, TetherSocket)
        assert sock.gettimeout() == 0.5
        sock.connect(("127.0.0.1", silent_server.port))
        assert sock.gettimeout() == 0.5  # connect() keeps the app's timeout
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert 0.3 <= time.monotonic() - start <= 3.0


def test_create_connection_passes_the_timeout_through(
    tethered: Gateway, silent_server: Server
) -> None:
    with socket.create_connection(("localhost", silent_server.port), timeout=0.6) as sock:
        assert isinstance(sock, TetherSocket)
        assert sock.gettimeout() == 0.6
        assert sock.getpeername() == ("127.0.0.1", silent_server.port)
        with pytest.raises(TimeoutError):
            sock.recv(1)
    with socket.create_connection(("localhost", silent_server.port)) as sock:
        assert sock.gettimeout() is None  # no timeout given: blocking, like the stdlib


# -- connect failures ------------------------------------------------------------------


def test_connect_to_a_refused_port(tethered: Gateway, refused_port: int) -> None:
    with socket.socket() as sock:
        sock.settimeout(TIMEOUT)
        with pytest.raises(ConnectionRefusedError) as info:
            sock.connect(("127.0.0.1", refused_port))
        assert info.value.errno == errno.ECONNREFUSED
        assert str(refused_port) in str(info.value)
    with socket.socket() as sock:
        sock.settimeout(TIMEOUT)
        assert sock.connect_ex(("127.0.0.1", refused_port)) == errno.ECONNREFUSED


def test_socket_can_connect_again_after_a_refusal(
    tethered: Gateway, refused_port: int, echo_server: Server
) -> None:
    # Linux lets a TCP socket connect again after a refused attempt.
    with socket.socket() as sock:
        sock.settimeout(TIMEOUT)
        assert sock.connect_ex(("127.0.0.1", refused_port)) == errno.ECONNREFUSED
        with pytest.raises(OSError, match="not connected"):
            sock.getpeername()
        sock.connect(("127.0.0.1", echo_server.port))
        sock.sendall(b"again")
        assert _recv_exactly(sock, 5) == b"again"
        assert sock.getpeername() == ("127.0.0.1", echo_server.port)


def test_denied_port_raises_permission_error_naming_port_and_rule(tethered: Gateway) -> None:
    # Port 25 on loopback: denied by the default table before anything is sent.
    with socket.socket() as sock:
        sock.settimeout(TIMEOUT)
        with pytest.raises(PermissionError) as info:
            sock.connect(("127.0.0.1", 25))
    message = str(info.value)
    assert info.value.errno == errno.EACCES
    assert "port 25" in message
    assert "127.0.0.1:25" in message
    assert "rule: deny port 25" in message
    denied = [d for d in _audit(tethered, "decision")
              if d["port"] == 25 and d["verdict"] == "deny"]
    assert denied


def test_connect_ex_on_a_denied_port(tethered: Gateway) -> None:
    with socket.socket() as sock:
        sock.settimeout(TIMEOUT)
        assert sock.connect_ex(("mail.test", 25)) == errno.EACCES


def test_unknown_name_raises_gaierror(tethered: Gateway) -> None:
    # Only the gateway's static table is consulted: no DNS server is asked.
    with socket.socket() as sock:
        sock.settimeout(TIMEOUT)
        with pytest.raises(socket.gaierror) as info:
            sock.connect(("no-such-host.test", 80))
        assert info.value.errno == socket.EAI_NONAME
    with pytest.raises(socket.gaierror) as info2:
        socket.create_connection(("no-such-host.test", 80), timeout=TIMEOUT)
    assert info2.value.errno == socket.EAI_NONAME


# -- non-blocking connect --------------------------------------------------------------


@pytest.mark.parametrize("how", ["connect_ex", "connect"])
def test_nonblocking_connect(tethered: Gateway, echo_server: Server, how: str) -> None:
    with socket.socket() as sock:
        sock.setblocking(False)
        if how == "connect_ex":
            assert sock.connect_ex(("127.0.0.1", echo_server.port)) == errno.EINPROGRESS
        else:
            with pytest.raises(BlockingIOError) as info:
                sock.connect(("127.0.0.1", echo_server.port))
            assert info.value.errno == errno.EINPROGRESS
        _, w, _ = select.select([], [sock], [], TIMEOUT)
        assert w == [sock]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert sock.getpeername() == ("127.0.0.1", echo_server.port)
        assert sock.send(b"nonblocking") == len(b"nonblocking")
        got = b""
        deadline = time.monotonic() + TIMEOUT
        while len(got) < len(b"nonblocking") and time.monotonic() < deadline:
            select.select([sock], [], [], 1.0)
            try:
                got += sock.recv(100)
            except BlockingIOError:
                continue
        assert got == b"nonblocking"


def test_nonblocking_connect_to_a_refused_port(tethered: Gateway, refused_port: int) -> None:
    with socket.socket() as sock:
        sock.setblocking(False)
        assert sock.connect_ex(("127.0.0.1", refused_port)) == errno.EINPROGRESS
        _, w, _ = select.select([], [sock], [], TIMEOUT)
        assert w == [sock]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
        # SO_ERROR is cleared by reading it, as the kernel does.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def test_nonblocking_recv_before_the_answer(tethered: Gateway, echo_server: Server) -> None:
    # Touching the socket before the gateway's answer is read must not lose it.
    with socket.socket() as sock:
        sock.setblocking(False)
        assert sock.connect_ex(("127.0.0.1", echo_server.port)) == errno.EINPROGRESS
        with pytest.raises(BlockingIOError):
            sock.recv(10)  # either "answer not here yet" or "no data yet"
        _, w, _ = select.select([], [sock], [], TIMEOUT)
        assert w == [sock]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        sock.setblocking(True)
        sock.settimeout(TIMEOUT)
        sock.sendall(b"after")
        assert _recv_exactly(sock, 5) == b"after"


def test_blocking_io_after_a_nonblocking_connect_waits_for_it(
    tethered: Gateway, echo_server: Server
) -> None:
    for _ in range(5):
        with socket.socket() as sock:
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", echo_server.port)) == errno.EINPROGRESS
            sock.settimeout(TIMEOUT)  # blocking again: send must wait for the connect
            sock.sendall(b"after")
            assert _recv_exactly(sock, 5) == b"after"


# -- half-close --------------------------------------------------------------------------


def test_client_half_close_reaches_the_server(tethered: Gateway, sink_server: Server) -> None:
    payload = os.urandom(100_000)
    with _connect(sink_server.port) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        # The server saw EOF (it only answers after EOF) and can still send.
        answer = _recv_all(sock)
    assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()
    assert sink_server.result() == (len(payload), hashlib.sha256(payload).hexdigest())


def test_server_half_close_reaches_the_client(tethered: Gateway) -> None:
    with Server(greet_and_half_close) as server, _connect(server.port) as sock:
        assert _recv_all(sock) == b"hello from the server\n"  # then b"": the FIN
        assert sock.recv(10) == b""  # EOF stays EOF
        # The other direction is still open.
        sock.sendall(b"the client can still send")
        sock.shutdown(socket.SHUT_WR)
        assert server.result() == b"the client can still send"


# -- large transfers ---------------------------------------------------------------------


def test_64_mib_each_way_at_once_through_an_echo(tethered: Gateway, echo_server: Server) -> None:
    size, chunk = 64 * MiB, MiB
    sent = hashlib.sha256()
    errors: list[BaseException] = []

    with _connect(echo_server.port, timeout=30.0) as sock:

        def upload() -> None:
            try:
                for _ in range(size // chunk):
                    block = os.urandom(chunk)
                    sent.update(block)
                    sock.sendall(block)
                sock.shutdown(socket.SHUT_WR)
            except BaseException as exc:  # checked below
                errors.append(exc)

        sender = threading.Thread(target=upload, name="upload")
        start = time.monotonic()
        sender.start()
        received = hashlib.sha256()
        total = 0
        buf = bytearray(MiB)
        view = memoryview(buf)
        try:
            while n := sock.recv_into(buf):
                received.update(view[:n])
                total += n
        finally:
            sender.join(60)
        elapsed = time.monotonic() - start
    assert not errors
    assert total == size
    assert received.hexdigest() == sent.hexdigest()
    assert elapsed < 30, f"64 MiB each way took {elapsed:.1f} s"
    # The gateway metered exactly what went through, both ways.
    peer = f"127.0.0.1:{echo_server.port}"
    closes = wait_for(lambda: [c for c in _audit(tethered, "close") if c["peer"] == peer])
    assert closes
    assert closes[-1]["bytes_out"] == size
    assert closes[-1]["bytes_in"] == size


def test_64_mib_download(tethered: Gateway) -> None:
    with Server(source(64 * MiB)) as server, _connect(server.port, timeout=30.0) as sock:
        received = hashlib.sha256()
        total = 0
        buf = bytearray(MiB)
        while n := sock.recv_into(buf):
            received.update(memoryview(buf)[:n])
            total += n
        assert (total, received.hexdigest()) == server.result()


# -- makefile, sendfile -------------------------------------------------------------------


def test_makefile_line_io(tethered: Gateway, echo_server: Server) -> None:
    with _connect(echo_server.port) as sock:
        writer = sock.makefile("wb")
        reader = sock.makefile("rb")
        try:
            lines = [f"line {i} {'x' * i}\n".encode() for i in range(200)]
            for line in lines:
                writer.write(line)
            writer.flush()
            assert [reader.readline() for _ in lines] == lines
            writer.write(b"no newline at the end")
            writer.flush()
            sock.shutdown(socket.SHUT_WR)
            assert reader.read() == b"no newline at the end"
        finally:
            writer.close()
            reader.close()


def test_makefile_text_mode(tethered: Gateway, echo_server: Server) -> None:
    with _connect(echo_server.port) as sock, sock.makefile(
        "rw", encoding="utf-8", newline="\r\n"
    ) as f:
        f.write("grüße\n")  # written as "\r\n"
        f.flush()
        assert f.readline() == "grüße\r\n"


def test_sendfile_arrives_intact(
    tethered: Gateway, sink_server: Server, tmp_path: Path
) -> None:
    data = os.urandom(5 * MiB + 123)
    path = tmp_path / "payload.bin"
    path.write_bytes(data)
    with _connect(sink_server.port) as sock, path.open("rb") as f:
        assert sock.sendfile(f) == len(data)
        sock.shutdown(socket.SHUT_WR)
        answer = _recv_all(sock)
    digest = hashlib.sha256(data).hexdigest()
    assert answer == f"{len(data)} {digest}\n".encode()


def test_sendfile_with_offset_and_count(
    tethered: Gateway, sink_server: Server
) -> None:
    data = os.urandom(4 * MiB)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        with _connect(sink_server.port) as sock:
            assert sock.sendfile(f, offset=1000, count=3 * MiB) == 3 * MiB
            sock.shutdown(socket.SHUT_WR)
            answer = _recv_all(sock)
    part = data[1000:1000 + 3 * MiB]
    assert answer == f"{len(part)} {hashlib.sha256(part).hexdigest()}\n".encode()


# -- TLS ------------------------------------------------------------------------------------


def test_tls_with_verification(tethered: Gateway, tls_material: TLSMaterial) -> None:
    context = ssl.create_default_context(cafile=str(tls_material.cafile))
    with Server(echo, tls=tls_material.server) as server:
        raw = _connect(server.port)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.getpeercert() is not None
            assert tls.version() is not None
            tls.sendall(b"secret")
            assert _recv_exactly(tls, 6) == b"secret"
            # The app sees the real server, the fd is the hop to the gateway.
            assert tls.getpeername() == ("127.0.0.1", server.port)
            assert StdSocket.getpeername(tls) == _gateway_addr(tethered)
        assert not server.errors


def test_tls_wrong_hostname_fails_verification(
    tethered: Gateway, tls_material: TLSMaterial
) -> None:
    context = ssl.create_default_context(cafile=str(tls_material.cafile))
    with Server(echo, tls=tls_material.server) as server:
        raw = _connect(server.port)
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                context.wrap_socket(raw, server_hostname="www.test")
        finally:
            raw.close()


def test_tls_untrusted_ca_fails_verification(
    tethered: Gateway, tls_material: TLSMaterial
) -> None:
    # A CA the server's certificate does not chain to.
    context = ssl.create_default_context(cadata=trustme.CA().cert_pem.bytes().decode())
    with Server(echo, tls=tls_material.server) as server:
        raw = _connect(server.port)
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                context.wrap_socket(raw, server_hostname="localhost")
        finally:
            raw.close()


def test_starttls_on_a_used_connection(tethered: Gateway, tls_material: TLSMaterial) -> None:
    context = ssl.create_default_context(cafile=str(tls_material.cafile))
    with Server(starttls(tls_material.server)) as server:
        sock = _connect(server.port)
        try:
            sock.sendall(b"HELLO\r\n")
            assert read_line(sock) == b"HELLO plain\r\n"
            sock.sendall(b"STARTTLS\r\n")
            assert read_line(sock) == b"OK go ahead\r\n"
            tls = context.wrap_socket(sock, server_hostname="localhost")
        finally:
            sock.close()  # detached by wrap_socket; a no-op then
        with tls:
            tls.sendall(b"over tls\n")
            assert _recv_exactly(tls, 9) == b"over tls\n"
            assert tls.getpeername() == ("127.0.0.1", server.port)
            # Options still reach the outbound socket through the SSLSocket.
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            assert tls.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert not server.errors


def test_tls_through_nonblocking_connect(tethered: Gateway, tls_material: TLSMaterial) -> None:
    # wrap_socket() right after a non-blocking connect: the pending answer
    # must be read before TLS takes the fd over.
    context = ssl.create_default_context(cafile=str(tls_material.cafile))
    with Server(echo, tls=tls_material.server) as server, socket.socket() as sock:
        sock.setblocking(False)
        assert sock.connect_ex(("127.0.0.1", server.port)) == errno.EINPROGRESS
        sock.setblocking(True)
        sock.settimeout(TIMEOUT)
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(b"ok")
            assert _recv_exactly(tls, 2) == b"ok"
            assert tls.getpeername() == ("127.0.0.1", server.port)


# -- addresses ---------------------------------------------------------------------------


def test_getpeername_and_getsockname(tethered: Gateway, whoami_server: Server) -> None:
    with _connect(whoami_server.port) as sock:
        seen_host, seen_port = read_line(sock).decode().split()
        assert sock.getpeername() == ("127.0.0.1", whoami_server.port)
        local = sock.getsockname()
        # The gateway's outbound socket: exactly the address the server sees...
        assert local == (seen_host, int(seen_port))
        assert local[0] == "127.0.0.1"
        # ...and not this fd's own hop to the gateway.
        assert local != _hop(sock)
        assert StdSocket.getpeername(sock) == _gateway_addr(tethered)


def test_unconnected_addresses(tethered: Gateway) -> None:
    with socket.socket() as sock:
        assert sock.getsockname() == ("0.0.0.0", 0)
        with pytest.raises(OSError) as info:
            sock.getpeername()
        assert info.value.errno == errno.ENOTCONN


def test_ipv6_socket_to_loopback(tethered: Gateway) -> None:
    with (
        Server(whoami, family=socket.AF_INET6, host="::1") as server,
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock,
    ):
        sock.settimeout(TIMEOUT)
        sock.connect(("::1", server.port))
        assert sock.getpeername() == ("::1", server.port, 0, 0)
        local = sock.getsockname()
        assert len(local) == 4
        assert local[0] == "::1"
        seen_host, seen_port = read_line(sock).decode().split()
        assert (seen_host, int(seen_port)) == local[:2]
        sock.sendall(b"v6")
        assert _recv_exactly(sock, 2) == b"v6"


def test_ipv6_socket_by_name(tethered: Gateway) -> None:
    # "v6only.test" is ::1 in the gateway's static table.
    with (
        Server(echo, family=socket.AF_INET6, host="::1") as server,
        socket.create_connection(("v6only.test", server.port), timeout=TIMEOUT) as sock,
    ):
        assert sock.family == socket.AF_INET6
        assert sock.getpeername() == ("::1", server.port, 0, 0)
        sock.sendall(b"by name")
        assert _recv_exactly(sock, 7) == b"by name"


# -- options -------------------------------------------------------------------------------


def test_options_after_connect_are_the_real_values(
    tethered: Gateway, echo_server: Server
) -> None:
    with _connect(echo_server.port) as sock:
        _relay_is_up(sock)
        for level, name in ((socket.IPPROTO_TCP, socket.TCP_NODELAY),
                            (socket.SOL_SOCKET, socket.SO_KEEPALIVE)):
            sock.setsockopt(level, name, 1)
            assert sock.getsockopt(level, name) == 1
            sock.setsockopt(level, name, 0)
            assert sock.getsockopt(level, name) == 0
        linger = struct.pack("ii", 1, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8) == linger
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER) == 1
        # The kernel doubles SO_SNDBUF/SO_RCVBUF: proof the value is the real socket's.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 131072
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 131072
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        # The data path is unaffected.
        sock.sendall(b"opts")
        assert _recv_exactly(sock, 4) == b"opts"


def test_options_set_before_connect_reach_the_outbound_socket(
    tethered: Gateway, echo_server: Server
) -> None:
    with socket.socket() as sock:
        sock.settimeout(TIMEOUT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        sock.connect(("127.0.0.1", echo_server.port))
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 131072


def test_options_without_buffer_sizes_are_applied_right_after_connect(
    tethered: Gateway, echo_server: Server
) -> None:
    """No buffer size asked: the gateway connects first, then sets the rest."""
    linger = struct.pack("ii", 1, 7)
    with socket.socket() as sock:
        sock.settimeout(TIMEOUT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect(("127.0.0.1", echo_server.port))
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8) == linger
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        sock.sendall(b"opts")
        assert _recv_exactly(sock, 4) == b"opts"


def test_tcp_nodelay_zero_set_before_connect_is_kept(
    tethered: Gateway, echo_server: Server
) -> None:
    with socket.socket() as sock:
        sock.settimeout(TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        sock.connect(("127.0.0.1", echo_server.port))
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0


def test_tcp_nodelay_default_is_the_kernel_default(
    tethered: Gateway, echo_server: Server
) -> None:
    with _connect(echo_server.port) as sock:
        _relay_is_up(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0


RACE_TRIES = 200  # stops at the first hit; a busy gateway hits ~1 in 4


@contextlib.contextmanager
def _gateway_busy(sink: Server) -> Iterator[None]:
    """Keep the gateway relaying a bulk upload: its event loop iterations get longer,
    which widens the window between ConnectResult and the end of the relay setup."""
    stop = threading.Event()
    sock = _connect(sink.port)

    def upload() -> None:
        block = b"\0" * MiB
        with contextlib.suppress(OSError):
            while not stop.is_set():
                sock.sendall(block)

    thread = threading.Thread(target=upload, name="busy-gateway")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(TIMEOUT)
        sock.shutdown(socket.SHUT_WR)
        _recv_all(sock)  # the sink's summary line
        sock.close()


def test_tcp_nodelay_set_right_after_connect_is_kept(
    tethered: Gateway, echo_server: Server, sink_server: Server
) -> None:
    lost = 0
    with _gateway_busy(sink_server):
        for _ in range(RACE_TRIES):
            with _connect(echo_server.port) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _relay_is_up(sock)
                lost += sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 1
            if lost:
                break
    assert lost == 0, "the app's TCP_NODELAY=1 was undone by the gateway"


def test_tcp_nodelay_read_right_after_connect_is_the_default(
    tethered: Gateway, echo_server: Server, sink_server: Server
) -> None:
    wrong = 0
    with _gateway_busy(sink_server):
        for _ in range(RACE_TRIES):
            with _connect(echo_server.port) as sock:
                wrong += sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            if wrong:
                break
    assert wrong == 0, "TCP_NODELAY read 1 right after connect (the app never set it)"


def test_setsockopt_during_a_pending_connect_is_applied(
    tethered: Gateway, echo_server: Server
) -> None:
    with socket.socket() as sock:
        sock.setblocking(False)
        assert sock.connect_ex(("127.0.0.1", echo_server.port)) == errno.EINPROGRESS
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        _, w, _ = select.select([], [sock], [], TIMEOUT)
        assert w == [sock]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        sock.settimeout(TIMEOUT)
        _relay_is_up(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


def test_options_right_after_connect_repeatedly(tethered: Gateway, echo_server: Server) -> None:
    # The ConnectResult leaves the gateway before its relay is fully set up:
    # an option request sent the instant connect() returns must still find it.
    for _ in range(30):
        with _connect(echo_server.port) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


def test_unsupported_option_is_named(tethered: Gateway, echo_server: Server) -> None:
    with _connect(echo_server.port) as sock:
        with pytest.raises(OSError, match="SO_BROADCAST") as info:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        assert info.value.errno == errno.ENOPROTOOPT
        with pytest.raises(OSError, match="SO_BROADCAST"):
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST)
    with socket.socket() as fresh, pytest.raises(OSError, match="SO_BROADCAST"):
        fresh.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)


# -- flow control -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # Its own process, so earlier large transfers have not already grown the
    # heap that this test's RSS measurement is about.
    key = secrets.token_urlsafe(16)
    gw = start_gateway(tmp_path_factory.mktemp("flow"), gateway_config(key), key)
    yield gw
    gw.process.stop()


def test_slow_reader_does_not_make_the_gateway_buffer(fresh_gateway: Gateway) -> None:
    assert fresh_gateway.process.proc is not None
    pid = fresh_gateway.process.proc.pid
    size = 64 * MiB
    tether.install(gateway=fresh_gateway.address, app=fresh_gateway.app, key=fresh_gateway.key)
    try:
        with Server(source(size)) as server:
            before = rss_bytes(pid)
            peak = before
            received = hashlib.sha256()
            total = 0
            with _connect(server.port, timeout=30.0) as sock:
                # Slow phase: ~1 MiB/s for 2.5 s while the server pushes at full speed.
                slow_until = time.monotonic() + 2.5
                while time.monotonic() < slow_until:
                    chunk = sock.recv(16 * 1024)
                    assert chunk
                    received.update(chunk)
                    total += len(chunk)
                    peak = max(peak, rss_bytes(pid))
                    time.sleep(0.015)
                # Then drain at full speed; everything must still arrive intact.
                buf = bytearray(MiB)
                while n := sock.recv_into(buf):
                    received.update(memoryview(buf)[:n])
                    total += n
                    peak = max(peak, rss_bytes(pid))
            assert (total, received.hexdigest()) == server.result()
    finally:
        tether.uninstall()
    growth = peak - before
    assert growth < 32 * MiB, f"gateway RSS grew by {growth / MiB:.1f} MiB"


# -- authentication ----------------------------------------------------------------------------


def test_wrong_key_is_refused(gateway: Gateway, echo_server: Server) -> None:
    tether.install(gateway=gateway.address, app=gateway.app, key=gateway.key + "-wrong")
    try:
        with pytest.raises(PermissionError,
                           match=re.escape("tether: app 'tests' authentication failed")):
            socket.create_connection(("127.0.0.1", echo_server.port), timeout=TIMEOUT)
        # Lookups go over the control stream: refused the same way.
        with pytest.raises(PermissionError, match="authentication failed"):
            socket.getaddrinfo("localhost", echo_server.port)
    finally:
        tether.uninstall()


def test_unknown_app_is_refused(gateway: Gateway, echo_server: Server) -> None:
    tether.install(gateway=gateway.address, app="nobody", key=gateway.key)
    try:
        with pytest.raises(PermissionError,
                           match=re.escape("tether: app 'nobody' authentication failed")):
            socket.create_connection(("127.0.0.1", echo_server.port), timeout=TIMEOUT)
    finally:
        tether.uninstall()


def test_second_app_connects_too(gateway: Gateway, echo_server: Server) -> None:
    tether.install(gateway=gateway.address, app="other", key=f"other-{gateway.key}")
    try:
        with _connect(echo_server.port) as sock:
            sock.sendall(b"from other")
            assert _recv_exactly(sock, 10) == b"from other"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        tether.uninstall()
    # The audit lines reach the log in batches (gateway/audit.py): wait for it.
    decisions = wait_for(lambda: [d for d in _audit(gateway, "decision")
                                  if d["app"] == "other" and d["port"] == echo_server.port])
    assert decisions
    assert decisions[-1]["verdict"] == "allow"
    # And the first app still works on the same gateway.
    tether.install(gateway=gateway.address, app=gateway.app, key=gateway.key)
    try:
        with _connect(echo_server.port) as sock:
            sock.sendall(b"tests")
            assert _recv_exactly(sock, 5) == b"tests"
    finally:
        tether.uninstall()


# -- a client that breaks the protocol ------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n", id="http"),
        pytest.param(b"TTHR\xff\xff\xff\xff", id="oversize-frame"),
        pytest.param(b"TTHR\x00\x00\x00\x06\xff\xff\xff\xff\xff\xff", id="undecodable-frame"),
    ],
)
def test_protocol_violation_closes_that_stream_only(
    tethered: Gateway, echo_server: Server, garbage: bytes
) -> None:
    with _connect(echo_server.port) as before:
        raw = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            raw.settimeout(TIMEOUT)
            raw.connect(_gateway_addr(tethered))
            raw.sendall(garbage)
            answer = bytearray()
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                try:
                    chunk = raw.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                answer += chunk
            else:
                pytest.fail("the gateway kept a protocol-violating stream open")
        finally:
            raw.close()
        # An Error frame: 4-byte length, then the frame; its text says why.
        assert len(answer) > 4
        assert int.from_bytes(answer[:4], "big") == len(answer) - 4
        if garbage.startswith(b"GET"):
            assert b"TTHR" in answer
        # The gateway is alive and the connection opened before still works...
        assert tethered.process.proc is not None
        assert tethered.process.proc.poll() is None
        before.sendall(b"still here")
        assert _recv_exactly(before, 10) == b"still here"
    # ...and so does a new one.
    with _connect(echo_server.port) as after:
        after.sendall(b"new")
        assert _recv_exactly(after, 3) == b"new"


def test_client_vanishing_mid_hello_does_not_hurt(tethered: Gateway, echo_server: Server) -> None:
    for partial in (b"", b"TT", b"TTHR", b"TTHR\x00\x00\x01\x00abc"):
        raw = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            raw.settimeout(TIMEOUT)
            raw.connect(_gateway_addr(tethered))
            raw.sendall(partial)
        finally:
            raw.close()
    with _connect(echo_server.port) as sock:
        sock.sendall(b"fine")
        assert _recv_exactly(sock, 4) == b"fine"


def test_nonblocking_connect_on_a_descriptor_above_fd_setsize(
    tethered: Gateway, echo_server: Server
) -> None:
    """A send() that finishes a pending connect works on fds select() cannot take."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1100
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard open-files limit ({hard}) is below {wanted}")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    fillers: list[int] = []
    try:
        while True:  # take every low descriptor, so the socket's is >= 1024
            fd = os.open(os.devnull, os.O_RDONLY)
            fillers.append(fd)
            if fd >= 1024:
                break
        with socket.socket() as sock:
            assert sock.fileno() > 1024
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", echo_server.port)) == errno.EINPROGRESS
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLOUT)
            assert poller.poll(TIMEOUT * 1000)
            # No SO_ERROR first: the send itself takes the gateway's answer.
            sent = 0
            deadline = time.monotonic() + TIMEOUT
            while not sent and time.monotonic() < deadline:
                try:
                    sent = sock.send(b"high fd")
                except BlockingIOError:
                    poller.poll(100)
            assert sent == len(b"high fd")
            poller.modify(sock.fileno(), select.POLLIN)
            got = b""
            while len(got) < sent and time.monotonic() < deadline:
                poller.poll(1000)
                with contextlib.suppress(BlockingIOError):
                    got += sock.recv(100)
            assert got == b"high fd"
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
