"""Whether a socket may be detached or resumed, and the words when not (core.handoff).

The relay's part (moving the streams) is tested end to end in
tests/client/test_handoff.py; here the decisions, with no sockets.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any, cast

import pytest
from support import FakeClock

from tether.gateway.core import handoff
from tether.gateway.core.errors import Refusal
from tether.gateway.core.registry import Registry, SocketRecord, SocketState
from tether.gateway.relay import MAX_RESUME_TAIL, Link
from tether.wire import pb


@pytest.fixture
def registry() -> Registry:
    return Registry(FakeClock())


def handed_off(registry: Registry, token: str = "tok-1") -> SocketRecord:
    record = registry.add("a", ("127.0.0.1", 80), ("127.0.0.1", 5000), "tcp", 600.0)
    Link(cast(Any, None), None).bind(record)  # no transports: only the state matters here
    record.state = SocketState.HANDED_OFF
    record.token = token
    return record


def resume(registry: Registry, descriptor: str, token: str, tail: int = 0) -> object:
    return asyncio.run(handoff.resumable(registry, "a", descriptor, token, tail))


def test_resume_with_the_token(registry: Registry) -> None:
    record = handed_off(registry)
    assert resume(registry, record.descriptor, "tok-1") is record


def test_resume_refusals(registry: Registry) -> None:
    record = handed_off(registry)
    d = record.descriptor
    cases: list[tuple[str, str, int, int, int, str]] = [
        ("unknown", "tok-1", 0, pb.Error.NOT_FOUND, errno.EBADF,
         "tether: no socket unknown... for app 'a'"),
        (d, "tok-1", MAX_RESUME_TAIL + 1, pb.Error.INVALID_REQUEST, errno.EMSGSIZE,
         f"tether: resuming socket {d[:8]}...: a tail of {MAX_RESUME_TAIL + 1} bytes is "
         f"over the gateway's limit of {MAX_RESUME_TAIL}"),
        (d, "tok-2", 0, pb.Error.INVALID_REQUEST, errno.EINVAL,
         f"tether: socket {d[:8]}... is handed-off; this handoff cannot be resumed"),
    ]
    for descriptor, token, tail, code, err, message in cases:
        refusal = resume(registry, descriptor, token, tail)
        assert isinstance(refusal, Refusal), descriptor
        assert (refusal.code, refusal.errno, refusal.message) == (code, err, message)
    # The oversize tail was refused before the token was looked at: it is still good.
    assert resume(registry, d, "tok-1") is record


def test_a_second_resume_is_already_resumed(registry: Registry) -> None:
    record = handed_off(registry)
    record.state = SocketState.ATTACHED  # what Link.attach() does
    refusal = resume(registry, record.descriptor, "tok-1")
    assert isinstance(refusal, Refusal)
    assert (refusal.code, refusal.errno) == (pb.Error.ALREADY_RESUMED, errno.EALREADY)
    assert refusal.message == (
        f"tether: socket {record.descriptor[:8]}... was already resumed: "
        "a pickled socket can be resumed once"
    )


def test_a_peer_that_left_while_detaching_is_gone(registry: Registry) -> None:
    record = handed_off(registry)
    record.state = SocketState.DETACHING
    link = record.link
    assert link is not None

    async def run() -> object:
        settled = link.settled = asyncio.Event()

        def peer_leaves() -> None:  # while the Resume waits for the old holder
            record.finish("closed by the peer")
            settled.set()

        asyncio.get_running_loop().call_soon(peer_leaves)
        return await handoff.resumable(registry, "a", record.descriptor, "tok-1", 0)

    refusal = asyncio.run(run())
    assert isinstance(refusal, Refusal)
    assert refusal.code == pb.Error.CLOSED
    assert refusal.message == "tether: socket to 127.0.0.1:80 was closed by the peer"


@pytest.mark.parametrize("state", [SocketState.DETACHING, SocketState.HANDED_OFF])
def test_detach_only_an_attached_socket(registry: Registry, state: SocketState) -> None:
    record = handed_off(registry)
    record.state = state
    refusal = handoff.detach(record)
    assert isinstance(refusal, Refusal)
    assert (refusal.code, refusal.errno) == (pb.Error.INVALID_REQUEST, errno.EINVAL)
    assert refusal.message == (
        f"tether: socket {record.descriptor[:8]}... is {state.value}, "
        "not attached: it cannot be handed off now"
    )
