"""The sans-I/O client exchange (client/exchange.py), fed bytes by hand.

The gateway's side of each conversation is a real gateway-role
``Connection``, so the bytes are what a gateway sends. Every answer is
also fed split at every byte boundary (and, by Hypothesis, at many), as a
blocking peek or an asyncio read may deliver it.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.client.exchange import Answer, Exchange, hello
from tether.client.settings import Settings
from tether.endpoint import parse_endpoint
from tether.errors import PolicyDenied
from tether.wire import Connection, Message, Role, State, pb

SETTINGS = Settings(gateway=parse_endpoint("127.0.0.1:7000"), app="tests", key="k")
GW = "127.0.0.1:7000"
ADDR = pb.Address(family=pb.FAMILY_INET, host="127.0.0.1", port=9)
LOCAL = pb.Address(family=pb.FAMILY_INET, host="127.0.0.1", port=40000)
TCP = pb.Connect(transport=pb.TRANSPORT_TCP, family=pb.FAMILY_INET, host="127.0.0.1", port=9)
UDP = pb.Connect(transport=pb.TRANSPORT_UDP, family=pb.FAMILY_INET, source=LOCAL)
OK_HELLO = pb.ServerHello(protocol_version=1)
CONNECTED = pb.ConnectResult(descriptor="d" * 32, peer=ADDR, local=LOCAL)
DENIAL = pb.Error(
    code=pb.Error.PERMISSION_DENIED, errno=errno.EACCES, rule="deny port 9",
    reason="port 9 is denied",
    message="tether: connection to 127.0.0.1:9 denied for app 'tests': port 9 is denied "
    "(rule: deny port 9)",
)


class Gateway:
    """The gateway's end of one stream: it reads what the exchange sent and answers."""

    def __init__(self) -> None:
        self.wire = Connection(Role.GATEWAY)

    def answer(self, sent: bytes, *replies: Message) -> bytes:
        """One reply per message in `sent`, in order (the hello's, then the request's)."""
        self.wire.receive_data(sent)
        out = b""
        for reply in replies:
            event = self.wire.next_event()
            assert isinstance(event, pb.ClientHello | pb.Connect | pb.Resume | pb.Request), event
            out += self.wire.send(reply)
        return out


def feed(exchange: Exchange, chunks: Sequence[bytes]) -> tuple[Answer, bytes]:
    """Feed chunks until the answer; it, and every byte after it (trailing + unfed)."""
    for i, chunk in enumerate(chunks):
        answer = exchange.receive(chunk)
        if answer is not None:
            return answer, exchange.trailing + b"".join(chunks[i + 1 :])
        assert exchange.wire.state is not State.RELAY
    raise AssertionError("no answer")


def cuts(data: bytes, points: Sequence[int]) -> list[bytes]:
    edges = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


def tcp_connect() -> tuple[Exchange, bytes]:
    """An exchange that pipelined hello + TCP Connect, and its successful answer + greeting."""
    exchange = Exchange(GW)
    sent = exchange.open(SETTINGS) + exchange.send(TCP, "127.0.0.1:9")
    return exchange, Gateway().answer(sent, OK_HELLO, CONNECTED) + b"220 greeting\r\n"


def control_request() -> tuple[Exchange, bytes]:
    exchange = Exchange(GW)
    request = pb.Request(id=1, touch=pb.Touch(descriptor="d" * 32))
    sent = exchange.open(SETTINGS) + exchange.send(request)
    return exchange, Gateway().answer(sent, OK_HELLO, pb.Response(id=1))


def udp_open() -> tuple[Exchange, bytes]:
    exchange = Exchange(GW)
    sent = exchange.open(SETTINGS) + exchange.send(UDP)
    result = pb.ConnectResult(descriptor="u" * 32, local=LOCAL)
    return exchange, Gateway().answer(sent, OK_HELLO, result)


def hello_only() -> tuple[Exchange, bytes]:
    exchange = Exchange(GW)
    return exchange, Gateway().answer(exchange.open(SETTINGS), OK_HELLO)


CASES: dict[str, tuple[Callable[[], tuple[Exchange, bytes]], type, bytes, bool]] = {
    # name: (conversation, answer type, bytes after the answer, stream framed after it)
    "tcp connect": (tcp_connect, pb.ConnectResult, b"220 greeting\r\n", False),
    "control request": (control_request, pb.Response, b"", True),
    "udp association": (udp_open, pb.ConnectResult, b"", True),
    "hello alone": (hello_only, pb.ServerHello, b"", True),
}


@pytest.mark.parametrize("case", CASES)
def test_answer_split_at_every_byte_boundary(case: str) -> None:
    conversation, kind, after, framed = CASES[case]
    _, data = conversation()
    for cut in range(len(data) + 1):
        exchange, _ = conversation()
        answer, rest = feed(exchange, cuts(data, [cut]))
        assert type(answer) is kind
        assert rest == after, cut
        assert exchange.in_step is framed


@given(st.data())
def test_answer_split_anywhere(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(sorted(CASES)))
    conversation, kind, after, _ = CASES[case]
    exchange, wire_bytes = conversation()
    points = data.draw(st.lists(st.integers(0, len(wire_bytes)), max_size=12))
    answer, rest = feed(exchange, cuts(wire_bytes, points))
    assert type(answer) is kind and rest == after


def test_the_hello_is_encoded_once_per_settings() -> None:
    first, second = Exchange(GW), Exchange(GW)
    assert first.open(SETTINGS) == second.open(SETTINGS)
    assert hello(SETTINGS) is hello(SETTINGS)
    assert (hello(SETTINGS).app, hello(SETTINGS).key) == ("tests", "k")


def test_a_refused_hello_raises_its_error_in_place_of_the_answer() -> None:
    exchange = Exchange(GW)
    sent = exchange.open(SETTINGS) + exchange.send(TCP, "127.0.0.1:9")
    refusal = pb.ServerHello(protocol_version=1, error=pb.Error(
        code=pb.Error.AUTH_FAILED, message="tether: app 'tests' authentication failed"))
    data = Gateway().answer(sent, refusal)
    for cut in range(1, len(data)):  # nothing is decided before the whole frame
        probe = Exchange(GW)
        probe.open(SETTINGS)
        probe.send(TCP, "127.0.0.1:9")
        assert probe.receive(data[:cut]) is None
    with pytest.raises(PermissionError) as info:
        exchange.receive(data)
    assert type(info.value) is PermissionError
    assert info.value.strerror == "tether: app 'tests' authentication failed"
    assert not exchange.in_step


def test_an_error_frame_raises_and_ends_the_stream() -> None:
    exchange = Exchange(GW)
    exchange.open(SETTINGS)
    exchange.send(TCP)
    error = pb.Error(code=pb.Error.PROTOCOL, message="out of order: Connect twice")
    gateway = Connection(Role.GATEWAY)
    with pytest.raises(ConnectionError) as info:
        exchange.receive(gateway.send_error(error))
    assert info.value.errno == errno.EPROTO
    assert info.value.strerror == f"out of order: Connect twice (gateway {GW})"
    assert not exchange.in_step


def test_a_closed_error_frame_on_an_idle_stream_raises_its_reason() -> None:
    exchange, data = udp_open()
    feed(exchange, [data])
    reclaimed = pb.Error(code=pb.Error.CLOSED, errno=errno.ECONNRESET,
                         message="tether: UDP socket uuuuuuuu... was reclaimed")
    with pytest.raises(ConnectionResetError, match="was reclaimed"):
        exchange.receive(Connection(Role.GATEWAY).send_error(reclaimed))


def test_a_refused_connect_leaves_the_stream_framed_for_another() -> None:
    exchange = Exchange(GW)
    gateway = Gateway()
    sent = exchange.open(SETTINGS) + exchange.send(TCP, "127.0.0.1:9")
    data = gateway.answer(sent, OK_HELLO, pb.ConnectResult(error=DENIAL))
    with pytest.raises(PolicyDenied) as info:
        exchange.receive(data)
    assert (info.value.rule, info.value.reason) == ("deny port 9", "port 9 is denied")
    assert info.value.strerror == DENIAL.message
    assert exchange.in_step
    retry = exchange.send(TCP, "127.0.0.1:9")
    answer, rest = feed(exchange, [gateway.answer(retry, CONNECTED)])
    assert type(answer) is pb.ConnectResult and rest == b""
    assert not exchange.in_step  # raw bytes now


def test_a_failed_dial_names_the_target_and_the_gateway() -> None:
    exchange = Exchange(GW)
    sent = exchange.open(SETTINGS) + exchange.send(TCP, "example.test:9")
    refused = pb.Error(code=pb.Error.SYSTEM, errno=errno.ECONNREFUSED, message="refused")
    data = Gateway().answer(sent, OK_HELLO, pb.ConnectResult(error=refused))
    with pytest.raises(ConnectionRefusedError) as info:
        exchange.receive(data)
    assert info.value.strerror == f"Connection refused: example.test:9 (via tether gateway {GW})"


def test_a_refused_resume_ends_the_stream() -> None:
    exchange = Exchange(GW)
    resume = pb.Resume(descriptor="d" * 32, token="t", tail_length=3)
    sent = exchange.open(SETTINGS) + exchange.send(resume, "127.0.0.1:9")
    used = pb.Error(code=pb.Error.ALREADY_RESUMED, message="token used")
    data = Gateway().answer(sent, OK_HELLO, pb.ConnectResult(error=used))
    with pytest.raises(OSError, match="token used") as info:
        exchange.receive(data)
    assert info.value.errno == errno.EINVAL
    assert not exchange.in_step  # tail bytes follow a Resume: no frames after it


def test_a_refused_request_keeps_the_control_stream() -> None:
    exchange, data = control_request()
    gateway_bytes = data
    feed(exchange, [gateway_bytes])
    gateway = Gateway()
    # A second stream's gateway, brought to the same point, answers with an error.
    sent = Exchange(GW)
    first = sent.open(SETTINGS) + sent.send(pb.Request(id=1, touch=pb.Touch(descriptor="x")))
    feed(sent, [gateway.answer(first, OK_HELLO, pb.Response(id=1))])
    request = sent.send(pb.Request(id=2, touch=pb.Touch(descriptor="x")))
    gone = pb.Error(code=pb.Error.NOT_FOUND, errno=errno.EBADF, message="tether: no socket x")
    with pytest.raises(OSError, match="no socket x") as info:
        sent.receive(gateway.answer(request, pb.Response(id=2, error=gone)))
    assert info.value.errno == errno.EBADF
    assert sent.in_step


def test_end_of_stream_before_the_answer() -> None:
    exchange = Exchange(GW)
    exchange.open(SETTINGS)
    exchange.send(TCP)
    with pytest.raises(ConnectionResetError) as info:
        exchange.receive(b"")
    assert info.value.strerror == f"tether: gateway {GW} closed the stream"
    assert not exchange.in_step


def test_end_of_stream_inside_a_frame_breaks_the_protocol() -> None:
    exchange, data = tcp_connect()
    assert exchange.receive(data[:7]) is None
    with pytest.raises(ConnectionError, match="broke the protocol: stream ended inside a frame"):
        exchange.receive(b"")


def test_bytes_that_are_no_frame_break_the_protocol() -> None:
    exchange = Exchange(GW)
    exchange.open(SETTINGS)
    with pytest.raises(ConnectionError) as info:
        exchange.receive(b"\xff\xff\xff\xff and more")
    assert info.value.errno == errno.EPROTO
    assert "broke the protocol: frame of" in str(info.value)
    assert not exchange.in_step


def test_an_answer_is_outstanding_until_it_comes() -> None:
    exchange, data = tcp_connect()
    assert not exchange.in_step
    assert exchange.receive(data[: len(data) // 2]) is None
    assert not exchange.in_step  # a driver that gives up here must not reuse the stream
