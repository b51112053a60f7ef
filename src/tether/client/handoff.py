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
"""

from __future__ import annotations

import contextlib
import io
import pickle
import socket as _socket_mod
from typing import Any

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


__all__ = ["HANDOFF_TIMEOUT", "HandoffState", "dumps", "hand_off", "resume"]
