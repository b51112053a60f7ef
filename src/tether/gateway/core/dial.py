"""Dialling: the outbound TCP connection of an admitted destination.

:func:`dial` (bound as ``GatewayCore.dial``) connects to the first of the
admitted addresses that answers, within the connect timeout, sets the app's
options, registers the socket and writes the decision's audit line with its
outcome. It returns the socket's :class:`~tether.gateway.relay.Link`, whose
peer side is already the outbound transport's protocol (paused until the
front-end calls ``Link.started()``); the front-end joins its app stream to
the app side. Every step here is on the connect path: see the comments
before changing one.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from tether.gateway.core.admission import log_decision
from tether.gateway.core.errors import DialTimeout
from tether.gateway.core.options import PRE_CONNECT_OPTIONS, apply_option, socket_on
from tether.gateway.relay import Link
from tether.policy import Decision
from tether.wire import pb

if TYPE_CHECKING:
    from tether.gateway.core.gateway import GatewayCore


async def dial(
    core: GatewayCore,
    decision: Decision,
    addresses: Sequence[str],
    options: Iterable[pb.OptionValue],
    timeout: float,
    task: asyncio.Task[None],
) -> Link:
    """Connect to `decision`'s destination; the registered socket's Link.

    `task` is the one awaiting this: the timeout cancels it. Raises
    DialTimeout or OSError (after writing the audit line); a cancellation
    that is not the timeout propagates.

    The buffer sizes shape the handshake (the window scale is fixed in the
    SYN), so with one of them the socket is made and set up first;
    otherwise the event loop connects on its own, which costs ~100 us less
    per connection (bench/README.md, connection rate), and the other
    options follow before the app hears of the socket.
    """
    loop = core.loop
    port = decision.port
    link = Link(loop, None)
    # Counted against the socket caps while it is dialled (admission.capacity):
    # admit() returned with no await since, so no other connect came between.
    usage = core.registry.app_usage(decision.app)
    usage.connecting += 1
    core.connecting += 1
    early = [o for o in options if o.name in PRE_CONNECT_OPTIONS]
    # A timer that cancels the task, not asyncio.timeout(): ~8 us less per
    # connect (no Timeout object, no current_task() lookups).
    timer = loop.call_later(timeout, core._expire, task)
    try:
        # The attempts are written out here, not in a helper coroutine: one
        # coroutine fewer per connect.
        last: OSError | None = None
        for address in addresses:
            try:
                if not early:
                    outbound, _ = await loop.create_connection(
                        lambda: link.peer_side, address, port
                    )
                    break
                fam = socket.AF_INET6 if ":" in address else socket.AF_INET
                sock = socket.socket(fam, socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)
                    for opt in early:
                        apply_option(sock, opt)
                    await loop.sock_connect(sock, (address, port))
                    outbound, _ = await loop.create_connection(lambda: link.peer_side, sock=sock)
                except BaseException:
                    sock.close()
                    raise
                break
            except OSError as exc:
                last = exc
        else:
            assert last is not None
            raise last
    except asyncio.CancelledError:
        if task not in core._expired:
            raise
        core._expired.discard(task)
        usage.connects_failed += 1
        log_decision(decision, outcome=f"connect timed out after {timeout:g} s")
        raise DialTimeout(decision.host, port, timeout) from None
    except OSError as exc:
        usage.connects_failed += 1
        log_decision(decision, outcome=f"connect failed: {exc.strerror or exc}")
        raise
    finally:
        timer.cancel()
        usage.connecting -= 1
        core.connecting -= 1
    # The peer side starts paused (Link.starting): nothing of the peer may
    # reach the app's stream before the front-end's answer, and the options
    # must be final before the app can ask for them.
    # Both asked of the kernel once, by the transport, at connection_made.
    peer = outbound.get_extra_info("peername")
    local = outbound.get_extra_info("sockname")
    family = socket.AF_INET6 if len(peer) == 4 else socket.AF_INET
    nodelay = 0
    late = []
    for opt in options:
        if opt.name == pb.TCP_NODELAY:
            nodelay = opt.int_value  # already on: the event loop sets it
        elif opt.name not in PRE_CONNECT_OPTIONS:
            late.append(opt)
    try:
        if late or not nodelay:
            with socket_on(outbound, family) as on_fd:
                for opt in late:
                    apply_option(on_fd, opt)
                if not nodelay:
                    # asyncio and uvloop switch Nagle off on every
                    # transport: put back the kernel default the app expects.
                    on_fd.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    except OSError as exc:
        outbound.abort()
        usage.connects_failed += 1
        log_decision(decision, outcome=f"outbound setup failed: {exc}")
        raise OSError(
            exc.errno or errno.EIO, f"tether: outbound setup failed: {exc.strerror or exc}"
        ) from exc
    app = decision.app
    record = core.registry.add(app, peer, local, "tcp", core.idle_timeout(app))
    link.bind(record)
    if core.quota.meters_streams:  # some app has a byte limit
        link.meter = core.quota.meter(app)  # None unless this app has one
    log_decision(decision, outcome="connected", descriptor=record.descriptor, chosen=peer)
    return link


def expire(core: GatewayCore, task: asyncio.Task[None]) -> None:
    """The connect timeout: cancel the dial in progress (see dial)."""
    core._expired.add(task)
    task.cancel()


__all__ = ["dial", "expire"]
