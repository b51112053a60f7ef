"""Handing a connection opened with asyncio to another process, and resuming it there.

The blocking sockets' handoff (tether.client.handoff, docs/handoff.md) on a
loop: :func:`hand_off` stops the transport reading, waits until everything
written has left its buffer, takes the bytes a ``StreamReader`` holds but
the app has not read, and detaches the stream from the gateway; the bytes
the gateway had already sent follow those in the state's tail. The state
pickles (no secret in it). :func:`resume` opens a stream in the other
process with that process's credentials, hands the gateway the token and
the tail, and gives a ``(reader, writer)`` pair (or a transport) whose
reader returns the tail first, then what the peer sends next: no byte lost
or repeated, and a token works once.

A TLS connection cannot move: its session keys live in this process.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from typing import Any

from tether.aio import connection, driver
from tether.client.sock import HANDOFF_TIMEOUT, HandoffState, State

# How often hand_off() looks whether the transport's write buffer is empty:
# neither loop offers a callback for it.
_DRAIN_POLL = 0.001


async def hand_off(
    writer_or_transport: asyncio.StreamWriter | asyncio.BaseTransport,
) -> HandoffState:
    """Detach a connection made through tether from this process; its state, to pickle.

    Pass the ``StreamWriter`` of a ``(reader, writer)`` pair (the reader's
    unread bytes travel along) or a transport. Do not read or write the
    connection meanwhile. Afterwards the transport is closed (its protocol
    sees ``connection_lost(None)``) and the connection belongs to whoever
    resumes the state.
    """
    loop = asyncio.get_running_loop()
    if isinstance(writer_or_transport, asyncio.StreamWriter):
        transport: Any = writer_or_transport.transport
        reader: asyncio.StreamReader | None = writer_or_transport._reader  # type: ignore[attr-defined]
    else:
        transport, reader = writer_or_transport, None
    if transport.get_extra_info("sslcontext") is not None:
        raise OSError(
            errno.EOPNOTSUPP,
            "tether: a TLS connection cannot be handed off: its session keys live in this process",
        )
    sock = connection.tether_socket(transport)
    t = sock._tether if sock is not None else None
    if sock is None or t is None:
        raise OSError(
            errno.ENOTCONN, "tether: only a connection made through the gateway can be handed off"
        )
    if t.state is State.HANDED_OFF:
        raise OSError(errno.EBADF, "tether: this connection was already handed off")
    if t.state is not State.CONNECTED or transport.is_closing():
        raise OSError(errno.ENOTCONN, "tether: only an open connection can be handed off")
    transport.pause_reading()
    # What the app wrote goes to the peer ahead of the handoff.
    deadline = loop.time() + HANDOFF_TIMEOUT
    while transport.get_write_buffer_size():
        if loop.time() > deadline:
            raise TimeoutError(
                f"tether: handing off: the transport's write buffer did not drain in "
                f"{HANDOFF_TIMEOUT:g} s"
            )
        await asyncio.sleep(_DRAIN_POLL)
    prefix = b""
    if reader is not None:
        buffered = reader._buffer  # type: ignore[attr-defined]
        prefix = bytes(buffered)
        buffered.clear()
    # A descriptor of our own on the stream: the transport is dropped (it
    # closes its descriptor, which neither resets nor ends the stream while
    # this one is open) and the detach reads the tail on ours.
    fd = os.dup(transport.get_extra_info("socket").fileno())
    transport.abort()
    try:
        handoff, tail = await driver.detach(loop, t, fd, prefix)
    finally:
        os.close(fd)
        t.mark_handed_off()
    return t.handoff_state(sock, handoff, None, tail)


async def resume(
    state: HandoffState, *, limit: int = connection.DEFAULT_LIMIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A ``(reader, writer)`` pair for a handed-off connection, in this process."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await resume_transport(state, lambda: protocol)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
    return reader, writer


async def resume_transport(
    state: HandoffState, protocol_factory: Callable[[], asyncio.BaseProtocol]
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """A transport and protocol for a handed-off connection, in this process."""
    loop = asyncio.get_running_loop()
    sock = await driver.resume(loop, state)
    try:
        return await connection.start(loop, protocol_factory, sock)
    except BaseException:
        sock.close()
        raise


__all__ = ["hand_off", "resume", "resume_transport"]
