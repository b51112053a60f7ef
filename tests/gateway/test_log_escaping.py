"""Client-supplied strings cannot forge log or audit lines.

Issue 13: a newline in ``ClientHello.client_version`` or in an ``Error``
message wrote a forged line into the gateway log. Every client field that
reaches a line is now escaped: the gateway log uses repr (or JSON, in the
pre-auth summary), the audit log JSON. Table-driven: each nasty value in
each field gives exactly one line per event, and the value comes back out
of it unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Iterator

import pytest
from support import FakeClock, StdSocket, wait_for

from tether.config import parse_config
from tether.gateway.embedded import EmbeddedGateway
from tether.wire import PROTOCOL_VERSION, Connection, Role, pb

NASTY = {
    "newline": "v1\n2026-12-04 12:00:00,000 INFO tether.gateway: forged",
    "carriage return": "v1\rforged",
    "ansi": "v1\x1b[2K\x1b[31mforged",
    "nul": "v1\x00forged",
    "line separator": "v1\u2028forged",
    "paragraph separator": "v1\u2029forged",
    "next line": "v1\x85forged",
    "vertical tab": "v1\x0bforged",
    "bidi override": "v1\u202eforged",
}
# What may not appear raw in a line: line breaks (str.splitlines'), and the
# escapes a terminal would act on.
FORBIDDEN = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x1b\x00"


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def gw(clock: FakeClock) -> Iterator[EmbeddedGateway]:
    config = parse_config({
        "gateway": {"listen": ["127.0.0.1:0"], "auth_max_delay": 0},
        "resolver": {"mode": "static"},
        "policy": {"allow": ["127.0.0.0/8:*"]},
        "apps": {"a": {"key": "key-a"}},
    })
    gateway = EmbeddedGateway(config, clock=clock)
    gateway.start()
    yield gateway
    gateway.stop()


@contextlib.contextmanager
def stream(gw: EmbeddedGateway) -> Iterator[tuple[socket.socket, Connection]]:
    endpoint = gw.endpoints[0]
    with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect((endpoint.host, endpoint.port))
        yield sock, Connection(Role.CLIENT)


def after_hello(gw: EmbeddedGateway, message: pb.Error | pb.Connect) -> None:
    """Hello as app "a", then `message`; wait for the gateway's answer (or its close)."""
    with stream(gw) as (sock, wire):
        sock.sendall(
            wire.send(pb.ClientHello(protocol_version=PROTOCOL_VERSION, app="a", key="key-a"))
            + wire.send(message)
        )
        with contextlib.suppress(ConnectionResetError):
            sock.recv(65536)


def until_closed(sock: socket.socket) -> None:
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(65536):
            pass


def lines(caplog: pytest.LogCaptureFixture, marker: str) -> list[str]:
    """Every captured line (as a handler would write it) that mentions `marker`."""
    return [m for r in caplog.records if marker in (m := r.getMessage())]


def assert_one_line(text: str) -> None:
    assert not any(c in text for c in FORBIDDEN), repr(text)
    assert len(text.splitlines()) == 1


@pytest.mark.parametrize("value", list(NASTY.values()), ids=list(NASTY))
def test_client_version_of_a_refused_hello(
        gw: EmbeddedGateway, caplog: pytest.LogCaptureFixture, value: str) -> None:
    caplog.set_level(logging.INFO, "tether")
    with stream(gw) as (sock, wire):
        sock.sendall(wire.send(pb.ClientHello(protocol_version=PROTOCOL_VERSION + 98, app="a",
                                              key="key-a", client_version=value)))
        until_closed(sock)
    assert wait_for(lambda: bool(lines(caplog, "protocol version 99 refused")))
    (line,) = lines(caplog, "protocol version 99 refused")
    assert_one_line(line)
    assert f"(client {value!r})" in line


@pytest.mark.parametrize("value", list(NASTY.values()), ids=list(NASTY))
def test_an_error_message_from_the_client(
        gw: EmbeddedGateway, caplog: pytest.LogCaptureFixture, value: str) -> None:
    caplog.set_level(logging.INFO, "tether")
    after_hello(gw, pb.Error(code=pb.Error.PROTOCOL, message=value))
    assert wait_for(lambda: bool(lines(caplog, "sent an error")))
    (line,) = lines(caplog, "sent an error")
    assert_one_line(line)
    assert line.endswith(f"sent an error: {value!r}")


@pytest.mark.parametrize("value", list(NASTY.values()), ids=list(NASTY))
def test_a_host_name_in_the_audit_decision(
        gw: EmbeddedGateway, caplog: pytest.LogCaptureFixture, value: str) -> None:
    caplog.set_level(logging.INFO, "tether")
    after_hello(gw, pb.Connect(transport=pb.TRANSPORT_TCP, family=pb.FAMILY_INET,
                               host=value, port=80))
    assert wait_for(lambda: bool(lines(caplog, '"event":"decision"')))
    (line,) = lines(caplog, '"event":"decision"')
    assert_one_line(line)
    decision = json.loads(line)
    assert (decision["host"], decision["outcome"]) == (value, "denied")


@pytest.mark.parametrize("value", list(NASTY.values()), ids=list(NASTY))
def test_a_bad_preamble_in_the_protocol_error_line(
        gw: EmbeddedGateway, caplog: pytest.LogCaptureFixture, value: str) -> None:
    caplog.set_level(logging.INFO, "tether")
    raw = value.encode()[:4]
    with stream(gw) as (sock, _wire):
        sock.sendall(raw)
        until_closed(sock)
    assert wait_for(lambda: bool(lines(caplog, "protocol error")))
    (line,) = lines(caplog, "protocol error")
    assert_one_line(line)
    assert repr(raw) in line.encode().decode("unicode_escape")


def test_app_names_in_the_failed_authentication_summary(
        gw: EmbeddedGateway, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tether")
    clock.advance(3600)  # a window of its own
    for value in NASTY.values():
        with stream(gw) as (sock, wire):
            sock.sendall(wire.send(pb.ClientHello(protocol_version=PROTOCOL_VERSION, app=value,
                                                  key="wrong")))
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        wire.receive_data(reply)
        hello = wire.next_event()
        # The refusal the app reads quotes the name the same way.
        assert isinstance(hello, pb.ServerHello)
        assert hello.error.message == f"tether: app {value!r} authentication failed"
    clock.advance(3600)
    assert gw.gateway is not None
    gw.call(gw.gateway.guard.tick)  # what its timer does once the window is over
    (line,) = lines(caplog, "pre-auth summary")
    assert_one_line(line)
    summary = json.loads(line.removeprefix("pre-auth summary: "))
    assert sorted(app for app, _peer, _n in summary["failed_by"]) == sorted(NASTY.values())
