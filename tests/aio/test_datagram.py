"""tether.aio.datagram: asyncio datagram endpoints through a real gateway, default loop and uvloop.

Loopback only. The in-thread gateway (udpsupport) allows UDP to two echo
peers and nothing else, so any other loopback port is a denied destination,
and a denied send must leave nothing at the target. A slow decision is a
gateway lookup held back on purpose (the name "echo.test" maps to the
peers' address), during which the loop must keep running other tasks.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import dns.asyncquery
import dns.asyncresolver
import dns.message
import dns.rcode
import pytest
import uvloop
from aiosupport import LagMeter, Runner, least_lag
from dnsserver import DNSServer
from support import Gateway
from udpsupport import IDLE, TIMEOUT, StdSocket, UdpEnv, UdpPeer, udp_env, wait_for

import tether.socket as tsock
from tether import PolicyDenied
from tether.aio.datagram import TetherDatagramTransport, create_datagram_endpoint
from tether.client.dgram import DatagramSocket

# The largest UDP payload over IPv4: 65,535 - 8 (UDP header) - 20 (IP header).
MAX_DATAGRAM = 65_507
SLOW = 1.0  # seconds the gateway's lookup of "echo.test" is held back in the slow tests


@pytest.fixture
def env() -> Iterator[UdpEnv]:
    with udp_env() as e:
        yield e


class Recorder(asyncio.DatagramProtocol):
    """Records everything the transport tells its protocol."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.datagrams: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self.errors: list[Exception] = []
        self.flow: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's own UDPTransport is no DatagramTransport subclass

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.flow.append("pause")

    def resume_writing(self) -> None:
        self.flow.append("resume")

    async def next(self, timeout: float = TIMEOUT) -> tuple[bytes, Any]:
        return await asyncio.wait_for(self.datagrams.get(), timeout)

    async def nothing(self, wait: float = 0.3) -> bool:
        """True if no datagram arrives within `wait`."""
        try:
            await asyncio.wait_for(self.datagrams.get(), wait)
        except TimeoutError:
            return True
        return False


async def endpoint(**kwargs: Any) -> tuple[Any, Recorder]:
    """tether.aio's create_datagram_endpoint on the running loop (the explicit API)."""
    return await create_datagram_endpoint(asyncio.get_running_loop(), Recorder, **kwargs)


async def until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


@contextmanager
def slow_lookups(env: UdpEnv, delay: float) -> Iterator[None]:
    """The gateway answers every name lookup `delay` seconds late (asynchronously, on its loop)."""
    gateway = env.gw.gateway
    assert gateway is not None
    resolver = gateway.resolver
    lookup = resolver.lookup

    async def late(name: str) -> list[str]:
        await asyncio.sleep(delay)
        return await lookup(name)

    env.gw.call(lambda: setattr(resolver, "lookup", late))
    try:
        yield
    finally:
        env.gw.call(lambda: delattr(resolver, "lookup"))


# -- datagrams ---------------------------------------------------------------------------


def test_unconnected_endpoint_talks_to_several_destinations(env: UdpEnv, run: Runner[None]) -> None:
    a, b = env.peers

    async def main() -> None:
        transport, proto = await endpoint(family=socket.AF_INET)
        assert proto.transport is transport
        assert transport.get_extra_info("peername") is None
        assert transport.get_extra_info("sockname") == ("0.0.0.0", 0)  # nothing sent yet
        sizes = [1, 100, 1400, 9000, MAX_DATAGRAM]
        for i, size in enumerate(sizes):
            transport.sendto(bytes([i]) * size, a.address)
            transport.sendto(bytes([100 + i]) * size, b.address)
        got: dict[Any, list[bytes]] = {a.address: [], b.address: []}
        for _ in range(2 * len(sizes)):
            data, addr = await proto.next()
            got[addr].append(data)
        # Each datagram whole, in order, from the address it was sent to.
        assert got[a.address] == [bytes([i]) * size for i, size in enumerate(sizes)]
        assert got[b.address] == [bytes([100 + i]) * size for i, size in enumerate(sizes)]
        host, port = transport.get_extra_info("sockname")
        assert host == "0.0.0.0" and port != 0  # the gateway's outbound socket
        sock = transport.get_extra_info("socket")
        assert isinstance(sock, asyncio.trsock.TransportSocket)
        assert (sock.family, sock.type) == (socket.AF_INET, socket.SOCK_DGRAM)
        assert sock.getsockname() == (host, port)
        assert [r.transport for r in env.records()] == ["udp"]  # one association
        assert proto.errors == []
        transport.close()
        assert await proto.lost is None
        assert transport.get_extra_info("sockname") == (host, port)  # kept after closing

    run(main())
    assert wait_for(lambda: not env.records())  # closing ended the association


def test_connected_endpoint(env: UdpEnv, run: Runner[None]) -> None:
    a, b = env.peers

    async def main() -> None:
        # A name: the gateway resolves it ("echo.test" is the peers' address).
        transport, proto = await endpoint(remote_addr=("echo.test", a.port))
        assert transport.get_extra_info("peername") == a.address
        transport.sendto(b"no address")
        transport.sendto(b"the name", ("echo.test", a.port))
        transport.sendto(b"the peer's address", a.address)
        with pytest.raises(ValueError, match="Invalid address"):
            transport.sendto(b"elsewhere", b.address)
        for expected in (b"no address", b"the name", b"the peer's address"):
            assert await proto.next() == (expected, a.address)
        transport.close()
        await proto.lost

    run(main())
    assert [d for d, _ in a.received] == [b"no address", b"the name", b"the peer's address"]
    assert b.received == []


def test_ipv6_endpoint() -> None:
    peer = UdpPeer("::1")
    try:
        with udp_env(extra_allow=[f"[::1]:{peer.port}/udp"]):

            async def main() -> None:
                transport, proto = await endpoint(remote_addr=("::1", peer.port))
                assert transport.get_extra_info("socket").family == socket.AF_INET6
                assert transport.get_extra_info("peername") == ("::1", peer.port, 0, 0)
                transport.sendto(b"six")
                assert await proto.next() == (b"six", ("::1", peer.port, 0, 0))
                transport.close()
                await proto.lost

            for factory in (asyncio.new_event_loop, uvloop.new_event_loop):
                with asyncio.Runner(loop_factory=factory) as runner:
                    runner.run(main())
    finally:
        peer.close()


def test_a_datagram_from_a_stranger_is_not_delivered(env: UdpEnv, run: Runner[None]) -> None:
    peer = env.peers[0]
    sock = tsock.socket(socket.AF_INET, socket.SOCK_DGRAM)
    assert isinstance(sock, DatagramSocket)

    async def main() -> None:
        transport, proto = await endpoint(sock=sock)
        transport.sendto(b"first", peer.address)
        assert await proto.next() == (b"first", peer.address)
        with StdSocket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            # Straight at the app's fd: from no relay of this socket.
            stranger.sendto(b"sideways", StdSocket.getsockname(sock))
        assert await proto.nothing()
        transport.sendto(b"second", peer.address)
        assert await proto.next() == (b"second", peer.address)
        transport.close()
        await proto.lost

    run(main())


# -- the policy --------------------------------------------------------------------------


def test_denied_destination_is_reported_and_nothing_is_sent(env: UdpEnv, run: Runner[None]) -> None:
    target = UdpPeer(echo=False)  # a loopback port the policy does not allow
    peer = env.peers[0]

    async def main() -> None:
        transport, proto = await endpoint(family=socket.AF_INET)
        for i in range(3):  # queued behind one decision, refused together
            transport.sendto(b"must not arrive %d" % i, target.address)
        transport.sendto(b"allowed", peer.address)
        assert await proto.next() == (b"allowed", peer.address)
        assert await until(lambda: bool(proto.errors))
        [denied] = proto.errors
        assert isinstance(denied, PolicyDenied) and denied.errno == errno.EACCES
        assert f"127.0.0.1:{target.port}" in str(denied)
        assert denied.rule
        # A name the gateway maps to loopback, on the same port: denied as well.
        transport.sendto(b"nor this", ("echo.test", target.port))
        assert await until(lambda: len(proto.errors) == 2)
        assert isinstance(proto.errors[1], PolicyDenied)
        assert transport.get_write_buffer_size() == 0
        assert not transport.is_closing()  # a refusal is not the end of the endpoint
        transport.sendto(b"still allowed", peer.address)
        assert await proto.next() == (b"still allowed", peer.address)
        transport.close()
        await proto.lost

    try:
        run(main())
        assert not wait_for(lambda: bool(target.received), timeout=0.3)
    finally:
        target.close()


def test_connected_endpoint_to_a_denied_destination_raises(env: UdpEnv, run: Runner[None]) -> None:
    target = UdpPeer(echo=False)

    async def main() -> None:
        with pytest.raises(PolicyDenied) as info:
            await endpoint(remote_addr=target.address)
        assert f"127.0.0.1:{target.port}" in str(info.value)

    try:
        run(main())
        assert target.received == []
        assert wait_for(lambda: not env.records())  # its association was closed
    finally:
        target.close()


def test_a_slow_decision_does_not_block_the_loop(env: UdpEnv, run: Runner[Any]) -> None:
    a, b = env.peers

    async def main() -> tuple[float, float]:
        transport, proto = await endpoint(family=socket.AF_INET)
        transport.sendto(b"decided", b.address)
        assert await proto.next() == (b"decided", b.address)
        async with LagMeter() as lag:
            start = time.perf_counter()
            for i in range(5):
                transport.sendto(b"queued %d" % i, ("echo.test", a.port))
            assert transport.get_write_buffer_size() == 5 * len(b"queued 0")
            # Another destination flows meanwhile.
            transport.sendto(b"meanwhile", b.address)
            assert await proto.next() == (b"meanwhile", b.address)
            assert time.perf_counter() - start < SLOW / 2
            replies = [await proto.next() for _ in range(5)]
            elapsed = time.perf_counter() - start
        assert [d for d, _ in replies] == [b"queued %d" % i for i in range(5)]  # in order
        assert {addr for _, addr in replies} == {a.address}
        assert lag.ticks > 100  # the loop ran all along
        assert transport.get_write_buffer_size() == 0
        transport.close()
        await proto.lost
        return elapsed, lag.worst

    with slow_lookups(env, SLOW):
        worst = least_lag(lambda: run(main()), slow_at_least=SLOW * 0.9)
    print(f"loop lag during a {SLOW:.1f} s decision: {worst * 1000:.2f} ms")


def test_opening_the_association_does_not_block_the_loop(env: UdpEnv, run: Runner[Any]) -> None:
    # The first destination also opens the association (a TCP connect and a hello).
    peer = env.peers[0]

    async def main() -> tuple[float, float]:
        async with LagMeter() as lag:
            start = time.perf_counter()
            transport, proto = await endpoint(remote_addr=("echo.test", peer.port))
            elapsed = time.perf_counter() - start
            transport.sendto(b"hello")
            assert await proto.next() == (b"hello", peer.address)
        assert lag.ticks > 100
        transport.close()
        await proto.lost
        return elapsed, lag.worst

    with slow_lookups(env, SLOW):
        worst = least_lag(lambda: run(main()), slow_at_least=SLOW * 0.9)
    print(f"loop lag while opening the association ({SLOW:.1f} s decision): {worst * 1000:.2f} ms")


def test_a_full_queue_drops_and_counts(env: UdpEnv, run: Runner[None]) -> None:
    peer = env.peers[0]
    sock = tsock.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    limit = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)  # the kernel doubles it
    size, count = 1000, 40
    kept = -(-limit // size)  # taken while below the limit: the kernel's rule
    assert kept < count

    async def main() -> None:
        transport, proto = await endpoint(sock=sock)
        transport.set_write_buffer_limits(high=10 * limit)  # no pause in this test
        with slow_lookups(env, 0.3):
            for i in range(count):
                transport.sendto(i.to_bytes(2, "big") * (size // 2), ("echo.test", peer.port))
            assert transport.dropped == count - kept
            assert transport.get_write_buffer_size() == kept * size
            replies = [(await proto.next())[0][:2] for _ in range(kept)]
        assert replies == [i.to_bytes(2, "big") for i in range(kept)]
        assert await proto.nothing()
        transport.close()
        await proto.lost

    run(main())
    assert len(peer.received) == kept


def test_flow_control_covers_datagrams_awaiting_a_decision(env: UdpEnv, run: Runner[None]) -> None:
    peer = env.peers[0]

    async def main() -> None:
        transport, proto = await endpoint(family=socket.AF_INET)
        transport.set_write_buffer_limits(high=1500)
        assert transport.get_write_buffer_limits() == (375, 1500)
        with slow_lookups(env, 0.3):
            transport.sendto(b"a" * 1000, ("echo.test", peer.port))
            assert proto.flow == []
            transport.sendto(b"b" * 1000, ("echo.test", peer.port))
            assert proto.flow == ["pause"]
            assert transport.get_write_buffer_size() == 2000
            assert await proto.next() == (b"a" * 1000, peer.address)
            assert await proto.next() == (b"b" * 1000, peer.address)
        assert proto.flow == ["pause", "resume"]
        assert transport.get_write_buffer_size() == 0
        with pytest.raises(ValueError):
            transport.set_write_buffer_limits(high=1, low=2)
        transport.close()
        await proto.lost

    run(main())


# -- the end -----------------------------------------------------------------------------


@pytest.mark.parametrize("connected", [False, True], ids=["unconnected", "connected"])
def test_a_reclaimed_association_is_reported_and_ends_the_endpoint(
    env: UdpEnv, run: Runner[None], connected: bool
) -> None:
    peer = env.peers[0]
    sock = tsock.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def main() -> None:
        if connected:
            sock.connect(peer.address)
        transport, proto = await endpoint(sock=sock)
        transport.sendto(b"hi", peer.address)
        assert await proto.next() == (b"hi", peer.address)
        # The gateway stamps the relayed reply's activity after passing it
        # on: let its loop finish that callback before the clock moves.
        env.gw.call(lambda: None)
        env.clock.advance(IDLE + 1)
        assert env.sweep() == 1
        stream = sock._udp.stream  # type: ignore[attr-defined]
        assert await until(lambda: bool(stream.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)))
        transport.sendto(b"late", peer.address)
        [error] = proto.errors
        assert isinstance(error, ConnectionResetError)
        assert "reclaimed by the gateway after" in str(error)
        assert await proto.lost is error
        assert transport.is_closing()
        transport.sendto(b"later still", peer.address)  # dropped quietly, as asyncio does
        assert len(proto.errors) == 1

    run(main())
    assert [d for d, _ in peer.received] == [b"hi"]
    assert sock.fileno() == -1  # the transport closed it


def test_close_sends_what_awaits_a_decision_first(env: UdpEnv, run: Runner[None]) -> None:
    peer = env.peers[0]

    async def main() -> None:
        transport, proto = await endpoint(family=socket.AF_INET)
        with slow_lookups(env, 0.3):
            transport.sendto(b"parting words", ("echo.test", peer.port))
            transport.close()
            assert transport.is_closing()
            assert not proto.lost.done()
            assert await asyncio.wait_for(proto.lost, TIMEOUT) is None

    run(main())
    assert [d for d, _ in peer.received] == [b"parting words"]
    assert wait_for(lambda: not env.records())


def test_abort_drops_what_awaits_a_decision(env: UdpEnv, run: Runner[None]) -> None:
    peer = env.peers[0]

    async def main() -> None:
        transport, proto = await endpoint(family=socket.AF_INET)
        with slow_lookups(env, 0.3):
            transport.sendto(b"never", ("echo.test", peer.port))
            start = time.perf_counter()
            transport.abort()
            assert await proto.lost is None
            assert time.perf_counter() - start < 0.2  # not held up by the decision
            assert transport.get_write_buffer_size() == 0

    run(main())  # the runner waits for the decision's thread, which then closes the socket
    assert wait_for(lambda: not env.records())
    assert not wait_for(lambda: bool(peer.received), timeout=0.3)


def test_cancelled_while_connecting_closes_the_socket_once_decided(
    env: UdpEnv, run: Runner[None], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tether.audit")
    peer = env.peers[0]

    def closes() -> list[Any]:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tether.audit"]
        return [line for line in lines if line["event"] == "close"]

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(endpoint(remote_addr=("echo.test", peer.port)), 0.1)
        # The decision's thread runs on; its socket closes when it returns,
        # which ends the association.
        assert closes() == []
        assert await until(lambda: bool(closes()))
        [close] = closes()
        assert close["reason"] == "closed by the app" and close["datagrams_out"] == 0

    with slow_lookups(env, 0.5):
        run(main())
    assert not env.records()
    assert peer.received == []


# -- arguments -----------------------------------------------------------------------------


def test_local_address_any_opens_the_association(env: UdpEnv, run: Runner[None]) -> None:
    async def main() -> None:
        for any_address in [("", 0), ("0.0.0.0", 0), (None, 0)]:
            transport, proto = await endpoint(local_addr=any_address)
            host, port = transport.get_extra_info("sockname")
            assert host == "0.0.0.0" and port != 0
            transport.close()
            await proto.lost

    run(main())


def test_what_tether_refuses_is_refused_clearly(env: UdpEnv, run: Runner[None]) -> None:
    async def main() -> None:
        with pytest.raises(OSError, match="outbound only") as info:
            await endpoint(local_addr=("127.0.0.1", 5353))
        assert info.value.errno == errno.EACCES
        with pytest.raises(OSError, match="SO_BROADCAST") as info:
            await endpoint(family=socket.AF_INET, allow_broadcast=True)
        assert info.value.errno == errno.ENOPROTOOPT
        with pytest.raises(OSError, match="SO_REUSEPORT") as info:
            await endpoint(family=socket.AF_INET, reuse_port=True)
        assert info.value.errno == errno.ENOPROTOOPT
        with pytest.raises(ValueError, match="unexpected address family"):
            await endpoint()
        with pytest.raises(TypeError, match="2-tuple"):
            await endpoint(remote_addr="127.0.0.1:53")
        with pytest.raises(ValueError, match="AF_INET or AF_INET6, not AF_PACKET"):
            await endpoint(family=socket.AF_PACKET)
        with StdSocket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
            with pytest.raises(OSError, match="bypass the gateway") as info:
                await endpoint(sock=plain)
            assert info.value.errno == errno.EACCES
        with (
            tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as tethered_sock,
            pytest.raises(ValueError, match="remote_addr"),
        ):
            await endpoint(sock=tethered_sock, remote_addr=env.peers[0].address)
        transport, proto = await endpoint(family=socket.AF_INET)
        with pytest.raises(TypeError, match="bytes-like"):
            transport.sendto("text", env.peers[0].address)
        with pytest.raises(TypeError):
            transport.sendto(b"x", "127.0.0.1")
        transport.sendto(b"x")  # unconnected, no address: reported, as the kernel's
        [error] = proto.errors
        assert error.errno == errno.EDESTADDRREQ  # type: ignore[attr-defined]
        transport.close()
        await proto.lost

    run(main())
    assert wait_for(lambda: not env.records())


def test_an_af_unix_endpoint_is_the_loops_own(tmp_path: Path, run: Runner[None]) -> None:
    # Datagrams between two endpoints of this host: no gateway, nothing to decide.
    path = str(tmp_path / "dgram.sock")

    async def main() -> None:
        # Sockets of the app's own (uvloop takes AF_UNIX endpoints only as sock=).
        server_sock = StdSocket(socket.AF_UNIX, socket.SOCK_DGRAM)
        server_sock.bind(path)
        client_sock = StdSocket(socket.AF_UNIX, socket.SOCK_DGRAM)
        client_sock.connect(path)
        server, server_proto = await endpoint(sock=server_sock)
        client, client_proto = await endpoint(sock=client_sock)
        assert not isinstance(server, TetherDatagramTransport)
        client.sendto(b"local")
        assert (await server_proto.next())[0] == b"local"
        for transport, proto in ((client, client_proto), (server, server_proto)):
            transport.close()
            await proto.lost

    run(main())


# -- DNS -------------------------------------------------------------------------------------


def test_a_dns_query_through_the_endpoint(run: Runner[None]) -> None:
    with DNSServer() as dns_server:
        dns_server.add("www.test", "A", "127.0.0.1", ttl=30)
        with udp_env(n_peers=0, extra_allow=[f"127.0.0.1:{dns_server.port}/udp"]):

            async def main() -> None:
                server = (dns_server.host, dns_server.port)
                transport, proto = await endpoint(remote_addr=server)
                query = dns.message.make_query("www.test", "A")
                transport.sendto(query.to_wire())
                data, addr = await proto.next()
                assert addr == server
                answer = dns.message.from_wire(data)
                assert answer.id == query.id and answer.rcode() == dns.rcode.NOERROR
                assert [rr.address for rr in answer.answer[0]] == ["127.0.0.1"]
                transport.close()
                await proto.lost

            run(main())
        assert dns_server.count("www.test", "A", transport="udp") == 1


# -- the loop's own method, after tether.install() -----------------------------------------
# `tethered`: a `tether serve` child process, the socket module and the
# loops' methods routed through it (tether.install() installs the hooks).


def test_the_loops_create_datagram_endpoint_goes_through_the_gateway(
    tethered: Gateway, run: Runner[None]
) -> None:
    peer = UdpPeer()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            Recorder, remote_addr=peer.address
        )
        assert isinstance(transport, TetherDatagramTransport)
        assert transport.get_extra_info("peername") == peer.address
        transport.sendto(b"through the gateway")
        assert await proto.next() == (b"through the gateway", peer.address)
        # The peer saw the gateway's outbound socket, not the app's fd: no bypass.
        [(_, source)] = peer.received
        assert source == transport.get_extra_info("sockname")
        fd_address = StdSocket.getsockname(transport._sock)  # type: ignore[arg-type]
        assert source != fd_address
        transport.close()
        await proto.lost

        unconnected, proto = await loop.create_datagram_endpoint(Recorder, family=socket.AF_INET)
        assert isinstance(unconnected, TetherDatagramTransport)
        unconnected.sendto(b"unconnected", peer.address)
        assert await proto.next() == (b"unconnected", peer.address)
        unconnected.close()
        await proto.lost

    try:
        run(main())
    finally:
        peer.close()
    assert len(udp_audit(tethered, "decision", peer.port)) == 2  # one per endpoint
    # Closing each endpoint ended its association: the gateway's close line.
    assert wait_for(lambda: len(udp_audit(tethered, "close", peer.port)) == 2)
    for close in udp_audit(tethered, "close", peer.port):
        assert close["reason"] == "closed by the app"
        assert (close["datagrams_out"], close["datagrams_in"]) == (1, 1)


def test_dnspython_asyncio_query_and_resolver(tethered: Gateway, run: Runner[None]) -> None:
    with DNSServer() as dns_server:
        dns_server.add("www.test", "A", "127.0.0.1", ttl=30)
        dns_server.add("alias.test", "CNAME", "www.test")

        async def main() -> None:
            query = dns.message.make_query("www.test", "A")
            answer = await dns.asyncquery.udp(
                query, dns_server.host, port=dns_server.port, timeout=TIMEOUT
            )
            assert answer.rcode() == dns.rcode.NOERROR
            assert [rr.address for rr in answer.answer[0]] == ["127.0.0.1"]
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns_server.host]
            resolver.port = dns_server.port
            resolver.lifetime = TIMEOUT
            resolved = await resolver.resolve("alias.test", "A")
            assert [rr.address for rr in resolved] == ["127.0.0.1"]

        run(main())
        assert dns_server.count("www.test", "A", transport="udp") == 1
        assert dns_server.count("alias.test", "A", transport="udp") == 1


def test_anyio_udp_sockets(tethered: Gateway, run: Runner[None]) -> None:
    # anyio's UDP sockets are loop.create_datagram_endpoint with local_addr ("0.0.0.0", 0).
    peer = UdpPeer()
    address = anyio.abc.SocketAttribute

    async def main() -> None:
        async with await anyio.create_udp_socket(family=socket.AF_INET) as udp:
            await udp.sendto(b"anyio", *peer.address)
            assert await udp.receive() == (b"anyio", peer.address)
            assert udp.extra(address.local_address)[1] != 0
        async with await anyio.create_connected_udp_socket(*peer.address) as connected:
            assert connected.extra(address.remote_address) == peer.address
            await connected.send(b"connected")
            assert await connected.receive() == b"connected"

    try:
        run(main())
    finally:
        peer.close()
    assert [d for d, _ in peer.received] == [b"anyio", b"connected"]
    assert len(udp_audit(tethered, "decision", peer.port)) == 2  # through the gateway, both


def udp_audit(gateway: Gateway, event: str, port: int) -> list[dict[str, Any]]:
    """The gateway's audit lines of `event` for UDP to loopback `port`."""
    found = []
    for line in gateway.log_text().splitlines():
        if "tether.audit: " in line:
            entry = json.loads(line.split("tether.audit: ", 1)[1])
            at_port = entry.get("port") == port or entry.get("peer") == f"127.0.0.1:{port}"
            if entry["event"] == event and entry.get("transport") == "udp" and at_port:
                found.append(entry)
    return found
