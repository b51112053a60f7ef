"""The quota's values: sizes, the [quota] tables, the quota day, the words.

Pure: no gateway, no clock but the numbers given.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.config import parse_config
from tether.errors import ConfigError
from tether.quota import DayWindow, Limits, format_size, parse_quota, parse_size
from tether.quota.limits import format_wait

HOUR = 3600.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (1, 1),
        (1000, 1000),
        ("1000", 1000),
        ("50MiB", 50 * 2**20),
        ("50 MiB", 50 * 2**20),
        ("10GiB", 10 * 2**30),
        ("10gib", 10 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("1.1MB", 1_100_000),
        ("4.1MB", 4_100_000),  # as a float, 4099999.9999999995
        ("0.25KiB", 256),
        ("512KiB", 512 * 1024),
        ("512k", 512_000),
        ("2MB", 2_000_000),
        ("1TB", 10**12),
        ("3TiB", 3 * 2**40),
        ("7B", 7),
    ],
)
def test_sizes_are_read_in_binary_and_decimal_units(text: Any, expected: int) -> None:
    assert parse_size(text, "quota.x") == expected


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (0, "must be 1 byte or more"),
        (-5, "must be 1 byte or more"),
        ("0MiB", "must be 1 byte or more"),
        (True, "must be a size"),
        (1.5, "must be a size"),
        ("lots", "must be a size"),
        ("5XB", "unknown unit 'XB'"),
        ("0.5B", "is not a whole number of bytes"),
        ("-1MiB", "must be a size"),
    ],
)
def test_bad_sizes_name_their_key(value: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=r"quota\.bytes_out_per_day: ") as info:
        parse_config({"quota": {"bytes_out_per_day": value}})
    assert words in str(info.value)


def quota_of(text: str) -> Any:
    return parse_config(tomllib.loads(text)).quota


def test_defaults_apply_to_every_app_and_an_app_overrides_them() -> None:
    quota = quota_of(
        """
        [quota]
        connects_per_minute = 60
        bytes_out_per_day = "10GiB"
        bytes_out_per_minute = "50MiB"

        [apps.billing]
        key = "k1"
        [apps.billing.quota]
        connects_per_minute = 600
        bytes_out_per_day = "unlimited"

        [apps.plain]
        key = "k2"

        [apps.off]
        key = "k3"
        quota = { enabled = false }
        """
    )
    plain = quota.limits("plain")
    assert (plain.connects_per_minute, plain.bytes_out_per_day, plain.bytes_out_per_minute) == (
        60, 10 * 2**30, 50 * 2**20)
    assert plain.enabled and plain.sockets is None
    assert plain.source("connects_per_minute") == "quota.connects_per_minute"
    billing = quota.limits("billing")
    assert (billing.connects_per_minute, billing.bytes_out_per_day) == (600, None)
    assert billing.bytes_out_per_minute == 50 * 2**20  # not overridden: the default
    assert billing.source("connects_per_minute") == "apps.billing.quota.connects_per_minute"
    assert billing.source("bytes_out_per_minute") == "quota.bytes_out_per_minute"
    off = quota.limits("off")
    assert not off.enabled and off.source("enabled") == "apps.off.quota.enabled"
    # An app the config does not name (none can authenticate) has the defaults.
    assert quota.limits("nobody") == plain
    assert quota.day == DayWindow(0, 0, "UTC")


def test_no_quota_table_limits_nothing() -> None:
    limits = quota_of('[apps.a]\nkey = "k"\n').limits("a")
    assert limits == Limits()
    assert not limits.meters_streams and not limits.meters_datagrams


def test_the_old_socket_cap_keys_are_the_sockets_quota() -> None:
    quota = quota_of(
        """
        [gateway]
        max_sockets_per_app = 40
        [apps.a]
        key = "k"
        max_sockets = 3
        [apps.b]
        key = "k2"
        [apps.c]
        key = "k3"
        quota = { sockets = 7 }
        """
    )
    assert (quota.limits("a").sockets, quota.limits("a").source("sockets")) == (
        3, "apps.a.max_sockets")
    assert (quota.limits("b").sockets, quota.limits("b").source("sockets")) == (
        40, "gateway.max_sockets_per_app")
    assert (quota.limits("c").sockets, quota.limits("c").source("sockets")) == (
        7, "apps.c.quota.sockets")


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        ("[gateway]\nmax_sockets_per_app = 4\n[quota]\nsockets = 5\n", "quota.sockets",
         "set twice: gateway.max_sockets_per_app is the same limit"),
        ('[apps.a]\nkey = "k"\nmax_sockets = 2\nquota = { sockets = 3 }\n',
         "apps.a.quota.sockets", "set twice: apps.a.max_sockets is the same limit"),
        ("[quota]\nconnects_per_minute = 0\n", "quota.connects_per_minute",
         "(to turn sockets off: enabled = false)"),
        ("[quota]\nconnects_per_minute = 1.5\n", "quota.connects_per_minute",
         'must be a whole number, 1 or more, or "unlimited"'),
        ('[quota]\ndatagrams_per_minute = "many"\n', "quota.datagrams_per_minute",
         "must be a whole number"),
        ('[quota]\nenabled = "no"\n', "quota.enabled", "must be true or false"),
        ("[quota]\nbytes_per_day = 5\n", "quota.bytes_per_day", "unknown setting"),
        ('[apps.a]\nkey = "k"\nquota = { day_starts = "01:00" }\n', "apps.a.quota.day_starts",
         "unknown setting"),
        ('[apps.a]\nkey = "k"\nquota = 5\n', "apps.a.quota", "must be a table"),
        ('[quota]\nday_starts = "24:00"\n', "quota.day_starts", 'a 24-hour time "HH:MM"'),
        ('[quota]\nday_starts = "7:00"\n', "quota.day_starts", 'a 24-hour time "HH:MM"'),
        ("[quota]\nday_starts = 7\n", "quota.day_starts", 'a 24-hour time "HH:MM"'),
        ('[quota]\ntime_zone = "Mars/Olympus_Mons"\n', "quota.time_zone",
         "is not a time zone this system knows"),
        ('[quota]\ntime_zone = ""\n', "quota.time_zone", "must be an IANA time zone name"),
    ],
)
def test_bad_quota_settings_name_their_path(text: str, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text))
    assert info.value.path == path
    assert words in info.value.message


def test_day_starts_and_time_zone() -> None:
    quota = quota_of('[quota]\nday_starts = "08:30"\ntime_zone = "America/Los_Angeles"\n')
    assert quota.day == DayWindow(8, 30, "America/Los_Angeles")
    assert quota.day.label() == "08:30 America/Los_Angeles"


def test_parse_quota_directly_records_each_source() -> None:
    quota = parse_quota({"bytes_in_per_day": "1GiB"}, {"x": ({"bytes_in_per_day": 5}, None)})
    assert quota.limits("x").bytes_in_per_day == 5
    assert quota.limits("x").source("bytes_in_per_day") == "apps.x.quota.bytes_in_per_day"
    assert quota.limits("y").bytes_in_per_day == 2**30


def utc(*args: int) -> float:
    return dt.datetime(*args, tzinfo=dt.UTC).timestamp()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("window", "wall", "start", "end"),
    [
        (DayWindow(), utc(2026, 12, 5, 0, 0), utc(2026, 12, 5), utc(2026, 12, 6)),
        (DayWindow(), utc(2026, 12, 5, 23, 59, 59), utc(2026, 12, 5), utc(2026, 12, 6)),
        (DayWindow(6, 30), utc(2026, 12, 5, 6, 29), utc(2026, 12, 4, 6, 30),
         utc(2026, 12, 5, 6, 30)),
        (DayWindow(6, 30), utc(2026, 12, 5, 6, 30), utc(2026, 12, 5, 6, 30),
         utc(2026, 12, 6, 6, 30)),
        # Midnight in Los Angeles is 08:00 UTC in winter (PST, UTC-8)...
        (DayWindow(0, 0, "America/Los_Angeles"), utc(2026, 12, 5, 7, 59),
         utc(2026, 12, 4, 8), utc(2026, 12, 5, 8)),
        # ... and 07:00 UTC in summer (PDT); the day the clocks go forward
        # (2026-03-08) has 23 hours, the day they go back (2026-11-01) 25.
        (DayWindow(0, 0, "America/Los_Angeles"), utc(2026, 3, 8, 12),
         utc(2026, 3, 8, 8), utc(2026, 3, 9, 7)),
        (DayWindow(0, 0, "America/Los_Angeles"), utc(2026, 11, 1, 12),
         utc(2026, 11, 1, 7), utc(2026, 11, 2, 8)),
    ],
)
def test_quota_day_bounds(window: DayWindow, wall: float, start: float, end: float) -> None:
    assert window.bounds(wall) == (start, end)


ZONES = ["UTC", "America/Los_Angeles", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kolkata"]


@given(
    wall=st.floats(min_value=0, max_value=4e9),
    hour=st.integers(0, 23),
    minute=st.integers(0, 59),
    zone=st.sampled_from(ZONES),
)
def test_every_instant_is_in_exactly_one_quota_day(
    wall: float, hour: int, minute: int, zone: str
) -> None:
    window = DayWindow(hour, minute, zone)
    start, end = window.bounds(wall)
    assert start <= wall < end
    # A day is 24 hours, give or take a daylight-saving change (Lord Howe's is 30 min).
    assert 23 * HOUR <= end - start <= 25 * HOUR
    # The next day starts where this one ends: no gap, no overlap.
    assert window.bounds(end)[0] == end
    assert window.bounds(start) == (start, end)


@pytest.mark.parametrize(
    ("n", "words"),
    [(1, "1 byte"), (1000, "1000 bytes"), (1024, "1 KiB"), (50 * 2**20, "50 MiB"),
     (3 * 2**29, "1,610,612,736 bytes (1.5 GiB)"), (10 * 2**30, "10 GiB"), (2**40, "1 TiB"),
     (16333, "16,333 bytes (16.0 KiB)")],
)
def test_sizes_in_words(n: int, words: str) -> None:
    assert format_size(n) == words


@pytest.mark.parametrize(
    ("seconds", "words"),
    [(0.25, "0.25 s"), (0.8, "0.8 s"), (3.0, "3.0 s"), (42.4, "42 s"), (600, "10 min"),
     (3 * 3600 + 12 * 60, "3 h 12 min")],
)
def test_waits_in_words(seconds: float, words: str) -> None:
    assert format_wait(seconds) == words


def test_the_docs_example_is_a_valid_config() -> None:
    """docs/quotas.md's TOML, as written (the keys elided there filled in)."""
    text = (Path(__file__).parents[2] / "docs" / "quotas.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.S)
    assert block is not None
    quota = parse_config(tomllib.loads(block.group(1).replace('"..."', '"k"'))).quota
    assert quota.limits("billing").connects_per_minute == 6000
    assert quota.limits("billing").bytes_out_per_day is None
    assert not quota.limits("trial").enabled
    assert quota.limits("trial").bytes_out_per_minute == 50 * 2**20


UNIT_SIZES = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
              "k": 10**3, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


@given(n=st.integers(1, 10**6), unit=st.sampled_from(sorted(UNIT_SIZES)),
       space=st.sampled_from(["", " "]), upper=st.booleans())
def test_any_whole_size_reads_back(n: int, unit: str, space: str, upper: bool) -> None:
    text = f"{n}{space}{unit.upper() if upper else unit}"
    assert parse_size(text, "quota.x") == n * UNIT_SIZES[unit]


@given(n=st.integers(1, 2**50))
def test_a_size_in_words_reads_back(n: int) -> None:
    words = format_size(n)
    exact = words.split(" (")[0].replace(",", "").replace(" bytes", "").replace(" byte", "")
    assert parse_size(exact, "quota.x") == n
