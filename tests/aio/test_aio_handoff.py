"""Handing a connection opened with asyncio to another process (tether.aio.hand_off / resume).

A peer on loopback sends a deterministic stream; the app reads part of it
on one loop (so more sits in its StreamReader's buffer, and more in the
kernel), hands the connection off, and a spawned process resumes it as a
(reader, writer) pair on the same kind of loop: it must read exactly the
bytes the app had not, then talk with the peer on the same connection. The
state works once.
"""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import pickle
import queue
import socket
from typing import Any

import pytest
from aiosupport import Runner, resume_in_child
from support import Gateway, Peer, stream

import tether.aio

CTX = multiprocessing.get_context("spawn")
SEED = b"aio-handoff"
FIRST = 200_000  # sent at once: more than a StreamReader buffers (64 KiB limit)
READ_BEFORE = 30_000  # what the app reads before handing off
REPLY = b"from the resumed side\n"
AFTER = stream(SEED, FIRST, 50_000)
TIMEOUT = 30.0


def peer(conn: socket.socket) -> None:
    conn.sendall(stream(SEED, 0, FIRST))
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1)
        assert chunk, "the resumed side never spoke"
        line += chunk
    assert line == REPLY, line
    conn.sendall(AFTER)
    assert conn.recv(1) == b""  # the resumed side closes


@pytest.mark.parametrize("how", ["writer", "transport"])
def test_hand_off_to_another_process(
    run: Runner[Any], request: pytest.FixtureRequest, tethered: Gateway, how: str
) -> None:
    kind = request.node.callspec.params["run"]
    with Peer(peer) as target:

        async def main() -> tether.aio.HandoffState:
            reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
            assert await reader.readexactly(READ_BEFORE) == stream(SEED, 0, READ_BEFORE)
            # Let the reader fill its buffer from the kernel before the handoff.
            await asyncio.sleep(0.2)
            assert len(reader._buffer) > 0  # type: ignore[attr-defined]
            state = await tether.aio.hand_off(writer if how == "writer" else writer.transport)
            assert writer.transport.is_closing()
            with pytest.raises(OSError) as info:
                await tether.aio.hand_off(writer)
            assert info.value.errno == errno.EBADF
            return state

        state = run(main())
        results: multiprocessing.Queue[str] = CTX.Queue()
        expect = stream(SEED, READ_BEFORE, FIRST - READ_BEFORE)
        if how == "transport":
            # Given the transport alone, what its reader holds stays the app's.
            expect = expect[len(expect) - len(state.tail) :]
        child = CTX.Process(
            target=resume_in_child,
            args=(kind, tethered.address, tethered.app, tethered.key, pickle.dumps(state),
                  expect, REPLY, AFTER, results),
        )
        child.start()
        try:
            outcome = results.get(timeout=TIMEOUT)
        except queue.Empty:
            outcome = "the child did not answer"
        child.join(TIMEOUT)
        if child.is_alive():
            child.kill()
            child.join()
        assert outcome == "ok", outcome

    # A state resumes once.
    async def again() -> None:
        with pytest.raises(OSError):
            await tether.aio.resume(state)

    run(again())


def test_a_tls_connection_is_not_handed_off(
    run: Runner[Any], tls_ca: Any, https_server: Any, tethered: Gateway
) -> None:
    from tether.demo.servers import client_context

    async def main() -> None:
        _, writer = await asyncio.open_connection(
            "www.test", https_server.port, ssl=client_context(tls_ca[0])
        )
        with pytest.raises(OSError, match="TLS connection cannot be handed off"):
            await tether.aio.hand_off(writer)
        writer.close()
        await writer.wait_closed()

    run(main())


def test_resume_transport_in_this_process(run: Runner[Any], tethered: Gateway) -> None:
    with Peer(peer) as target:

        async def main() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
            assert await reader.readexactly(READ_BEFORE) == stream(SEED, 0, READ_BEFORE)
            state = await tether.aio.hand_off(writer)
            received = bytearray()
            done = asyncio.get_running_loop().create_future()

            class Collect(asyncio.Protocol):
                def data_received(self, data: bytes) -> None:
                    received.extend(data)
                    if len(received) >= FIRST - READ_BEFORE + len(AFTER):
                        done.set_result(None)

            transport, _ = await tether.aio.resume_transport(state, Collect)
            while len(received) < FIRST - READ_BEFORE:
                await asyncio.sleep(0.01)
            transport.write(REPLY)  # type: ignore[attr-defined]
            await asyncio.wait_for(done, TIMEOUT)
            assert bytes(received) == stream(SEED, READ_BEFORE, FIRST - READ_BEFORE) + AFTER
            transport.close()

        run(main())
