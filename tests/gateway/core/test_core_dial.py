"""dial(): the outbound connect, its timeout and its audit line (core.dial).

On the gateway's own event loop (uvloop when installed), to loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
import tomllib
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from support import FakeClock

from tether.config import parse_config
from tether.gateway.core.errors import DialTimeout, Refusal
from tether.gateway.core.gateway import GatewayCore
from tether.gateway.core.registry import SocketState
from tether.gateway.server import new_event_loop
from tether.policy import Decision, Transport

T = TypeVar("T")

CONFIG = """
[policy]
allow = ["127.0.0.0/8:*"]

[apps.a]
key = "key-a"
"""


@pytest.fixture
def core() -> GatewayCore:
    return GatewayCore(parse_config(tomllib.loads(CONFIG)), clock=FakeClock())


def run(core: GatewayCore, coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        core.loop = runner.get_loop()
        return runner.run(coro)


async def admitted(core: GatewayCore, port: int) -> Decision:
    result = await core.admit("a", "127.0.0.1", port, Transport.TCP, socket.AF_UNSPEC)
    assert not isinstance(result, Refusal)
    return result[0]


def outcomes(caplog: pytest.LogCaptureFixture) -> list[object]:
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tether.audit"]
    return [line["outcome"] for line in lines if line["event"] == "decision"]


@pytest.fixture
def full_listener() -> Iterator[int]:
    """A loopback port whose accept queue is full: a new SYN is dropped, the connect hangs."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):  # Linux queues backlog + 1; one more to be sure
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port


def test_dial_connects_and_registers(core: GatewayCore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="tether.audit")

    async def go() -> tuple[object, ...]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        task = asyncio.current_task()
        assert task is not None
        link = await core.dial(await admitted(core, port), ["127.0.0.1"], [], 5.0, task)
        record = link.record
        seen = (record.peer[:2], record.state, record.app, record in core.registry)
        link.abort("test over")
        server.close()
        await server.wait_closed()
        return seen

    peer, state, app, registered = run(core, go())
    assert peer[0] == "127.0.0.1" and state is SocketState.ATTACHED
    assert app == "a" and registered
    assert outcomes(caplog) == ["connected"]


def test_dial_refused_is_an_os_error(core: GatewayCore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="tether.audit")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: the connect is refused

        async def go() -> None:
            task = asyncio.current_task()
            assert task is not None
            await core.dial(await admitted(core, port), ["127.0.0.1"], [], 5.0, task)

        with pytest.raises(ConnectionRefusedError) as info:
            run(core, go())
    assert info.value.errno == errno.ECONNREFUSED
    assert outcomes(caplog) == ["connect failed: Connection refused"]
    assert len(core.registry) == 0


def test_dial_times_out(
    core: GatewayCore, caplog: pytest.LogCaptureFixture, full_listener: int
) -> None:
    caplog.set_level("INFO", logger="tether.audit")

    async def go() -> str:
        task = asyncio.current_task()
        assert task is not None
        decision = await admitted(core, full_listener)
        try:
            await core.dial(decision, ["127.0.0.1"], [], 0.2, task)
        except DialTimeout as exc:
            # The timeout's cancellation became this error: the task runs on.
            await asyncio.sleep(0)
            return str(exc)
        raise AssertionError("the connect did not time out")

    message = run(core, go())
    assert message == (
        f"[Errno {errno.ETIMEDOUT}] timed out connecting to 127.0.0.1:{full_listener} after 0.2 s"
    )
    assert outcomes(caplog) == ["connect timed out after 0.2 s"]
    assert not core._expired and len(core.registry) == 0


def test_a_cancelled_dial_is_not_a_timeout(
    core: GatewayCore, caplog: pytest.LogCaptureFixture, full_listener: int
) -> None:
    """The app's stream went away mid-connect: the cancellation propagates, nothing is logged."""
    caplog.set_level("INFO", logger="tether.audit")

    async def go() -> bool:
        decision = await admitted(core, full_listener)

        async def dialling() -> None:
            task = asyncio.current_task()
            assert task is not None
            await core.dial(decision, ["127.0.0.1"], [], 30.0, task)

        task = asyncio.get_running_loop().create_task(dialling())
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert run(core, go())
    assert outcomes(caplog) == []

