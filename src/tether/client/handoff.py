"""Handing a connected socket to another process: pickle it, resume it there.

``pickle.dumps(sock)`` on a connected tether TCP socket *moves* it:

1. the client asks the gateway to detach it (``Detach``): the gateway stops
   relaying from the peer and answers with a one-time resume token;
2. the client shuts down its sending side, so everything the app wrote is
   queued to the peer before the gateway sees the EOF;
3. the gateway answers with its own EOF after what it had already sent, and
   the client reads that tail (bytes the app had not read yet) to the end;
4. the client closes its stream; the socket object now refuses every call
   ("handed off"), and the pickle carries the descriptor, the token, the
   socket's settings and the tail — never the app's key.

``pickle.loads`` in another process of the same app opens a new stream with
its own credentials and sends ``Resume`` with the token and the tail, which
the gateway sends straight back ahead of anything new from the peer: the new
socket's fd carries the byte stream exactly where the old one stopped. A
token works once; another app gets PermissionError. See docs/handoff.md.

The two ends are the socket's own steps (``socket._hand_off()`` and
``socket._resume()`` in tether.client.sock, which its ``__reduce_ex__``
names); this module is their public face, and moves the bytes that
protocol clients hold in their readers (:func:`dumps`).

Not a pickle: :func:`to_bytes` / :func:`from_bytes` carry the same state as
a signed token of plain data (below), so a worker can take sockets from a
queue other apps may write to without unpickling bytes it cannot trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import math
import pickle
import socket as _socket_mod
import struct
from typing import Any

from tether.client.settings import Settings, current
from tether.client.sock import HANDOFF_TIMEOUT, RW_PAIRS, HandoffState, socket


def hand_off(sock: socket) -> HandoffState:
    """Detach `sock` from this process; see the module docstring."""
    return sock._hand_off()


def resume(state: HandoffState) -> socket:
    """A live socket for a handed-off one, in this process, as this process's app."""
    return socket._resume(state)


# -- protocol clients (smtplib, poplib, imaplib, nntplib ...) -------------------


Reader = io.BufferedReader | io.BufferedRWPair


def _tether_reader(obj: Any) -> socket | None:
    """The tether socket under a makefile('rb') or makefile('rwb') object, if obj is one."""
    if isinstance(obj, io.BufferedReader):
        raw = obj.raw
    elif isinstance(obj, io.BufferedRWPair):
        return RW_PAIRS.get(obj)  # nntplib's makefile("rwb")
    else:
        return None
    sock = getattr(raw, "_sock", None)
    if isinstance(raw, _socket_mod.SocketIO) and isinstance(sock, socket):
        return sock
    return None


def _take_buffered(reader: Reader, sock: socket) -> bytes:
    """What the reader holds but the app has not read yet, without blocking."""
    if isinstance(reader, io.BufferedRWPair):
        reader.flush()  # what the app wrote goes to the peer before the handoff
    was = sock.gettimeout()
    sock.setblocking(False)
    try:
        return reader.peek() or b""
    except BlockingIOError:
        return b""
    finally:
        sock.settimeout(was)


def _drop_buffered(reader: Reader, n: int) -> None:
    """Discard the `n` bytes moved out of `reader`: they belong to the new holder now."""
    if n:
        with contextlib.suppress(OSError):
            reader.read(n)  # all buffered: no read reaches the (closed) socket


class _Sink:
    def write(self, data: bytes) -> int:
        return len(data)


class _DryRun(pickle.Pickler):
    """Pickles with tether sockets and readers stubbed, recording the readers.

    Run before anything is handed off, so an object that cannot be pickled
    fails with the socket still usable, and so readers anywhere in the
    object graph are found (not only attributes of the top object).
    """

    def __init__(self, protocol: int | None) -> None:
        super().__init__(_Sink(), protocol)
        self.readers: dict[int, tuple[Reader, socket]] = {}

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, socket) and obj._tether is not None:
            return (int, ())
        sock = _tether_reader(obj)
        if sock is None:
            return NotImplemented
        self.readers[id(obj)] = (obj, sock)
        return (int, ())


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        sock = _tether_reader(obj)
        if sock is None:
            return NotImplemented
        mode = "rwb" if isinstance(obj, io.BufferedRWPair) else "rb"
        return (_rebuild_reader, (sock, mode))


def _rebuild_reader(sock: socket, mode: str = "rb") -> Reader:
    reader = sock.makefile("rwb") if mode == "rwb" else sock.makefile("rb")
    assert isinstance(reader, (io.BufferedReader, io.BufferedRWPair))
    return reader


def dumps(obj: Any, protocol: int | None = None) -> bytes:
    """pickle.dumps for objects that hold a tether socket and its makefile() reader.

    Protocol clients (``poplib.POP3``, ``smtplib.SMTP``, ``imaplib.IMAP4``,
    ``nntplib.NNTP``) read through ``sock.makefile('rb')`` (or ``'rwb'``),
    whose buffer may hold bytes the client has not consumed yet. Plain pickle
    cannot carry a reader; this moves its buffered bytes into the socket's
    tail, so the resumed client's fresh reader returns them first, and drops
    them from the original reader. `obj` may be any picklable object graph
    (a task payload holding clients). A first pass pickles with the sockets
    stubbed, so an unpicklable `obj` raises before anything is handed off.
    Load with plain ``pickle.loads``.
    """
    dry = _DryRun(protocol)
    dry.dump(obj)
    moved: list[tuple[Reader, int]] = []
    seen: set[int] = set()
    for reader, sock in dry.readers.values():
        if id(sock) in seen:
            raise ValueError(
                "tether: two readers over one socket; hand off an object with one makefile()"
            )
        seen.add(id(sock))
        t = sock._tether
        assert t is not None
        t.prefix = _take_buffered(reader, sock)
        moved.append((reader, len(t.prefix)))
    buf = io.BytesIO()
    try:
        _Pickler(buf, protocol).dump(obj)
    finally:
        for _reader, sock in dry.readers.values():
            t = sock._tether
            assert t is not None
            t.prefix = b""
    for reader, n in moved:
        _drop_buffered(reader, n)
    return buf.getvalue()


# -- the signed token: a handoff without pickle -----------------------------------
#
#   magic    4 bytes   b"TTHO"
#   version  1 byte    1
#   length   4 bytes   big-endian length of the body
#   body     length    the HandoffState, fixed layout (_pack_state)
#   mac      32 bytes  HMAC-SHA256(token key, magic + version + length + body)
#
# The token key is HMAC-SHA256(app key, _KEY_LABEL + app name): both processes
# of one app can make it, another app cannot, and it is never the app key
# itself (a token leaks nothing usable elsewhere). from_bytes checks the
# header, then the MAC (in constant time), and only then reads the body.

TOKEN_MAGIC = b"TTHO"
TOKEN_VERSION = 1
_HEADER = struct.Struct(">4sBI")
_MAC_SIZE = hashlib.sha256().digest_size
_KEY_LABEL = b"tether handoff token v1\0"


class HandoffTokenError(ValueError):
    """A handoff token that is not one, or not this app's, or was changed."""


def _token_key(settings: Settings) -> bytes:
    if not settings.key:
        raise HandoffTokenError(
            f"tether: app {settings.app!r} has no key to sign handoff tokens with; "
            "configure one (TETHER_KEY) or hand the socket off with pickle"
        )
    return hmac.new(
        settings.key.encode(), _KEY_LABEL + settings.app.encode(), hashlib.sha256
    ).digest()


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()

    def pack(self, fmt: str, *values: Any) -> None:
        self.out += struct.pack(">" + fmt, *values)

    def blob(self, data: bytes, width: str = "H") -> None:
        limit = 2 ** (8 * struct.calcsize(width)) - 1
        if len(data) > limit:
            raise HandoffTokenError(
                f"tether: a handoff field of {len(data)} bytes is over the token's limit of {limit}"
            )
        self.pack(width, len(data))
        self.out += data

    def text(self, value: str) -> None:
        self.blob(value.encode())

    def sockaddr(self, addr: tuple[Any, ...]) -> None:
        # (host, port) or (host, port, flowinfo, scope_id): text or whole numbers
        self.pack("B", len(addr))
        for item in addr:
            if isinstance(item, str):
                self.pack("c", b"s")
                self.text(item)
            else:
                self.pack("cq", b"i", int(item))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise HandoffTokenError("tether: handoff token body is shorter than its fields")
        chunk = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack(">" + fmt, self.take(struct.calcsize(">" + fmt)))

    def blob(self, width: str = "H") -> bytes:
        (n,) = self.unpack(width)
        return self.take(n)

    def text(self) -> str:
        try:
            return self.blob().decode()
        except UnicodeDecodeError as exc:
            raise HandoffTokenError("tether: handoff token has a field that is not UTF-8") from exc

    def sockaddr(self) -> tuple[Any, ...]:
        (n,) = self.unpack("B")
        items: list[Any] = []
        for _ in range(n):
            (tag,) = self.unpack("c")
            if tag == b"s":
                items.append(self.text())
            elif tag == b"i":
                items.append(self.unpack("q")[0])
            else:
                raise HandoffTokenError(
                    f"tether: handoff token has an address item of kind {tag!r}"
                )
        return tuple(items)


def _pack_state(app: str, state: HandoffState) -> bytes:
    w = _Writer()
    w.text(app)
    w.text(state.descriptor)
    w.text(state.token)
    w.pack("iii", state.family, state.type, state.proto)
    w.pack("?d", state.timeout is not None, -1.0 if state.timeout is None else state.timeout)
    w.sockaddr(state.peer)
    w.sockaddr(state.local)
    w.pack("H", len(state.options))
    for option in state.options:
        w.blob(option)
    w.text(state.origin)
    w.blob(state.tail, "I")
    # Added after the first tokens (a cluster's owner node and signature):
    # optional at the end, so a token without them still reads.
    w.text(state.node)
    w.blob(state.signature)
    return bytes(w.out)


def _unpack_state(body: bytes) -> tuple[str, HandoffState]:
    r = _Reader(body)
    app = r.text()
    descriptor, token = r.text(), r.text()
    family, type_, proto = r.unpack("iii")
    has_timeout, seconds = r.unpack("?d")
    if has_timeout and not (math.isfinite(seconds) and seconds >= 0):
        raise HandoffTokenError(f"tether: handoff token has an invalid timeout {seconds!r}")
    peer, local = r.sockaddr(), r.sockaddr()
    (n_options,) = r.unpack("H")
    options = tuple(r.blob() for _ in range(n_options))
    origin = r.text()
    tail = r.blob("I")
    node, signature = (r.text(), r.blob()) if r.pos < len(body) else ("", b"")
    if r.pos != len(body):
        raise HandoffTokenError(
            f"tether: handoff token body has {len(body) - r.pos} bytes after its last field"
        )
    state = HandoffState(
        descriptor=descriptor,
        token=token,
        family=family,
        type=type_,
        proto=proto,
        timeout=seconds if has_timeout else None,
        peer=peer,
        local=local,
        options=options,
        tail=tail,
        origin=origin,
        node=node,
        signature=signature,
    )
    return app, state


def state_to_bytes(state: HandoffState, settings: Settings | None = None) -> bytes:
    """A signed token for a handed-off socket's state (from :func:`hand_off` or tether.aio).

    Signed with a key derived from the app key of `settings` (default: this
    process's); raises :class:`HandoffTokenError` if there is no key.
    """
    settings = settings or current()
    key = _token_key(settings)
    body = _pack_state(settings.app, state)
    signed = _HEADER.pack(TOKEN_MAGIC, TOKEN_VERSION, len(body)) + body
    return signed + hmac.new(key, signed, hashlib.sha256).digest()


def state_from_bytes(data: bytes, settings: Settings | None = None) -> HandoffState:
    """The state in a token from :func:`to_bytes`, checked; raises :class:`HandoffTokenError`.

    Nothing but the header is read before the signature is checked with this
    process's app key (or that of `settings`): a token of another app, or one
    changed in any bit, is refused without its body being parsed.
    """
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise HandoffTokenError(
            f"tether: handoff token is truncated: {len(data)} bytes, "
            f"shorter than its {_HEADER.size}-byte header"
        )
    magic, version, length = _HEADER.unpack_from(data)
    if magic != TOKEN_MAGIC:
        raise HandoffTokenError(
            f"tether: not a handoff token: it starts with {magic!r}, expected {TOKEN_MAGIC!r}"
        )
    if version != TOKEN_VERSION:
        raise HandoffTokenError(
            f"tether: handoff token version {version} is not supported "
            f"(this tether reads version {TOKEN_VERSION})"
        )
    expected = _HEADER.size + length + _MAC_SIZE
    if len(data) != expected:
        word = "truncated" if len(data) < expected else "longer than its header says"
        raise HandoffTokenError(
            f"tether: handoff token is {word}: {len(data)} bytes, expected {expected}"
        )
    settings = settings or current()
    signed, mac = data[:-_MAC_SIZE], data[-_MAC_SIZE:]
    computed = hmac.new(_token_key(settings), signed, hashlib.sha256).digest()
    if not hmac.compare_digest(computed, mac):
        raise HandoffTokenError(
            f"tether: handoff token signature does not match for app {settings.app!r}: "
            "it was made by another app (or with another key), or changed on the way"
        )
    app, state = _unpack_state(signed[_HEADER.size :])
    if app != settings.app:  # the key matched, so only a shared key gets here
        raise HandoffTokenError(
            f"tether: handoff token was made by app {app!r}, not {settings.app!r}"
        )
    return state


def to_bytes(sock: socket | HandoffState) -> bytes:
    """Hand `sock` off (like ``pickle.dumps``) and return a signed token, not a pickle.

    A :class:`HandoffState` (from :func:`hand_off` or ``tether.aio.handoff.hand_off``)
    is signed as it is. The token is signed with the socket's app key, which
    is checked first: without a key the socket is left untouched.
    """
    if isinstance(sock, HandoffState):
        return state_to_bytes(sock)
    t = sock._tether
    settings = t.settings if t is not None and t.settings is not None else current()
    _token_key(settings)  # no key: fail before anything is handed off
    return state_to_bytes(hand_off(sock), settings)


def from_bytes(data: bytes) -> socket:
    """A live socket for a token from :func:`to_bytes`, in this process, as this process's app.

    Raises :class:`HandoffTokenError` (a ValueError) for bytes that are not a
    token of this app or were changed; then the resume works like
    ``pickle.loads`` (once per token). For asyncio, pass
    :func:`state_from_bytes` to ``tether.aio.handoff.resume``.
    """
    return resume(state_from_bytes(data))


__all__ = [
    "HANDOFF_TIMEOUT",
    "TOKEN_MAGIC",
    "TOKEN_VERSION",
    "HandoffState",
    "HandoffTokenError",
    "dumps",
    "from_bytes",
    "hand_off",
    "resume",
    "state_from_bytes",
    "state_to_bytes",
    "to_bytes",
]
