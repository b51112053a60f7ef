"""The quota book with a fake clock: every limit, its window, the refill and the daily reset.

One FakeClock is both of the book's clocks (monotonic and wall), set to a
real date so the quota day has a calendar.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.config import parse_config
from tether.quota import DAY, MINUTE, Exceeded, LocalStore, QuotaBook, QuotaStore

# 2026-12-05 18:00 UTC: six hours before the quota day ends.
EVENING = dt.datetime(2026, 12, 5, 18, 0, tzinfo=dt.UTC).timestamp()
MIDNIGHT = dt.datetime(2026, 12, 6, 0, 0, tzinfo=dt.UTC).timestamp()


@dataclass
class Clock:
    now: float = EVENING

    def __call__(self) -> float:
        return self.now


def book_for(quota: str, apps: str = "", *, clock: Clock | None = None) -> tuple[QuotaBook, Clock]:
    text = f"[quota]\n{quota}\n[apps.a]\nkey = \"k\"\n{apps}\n[apps.b]\nkey = \"k2\"\n"
    clock = clock or Clock()
    config = parse_config(tomllib.loads(text)).quota
    return QuotaBook(config, clock=clock, wall=clock), clock


def test_no_limits_admit_everything_and_meter_nothing() -> None:
    book, _ = book_for("")
    for _ in range(1000):
        assert book.admit("a") is None
    assert book.meter("a") is None and book.datagram_meter("a") is None
    assert book.disabled("a") is None


def test_switched_off() -> None:
    book, _ = book_for("", "quota = { enabled = false }")
    over = book.admit("a")
    assert over is not None and over == book.disabled("a")
    assert (over.app, over.limit, over.value, over.window, over.retry_after) == (
        "a", "enabled", 0, "", 0.0)
    assert over.message() == (
        "tether: sockets are disabled for app 'a' (apps.a.quota.enabled = false)")
    assert book.admit("b") is None  # the other app is on


@pytest.mark.parametrize(("limit", "interval"), [(1, 60.0), (3, 20.0), (60, 1.0), (600, 0.1)])
def test_connects_per_minute_burst_refill_and_exact_retry_after(
    limit: int, interval: float
) -> None:
    book, clock = book_for(f"connects_per_minute = {limit}")
    for _ in range(limit):
        assert book.admit("a") is None
    over = book.admit("a")
    assert over is not None
    assert (over.limit, over.value, over.window) == ("connects_per_minute", limit, MINUTE)
    # (Within float rounding: the fake clock reads ~1.8e9 s, where a double
    # resolves 2.4e-7 s, and the burst added 600 intervals to it.)
    assert over.retry_after == pytest.approx(interval, abs=1e-3)
    assert over.setting == "quota.connects_per_minute"
    assert f"over its connects_per_minute quota ({limit} a minute, " in over.message()
    # A refused connect costs nothing; another app has its own budget.
    assert book.admit("b") is None
    clock.now += over.retry_after * 0.99
    assert book.admit("a") is not None
    clock.now += over.retry_after * 0.02
    assert book.admit("a") is None  # one refilled...
    assert book.admit("a") is not None  # ... and only one
    clock.now += 3600
    for _ in range(limit):
        assert book.admit("a") is None  # a full burst again, never more
    assert book.admit("a") is not None


def test_bytes_out_per_minute_throttles_with_the_right_delay() -> None:
    book, clock = book_for('bytes_out_per_minute = 6000')  # 100 bytes a second
    meter = book.meter("a")
    assert meter is not None
    assert meter.out(6000) == (6000, 0.0)  # the burst
    allowed, delay = meter.out(600)
    assert allowed == 600 and delay == pytest.approx(6.0)  # 600 bytes at 100/s
    clock.now += 6.0
    allowed, delay = meter.out(100)
    assert allowed == 100 and delay == pytest.approx(1.0)
    # The app's sockets share the budget: the same meter.
    assert book.meter("a") is meter
    clock.now += 1.0 + 60.0
    assert meter.out(6000) == (6000, 0.0)


@pytest.mark.parametrize(
    ("limit", "verb"), [("bytes_out_per_day", "sent"), ("bytes_in_per_day", "received")]
)
def test_a_daily_byte_limit_passes_up_to_it_then_refuses_until_the_day_starts_again(
    limit: str, verb: str
) -> None:
    book, clock = book_for(f'{limit} = "1KiB"')
    meter = book.meter("a")
    assert meter is not None

    def move(n: int) -> int:
        assert meter is not None
        return meter.out(n)[0] if limit == "bytes_out_per_day" else meter.inbound(n)

    assert move(600) == 600
    assert book.admit("a") is None
    assert move(600) == 424  # exactly up to the limit
    assert move(1) == 0
    over = book.admit("a")
    assert over is not None
    assert (over.limit, over.value, over.window, over.used) == (limit, 1024, DAY, 1024)
    assert over.retry_after == pytest.approx(6 * 3600)
    assert over.refill_at == "2026-12-06 00:00 UTC"
    assert over.message() == (
        f"tether: app 'a' has {verb} 1 KiB today, its {limit} quota (1 KiB a day, "
        f"quota.{limit}); the quota day starts again at 2026-12-06 00:00 UTC (in 6 h 0 min)")
    assert over.reason() == (
        f"closed by its quota: app 'a' reached its {limit} quota (1 KiB a day, quota.{limit}); "
        "the quota day starts again at 2026-12-06 00:00 UTC (in 6 h 0 min)")
    assert book.admit("b") is None  # per app
    clock.now = MIDNIGHT - 0.001
    assert book.admit("a") is not None
    clock.now = MIDNIGHT
    assert book.admit("a") is None  # a new day: the total is 0 again
    assert move(1024) == 1024
    assert move(1) == 0


def test_the_day_starts_when_configured() -> None:
    book, clock = book_for('bytes_out_per_day = 10\nday_starts = "19:30"')
    meter = book.meter("a")
    assert meter is not None
    assert meter.out(10) == (10, 0.0)
    over = book.admit("a")
    assert over is not None and over.retry_after == pytest.approx(1.5 * 3600)
    assert over.refill_at == "2026-12-05 19:30 UTC"
    clock.now += 1.5 * 3600
    assert book.admit("a") is None


def test_a_time_zone_day_reads_its_own_clock() -> None:
    # 18:00 UTC is 10:00 in Los Angeles (PST): its day ends at 08:00 UTC.
    book, _ = book_for('bytes_in_per_day = 1\ntime_zone = "America/Los_Angeles"')
    meter = book.meter("a")
    assert meter is not None and meter.inbound(1) == 1
    over = book.admit("a")
    assert over is not None and over.retry_after == pytest.approx(14 * 3600)
    assert over.refill_at == "2026-12-06 00:00 America/Los_Angeles"


def test_datagrams_per_minute_drop_then_refill() -> None:
    book, clock = book_for("datagrams_per_minute = 2")
    assert book.meter("a") is None  # no byte limit: TCP relays are not metered
    meter = book.datagram_meter("a")
    assert meter is not None
    assert meter.datagram_out(100) is None
    assert meter.datagram_out(100) is None
    assert meter.datagram_out(100) == "datagrams_per_minute"
    assert meter.datagram_in(100) is None  # replies are not counted
    clock.now += 30
    assert meter.datagram_out(100) is None


def test_datagram_bytes_are_counted_whole() -> None:
    book, clock = book_for('bytes_out_per_minute = 1000\nbytes_out_per_day = 1500\n'
                           'bytes_in_per_day = 100')
    meter = book.datagram_meter("a")
    assert meter is not None
    assert meter.datagram_out(600) is None
    assert meter.datagram_out(600) == "bytes_out_per_minute"  # 1200 > 1000: dropped whole
    clock.now += 60
    assert meter.datagram_out(600) is None
    clock.now += 60
    assert meter.datagram_out(600) == "bytes_out_per_day"  # 1800 > 1500: cut nothing
    assert meter.datagram_in(60) is None
    assert meter.datagram_in(60) == "bytes_in_per_day"
    assert meter.datagram_in(40) is None


def test_sockets_and_over_describe_the_limit() -> None:
    book, _ = book_for("datagrams_per_minute = 5", "max_sockets = 4")
    over = book.sockets("a", 4, 4, "apps.a.max_sockets")
    assert over.message() == (
        "tether: app 'a' has 4 open sockets, its sockets quota (4, apps.a.max_sockets); "
        "close one before opening another")
    assert book.over("a", "datagrams_per_minute") == Exceeded(
        "a", "datagrams_per_minute", 5, MINUTE, 0.0, "quota.datagrams_per_minute")


def test_refusals_are_counted_per_app_and_limit() -> None:
    book, _ = book_for("")
    book.refused("a", "connects_per_minute")
    book.refused("a", "connects_per_minute")
    book.refused("b", "enabled")
    assert book.refusals == {("a", "connects_per_minute"): 2, ("b", "enabled"): 1}


def test_a_reload_keeps_the_counters_and_updates_live_meters() -> None:
    book, _ = book_for("bytes_out_per_day = 100")
    meter = book.meter("a")
    assert meter is not None and meter.out(80) == (80, 0.0)
    text = '[quota]\nbytes_out_per_day = 90\n[apps.a]\nkey = "k"\n'
    book.configure(parse_config(tomllib.loads(text)).quota)
    assert meter.limits.bytes_out_per_day == 90
    assert meter.out(20) == (10, 0.0)  # 80 already spent today



@pytest.mark.parametrize(
    ("quota", "apps", "admission", "meters_streams"),
    [
        ("", "", False, False),
        ("", "quota = { enabled = false }", True, False),
        ("connects_per_minute = 10", "", True, False),
        ("", "quota = { connects_per_minute = 10 }", True, False),  # one app's limit
        ("bytes_out_per_minute = 1000", "", False, True),
        ("", "quota = { bytes_in_per_day = 1000 }", True, True),
        ("sockets = 5", "", False, False),  # the core's cap (app_cap), not the book's
        ("datagrams_per_minute = 5", "", False, False),  # UDP only
    ],
)
def test_what_a_connect_asks_of_the_book_follows_the_config_and_reloads(
    quota: str, apps: str, admission: bool, meters_streams: bool
) -> None:
    """A gateway whose apps have no such limit asks no app's limits on a connect."""
    book, _ = book_for(quota, apps)
    assert (book.admission, book.meters_streams) == (admission, meters_streams)
    assert (book.meter("a") is not None) == meters_streams
    assert (book.admit("a") is not None) == (apps == "quota = { enabled = false }")
    book.configure(parse_config(tomllib.loads('[apps.a]\nkey = "k"\n')).quota)  # a reload
    assert (book.admission, book.meters_streams) == (False, False)
    text = f'[quota]\n{quota}\n[apps.a]\nkey = "k"\n{apps}\n'
    book.configure(parse_config(tomllib.loads(text)).quota)  # and back
    assert (book.admission, book.meters_streams) == (admission, meters_streams)


def test_local_store_is_a_quota_store() -> None:
    store: QuotaStore = LocalStore()  # mypy checks the Protocol; this checks behaviour
    assert store.spend("a", "x", 5, 8, 1.0, whole=False) == 5
    assert store.spend("a", "x", 5, 8, 1.0, whole=True) == 0
    assert store.spend("a", "x", 5, 8, 1.0, whole=False) == 3
    assert store.spent("a", "x", 1.0) == 8
    assert store.spent("a", "x", 2.0) == 0  # another day
    assert store.rate("a", "r", 1, 30.0, 0.0, force=False) == 0.0
    assert store.rate("a", "r", 1, 30.0, 0.0, force=False) == 0.0
    assert store.rate("a", "r", 1, 30.0, 0.0, force=False) == pytest.approx(30.0)


@given(
    chunks=st.lists(
        st.tuples(st.integers(0, 5000), st.floats(min_value=0, max_value=20_000)),
        min_size=1, max_size=100,
    ),
    cap=st.integers(1, 100_000),
)
def test_a_day_never_counts_past_its_cap_and_each_day_starts_at_zero(
    chunks: list[tuple[int, float]], cap: int
) -> None:
    clock = Clock()
    book, _ = book_for(f"bytes_out_per_day = {cap}", clock=clock)
    meter = book.meter("a")
    assert meter is not None
    totals: dict[float, int] = {}
    for n, gap in chunks:
        clock.now += gap
        day = book.day()[0]
        allowed, _ = meter.out(n)
        assert 0 <= allowed <= n
        totals[day] = totals.get(day, 0) + allowed
        assert totals[day] <= cap
        # Refused only when the day's total is at the cap.
        assert allowed == n or totals[day] == cap
        assert (book.admit("a") is None) == (totals[day] < cap)
