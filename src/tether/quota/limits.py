"""What an app's quota is: the limits, their windows, and the quota day.

Pure values, no clock and no I/O: :class:`Limits` (one app's limits, with
the config key each came from, for the messages), :class:`DayWindow` (when
a quota day starts, in which time zone), the size and duration words the
messages use, and :func:`parse_quota` for the ``[quota]`` and
``[apps.NAME.quota]`` tables.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tether.errors import ConfigError

# The windows a limit is counted over, as the wire's Error.window says them.
MINUTE = "minute"
DAY = "day"
CONCURRENT = "concurrent"  # sockets: how many at once, no time window

# The counted limits and their windows (``enabled`` is a switch, not a count).
WINDOWS: dict[str, str] = {
    "sockets": CONCURRENT,
    "connects_per_minute": MINUTE,
    "bytes_out_per_minute": MINUTE,
    "bytes_out_per_day": DAY,
    "bytes_in_per_day": DAY,
    "datagrams_per_minute": MINUTE,
}
# Limits whose values are byte counts: they take "50MiB"-style sizes.
SIZES = frozenset({"bytes_out_per_minute", "bytes_out_per_day", "bytes_in_per_day"})
KEYS = frozenset({"enabled", *WINDOWS})
# [quota] keys that are the gateway's, not an app's.
GATEWAY_KEYS = frozenset({"day_starts", "time_zone"})
UNLIMITED = "unlimited"

# Binary and decimal units (IEC 80000-13 and SI), as "50MiB", "10 GB", "512k".
# k/M/G alone are read as the decimal units, as `dd` and curl read them.
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_CLOCK_TIME = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
SECONDS_PER_MINUTE = 60.0
_ONE_DAY = _dt.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Limits:
    """One app's limits; None: not limited.

    `sources` maps a limit to the config key that set it
    (``apps.billing.quota.bytes_out_per_day``), so a refusal can tell the
    operator where to look.
    """

    enabled: bool = True
    sockets: int | None = None
    connects_per_minute: int | None = None
    bytes_out_per_minute: int | None = None
    bytes_out_per_day: int | None = None
    bytes_in_per_day: int | None = None
    datagrams_per_minute: int | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    # Derived once (read on every connect): switched off, or some limit
    # checked when a socket is opened (the book has something to say).
    admission: bool = field(init=False, compare=False, repr=False)
    # Some limit is counted per byte of a TCP socket (its relay must meter).
    meters_streams: bool = field(init=False, compare=False, repr=False)
    # Some limit is counted per datagram of a UDP association.
    meters_datagrams: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        streams = (
            self.bytes_out_per_minute is not None
            or self.bytes_out_per_day is not None
            or self.bytes_in_per_day is not None
        )
        admission = (
            not self.enabled
            or self.connects_per_minute is not None
            or self.bytes_out_per_day is not None
            or self.bytes_in_per_day is not None
        )
        # A frozen dataclass: its own fields are set through object.
        object.__setattr__(self, "admission", admission)
        object.__setattr__(self, "meters_streams", streams)
        datagrams = streams or self.datagrams_per_minute is not None
        object.__setattr__(self, "meters_datagrams", datagrams)

    def source(self, limit: str) -> str:
        """The config key `limit` came from (``quota.LIMIT`` when it was not recorded)."""
        return self.sources.get(limit, f"quota.{limit}")


@dataclass(frozen=True, slots=True)
class DayWindow:
    """When a quota day starts: `hour`:`minute` in `zone` (an IANA time zone name).

    In a zone with daylight saving time a day is 23 or 25 hours long twice a
    year; the boundary is always the local clock time. A start time that
    does not exist on a spring-forward day is read as the clock reads it
    before the change (Python's fold=0).
    """

    hour: int = 0
    minute: int = 0
    zone: str = "UTC"

    def bounds(self, wall: float) -> tuple[float, float]:
        """The [start, end) of the quota day holding `wall` (seconds since the epoch)."""
        tz = _zone(self.zone)
        start_time = _dt.time(self.hour, self.minute)
        today = _dt.datetime.fromtimestamp(wall, tz).date()
        for date in (today - _ONE_DAY, today, today + _ONE_DAY):
            start = _dt.datetime.combine(date, start_time, tz).timestamp()
            end = _dt.datetime.combine(date + _ONE_DAY, start_time, tz).timestamp()
            if start <= wall < end:
                return start, end
        raise AssertionError(f"no quota day holds {wall}")  # pragma: no cover

    def label(self) -> str:
        return f"{self.hour:02d}:{self.minute:02d} {self.zone}"

    def when(self, wall: float) -> str:
        """`wall` as the operator's clock reads it in this zone ("2026-12-06 00:00 UTC")."""
        local = _dt.datetime.fromtimestamp(wall, _zone(self.zone))
        return f"{local:%Y-%m-%d %H:%M} {self.zone}"


_ZONES: dict[str, _dt.tzinfo] = {}


def _zone(name: str) -> _dt.tzinfo:
    tz = _ZONES.get(name)
    if tz is None:
        tz = _ZONES[name] = _dt.UTC if name == "UTC" else ZoneInfo(name)
    return tz


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """``[quota]``: the limits of every app that does not override them, and the day."""

    defaults: Limits = Limits()
    day: DayWindow = DayWindow()
    # Some app or the defaults set a limit (or switch an app off): the
    # gateway's quota book has work to do.
    apps: Mapping[str, Limits] = field(default_factory=dict)

    def limits(self, app: str) -> Limits:
        """`app`'s effective limits: its overrides over the defaults."""
        return self.apps.get(app, self.defaults)


# -- words ---------------------------------------------------------------------


def format_size(n: int) -> str:
    """A byte count in words: "10 MiB" when exact, else "1,610,612,737 bytes (1.5 GiB)".

    The exact count stays in the words: a limit or a total must not read
    as a rounded value it is not.
    """
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            if n % size == 0:
                return f"{n // size} {unit}"
            return f"{n:,} bytes ({n / size:.1f} {unit})"
    return f"{n} bytes" if n != 1 else "1 byte"


def format_value(limit: str, value: int) -> str:
    return format_size(value) if limit in SIZES else str(value)


def format_wait(seconds: float) -> str:
    """A wait as a person reads it: "0.25 s", "42 s", "3 h 12 min"."""
    if seconds < 10:
        return f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


# -- parsing -------------------------------------------------------------------


def parse_size(value: Any, path: str) -> int:
    """A byte count: a whole number, or a string such as "50MiB", "10 GiB", "1.5GB"."""
    if isinstance(value, bool):
        raise ConfigError(path, "must be a size (a whole number of bytes, or like \"50MiB\")")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        unit = _UNITS.get(match.group(2).lower())
        if unit is None:
            raise ConfigError(
                path, f"{value!r}: unknown unit {match.group(2)!r} (use B, KiB, MiB, GiB, TiB, "
                "or kB, MB, GB, TB)",
            )
        exact = Decimal(match.group(1)) * unit  # decimal: "1.1MB" is 1,100,000 exactly
        if exact != int(exact):
            raise ConfigError(path, f"{value!r} is not a whole number of bytes")
        number = int(exact)
    else:
        raise ConfigError(path, "must be a size (a whole number of bytes, or like \"50MiB\")")
    if number < 1:
        raise ConfigError(path, "must be 1 byte or more (to turn sockets off: enabled = false)")
    return number


def parse_limits(
    table: Mapping[str, Any], where: str, base: Limits, *, aliases: Mapping[str, str] = {}
) -> Limits:
    """Limits from `table` (at config path `where`) over `base`.

    A limit's value may be ``"unlimited"``: an app is then not limited
    where the defaults limit every app. `aliases` maps a limit to an older
    key already read for it (``sockets`` from ``[apps.NAME] max_sockets``);
    both at once is an error.
    """
    allowed = KEYS if where.startswith("apps.") else KEYS | GATEWAY_KEYS
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{where}.{key}", f"unknown setting (known: {', '.join(sorted(allowed))})"
            )
    changes: dict[str, Any] = {}
    sources = dict(base.sources)
    if "enabled" in table:
        if not isinstance(table["enabled"], bool):
            raise ConfigError(f"{where}.enabled", "must be true or false")
        changes["enabled"] = table["enabled"]
        sources["enabled"] = f"{where}.enabled"
    for limit in WINDOWS:
        if limit not in table:
            continue
        path = f"{where}.{limit}"
        if limit in aliases:
            raise ConfigError(
                path, f"set twice: {aliases[limit]} is the same limit; keep one of them"
            )
        value = table[limit]
        if value == UNLIMITED:
            changes[limit] = None
        elif limit in SIZES:
            changes[limit] = parse_size(value, path)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                path, f'must be a whole number, 1 or more, or "{UNLIMITED}"'
                + (" (to turn sockets off: enabled = false)" if value == 0 else ""),
            )
        else:
            changes[limit] = value
        sources[limit] = path
    return replace(base, **changes, sources=sources)


def parse_day(table: Mapping[str, Any]) -> DayWindow:
    """``[quota] day_starts`` ("HH:MM", 24-hour) and ``time_zone`` (IANA, default UTC)."""
    day_starts = table.get("day_starts", "00:00")
    match = _CLOCK_TIME.match(day_starts) if isinstance(day_starts, str) else None
    if match is None:
        raise ConfigError("quota.day_starts", 'must be a 24-hour time "HH:MM", as "00:00"')
    zone = table.get("time_zone", "UTC")
    if not isinstance(zone, str) or not zone:
        raise ConfigError("quota.time_zone", 'must be an IANA time zone name, as "UTC"')
    try:
        _zone(zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(
            "quota.time_zone",
            f"{zone!r} is not a time zone this system knows (an IANA name such as "
            '"UTC" or "America/Los_Angeles"; install tzdata for more)',
        ) from exc
    return DayWindow(int(match.group(1)), int(match.group(2)), zone)


def parse_quota(
    quota: Mapping[str, Any],
    apps: Mapping[str, tuple[Mapping[str, Any] | None, int | None]],
    *,
    sockets_alias: int | None = None,
) -> QuotaConfig:
    """``[quota]`` and every ``[apps.NAME.quota]`` (with NAME's ``max_sockets``).

    `apps` maps each app to its quota table (None: none) and its
    ``max_sockets`` (None: not set); `sockets_alias` is ``[gateway]
    max_sockets_per_app``. Those two older keys are the ``sockets`` limit
    under another name.
    """
    base = Limits()
    aliases: dict[str, str] = {}
    if sockets_alias is not None:
        base = replace(
            base, sockets=sockets_alias, sources={"sockets": "gateway.max_sockets_per_app"}
        )
        aliases["sockets"] = "gateway.max_sockets_per_app"
    defaults = parse_limits(
        {k: v for k, v in quota.items() if k not in GATEWAY_KEYS}, "quota", base, aliases=aliases
    )
    day = parse_day(quota)
    per_app: dict[str, Limits] = {}
    for name, (table, max_sockets) in apps.items():
        where = f"apps.{name}.quota"
        limits = defaults
        app_aliases: dict[str, str] = {}
        if max_sockets is not None:
            sources = dict(defaults.sources, sockets=f"apps.{name}.max_sockets")
            limits = replace(limits, sockets=max_sockets, sources=sources)
            app_aliases["sockets"] = f"apps.{name}.max_sockets"
        if table is not None:
            limits = parse_limits(table, where, limits, aliases=app_aliases)
        if limits is not defaults:
            per_app[name] = limits
    return QuotaConfig(defaults=defaults, day=day, apps=per_app)


def limit_names() -> tuple[str, ...]:
    """Every limit's name, ``enabled`` first (the order of the docs)."""
    return tuple(f.name for f in fields(Limits) if f.name in KEYS)


__all__ = [
    "CONCURRENT",
    "DAY",
    "GATEWAY_KEYS",
    "KEYS",
    "MINUTE",
    "SECONDS_PER_MINUTE",
    "SIZES",
    "UNLIMITED",
    "WINDOWS",
    "DayWindow",
    "Limits",
    "QuotaConfig",
    "format_size",
    "format_value",
    "format_wait",
    "limit_names",
    "parse_day",
    "parse_limits",
    "parse_quota",
    "parse_size",
]
