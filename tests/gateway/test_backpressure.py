"""An app that pipelines requests and never reads the answers cannot grow the gateway.

Issue 13: 66 KB of pipelined list-sockets requests, never read, grew a
gateway by 111 MB. Now the gateway stops reading a stream whose answers
pass its write buffer's high-water mark, and closes it after
``write_stall_timeout`` with a log line. Measured on a real ``tether serve``
process (its RSS from /proc), with raw-wire clients (tether.wire.Connection).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import APP, Gateway, StdSocket, gateway_config, start_gateway, wait_for

from tether.wire import PROTOCOL_VERSION, Connection, Role, pb

STALL = 2.0  # the test gateway's write_stall_timeout
SOCKETS = 60  # live sockets of the app, so each list_sockets answer is ~6 KB
# 24 MB of requests: more than the kernel's buffers hold (loopback autotuning
# stops at tcp_rmem's 6 MB + tcp_wmem's 4 MB), and ~10 GB of answers if all
# were served and buffered.
REQUESTS = 2_000_000
BOUND_MB = 50  # the bound on growth
# What the pause leaves: the 64 KiB high-water mark and the answer in hand,
# plus the allocator's noise. The gateway before the fix grew 35.6 MB in the
# 8 s this test sends for (and on, unbounded).
PAUSED_MB = 8


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    key = secrets.token_urlsafe(16)
    text = gateway_config(key, gateway=f"write_stall_timeout = {STALL}")
    gateway = start_gateway(tmp_path_factory.mktemp("backpressure"), text, key)
    yield gateway
    gateway.process.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def hello(gw: Gateway) -> tuple[socket.socket, Connection]:
    host, port = gw.address.rsplit(":", 1)
    sock = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    wire = Connection(Role.CLIENT)
    sock.sendall(wire.send(pb.ClientHello(protocol_version=PROTOCOL_VERSION, app=APP,
                                          key=gw.key)))
    return sock, wire


def answer(sock: socket.socket, wire: Connection) -> object:
    while True:
        event = wire.next_event()
        if isinstance(event, pb.ConnectResult | pb.Response):
            return event
        if not isinstance(event, pb.ServerHello):
            chunk = sock.recv(65536)
            assert chunk, "the gateway hung up"
            wire.receive_data(chunk)


@contextlib.contextmanager
def live_sockets(gw: Gateway, n: int) -> Iterator[None]:
    """n connected sockets of the app (raw Connects to a local listener)."""
    listener = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(n + 8)
    port = listener.getsockname()[1]
    streams = []
    try:
        for _ in range(n):
            sock, wire = hello(gw)
            sock.sendall(wire.send(pb.Connect(transport=pb.TRANSPORT_TCP,
                                              family=pb.FAMILY_INET, host="127.0.0.1", port=port)))
            result = answer(sock, wire)
            assert isinstance(result, pb.ConnectResult) and result.descriptor, result
            streams.append(sock)
        yield
    finally:
        for sock in streams:
            sock.close()
        listener.close()


def open_stream(gw: Gateway, kind: str) -> tuple[socket.socket, Connection]:
    sock, wire = hello(gw)
    if kind == "udp association":
        with StdSocket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            source = pb.Address(family=pb.FAMILY_INET, host="127.0.0.1",
                                port=udp.getsockname()[1])
            sock.sendall(wire.send(pb.Connect(transport=pb.TRANSPORT_UDP,
                                              family=pb.FAMILY_INET, source=source)))
            opened = answer(sock, wire)
        assert isinstance(opened, pb.ConnectResult) and opened.descriptor, opened
    return sock, wire


@pytest.mark.parametrize("kind", ["control", "udp association"])
def test_unread_answers_keep_the_gateway_bounded(gw: Gateway, kind: str) -> None:
    pid = gw.process.proc.pid
    with live_sockets(gw, SOCKETS):
        sock, wire = open_stream(gw, kind)
        sample = wire.send(pb.Request(id=1, list_sockets=pb.ListSockets()))
        # Counted before sending: on a loaded machine the stall timeout can
        # run out while the loop below is still measuring.
        closes = gw.log_text().count("has not read its answers")
        before = rss_kib(pid)
        peak = before
        sock.setblocking(False)
        # The same request over and over (ids need not differ for the gateway).
        payload = sample * REQUESTS
        sent = 0
        deadline = time.monotonic() + 8.0
        # Send what the kernel takes, never reading; stop when the gateway
        # has stopped reading too (nothing more fits) or all is sent.
        idle_since = time.monotonic()
        while sent < len(payload) and time.monotonic() < deadline:
            try:
                n = sock.send(payload[sent : sent + 65536])
            except BlockingIOError:
                if time.monotonic() - idle_since > 1.0:
                    break
                time.sleep(0.01)
            else:
                sent += n
                idle_since = time.monotonic()
            peak = max(peak, rss_kib(pid))
        for _ in range(20):  # let the gateway finish whatever it had read
            peak = max(peak, rss_kib(pid))
            time.sleep(0.05)
        growth_mb = (peak - before) / 1024
        assert sent < len(payload), (
            f"the gateway read all {len(payload)} bytes of requests without its answers being read"
        )
        assert growth_mb < BOUND_MB, f"gateway RSS grew by {growth_mb:.1f} MB"
        assert growth_mb < PAUSED_MB, f"gateway RSS grew by {growth_mb:.1f} MB"
        print(f"{kind}: {len(sample)}-byte requests, {sent} bytes taken; "
              f"RSS {before} -> peak {peak} KiB (+{growth_mb:.1f} MB)")
        # Past write_stall_timeout the stream is closed, with a line that says why.
        assert wait_for(
            lambda: gw.log_text().count("has not read its answers") > closes, timeout=STALL + 5
        ), gw.log_text()[-2000:]
        sock.setblocking(True)
        sock.settimeout(5)
        ended = False
        try:  # what was sent before the reset, then the end of the stream
            for _ in range(10_000):
                if not sock.recv(1 << 20):
                    ended = True
                    break
        except ConnectionResetError:
            ended = True
        assert ended, "the stream was not closed"
        sock.close()
    after = rss_kib(pid)
    print(f"{kind}: RSS after the stream closed {after} KiB")
    assert (after - before) / 1024 < BOUND_MB
