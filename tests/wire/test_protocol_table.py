"""Table-driven tests of the sans-I/O wire machine (tether.wire.protocol).

Most tests describe a conversation as a list of turns, ("c", message) for
client -> gateway and ("g", message) for gateway -> client, and play it from
both ends: the sender's side calls ``send()``, the receiver's side gets the
frame's bytes and pulls events. An illegal turn must then raise
LocalProtocolError at the sender and RemoteProtocolError at the receiver.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

import pytest

from tether.wire import (
    DEFAULT_MAX_FRAME,
    NEED_DATA,
    PAUSED,
    PREAMBLE,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    Event,
    LocalProtocolError,
    Message,
    ProtocolError,
    RemoteProtocolError,
    Role,
    State,
    encode_frame,
    pb,
)

CLIENT = Role.CLIENT
GATEWAY = Role.GATEWAY

# -- messages ------------------------------------------------------------------

HELLO = pb.ClientHello(protocol_version=PROTOCOL_VERSION, app="app", key="k", client_version="t")
S_HELLO = pb.ServerHello(protocol_version=PROTOCOL_VERSION, gateway_version="t")
S_HELLO_REFUSED = pb.ServerHello(
    protocol_version=PROTOCOL_VERSION,
    error=pb.Error(code=pb.Error.AUTH_FAILED, message="wrong key"),
)
CONNECT = pb.Connect(
    transport=pb.TRANSPORT_TCP, family=pb.FAMILY_INET, host="www.test", port=443, timeout=5.0
)
CONNECTED = pb.ConnectResult(
    descriptor="d-1",
    peer=pb.Address(family=pb.FAMILY_INET, host="192.0.2.1", port=443),
    local=pb.Address(family=pb.FAMILY_INET, host="192.0.2.9", port=40000),
)
REFUSED = pb.ConnectResult(
    error=pb.Error(code=pb.Error.PERMISSION_DENIED, message="denied", rule="deny *")
)
ERROR = pb.Error(code=pb.Error.PROTOCOL, message="bye")
# A UDP association: an unconnected socket (no peer named) and a connected one.
UDP_OPEN = pb.Connect(
    transport=pb.TRANSPORT_UDP,
    family=pb.FAMILY_INET,
    source=pb.Address(family=pb.FAMILY_INET, host="127.0.0.1", port=50000),
)
UDP_OPEN_TO = pb.Connect(
    transport=pb.TRANSPORT_UDP,
    family=pb.FAMILY_INET,
    host="127.0.0.1",
    port=53,
    source=pb.Address(family=pb.FAMILY_INET, host="127.0.0.1", port=50000),
)
UDP_OPENED = pb.ConnectResult(
    descriptor="u-1", local=pb.Address(family=pb.FAMILY_INET, host="0.0.0.0", port=40001)
)


def allow(i: int, port: int = 53) -> pb.Request:
    return pb.Request(id=i, allow_destination=pb.AllowDestination(host="127.0.0.1", port=port))


def route(i: int) -> pb.Response:
    peer = pb.Address(family=pb.FAMILY_INET, host="127.0.0.1", port=53)
    relay = pb.Address(family=pb.FAMILY_INET, host="127.0.0.1", port=40002)
    return pb.Response(id=i, destination=pb.Destination(peer=peer, relay=relay))


def req(i: int) -> pb.Request:
    return pb.Request(id=i, gethostbyname=pb.GetHostByName(name=f"h{i}.test"))


def resp(i: int) -> pb.Response:
    return pb.Response(id=i, host=pb.HostEntry(name=f"h{i}.test", addresses=["192.0.2.1"]))


def resp_failed(i: int) -> pb.Response:
    return pb.Response(id=i, error=pb.Error(code=pb.Error.GAI, errno=-2, message="no name"))


def frames(*messages: Message) -> bytes:
    return b"".join(encode_frame(m) for m in messages)


def frame_bytes(body: bytes) -> bytes:
    """A length-prefixed frame around arbitrary body bytes."""
    return struct.pack(">I", len(body)) + body


# -- playing a conversation from one end -----------------------------------------

Who: TypeAlias = Literal["c", "g"]
Turn: TypeAlias = tuple[Who, Message]


class End:
    """One end of a conversation: sends its own turns, receives the other's.

    Received frames are built with encode_frame() (plus the preamble for the
    gateway), which test_send_is_preamble_plus_encode_frame shows is exactly
    what the other end's send() produces; that lets the tables also deliver
    frames that send() would refuse to produce.
    """

    def __init__(self, role: Role) -> None:
        self.conn = Connection(role)
        self.me: Who = "c" if role is CLIENT else "g"
        self.unseen: deque[Message] = deque()  # fed but not yet returned as events
        self.events: list[Event] = []
        self._fed = False

    def play(self, turns: Iterable[Turn]) -> None:
        for who, message in turns:
            if who == self.me:
                self.send(message)
            else:
                self.feed(message)

    def send(self, message: Message) -> bytes:
        data = self.conn.send(message)
        self.pull()  # an answer may unpause the gateway
        return data

    def feed(self, message: Message) -> None:
        data = encode_frame(message)
        if self.conn.role is GATEWAY and not self._fed:
            data = PREAMBLE + data
        self._fed = True
        self.conn.receive_data(data)
        self.unseen.append(message)
        self.pull()

    def pull(self) -> None:
        while self.conn.state not in (State.RELAY, State.CLOSED):
            event = self.conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                return
            assert not isinstance(event, ConnectionClosed)
            assert self.unseen, f"unexpected event {event!r}"
            assert event == self.unseen.popleft()
            self.events.append(event)


# -- legal conversations -----------------------------------------------------------

LEGAL: list[tuple[str, list[Turn], State]] = [
    ("hello", [("c", HELLO), ("g", S_HELLO)], State.READY),
    ("hello-refused", [("c", HELLO), ("g", S_HELLO_REFUSED)], State.CLOSED),
    (
        "pipelined-hello-connect",
        [("c", HELLO), ("c", CONNECT), ("g", S_HELLO), ("g", CONNECTED)],
        State.RELAY,
    ),
    (
        "pipelined-hello-connect-refused-then-retry",
        [
            ("c", HELLO),
            ("c", CONNECT),
            ("g", S_HELLO),
            ("g", REFUSED),
            ("c", CONNECT),
            ("g", CONNECTED),
        ],
        State.RELAY,
    ),
    (
        "refused-connect-returns-to-ready",
        [("c", HELLO), ("g", S_HELLO), ("c", CONNECT), ("g", REFUSED)],
        State.READY,
    ),
    (
        "refused-connect-then-request",
        [
            ("c", HELLO),
            ("g", S_HELLO),
            ("c", CONNECT),
            ("g", REFUSED),
            ("c", req(1)),
            ("g", resp(1)),
        ],
        State.READY,
    ),
    (
        "refused-twice-then-connected",
        [
            ("c", HELLO),
            ("g", S_HELLO),
            ("c", CONNECT),
            ("g", REFUSED),
            ("c", CONNECT),
            ("g", REFUSED),
            ("c", CONNECT),
            ("g", CONNECTED),
        ],
        State.RELAY,
    ),
    (
        "pipelined-requests",
        [
            ("c", HELLO),
            ("c", req(1)),
            ("c", req(2)),
            ("c", req(3)),
            ("g", S_HELLO),
            ("g", resp(1)),
            ("g", resp_failed(2)),
            ("g", resp(3)),
        ],
        State.READY,
    ),
    (
        "request-response-alternating",
        [
            ("c", HELLO),
            ("g", S_HELLO),
            ("c", req(1)),
            ("g", resp(1)),
            ("c", req(2)),
            ("g", resp(2)),
        ],
        State.READY,
    ),
    (
        "requests-then-connect",
        [
            ("c", HELLO),
            ("c", req(1)),
            ("g", S_HELLO),
            ("c", req(2)),
            ("c", CONNECT),
            ("g", resp(1)),
            ("g", resp(2)),
            ("g", CONNECTED),
        ],
        State.RELAY,
    ),
    (
        "udp-association-then-destinations",
        [
            ("c", HELLO),
            ("c", UDP_OPEN),
            ("g", S_HELLO),
            ("g", UDP_OPENED),
            ("c", allow(1)),
            ("g", route(1)),
            ("c", allow(2, 54)),
            ("c", req(3)),
            ("g", resp_failed(2)),
            ("g", resp(3)),
        ],
        State.ASSOCIATED,
    ),
    (
        "udp-connected-association",
        [("c", HELLO), ("g", S_HELLO), ("c", UDP_OPEN_TO), ("g", UDP_OPENED)],
        State.ASSOCIATED,
    ),
    (
        "udp-refused-then-tcp-connect",
        [
            ("c", HELLO),
            ("g", S_HELLO),
            ("c", UDP_OPEN_TO),
            ("g", REFUSED),
            ("c", CONNECT),
            ("g", CONNECTED),
        ],
        State.RELAY,
    ),
    (
        "gateway-error-on-association",
        [("c", HELLO), ("c", UDP_OPEN), ("g", S_HELLO), ("g", UDP_OPENED), ("g", ERROR)],
        State.CLOSED,
    ),
    ("client-error-first", [("c", ERROR)], State.CLOSED),
    ("client-error-after-hello", [("c", HELLO), ("g", S_HELLO), ("c", ERROR)], State.CLOSED),
    ("gateway-error-first", [("g", ERROR)], State.CLOSED),
    ("gateway-error-instead-of-hello", [("c", HELLO), ("g", ERROR)], State.CLOSED),
    (
        "gateway-error-instead-of-connect-result",
        [("c", HELLO), ("g", S_HELLO), ("c", CONNECT), ("g", ERROR)],
        State.CLOSED,
    ),
    (
        "gateway-error-instead-of-response",
        [("c", HELLO), ("g", S_HELLO), ("c", req(1)), ("g", ERROR)],
        State.CLOSED,
    ),
]


@pytest.mark.parametrize("role", [CLIENT, GATEWAY], ids=["client", "gateway"])
@pytest.mark.parametrize(("turns", "final"), [pytest.param(t, s, id=name) for name, t, s in LEGAL])
def test_legal_order(role: Role, turns: list[Turn], final: State) -> None:
    end = End(role)
    end.play(turns)
    assert not end.unseen, "every frame the peer sent was delivered as an event"
    assert end.events == [m for who, m in turns if who != end.me]
    assert end.conn.state is final


@pytest.mark.parametrize(("turns", "final"), [pytest.param(t, s, id=n) for n, t, s in LEGAL])
def test_legal_order_back_to_back(turns: list[Turn], final: State) -> None:
    # The real bytes: each side's send() output is what the other side reads.
    client, gateway = Connection(CLIENT), Connection(GATEWAY)
    seen: dict[Role, list[Event]] = {CLIENT: [], GATEWAY: []}
    for who, message in turns:
        sender, receiver = (client, gateway) if who == "c" else (gateway, client)
        receiver.receive_data(sender.send(message))
        for conn in (client, gateway):
            while conn.state not in (State.RELAY, State.CLOSED):
                event = conn.next_event()
                if event is NEED_DATA or event is PAUSED:
                    break
                assert not isinstance(event, ConnectionClosed)
                seen[conn.role].append(event)
    assert seen[GATEWAY] == [m for who, m in turns if who == "c"]
    assert seen[CLIENT] == [m for who, m in turns if who == "g"]
    assert client.state is gateway.state is final


def test_states_along_the_way() -> None:
    # Each side's state after every turn of one long conversation.
    client, gateway = Connection(CLIENT), Connection(GATEWAY)
    steps: list[tuple[Who, Message, State, State]] = [
        # who, message, client state after, gateway state after (both pulled)
        ("c", HELLO, State.HELLO, State.HELLO),
        ("g", S_HELLO, State.READY, State.READY),
        ("c", req(1), State.READY, State.READY),
        ("g", resp(1), State.READY, State.READY),
        ("c", CONNECT, State.CONNECTING, State.CONNECTING),
        ("g", REFUSED, State.READY, State.READY),
        ("c", CONNECT, State.CONNECTING, State.CONNECTING),
        ("g", CONNECTED, State.RELAY, State.RELAY),
    ]
    for who, message, client_state, gateway_state in steps:
        sender, receiver = (client, gateway) if who == "c" else (gateway, client)
        receiver.receive_data(sender.send(message))
        assert receiver.next_event() == message
        assert (client.state, gateway.state) == (client_state, gateway_state), message


def test_peer_version_is_recorded_from_the_hellos() -> None:
    # The gateway decides VERSION_MISMATCH from it; the client reports it.
    gateway = Connection(GATEWAY)
    assert gateway.peer_version is None
    gateway.receive_data(PREAMBLE + frames(pb.ClientHello(protocol_version=7)))
    gateway.next_event()
    assert gateway.peer_version == 7
    client = Connection(CLIENT)
    client.send(HELLO)
    client.receive_data(frames(pb.ServerHello(protocol_version=9)))
    client.next_event()
    assert client.peer_version == 9


def test_roles_and_closed_repr() -> None:
    assert Connection(CLIENT).their_role is GATEWAY
    assert Connection(GATEWAY).their_role is CLIENT
    assert repr(ConnectionClosed()) == "ConnectionClosed()"


# -- illegal orders ----------------------------------------------------------------



@dataclass(frozen=True)
class Illegal:
    """A conversation whose last turn breaks the protocol."""

    id: str
    turns: tuple[Turn, ...]
    # "sender": the offender's send() raises LocalProtocolError; "receiver":
    # the other end's next_event() raises RemoteProtocolError. Some orders can
    # only be checked at the sender (the receiver is paused, or has switched).
    sides: tuple[str, ...] = ("sender", "receiver")
    xfail: dict[str, str] = field(default_factory=dict)


ILLEGAL = [
    Illegal("connect-before-client-hello", (("c", CONNECT),)),
    Illegal("request-before-client-hello", (("c", req(1)),)),
    Illegal("second-client-hello", (("c", HELLO), ("g", S_HELLO), ("c", HELLO))),
    Illegal("second-client-hello-pipelined", (("c", HELLO), ("c", HELLO)), sides=("sender",)),
    Illegal(
        "server-hello-before-client-hello",
        (("g", S_HELLO),),
    ),
    Illegal("second-server-hello", (("c", HELLO), ("g", S_HELLO), ("g", S_HELLO))),
    Illegal("connect-result-without-connect", (("c", HELLO), ("g", S_HELLO), ("g", CONNECTED))),
    Illegal(
        "refused-connect-result-without-connect",
        (("c", HELLO), ("g", S_HELLO), ("g", REFUSED)),
    ),
    Illegal(
        "connect-result-twice",
        (("c", HELLO), ("g", S_HELLO), ("c", CONNECT), ("g", REFUSED), ("g", REFUSED)),
    ),
    Illegal("connect-result-before-server-hello", (("c", HELLO), ("c", CONNECT), ("g", CONNECTED))),
    Illegal(
        "connect-result-before-owed-response",
        (("c", HELLO), ("c", req(1)), ("c", CONNECT), ("g", S_HELLO), ("g", CONNECTED)),
    ),
    Illegal("response-without-request", (("c", HELLO), ("g", S_HELLO), ("g", resp(1)))),
    Illegal(
        "extra-response",
        (("c", HELLO), ("g", S_HELLO), ("c", req(1)), ("g", resp(1)), ("g", resp(1))),
    ),
    Illegal("response-before-server-hello", (("c", HELLO), ("c", req(1)), ("g", resp(1)))),
    Illegal(
        "response-to-a-connect",
        (("c", HELLO), ("g", S_HELLO), ("c", CONNECT), ("g", resp(1))),
    ),
    Illegal(
        "second-connect-while-connecting",
        (("c", HELLO), ("g", S_HELLO), ("c", CONNECT), ("c", CONNECT)),
        sides=("sender",),
    ),
    Illegal(
        "second-connect-pipelined",
        (("c", HELLO), ("c", CONNECT), ("c", CONNECT)),
        sides=("sender",),
    ),
    Illegal(
        "request-while-connecting",
        (("c", HELLO), ("c", CONNECT), ("c", req(1))),
        sides=("sender",),
    ),
    # a UDP association's stream carries requests only; AllowDestination nowhere else
    Illegal(
        "connect-on-association",
        (("c", HELLO), ("c", UDP_OPEN), ("g", S_HELLO), ("g", UDP_OPENED), ("c", CONNECT)),
    ),
    Illegal(
        "second-association",
        (("c", HELLO), ("c", UDP_OPEN), ("g", S_HELLO), ("g", UDP_OPENED), ("c", UDP_OPEN)),
    ),
    Illegal(
        "resume-on-association",
        (
            ("c", HELLO),
            ("c", UDP_OPEN),
            ("g", S_HELLO),
            ("g", UDP_OPENED),
            ("c", pb.Resume(descriptor="d", token="t")),
        ),
    ),
    Illegal("allow-destination-on-plain-stream", (("c", HELLO), ("g", S_HELLO), ("c", allow(1)))),
    Illegal(
        "allow-destination-after-refused-association",
        (("c", HELLO), ("g", S_HELLO), ("c", UDP_OPEN), ("g", REFUSED), ("c", allow(1))),
    ),
    Illegal(
        "allow-destination-while-opening",
        (("c", HELLO), ("c", UDP_OPEN), ("c", allow(1))),
        sides=("sender",),
    ),
    Illegal(
        "connect-result-on-association",
        (("c", HELLO), ("c", UDP_OPEN), ("g", S_HELLO), ("g", UDP_OPENED), ("g", UDP_OPENED)),
    ),
    # a message only the other role may send
    Illegal("gateway-sends-client-hello", (("c", HELLO), ("g", S_HELLO), ("g", HELLO))),
    Illegal("gateway-sends-connect", (("c", HELLO), ("g", S_HELLO), ("g", CONNECT))),
    Illegal("gateway-sends-request", (("c", HELLO), ("g", S_HELLO), ("g", req(1)))),
    Illegal("client-sends-server-hello-first", (("c", S_HELLO),)),
    Illegal("client-sends-server-hello", (("c", HELLO), ("g", S_HELLO), ("c", S_HELLO))),
    Illegal("client-sends-connect-result", (("c", HELLO), ("g", S_HELLO), ("c", CONNECTED))),
    Illegal("client-sends-response", (("c", HELLO), ("g", S_HELLO), ("c", resp(1)))),
    # nothing framed after the switch, an Error, or a refused hello
    Illegal(
        "client-frame-after-relay",
        (("c", HELLO), ("c", CONNECT), ("g", S_HELLO), ("g", CONNECTED), ("c", req(1))),
        sides=("sender",),
    ),
    Illegal(
        "gateway-frame-after-relay",
        (("c", HELLO), ("c", CONNECT), ("g", S_HELLO), ("g", CONNECTED), ("g", resp(1))),
        sides=("sender",),
    ),
    Illegal(
        "client-frame-after-error",
        (("c", HELLO), ("g", S_HELLO), ("c", ERROR), ("c", req(1))),
        sides=("sender",),
    ),
    Illegal(
        "gateway-frame-after-error",
        (("c", HELLO), ("g", ERROR), ("g", S_HELLO)),
        sides=("sender",),
    ),
    Illegal(
        "client-frame-after-hello-refused",
        (("c", HELLO), ("g", S_HELLO_REFUSED), ("c", CONNECT)),
        sides=("sender",),
    ),
    Illegal(
        "gateway-frame-after-hello-refused",
        (("c", HELLO), ("g", S_HELLO_REFUSED), ("g", S_HELLO)),
        sides=("sender",),
    ),
]


def _illegal_params() -> list[object]:
    params: list[object] = []
    for case in ILLEGAL:
        for side in case.sides:
            marks = []
            if side in case.xfail:
                marks.append(pytest.mark.xfail(strict=True, reason=case.xfail[side]))
            params.append(pytest.param(case, side, id=f"{case.id}-{side}", marks=marks))
    return params


@pytest.mark.parametrize(("case", "side"), _illegal_params())
def test_illegal_order(case: Illegal, side: str) -> None:
    *prelude, (offender, message) = case.turns
    sender, receiver = (CLIENT, GATEWAY) if offender == "c" else (GATEWAY, CLIENT)
    end = End(sender if side == "sender" else receiver)
    end.play(prelude)
    before = end.conn.state
    if side == "sender":
        with pytest.raises(LocalProtocolError):
            end.send(message)
        # A refused send writes nothing and changes nothing.
        assert end.conn.state is before
    else:
        with pytest.raises(RemoteProtocolError) as info:
            end.feed(message)
        assert info.value.to_error().code == pb.Error.PROTOCOL
        assert end.conn.state is State.CLOSED
        assert isinstance(end.conn.next_event(), ConnectionClosed)


# -- the bytes send() produces ---------------------------------------------------------


def test_send_is_preamble_plus_encode_frame() -> None:
    # Only the client sends the preamble, and only once, in front of its first frame.
    client, gateway = Connection(CLIENT), Connection(GATEWAY)
    assert client.send(HELLO) == PREAMBLE + encode_frame(HELLO)
    assert client.send(CONNECT) == encode_frame(CONNECT)
    gateway.receive_data(PREAMBLE + frames(HELLO, CONNECT))
    assert gateway.next_event() == HELLO
    assert gateway.send(S_HELLO) == encode_frame(S_HELLO)
    assert gateway.next_event() == CONNECT
    assert gateway.send(CONNECTED) == encode_frame(CONNECTED)


def test_frame_layout() -> None:
    data = encode_frame(HELLO)
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    assert pb.Frame.FromString(data[4:]) == pb.Frame(client_hello=HELLO)


@pytest.mark.parametrize("role", [CLIENT, GATEWAY], ids=["client", "gateway"])
def test_send_error_first_carries_the_preamble_if_client(role: Role) -> None:
    conn = Connection(role)
    data = conn.send_error(ProtocolError("nope"))
    prefix = PREAMBLE if role is CLIENT else b""
    assert data == prefix + encode_frame(pb.Error(code=pb.Error.PROTOCOL, message="nope"))
    assert conn.state is State.CLOSED


def test_pipelined_hello_and_connect_in_one_write() -> None:
    client = Connection(CLIENT)
    data = client.send(HELLO) + client.send(CONNECT)
    assert client.state is State.HELLO  # nothing answered yet
    gateway = Connection(GATEWAY)
    gateway.receive_data(data)
    assert gateway.next_event() == HELLO
    assert gateway.next_event() is PAUSED
    client.receive_data(gateway.send(S_HELLO))
    assert client.next_event() == S_HELLO
    assert client.state is State.CONNECTING  # its Connect is still out
    assert gateway.next_event() == CONNECT
    assert gateway.state is State.CONNECTING
    client.receive_data(gateway.send(CONNECTED))
    assert client.next_event() == CONNECTED
    assert client.state is gateway.state is State.RELAY
    assert client.trailing_data == gateway.trailing_data == b""


# -- PAUSED ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prelude", "question", "reply"),
    [
        pytest.param([], HELLO, S_HELLO, id="client-hello"),
        pytest.param([HELLO], req(1), resp(1), id="request"),
        pytest.param([HELLO], CONNECT, REFUSED, id="connect"),
        pytest.param([HELLO, CONNECT], CONNECT, REFUSED, id="second-connect"),
    ],
)
def test_gateway_is_paused_until_it_answers(
    prelude: list[Message], question: Message, reply: Message
) -> None:
    end = End(GATEWAY)
    for message in prelude:  # answered as they come
        end.feed(message)
        end.send({pb.ClientHello: S_HELLO, pb.Connect: REFUSED}[type(message)])
    follow = req(7)
    end.feed(question)
    end.feed(follow)  # already buffered, but must wait for the answer
    assert end.events[-1] == question
    for _ in range(3):
        assert end.conn.next_event() is PAUSED
    end.conn.receive_data(b"")  # not even end of stream unpauses it
    assert end.conn.next_event() is PAUSED
    end.conn.send(reply)
    assert end.conn.next_event() == follow
    assert end.conn.next_event() is PAUSED
    end.conn.send(resp(7))
    assert isinstance(end.conn.next_event(), ConnectionClosed)


def test_client_is_never_paused() -> None:
    # The client has nothing to answer: pipelined answers come out back to back.
    client = Connection(CLIENT)
    for m in (HELLO, req(1), req(2), CONNECT):
        client.send(m)
    client.receive_data(frames(S_HELLO, resp(1), resp(2), REFUSED))
    assert [client.next_event() for _ in range(5)] == [
        S_HELLO,
        resp(1),
        resp(2),
        REFUSED,
        NEED_DATA,
    ]
    assert client.state is State.READY


# -- the switch to raw bytes -------------------------------------------------------------

RAW = [
    pytest.param(b"", id="nothing"),
    pytest.param(b"x", id="one-byte"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: www.test\r\n\r\n", id="http"),
    # Bytes that parse as frames must not be read as frames after the switch.
    pytest.param(frames(resp(1), ERROR), id="looks-like-frames"),
    pytest.param(b"\x00\x00\x00", id="partial-length"),
    pytest.param(b"\xff" * 70_000, id="bigger-than-max-frame"),
]


@pytest.mark.parametrize("raw", RAW)
def test_client_trailing_data_is_exactly_what_follows_the_result(raw: bytes) -> None:
    client = Connection(CLIENT)
    client.send(HELLO)
    client.send(req(1))
    client.send(CONNECT)
    client.receive_data(frames(S_HELLO, resp(1), CONNECTED) + raw)
    assert [client.next_event() for _ in range(3)] == [S_HELLO, resp(1), CONNECTED]
    assert client.state is State.RELAY
    assert client.trailing_data == raw


@pytest.mark.parametrize("raw", RAW)
def test_gateway_trailing_data_is_exactly_what_follows_the_connect(raw: bytes) -> None:
    # A client may write early raw bytes behind its Connect; they belong to the peer.
    gateway = Connection(GATEWAY)
    gateway.receive_data(PREAMBLE + frames(HELLO, CONNECT) + raw)
    assert gateway.next_event() == HELLO
    gateway.send(S_HELLO)
    assert gateway.next_event() == CONNECT
    assert gateway.trailing_data == b""  # nothing decided before the answer
    gateway.send(CONNECTED)
    assert gateway.state is State.RELAY
    assert gateway.trailing_data == raw


@pytest.mark.parametrize("role", [CLIENT, GATEWAY], ids=["client", "gateway"])
def test_refused_resume_closes_the_stream(role: Role) -> None:
    # Raw tail bytes follow a Resume frame, so after a refusal the stream
    # cannot go back to frames: both ends treat it as closed.
    tail = b"unread by the old holder"
    resume = pb.Resume(descriptor="d-1", token="t", tail_length=len(tail))
    refused = pb.ConnectResult(error=pb.Error(code=pb.Error.ALREADY_RESUMED))
    if role is GATEWAY:
        conn = Connection(GATEWAY)
        conn.receive_data(PREAMBLE + frames(HELLO, resume) + tail)
        assert conn.next_event() == HELLO
        conn.send(S_HELLO)
        assert conn.next_event() == resume
        conn.send(refused)
    else:
        conn = Connection(CLIENT)
        conn.send(HELLO)
        conn.send(resume)
        conn.receive_data(frames(S_HELLO, refused))
        assert conn.next_event() == S_HELLO
        assert conn.next_event() == refused
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("role", [CLIENT, GATEWAY], ids=["client", "gateway"])
def test_machine_is_unusable_after_the_switch(role: Role) -> None:
    end = End(role)
    end.play([("c", HELLO), ("c", CONNECT), ("g", S_HELLO), ("g", CONNECTED)])
    assert end.conn.state is State.RELAY
    with pytest.raises(LocalProtocolError):
        end.conn.next_event()
    with pytest.raises(LocalProtocolError):
        end.conn.receive_data(b"more")
    with pytest.raises(LocalProtocolError):
        end.conn.send(ERROR)


@pytest.mark.parametrize("role", [CLIENT, GATEWAY], ids=["client", "gateway"])
def test_send_error_refused_after_the_switch(role: Role) -> None:
    end = End(role)
    end.play([("c", HELLO), ("c", CONNECT), ("g", S_HELLO), ("g", CONNECTED)])
    with pytest.raises(LocalProtocolError):
        end.conn.send_error(ProtocolError("too late"))


# -- Error frames close ------------------------------------------------------------------


@pytest.mark.parametrize("role", [CLIENT, GATEWAY], ids=["client", "gateway"])
def test_receiving_an_error_closes(role: Role) -> None:
    end = End(role)
    if role is CLIENT:
        end.play([("c", HELLO), ("c", req(1)), ("g", S_HELLO)])
        end.conn.receive_data(frames(ERROR, resp(1)))
    else:
        end.play([("c", HELLO), ("g", S_HELLO)])
        end.conn.receive_data(frames(ERROR, req(1)))
    assert end.conn.next_event() == ERROR
    assert end.conn.state is State.CLOSED
    # Whatever followed the Error is never delivered.
    assert isinstance(end.conn.next_event(), ConnectionClosed)
    assert isinstance(end.conn.next_event(), ConnectionClosed)
    with pytest.raises(LocalProtocolError):
        end.conn.send(ERROR)


@pytest.mark.parametrize("role", [CLIENT, GATEWAY], ids=["client", "gateway"])
def test_sending_an_error_closes(role: Role) -> None:
    end = End(role)
    end.play([("c", HELLO), ("g", S_HELLO)])
    end.conn.send(ERROR)
    assert end.conn.state is State.CLOSED
    assert isinstance(end.conn.next_event(), ConnectionClosed)


def test_error_after_a_protocol_error_reaches_the_peer() -> None:
    # The gateway's reaction to a broken client: report it, then close.
    gateway = Connection(GATEWAY)
    gateway.receive_data(PREAMBLE + frames(CONNECT))
    with pytest.raises(RemoteProtocolError) as info:
        gateway.next_event()
    data = gateway.send_error(info.value)
    client = Connection(CLIENT)
    client.send(HELLO)
    client.receive_data(data)
    event = client.next_event()
    assert isinstance(event, pb.Error)
    assert event.code == pb.Error.PROTOCOL
    assert "Connect before ClientHello" in event.message


# -- preamble ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n", id="http"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01", id="tls-client-hello"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh"),
        pytest.param(b"TTHX" + frames(HELLO), id="almost"),
        pytest.param(b"tthr" + frames(HELLO), id="lowercase"),
        pytest.param(frames(HELLO), id="frames-without-preamble"),
    ],
)
@pytest.mark.parametrize("byte_at_a_time", [False, True], ids=["one-feed", "bytewise"])
def test_bad_preamble(data: bytes, byte_at_a_time: bool) -> None:
    gateway = Connection(GATEWAY)
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_at_a_time else [data]
    fed = 0
    with pytest.raises(RemoteProtocolError) as info:
        for chunk in chunks:
            gateway.receive_data(chunk)
            fed += len(chunk)
            assert gateway.next_event() is NEED_DATA
    # Refused as soon as the first wrong byte is in (not after 4 bytes), with
    # a message an operator can act on when something else connects.
    first_wrong = next(i for i, b in enumerate(data) if b != PREAMBLE[i])
    assert fed == (first_wrong + 1 if byte_at_a_time else len(data))
    text = str(info.value)
    assert "not a tether client" in text
    assert repr(PREAMBLE) in text
    assert gateway.state is State.CLOSED


def test_preamble_may_arrive_in_pieces() -> None:
    gateway = Connection(GATEWAY)
    for b in PREAMBLE:
        gateway.receive_data(bytes([b]))
        assert gateway.next_event() is NEED_DATA
    gateway.receive_data(frames(HELLO))
    assert gateway.next_event() == HELLO


def test_client_expects_no_preamble() -> None:
    client = Connection(CLIENT)
    client.send(HELLO)
    client.receive_data(PREAMBLE + frames(S_HELLO))
    # "TTHR" read as a length is far over the limit: refused, not buffered.
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        client.next_event()


# -- frame size ----------------------------------------------------------------------------


def _reading_frames(role: Role, max_frame: int = DEFAULT_MAX_FRAME) -> Connection:
    """A machine past its preamble, waiting for the peer's next frame."""
    conn = Connection(role, max_frame=max_frame)
    if role is CLIENT:
        conn.send(HELLO)
    else:
        conn.receive_data(PREAMBLE)
    return conn


def _assert_refused(conn: Connection, data: bytes, match: str) -> None:
    """`data` from the peer is a RemoteProtocolError saying `match`, and closes the machine."""
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        conn.next_event()
    assert conn.state is State.CLOSED


def _hello_of_size(size: int) -> pb.ClientHello:
    """A ClientHello whose Frame body is exactly `size` bytes."""
    # Field overhead is at most a few bytes, so the padding is near `size`.
    for pad in range(max(0, size - 12), size + 1):
        hello = pb.ClientHello(app="a" * pad)
        if len(pb.Frame(client_hello=hello).SerializeToString()) == size:
            return hello
    raise AssertionError(f"no ClientHello of {size} bytes")


@pytest.mark.parametrize("role", [CLIENT, GATEWAY], ids=["client", "gateway"])
@pytest.mark.parametrize(
    ("max_frame", "length"),
    [(16, 17), (1000, 1001), (DEFAULT_MAX_FRAME, DEFAULT_MAX_FRAME + 1), (16, 2**32 - 1)],
)
def test_oversized_frame_refused_from_its_header(role: Role, max_frame: int, length: int) -> None:
    conn = _reading_frames(role, max_frame=max_frame)
    # Only the header: the refusal must not wait for (or buffer) the body.
    _assert_refused(conn, struct.pack(">I", length), f"frame of {length} bytes is over the limit")


@pytest.mark.parametrize("max_frame", [16, 100, DEFAULT_MAX_FRAME])
def test_frame_of_exactly_max_frame_is_accepted(max_frame: int) -> None:
    hello = _hello_of_size(max_frame)
    gateway = Connection(GATEWAY, max_frame=max_frame)
    gateway.receive_data(PREAMBLE + encode_frame(hello))
    assert gateway.next_event() == hello


@pytest.mark.parametrize("max_frame", [-1, 0, 15])
def test_max_frame_too_small(max_frame: int) -> None:
    with pytest.raises(ValueError, match="max_frame"):
        Connection(GATEWAY, max_frame=max_frame)


# -- frames that are not messages ----------------------------------------------------------


@pytest.mark.parametrize("role", [CLIENT, GATEWAY], ids=["client", "gateway"])
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty-frame"),
        # field 99, varint 1: a message type from a newer protocol
        pytest.param(bytes([0x98, 0x06, 0x01]), id="unknown-field-99-varint"),
        pytest.param(bytes([0x9A, 0x06, 0x02, 0x08, 0x01]), id="unknown-field-99-message"),
        # field 1 (client_hello) with the wrong wire type is also not a message
        pytest.param(bytes([0x08, 0x01]), id="known-field-wrong-wire-type"),
    ],
)
def test_unknown_message(role: Role, body: bytes) -> None:
    _assert_refused(_reading_frames(role), frame_bytes(body), "unknown message")


def test_unknown_fields_beside_a_known_message_are_ignored() -> None:
    # Forward compatibility: a newer client may add fields to a Frame.
    gateway = Connection(GATEWAY)
    body = pb.Frame(client_hello=HELLO).SerializeToString() + bytes([0x98, 0x06, 0x01])
    gateway.receive_data(PREAMBLE + frame_bytes(body))
    assert gateway.next_event() == HELLO


UNDECODABLE = [
    pytest.param(b"\xff\xff\xff\xff", id="garbage"),
    pytest.param(b"\x0a\x05\x01", id="truncated-submessage"),
    pytest.param(b"\x0a", id="missing-length"),
    pytest.param(b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", id="overlong-varint"),
    pytest.param(b"\x0a\x03\x12\x01\xff", id="bad-utf8-string"),
    pytest.param(b"\x0f", id="wire-type-7"),
]


@pytest.mark.parametrize("role", [CLIENT, GATEWAY], ids=["client", "gateway"])
@pytest.mark.parametrize("body", UNDECODABLE)
def test_undecodable_frame(role: Role, body: bytes) -> None:
    _assert_refused(_reading_frames(role), frame_bytes(body), "undecodable frame")


def test_bad_utf8_is_a_protocol_error_with_the_pure_python_backend() -> None:
    # The backend is chosen once per process, so this runs in a child process.
    script = textwrap.dedent(
        """
        import struct
        from google.protobuf.internal import api_implementation
        from tether.wire import PREAMBLE, Connection, RemoteProtocolError, Role, State
        assert api_implementation.Type() == "python", api_implementation.Type()
        body = b"\\x0a\\x03\\x12\\x01\\xff"  # ClientHello.app = b"\\xff"
        conn = Connection(Role.GATEWAY)
        conn.receive_data(PREAMBLE + struct.pack(">I", len(body)) + body)
        try:
            conn.next_event()
        except RemoteProtocolError:
            assert conn.state is State.CLOSED
            print("ok")
        """
    )
    src = Path(__file__).resolve().parents[2] / "src"
    env = {
        **os.environ,
        "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# -- end of stream -------------------------------------------------------------------------


def _drain(conn: Connection, events: list[Event] | None = None) -> list[Event]:
    """Every event up to NEED_DATA or the end; a gateway answers each question.

    Events go into `events` as they come, so they survive a raised error.
    """
    events = [] if events is None else events
    last: Event | None = None
    while conn.state is not State.RELAY:
        event = conn.next_event()
        if event is NEED_DATA:
            break
        if event is PAUSED:
            if isinstance(last, pb.ClientHello):
                conn.send(S_HELLO)
            elif isinstance(last, pb.Connect):
                conn.send(REFUSED)  # stay framed
            else:
                assert isinstance(last, pb.Request)
                conn.send(resp(last.id))
            continue
        events.append(event)
        last = event
        if isinstance(event, ConnectionClosed):
            break
    return events


def _fresh(role: Role) -> Connection:
    """A machine ready to read the matching stream from _streams()."""
    conn = Connection(role)
    if role is CLIENT:
        for m in (HELLO, req(1), req(2), CONNECT):
            conn.send(m)
    return conn


def _streams() -> list[tuple[str, Role, bytes, list[int]]]:
    """(name, role, the bytes that role receives, the offsets where frames end)."""
    out = []
    for name, role, parts in [
        (
            "gateway",
            GATEWAY,
            [PREAMBLE, frames(HELLO), frames(req(1)), frames(req(2)), frames(CONNECT)],
        ),
        ("client", CLIENT, [frames(S_HELLO), frames(resp(1)), frames(resp(2)), frames(REFUSED)]),
    ]:
        ends = [sum(len(p) for p in parts[:i]) for i in range(len(parts) + 1)]
        out.append((name, role, b"".join(parts), ends))
    return out


@pytest.mark.parametrize(
    ("role", "data", "boundaries"),
    [pytest.param(r, d, b, id=n) for n, r, d, b in _streams()],
)
def test_end_of_stream_at_every_offset(role: Role, data: bytes, boundaries: list[int]) -> None:
    # Cut the stream at every offset and hang up: clean at a frame boundary
    # (and, for the gateway, before any byte or right after the preamble),
    # an error anywhere else.
    for cut in range(len(data) + 1):
        conn = _fresh(role)
        conn.receive_data(data[:cut])
        _drain(conn)
        conn.receive_data(b"")
        if cut in boundaries:
            tail = _drain(conn)
            assert len(tail) == 1 and isinstance(tail[0], ConnectionClosed), (cut, tail)
        else:
            with pytest.raises(RemoteProtocolError, match="ended inside a frame"):
                _drain(conn)
        assert conn.state is State.CLOSED, cut


def test_receive_after_end_of_stream_is_a_local_error() -> None:
    gateway = Connection(GATEWAY)
    gateway.receive_data(b"")
    gateway.receive_data(b"")  # repeating the EOF is harmless
    with pytest.raises(LocalProtocolError):
        gateway.receive_data(PREAMBLE)


def _feed_all(role: Role, chunks: Sequence[bytes]) -> tuple[list[object], str | None]:
    """Events (ConnectionClosed as a string, for comparing) and the error, if any."""
    conn = _fresh(role)
    events: list[Event] = []
    error = None
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            _drain(conn, events)
            if conn.state is State.CLOSED:
                break
    except RemoteProtocolError as exc:
        error = type(exc).__name__
    return ["closed" if isinstance(e, ConnectionClosed) else e for e in events], error


BYTEWISE = [
    *[pytest.param(r, d, id=f"{n}-whole") for n, r, d, _ in _streams()],
    *[pytest.param(r, d[:-3], id=f"{n}-cut-short") for n, r, d, _ in _streams()],
    pytest.param(GATEWAY, PREAMBLE + frames(HELLO) + frame_bytes(b"\xff\xff"), id="undecodable"),
    pytest.param(GATEWAY, PREAMBLE + frames(HELLO, HELLO), id="out-of-order"),
    pytest.param(GATEWAY, PREAMBLE + frames(HELLO) + b"\x00\x01\x00\x01", id="oversized"),
    pytest.param(CLIENT, frames(S_HELLO, resp(1), ERROR, resp(2)), id="error-frame"),
]


@pytest.mark.parametrize(("role", "data"), BYTEWISE)
@pytest.mark.parametrize("eof", [False, True], ids=["open", "eof"])
def test_byte_at_a_time_equals_one_feed(role: Role, data: bytes, eof: bool) -> None:
    tail = [b""] if eof else []
    whole = _feed_all(role, [data, *tail])
    bytewise = _feed_all(role, [data[i : i + 1] for i in range(len(data))] + tail)
    assert bytewise == whole
    assert whole[0], "the stream carries at least one event"


def test_send_with_a_prepared_frame_is_send_without_one() -> None:
    """A hello encoded once (send(..., frame=...)) gives the same bytes and the same checks."""
    message = pb.ClientHello(protocol_version=PROTOCOL_VERSION, app="a", key="k")
    frame = encode_frame(message)
    plain, prepared = Connection(Role.CLIENT), Connection(Role.CLIENT)
    assert prepared.send(message, frame=frame) == plain.send(message)
    with pytest.raises(LocalProtocolError, match="ClientHello sent twice"):
        prepared.send(message, frame=frame)
