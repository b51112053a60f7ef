"""Property tests of the sans-I/O wire machine (tether.wire.protocol).

TCP delivers a byte stream in whatever pieces it likes, and the gateway reads
from programs it does not trust, so: (a) how the stream is split never changes
what the machine sees, (b) no input makes it raise anything but
RemoteProtocolError, and (c) a client and a gateway driven back to back with
random legal moves always agree.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tether.wire import (
    NEED_DATA,
    PAUSED,
    PREAMBLE,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    Role,
    State,
    encode_frame,
    pb,
)
from tether.wire.protocol import _FIELD_BY_TYPE

CLIENT = Role.CLIENT
GATEWAY = Role.GATEWAY

# Modest counts keep the file to a few seconds; no deadline, since a loaded CI
# machine must not turn slowness into a failure.
FAST = settings(max_examples=200, deadline=None)

S_HELLO = pb.ServerHello(protocol_version=PROTOCOL_VERSION, gateway_version="t")
CONNECTED = pb.ConnectResult(
    descriptor="d-1", peer=pb.Address(family=pb.FAMILY_INET, host="192.0.2.1", port=443)
)
REFUSED = pb.ConnectResult(error=pb.Error(code=pb.Error.PERMISSION_DENIED, message="no"))


def frames(*messages: Message) -> bytes:
    return b"".join(encode_frame(m) for m in messages)


def respond(request: pb.Request) -> pb.Response:
    return pb.Response(id=request.id, done=True)


# -- strategies ----------------------------------------------------------------------

text = st.text(max_size=12)
u32 = st.integers(0, 2**32 - 1)

client_hellos = st.builds(
    pb.ClientHello, protocol_version=u32, app=text, key=text, client_version=text
)
server_hellos = st.builds(pb.ServerHello, protocol_version=u32, gateway_version=text)
# Stream connects: a successful answer switches the stream to raw bytes.
connects = st.builds(
    pb.Connect,
    transport=st.sampled_from([pb.TRANSPORT_UNSPECIFIED, pb.TRANSPORT_TCP]),
    family=st.sampled_from([pb.FAMILY_UNSPEC, pb.FAMILY_INET, pb.FAMILY_INET6]),
    host=text,
    port=st.integers(0, 65535),
    timeout=st.floats(0, 120, allow_nan=False),
)
# UDP association opens: a successful answer keeps the stream framed.
udp_opens = st.builds(
    pb.Connect,
    transport=st.just(pb.TRANSPORT_UDP),
    family=st.sampled_from([pb.FAMILY_UNSPEC, pb.FAMILY_INET, pb.FAMILY_INET6]),
    host=text,
    port=st.integers(0, 65535),
    source=st.builds(pb.Address, host=text, port=st.integers(0, 65535)),
)
allows = st.builds(
    lambda h, p: pb.Request(allow_destination=pb.AllowDestination(host=h, port=p)),
    text,
    st.integers(0, 65535),
)
_ops = st.one_of(
    st.builds(lambda n: pb.Request(gethostbyname=pb.GetHostByName(name=n)), text),
    st.builds(lambda a: pb.Request(gethostbyaddr=pb.GetHostByAddr(address=a)), text),
    st.builds(
        lambda h, p: pb.Request(
            getaddrinfo=pb.GetAddrInfo(host=h, has_host=True, port=p, has_port=True)
        ),
        text,
        text,
    ),
    st.builds(
        lambda d, v: pb.Request(
            set_option=pb.SetOption(
                descriptor=d, value=pb.OptionValue(name=pb.SO_RCVBUF, int_value=v)
            )
        ),
        text,
        st.integers(-(2**63), 2**63 - 1),
    ),
)


@st.composite
def request_lists(draw: st.DrawFn, max_size: int = 8) -> list[pb.Request]:
    ops = draw(st.lists(_ops, max_size=max_size))
    for i, op in enumerate(ops, start=1):
        op.id = i
    return ops


responses = st.builds(
    lambda i, name: pb.Response(id=i, host=pb.HostEntry(name=name, addresses=["192.0.2.7"])),
    st.integers(0, 2**64 - 1),
    text,
)
errors = st.builds(pb.Error, code=st.integers(0, 11), errno=st.integers(-5, 200), message=text)
any_message: st.SearchStrategy[Message] = st.one_of(
    client_hellos,
    server_hellos,
    connects,
    udp_opens,
    allows,
    st.just(CONNECTED),
    st.just(REFUSED),
    _ops,
    responses,
    errors,
)
# Raw bytes after the switch, including some that look exactly like frames.
raw_bytes = st.one_of(
    st.binary(max_size=64),
    st.lists(any_message, max_size=3).map(lambda ms: frames(*ms)),
)


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """`data` cut at the given offsets (duplicates and order don't matter)."""
    points = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    if draw(st.booleans()):
        # Often a lot of cuts, so the byte-at-a-time end is well covered.
        return split(data, range(len(data)))
    return split(data, draw(st.lists(st.integers(0, len(data)), max_size=24)))


# -- drivers ---------------------------------------------------------------------


def run_gateway(chunks: Sequence[bytes], connect_ok: bool) -> tuple[list[object], bytes, State]:
    """What a gateway that answers every question sees when fed `chunks`.

    Returns the events (ConnectionClosed as "closed"), the raw bytes it would
    relay after the switch (trailing_data, then everything read later), and
    the final state.
    """
    conn = Connection(GATEWAY)
    events: list[object] = []
    raw = bytearray()
    last: object = None
    for chunk in chunks:
        if conn.state is State.RELAY:
            raw += chunk  # the driver now reads the socket directly
            continue
        conn.receive_data(chunk)
        while conn.state not in (State.RELAY, State.CLOSED):
            event = conn.next_event()
            if event is NEED_DATA:
                break
            if event is PAUSED:
                if isinstance(last, pb.ClientHello):
                    conn.send(S_HELLO)
                elif isinstance(last, pb.Connect):
                    conn.send(CONNECTED if connect_ok else REFUSED)
                    if conn.state is State.RELAY:
                        raw += conn.trailing_data
                else:
                    assert isinstance(last, pb.Request)
                    conn.send(respond(last))
                continue
            events.append("closed" if isinstance(event, ConnectionClosed) else event)
            last = event
    return events, bytes(raw), conn.state


def run_client(
    sent: Sequence[Message], chunks: Sequence[bytes]
) -> tuple[list[object], bytes, State]:
    """The same for a client that has sent `sent` (a client never pauses)."""
    conn = Connection(CLIENT)
    for message in sent:
        conn.send(message)
    events: list[object] = []
    raw = bytearray()
    for chunk in chunks:
        if conn.state is State.RELAY:
            raw += chunk
            continue
        conn.receive_data(chunk)
        while conn.state not in (State.RELAY, State.CLOSED):
            event = conn.next_event()
            assert event is not PAUSED
            if event is NEED_DATA:
                break
            events.append("closed" if isinstance(event, ConnectionClosed) else event)
            if conn.state is State.RELAY:
                raw += conn.trailing_data
    return events, bytes(raw), conn.state


# -- (a) any split gives the same result ------------------------------------------------


@FAST
@given(hello=client_hellos, requests=request_lists(), eof=st.booleans(), data=st.data())
def test_gateway_requests_any_split(
    hello: pb.ClientHello, requests: list[pb.Request], eof: bool, data: st.DataObject
) -> None:
    stream = PREAMBLE + frames(hello, *requests)
    tail = [b""] if eof else []
    whole = run_gateway([stream, *tail], connect_ok=False)
    assert whole == ([hello, *requests, *(["closed"] if eof else [])], b"", whole[2])
    assert whole[2] is (State.CLOSED if eof else State.READY)
    assert run_gateway([*data.draw(splits(stream)), *tail], connect_ok=False) == whole


@FAST
@given(hello=client_hellos, connect=connects, raw=raw_bytes, data=st.data())
def test_gateway_connect_then_raw_any_split(
    hello: pb.ClientHello, connect: pb.Connect, raw: bytes, data: st.DataObject
) -> None:
    # Raw bytes the client pipelines behind its Connect go to the peer intact.
    stream = PREAMBLE + frames(hello, connect) + raw
    whole = run_gateway([stream], connect_ok=True)
    assert whole == ([hello, connect], raw, State.RELAY)
    assert run_gateway(data.draw(splits(stream)), connect_ok=True) == whole


@FAST
@given(requests=request_lists(), eof=st.booleans(), data=st.data())
def test_client_responses_any_split(
    requests: list[pb.Request], eof: bool, data: st.DataObject
) -> None:
    sent = [pb.ClientHello(protocol_version=PROTOCOL_VERSION), *requests]
    answers = [respond(r) for r in requests]
    stream = frames(S_HELLO, *answers)
    tail = [b""] if eof else []
    whole = run_client(sent, [stream, *tail])
    expected_state = State.CLOSED if eof else State.READY
    assert whole == ([S_HELLO, *answers, *(["closed"] if eof else [])], b"", expected_state)
    assert run_client(sent, [*data.draw(splits(stream)), *tail]) == whole


@FAST
@given(
    requests=request_lists(max_size=3),
    connect=connects,
    raw=raw_bytes,
    data=st.data(),
)
def test_client_connect_result_then_raw_any_split(
    requests: list[pb.Request], connect: pb.Connect, raw: bytes, data: st.DataObject
) -> None:
    sent = [pb.ClientHello(protocol_version=PROTOCOL_VERSION), *requests, connect]
    answers = [respond(r) for r in requests]
    stream = frames(S_HELLO, *answers, CONNECTED) + raw
    whole = run_client(sent, [stream])
    assert whole == ([S_HELLO, *answers, CONNECTED], raw, State.RELAY)
    assert run_client(sent, data.draw(splits(stream))) == whole


@FAST
@given(
    hello=client_hellos,
    opening=udp_opens,
    requests=st.lists(st.one_of(_ops, allows), max_size=8),
    data=st.data(),
)
def test_udp_association_stays_framed_any_split(
    hello: pb.ClientHello,
    opening: pb.Connect,
    requests: list[pb.Request],
    data: st.DataObject,
) -> None:
    # After a UDP association opens, requests (AllowDestination among them)
    # stay frames on both ends; nothing is taken for raw bytes.
    for i, request in enumerate(requests, start=1):
        request.id = i
    stream = PREAMBLE + frames(hello, opening, *requests)
    whole = run_gateway([stream], connect_ok=True)
    assert whole == ([hello, opening, *requests], b"", State.ASSOCIATED)
    assert run_gateway(data.draw(splits(stream)), connect_ok=True) == whole

    sent: list[Message] = [pb.ClientHello(protocol_version=PROTOCOL_VERSION), opening]
    answers = [respond(r) for r in requests]
    client = Connection(CLIENT)
    for message in sent:
        client.send(message)
    client.receive_data(frames(S_HELLO, CONNECTED))
    assert client.next_event() == S_HELLO
    assert client.next_event() == CONNECTED
    assert client.state is State.ASSOCIATED
    for request in requests:
        client.send(request)
    if answers:  # receive_data(b"") would mean end of stream
        client.receive_data(frames(*answers))
    assert [client.next_event() for _ in answers] == answers
    assert client.next_event() is NEED_DATA
    assert client.state is State.ASSOCIATED


# -- (b) hostile input ------------------------------------------------------------------


@st.composite
def corrupted_frames(draw: st.DrawFn) -> bytes:
    """A valid frame with one body byte replaced: mostly near-valid protobuf."""
    frame = encode_frame(draw(any_message))
    if len(frame) == 4:
        return frame
    i = draw(st.integers(4, len(frame) - 1))
    return frame[:i] + bytes([draw(st.integers(0, 255))]) + frame[i + 1 :]


# Length-correct frames around random bodies reach the protobuf decoder;
# encoded messages in random order reach the ordering checks.
_frame_soup = st.lists(
    st.one_of(
        any_message.map(encode_frame),
        corrupted_frames(),
        st.binary(max_size=40).map(lambda b: len(b).to_bytes(4, "big") + b),
        st.binary(max_size=8),
    ),
    max_size=8,
).map(b"".join)
hostile = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: PREAMBLE + b),
    _frame_soup.map(lambda b: PREAMBLE + b),
    # a valid hello first gets past the first checks more often
    st.tuples(client_hellos, _frame_soup).map(lambda t: PREAMBLE + frames(t[0]) + t[1]),
)


def fuzz(conn: Connection, chunks: Sequence[bytes], connect_ok: bool) -> None:
    """Drive `conn` like the gateway/client loops do; only RemoteProtocolError may escape."""
    last: object = None
    budget = 10_000  # a machine that loops without consuming input would hang the driver
    for chunk in chunks:
        if conn.state in (State.RELAY, State.CLOSED):
            return  # the framed part is over
        conn.receive_data(chunk)
        while conn.state is not State.RELAY:
            budget -= 1
            assert budget > 0, "next_event() never settled"
            event = conn.next_event()
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                break
            if event is PAUSED:
                assert conn.role is GATEWAY
                # The gateway answers whatever it was asked; that must be legal.
                if isinstance(last, pb.ClientHello):
                    conn.send(S_HELLO)
                elif isinstance(last, pb.Connect):
                    conn.send(CONNECTED if connect_ok else REFUSED)
                else:
                    assert isinstance(last, pb.Request)
                    conn.send(respond(last))
                continue
            last = event


@FAST
@given(
    role=st.sampled_from([GATEWAY, CLIENT]),
    stream=hostile,
    eof=st.booleans(),
    connect_ok=st.booleans(),
    data=st.data(),
)
def test_hostile_input_only_raises_remote_protocol_error(
    role: Role, stream: bytes, eof: bool, connect_ok: bool, data: st.DataObject
) -> None:
    conn = Connection(role, max_frame=256)
    if role is CLIENT:
        # A client with everything outstanding, so some answers are legal.
        for message in (pb.ClientHello(), pb.Request(id=1), pb.Request(id=2), pb.Connect()):
            conn.send(message)
        stream = stream.removeprefix(PREAMBLE)
    chunks = data.draw(splits(stream)) + ([b""] if eof else [])
    try:
        fuzz(conn, chunks, connect_ok)
    except RemoteProtocolError:
        assert conn.state is State.CLOSED
        assert isinstance(conn.next_event(), ConnectionClosed)
        return
    if eof:
        # End of stream always ends the framed part, one way or the other.
        assert conn.state in (State.CLOSED, State.RELAY)


# -- (c) a client and a gateway back to back ------------------------------------------


class BackToBack(RuleBasedStateMachine):
    """Random legal moves on both ends, with the bytes delivered in random pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.client = Connection(CLIENT)
        self.gateway = Connection(GATEWAY)
        self.to_gateway = bytearray()  # in flight, client -> gateway
        self.to_client = bytearray()
        self.hello_sent = False
        self.connect_out = False  # the client awaits a ConnectResult
        self.udp_out = False  # ... for a Connect that opens a UDP association
        self.next_id = 1
        self.sent_ids: list[int] = []
        self.owed: deque[int] = deque()  # request ids the client still awaits
        self.answered: list[int] = []
        self.question: Message | None = None  # what the gateway must answer next
        self.gateway_wrote = bytearray()  # raw, after the switch
        self.client_read = bytearray()
        self.client_wrote = bytearray()
        self.gateway_read = bytearray()

    # -- the client --

    def _client_may_frame(self) -> bool:
        return (
            self.hello_sent
            and not self.connect_out
            and self.client.state in (State.HELLO, State.READY)
        )

    def _client_may_ask(self) -> bool:
        """Requests: before a connect, and on an open UDP association."""
        return self._client_may_frame() or self.client.state is State.ASSOCIATED

    @precondition(lambda self: not self.hello_sent)
    @rule()
    def client_hello(self) -> None:
        self.to_gateway += self.client.send(pb.ClientHello(protocol_version=PROTOCOL_VERSION))
        self.hello_sent = True

    @precondition(lambda self: self._client_may_frame())
    @rule(connect=connects)
    def client_connect(self, connect: pb.Connect) -> None:
        before = self.client.state
        self.to_gateway += self.client.send(connect)
        self.connect_out = True
        # Before the ServerHello the client stays in HELLO with the Connect pending.
        assert self.client.state is (State.HELLO if before is State.HELLO else State.CONNECTING)

    @precondition(lambda self: self._client_may_frame())
    @rule(opening=udp_opens)
    def client_open_udp(self, opening: pb.Connect) -> None:
        self.client_connect(opening)
        self.udp_out = True

    @precondition(lambda self: self.client.state is State.ASSOCIATED)
    @rule(op=allows)
    def client_allow_destination(self, op: pb.Request) -> None:
        self.client_request(op)

    @precondition(lambda self: self.client.state is State.ASSOCIATED)
    @rule(connect=st.one_of(connects, udp_opens))
    def client_connect_on_association(self, connect: pb.Connect) -> None:
        # An association's stream carries requests only: refused locally.
        try:
            self.client.send(connect)
        except LocalProtocolError:
            pass
        else:
            raise AssertionError("a Connect was sent on a UDP association's stream")
        assert self.client.state is State.ASSOCIATED

    @precondition(lambda self: self._client_may_frame())
    @rule(op=allows)
    def client_allow_without_association(self, op: pb.Request) -> None:
        before = self.client.state
        try:
            self.client.send(op)
        except LocalProtocolError:
            pass
        else:
            raise AssertionError("AllowDestination was sent outside a UDP association")
        assert self.client.state is before

    @precondition(lambda self: self._client_may_ask())
    @rule(op=_ops)
    def client_request(self, op: pb.Request) -> None:
        op.id = self.next_id
        self.next_id += 1
        self.to_gateway += self.client.send(op)
        self.sent_ids.append(op.id)
        self.owed.append(op.id)

    @precondition(lambda self: self.hello_sent and self.client.state is not State.RELAY)
    @rule()
    def client_out_of_turn(self) -> None:
        # Refused locally, and harmless: nothing is written, nothing changes.
        before = self.client.state
        message: Message = pb.Request(id=0) if self.connect_out else pb.ClientHello()
        try:
            self.client.send(message)
        except LocalProtocolError:
            pass
        else:
            raise AssertionError(f"client sent {type(message).__name__} out of turn")
        assert self.client.state is before

    @precondition(lambda self: self.client.state is State.RELAY)
    @rule(raw=st.binary(min_size=1, max_size=16))
    def client_writes_raw(self, raw: bytes) -> None:
        self.to_gateway += raw
        self.client_wrote += raw

    @precondition(lambda self: bool(self.to_client))
    @rule(n=st.integers(1, 64))
    def deliver_to_client(self, n: int) -> None:
        chunk = bytes(self.to_client[:n])
        del self.to_client[:n]
        if self.client.state is State.RELAY:
            self.client_read += chunk
            return
        self.client.receive_data(chunk)
        while self.client.state is not State.RELAY:
            event = self.client.next_event()
            assert event is not PAUSED
            if event is NEED_DATA:
                return
            if isinstance(event, pb.ServerHello):
                assert self.client.state in (State.READY, State.CONNECTING)
            elif isinstance(event, pb.Response):
                assert self.owed, "a Response nobody asked for"
                assert event.id == self.owed.popleft(), "Responses come in request order"
                self.answered.append(event.id)
            else:
                assert isinstance(event, pb.ConnectResult), f"unexpected event {event!r}"
                assert self.connect_out
                self.connect_out = False
                udp, self.udp_out = self.udp_out, False
                if event.HasField("error"):
                    assert self.client.state is State.READY
                elif udp:
                    assert self.client.state is State.ASSOCIATED  # still framed
                else:
                    assert self.client.state is State.RELAY
                    self.client_read += self.client.trailing_data

    # -- the gateway --

    @precondition(lambda self: bool(self.to_gateway))
    @rule(n=st.integers(1, 64))
    def deliver_to_gateway(self, n: int) -> None:
        chunk = bytes(self.to_gateway[:n])
        del self.to_gateway[:n]
        if self.gateway.state is State.RELAY:
            self.gateway_read += chunk
            return
        self.gateway.receive_data(chunk)
        self._gateway_pull()

    def _gateway_pull(self) -> None:
        event = self.gateway.next_event()
        if event is NEED_DATA:
            return
        if event is PAUSED:
            assert self.question is not None
            return
        assert self.question is None, "a new question before the last was answered"
        assert isinstance(event, pb.ClientHello | pb.Connect | pb.Request), event
        self.question = event
        # Nothing more is read until this is answered, however much is buffered.
        assert self.gateway.next_event() is PAUSED

    @precondition(lambda self: self.question is not None)
    @rule(ok=st.booleans())
    def gateway_answer(self, ok: bool) -> None:
        question, self.question = self.question, None
        if isinstance(question, pb.ClientHello):
            reply: Message = S_HELLO
        elif isinstance(question, pb.Connect):
            reply = CONNECTED if ok else REFUSED
        else:
            assert isinstance(question, pb.Request)
            reply = respond(question)
        self.to_client += self.gateway.send(reply)
        if self.gateway.state is State.RELAY:
            assert reply is CONNECTED
            self.gateway_read += self.gateway.trailing_data
        else:
            self._gateway_pull()

    @precondition(lambda self: self.gateway.state is State.RELAY)
    @rule(raw=st.binary(min_size=1, max_size=16))
    def gateway_writes_raw(self, raw: bytes) -> None:
        self.to_client += raw
        self.gateway_wrote += raw

    # -- checks --

    @rule(ok=st.booleans())
    def settle(self, ok: bool = False) -> None:
        """Deliver everything and answer everything (Connects as `ok` says), then check."""
        for _ in range(10_000):
            if self.to_gateway:
                self.deliver_to_gateway(len(self.to_gateway))
            elif self.question is not None:
                self.gateway_answer(ok=ok)
            elif self.to_client:
                self.deliver_to_client(len(self.to_client))
            else:
                break
        self.agree_when_quiet()
        assert not self.owed, "every Request got its Response"

    @invariant()
    def nobody_closed(self) -> None:
        # Only legal moves are made, so neither side may have given up.
        assert self.client.state is not State.CLOSED
        assert self.gateway.state is not State.CLOSED

    @invariant()
    def client_never_switches_first(self) -> None:
        if self.client.state is State.RELAY:
            assert self.gateway.state is State.RELAY

    @invariant()
    def each_request_answered_at_most_once(self) -> None:
        assert self.answered == self.sent_ids[: len(self.answered)]
        assert list(self.owed) == self.sent_ids[len(self.answered) :]

    @invariant()
    def agree_when_quiet(self) -> None:
        if self.to_gateway or self.to_client or self.question is not None:
            return
        assert self.client.state is self.gateway.state
        assert not self.connect_out
        if self.client.state is State.RELAY:
            assert self.client_read == self.gateway_wrote
            assert self.gateway_read == self.client_wrote

    def teardown(self) -> None:
        self.settle()
        assert self.answered == self.sent_ids


TestBackToBack = BackToBack.TestCase
TestBackToBack.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


# -- the frame encoding ---------------------------------------------------------------


def _frame_the_slow_way(message: Message) -> bytes:
    frame = pb.Frame()
    getattr(frame, _FIELD_BY_TYPE[type(message)]).CopyFrom(message)
    body = frame.SerializeToString()
    return len(body).to_bytes(4, "big") + body


@FAST
@given(
    st.one_of(
        any_message,
        # Bodies past one varint byte (>= 128) and past two (>= 16 KiB).
        st.builds(pb.ServerHello, gateway_version=st.text(min_size=100, max_size=20_000)),
    )
)
def test_encode_frame_is_what_protobuf_serializes_for_a_frame(message: Message) -> None:
    assert encode_frame(message) == _frame_the_slow_way(message)
