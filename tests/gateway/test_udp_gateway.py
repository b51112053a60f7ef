"""The gateway's side of UDP: metering, audit lines, idle reclamation, limits.

An in-thread gateway with an injectable clock (as tests/gateway/test_idle.py),
so reclamation is tested without sleeping. Loopback only.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
from collections.abc import Iterator

import pytest
from udpsupport import IDLE, TIMEOUT, UdpEnv, udp_env, wait_for

import tether
import tether.socket as tsock
from tether.gateway import udp


@pytest.fixture
def env() -> Iterator[UdpEnv]:
    with udp_env() as e:
        yield e


def _audit(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, object]]:
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tether.audit"]
    return [line for line in lines if line["event"] == event]


def test_bytes_and_datagrams_are_metered_with_one_close_line(
    env: UdpEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tether.audit")
    a, b = env.peers
    with tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        for size in (10, 100, 1000):
            s.sendto(b"x" * size, a.address)
            s.recvfrom(2048)
        s.sendto(b"y" * 7, b.address)
        s.recvfrom(64)
        [record] = env.records()
        assert (record.bytes_out, record.bytes_in) == (1117, 1117)
        assert record.extra["datagrams_out"] == record.extra["datagrams_in"] == 4
        assert record.extra["destinations"] == 2
    assert wait_for(lambda: bool(_audit(caplog, "close")))
    [close] = _audit(caplog, "close")
    assert close["transport"] == "udp"
    assert (close["bytes_out"], close["bytes_in"]) == (1117, 1117)
    assert close["datagrams_out"] == 4 and close["dropped_unsolicited"] == 0
    assert close["reason"] == "closed by the app"
    decisions = _audit(caplog, "decision")
    # One decision line per destination, not per datagram.
    assert [(d["port"], d["transport"], d["outcome"]) for d in decisions] == [
        (a.port, "udp", "allowed"),
        (b.port, "udp", "allowed"),
    ]
    assert {d["descriptor"] for d in decisions} == {close["descriptor"]}
    assert env.gw.call(lambda: env.gw.gateway.registry.usage["a"].bytes_out) == 1117  # type: ignore[union-attr]


def test_denied_destination_is_logged_and_counted(
    env: UdpEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tether.audit")
    with tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        with pytest.raises(PermissionError):
            s.sendto(b"no", ("127.0.0.1", 9))
    [decision] = _audit(caplog, "decision")
    assert (decision["verdict"], decision["outcome"], decision["port"]) == ("deny", "denied", 9)
    assert env.gw.call(lambda: env.gw.gateway.registry.usage["a"].connects_denied) == 1  # type: ignore[union-attr]


def test_idle_association_is_reclaimed_and_the_app_is_told(
    env: UdpEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tether.audit")
    peer = env.peers[0]
    s = tsock.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(TIMEOUT)
        s.sendto(b"hi", peer.address)
        s.recvfrom(8)
        env.clock.advance(IDLE / 2)
        s.sendto(b"traffic resets the clock", peer.address)
        s.recvfrom(64)
        env.clock.advance(IDLE / 2 + 1)
        assert env.sweep() == 0
        env.clock.advance(IDLE)
        assert env.sweep() == 1
        assert not env.records()
        stream = s._udp.stream  # type: ignore[attr-defined]
        assert wait_for(lambda: bool(stream.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)))
        with pytest.raises(ConnectionResetError, match="reclaimed by the gateway after") as info:
            s.sendto(b"late", peer.address)
        assert info.value.errno == errno.ECONNRESET
        with pytest.raises(ConnectionResetError, match="reclaimed"):
            s.sendto(b"to a new destination", env.peers[1].address)
        assert [d for d, _ in peer.received] == [b"hi", b"traffic resets the clock"]
    finally:
        s.close()
    [close] = _audit(caplog, "close")
    assert str(close["reason"]).startswith("reclaimed by the gateway after")


def test_keepalive_requests_reset_the_idle_clock(env: UdpEnv) -> None:
    with tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        s.sendto(b"x", env.peers[0].address)
        s.recvfrom(8)
        env.clock.advance(IDLE - 1)
        # A control request on the association (here: a new destination) is activity.
        s.sendto(b"y", env.peers[1].address)
        s.recvfrom(8)
        env.clock.advance(IDLE - 1)
        assert env.sweep() == 0
        assert len(env.records()) == 1


def test_tether_keepalive_resets_a_udp_sockets_idle_clock(env: UdpEnv) -> None:
    with tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with pytest.raises(OSError) as info:
            tether.keepalive(s)  # nothing to keep alive yet
        assert info.value.errno == errno.ENOTCONN
        s.settimeout(TIMEOUT)
        s.sendto(b"x", env.peers[0].address)
        s.recvfrom(8)
        env.clock.advance(IDLE - 1)
        tether.keepalive(s)
        env.clock.advance(IDLE - 1)
        assert env.sweep() == 0
        env.clock.advance(2)
        assert env.sweep() == 1


def test_destinations_per_socket_are_bounded(env: UdpEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp, "MAX_DESTINATIONS", 1)
    with tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        s.sendto(b"x", env.peers[0].address)
        with pytest.raises(OSError, match="destinations") as info:
            s.sendto(b"y", env.peers[1].address)
        assert info.value.errno == errno.ENOBUFS
        s.sendto(b"z", env.peers[0].address)  # known destinations keep working
        assert s.recvfrom(8)[0] == b"x"


def test_gateway_shutdown_closes_associations() -> None:
    with udp_env() as env:
        s = tsock.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.settimeout(TIMEOUT)
            s.sendto(b"x", env.peers[0].address)
            s.recvfrom(8)
            env.gw.stop()
            with pytest.raises(ConnectionResetError, match="gateway shutting down"):
                s.sendto(b"after", env.peers[0].address)
        finally:
            s.close()
