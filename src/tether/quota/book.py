"""A gateway's quota book: may this app connect now, how long must its bytes wait.

The :class:`QuotaBook` applies an app's :class:`~tether.quota.limits.Limits`
to what the app does, with injected clocks and no I/O:

* ``admit(app)``: a new socket (a TCP connect, a UDP association); None or
  the :class:`Exceeded` limit (switched off, a daily byte total reached,
  ``connects_per_minute``);
* ``meter(app)``: the :class:`AppMeter` a TCP relay charges the app's bytes
  to (None when no byte limit is set: the relay then costs nothing more);
  ``out(n)`` returns how many bytes may pass and how long to stop reading
  the app (``bytes_out_per_minute``: slowed, not refused);
* ``datagram_meter(app)``: the same for a UDP association, where a datagram
  over a limit is dropped instead of delayed.

Counters live in a :class:`QuotaStore`: :class:`LocalStore` keeps them in
this process. A cluster-wide store (budget leased from Redis) implements the
same three methods; the book and the relay's hot path do not change.

Two clocks: `clock` (monotonic, as the gateway's) paces the per-minute
limits, so a step of the system clock neither refills nor freezes them;
`wall` (seconds since the epoch) says which quota day it is. Tests pass one
fake clock as both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tether.quota import gcra
from tether.quota.limits import (
    CONCURRENT,
    DAY,
    MINUTE,
    SECONDS_PER_MINUTE,
    WINDOWS,
    DayWindow,
    Limits,
    QuotaConfig,
    format_value,
    format_wait,
)

Clock = Callable[[], float]


class QuotaStore(Protocol):
    """Where an app's counters live; the book asks, the store counts.

    Every method is called on the event loop, on the relay's hot path for
    the byte limits, so an implementation answers from memory (a
    cluster-wide store leases budget in the background and spends it here).
    """

    def rate(
        self, app: str, limit: str, cost: float, interval: float, now: float, *, force: bool
    ) -> float:
        """GCRA for `app`'s per-minute `limit`: charge `cost` units at `now` (monotonic).

        `interval` is the seconds one unit takes at the limit's rate. Returns
        the wait: 0.0 when the cost conformed and was charged. `force`
        charges even what does not conform (bytes already relayed), and the
        wait is then how long until the next unit does.
        """
        ...

    def spend(self, app: str, limit: str, amount: int, cap: int, day: float, *, whole: bool) -> int:
        """Add up to `amount` to `app`'s `limit` total of the quota day starting at `day`.

        The total never passes `cap`; returns what was added. `whole`: all
        of `amount` or nothing (a datagram cannot be cut).
        """
        ...

    def spent(self, app: str, limit: str, day: float) -> int:
        """`app`'s `limit` total of the quota day starting at `day` (0 for a new day)."""
        ...


class LocalStore:
    """The counters of one gateway process, in dicts keyed by (app, limit).

    Bounded: apps come from the config, limits are the six names.
    """

    __slots__ = ("_days", "_tats")

    def __init__(self) -> None:
        self._tats: dict[tuple[str, str], float] = {}
        # (app, limit) -> [day start, total]
        self._days: dict[tuple[str, str], list[float]] = {}

    def rate(
        self, app: str, limit: str, cost: float, interval: float, now: float, *, force: bool
    ) -> float:
        key = (app, limit)
        tat, wait = gcra.step(self._tats.get(key, now), now, cost, interval, SECONDS_PER_MINUTE)
        if wait == 0.0 or force:
            self._tats[key] = tat
        return wait

    def spend(self, app: str, limit: str, amount: int, cap: int, day: float, *, whole: bool) -> int:
        entry = self._days.get((app, limit))
        if entry is None or entry[0] != day:
            entry = self._days[(app, limit)] = [day, 0]
        room = cap - int(entry[1])
        taken = amount if amount <= room else (0 if whole else max(room, 0))
        entry[1] += taken
        return taken

    def spent(self, app: str, limit: str, day: float) -> int:
        entry = self._days.get((app, limit))
        return 0 if entry is None or entry[0] != day else int(entry[1])


@dataclass(frozen=True, slots=True)
class Exceeded:
    """An app at one of its limits: what to tell it, and when the limit has room again.

    `used` is what the app has used of the limit (open sockets, bytes
    today) where that is known; `retry_after` the seconds until the limit
    refills (0.0: unknown, e.g. until one of the app's sockets closes);
    `refill_at` the wall-clock time a daily limit starts again, in words.
    """

    app: str
    limit: str
    value: int
    window: str
    retry_after: float
    setting: str
    used: int = 0
    refill_at: str = ""

    def message(self) -> str:
        """The refusal's text, as the app's exception says it."""
        app, limit = f"app '{self.app}'", self.limit
        value = format_value(limit, self.value)
        if limit == "enabled":
            return f"tether: sockets are disabled for {app} ({self.setting} = false)"
        if self.window == CONCURRENT:
            return (f"tether: {app} has {self.used} open sockets, its {limit} quota "
                    f"({value}, {self.setting}); close one before opening another")
        if self.window == DAY:
            verb = "sent" if limit == "bytes_out_per_day" else "received"
            return (f"tether: {app} has {verb} {format_value(limit, self.used)} today, its "
                    f"{limit} quota ({value} a day, {self.setting}); {self._refill()}")
        return (f"tether: {app} is over its {limit} quota ({value} a minute, {self.setting}); "
                f"{self._refill()}")

    def reason(self) -> str:
        """Why a socket was closed at this limit, as its tombstone reads after "was"."""
        if self.limit == "enabled":
            return (f"closed by its quota: sockets were disabled for app '{self.app}' "
                    f"({self.setting} = false)")
        value = format_value(self.limit, self.value)
        return (f"closed by its quota: app '{self.app}' reached its {self.limit} quota "
                f"({value} a {self.window}, {self.setting}); {self._refill()}")

    def _refill(self) -> str:
        wait = format_wait(self.retry_after)
        if self.window == DAY:
            return f"the quota day starts again at {self.refill_at} (in {wait})"
        return f"it has room again in {wait}"


class AppMeter:
    """One app's byte and datagram limits, charged by its relays (one per app, shared).

    The limits are read on every call, so a reload that changes them
    applies to the live sockets too.
    """

    __slots__ = ("app", "book", "limits")

    def __init__(self, book: QuotaBook, app: str, limits: Limits) -> None:
        self.book = book
        self.app = app
        self.limits = limits

    def out(self, n: int) -> tuple[int, float]:
        """`n` bytes the app sent: (how many may pass, seconds to stop reading the app).

        Fewer than `n` may pass only at ``bytes_out_per_day``: the socket is
        then closed (:meth:`QuotaBook.daily` says why). The delay is
        ``bytes_out_per_minute``'s: the bytes have passed, the next read waits.
        """
        limits = self.limits
        book = self.book
        allowed = n
        cap = limits.bytes_out_per_day
        if cap is not None:
            allowed = book.store.spend(
                self.app, "bytes_out_per_day", n, cap, book.day()[0], whole=False
            )
        rate = limits.bytes_out_per_minute
        if rate is None or not allowed:
            return allowed, 0.0
        interval = SECONDS_PER_MINUTE / rate
        return allowed, book.store.rate(
            self.app, "bytes_out_per_minute", allowed, interval, book.clock(), force=True
        )

    def inbound(self, n: int) -> int:
        """`n` bytes from the peer: how many may pass (fewer: ``bytes_in_per_day`` is reached)."""
        cap = self.limits.bytes_in_per_day
        if cap is None:
            return n
        book = self.book
        return book.store.spend(self.app, "bytes_in_per_day", n, cap, book.day()[0], whole=False)

    def datagram_out(self, n: int) -> str | None:
        """A datagram of `n` bytes from the app: None to send it, else the limit that drops it.

        A daily limit's name means the association is to be closed; a
        per-minute one's that this datagram is dropped (UDP may drop).
        """
        limits = self.limits
        book = self.book
        store = book.store
        app = self.app
        if limits.datagrams_per_minute is not None or limits.bytes_out_per_minute is not None:
            now = book.clock()
            count = limits.datagrams_per_minute
            if count is not None and store.rate(
                app, "datagrams_per_minute", 1, SECONDS_PER_MINUTE / count, now, force=False
            ):
                return "datagrams_per_minute"
            rate = limits.bytes_out_per_minute
            if rate is not None and store.rate(
                app, "bytes_out_per_minute", n, SECONDS_PER_MINUTE / rate, now, force=False
            ):
                return "bytes_out_per_minute"
        cap = limits.bytes_out_per_day
        if cap is not None and not store.spend(
            app, "bytes_out_per_day", n, cap, book.day()[0], whole=True
        ) and n:
            return "bytes_out_per_day"
        return None

    def datagram_in(self, n: int) -> str | None:
        """A datagram of `n` bytes for the app: None to deliver it, else ``bytes_in_per_day``."""
        cap = self.limits.bytes_in_per_day
        if cap is None or not n:
            return None
        book = self.book
        if book.store.spend(self.app, "bytes_in_per_day", n, cap, book.day()[0], whole=True):
            return None
        return "bytes_in_per_day"


class QuotaBook:
    """Every app's quota at one gateway; see the module docstring."""

    def __init__(
        self,
        config: QuotaConfig,
        *,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        store: QuotaStore | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.wall = wall
        self.store: QuotaStore = store if store is not None else LocalStore()
        # (app, limit) -> refusals and drops so far (connects, lookups,
        # datagrams): the metrics' tether_quota_refusals_total.
        self.refusals: dict[tuple[str, str], int] = {}
        self._meters: dict[str, AppMeter] = {}
        self._day: tuple[float, float] = (0.0, 0.0)  # the current quota day's [start, end)
        self._day_window: DayWindow = config.day
        self._derive(config)

    # -- configuration -----------------------------------------------------------

    def configure(self, config: QuotaConfig) -> None:
        """Take new limits (a reload); the counters so far are kept."""
        self.config = config
        if config.day != self._day_window:
            self._day_window = config.day
            self._day = (0.0, 0.0)
        for app, meter in self._meters.items():
            meter.limits = config.limits(app)
        self._derive(config)

    def _derive(self, config: QuotaConfig) -> None:
        # Whether any app (or the defaults) has a limit checked at admission,
        # or metered per byte of a TCP socket: read on every connect, so a
        # gateway without such quotas asks no app's limits there (each ask is
        # a Python call: ~1k instructions a connection, bench.instructions).
        every = (config.defaults, *config.apps.values())
        self.admission: bool = any(limits.admission for limits in every)
        self.meters_streams: bool = any(limits.meters_streams for limits in every)

    def limits(self, app: str) -> Limits:
        return self.config.limits(app)

    def day(self) -> tuple[float, float]:
        """The current quota day's [start, end), in wall-clock seconds."""
        now = self.wall()
        day = self._day
        if not day[0] <= now < day[1]:
            day = self._day = self._day_window.bounds(now)
        return day

    # -- asking ------------------------------------------------------------------

    def disabled(self, app: str) -> Exceeded | None:
        """The refusal if `app`'s sockets (and lookups) are switched off."""
        limits = self.config.limits(app)
        if limits.enabled:
            return None
        return Exceeded(app, "enabled", 0, "", 0.0, limits.source("enabled"))

    def admit(self, app: str) -> Exceeded | None:
        """May `app` open a new socket now? None (and the connect is counted), or why not.

        Checked in this order: switched off; a daily byte total reached
        (until the quota day starts again); ``connects_per_minute`` (a
        refused connect is not counted). The ``sockets`` limit is the
        caller's to check (it knows what is open): :meth:`sockets`.
        """
        limits = self.config.limits(app)
        if not limits.enabled:
            return Exceeded(app, "enabled", 0, "", 0.0, limits.source("enabled"))
        out, into = limits.bytes_out_per_day, limits.bytes_in_per_day
        if out is not None or into is not None:
            day = self.day()[0]
            spent = self.store.spent
            if out is not None and (used := spent(app, "bytes_out_per_day", day)) >= out:
                return self.daily(app, "bytes_out_per_day", used)
            if into is not None and (used := spent(app, "bytes_in_per_day", day)) >= into:
                return self.daily(app, "bytes_in_per_day", used)
        count = limits.connects_per_minute
        if count is not None:
            wait = self.store.rate(
                app, "connects_per_minute", 1, SECONDS_PER_MINUTE / count, self.clock(),
                force=False,
            )
            if wait:
                return Exceeded(app, "connects_per_minute", count, MINUTE, wait,
                                limits.source("connects_per_minute"))
        return None

    def sockets(self, app: str, open_now: int, cap: int, setting: str) -> Exceeded:
        """The refusal of `app`'s socket over its ``sockets`` limit `cap` (from `setting`)."""
        return Exceeded(app, "sockets", cap, CONCURRENT, 0.0, setting, used=open_now)

    def daily(self, app: str, limit: str, used: int | None = None) -> Exceeded:
        """`app` at its daily `limit`: the refusal or close reason, with when it refills."""
        limits = self.config.limits(app)
        value: int = getattr(limits, limit) or 0
        start, end = self.day()
        if used is None:
            used = self.store.spent(app, limit, start)
        return Exceeded(app, limit, value, DAY, max(0.0, end - self.wall()), limits.source(limit),
                        used=used, refill_at=self._day_window.when(end))

    def over(self, app: str, limit: str) -> Exceeded:
        """`app` at `limit` (a datagram dropped, a socket closed): what to say."""
        if WINDOWS.get(limit) == DAY:
            return self.daily(app, limit)
        limits = self.config.limits(app)
        value: int = getattr(limits, limit) or 0
        return Exceeded(app, limit, value, WINDOWS.get(limit, ""), 0.0, limits.source(limit))

    def refused(self, app: str, limit: str) -> None:
        """Count a refusal or a drop by `limit` (for the metrics)."""
        key = (app, limit)
        self.refusals[key] = self.refusals.get(key, 0) + 1

    def meter(self, app: str) -> AppMeter | None:
        """The meter a TCP relay of `app` charges its bytes to; None: no byte limit."""
        limits = self.config.limits(app)
        if not limits.meters_streams:
            return None
        return self._meter(app, limits)

    def datagram_meter(self, app: str) -> AppMeter | None:
        """The meter a UDP association of `app` charges; None: no byte or datagram limit."""
        limits = self.config.limits(app)
        if not limits.meters_datagrams:
            return None
        return self._meter(app, limits)

    def _meter(self, app: str, limits: Limits) -> AppMeter:
        meter = self._meters.get(app)
        if meter is None:
            meter = self._meters[app] = AppMeter(self, app, limits)
        return meter


__all__ = ["AppMeter", "Exceeded", "LocalStore", "QuotaBook", "QuotaStore"]
