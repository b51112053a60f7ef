"""Pre-auth protection: the handshake deadline, the pre-auth caps, failed-auth throttling.

An in-thread gateway with a fake clock and raw-wire clients. The guard's
windows, deadlines and lockouts follow the gateway's clock, so nothing here
sleeps for them: a test moves the clock and has the guard look (tick()), as
its timer would once the time had really passed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import FakeClock, StdSocket, wait_for

from tether.config import parse_config
from tether.gateway.core import auth
from tether.gateway.embedded import EmbeddedGateway
from tether.wire import PROTOCOL_VERSION, Connection, Role, pb

KEY = "key-a"


@contextlib.contextmanager
def gateway(clock: FakeClock, listen: str = "127.0.0.1:0", **settings: Any
            ) -> Iterator[EmbeddedGateway]:
    config = parse_config({
        "gateway": {"listen": [listen], **settings},
        "resolver": {"mode": "static"},
        "policy": {"allow": ["127.0.0.0/8:*"]},
        "apps": {"a": {"key": KEY}, "b": {"key": "key-b"}},
    })
    gw = EmbeddedGateway(config, clock=clock)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def connect(gw: EmbeddedGateway, source: str = "127.0.0.1") -> socket.socket:
    endpoint = gw.endpoints[0]
    if endpoint.is_unix:
        sock = StdSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(endpoint.path)
        return sock
    sock = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((endpoint.host, endpoint.port))
    return sock


def first_answer(sock: socket.socket) -> pb.ServerHello | pb.Error | None:
    """The gateway's first message on `sock`, or None if it closed without one."""
    wire = Connection(Role.CLIENT)
    wire.send(pb.ClientHello(protocol_version=PROTOCOL_VERSION))  # the client side's order
    while True:
        event = wire.next_event()
        if isinstance(event, pb.ServerHello | pb.Error):
            return event
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        wire.receive_data(chunk)


def hello(gw: EmbeddedGateway, key: str = KEY, app: str = "a",
          source: str = "127.0.0.1") -> pb.ServerHello | pb.Error | None:
    with connect(gw, source) as sock:
        wire = Connection(Role.CLIENT)
        sock.sendall(wire.send(pb.ClientHello(protocol_version=PROTOCOL_VERSION, app=app,
                                              key=key)))
        return first_answer(sock)


def accepted(answer: object) -> bool:
    return isinstance(answer, pb.ServerHello) and not answer.HasField("error")


def guard(gw: EmbeddedGateway) -> auth.Guard:
    assert gw.gateway is not None
    return gw.gateway.guard


def tick(gw: EmbeddedGateway) -> None:
    gw.call(guard(gw).tick)


def pending(gw: EmbeddedGateway) -> int:
    return gw.call(lambda: len(guard(gw).pending))


def assert_limited(socks: list[socket.socket], rule: str, value: int) -> None:
    """Each of `socks` was closed with a LIMIT error naming `rule` and its `value`."""
    for sock in socks:
        answer = first_answer(sock)
        assert isinstance(answer, pb.Error) and answer.code == pb.Error.LIMIT, answer
        assert (answer.rule, answer.reason) == (rule, str(value))


def summaries(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    found = []
    for record in caplog.records:
        message = record.getMessage()
        if message.startswith("pre-auth summary: "):
            found.append(json.loads(message.removeprefix("pre-auth summary: ")))
    return found


# The numbers: 2,000 streams that send nothing or half a hello.
SILENT, HALF = 1_500, 500


def test_silent_and_half_hello_streams_are_closed_at_the_deadline(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tether.gateway")
    clock = FakeClock()
    total = SILENT + HALF
    # The caps are another test's: here only the deadline may close a stream.
    with gateway(clock, handshake_timeout=5, preauth_limit=2 * total,
                 preauth_limit_per_peer=2 * total) as gw:
        silent = [connect(gw) for _ in range(SILENT)]
        half = [connect(gw) for _ in range(HALF)]
        for sock in half:  # the preamble and part of a hello's frame
            sock.sendall(b"TTHR\x00\x00\x00\x20\x0a")
        assert wait_for(lambda: pending(gw) == total)
        clock.advance(4.9)
        tick(gw)
        assert pending(gw) == total  # not yet
        # An authenticated stream is not the deadline's, however long it waits.
        with connect(gw) as good:
            wire = Connection(Role.CLIENT)
            good.sendall(wire.send(pb.ClientHello(protocol_version=PROTOCOL_VERSION, app="a",
                                                  key=KEY)))
            assert accepted(first_answer(good))
            clock.advance(0.2)
            tick(gw)
            assert pending(gw) == 0
            for sock in silent + half:
                answer = first_answer(sock)
                assert isinstance(answer, pb.Error), answer
                assert answer.code == pb.Error.TIMEOUT
                assert answer.message == (
                    "tether: no hello within 5 s (gateway.handshake_timeout)")
                sock.close()
            good.sendall(wire.send(pb.Request(id=1, list_sockets=pb.ListSockets())))
            good.settimeout(5)
            assert good.recv(65536), "the authenticated stream was closed"
        # One summary line for the window, not one line per stream.
        clock.advance(60)
        tick(gw)
        tick(gw)
        (summary,) = summaries(caplog)
        assert summary["timed_out"] == total
        assert summary["timed_out_by"] == [["127.0.0.1", total]]
        assert not [r for r in caplog.records if "timed out" in r.getMessage().lower()
                    and not r.getMessage().startswith("pre-auth summary")]


def test_over_the_limit_the_oldest_silent_stream_makes_room() -> None:
    clock = FakeClock()
    with gateway(clock, preauth_limit=50, preauth_limit_per_peer=1000) as gw:
        socks = [connect(gw) for _ in range(110)]
        # A burst younger than auth.GRACE may reach twice the limit; past
        # that the oldest goes at once.
        assert wait_for(lambda: pending(gw) == 100)
        # The guard's loop timer may fire first (it runs on real time): the
        # core's clock decides, and it says the burst is still fresh.
        tick(gw)
        assert pending(gw) == 100
        # Once they are stale, the limit holds.
        clock.advance(auth.GRACE + 0.5)
        tick(gw)
        assert pending(gw) == 50
        assert_limited(socks[:60], "gateway.preauth_limit", 50)
        # A legitimate client still gets in (its hello arrives with its connect).
        for _ in range(20):
            assert accepted(hello(gw))
        for sock in socks:
            sock.close()


def test_per_peer_limit_spares_fresh_streams_and_other_peers() -> None:
    clock = FakeClock()
    with gateway(clock, preauth_limit_per_peer=20) as gw:
        one = [connect(gw, "127.0.0.1") for _ in range(30)]
        other = [connect(gw, "127.0.0.2") for _ in range(10)]
        assert wait_for(lambda: pending(gw) == 40)
        tick(gw)
        assert pending(gw) == 40  # a burst younger than auth.GRACE is left alone
        clock.advance(auth.GRACE + 0.5)
        tick(gw)
        assert pending(gw) == 30
        assert_limited(one[:10], "gateway.preauth_limit_per_peer", 20)
        assert pending(gw) == 30  # 127.0.0.1's newest 20 and all of 127.0.0.2's
        for sock in one + other:
            sock.close()


def test_wrong_keys_are_locked_out_per_app_and_peer(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tether")
    clock = FakeClock()
    with gateway(clock, auth_failure_limit=5, auth_max_delay=0, auth_failure_window=60,
                 auth_lockout=300) as gw:
        started = time.monotonic()
        answers = [hello(gw, key=f"guess-{i}") for i in range(10_000)]
        elapsed = time.monotonic() - started
        assert all(isinstance(a, pb.ServerHello) and a.error.code == pb.Error.AUTH_FAILED
                   for a in answers)
        assert [a.error.message for a in answers[:5]] == [
            "tether: app 'a' authentication failed"] * 5
        locked = answers[5]
        assert isinstance(locked, pb.ServerHello)
        assert locked.error.message.startswith(
            "tether: app 'a' is locked out from 127.0.0.1 for 300 s more")
        # Locked out: the right key from that peer is refused too (no oracle) ...
        refused = hello(gw)
        assert isinstance(refused, pb.ServerHello) and "locked out" in refused.error.message
        # ... but not the same app from another peer, nor another app from this one.
        assert accepted(hello(gw, source="127.0.0.2"))
        assert accepted(hello(gw, app="b", key="key-b"))
        # 10,000 failures, and no line per failure: one summary per window.
        lines = [r.getMessage() for r in caplog.records if r.name == "tether.gateway"]
        assert len(lines) <= 2, lines
        clock.advance(60)
        tick(gw)
        (summary,) = summaries(caplog)
        assert summary["failed"] == 5
        assert summary["failed_by"] == [["a", "127.0.0.1", 5]]
        assert summary["refused_locked_out"] == 10_000 - 5 + 1
        assert summary["locked_out"] == [["a", "127.0.0.1", 240]]
        print(f"10,000 wrong keys in {elapsed:.1f} s; summary {summary}")
        # The lockout ends by the clock.
        clock.advance(241)
        assert accepted(hello(gw))


def test_failed_answers_wait_longer_and_longer() -> None:
    clock = FakeClock()
    with gateway(clock, auth_max_delay=0.4, auth_failure_limit=100) as gw:
        waits = []
        for _ in range(5):
            started = time.monotonic()
            answer = hello(gw, key="wrong")
            waits.append(time.monotonic() - started)
            assert isinstance(answer, pb.ServerHello) and answer.error.code == pb.Error.AUTH_FAILED
        expected = [0.0, 0.1, 0.2, 0.4, 0.4]
        for wait, want in zip(waits, expected, strict=True):
            assert want <= wait < want + 0.3, (waits, expected)
        # A right key is never delayed, even for an app under attack.
        started = time.monotonic()
        assert accepted(hello(gw))
        assert time.monotonic() - started < 0.2


def test_a_unix_peer_is_its_uid(tmp_path: Path) -> None:
    clock = FakeClock()
    with gateway(clock, listen=f"unix:{tmp_path}/gw.sock") as gw, connect(gw):
        assert wait_for(lambda: pending(gw) == 1)
        keys = gw.call(lambda: [s.peer_key() for s in guard(gw).pending])
        assert keys == [f"uid {os.getuid()}"]
