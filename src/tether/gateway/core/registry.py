"""The gateway's table of live sockets and the per-app meter.

A descriptor is 128 random bits (URL-safe base64, as ``secrets.token_urlsafe(16)``), so it cannot
be guessed, and it is bound to the app that created it: every lookup names
the app, and another app's descriptor is never usable.

A socket is in one of the :class:`SocketState` states. A closed socket leaves
a tombstone for a while, so an app that finds its socket gone can be told why
("reclaimed after 600 s idle").
"""

from __future__ import annotations

import binascii
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple

from tether.endpoint import host_port
from tether.gateway import audit

if TYPE_CHECKING:
    from tether.gateway.relay import Link

log = logging.getLogger("tether.gateway")

DESCRIPTOR_BYTES = 16  # 128 bits: unguessable, as the issue requires
TOKEN_BYTES = 16
# Tombstones answer "why was my socket closed?"; an app asks right after it
# sees the reset, so an hour and 10,000 entries are plenty (and bounded).
TOMBSTONE_TTL = 3600.0
TOMBSTONE_LIMIT = 10_000
# Each TCP socket costs the gateway two descriptors (the app's stream and the
# outbound connection); a UDP association two and one per destination
# (Registry.extra_fds counts those).
FDS_PER_SOCKET = 2


class SocketState(StrEnum):
    """Where a live socket is in its life.

    The values travel on the wire (``SocketInfo.state``, what ``tether
    sockets`` shows) and appear in log lines and error messages: a string
    enum compares and formats as its value, so they are unchanged.
    """

    ATTACHED = "attached"  # an app stream is relaying it
    DETACHING = "detaching"  # a handoff has begun: the old holder is draining
    HANDED_OFF = "handed-off"  # waiting for a Resume with its one-time token


# Module-level names: the relay compares against them per event, and a global
# is one dict lookup where SocketState.X is two.
ATTACHED = SocketState.ATTACHED
DETACHING = SocketState.DETACHING
HANDED_OFF = SocketState.HANDED_OFF


@dataclass
class AppUsage:
    """Traffic an app has moved; ``bytes_out`` (app -> internet) is what is billed."""

    bytes_out: int = 0
    bytes_in: int = 0
    sockets_opened: int = 0
    connects_denied: int = 0
    # Live now, for the socket caps (core/admission.py): registered sockets,
    # and outbound connects still being dialled (not registered yet).
    open_sockets: int = 0
    connecting: int = 0
    # Connects a quota refused (core/admission.py), and the seconds closed
    # sockets were open (a live one's are counted from its record): both
    # cumulative, for the usage ledger and the metrics.
    quota_refusals: int = 0
    socket_seconds: float = 0.0
    # Cumulative, for the metrics (tether_connects_total): connects a socket
    # cap refused (admission.capacity), and admitted connects whose
    # outbound connect failed or timed out (core/dial.py).
    limit_refusals: int = 0
    connects_failed: int = 0
    # Closed UDP associations' counters (SocketRecord.extra: datagrams in and
    # out, drops by reason), summed per key, for the metrics.
    udp: dict[str, int] = field(default_factory=dict)


# slots: the relay updates the counters on every chunk, and 5,000 idle
# sockets should cost as little as possible (bench/README.md, memory).
@dataclass(eq=False, slots=True)
class SocketRecord:
    descriptor: str
    app: str
    peer: tuple[Any, ...]
    local: tuple[Any, ...]
    transport: str
    registry: Registry
    created: float
    last_active: float
    bytes_out: int = 0
    bytes_in: int = 0
    idle_timeout: float = 600.0
    link: Link | None = None
    state: SocketState = ATTACHED
    token: str | None = None  # the resume token while handed off
    handoffs: int = 0
    closed_reason: str | None = None
    # Transport-specific counters, added to the close line (UDP: datagrams, drops).
    extra: dict[str, int] | None = None
    # Called once with the reason after the close line: a UDP association
    # releases its sockets here, whoever ended it (app, sweep, shutdown).
    on_finish: Callable[[str], None] | None = None

    def touch(self) -> None:
        self.last_active = self.registry.clock()

    def new_token(self) -> str:
        self.token = _token(TOKEN_BYTES)
        return self.token

    def finish(self, reason: str) -> None:
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        self.registry.closed(self)
        if self.on_finish is not None:
            self.on_finish(reason)


class Tombstone(NamedTuple):
    # A tuple, not a frozen dataclass: one is made at every close, and a
    # frozen dataclass sets each field through object.__setattr__.
    app: str
    reason: str
    peer: str
    at: float


class Registry:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._sockets: dict[str, SocketRecord] = {}
        # Descriptors held beyond a socket's two: a UDP association's relays.
        self.extra_fds = 0
        self._tombstones: OrderedDict[str, Tombstone] = OrderedDict()
        self.usage: dict[str, AppUsage] = {}

    def __len__(self) -> int:
        return len(self._sockets)

    def __iter__(self) -> Iterator[SocketRecord]:
        return iter(list(self._sockets.values()))

    def add(
        self,
        app: str,
        peer: tuple[Any, ...],
        local: tuple[Any, ...],
        transport: str,
        idle_timeout: float,
    ) -> SocketRecord:
        descriptor = _token(DESCRIPTOR_BYTES)
        now = self.clock()
        record = SocketRecord(
            descriptor=descriptor,
            app=app,
            peer=peer,
            local=local,
            transport=transport,
            registry=self,
            created=now,
            last_active=now,
            idle_timeout=idle_timeout,
        )
        self._sockets[descriptor] = record
        usage = self.app_usage(app)
        usage.sockets_opened += 1
        usage.open_sockets += 1
        return record

    def get(self, app: str, descriptor: str) -> SocketRecord | None:
        record = self._sockets.get(descriptor)
        if record is None or record.app != app:
            return None
        return record

    def owner(self, descriptor: str) -> str | None:
        """The app a live or recently closed descriptor belongs to."""
        record = self._sockets.get(descriptor)
        if record is not None:
            return record.app
        stone = self._tombstones.get(descriptor)
        return stone.app if stone is not None else None

    def tombstone(self, app: str, descriptor: str) -> Tombstone | None:
        stone = self._tombstones.get(descriptor)
        if stone is None or stone.app != app:
            return None
        if self.clock() - stone.at > TOMBSTONE_TTL:
            return None
        return stone

    def idle(self, now: float | None = None) -> list[tuple[SocketRecord, float]]:
        """Sockets idle past their timeout, with how long they have been idle."""
        now = self.clock() if now is None else now
        return [
            (record, now - record.last_active)
            for record in self._sockets.values()
            if now - record.last_active >= record.idle_timeout
        ]

    def app_usage(self, app: str) -> AppUsage:
        usage = self.usage.get(app)
        if usage is None:
            usage = self.usage[app] = AppUsage()
        return usage

    def closed(self, record: SocketRecord) -> None:
        usage = self.app_usage(record.app)  # asked once: a Python call on every close
        if self._sockets.pop(record.descriptor, None) is not None:
            usage.open_sockets -= 1
        now = self.clock()
        peer = host_port(record.peer[0], record.peer[1])
        reason = record.closed_reason or "closed"
        self._tombstones[record.descriptor] = Tombstone(record.app, reason, peer, now)
        if len(self._tombstones) > TOMBSTONE_LIMIT:
            self._tombstones.popitem(last=False)
        usage.bytes_out += record.bytes_out
        usage.bytes_in += record.bytes_in
        usage.socket_seconds += now - record.created
        # One structured line per socket, at close (the billing record).
        line = {
            "event": "close",
            "app": record.app,
            "descriptor": record.descriptor[:8],
            "transport": record.transport,
            "peer": peer,
            "bytes_out": record.bytes_out,
            "bytes_in": record.bytes_in,
            "duration_s": round(now - record.created, 6),
            "handoffs": record.handoffs,
        }
        if record.extra:
            line.update(record.extra)
            totals = usage.udp
            for key, n in record.extra.items():
                totals[key] = totals.get(key, 0) + n
        line["reason"] = record.closed_reason
        audit.emit(line)


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _token(nbytes: int) -> str:
    """secrets.token_urlsafe(nbytes) in C calls only (descriptors: one per connect; tokens)."""
    return binascii.b2a_base64(os.urandom(nbytes), newline=False).translate(_URLSAFE).rstrip(
        b"="
    ).decode("ascii")

