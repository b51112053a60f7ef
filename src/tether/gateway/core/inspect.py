"""Inspection: an app's sockets by descriptor, why one is gone, what ``tether sockets`` lists."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Iterable, Mapping, Sequence

from tether.gateway.core.errors import Refusal
from tether.gateway.core.registry import Registry, SocketRecord
from tether.wire import pb
from tether.wire.convert import address_to_wire


def live(registry: Registry, app: str, descriptor: str) -> SocketRecord | Refusal:
    """`app`'s live socket `descriptor`, or a Refusal saying why it is not there."""
    record = registry.get(app, descriptor)
    if record is not None:
        return record
    return gone(registry, app, descriptor)


def gone(registry: Registry, app: str, descriptor: str) -> Refusal:
    """Why `app` has no live socket `descriptor`: another app's, closed, or unknown."""
    owner = registry.owner(descriptor)
    if owner is not None and owner != app:
        return Refusal(pb.Error.PERMISSION_DENIED, errno.EACCES,
            f"tether: socket {descriptor[:8]}... belongs to another app; "
            f"app '{app}' may not use it")
    stone = registry.tombstone(app, descriptor)
    if stone is not None:
        return Refusal(pb.Error.CLOSED, errno.ECONNRESET,
            f"tether: socket to {stone.peer} was {stone.reason}")
    return _unknown(app, descriptor)


def close_reason(registry: Registry, app: str, descriptor: str) -> str | Refusal:
    """What became of `descriptor`: "open (STATE)", or the reason it was closed."""
    record = registry.get(app, descriptor)
    if record is not None:
        return f"open ({record.state})"
    stone = registry.tombstone(app, descriptor)
    if stone is not None:
        return stone.reason
    return _unknown(app, descriptor)


def list_sockets(
    registry: Registry, app: str, *, every_app: bool, node: str = ""
) -> list[pb.SocketInfo]:
    """`app`'s live sockets (with `every_app`, all of them: the operator's view).

    `node`: this gateway's node id, named on each (a listing that gathers
    several nodes' sockets); "" for a gateway alone.
    """
    now = registry.clock()
    listed = []
    for record in registry:
        if record.app != app and not every_app:
            continue
        family = socket.AF_INET6 if ":" in str(record.peer[0]) else socket.AF_INET
        listed.append(pb.SocketInfo(
            app=record.app,
            descriptor_prefix=record.descriptor[:8],
            peer=address_to_wire(record.peer, family),
            state=record.state,
            bytes_out=record.bytes_out,
            bytes_in=record.bytes_in,
            idle_seconds=max(0.0, now - record.last_active),
            age_seconds=max(0.0, now - record.created),
            transport=pb.TRANSPORT_TCP if record.transport == "tcp" else pb.TRANSPORT_UDP,
            node=node,
        ))
    return listed


# -- several gateways as one: the workers of a host, the nodes of a cluster ----------


async def ask_each(
    asks: Sequence[tuple[str, object, Awaitable[pb.Response]]], log: logging.Logger, who: str
) -> dict[str, pb.Response]:
    """Await every (node, where, ask) at once: the answers given, by node.

    A node that did not answer is logged (as `who` NODE (WHERE)) and left out.
    """
    answers = await asyncio.gather(*(ask for _, _, ask in asks), return_exceptions=True)
    found = {}
    for (node, where, _), answer in zip(asks, answers, strict=True):
        if isinstance(answer, BaseException):
            log.warning("%s %r (%s) did not answer: %s", who, node, where, why(answer))
        else:
            found[node] = answer
    return found


def holders_answer(answers: Iterable[pb.Response]) -> pb.Response | None:
    """Of the answers to a request about one socket, the one from whoever holds (or held) it."""
    for answer in answers:
        if not answer.HasField("error") or answer.error.code != pb.Error.NOT_FOUND:
            return answer
    return None  # nobody has it


def gathered(
    request_id: int, local: Sequence[pb.SocketInfo], others: Mapping[str, pb.Response]
) -> pb.Response:
    """A listing of several nodes: this node's sockets, then each other's in node order,
    each socket named by its node."""
    response = pb.Response(id=request_id)
    response.sockets.SetInParent()
    response.sockets.sockets.extend(local)
    for node, answer in sorted(others.items()):
        for info in answer.sockets.sockets:
            info.node = info.node or node
            response.sockets.sockets.append(info)
    return response


def why(exc: BaseException) -> str:
    """An exception in a few words, for a log line or a refusal."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _unknown(app: str, descriptor: str) -> Refusal:
    return Refusal(pb.Error.NOT_FOUND, errno.EBADF,
        f"tether: no socket {descriptor[:8]}... for app '{app}'")


__all__ = [
    "ask_each",
    "close_reason",
    "gathered",
    "gone",
    "holders_answer",
    "list_sockets",
    "live",
    "why",
]
