"""tether.install() on the loops: the default asyncio loop and uvloop go through the gateway.

Each test runs on both loops against a real gateway process. Regressions of
issue 12: uvloop connected directly (no decision, nothing metered); uvloop
refused a tether socket over a unix: gateway (EOPNOTSUPP); a non-blocking
connect's answer was awaited inside getsockopt(SO_ERROR), freezing the loop
for the whole dial.
"""

from __future__ import annotations

import asyncio
import errno
import json
import secrets
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop
from aiosupport import LagMeter, Runner, least_lag
from dnsserver import DNSServer
from support import (
    Gateway,
    Peer,
    StdSocket,
    gateway_config,
    installed,
    list_sockets,
    start_gateway,
    tether_cli,
    wait_for,
)
from tcpservers import TLSMaterial, echo, serving, starttls
from test_driver import full_accept_queue, greet_and_echo

import tether
from tether.aio import connection
from tether.demo.servers import HTTPServer, client_context
from tether.errors import PolicyDenied


def _through_gateway(gw: Gateway, writer: asyncio.StreamWriter, peer: Peer) -> Any:
    """The connection's tether socket, after checking the gateway holds it; its local address."""
    sock = connection.tether_socket(writer.transport)
    assert sock is not None and sock._tether is not None, "not a tether connection"
    prefixes = {s.descriptor_prefix for s in list_sockets(gw)}
    assert sock._tether.descriptor[:8] in prefixes, "the gateway does not know the socket"
    assert sock._tether.peer is not None and sock._tether.peer[1] == peer.port
    return sock._tether.local


@pytest.mark.parametrize("how", ["open_connection", "create_connection"])
def test_the_loop_connects_through_the_gateway(
    run: Runner[Any], tethered: Gateway, how: str
) -> None:
    with Peer(greet_and_echo) as peer:

        async def main() -> Any:
            loop = asyncio.get_running_loop()
            if how == "open_connection":
                reader, writer = await asyncio.open_connection("127.0.0.1", peer.port)
            else:
                reader = asyncio.StreamReader()
                protocol = asyncio.StreamReaderProtocol(reader)
                transport, _ = await loop.create_connection(
                    lambda: protocol, "localhost", peer.port, happy_eyeballs_delay=0.25
                )
                writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            assert await reader.readline() == b"220 ready\r\n"
            local = _through_gateway(tethered, writer, peer)
            # The transport names the target and the gateway's outbound socket
            # (uvloop named the hop to the gateway), and its socket's options
            # are the outbound socket's.
            assert writer.get_extra_info("peername") == ("127.0.0.1", peer.port)
            assert writer.get_extra_info("sockname") == local
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            writer.close()
            await writer.wait_closed()
            return local

        local = run(main())
    # What the target saw is the gateway's outbound socket, not this process.
    assert peer.result == local


def test_a_name_with_an_ipv6_address(run: Runner[Any], tethered: Gateway) -> None:
    # v6only.test is ::1 in the gateway's table: the Connect asks for any family,
    # and the socket the loop wraps is of the peer's (AF_INET6), as the stdlib's.
    async def main(port: int) -> None:
        reader, writer = await asyncio.open_connection("v6only.test", port)
        assert writer.get_extra_info("socket").family == socket.AF_INET6
        assert writer.get_extra_info("peername")[:2] == ("::1", port)
        writer.write(b"six")
        assert await reader.readexactly(3) == b"six"
        writer.close()
        await writer.wait_closed()
        with pytest.raises(OSError) as info:
            await asyncio.open_connection("v6only.test", port, family=socket.AF_INET)
        assert info.value.errno == errno.EAFNOSUPPORT

    with serving(echo, host="::1", family=socket.AF_INET6) as server:
        run(main(server.port))


def test_a_denied_destination_is_policy_denied(run: Runner[Any], tethered: Gateway) -> None:
    # The session gateway's policy leaves port 25 out (tests/conftest.py): the
    # gateway decides (uvloop used to connect straight to it) and says so.
    def denials() -> int:
        return sum(1 for d in _decisions(tethered, 25) if d.get("outcome") == "denied")

    before = denials()

    async def main() -> None:
        with pytest.raises(PolicyDenied) as info:
            await asyncio.open_connection("127.0.0.1", 25)
        assert info.value.rule

    run(main())
    assert wait_for(lambda: denials() == before + 1), tethered.log_text()[-2000:]


def test_tls_with_verification(
    run: Runner[Any],
    tls_ca: tuple[trustme.CA, ssl.SSLContext],
    https_server: HTTPServer,
    tethered: Gateway,
) -> None:
    # TLS runs end to end on the tether socket; the name asked for is the one verified.
    async def main() -> bytes:
        reader, writer = await asyncio.open_connection(
            "www.test", https_server.port, ssl=client_context(tls_ca[0])
        )
        writer.write(b"GET / HTTP/1.0\r\nHost: www.test\r\n\r\n")
        data = await reader.read()
        writer.close()
        return data

    assert run(main()).startswith(b"HTTP/1.")


def test_starttls(run: Runner[Any], tmp_path: Path, tethered: Gateway) -> None:
    # uvloop's start_tls takes only its own transports: the hook unwraps tether's.
    material = TLSMaterial(tmp_path)
    client = ssl.create_default_context(cafile=str(material.cafile))

    async def main(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HELLO\r\n")
        assert await reader.readline() == b"HELLO plain\r\n"
        writer.write(b"STARTTLS\r\n")
        assert await reader.readline() == b"OK go ahead\r\n"
        await writer.start_tls(client, server_hostname="localhost")
        assert writer.get_extra_info("peername") == ("127.0.0.1", port)
        assert writer.get_extra_info("peercert") is not None
        writer.write(b"secret\n")
        assert await reader.readexactly(7) == b"secret\n"
        writer.close()
        await writer.wait_closed()

    with serving(starttls(material.server)) as server:
        run(main(server.port))


def test_sock_connect_on_a_tether_socket_leaves_the_loop_running(
    run: Runner[Any], echo_port: int, tethered: Gateway
) -> None:
    """aiohttp's path: the app makes the socket, the loop connects it, then wraps it."""

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        sock = socket.socket()  # warm: loads and runs the code once
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", echo_port))
        _, writer = await asyncio.open_connection(sock=sock)
        writer.close()
        await writer.wait_closed()
        with full_accept_queue() as (port, _):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setblocking(False)
            async with LagMeter() as lag:
                started = time.perf_counter()
                await loop.sock_connect(sock, ("127.0.0.1", port))
                took = time.perf_counter() - started
            transport, _ = await loop.create_connection(asyncio.Protocol, sock=sock)
            transport.close()
        return took, lag.worst

    least_lag(lambda: run(main()), 0.5)


def test_sock_connect_refuses_a_plain_socket(run: Runner[Any], tethered: Gateway) -> None:
    async def main() -> None:
        plain = StdSocket()
        plain.setblocking(False)
        with plain, pytest.raises(OSError, match="bypass the gateway") as info:
            await asyncio.get_running_loop().sock_connect(plain, ("127.0.0.1", 9))
        assert info.value.errno == errno.EACCES

    run(main())


def test_lookups_go_to_the_gateway(run: Runner[Any], tethered: Gateway) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        # www.test is only in the gateway's static table: the system resolver fails it.
        infos = await loop.getaddrinfo("www.test", 80, type=socket.SOCK_STREAM)
        assert {info[4][0] for info in infos} == {"127.0.0.1"}
        with pytest.raises(socket.gaierror):
            await loop.getaddrinfo("nowhere.invalid", 80)
        host, service = await loop.getnameinfo(("127.0.0.1", 80), socket.NI_NUMERICSERV)
        assert service == "80" and host

    run(main())


@pytest.fixture
def slow_dns_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway whose upstream DNS server never answers slow.test (1 s timeout, 1 attempt)."""
    key = secrets.token_urlsafe(16)
    with DNSServer() as dns_server:
        dns_server.silent_names.add("slow.test")
        text = gateway_config(key).replace(
            '[resolver]\nmode = "static"',
            f'[resolver]\nmode = "upstream"\nservers = ["{dns_server.address}"]\n'
            "timeout = 1.0\nattempts = 1\n[resolver.static_unused]",
        )
        text = text.replace("[resolver.static_unused]\n\n[resolver.hosts]", "[resolver.hosts]")
        gw = start_gateway(tmp_path, text, key)
        try:
            with installed(gw):
                yield gw
        finally:
            gw.process.stop()


def test_a_slow_lookup_leaves_the_loop_running(
    run: Runner[Any], slow_dns_gateway: Gateway
) -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        await loop.getaddrinfo("localhost", 80)  # the executor's thread, the control stream
        async with LagMeter() as lag:
            started = time.perf_counter()
            try:
                await loop.getaddrinfo("slow.test", 80)
            except socket.gaierror:
                pass
            else:
                raise AssertionError("slow.test resolved")
            took = time.perf_counter() - started
        return took, lag.worst

    least_lag(lambda: run(main()), 0.8)


def test_over_a_unix_gateway(run: Runner[Any], tmp_path: Path, echo_port: int) -> None:
    """uvloop wrapped a tether socket whose fd is AF_UNIX in a TCP handle: EOPNOTSUPP."""
    key = secrets.token_urlsafe(16)
    gw = start_gateway(tmp_path, gateway_config(key), key, listen=f"unix:{tmp_path}/gw.sock")
    try:
        with installed(gw), Peer(greet_and_echo) as peer:

            async def main() -> None:
                loop = asyncio.get_running_loop()
                reader, writer = await asyncio.open_connection("127.0.0.1", peer.port)
                assert await reader.readline() == b"220 ready\r\n"
                writer.write(b"x" * 100_000)
                assert await reader.readexactly(100_000) == b"x" * 100_000
                # redis.asyncio and aiomysql set TCP_NODELAY on the transport's
                # socket: uvloop's reached the AF_UNIX fd (EOPNOTSUPP).
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                assert writer.get_extra_info("peername") == ("127.0.0.1", peer.port)
                writer.close()
                # aiohttp's way: sock_connect, then create_connection(sock=).
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", echo_port))
                reader, writer = await asyncio.open_connection(sock=sock)
                writer.write(b"echo")
                assert await reader.readexactly(4) == b"echo"
                assert writer.get_extra_info("peername") == ("127.0.0.1", echo_port)
                writer.close()
                await writer.wait_closed()
                refused = socket.socket()
                refused.setblocking(False)
                with pytest.raises(ConnectionRefusedError):
                    await loop.sock_connect(refused, ("127.0.0.1", peer.port))  # peer is busy
                refused.close()

            run(main())
    finally:
        gw.process.stop()


def test_uvloop_create_server_stays_on_loopback(tethered: Gateway) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(OSError, match="outbound only") as info:
            await loop.create_server(asyncio.Protocol, "0.0.0.0", 0)
        assert info.value.errno == errno.EACCES
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        server.close()

    uvloop.run(main())


def test_uninstall_puts_the_loops_back(gateway: Gateway) -> None:
    own = uvloop.Loop.create_connection, asyncio.BaseEventLoop.create_connection
    with installed(gateway):
        assert uvloop.Loop.create_connection is not own[0]
    assert (uvloop.Loop.create_connection, asyncio.BaseEventLoop.create_connection) == own
    assert not tether.aio.loop_hooks_installed()


RUN_SCRIPT = """
import asyncio, sys, uvloop

async def main(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    print(type(asyncio.get_running_loop()).__module__, writer.get_extra_info("peername")[1])
    writer.close()
    await writer.wait_closed()

asyncio.run(main(int(sys.argv[1])))
uvloop.run(main(int(sys.argv[1])))
"""


def test_tether_run_covers_both_loops(gateway: Gateway, echo_port: int, tmp_path: Path) -> None:
    """The hooks come with tether run (sitecustomize's install()), asyncio imported after it."""
    script = tmp_path / "app.py"
    script.write_text(RUN_SCRIPT)
    result = tether_cli(
        "run", "--gateway", gateway.address, "--app", gateway.app, f"--key={gateway.key}",
        "--", sys.executable, str(script), str(echo_port),
    )
    assert result.returncode == 0, result.stderr
    port = str(echo_port)
    assert result.stdout.split() == ["asyncio.unix_events", port, "uvloop", port]
    # One audit decision per connection: the gateway decided both.
    assert wait_for(lambda: len(_decisions(gateway, echo_port)) >= 2), gateway.log_text()[-2000:]
    assert len(_decisions(gateway, echo_port)) == 2


def _decisions(gateway: Gateway, port: int) -> list[dict[str, Any]]:
    found = []
    for line in gateway.log_text().splitlines():
        if '"event":"decision"' in line:
            record = json.loads(line[line.index("{") :])
            if record.get("port") == port:
                found.append(record)
    return found

