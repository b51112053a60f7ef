"""tether UDP sockets against an in-thread gateway: semantics the app can see.

Loopback only. The gateway allows UDP to two echo peers and nothing else,
so a denied destination is any other loopback port; a denied send must
raise before anything leaves, which the tests check at the target.
"""

from __future__ import annotations

import errno
import pickle
import selectors
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from udpsupport import TIMEOUT, StdSocket, UdpEnv, UdpPeer, free_udp_port, udp_env, wait_for

import tether.socket as tsock
from tether.client import settings as client_settings
from tether.client.dgram import DatagramSocket
from tether.client.settings import Settings
from tether.endpoint import parse_endpoint

# The largest UDP payload over IPv4: 65,535 - 8 (UDP header) - 20 (IP header).
MAX_DATAGRAM = 65_507


@pytest.fixture
def env() -> Iterator[UdpEnv]:
    with udp_env() as e:
        yield e


@pytest.fixture
def sock(env: UdpEnv) -> Iterator[socket.socket]:
    s = tsock.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT)
    yield s
    s.close()


def test_a_dgram_socket_is_a_tether_udp_socket(sock: socket.socket) -> None:
    assert isinstance(sock, DatagramSocket)
    assert isinstance(sock, tsock.socket)
    assert sock.type == socket.SOCK_DGRAM
    assert sock.family == socket.AF_INET
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_DGRAM


def test_the_socket_class_makes_udp_sockets_whoever_imports_it_first() -> None:
    # sock.py never imports dgram.py (no import cycle): DatagramSocket registers
    # itself, and importing any part of tether imports it.
    code = (
        "import socket as std\n"
        "from tether.client.sock import socket\n"
        "s = socket(std.AF_INET, std.SOCK_DGRAM)\n"
        "print(type(s).__module__, type(s).__name__)\n"
        "s.close()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.split() == ["tether.client.dgram", "DatagramSocket"], result.stderr


@pytest.mark.parametrize("size", [1, 512, 1472, 8192, MAX_DATAGRAM])
def test_echo_keeps_each_datagram_whole(env: UdpEnv, sock: socket.socket, size: int) -> None:
    peer = env.peers[0]
    payload = bytes(i % 251 for i in range(size))
    assert sock.sendto(payload, peer.address) == size
    data, source = sock.recvfrom(MAX_DATAGRAM + 1)
    assert data == payload
    assert source == peer.address  # the real sender, not the gateway's relay
    assert peer.received[-1][0] == payload


def test_recvfrom_into_and_recv_into(env: UdpEnv, sock: socket.socket) -> None:
    peer = env.peers[0]
    sock.sendto(b"into", peer.address)
    buf = bytearray(16)
    n, source = sock.recvfrom_into(buf)
    assert (bytes(buf[:n]), source) == (b"into", peer.address)
    sock.sendto(b"again", peer.address)
    n = sock.recv_into(buf)
    assert bytes(buf[:n]) == b"again"
    sock.sendto(b"short read", peer.address)
    assert sock.recv(5) == b"short"  # the rest of the datagram is discarded, as the stdlib's


def _rcvbuf_errors() -> int:
    """The kernel's count of UDP datagrams dropped for a full receive buffer."""
    lines = Path("/proc/net/snmp").read_text().splitlines()
    udp = [line.split() for line in lines if line.startswith("Udp:")]
    header, values = udp[0], udp[1]
    return int(values[header.index("RcvbufErrors")])


def test_many_datagrams_in_flight_keep_order_and_boundaries(
    env: UdpEnv, sock: socket.socket
) -> None:
    # 2,000 datagrams of varying sizes, at most WINDOW unanswered at a time
    # (so the kernel's receive buffers, ~208 KiB by default, never overflow).
    total, window = 2000, 64
    peer = env.peers[0]
    drops_before = _rcvbuf_errors()
    sock.settimeout(1.0)
    received: list[int] = []
    sent = 0
    while len(received) < total:
        while sent < total and sent - len(received) < window:
            sock.sendto(struct.pack(">I", sent) + b"x" * (sent % 1400), peer.address)
            sent += 1
        try:
            data, source = sock.recvfrom(2048)
        except TimeoutError:
            break  # only a kernel drop gets here; accounted for below
        (index,) = struct.unpack(">I", data[:4])
        assert len(data) == 4 + index % 1400, "a datagram was cut or merged"
        assert source == peer.address
        received.append(index)
    assert received == sorted(received), "loopback must not reorder"
    missing = total - len(received)
    # Loopback does not lose datagrams by itself; any loss must be the kernel's
    # own receive-buffer drops (counted host-wide, so this is an upper bound).
    assert missing <= _rcvbuf_errors() - drops_before, f"{missing} datagrams lost"


def test_one_unconnected_socket_talks_to_two_destinations(
    env: UdpEnv, sock: socket.socket
) -> None:
    a, b = env.peers
    sock.sendto(b"to-a", a.address)
    sock.sendto(b"to-b", b.address)
    got = {sock.recvfrom(64) for _ in range(2)}
    assert got == {(b"to-a", a.address), (b"to-b", b.address)}
    # Both destinations see the same source: the gateway's one outbound socket.
    assert a.received[0][1][1] == b.received[0][1][1] == sock.getsockname()[1]


def test_a_name_is_resolved_by_the_gateway(env: UdpEnv, sock: socket.socket) -> None:
    peer = env.peers[0]
    sock.sendto(b"by name", ("echo.test", peer.port))
    assert sock.recvfrom(64) == (b"by name", peer.address)


def test_an_unknown_name_is_a_gaierror(env: UdpEnv, sock: socket.socket) -> None:
    port = env.peers[0].port
    with pytest.raises(socket.gaierror):
        sock.sendto(b"x", ("nowhere.test", port))  # the first destination: in the open
    sock.sendto(b"x", env.peers[0].address)
    assert sock.recvfrom(8)[0] == b"x"
    with pytest.raises(socket.gaierror):
        sock.sendto(b"x", ("nowhere.test", port))  # a later one: an AllowDestination


def test_connected_socket(env: UdpEnv, sock: socket.socket) -> None:
    peer = env.peers[0]
    with pytest.raises(OSError) as info:
        sock.getpeername()
    assert info.value.errno == errno.ENOTCONN
    sock.connect(peer.address)
    assert sock.getpeername() == peer.address
    host, port = sock.getsockname()
    assert host == "127.0.0.1"  # the local address towards the peer, as a connected socket's
    assert port > 0 and not peer.received  # connect() sends nothing
    assert sock.send(b"hello") == 5
    assert sock.recv(64) == b"hello"
    sock.sendall(b"all")
    assert sock.recvfrom(64) == (b"all", peer.address)
    assert peer.received[-1][1] == ("127.0.0.1", port)


def test_send_on_an_unconnected_socket_needs_an_address(sock: socket.socket) -> None:
    with pytest.raises(OSError) as info:
        sock.send(b"x")
    assert info.value.errno == errno.EDESTADDRREQ


def test_denied_destination_raises_and_sends_nothing(env: UdpEnv, sock: socket.socket) -> None:
    target = UdpPeer(echo=False)  # a loopback port the policy does not allow
    try:
        with pytest.raises(PermissionError) as info:
            sock.sendto(b"must not arrive", target.address)
        assert info.value.errno == errno.EACCES
        message = str(info.value)
        assert f"127.0.0.1:{target.port}" in message
        assert "denied" in message and "rule" in message
        with pytest.raises(PermissionError):
            sock.connect(target.address)
        # The socket is still usable for allowed destinations ...
        sock.sendto(b"ok", env.peers[0].address)
        assert sock.recvfrom(64)[0] == b"ok"
        # ... and the denied target never received a byte.
        assert not wait_for(lambda: bool(target.received), timeout=0.3)
    finally:
        target.close()


def test_denied_first_destination_leaves_the_socket_usable(env: UdpEnv) -> None:
    with tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        with pytest.raises(PermissionError):
            s.connect(("127.0.0.1", free_udp_port()))
        s.connect(env.peers[1].address)
        s.send(b"second try")
        assert s.recv(64) == b"second try"


def test_datagram_from_a_stranger_is_dropped(env: UdpEnv, sock: socket.socket) -> None:
    peer = env.peers[0]
    sock.sendto(b"first", peer.address)
    assert sock.recvfrom(64)[0] == b"first"
    outbound_port = sock.getsockname()[1]
    with StdSocket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.bind(("127.0.0.1", 0))
        # To the gateway's outbound socket: the app never sent to the stranger.
        stranger.sendto(b"unsolicited", ("127.0.0.1", outbound_port))
        # Straight at the app's own descriptor: not from a relay, so not the app's.
        stranger.sendto(b"sideways", _fd_address(sock))
        # At the relay itself: it is connected to the app's fd and ignores others.
        stranger.sendto(b"via relay", _relay(sock, peer.address))
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        sock.recvfrom(64)
    assert [d for d, _ in peer.received] == [b"first"]
    assert wait_for(lambda: _extra(env, "dropped_unsolicited") == 1)
    sock.settimeout(TIMEOUT)
    sock.sendto(b"still fine", peer.address)
    assert sock.recvfrom(64) == (b"still fine", peer.address)


def _fd_address(sock: socket.socket) -> tuple[str, int]:
    address: tuple[str, int] = StdSocket.getsockname(sock)
    return address


def _relay(sock: socket.socket, peer: tuple[str, int]) -> tuple[str, int]:
    route = sock._udp.routes[peer]  # type: ignore[attr-defined]
    return (route.relay[0], route.relay[1])


def _extra(env: UdpEnv, name: str) -> int:
    return sum(r.extra.get(name, 0) for r in env.records())


def test_timeout_and_non_blocking(env: UdpEnv, sock: socket.socket) -> None:
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recvfrom(64)
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recvfrom(64)
    # A first datagram to a new destination waits for the gateway's decision
    # even on a non-blocking socket; the reply is then read without blocking.
    sock.sendto(b"nb", env.peers[0].address)
    assert wait_for(lambda: _readable(sock))
    assert sock.recvfrom(64) == (b"nb", env.peers[0].address)
    with pytest.raises(BlockingIOError):
        sock.recv(64)


def _readable(sock: socket.socket) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(0))


def test_selectors_readiness_is_the_fds_own(env: UdpEnv, sock: socket.socket) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        [(_, events)] = sel.select(0)
        assert events == selectors.EVENT_WRITE  # writable, nothing to read yet
        sel.modify(sock, selectors.EVENT_READ)
        assert sel.select(0.05) == []
        sock.sendto(b"ready?", env.peers[0].address)
        ready = sel.select(TIMEOUT)
        assert [k.fileobj for k, _ in ready] == [sock]
    assert sock.recvfrom(64)[0] == b"ready?"


def test_getsockname_before_and_after(env: UdpEnv) -> None:
    with tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert s.getsockname() == ("0.0.0.0", 0)
        s.bind(("", 0))  # what some clients do before sending: "any"
        host, port = s.getsockname()
        assert (host, port != 0) == ("0.0.0.0", True)
        s.settimeout(TIMEOUT)
        s.sendto(b"x", env.peers[0].address)
        s.recvfrom(8)
        assert env.peers[0].received[-1][1] == ("127.0.0.1", port)
    with tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        assert s.getsockname()[1] != 0


@pytest.mark.parametrize("address", [("", 5353), ("127.0.0.1", 0), ("0.0.0.0", 40000)])
def test_bind_to_a_chosen_address_is_refused(env: UdpEnv, address: tuple[str, int]) -> None:
    with tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with pytest.raises(OSError) as info:
            s.bind(address)
        assert info.value.errno == errno.EACCES
        assert "outbound only" in str(info.value)


def test_options(env: UdpEnv, sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 65536
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.sendto(b"x", env.peers[0].address)  # opens the association with the options
    sock.recvfrom(8)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # sent to the gateway too
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 65536
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    with pytest.raises(OSError, match="SO_BROADCAST") as info:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    assert info.value.errno == errno.ENOPROTOOPT
    with pytest.raises(OSError, match="not supported on a UDP socket"):
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 4)


def test_listen_accept_and_pickling_are_refused(sock: socket.socket) -> None:
    with pytest.raises(OSError, match="outbound only"):
        sock.listen()
    with pytest.raises(OSError, match="outbound only"):
        sock.accept()
    with pytest.raises(TypeError, match="UDP sockets cannot be handed off"):
        pickle.dumps(sock)


def test_dup_shares_the_association(env: UdpEnv) -> None:
    s = tsock.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT)
    s.sendto(b"one", env.peers[0].address)
    s.recvfrom(8)
    d = s.dup()
    s.close()
    d.settimeout(TIMEOUT)
    d.sendto(b"two", env.peers[0].address)
    assert d.recvfrom(8) == (b"two", env.peers[0].address)
    assert len(env.records()) == 1
    d.close()
    assert wait_for(lambda: not env.records())


def test_closing_ends_the_association(env: UdpEnv) -> None:
    with tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        s.sendto(b"x", env.peers[0].address)
        s.recvfrom(8)
        assert [r.transport for r in env.records()] == ["udp"]
    assert wait_for(lambda: not env.records())


def test_ipv6_socket_through_an_ipv4_gateway() -> None:
    try:
        peer6 = UdpPeer("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        with (
            udp_env(0, extra_allow=[f"[::1]:{peer6.port}/udp"]),
            tsock.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s,
        ):
            s.settimeout(TIMEOUT)
            s.sendto(b"six", ("::1", peer6.port))
            data, source = s.recvfrom(16)
            assert data == b"six"
            assert source[:2] == ("::1", peer6.port) and len(source) == 4
    finally:
        peer6.close()


def test_a_unix_socket_gateway_cannot_carry_udp() -> None:
    client_settings.configure(
        Settings(gateway=parse_endpoint("unix:/nonexistent/tether.sock"), app="a", key="k")
    )
    try:
        with pytest.raises(OSError, match="Unix socket") as info:
            tsock.socket(socket.AF_INET, socket.SOCK_DGRAM)
        assert info.value.errno == errno.EPROTONOSUPPORT
    finally:
        client_settings.configure(None)


def test_not_configured_is_reported_on_first_use() -> None:
    with (
        tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
        pytest.raises(ConnectionError, match="no gateway configured"),
    ):
        s.sendto(b"x", ("127.0.0.1", 9))
