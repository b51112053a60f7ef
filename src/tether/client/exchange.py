"""The client side of one framed exchange with the gateway, without I/O.

Every gateway stream the client opens goes the same way: the hello, a
request (a TCP or UDP ``Connect``, a ``Resume``, a ``Request``), and the
frames up to its answer; a refusal, an ``Error`` frame, a hung-up or
out-of-protocol stream becomes an exception (``tether.client.errors``). An
:class:`Exchange` decides all of that from the bytes it is given and makes
the bytes to send; it never touches a socket. The TCP socket (its connect
and resume), the control stream and UDP associations drive it with
blocking I/O (``tether.client.stream.read_answer``), and an asyncio client
drives the same object from a coroutine::

    reader, writer = await asyncio.open_connection(host, port)   # the gateway
    exchange = Exchange(settings.gateway)
    writer.write(exchange.open(settings) + exchange.send(connect, "example.com:443"))
    while (answer := exchange.receive(await reader.read(65536))) is None:
        pass  # a partial frame: read on
    # `answer` is the ConnectResult; what the peer sent right behind it is
    # exchange.trailing, the first bytes the app's reader must return.

``reader.read()`` gives ``b""`` at the end of the stream, which
:meth:`Exchange.receive` turns into the "closed the stream" error, so a
driver needs no case of its own for it.
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias

from tether import __version__
from tether.client.errors import broke_protocol, closed, gateway_error
from tether.client.settings import Settings
from tether.endpoint import Endpoint
from tether.wire import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    RemoteProtocolError,
    Role,
    State,
    encode_frame,
    pb,
)

Answer: TypeAlias = pb.ServerHello | pb.ConnectResult | pb.Response
Request: TypeAlias = pb.Connect | pb.Resume | pb.Request

_ServerHello: Final = pb.ServerHello
_Request: Final = pb.Request
_Response: Final = pb.Response
_ConnectResult: Final = pb.ConnectResult
_Error: Final = pb.Error
_CLIENT: Final = Role.CLIENT
_FRAMED: Final = (State.READY, State.ASSOCIATED)

# The last Settings' hello and its frame: a process has one Settings object
# in force, and the message only ever goes to Connection.send().
_hello: tuple[Settings, pb.ClientHello, bytes] | None = None


def _hello_and_frame(settings: Settings) -> tuple[Settings, pb.ClientHello, bytes]:
    global _hello
    cached = _hello
    if cached is None or cached[0] is not settings:
        message = pb.ClientHello(
            protocol_version=PROTOCOL_VERSION,
            app=settings.app,
            key=settings.key,
            client_version=__version__,
        )
        cached = _hello = (settings, message, encode_frame(message))
    return cached


def hello(settings: Settings) -> pb.ClientHello:
    """The ClientHello that opens this process's streams as `settings`' app."""
    return _hello_and_frame(settings)[1]


class Exchange:
    """One gateway stream's requests and answers, seen from the client.

    `gateway` (the Endpoint, or any text) is only named in error messages,
    so it is not formatted unless something fails. A stream may carry more
    than one exchange: after a refused TCP connect it is framed again, and
    the control and UDP streams carry one request after another.
    """

    __slots__ = ("_want", "gateway", "target", "wire")

    def __init__(self, gateway: Endpoint | str) -> None:
        self.wire = Connection(_CLIENT)
        self.gateway = gateway
        self.target = ""  # the destination of the Connect/Resume being answered
        self._want: type | None = None  # the answer awaited; None once it came

    def open(self, settings: Settings) -> bytes:
        """The bytes that open the stream: the hello (encoded once per Settings).

        Pipeline a request behind them (``open() + send()``): the answers come
        in order, and the hello's refusal is raised as the request's.
        """
        _, message, frame = _hello_and_frame(settings)
        self._want = _ServerHello
        return self.wire.send(message, frame=frame)

    def send(self, message: Request, target: str = "") -> bytes:
        """The bytes of `message`; its answer is the one awaited next.

        `target` ("host:port") is the destination a Connect or Resume is for,
        named in the error if the gateway cannot reach it.
        """
        data = self.wire.send(message)
        self._want = _Response if type(message) is _Request else _ConnectResult
        self.target = target
        return data

    def receive(self, data: bytes) -> Answer | None:
        """Take bytes from the stream (``b""``: it ended); the answer once it is complete.

        None: more bytes are needed. Raises the OSError for a refused hello,
        a refused request, an Error frame, a stream that ended or broke the
        protocol. After a ConnectResult that switched the stream to raw
        bytes, the bytes behind it are in :attr:`trailing`.
        """
        wire = self.wire
        try:
            wire.receive_data(data)
            while True:
                # Typed by the identity tests below, which cost nothing per event.
                event: Any = wire.next_event()
                answer: Answer = event
                if event is NEED_DATA:
                    return None
                kind = type(event)
                if kind is _ServerHello:
                    if event.HasField("error"):
                        raise gateway_error(event.error, self.gateway)
                    if self._want is _ServerHello:
                        self._want = None
                        return answer
                    continue
                if kind is self._want:
                    self._want = None
                    if event.HasField("error"):
                        raise gateway_error(event.error, self.gateway, self.target)
                    return answer
                if kind is _Error:
                    raise gateway_error(event, self.gateway)
                if kind is ConnectionClosed:
                    raise closed(self.gateway)
                raise broke_protocol(self.gateway, f"unexpected {kind.__name__}")
        except RemoteProtocolError as exc:
            raise broke_protocol(self.gateway, exc) from exc

    @property
    def trailing(self) -> bytes:
        """What followed the ConnectResult that switched the stream to raw bytes."""
        return self.wire.trailing_data

    @property
    def in_step(self) -> bool:
        """Whether the stream can carry another request.

        True once the awaited answer came (a refusal too) and the stream is
        still framed; False while an answer is outstanding (a timeout left
        its bytes on the way), after the switch to raw bytes, and once the
        stream is closed (a refused hello, an Error, a refused Resume).
        """
        return self._want is None and self.wire.state in _FRAMED


__all__ = ["Answer", "Exchange", "Request", "hello"]
