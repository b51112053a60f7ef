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
association's record, one close line per association. An app with a byte
or datagram quota (docs/quotas.md) has a `meter`: a datagram over a
per-minute limit is dropped and counted (``dropped_quota``; UDP may drop,
and delaying it would only fill the kernel's buffers until they drop), and
one that reaches a daily byte limit ends the association with the reason.

This is the data plane only: a front-end (``frontends/tether_udp.py``)
admits the destinations, opens the association and serves its requests;
the association tells the app it has ended through the `reply` and
`hang_up` callables it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable

from tether.gateway.core.errors import Refusal, wire_error
from tether.gateway.core.registry import SocketRecord
from tether.quota import DAY, AppMeter
from tether.quota.limits import WINDOWS
from tether.wire import pb

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
# UDP options the app may set: the buffer sizes and SO_REUSEADDR (harmless
# on an outbound-only socket, and set by some clients before bind()).
UDP_OPTIONS = (pb.SO_SNDBUF, pb.SO_RCVBUF, pb.SO_REUSEADDR)


def quota_drops(
    meter: AppMeter,
    record: SocketRecord,
    counters: dict[str, int],
    n: int,
    outgoing: bool,
    close: Callable[[str], None],
) -> bool:
    """Charge a datagram of `n` bytes to the app's quota; True if it must not be relayed.

    Over a per-minute limit it is dropped and counted in `counters`
    (``dropped_quota``); at a daily byte limit `close` ends the association
    with the reason. Every front-end's UDP relay charges its datagrams here.
    """
    over = meter.datagram_out(n) if outgoing else meter.datagram_in(n)
    if over is None:
        return False
    meter.book.refused(record.app, over)
    if WINDOWS[over] == DAY:
        close(meter.book.over(record.app, over).reason())
    else:
        counters["dropped_quota"] += 1
    return True


class _Relay:
    __slots__ = ("peer", "sock")

    def __init__(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.sock = sock
        self.peer = peer


class UdpAssociation:
    """One app UDP socket at the gateway; see the module docstring.

    `here` is the host the app reached the gateway at (the relays listen
    there); `reply` sends the app's stream an Error, `hang_up` closes it:
    both are the front-end's, called when the gateway ends the association.
    `meter` is the app's quota meter (``core.quota.datagram_meter(app)``),
    None when the app has no byte or datagram limit.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        record: SocketRecord,
        outbound: socket.socket,
        source: tuple[str, int],
        here: str,
        reply: Callable[[pb.Error], None],
        hang_up: Callable[[], None],
        *,
        meter: AppMeter | None = None,
    ) -> None:
        self.record = record
        self.meter = meter
        self.outbound = outbound
        self.source = source  # the app's UDP socket; relays talk only to it
        self.here = here
        self.reply = reply
        self.hang_up = hang_up
        self.loop = loop
        self.relays: dict[tuple[str, int], _Relay] = {}
        self.closed = False
        counters = ("datagrams_out", "datagrams_in", "dropped_unsolicited", "dropped")
        self.counters: dict[str, int] = dict.fromkeys(counters, 0)
        self.counters["destinations"] = 0
        if meter is not None:
            self.counters["dropped_quota"] = 0  # over a per-minute quota
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
            self.record.registry.extra_fds += 1  # counted by the gateway's caps
            self.counters["destinations"] = len(self.relays)
            self.loop.add_reader(relay.sock.fileno(), self._from_app, relay)
        host, port = relay.sock.getsockname()[:2]
        return host, port

    def _open_relay(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.here else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((self.here, 0))
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
        meter = self.meter
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
            if meter is not None and quota_drops(
                meter, record, extra, len(data), outgoing, self.close
            ):
                if self.closed:
                    return  # a daily limit ended the association
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
        self.record.registry.extra_fds -= len(self.relays)
        self.relays.clear()
        # Closed by the gateway (reclaimed, shutting down): the app's next
        # call on the socket reads why, then finds the stream gone. (Closed
        # by the app, its stream is closing and the front-end sends nothing.)
        refusal = Refusal(
            pb.Error.CLOSED,
            errno.ECONNRESET,
            f"tether: UDP socket {self.record.descriptor[:8]}... was {reason}",
        )
        with contextlib.suppress(Exception):
            self.reply(wire_error(refusal))
        self.hang_up()


__all__ = ["MAX_DESTINATIONS", "UDP_OPTIONS", "UdpAssociation", "quota_drops"]
