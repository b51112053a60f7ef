"""tether.aio's driver through an in-process gateway, on the default loop and on uvloop.

The explicit API (no install(): the embedded gateway's own loop must stay
untouched): connects, the bytes behind the ConnectResult, the errors mapped
as for the blocking client, and the loop kept running while the gateway
resolves or dials slowly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosupport import LagMeter, Runner, least_lag
from support import Peer, StdSocket

import tether.aio
from tether import socket as tsocket
from tether.aio import connection
from tether.client import control
from tether.client import settings as client_settings
from tether.config import parse_config
from tether.endpoint import parse_endpoint
from tether.errors import PolicyDenied
from tether.gateway.embedded import EmbeddedGateway

# How long the injected resolver delay keeps a connect waiting: long enough
# that a blocked loop could not hide under the lag limit.
SLOW = 1.0


@contextlib.contextmanager
def in_process_gateway(listen: str, **gateway: Any) -> Iterator[EmbeddedGateway]:
    """An in-thread gateway for app 'a' (loopback allowed, www.test and localhost in its
    static table), configured as the client's. Never with install(): its loop is plain."""
    config = parse_config({
        "gateway": {"listen": [listen], **gateway},
        "resolver": {"mode": "static", "hosts": {"localhost": ["127.0.0.1"],
                                                 "www.test": ["127.0.0.1"]}},
        "policy": {"allow": ["127.0.0.0/8:*"]},
        "apps": {"a": {"key": "key-a"}},
    })
    gw = EmbeddedGateway(config)
    endpoint = gw.start()[0]
    client_settings.configure(
        client_settings.Settings(gateway=parse_endpoint(str(endpoint)), app="a", key="key-a")
    )
    try:
        yield gw
    finally:
        client_settings.configure(None)
        control.close_all()
        gw.stop()


def test_cancelled_mid_dial_closes_the_stream(
    run: Runner[Any], gateway_tcp: EmbeddedGateway, echo_port: int
) -> None:
    gateway = gateway_tcp.gateway
    assert gateway is not None

    def streams() -> int:
        return gateway_tcp.call(lambda: len(gateway.streams))

    async def main() -> None:
        with full_accept_queue() as (port, _):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(tether.aio.open_connection("127.0.0.1", port), 0.2)
            # The socket was closed, so the gateway's side of its stream ends.
            for _ in range(200):
                if streams() == 0:
                    break
                await asyncio.sleep(0.01)
            assert streams() == 0, "the cancelled connect's stream is still open"

    run(main())


@pytest.fixture
def gateway_tcp() -> Iterator[EmbeddedGateway]:
    with in_process_gateway("127.0.0.1:0") as gw:
        yield gw


@pytest.fixture
def unix_gateway(tmp_path: Path) -> Iterator[EmbeddedGateway]:
    """The same gateway listening on a Unix socket only."""
    with in_process_gateway(f"unix:{tmp_path / 'gw.sock'}") as gw:
        yield gw


def greet_and_echo(conn: socket.socket) -> tuple[str, int]:
    conn.sendall(b"220 ready\r\n")  # sent before the client says anything
    while data := conn.recv(65536):
        conn.sendall(data)
    return conn.getpeername()  # type: ignore[no-any-return]


def test_open_connection_keeps_the_first_bytes_and_goes_through_the_gateway(
    run: Runner[Any], gateway_tcp: EmbeddedGateway
) -> None:
    with Peer(greet_and_echo) as peer:

        async def main() -> tuple[Any, ...]:
            reader, writer = await tether.aio.open_connection("127.0.0.1", peer.port)
            assert await reader.readline() == b"220 ready\r\n"
            writer.write(b"ping")
            await writer.drain()
            assert await reader.readexactly(4) == b"ping"
            sock = connection.tether_socket(writer.transport)
            assert sock is not None and sock._tether is not None
            assert sock._tether.peer == ("127.0.0.1", peer.port)
            local = sock._tether.local
            writer.close()
            await writer.wait_closed()
            assert local is not None
            return local

        local = run(main())
    # The target saw the gateway's outbound socket, which the client reports.
    assert peer.result == local


def test_the_loops_nodelay_costs_no_round_trip(
    run: Runner[Any], gateway_tcp: EmbeddedGateway, echo_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Both loops set TCP_NODELAY on every TCP transport; the Connect asked for
    # it already, so only an option that changes goes to the gateway.
    requests: list[str] = []
    real = control.ControlChannel.request

    def counting(self: control.ControlChannel, req: Any, *args: Any) -> Any:
        requests.append(req.WhichOneof("op"))
        return real(self, req, *args)

    monkeypatch.setattr(control.ControlChannel, "request", counting)

    async def main() -> None:
        _, writer = await tether.aio.open_connection("127.0.0.1", echo_port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert requests == []
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0  # the gateway's
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        assert requests == ["get_option", "set_option"]
        writer.close()
        await writer.wait_closed()

    run(main())


def test_a_socket_still_connecting_is_awaited(
    run: Runner[Any], gateway_tcp: EmbeddedGateway
) -> None:
    # connect_ex() of a non-blocking tether socket returns EINPROGRESS with the
    # answer still to come; the loop is given the socket only once it is connected.
    with Peer(greet_and_echo) as peer:

        async def main() -> None:
            sock = tsocket.socket()
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", peer.port)) == errno.EINPROGRESS
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await tether.aio.create_connection(loop, lambda: protocol, sock=sock)
            assert await reader.readline() == b"220 ready\r\n"
            transport.close()

        run(main())


def test_a_name_is_resolved_by_the_gateway(
    run: Runner[Any], gateway_tcp: EmbeddedGateway
) -> None:
    # www.test exists only in the gateway's static table.
    with Peer(greet_and_echo) as peer:

        async def main() -> None:
            reader, writer = await tether.aio.open_connection("www.test", peer.port)
            assert await reader.readline() == b"220 ready\r\n"
            writer.close()
            await writer.wait_closed()

        run(main())


@pytest.mark.parametrize(
    ("host", "error"),
    [("::1", PolicyDenied), ("nowhere.invalid", socket.gaierror)],
)
def test_errors_are_the_blocking_clients(
    run: Runner[Any], gateway_tcp: EmbeddedGateway, host: str, error: type
) -> None:
    # The gateway allows 127.0.0.0/8 only: ::1 is denied before any dial.

    async def main() -> None:
        with pytest.raises(error) as info:
            await tether.aio.open_connection(host, 9)
        if error is PolicyDenied:
            assert info.value.rule  # type: ignore[attr-defined]

    run(main())


def test_a_refused_port_is_connection_refused(
    run: Runner[Any], gateway_tcp: EmbeddedGateway
) -> None:
    probe = StdSocket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]  # bound, never listening: refused
    with probe:

        async def main() -> None:
            with pytest.raises(ConnectionRefusedError, match=f"127.0.0.1:{port}"):
                await tether.aio.open_connection("127.0.0.1", port)

        run(main())


def test_a_dial_the_gateway_gives_up_is_a_timeout(run: Runner[Any]) -> None:
    # The target's SYN is dropped (full accept queue) past the gateway's
    # connect timeout: TimeoutError, as a blocking connect() raises.
    with in_process_gateway("127.0.0.1:0", connect_timeout=0.3), full_accept_queue() as (port, _):

        async def main() -> None:
            with pytest.raises(TimeoutError):
                await tether.aio.open_connection("127.0.0.1", port)

        run(main())


def test_an_unreachable_gateway_is_a_connection_error(run: Runner[Any]) -> None:
    probe = StdSocket()
    probe.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{probe.getsockname()[1]}"
    client_settings.configure(
        client_settings.Settings(gateway=parse_endpoint(address), app="a", key="key-a")
    )
    try:

        async def main() -> None:
            with pytest.raises(ConnectionError, match=f"gateway {address} unreachable"):
                await tether.aio.open_connection("127.0.0.1", 9)

        run(main())
    finally:
        client_settings.configure(None)
        probe.close()


def _slow_resolver(gw: EmbeddedGateway, delay: float) -> None:
    """The gateway's name lookups take `delay` seconds longer (its loop keeps running)."""
    assert gw.gateway is not None
    resolver = gw.gateway.resolver
    lookup, getaddrinfo = resolver.lookup, resolver.getaddrinfo

    async def slow_lookup(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(delay)
        return await lookup(*args, **kwargs)

    async def slow_getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(delay)
        return await getaddrinfo(*args, **kwargs)

    def patch() -> None:
        resolver.lookup = slow_lookup  # type: ignore[method-assign]
        resolver.getaddrinfo = slow_getaddrinfo  # type: ignore[method-assign]

    gw.call(patch)


def test_a_slow_gateway_lookup_leaves_the_loop_running(
    run: Runner[Any], gateway_tcp: EmbeddedGateway, echo_port: int
) -> None:
    _slow_resolver(gateway_tcp, SLOW)

    async def main() -> tuple[float, float]:
        # Warm: the driver's modules loaded, the gateway's stream code run once.
        _, writer = await tether.aio.open_connection("127.0.0.1", echo_port)
        writer.close()
        await writer.wait_closed()
        async with LagMeter() as lag:
            started = time.perf_counter()
            _, writer = await tether.aio.open_connection("localhost", echo_port)
            took = time.perf_counter() - started
        writer.close()
        await writer.wait_closed()
        assert lag.ticks > 100, "the ticker barely ran: the loop was held"
        return took, lag.worst

    least_lag(lambda: run(main()), SLOW * 0.9)


@contextlib.contextmanager
def full_accept_queue() -> Iterator[tuple[int, threading.Thread]]:
    """A loopback listener whose accept queue is full: a new SYN is dropped and
    retried by the kernel ~1 s later (TCP_TIMEOUT_INIT); room is made at 0.3 s."""
    listener = StdSocket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # one queued connection fills it (Linux: full when > backlog)
    port = listener.getsockname()[1]
    filler = StdSocket()
    filler.connect(("127.0.0.1", port))
    accepted: list[socket.socket] = []

    def make_room() -> None:
        time.sleep(0.3)
        conn, _ = listener.accept()
        accepted.append(conn)

    thread = threading.Thread(target=make_room, daemon=True)
    thread.start()
    try:
        yield port, thread
    finally:
        thread.join(5)
        for conn in accepted:
            conn.close()
        filler.close()
        listener.close()


def test_a_slow_dial_leaves_the_loop_running(
    run: Runner[Any], gateway_tcp: EmbeddedGateway, echo_port: int
) -> None:
    async def main() -> tuple[float, float]:
        _, writer = await tether.aio.open_connection("127.0.0.1", echo_port)
        writer.close()
        await writer.wait_closed()
        with full_accept_queue() as (port, _):
            async with LagMeter() as lag:
                started = time.perf_counter()
                _, writer = await tether.aio.open_connection("127.0.0.1", port)
                took = time.perf_counter() - started
            writer.close()
        return took, lag.worst

    least_lag(lambda: run(main()), 0.5)


def test_the_lag_meter_sees_the_old_blocking_connect(gateway_tcp: EmbeddedGateway) -> None:
    """The control: the default loop's own sock_connect on a tether socket (no hooks)
    waits for the gateway's answer inside getsockopt(SO_ERROR), holding the loop for
    the whole dial (1,002 ms in the issue); the meter must see it."""

    async def main(port: int) -> tuple[float, float]:
        sock = tsocket.socket()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        assert not tether.aio.loop_hooks_installed()
        with sock:
            async with LagMeter() as lag:
                started = time.perf_counter()
                await loop.sock_connect(sock, ("127.0.0.1", port))
                took = time.perf_counter() - started
        return took, lag.worst

    with full_accept_queue() as (port, _):
        took, worst = asyncio.run(main(port))
    assert took >= 0.5
    assert worst >= took * 0.8, f"a {took:.3f} s blocking connect showed as {worst:.3f} s"


def test_over_a_unix_gateway(run: Runner[Any], unix_gateway: EmbeddedGateway) -> None:
    # uvloop refused this one (EOPNOTSUPP: a TCP handle on an AF_UNIX fd).
    with Peer(greet_and_echo) as peer:

        async def main() -> None:
            reader, writer = await tether.aio.open_connection("127.0.0.1", peer.port)
            assert await reader.readline() == b"220 ready\r\n"
            payload = bytes(range(256)) * 4096
            writer.write(payload)
            await writer.drain()
            assert await reader.readexactly(len(payload)) == payload
            writer.close()
            await writer.wait_closed()

        run(main())
