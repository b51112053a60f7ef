"""Drain: on SIGTERM, refuse new work and let the live sockets finish.

A gateway told to stop (SIGTERM: Kubernetes ending a pod, systemd, the
workers' supervisor) sets ``core.draining``. From then on a new socket (a
Connect, a UDP association) and a Resume of a socket this gateway does not
hold are refused with ``UNAVAILABLE``: the app is told to retry on another
gateway, and ``/readyz`` answers 503 so a load balancer stops sending them.
Everything else goes on: the live sockets relay, control requests on them
are answered, a socket handed off here may still be resumed here (it is live
work finishing; refusing it would only lose it). :func:`drain` waits until
the last socket has closed or ``gateway.drain_timeout`` has passed; the
server then closes what is left with :func:`drained_reason`, which the
app's next call reads (docs/workers.md).

The live work counted (:func:`live`) is this gateway's sockets and the app
streams it forwards to a peer holding their socket (a cluster node's resume
of another node's socket, core/peers.py): such a stream dies with this
process though its socket does not, so it is waited for as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from typing import TYPE_CHECKING

from tether.gateway.core.errors import Refusal
from tether.wire import pb

if TYPE_CHECKING:
    from tether.gateway.core.gateway import GatewayCore

log = logging.getLogger("tether.gateway")

# How often the drain looks whether the last socket has closed: the exit
# waits at most this long after it, which nobody notices next to the
# seconds-long drain itself; a socket closing costs nothing extra this way.
DRAIN_POLL = 0.1


def refusal(core: GatewayCore, what: str) -> Refusal:
    """The answer to new work (`what`: "connections", "resumes") while draining."""
    return Refusal(
        pb.Error.UNAVAILABLE,
        errno.ECONNREFUSED,
        f"tether: gateway {core.node_id} is draining (shutting down) and accepts no new "
        f"{what}; retry on another gateway",
    )


def resume_refusal(core: GatewayCore, app: str, descriptor: str) -> Refusal | None:
    """While draining, why a Resume of `descriptor` is refused; None if it may go on.

    A socket this gateway holds (or has a tombstone for, whose reason the
    resume is told) is answered as usual; any other resume is new work for
    some other gateway to take (in a cluster: not forwarded from here).
    """
    registry = core.registry
    if registry.get(app, descriptor) is not None or registry.tombstone(app, descriptor):
        return None
    return refusal(core, "resumes")


def live(core: GatewayCore) -> int:
    """The live work a drain waits for: sockets held here, streams forwarded to a peer."""
    peers = core.cluster
    return len(core.registry) + (peers.forwarding if peers is not None else 0)


def drained_reason(waited: float) -> str:
    """The tombstone of a socket still open when the drain ended (the app reads it)."""
    return (
        f"closed when the gateway drained: still open after {waited:.3g} s "
        "(gateway.drain_timeout)"
    )


async def drain(core: GatewayCore, timeout: float, interrupt: asyncio.Event) -> str | None:
    """Refuse new work and wait for the live sockets to close, for `timeout` s at most.

    Returns the reason to close the sockets still open with, None when they
    all finished. `interrupt` (a second SIGTERM, or SIGINT) ends the wait
    at once.
    """
    core.draining = True
    loop = core.loop
    log.info(
        "draining: %d sockets open, %d streams forwarded to peers; new connects and resumes "
        "are refused (retry elsewhere); live sockets have up to %g s to finish "
        "(gateway.drain_timeout)",
        len(core.registry), live(core) - len(core.registry), timeout,
    )
    started = loop.time()
    deadline = started + timeout
    while live(core) and not interrupt.is_set():
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(interrupt.wait(), min(remaining, DRAIN_POLL))
    left = live(core)
    waited = loop.time() - started
    if not left:
        log.info("drained: every socket finished within %.1f s", waited)
        return None
    # `left` counts the forwarded streams with the sockets: both are closed now.
    if interrupt.is_set():
        log.info("drain interrupted after %.1f s: closing the %d sockets still open", waited, left)
        return drained_reason(waited)
    log.info(
        "drain timeout: closing the %d sockets still open after %g s (gateway.drain_timeout)",
        left, timeout,
    )
    return drained_reason(timeout)


__all__ = ["DRAIN_POLL", "drain", "drained_reason", "live", "refusal", "resume_refusal"]
