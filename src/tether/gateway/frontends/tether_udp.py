"""The Tether protocol's UDP: opening an association and serving its requests.

A ``Connect`` with transport UDP opens a :class:`~tether.gateway.udp.UdpAssociation`
(the data plane) on the app stream it arrived on; the stream stays framed
and carries ``AllowDestination`` and option requests (docs/udp.md). The
association gets the core's loop and record, and from the front-end only the
`reply` and `hang_up` callables it tells the app with.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

from tether.endpoint import address_family, same_host
from tether.gateway.core.admission import capacity, log_decision
from tether.gateway.core.errors import Refusal, wire_error
from tether.gateway.core.gateway import GatewayCore
from tether.gateway.core.options import apply_option, read_option
from tether.gateway.udp import UDP_OPTIONS, UdpAssociation
from tether.policy import Decision, Transport
from tether.wire import pb
from tether.wire.convert import (
    FAMILY_FROM_WIRE,
    OPTION_NAMES,
    address_from_wire,
    address_to_wire,
)

# Requests served on an association's stream; everything else is the
# session's (lookups, close_reason, ...).
OPS = ("allow_destination", "set_option", "get_option", "touch")


async def open_association(
    core: GatewayCore,
    app: str,
    transport: asyncio.Transport,
    req: pb.Connect,
    reply: Callable[[pb.Error], None],
) -> tuple[pb.ConnectResult, UdpAssociation | None]:
    """Serve a UDP Connect: the answer, and the association (and its first destination)."""
    result = pb.ConnectResult()
    try:
        family, source = _check_open(transport, req)
        first: tuple[Decision, tuple[str, int]] | None = None
        if req.host or req.port:
            admitted = await _admit_peer(core, app, req.host, req.port, family)
            if isinstance(admitted, Refusal):
                raise admitted
            first = admitted
        else:
            refused = capacity(core, app)  # what admit() checks when given a destination
            if refused is not None:
                raise refused
        outbound = socket.socket(family, socket.SOCK_DGRAM)
        try:
            outbound.setblocking(False)
            for option in req.options:
                if option.name in UDP_OPTIONS:
                    apply_option(outbound, option)
            outbound.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            local = outbound.getsockname()
        except BaseException:
            outbound.close()
            raise
    except (Refusal, OSError) as exc:
        result.error.CopyFrom(wire_error(exc))
        return result, None
    peer: tuple[Any, ...] = first[1] if first is not None else ("*", 0)
    record = core.registry.add(app, peer, local, "udp", core.idle_timeout(app))
    here = transport.get_extra_info("sockname")[0]  # where the app reached us
    association = UdpAssociation(
        core.loop, record, outbound, source, here, reply, transport.close,
        meter=core.quota.datagram_meter(app),
    )
    result.descriptor = record.descriptor
    result.local.CopyFrom(address_to_wire(local, family))
    if first is not None:
        decision, address = first
        destination = _allowed(association, decision, address)
        result.peer.CopyFrom(destination.peer)
        result.relay.CopyFrom(destination.relay)
        result.local.CopyFrom(destination.local)
    return result, association


async def answer(
    core: GatewayCore, app: str, association: UdpAssociation, req: pb.Request,
    response: pb.Response,
) -> None:
    """Serve a request on an association's stream (one of OPS)."""
    op = req.WhichOneof("op")
    association.record.touch()  # any request resets the idle clock
    if op == "allow_destination":
        allow = req.allow_destination
        outbound = association.outbound
        admitted = await _admit_peer(
            core, app, allow.host, allow.port, outbound.family, new_socket=False
        )
        if isinstance(admitted, Refusal):
            response.error.CopyFrom(wire_error(admitted))
            return
        response.destination.CopyFrom(_allowed(association, *admitted))
    elif op == "touch":
        response.done = True
    elif op in ("set_option", "get_option"):
        value = req.set_option.value if op == "set_option" else None
        name = value.name if value is not None else req.get_option.name
        if name not in UDP_OPTIONS:
            response.error.CopyFrom(_unsupported_option(name))
        elif value is not None:
            apply_option(association.outbound, value)
            response.done = True
        else:
            response.option.CopyFrom(read_option(association.outbound, name))


async def _admit_peer(
    core: GatewayCore, app: str, host: str, port: int, family: int, *, new_socket: bool = True
) -> tuple[Decision, tuple[str, int]] | Refusal:
    """The policy's decision and the address to send to, or why not.

    `new_socket` False: a further destination of an open association, which
    is not another socket for the caps.
    """
    admitted = await core.admit(app, host, port, Transport.UDP, family, new_socket=new_socket)
    if isinstance(admitted, Refusal):
        return admitted
    decision, addresses = admitted
    return decision, (addresses[0], port)


def _allowed(
    association: UdpAssociation, decision: Decision, peer: tuple[str, int]
) -> pb.Destination:
    """Route an allowed peer, log the decision, and say where its datagrams go."""
    relay = association.route(peer)
    log_decision(
        decision, outcome="allowed", descriptor=association.record.descriptor, chosen=peer
    )
    outbound = association.outbound
    family = outbound.family
    port = outbound.getsockname()[1]
    return pb.Destination(
        peer=address_to_wire(peer, family),
        relay=address_to_wire(relay, address_family(relay[0])),
        local=address_to_wire((_source_towards(peer, family), port), family),
    )


def _check_open(
    transport: asyncio.Transport, req: pb.Connect
) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """The outbound family and the app's UDP source, or a Refusal saying why not."""
    family = FAMILY_FROM_WIRE.get(req.family, socket.AF_UNSPEC)
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise Refusal(pb.Error.INVALID_REQUEST, errno.EAFNOSUPPORT,
            "tether: a UDP socket is AF_INET or AF_INET6")
    peername = transport.get_extra_info("peername")
    if not isinstance(peername, tuple):
        raise Refusal(pb.Error.UNSUPPORTED, errno.EPROTONOSUPPORT,
            "tether: UDP needs the gateway on an IP address; this app reached it "
            "over a Unix socket, which cannot carry the app's datagrams")
    source = address_from_wire(req.source)
    if not source[1] or not same_host(str(source[0]), str(peername[0])):
        # The relays send only to the app's own socket, on the host this
        # stream comes from: never to a third party named in the request.
        raise Refusal(pb.Error.INVALID_REQUEST, errno.EINVAL,
            f"tether: UDP source {source[0]}:{source[1]} is not on the app's host "
            f"{peername[0]}")
    return family, (str(source[0]), int(source[1]))


def _source_towards(peer: tuple[str, int], family: int) -> str:
    """The local address the kernel would send to `peer` from (no packet is sent).

    The outbound socket stays unconnected, so it can serve every destination
    of the app's socket; a connected stdlib socket would report this address.
    """
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(peer)  # a UDP connect only looks up the route
        except OSError:
            return "::" if family == socket.AF_INET6 else "0.0.0.0"
        return str(probe.getsockname()[0])


def _unsupported_option(name: int) -> pb.Error:
    label = OPTION_NAMES.get(name, str(name))  # type: ignore[call-overload]
    return wire_error(Refusal(pb.Error.UNSUPPORTED, errno.ENOPROTOOPT,
        f"tether: {label} is not supported on a UDP socket "
        "(supported: SO_SNDBUF, SO_RCVBUF, SO_REUSEADDR)"))


__all__ = ["OPS", "answer", "open_association"]
