"""The agent's pure parts and its relay on both loops, over plain loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

import pytest
import uvloop

from tether.isolate.agent import Destination, Half, NoDestinationError, Pending, destination
from tether.isolate.names import FakeNames

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
TIMEOUT = 10.0  # any one wait in these tests


def _names() -> FakeNames:
    names = FakeNames()
    names.address_for("web.test")  # 198.18.0.1
    return names


@pytest.mark.parametrize(
    ("address", "port", "host", "shown"),
    [
        ("198.18.0.1", 80, "web.test", "web.test:80 (dialled 198.18.0.1:80)"),
        ("127.0.0.1", 5432, "127.0.0.1", "127.0.0.1:5432"),
        ("::1", 443, "::1", "[::1]:443"),
        ("127.0.0.1", 15000, "127.0.0.1", "127.0.0.1:15000"),  # not the agent's port
    ],
)
def test_destination(address: str, port: int, host: str, shown: str) -> None:
    target = destination(_names(), address, port, own_port=15001)
    assert (target.host, target.port) == (host, port)
    assert str(target) == shown


@pytest.mark.parametrize(
    ("address", "port", "words"),
    [
        ("198.18.9.9", 80, "198.18.9.9 is in the namespace's fake range 198.18.0.0/15 but no name"),
        ("127.0.0.1", 15001, "reached the agent itself"),
        ("::1", 15001, "reached the agent itself"),
    ],
)
def test_no_destination(address: str, port: int, words: str) -> None:
    with pytest.raises(NoDestinationError, match=words):
        destination(_names(), address, port, own_port=15001)
    assert issubclass(NoDestinationError, ConnectionRefusedError)


def test_destination_is_frozen() -> None:
    d = Destination("a.test", 1, "198.18.0.1:1")
    with pytest.raises(AttributeError):
        d.port = 2  # type: ignore[misc]


async def _echo_server() -> asyncio.AbstractServer:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()  # answer the half-close with ours
        await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def _relay_to(target: tuple[str, int] | None, delay: float,
                    refusals: list[BaseException]) -> asyncio.AbstractServer:
    """A listener whose connections are held, then relayed to `target` (None: refused)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def dial(_pending: Pending) -> Callable[..., object]:
        async def connect(factory: Callable[[], Half]) -> tuple[asyncio.BaseTransport, Half]:
            await asyncio.sleep(delay)  # the gateway takes a while: the program writes first
            if target is None:
                raise PermissionError(13, "tether: denied (rule: deny x)")
            transport, half = await loop.create_connection(factory, *target)
            return transport, half

        return connect

    return await loop.create_server(
        lambda: Pending(dial, lambda _p, exc: refusals.append(exc), tasks),  # type: ignore[arg-type]
        "127.0.0.1", 0)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_relay_keeps_early_bytes_and_half_closes(loop_name: str) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: more than one read, flow control on the way

    async def main() -> bytes:
        echo = await _echo_server()
        port = echo.sockets[0].getsockname()[1]
        relay = await _relay_to(("127.0.0.1", port), 0.2, [])
        rport = relay.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", rport)
        writer.write(payload)  # all sent while the relay still dials
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), TIMEOUT)  # until the echo's EOF
        writer.close()
        relay.close()
        echo.close()
        return got

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        assert runner.run(main()) == payload


@pytest.mark.parametrize("loop_name", LOOPS)
def test_refused_dial_resets_the_program(loop_name: str) -> None:
    refusals: list[BaseException] = []

    async def main() -> None:
        relay = await _relay_to(None, 0.0, refusals)
        rport = relay.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", rport)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        relay.close()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(main())
    assert [type(e) for e in refusals] == [PermissionError]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_target_reset_reaches_the_program_as_a_reset(loop_name: str) -> None:
    async def main() -> None:
        async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

        target = await asyncio.start_server(slam, "127.0.0.1", 0)
        relay = await _relay_to(("127.0.0.1", target.sockets[0].getsockname()[1]), 0.0, [])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", relay.sockets[0].getsockname()[1])
        writer.write(b"x")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        relay.close()
        target.close()

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(main())
