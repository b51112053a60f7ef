"""Socket states, lookups and what `tether sockets` lists (core.registry, core.inspect)."""

from __future__ import annotations

import errno

import pytest
from support import FakeClock

from tether.gateway.core import inspect
from tether.gateway.core.errors import Refusal
from tether.gateway.core.registry import TOMBSTONE_TTL, Registry, SocketState
from tether.wire import pb


@pytest.mark.parametrize(
    ("state", "value"),
    [
        (SocketState.ATTACHED, "attached"),
        (SocketState.DETACHING, "detaching"),
        (SocketState.HANDED_OFF, "handed-off"),
    ],
)
def test_state_values_are_what_the_wire_and_logs_carry(state: SocketState, value: str) -> None:
    assert state == value
    assert f"{state}" == value and str(state) == value
    assert pb.SocketInfo(state=state).state == value


def test_the_states_are_exactly_these() -> None:
    assert [s.value for s in SocketState] == ["attached", "detaching", "handed-off"]


def test_a_new_socket_is_attached() -> None:
    registry = Registry(FakeClock())
    record = registry.add("a", ("127.0.0.1", 80), ("127.0.0.1", 5000), "tcp", 600.0)
    assert record.state is SocketState.ATTACHED


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> Registry:
    return Registry(clock)


def test_live_and_gone(registry: Registry, clock: FakeClock) -> None:
    mine = registry.add("a", ("127.0.0.1", 80), ("127.0.0.1", 5000), "tcp", 600.0)
    theirs = registry.add("b", ("127.0.0.1", 81), ("127.0.0.1", 5001), "tcp", 600.0)
    closed = registry.add("a", ("::1", 82, 0, 0), ("::1", 5002, 0, 0), "tcp", 600.0)
    closed.finish("reclaimed by the gateway after 600 s idle")
    assert inspect.live(registry, "a", mine.descriptor) is mine

    cases = [
        (theirs.descriptor, pb.Error.PERMISSION_DENIED, errno.EACCES,
         f"tether: socket {theirs.descriptor[:8]}... belongs to another app; "
         "app 'a' may not use it"),
        (closed.descriptor, pb.Error.CLOSED, errno.ECONNRESET,
         "tether: socket to [::1]:82 was reclaimed by the gateway after 600 s idle"),
        ("nosuchdescriptor", pb.Error.NOT_FOUND, errno.EBADF,
         "tether: no socket nosuchde... for app 'a'"),
    ]
    for descriptor, code, err, message in cases:
        refusal = inspect.live(registry, "a", descriptor)
        assert isinstance(refusal, Refusal)
        assert (refusal.code, refusal.errno, refusal.message) == (code, err, message)
    # A tombstone answers for TOMBSTONE_TTL, then the socket is unknown.
    clock.advance(TOMBSTONE_TTL + 1)
    late = inspect.live(registry, "a", closed.descriptor)
    assert isinstance(late, Refusal) and late.code == pb.Error.NOT_FOUND


def test_close_reason(registry: Registry) -> None:
    record = registry.add("a", ("127.0.0.1", 80), ("127.0.0.1", 5000), "tcp", 600.0)
    assert inspect.close_reason(registry, "a", record.descriptor) == "open (attached)"
    record.state = SocketState.HANDED_OFF
    assert inspect.close_reason(registry, "a", record.descriptor) == "open (handed-off)"
    record.finish("closed by the peer")
    assert inspect.close_reason(registry, "a", record.descriptor) == "closed by the peer"
    unknown = inspect.close_reason(registry, "a", "x" * 22)
    assert isinstance(unknown, Refusal) and unknown.code == pb.Error.NOT_FOUND


def test_list_sockets_own_or_every_app(registry: Registry, clock: FakeClock) -> None:
    tcp = registry.add("a", ("127.0.0.1", 80), ("127.0.0.1", 5000), "tcp", 600.0)
    udp = registry.add("b", ("::1", 53, 0, 0), ("::", 6000, 0, 0), "udp", 600.0)
    clock.advance(30)
    tcp.touch()
    tcp.bytes_out, tcp.bytes_in = 10, 20
    clock.advance(5)
    own = inspect.list_sockets(registry, "a", every_app=False)
    assert own == [pb.SocketInfo(
        app="a", descriptor_prefix=tcp.descriptor[:8],
        peer=pb.Address(family=pb.FAMILY_INET, host="127.0.0.1", port=80),
        state="attached", bytes_out=10, bytes_in=20, idle_seconds=5.0, age_seconds=35.0,
        transport=pb.TRANSPORT_TCP,
    )]
    every = inspect.list_sockets(registry, "*", every_app=True)
    assert [(i.app, i.descriptor_prefix, i.transport, i.peer.host) for i in every] == [
        ("a", tcp.descriptor[:8], pb.TRANSPORT_TCP, "127.0.0.1"),
        ("b", udp.descriptor[:8], pb.TRANSPORT_UDP, "::1"),
    ]
