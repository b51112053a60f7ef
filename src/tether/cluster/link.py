"""Node links: a stream from one node to another, and the splice that carries it.

A link is a TCP connection with mutual TLS (``ssl``; both ends show a
certificate signed by the cluster's CA), or a Unix socket between the
workers of one host (no TLS: the socket file is the gateway user's alone).
It carries one Tether-protocol stream, the one an app opened on this node,
to the node that holds the socket, for the socket's whole life.

asyncio's TLS transport cannot half-close (``can_write_eof()`` is False),
and a handoff needs it: the holder shuts down its sending side and reads
the rest. So over TLS the bytes travel in frames (:class:`Deframer`, a
4-byte length, 0 meaning end of stream): the forwarding node's
:class:`Splice` frames the app's bytes, and on the owner a
:class:`LinkTransport` unframes them for an ordinary ``TetherSession`` (and
the ``Link`` it hands the stream to). A Unix link is the plain stream itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import struct
from collections import deque
from collections.abc import Callable
from typing import Final, cast

from tether.endpoint import Endpoint, arm_reset

log = logging.getLogger("tether.cluster")

# A frame on a TLS link is at most what one read gives (uvloop reads up to
# 256 KiB); 16 MiB refuses a corrupt length long before it could matter.
MAX_LINK_FRAME = 16 * 1024 * 1024
_LENGTH = struct.Struct(">I")
EOF_FRAME: Final = _LENGTH.pack(0)
END: Final = None  # what Deframer.feed yields for the end of the stream


class LinkProtocolError(ConnectionError):
    """A node link carried bytes that are not link frames."""


def frame(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data


class Deframer:
    """Sans-I/O: link frames in, the stream's chunks (and END) out."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.ended = False

    def feed(self, data: bytes) -> list[bytes | None]:
        """The chunks `data` completes, in order; None where the sender ended its side."""
        if self.ended and data:
            raise LinkProtocolError("node link: bytes after the end-of-stream frame")
        self._buf += data
        out: list[bytes | None] = []
        while len(self._buf) >= 4:
            (length,) = _LENGTH.unpack_from(self._buf)
            if length > MAX_LINK_FRAME:
                raise LinkProtocolError(
                    f"node link: a frame of {length} bytes is over the limit of {MAX_LINK_FRAME}"
                )
            if length == 0:
                del self._buf[:4]
                self.ended = True
                out.append(END)
                if self._buf:
                    raise LinkProtocolError("node link: bytes after the end-of-stream frame")
                break
            if len(self._buf) < 4 + length:
                break
            out.append(bytes(self._buf[4 : 4 + length]))
            del self._buf[: 4 + length]
        return out


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The link listener's TLS: this node's certificate; a client certificate from `ca` required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """Dialling a node: its certificate must chain to `ca`; ours goes with the handshake.

    Any certificate the cluster's CA signed is a node (the CA is the
    cluster's own, as etcd's peer links use theirs), so host names are not
    checked: nodes are reached by the address they advertise, which may be
    a pod IP no certificate names.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Side(asyncio.Protocol):
    """One end of a splice: what it receives goes to the other end."""

    def __init__(self, splice: Splice, framed: bool) -> None:
        self.splice = splice
        # This side's transport carries link frames (a TLS link).
        self.framed = framed
        self.deframer = Deframer() if framed else None
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.held: list[bytes | None] = []  # received before the other end existed
        self.eof = False  # this side has ended its sending
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        other = self.other
        if other is not None and other.held and other.transport is not None:
            # The other end received before we were connected: pass it on now.
            held, other.held = other.held, []
            for chunk in held:
                self.send(chunk)
            other.transport.resume_reading()

    def send(self, chunk: bytes | None) -> None:
        """Write a chunk (None: the end of the stream) to this side's transport."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if chunk is END:
            if self.framed:
                transport.write(EOF_FRAME)
            elif transport.can_write_eof():
                transport.write_eof()
            self.splice.ended_one_way()
        else:
            transport.write(frame(chunk) if self.framed else chunk)

    def _deliver(self, chunks: list[bytes | None]) -> None:
        other = self.other
        assert other is not None
        if other.transport is None:
            self.held.extend(chunks)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        for chunk in chunks:
            other.send(chunk)

    def data_received(self, data: bytes) -> None:
        if self is self.splice.link:
            self.splice.heard = True
        if self.deframer is not None:
            try:
                chunks = self.deframer.feed(data)
            except LinkProtocolError as exc:
                log.warning("%s; closing it", exc)
                self.splice.abort()
                return
        else:
            chunks = [data]
        self._deliver(chunks)

    def eof_received(self) -> bool:
        if self.framed:
            # A TLS link ends with its end-of-stream frame first; an EOF
            # without one is a link that broke.
            if self.deframer is not None and not self.deframer.ended:
                self.splice.abort()
            return False
        self._deliver([END])
        return True  # the other direction may still flow

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        other = self.other
        self.transport = None
        splice = self.splice
        if (self is splice.link and not splice.heard and splice.on_silent_loss is not None
                and other is not None and other.transport is not None):
            # The link closed before the other node said a word: its words for the app.
            other.transport.write(splice.on_silent_loss())
        if other is not None and other.transport is not None and not other.transport.is_closing():
            # Whatever was written to the other end is flushed before its close.
            if exc is None:
                other.transport.close()
            else:
                # A reset passed on as a reset (a reclaimed socket: the app asks why).
                arm_reset(other.transport)
                other.transport.abort()
        self.splice.lost()



class Splice:
    """Joins two transports: `plain` (a byte stream) and `link` (a node link).

    Bytes are copied as they come, both ways, with the transports' own flow
    control (a full side pauses reading the other) and half-closes passed
    on (over a TLS link as its end-of-stream frame).
    """

    def __init__(self, *, framed: bool, on_end: Callable[[], None] | None = None) -> None:
        self.plain = _Side(self, framed=False)
        self.link = _Side(self, framed=framed)
        self.plain.other, self.link.other = self.link, self.plain
        # Bytes for the plain side when the link closes having sent none (the
        # forwarding node's refusal: the owner went away in between).
        self.on_silent_loss: Callable[[], bytes] | None = None
        self.heard = False  # the link side has received something
        self.on_end = on_end
        self._ended_ways = 0
        self._done = False

    def join_plain(self, transport: asyncio.Transport, first: bytes = b"") -> None:
        """Take over an existing stream transport (an app's) as the plain side."""
        transport.set_protocol(self.plain)
        self.plain.connection_made(transport)
        if first:
            self.plain.data_received(first)

    def ended_one_way(self) -> None:
        self._ended_ways += 1
        if self._ended_ways >= 2:
            # Both sides have ended their sending: nothing more can flow.
            for side in (self.plain, self.link):
                if side.transport is not None:
                    side.transport.close()

    def abort(self) -> None:
        for side in (self.plain, self.link):
            if side.transport is not None:
                side.transport.abort()

    def reset(self) -> None:
        """Abort both sides, the plain one (an app's TCP stream) with a reset rather than a
        FIN: the app's next call fails and its client asks why (as relay's abort does)."""
        if self.plain.transport is not None:
            arm_reset(self.plain.transport)
        self.abort()

    def lost(self) -> None:
        if self._done or not (self.plain.closed or self.link.closed):
            return
        if self.plain.transport is None and self.link.transport is None:
            self._done = True
            if self.on_end is not None:
                self.on_end()
            # Cut the cycle (sides <-> splice) so it is freed by reference counting.
            self.plain.other = self.link.other = None


async def dial(
    loop: asyncio.AbstractEventLoop,
    address: Endpoint,
    factory: Callable[[], asyncio.Protocol],
    tls: ssl.SSLContext | None,
    timeout: float,
) -> asyncio.Transport:
    """Connect a link to a node at `address` (OSError, TimeoutError when it cannot)."""
    async with asyncio.timeout(timeout):
        if address.is_unix:
            transport, _ = await loop.create_unix_connection(factory, address.path)
        else:
            transport, _ = await loop.create_connection(
                factory, address.host, address.port, ssl=tls,
                server_hostname="" if tls is not None else None,
            )
    return transport


class _Lazy(asyncio.Protocol):
    """An accepted Unix link: served by a session from its first byte on.

    Nodes keep idle links ready (a resume then costs no connect); an idle
    one is no stream yet, so no handshake deadline runs on it.
    """

    def __init__(self, session: Callable[[], asyncio.Protocol]) -> None:
        self.session = session
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        protocol = self.session()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(data)

    def eof_received(self) -> bool:
        return False  # closed unused (a pool emptied at shutdown)


class LinkTransport(asyncio.Transport):
    """A TLS node link seen as a plain stream transport: link frames under, bytes above.

    The owner serves a link's stream with the same ``TetherSession`` and
    ``Link`` as an app's own, which need what a stream transport does and
    asyncio's TLS transport does not: ``write_eof`` (a handoff's
    half-close), here the end-of-stream frame. Chunks are handed to the
    protocol one at a time and held while it has paused reading (a session
    pauses at each request), as a socket's transport would.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: asyncio.Transport) -> None:
        super().__init__()
        self._loop = loop
        self._tls = tls
        self._protocol: asyncio.BaseProtocol | None = None
        self._pending: deque[bytes | None] = deque()
        self._paused = False
        self._eof_sent = False
        self._closing = False
        self._lost = False
        self._draining = False

    # -- what the protocol above calls -------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data and not self._eof_sent and not self._closing:
            self._tls.write(frame(bytes(data)))

    def write_eof(self) -> None:
        if not self._eof_sent and not self._closing:
            self._eof_sent = True
            self._tls.write(EOF_FRAME)

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if self._closing:
            return
        self.write_eof()  # after what is queued: the other node ends its side cleanly
        self._closing = True
        self._pending.clear()
        self._tls.close()

    def abort(self) -> None:
        self._closing = True
        self._pending.clear()
        self._tls.abort()

    def is_closing(self) -> bool:
        return self._closing or self._tls.is_closing()

    def pause_reading(self) -> None:
        self._paused = True
        self._tls.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._pending:
            self._loop.call_soon(self._drain)
        elif not self._closing:
            self._tls.resume_reading()

    def is_reading(self) -> bool:
        return not self._paused

    def get_write_buffer_size(self) -> int:
        return self._tls.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tls.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._tls.get_extra_info(name, default)

    # -- what the TLS side delivers ---------------------------------------------------

    def _received(self, chunks: list[bytes | None]) -> None:
        self._pending.extend(chunks)
        self._drain()

    def _drain(self) -> None:
        """Hand the held chunks up, one at a time, while the protocol reads."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._pending and not self._paused and not self._closing:
                chunk = self._pending.popleft()
                protocol = self._protocol  # read each time: a session hands the stream on
                if chunk is END:
                    if not cast(asyncio.Protocol, protocol).eof_received():
                        self.close()
                else:
                    cast(asyncio.Protocol, protocol).data_received(chunk)
        finally:
            self._draining = False
        if not self._pending and not self._paused and not self._closing:
            self._tls.resume_reading()

    def _lost_link(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if self._protocol is not None:
            self._protocol.connection_lost(exc)


class _Unframe(asyncio.Protocol):
    """The protocol on an accepted TLS link: a LinkTransport's, served by a session
    from its first byte on (an idle pooled link is no stream yet)."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 session: Callable[[], asyncio.Protocol]) -> None:
        self.loop = loop
        self.session = session
        self.deframer = Deframer()
        self.stream: LinkTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.stream = LinkTransport(self.loop, cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        stream = self.stream
        assert stream is not None
        try:
            chunks = self.deframer.feed(data)
        except LinkProtocolError as exc:
            log.warning("%s; closing it", exc)
            stream.abort()
            return
        if stream._protocol is None and chunks:
            protocol = self.session()
            stream.set_protocol(protocol)
            protocol.connection_made(stream)
        stream._received(chunks)
        if stream._pending:
            stream._tls.pause_reading()  # held: no more until the session reads on

    def eof_received(self) -> bool:
        # A TLS link ends with its end-of-stream frame first: this one broke.
        if not self.deframer.ended and self.stream is not None:
            self.stream.abort()
        return False

    def pause_writing(self) -> None:
        if self.stream is not None and self.stream._protocol is not None:
            self.stream._protocol.pause_writing()

    def resume_writing(self) -> None:
        if self.stream is not None and self.stream._protocol is not None:
            self.stream._protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:
            self.stream._lost_link(exc)


class LinkServer:
    """This node's link listener: each accepted link becomes a Tether stream of this node.

    `session` makes the protocol an accepted stream is served by (a
    ``TetherSession`` that trusts the node's word for the app: the linking
    node authenticated it), from the stream's first byte: a Unix link's
    own transport, or a TLS link's :class:`LinkTransport`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        session: Callable[[], asyncio.Protocol],
        tls: ssl.SSLContext | None,
    ) -> None:
        self.loop = loop
        self.session = session
        self.tls = tls
        self.server: asyncio.Server | None = None
        self.links: set[_Unframe] = set()

    async def start(self, endpoint: Endpoint) -> Endpoint:
        """Listen; returns the bound address."""
        if endpoint.is_unix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(endpoint.path)  # a stale socket of a previous run
            # Whoever can open this socket speaks for every app: the gateway's user only.
            old = os.umask(0o177)
            try:
                self.server = await self.loop.create_unix_server(
                    lambda: _Lazy(self.session), endpoint.path
                )
            finally:
                os.umask(old)
            return endpoint
        self.server = await self.loop.create_server(
            lambda: _Unframe(self.loop, self.session), endpoint.host, endpoint.port,
            ssl=self.tls, reuse_address=True, ssl_handshake_timeout=LINK_HANDSHAKE_TIMEOUT,
        )
        host, port = self.server.sockets[0].getsockname()[:2]
        return Endpoint(host=host, port=port)

    def close(self) -> None:
        # The links' streams are the core's to end (sessions in core.streams,
        # relayed sockets in the registry): closing the listener is enough.
        if self.server is not None:
            self.server.close()


# A link's TLS handshake: two round trips on a LAN (milliseconds); 5 s
# bounds a node that accepts and then says nothing.
LINK_HANDSHAKE_TIMEOUT = 5.0


__all__ = [
    "END",
    "Deframer",
    "LinkProtocolError",
    "LinkServer",
    "Splice",
    "client_context",
    "dial",
    "frame",
    "server_context",
]
