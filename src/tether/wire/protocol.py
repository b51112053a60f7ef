"""The client <-> gateway protocol as a sans-I/O state machine.

Feed received bytes to :meth:`Connection.receive_data`, pull events with
:meth:`Connection.next_event`, and turn outgoing messages into bytes with
:meth:`Connection.send`. There are no sockets in here: the asyncio gateway and
the blocking client drive the same machine (the shape follows h11).

A stream starts with :data:`PREAMBLE`, then length-delimited frames (4-byte
big-endian length + one serialized ``Frame``). After a successful
``ConnectResult`` the stream switches to raw bytes: the machine's state
becomes :attr:`State.RELAY` and whatever followed the last frame is in
:attr:`Connection.trailing_data`.

Order (each side enforces what it receives and what it sends):

* client -> gateway: ``ClientHello`` first, exactly once; then ``Connect``
  (or ``Resume``, which is answered the same way) or ``Request`` frames. The
  client may pipeline them behind the hello.
* gateway -> client: ``ServerHello`` first; then one ``ConnectResult`` per
  ``Connect``/``Resume`` and one ``Response`` per ``Request``, in order.
* a successful ``ConnectResult`` to a UDP ``Connect`` (``TRANSPORT_UDP``)
  does not switch to raw bytes: the stream becomes the datagram
  association's own control stream (:attr:`State.ASSOCIATED`), framed,
  carrying only ``Request``/``Response``. ``AllowDestination`` is valid
  there and nowhere else; another ``Connect`` or a ``Resume`` is not.
* either side may send ``Error`` (a protocol error) and close.

The gateway answers one message at a time: after an event that needs an
answer, :meth:`next_event` returns :data:`PAUSED` until the answer is sent.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Final, TypeAlias

from google.protobuf.message import DecodeError

from tether.wire._pb import tether_pb2 as pb

PROTOCOL_VERSION: Final = 1
PREAMBLE: Final = b"TTHR"

# Control messages are small; the largest is a resolver answer, and 64 KiB
# holds well over a thousand addresses. A bigger frame is a broken or hostile
# peer, refused before any of it is buffered.
DEFAULT_MAX_FRAME: Final = 64 * 1024

_LENGTH = struct.Struct(">I")
_unpack_length = _LENGTH.unpack_from
_Frame = pb.Frame

Message: TypeAlias = (
    pb.ClientHello
    | pb.ServerHello
    | pb.Connect
    | pb.Resume
    | pb.ConnectResult
    | pb.Request
    | pb.Response
    | pb.Error
)


class Role(enum.Enum):
    CLIENT = "client"
    GATEWAY = "gateway"


class State(enum.Enum):
    HELLO = "hello"  # the hello exchange has not completed
    READY = "ready"  # framed; Connect / Request allowed
    CONNECTING = "connecting"  # a Connect awaits its ConnectResult
    RELAY = "relay"  # switched to raw bytes
    ASSOCIATED = "associated"  # a UDP association's control stream: requests only
    CLOSED = "closed"  # an Error was sent or received, or the peer hung up


# The states as module names: the machine runs on every connect on both
# sides, and a module global is one lookup where State.X is two.
_HELLO: Final = State.HELLO
_READY: Final = State.READY
_CONNECTING: Final = State.CONNECTING
_RELAY: Final = State.RELAY
_ASSOCIATED: Final = State.ASSOCIATED
_CLOSED: Final = State.CLOSED


class _Sentinel(enum.Enum):
    NEED_DATA = "need-data"
    PAUSED = "paused"


NEED_DATA: Final = _Sentinel.NEED_DATA
PAUSED: Final = _Sentinel.PAUSED


class ConnectionClosed:
    """The peer closed the stream at a frame boundary (clean end of stream)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ConnectionClosed()"


Event: TypeAlias = Message | ConnectionClosed


class ProtocolError(Exception):
    """Base class: the stream broke the protocol and must be closed."""

    def __init__(self, message: str, code: int = pb.Error.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code

    def to_error(self) -> pb.Error:
        return pb.Error(code=self.code, message=str(self))  # type: ignore[arg-type]


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow here."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow here."""


_FIELD_BY_TYPE: Final[dict[type[Message], str]] = {
    pb.ClientHello: "client_hello",
    pb.ServerHello: "server_hello",
    pb.Connect: "connect",
    pb.Resume: "resume",
    pb.ConnectResult: "connect_result",
    pb.Request: "request",
    pb.Response: "response",
    pb.Error: "error",
}


# A Connect for TRANSPORT_UDP opens a datagram association instead of a relay.
_UDP: Final = pb.TRANSPORT_UDP
_CONNECTS: Final = (pb.Connect, pb.Resume)


# A Frame holds exactly one message, so its encoding is that field's key
# (field number, wire type 2), the message's length as a varint, and the
# message: built here from the message's own bytes, with no Frame made and
# no copy of the message into one (tests/wire check it is byte for byte
# what Frame.SerializeToString gives).
_KEYS: Final[dict[type[Message], bytes]] = {
    cls: bytes([pb.Frame.DESCRIPTOR.fields_by_name[name].number << 3 | 2])
    for cls, name in _FIELD_BY_TYPE.items()
}


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_frame(message: Message) -> bytes:
    """Serialize one message as a length-delimited frame (no order checks)."""
    body = message.SerializeToString()
    n = len(body)
    head = _KEYS[type(message)] + (bytes((n,)) if n < 0x80 else _varint(n))
    return _LENGTH.pack(len(head) + n) + head + body


class _Side:
    """What one direction of the stream has carried so far."""

    __slots__ = ("connecting", "hello_done", "requests")

    def __init__(self) -> None:
        self.hello_done = False
        self.connecting = False
        self.requests = 0  # Requests sent that still await their Response


class Connection:
    """One stream between an app and the gateway, seen from `role`."""

    # One per stream, made on every connect on both sides: slots make it
    # smaller and its attributes quicker to reach.
    __slots__ = (
        "_awaiting_answer",
        "_buf",
        "_datagram",
        "_eof",
        "_hello_answered",
        "_hello_received",
        "_pending",
        "_preamble_seen",
        "_preamble_sent",
        "_resuming",
        "_state",
        "max_frame",
        "peer_version",
        "role",
        "trailing_data",
    )

    def __init__(self, role: Role, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 16:
            raise ValueError("max_frame must be at least 16 bytes")
        self.role = role
        self.max_frame = max_frame
        self._buf = bytearray()
        self._eof = False
        self._preamble_seen = role is Role.CLIENT  # only the gateway expects one
        self._preamble_sent = role is Role.GATEWAY
        # What the client has asked for and the gateway has not yet answered.
        self._pending = _Side()
        self._hello_received = False
        self._hello_answered = False
        self._awaiting_answer = False  # gateway: an event needs an answer first
        self._resuming = False  # the Connect in progress is a Resume
        self._datagram = False  # the Connect in progress opens a UDP association
        self._state = _HELLO
        self.trailing_data = b""
        self.peer_version: int | None = None

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def their_role(self) -> Role:
        return Role.GATEWAY if self.role is Role.CLIENT else Role.CLIENT

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add received bytes; ``b""`` means the peer closed its side."""
        if self._state is _RELAY:
            raise LocalProtocolError("receive_data() after the switch to raw bytes")
        if self._eof and data:
            raise LocalProtocolError("receive_data() after end of stream")
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | _Sentinel:
        """The next event, or NEED_DATA / PAUSED. Raises RemoteProtocolError."""
        if self._state is _CLOSED:
            return ConnectionClosed()
        if self._state is _RELAY:
            raise LocalProtocolError("next_event() after the switch to raw bytes")
        if self._awaiting_answer:
            return PAUSED
        try:
            message = self._parse_one()
        except RemoteProtocolError:
            self._state = _CLOSED
            raise
        if message is None:
            if self._eof:
                if self._buf or not self._preamble_seen:
                    self._state = _CLOSED
                    if not self._buf and not self._preamble_seen:
                        return ConnectionClosed()
                    raise RemoteProtocolError(
                        f"stream ended inside a frame ({len(self._buf)} bytes left over)"
                    )
                self._state = _CLOSED
                return ConnectionClosed()
            return NEED_DATA
        self._check_receive(message)
        return message

    def _parse_one(self) -> Message | None:
        buf = self._buf
        if not self._preamble_seen:
            if len(buf) < len(PREAMBLE):
                if not PREAMBLE.startswith(bytes(buf)):
                    raise self._bad_preamble()
                return None
            if buf[: len(PREAMBLE)] != PREAMBLE:
                raise self._bad_preamble()
            del buf[: len(PREAMBLE)]
            self._preamble_seen = True
        size = len(buf)
        if size < 4:  # the length prefix
            return None
        (length,) = _unpack_length(buf)
        if length > self.max_frame:
            raise RemoteProtocolError(
                f"frame of {length} bytes is over the limit of {self.max_frame} bytes"
            )
        end = 4 + length
        if size < end:
            return None
        frame = _Frame()
        try:
            frame.ParseFromString(bytes(buf[4:end]))
        except (DecodeError, UnicodeDecodeError) as exc:
            # The pure-Python protobuf backend reports bad UTF-8 as UnicodeDecodeError.
            raise RemoteProtocolError(f"undecodable frame: {exc}") from exc
        del buf[:end]
        kind = frame.WhichOneof("msg")
        if kind is None:
            # Unknown fields (a message type from a newer protocol) land here.
            raise RemoteProtocolError("unknown message (empty or unrecognised frame)")
        message: Message = getattr(frame, kind)
        return message

    def _bad_preamble(self) -> RemoteProtocolError:
        head = bytes(self._buf[: len(PREAMBLE)])
        return RemoteProtocolError(
            f"not a tether client: stream starts with {head!r}, expected {PREAMBLE!r}"
        )

    def _check_receive(self, message: Message) -> None:
        if isinstance(message, pb.Error):
            self._state = _CLOSED
            return
        if self.role is Role.GATEWAY:
            if isinstance(message, pb.ClientHello):
                if self._hello_received:
                    raise self._remote(f"{type(message).__name__} sent twice")
                self._hello_received = True
                self.peer_version = message.protocol_version
                self._awaiting_answer = True
                return
            if not self._hello_received:
                raise self._remote(f"{type(message).__name__} before ClientHello")
            if isinstance(message, _CONNECTS):
                if self._state is not _READY:
                    raise self._remote(f"{type(message).__name__} while {self._state.value}")
                self._resuming = isinstance(message, pb.Resume)
                self._datagram = isinstance(message, pb.Connect) and message.transport == _UDP
                self._state = _CONNECTING
                self._awaiting_answer = True
                return
            if isinstance(message, pb.Request):
                self._check_op(message, self._remote)
                self._awaiting_answer = True
                return
            raise self._remote(f"{type(message).__name__} is not something a client may send")
        # client side
        if isinstance(message, pb.ServerHello):
            if not self._pending.hello_done:
                raise self._remote("ServerHello before ClientHello")
            if self._state is not _HELLO:
                raise self._remote(f"{type(message).__name__} sent twice")
            self.peer_version = message.protocol_version
            if message.HasField("error"):
                self._state = _CLOSED
            else:
                self._state = _CONNECTING if self._pending.connecting else _READY
            return
        if self._state is _HELLO:
            raise self._remote(f"{type(message).__name__} before ServerHello")
        if isinstance(message, pb.ConnectResult):
            if not self._pending.connecting:
                raise self._remote("ConnectResult without a Connect")
            if self._pending.requests:
                raise self._remote("ConnectResult before the Response owed for a Request")
            self._pending.connecting = False
            self._connect_answered(message)
            return
        if isinstance(message, pb.Response):
            if self._pending.requests == 0:
                raise self._remote("Response without a Request")
            self._pending.requests -= 1
            return
        raise self._remote(f"{type(message).__name__} is not something a gateway may send")

    def _remote(self, text: str) -> RemoteProtocolError:
        self._state = _CLOSED
        return RemoteProtocolError(f"out of order: {text}")

    def _connect_answered(self, result: pb.ConnectResult) -> None:
        """The state after a ConnectResult, on either side."""
        if result.HasField("error"):
            # A refused Resume is followed by raw tail bytes: the stream
            # cannot go back to frames, so it ends.
            self._state = _CLOSED if self._resuming else _READY
        elif self._datagram:
            self._state = _ASSOCIATED
        else:
            self._switch_to_relay()

    def _check_op(self, request: pb.Request, fail: Callable[[str], ProtocolError]) -> None:
        """AllowDestination belongs on an association's stream, and only there."""
        if request.WhichOneof("op") == "allow_destination" and self._state is not _ASSOCIATED:
            raise fail(f"AllowDestination while {self._state.value} (not a UDP association)")

    def _switch_to_relay(self) -> None:
        self._state = _RELAY
        self.trailing_data = bytes(self._buf)
        self._buf.clear()

    # -- sending -----------------------------------------------------------

    def send(self, message: Message, *, frame: bytes | None = None) -> bytes:
        """Bytes that carry `message`; raises LocalProtocolError if out of order.

        `frame`, when given, is ``encode_frame(message)`` made once by a caller
        that sends the same message on every stream (each side's hello): the
        order is checked as always, the encoding is not redone.
        """
        self._check_send(message)
        data = encode_frame(message) if frame is None else frame
        if not self._preamble_sent:
            self._preamble_sent = True
            data = PREAMBLE + data
        return data

    def _check_send(self, message: Message) -> None:
        # Two identity tests, not a set: Enum's __hash__ is a Python call.
        if self._state is _CLOSED or self._state is _RELAY:
            raise LocalProtocolError(
                f"cannot send {type(message).__name__}: stream is {self._state.value}"
            )
        if isinstance(message, pb.Error):
            self._state = _CLOSED
            return
        if self.role is Role.CLIENT:
            if isinstance(message, pb.ClientHello):
                if self._pending.hello_done:
                    raise LocalProtocolError("ClientHello sent twice")
                self._pending.hello_done = True
                return
            if not self._pending.hello_done:
                raise LocalProtocolError(f"{type(message).__name__} before ClientHello")
            if isinstance(message, _CONNECTS):
                if self._pending.connecting or self._state is _CONNECTING:
                    raise LocalProtocolError("a Connect is already in progress")
                if self._state is _ASSOCIATED:
                    raise LocalProtocolError(
                        f"{type(message).__name__} on a UDP association's stream"
                    )
                self._resuming = isinstance(message, pb.Resume)
                self._datagram = isinstance(message, pb.Connect) and message.transport == _UDP
                self._pending.connecting = True
                if self._state is _READY:
                    self._state = _CONNECTING
                return
            if isinstance(message, pb.Request):
                if self._pending.connecting:
                    raise LocalProtocolError("Request on a stream with a Connect in progress")
                self._check_op(message, LocalProtocolError)
                self._pending.requests += 1
                return
            raise LocalProtocolError(f"a client cannot send {type(message).__name__}")
        # gateway side: only answers, in order
        if isinstance(message, pb.ServerHello):
            if not self._hello_received or self._hello_answered:
                raise LocalProtocolError("ServerHello must answer exactly one ClientHello")
            self._hello_answered = True
            self._awaiting_answer = False
            self._state = _CLOSED if message.HasField("error") else _READY
            return
        if not self._hello_answered:
            raise LocalProtocolError(f"{type(message).__name__} before ServerHello")
        if isinstance(message, pb.ConnectResult):
            if self._state is not _CONNECTING:
                raise LocalProtocolError("ConnectResult without a Connect")
            self._awaiting_answer = False
            self._connect_answered(message)
            return
        if isinstance(message, pb.Response):
            if not self._awaiting_answer or self._state not in (_READY, _ASSOCIATED):
                raise LocalProtocolError("Response without a Request")
            self._awaiting_answer = False
            return
        raise LocalProtocolError(f"a gateway cannot send {type(message).__name__}")

    def send_error(self, error: ProtocolError | pb.Error) -> bytes:
        """Bytes of an Error frame; the stream is closed afterwards."""
        if self._state is _RELAY:
            # The stream carries the peer's raw bytes now: a frame would corrupt them.
            raise LocalProtocolError("send_error() after the switch to raw bytes")
        message = error.to_error() if isinstance(error, ProtocolError) else error
        data = encode_frame(message)
        if not self._preamble_sent:
            self._preamble_sent = True
            data = PREAMBLE + data
        self._state = _CLOSED
        return data
