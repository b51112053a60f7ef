"""The SOCKS5 server machine (tether.proxy.socks5): table-driven cases and properties."""

from __future__ import annotations

import errno
import ipaddress
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.proxy import socks5
from tether.proxy.socks5 import (
    NEED_DATA,
    PAUSED,
    Auth,
    Closed,
    Greeting,
    Request,
    Socks5Error,
    Socks5Server,
    State,
)

GREETING_USERPASS = b"\x05\x02\x00\x02"  # offers no-auth and username/password
AUTH = b"\x01\x04test\x06secret"
CONNECT_NAME = b"\x05\x01\x00\x03\x08www.test\x00\x50"  # www.test:80
CONNECT_V4 = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x1f\x90"  # 127.0.0.1:8080
CONNECT_V6 = b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x01\xbb"  # [::1]:443
ASSOCIATE_ZERO = b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"  # 0.0.0.0:0


def _events(machine: Socks5Server) -> list[object]:
    out = []
    while True:
        event = machine.next_event()
        if event is NEED_DATA or event is PAUSED:
            return out
        out.append(event)


def _answer(machine: Socks5Server, event: object) -> bytes:
    if isinstance(event, Greeting):
        return machine.choose_method(socks5.USERPASS)
    if isinstance(event, Auth):
        return machine.auth_status(True)
    if isinstance(event, Request):
        return machine.reply(socks5.SUCCEEDED, ("127.0.0.1", 4242))
    return b""


def _drive(chunks: list[bytes]) -> tuple[list[object], bytes, Socks5Server]:
    """Feed `chunks`, answering every event with success; the events and all bytes sent."""
    machine = Socks5Server()
    events: list[object] = []
    sent = b""
    for chunk in chunks:
        if chunk:  # b"" is the end of the stream
            machine.receive_data(chunk)
        while True:
            event = machine.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            events.append(event)
            sent += _answer(machine, event)
            if isinstance(event, Closed):
                break
    return events, sent, machine


SUCCESS_REPLY = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x10\x92"


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (CONNECT_NAME, Request(socks5.CONNECT, "www.test", 80, socks5.ATYP_DOMAIN)),
        (CONNECT_V4, Request(socks5.CONNECT, "127.0.0.1", 8080, socks5.ATYP_IPV4)),
        (CONNECT_V6, Request(socks5.CONNECT, "::1", 443, socks5.ATYP_IPV6)),
        (ASSOCIATE_ZERO, Request(socks5.UDP_ASSOCIATE, "0.0.0.0", 0, socks5.ATYP_IPV4)),
    ],
)
def test_a_full_handshake_yields_each_event_and_the_answers(
    request_bytes: bytes, expected: Request
) -> None:
    events, sent, machine = _drive([GREETING_USERPASS + AUTH + request_bytes + b"early"])
    assert events == [Greeting((0, 2)), Auth("test", "secret"), expected]
    assert sent == b"\x05\x02" + socks5.AUTH_OK + SUCCESS_REPLY
    if expected.command == socks5.CONNECT:
        assert machine.state is State.RELAY
        assert machine.trailing_data == b"early"  # the client's optimistic data, kept in order
        assert machine.trailing_data == b""
    else:
        assert machine.state is State.ASSOCIATED
        machine.receive_data(b"ignored on an association's stream")
        assert machine.next_event() is NEED_DATA
        machine.receive_data(b"")
        assert machine.next_event() == Closed()


def test_no_auth_skips_the_subnegotiation() -> None:
    machine = Socks5Server()
    machine.receive_data(b"\x05\x01\x00" + CONNECT_V4)
    assert machine.next_event() == Greeting((0,))
    assert machine.next_event() is PAUSED
    assert machine.choose_method(socks5.NO_AUTH) == b"\x05\x00"
    assert machine.next_event() == Request(socks5.CONNECT, "127.0.0.1", 8080, socks5.ATYP_IPV4)


def test_no_acceptable_method_and_a_failed_auth_close_the_machine() -> None:
    machine = Socks5Server()
    machine.receive_data(b"\x05\x01\x00")
    machine.next_event()
    assert machine.choose_method(socks5.NO_ACCEPTABLE) == b"\x05\xff"
    assert machine.state is State.CLOSED
    machine = Socks5Server()
    machine.receive_data(GREETING_USERPASS + AUTH)
    machine.next_event()
    machine.choose_method(socks5.USERPASS)
    assert machine.next_event() == Auth("test", "secret")
    assert machine.auth_status(False) == socks5.AUTH_FAILED
    assert machine.state is State.CLOSED


def test_the_password_is_not_in_the_repr() -> None:
    assert "secret" not in repr(Auth("app", "secret"))


@pytest.mark.parametrize(
    ("code", "bind", "expected"),
    [
        (socks5.NOT_ALLOWED, ("0.0.0.0", 0), b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"),
        (socks5.CONNECTION_REFUSED, ("0.0.0.0", 0), b"\x05\x05\x00\x01" + b"\x00" * 6),
        (socks5.SUCCEEDED, ("::1", 1080), b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01\x04\x38"),
    ],
)
def test_replies_carry_the_code_and_bound_address(
    code: int, bind: tuple[str, int], expected: bytes
) -> None:
    machine = Socks5Server()
    machine.receive_data(b"\x05\x01\x00" + CONNECT_V4)
    machine.next_event()
    machine.choose_method(socks5.NO_AUTH)
    machine.next_event()
    assert machine.reply(code, bind) == expected
    assert machine.state is (State.RELAY if code == socks5.SUCCEEDED else State.CLOSED)


@pytest.mark.parametrize(
    ("data", "state_reply", "words"),
    [
        # (bytes after a no-auth greeting, what refuse() sends, words in the error)
        (b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x07\x00\x01" + b"\x00" * 6, "BIND"),
        (b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x07\x00\x01" + b"\x00" * 6, "0x09"),
        (b"\x05\x01\x00\x02\x7f\x00\x00\x01\x00\x50", b"\x05\x08\x00\x01" + b"\x00" * 6,
         "address type 0x02"),
        (b"\x05\x01\x00\x03\x00\x00\x50", b"\x05\x01\x00\x01" + b"\x00" * 6, "empty domain"),
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b"", "SOCKS4"),
    ],
)
def test_bad_requests_are_refused_with_their_reply_code(
    data: bytes, state_reply: bytes, words: str
) -> None:
    machine = Socks5Server()
    machine.receive_data(b"\x05\x01\x00")
    machine.next_event()
    machine.choose_method(socks5.NO_AUTH)
    machine.receive_data(data)
    with pytest.raises(Socks5Error, match=words) as info:
        machine.next_event()
    assert machine.refuse(info.value) == state_reply
    assert machine.state is State.CLOSED


@pytest.mark.parametrize(
    ("data", "sent", "words"),
    [
        (b"CONNECT www.test:80 HTTP/1.1\r\n", b"", "HTTP request"),
        (b"\x05\x00", b"\x05\xff", "no authentication method"),
        (b"\x04\x01\x00\x50", b"", "SOCKS4"),
    ],
)
def test_bad_greetings_are_refused(data: bytes, sent: bytes, words: str) -> None:
    machine = Socks5Server()
    machine.receive_data(data)
    with pytest.raises(Socks5Error, match=words) as info:
        machine.next_event()
    assert machine.refuse(info.value) == sent


def test_a_bad_auth_version_is_answered_with_failure() -> None:
    machine = Socks5Server()
    machine.receive_data(GREETING_USERPASS)
    machine.next_event()
    machine.choose_method(socks5.USERPASS)
    machine.receive_data(b"\x05\x01\x00")
    with pytest.raises(Socks5Error, match="RFC 1929"):
        machine.next_event()
    assert machine.refuse(Socks5Error("x")) == socks5.AUTH_FAILED


def test_eof_between_messages_is_closed_and_inside_one_an_error() -> None:
    machine = Socks5Server()
    machine.receive_data(b"")
    assert machine.next_event() == Closed()
    machine = Socks5Server()
    machine.receive_data(b"\x05\x02\x00")
    machine.receive_data(b"")
    with pytest.raises(Socks5Error, match="middle of its greeting"):
        machine.next_event()


def test_answers_out_of_turn_are_a_local_error() -> None:
    machine = Socks5Server()
    with pytest.raises(RuntimeError, match="cannot reply"):
        machine.reply(socks5.SUCCEEDED)
    with pytest.raises(RuntimeError, match="cannot choose"):
        machine.choose_method(socks5.NO_AUTH)


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errno.ECONNREFUSED, socks5.CONNECTION_REFUSED),
        (errno.EHOSTUNREACH, socks5.HOST_UNREACHABLE),
        (errno.ENETUNREACH, socks5.NETWORK_UNREACHABLE),
        (errno.ETIMEDOUT, socks5.TTL_EXPIRED),
        (errno.EACCES, socks5.NOT_ALLOWED),
        (errno.EIO, socks5.GENERAL_FAILURE),
        (None, socks5.GENERAL_FAILURE),
    ],
)
def test_errno_maps_to_reply(err: int | None, code: int) -> None:
    assert socks5.reply_for_errno(err) == code


# -- UDP header ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35query",
         socks5.Datagram("127.0.0.1", 53, socks5.ATYP_IPV4, b"query")),
        (b"\x00\x00\x00\x03\x08www.test\x00\x35",
         socks5.Datagram("www.test", 53, socks5.ATYP_DOMAIN, b"")),
    ],
)
def test_udp_header_parses(packet: bytes, expected: socks5.Datagram) -> None:
    assert socks5.parse_datagram(packet) == expected


@pytest.mark.parametrize(
    ("packet", "words"),
    [
        (b"\x00\x00", "shorter than its header"),
        (b"\x00\x00\x01\x01\x7f\x00\x00\x01\x00\x35x", "fragment 1"),
        (b"\x00\x00\x00\x01\x7f\x00", "inside its header"),
        (b"\x00\x00\x00\x07\x7f\x00\x00\x01\x00\x35", "address type 0x07"),
    ],
)
def test_bad_udp_headers_are_errors(packet: bytes, words: str) -> None:
    with pytest.raises(Socks5Error, match=words):
        socks5.parse_datagram(packet)


@given(
    host=st.one_of(
        st.ip_addresses().map(str),
        st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True),
    ),
    port=st.integers(0, 65535),
    data=st.binary(max_size=64),
)
def test_udp_header_round_trips(host: str, port: int, data: bytes) -> None:
    parsed = socks5.parse_datagram(socks5.build_datagram(host, port, data))
    assert (_same(parsed.host), parsed.port, parsed.data) == (_same(host), port, data)


def _same(host: str) -> object:
    """An address as a value (inet_ntop and ipaddress spell some IPv6 ones apart)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return host


# -- properties ----------------------------------------------------------------

HANDSHAKES = [
    GREETING_USERPASS + AUTH + CONNECT_NAME,
    GREETING_USERPASS + AUTH + CONNECT_V6 + b"data",
    GREETING_USERPASS + AUTH + ASSOCIATE_ZERO,
]


@pytest.mark.parametrize("stream", HANDSHAKES)
def test_every_split_gives_the_same_events(stream: bytes) -> None:
    whole, sent, _ = _drive([stream])
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            events, split_sent, _ = _drive([stream[:i], stream[i:j], stream[j:]])
            assert (events, split_sent) == (whole, sent), (i, j)


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
@settings(max_examples=400)
def test_garbage_raises_only_the_machines_error(data: bytes, cuts: list[int]) -> None:
    machine = Socks5Server()
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    try:
        for a, b in itertools.pairwise(bounds):
            machine.receive_data(data[a:b])
            for event in _events(machine):
                _answer(machine, event)
        machine.receive_data(b"")
        for event in _events(machine):
            _answer(machine, event)
    except Socks5Error as exc:
        sent = machine.refuse(exc)
        assert machine.state is State.CLOSED
        assert len(sent) in (0, 2, 10)


@given(st.binary(max_size=300))
def test_garbage_after_a_valid_prefix_raises_only_the_machines_error(tail: bytes) -> None:
    for prefix in (b"", GREETING_USERPASS, GREETING_USERPASS + AUTH):
        machine = Socks5Server()
        try:
            machine.receive_data(prefix + tail)
            for event in _events(machine):
                _answer(machine, event)
        except Socks5Error:
            pass


@given(st.binary(max_size=300))
def test_udp_garbage_raises_only_the_machines_error(packet: bytes) -> None:
    try:
        parsed = socks5.parse_datagram(packet)
    except Socks5Error:
        return
    assert 0 <= parsed.port <= 65535
    assert struct.pack(">H", parsed.port) in packet
