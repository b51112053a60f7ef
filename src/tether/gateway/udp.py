"""UDP at the gateway: one association per app datagram socket.

An app's UDP socket opens an *association* with a ``Connect`` whose
transport is UDP, on a TCP stream of its own; the stream stays framed and
carries the association's requests, and the association lives exactly as
long as that stream (or until idle reclamation). Per association the
gateway holds:

* one **outbound** UDP socket: its address is what every destination sees
  and what the app's ``getsockname()`` reports;
* per destination ``d`` the app has been allowed to send to, one **relay**
  UDP socket ``R_d`` on the address the app reached the gateway at,
  ``connect()``-ed to the app's own UDP socket (so the kernel drops
  datagrams from anyone else).

A datagram the app sends to ``R_d`` leaves the outbound socket for ``d``; a
datagram arriving at the outbound socket from ``d`` leaves ``R_d`` for the
app. Datagrams carry no header, so sizes and boundaries are exactly the
app's. A datagram from a source the app never sent to has no relay and is
dropped (and counted): no unsolicited inbound. Each destination is decided
by the policy once (``AllowDestination``), with one audit line.

Metering is the registry's: bytes and datagrams per direction on the
association's record, one close line per association.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tether.gateway.registry import SocketRecord
from tether.policy import Decision, ResolutionError, Transport
from tether.wire import pb
from tether.wire.convert import FAMILY_FROM_WIRE, address_from_wire, address_to_wire

if TYPE_CHECKING:
    from tether.gateway.session import ClientSession

log = logging.getLogger("tether.gateway")

# Each destination costs the gateway one relay socket (a file descriptor),
# so an association may hold only so many. 64 is far above what datagram
# clients use in practice (a stub resolver asks at most 3 servers, glibc's
# MAXNS) and keeps one socket from eating the gateway's descriptor budget.
MAX_DESTINATIONS = 64
# Larger than any UDP payload (65,507 bytes over IPv4, 65,527 over IPv6),
# so no datagram is ever truncated at the gateway.
RECV_SIZE = 65536
# Datagrams relayed per readiness callback: a busy association yields the
# event loop to the others after this many (64 x 64 KiB at most, 4 MiB).
BATCH = 64
# Requests served on an association's stream; everything else is the
# session's (lookups, close_reason, ...).
OPS = ("allow_destination", "set_option", "get_option", "touch")
# UDP options the app may set: the buffer sizes and SO_REUSEADDR (harmless
# on an outbound-only socket, and set by some clients before bind()).
UDP_OPTIONS = (pb.SO_SNDBUF, pb.SO_RCVBUF, pb.SO_REUSEADDR)


class _Relay:
    __slots__ = ("peer", "sock")

    def __init__(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.sock = sock
        self.peer = peer


class UdpAssociation:
    """One app UDP socket at the gateway; see the module docstring."""

    def __init__(
        self,
        session: ClientSession,
        record: SocketRecord,
        outbound: socket.socket,
        source: tuple[str, int],
    ) -> None:
        self.session = session
        self.record = record
        self.outbound = outbound
        self.source = source  # the app's UDP socket; relays talk only to it
        self.loop = asyncio.get_running_loop()
        self.relays: dict[tuple[str, int], _Relay] = {}
        self.closed = False
        counters = ("datagrams_out", "datagrams_in", "dropped_unsolicited", "dropped")
        self.counters: dict[str, int] = dict.fromkeys(counters, 0)
        self.counters["destinations"] = 0
        record.extra = self.counters
        record.on_finish = self._finished
        self.loop.add_reader(outbound.fileno(), self._from_peers)

    # -- destinations ----------------------------------------------------------

    def route(self, peer: tuple[str, int]) -> tuple[str, int]:
        """The relay address for `peer`, opening a relay socket the first time."""
        relay = self.relays.get(peer)
        if relay is None:
            if len(self.relays) >= MAX_DESTINATIONS:
                raise OSError(
                    errno.ENOBUFS,
                    f"tether: this UDP socket already sends to {MAX_DESTINATIONS} "
                    "destinations, the most one socket may; open another socket",
                )
            relay = _Relay(self._open_relay(), peer)
            self.relays[peer] = relay
            self.counters["destinations"] = len(self.relays)
            self.loop.add_reader(relay.sock.fileno(), self._from_app, relay)
        host, port = relay.sock.getsockname()[:2]
        return host, port

    def _open_relay(self) -> socket.socket:
        transport = self.session.transport
        assert transport is not None
        here = transport.get_extra_info("sockname")  # where the app reached us
        family = socket.AF_INET6 if ":" in here[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((here[0], 0))
            sock.connect(self.source)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- the data path ---------------------------------------------------------

    def _from_app(self, relay: _Relay) -> None:
        """Datagrams the app sent to `relay`: on to the relay's peer."""

        def receive() -> tuple[bytes, _Relay | None]:
            return relay.sock.recv(RECV_SIZE), relay

        self._pump(receive, outgoing=True)

    def _from_peers(self) -> None:
        """Datagrams arriving at the outbound socket: back to the app, if solicited."""

        def receive() -> tuple[bytes, _Relay | None]:
            data, source = self.outbound.recvfrom(RECV_SIZE)
            return data, self.relays.get((source[0], source[1]))

        self._pump(receive, outgoing=False)

    def _pump(self, receive: Callable[[], tuple[bytes, _Relay | None]], outgoing: bool) -> None:
        """Relay up to BATCH waiting datagrams one way, metering each one."""
        record = self.record
        extra = self.counters
        for _ in range(BATCH):
            try:
                data, relay = receive()
            except BlockingIOError:
                return
            except OSError:
                # An ICMP error for an earlier datagram (port unreachable, or
                # the app's socket gone): reported once, nothing to relay.
                continue
            if relay is None:
                extra["dropped_unsolicited"] += 1  # from a source the app never sent to
                continue
            try:
                if outgoing:
                    self.outbound.sendto(data, relay.peer)
                else:
                    relay.sock.send(data)
            except OSError:
                # A full send buffer (EAGAIN/ENOBUFS): UDP may drop, and the
                # kernel itself would have.
                extra["dropped"] += 1
                continue
            if outgoing:
                record.bytes_out += len(data)
                extra["datagrams_out"] += 1
            else:
                record.bytes_in += len(data)
                extra["datagrams_in"] += 1
            record.touch()

    # -- ending ----------------------------------------------------------------

    def close(self, reason: str) -> None:
        self.record.finish(reason)  # writes the close line, then _finished()

    def _finished(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.outbound, *(r.sock for r in self.relays.values())):
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(sock.fileno())
            sock.close()
        self.relays.clear()
        transport = self.session.transport
        if transport is not None and not transport.is_closing():
            # Closed by the gateway (reclaimed, shutting down): the app's next
            # call on the socket reads why, then finds the stream gone.
            error = pb.Error(
                code=pb.Error.CLOSED,
                errno=errno.ECONNRESET,
                message=f"tether: UDP socket {self.record.descriptor[:8]}... was {reason}",
            )
            with contextlib.suppress(Exception):
                transport.write(self.session.wire.send_error(error))
            transport.close()

    # -- requests on the association's stream ------------------------------------

    async def answer(self, req: pb.Request, response: pb.Response) -> None:
        op = req.WhichOneof("op")
        self.record.touch()  # any request resets the idle clock
        if op == "allow_destination":
            await self._allow(req.allow_destination, response)
        elif op == "touch":
            response.done = True
        elif op in ("set_option", "get_option"):
            from tether.gateway.session import apply_option, read_option

            value = req.set_option.value if op == "set_option" else None
            name = value.name if value is not None else req.get_option.name
            if name not in UDP_OPTIONS:
                response.error.CopyFrom(_unsupported_option(name))
            elif value is not None:
                apply_option(self.outbound, value)
                response.done = True
            else:
                response.option.CopyFrom(read_option(self.outbound, name))

    async def _allow(self, req: pb.AllowDestination, response: pb.Response) -> None:
        peer = await decide_peer(self.session, req.host, req.port, self.outbound.family, response)
        if peer is None:
            return
        response.destination.CopyFrom(self.allowed(*peer))

    def allowed(self, decision: Decision, peer: tuple[str, int]) -> pb.Destination:
        """Route an allowed peer, log the decision, and say where its datagrams go."""
        from tether.gateway.session import log_decision

        relay = self.route(peer)
        log_decision(decision, outcome="allowed", descriptor=self.record.descriptor, chosen=peer)
        family = self.outbound.family
        port = self.outbound.getsockname()[1]
        return pb.Destination(
            peer=address_to_wire(peer, family),
            relay=address_to_wire(relay, _family_of(relay[0])),
            local=address_to_wire((_source_towards(peer, family), port), family),
        )


async def decide_peer(
    session: ClientSession, host: str, port: int, family: int, response: pb.Response | None
) -> tuple[Decision, tuple[str, int]] | None:
    """The policy's decision and the address to send to, or None with the error set.

    `response` None means: raise instead (OSError with the gateway's words).
    """
    from tether.gateway.session import log_decision

    gw = session.gateway
    app = session.app
    assert app is not None
    decision = await gw.decide(app, host, port, Transport.UDP)
    error: pb.Error | None = None
    address = None
    if not decision.allowed:
        gw.registry.app_usage(app).connects_denied += 1
        log_decision(decision, outcome="denied")
        error = pb.Error(code=pb.Error.PERMISSION_DENIED, errno=errno.EACCES,
                         message=decision.describe(), rule=decision.rule)
    else:
        want_v6 = family == socket.AF_INET6
        address = next((a for a in decision.addresses if (":" in a) == want_v6), None)
        if address is None:
            kind = "IPv6" if want_v6 else "IPv4"
            log_decision(decision, outcome=f"no {kind} address")
            error = pb.Error(code=pb.Error.SYSTEM, errno=errno.EAFNOSUPPORT,
                             message=f"tether: {host} has no {kind} address the policy allows")
    if error is not None:
        if response is None:
            raise _GatewayRefusal(error)
        response.error.CopyFrom(error)
        return None
    assert address is not None
    return decision, (address, port)


class _GatewayRefusal(Exception):
    def __init__(self, error: pb.Error) -> None:
        super().__init__(error.message)
        self.error = error


async def open_association(session: ClientSession, req: pb.Connect) -> None:
    """Serve a UDP Connect: open the association (and its first destination)."""
    from tether.gateway.session import apply_option

    gw = session.gateway
    app = session.app
    transport = session.transport
    assert app is not None and transport is not None
    result = pb.ConnectResult()
    try:
        family, source = _check_open(transport, req)
        first = None
        if req.host or req.port:
            first = await decide_peer(session, req.host, req.port, family, None)
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
    except _GatewayRefusal as exc:
        result.error.CopyFrom(exc.error)
    except ResolutionError as exc:
        result.error.CopyFrom(pb.Error(code=pb.Error.GAI, errno=exc.eai, message=exc.message))
    except OSError as exc:
        result.error.CopyFrom(pb.Error(code=pb.Error.SYSTEM, errno=exc.errno or errno.EIO,
                                       message=exc.strerror or str(exc)))
    if result.HasField("error"):
        session._write(session.wire.send(result))
        return
    peer: tuple[Any, ...] = first[1] if first is not None else ("*", 0)
    record = gw.registry.add(app, peer, local, "udp", gw.idle_timeout(app))
    association = UdpAssociation(session, record, outbound, source)
    session.association = association
    result.descriptor = record.descriptor
    result.local.CopyFrom(address_to_wire(local, family))
    if first is not None:
        decision, address = first
        destination = association.allowed(decision, address)
        result.peer.CopyFrom(destination.peer)
        result.relay.CopyFrom(destination.relay)
        result.local.CopyFrom(destination.local)
    session._write(session.wire.send(result))


def _check_open(
    transport: asyncio.Transport, req: pb.Connect
) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """The outbound family and the app's UDP source, or _GatewayRefusal saying why not."""
    family = FAMILY_FROM_WIRE.get(req.family, socket.AF_UNSPEC)
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise _GatewayRefusal(pb.Error(code=pb.Error.INVALID_REQUEST, errno=errno.EAFNOSUPPORT,
            message="tether: a UDP socket is AF_INET or AF_INET6"))
    peername = transport.get_extra_info("peername")
    if not isinstance(peername, tuple):
        raise _GatewayRefusal(pb.Error(code=pb.Error.UNSUPPORTED, errno=errno.EPROTONOSUPPORT,
            message="tether: UDP needs the gateway on an IP address; this app reached it "
            "over a Unix socket, which cannot carry the app's datagrams"))
    source = address_from_wire(req.source)
    if not source[1] or not _same_host(str(source[0]), str(peername[0])):
        # The relays send only to the app's own socket, on the host this
        # stream comes from: never to a third party named in the request.
        raise _GatewayRefusal(pb.Error(code=pb.Error.INVALID_REQUEST, errno=errno.EINVAL,
            message=f"tether: UDP source {source[0]}:{source[1]} is not on the app's host "
            f"{peername[0]}"))
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


def _same_host(a: str, b: str) -> bool:
    try:
        x, y = ipaddress.ip_address(a.split("%", 1)[0]), ipaddress.ip_address(b.split("%", 1)[0])
    except ValueError:
        return False
    return x == y


def _family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _unsupported_option(name: int) -> pb.Error:
    from tether.wire.convert import OPTION_NAMES

    label = OPTION_NAMES.get(name, str(name))  # type: ignore[call-overload]
    return pb.Error(code=pb.Error.UNSUPPORTED, errno=errno.ENOPROTOOPT,
                    message=f"tether: {label} is not supported on a UDP socket "
                    "(supported: SO_SNDBUF, SO_RCVBUF, SO_REUSEADDR)")


__all__ = ["MAX_DESTINATIONS", "OPS", "UdpAssociation", "open_association"]
