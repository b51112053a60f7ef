"""The ledger's sampling and batching, with injected clocks: no gateway, no sleeping.

The registry is the gateway's own (core/registry.py) on a fake monotonic
clock; the ledger's wall clock is a second fake. Writes go to a real SQLite
file (tmp_path); a wrapper makes a write fail on demand, before or after
its COMMIT, to show the retry never counts twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import FakeClock

from tether.gateway.core.registry import Registry, SocketRecord
from tether.usage.ledger import Ledger, cumulative
from tether.usage.model import ZERO, Batch, Counters, add, minute_of
from tether.usage.store import LedgerError, SQLiteStore, Store

# A wall-clock time one second past a minute boundary: the ledger's ticker
# (started by start()) then first wakes ~59 real seconds later, long after
# a test is done, so only the test's own samples happen.
T0 = 1_796_000_041.0
assert T0 % 60 == 1


class Wall:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Flaky:
    """A real store whose next writes fail: before the COMMIT, or after it (a lost answer)."""

    store: Store
    fail_before: int = 0
    fail_after: int = 0
    applied: list[int] = field(default_factory=list)

    def apply(self, batch: Batch) -> bool:
        if self.fail_before:
            self.fail_before -= 1
            raise LedgerError("the database went away (before COMMIT)")
        result = self.store.apply(batch)
        self.applied.append(batch.seq)
        if self.fail_after:
            self.fail_after -= 1
            raise LedgerError("the connection broke after COMMIT")
        return result

    def totals(self, **kwargs: Any) -> Any:
        return self.store.totals(**kwargs)

    def close(self) -> None:
        pass  # the test closes the real store itself


def open_socket(registry: Registry, app: str) -> SocketRecord:
    return registry.add(app, ("127.0.0.1", 9), ("127.0.0.1", 40000), "tcp", 600.0)


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "usage.sqlite3")
    yield store
    store.close()


def run_ledger(ledger: Ledger, body: Callable[[], Any]) -> None:
    """Run `body` (a coroutine function) with the ledger started on a fresh loop."""

    async def main() -> None:
        ledger.start(asyncio.get_running_loop(), "node-a")
        try:
            await body()
        finally:
            await ledger.close()

    asyncio.run(main())


def make_ledger(store: Store, registry: Registry, wall: Wall, **kw: Any) -> Ledger:
    return Ledger(
        lambda: store, registry, flush_interval=kw.pop("flush_interval", 60.0),
        max_pending_rows=kw.pop("max_pending_rows", 1000), where="test", wall=wall, **kw,
    )


# -- minute attribution -------------------------------------------------------------

# (seconds after T0 of each sample, bytes sent before it) -> {minute offset from
# minute_of(T0): bytes}. A sample's bytes go to the minute of the midpoint
# between it and the previous sample (the first: the ledger's start).
ATTRIBUTION = [
    pytest.param([(30, 100)], {0: 100}, id="within-the-first-minute"),
    pytest.param([(59, 100), (62, 7)], {0: 100, 60: 7}, id="a-tick-just-past-the-boundary"),
    pytest.param([(59, 100), (120, 7)], {0: 100, 60: 7}, id="next-minute"),
    pytest.param([(10, 1), (20, 2), (30, 3)], {0: 6}, id="rows-add-up-within-a-minute"),
    # A loop stalled for 3 minutes: the whole delta lands on the middle minute.
    pytest.param([(5, 1), (185, 9)], {0: 1, 60: 9}, id="a-long-gap-goes-to-its-midpoint"),
    pytest.param([(30, 0), (90, 0)], {}, id="nothing-sent-no-row"),
]


@pytest.mark.parametrize(("samples", "expected"), ATTRIBUTION)
def test_bytes_are_attributed_to_the_minute_of_the_sample_midpoint(
    samples: list[tuple[float, int]], expected: dict[int, int]
) -> None:
    clock, wall = FakeClock(), Wall()
    registry = Registry(clock)
    ledger = make_ledger(SQLiteStore(":memory:"), registry, wall)
    record = open_socket(registry, "a")
    for at, sent in samples:
        record.bytes_out += sent
        wall.now = T0 + at
        ledger.sample()
    batch = ledger.take_batch()
    got = {} if batch is None else {
        minute - minute_of(T0): c.bytes_out for (app, minute), c in batch.rows.items()
    }
    # The socket's connect counts once, in the first row.
    assert {m: b for m, b in got.items() if b} == expected


def test_every_counter_is_sampled_from_closed_and_live_sockets() -> None:
    clock, wall = FakeClock(), Wall()
    registry = Registry(clock)
    ledger = make_ledger(SQLiteStore(":memory:"), registry, wall)
    closed = open_socket(registry, "a")
    live = open_socket(registry, "a")
    closed.bytes_out, closed.bytes_in = 10, 20
    live.bytes_out, live.bytes_in = 1, 2
    clock.advance(4.0)
    closed.finish("closed by the app")  # open 4 s
    clock.advance(3.0)  # the live one: 7 s so far
    usage = registry.app_usage("a")
    usage.connects_denied += 2  # the policy
    usage.limit_refusals += 1  # a socket cap: a denied connect too
    usage.quota_refusals += 1
    assert cumulative(registry) == {"a": Counters(11, 22, 2, 3, 1, 11.0)}
    wall.now = T0 + 10
    ledger.sample()
    batch = ledger.take_batch()
    assert batch is not None
    assert batch.rows == {("a", minute_of(T0)): Counters(11, 22, 2, 3, 1, 11.0)}
    # A closing socket moves its counts from "live" to the app's totals: no delta.
    live.finish("closed by the peer")
    wall.now = T0 + 20
    ledger.sample()
    assert ledger.take_batch() is batch  # unconfirmed: the same batch again, nothing new


# -- idempotent batches ------------------------------------------------------------------


def test_a_retried_batch_never_counts_twice(sqlite: SQLiteStore) -> None:
    clock, wall = FakeClock(), Wall()
    registry = Registry(clock)
    flaky = Flaky(sqlite, fail_after=1)
    ledger = make_ledger(flaky, registry, wall)
    record = open_socket(registry, "a")

    async def body() -> None:
        record.bytes_out = 1000
        wall.now = T0 + 10
        ledger.sample()
        # The write commits but its answer is lost: the ledger cannot know.
        assert not await ledger.flush()
        assert ledger.failures == 1 and ledger.pending_rows == 1
        record.bytes_out += 500  # sampled into the next batch meanwhile
        wall.now = T0 + 20
        ledger.sample()
        assert await ledger.flush()  # batch 1 again (skipped by the store), then batch 2
        assert ledger.failures == 0 and ledger.pending_rows == 0
        assert ledger.last_flush == T0 + 20

    run_ledger(ledger, body)
    assert flaky.applied == [1, 1, 2]
    (total,) = sqlite.totals()
    assert total.counters.bytes_out == 1500
    assert total.counters.connects == 1


def test_the_same_batch_applied_twice_is_skipped_the_second_time(sqlite: SQLiteStore) -> None:
    batch = Batch("n", "run-1", 1, T0, T0 + 5, {("a", minute_of(T0)): Counters(7, 8, 1, 0, 0, 2.5)})
    assert sqlite.apply(batch) is True
    assert sqlite.apply(batch) is False
    # An older seq of the same run (a stale retry) is skipped too.
    newer = Batch("n", "run-1", 2, T0, T0 + 10, {("a", minute_of(T0)): Counters(1, 0, 0, 0, 0, 0)})
    assert sqlite.apply(newer) is True
    assert sqlite.apply(batch) is False
    # Another process (run) of the same node adds to the same row.
    other = Batch("n", "run-2", 1, T0, T0 + 5, {("a", minute_of(T0)): Counters(2, 0, 1, 0, 0, 0.5)})
    assert sqlite.apply(other) is True
    (total,) = sqlite.totals()
    assert total.counters == Counters(10, 8, 2, 0, 0, 3.0)


def test_a_failing_store_keeps_rows_and_a_bounded_number_of_them(
    sqlite: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock, wall = FakeClock(), Wall()
    registry = Registry(clock)
    flaky = Flaky(sqlite, fail_before=1000)
    ledger = make_ledger(flaky, registry, wall, max_pending_rows=5)
    record = open_socket(registry, "a")

    async def body() -> None:
        # One row a minute for 8 minutes while every write fails.
        for minute in range(8):
            record.bytes_out += 100
            wall.now = T0 + 60 * minute + 30
            ledger.sample()
            assert not await ledger.flush()
        assert ledger.pending_rows == 5
        assert ledger.dropped_rows == 3
        assert ledger.dropped.bytes_out == 300
        assert ledger.flush_lag() == wall.now - T0  # nothing ever written
        flaky.fail_before = 0
        assert await ledger.flush()
        assert ledger.flush_lag() == 0.0

    with caplog.at_level(logging.WARNING, logger="tether.usage"):
        run_ledger(ledger, body)
    # What was kept reached the store; what was dropped is said, with its size.
    assert sum(t.counters.bytes_out for t in sqlite.totals(by="minute")) == 500
    text = caplog.text
    assert "past [usage] max_pending_rows 5" in text and "300 bytes out" in text
    assert "batch 1 not written (the database went away (before COMMIT))" in text
    assert "written again after" in text


def test_flush_lag_follows_the_last_confirmed_sample(sqlite: SQLiteStore) -> None:
    clock, wall = FakeClock(), Wall()
    registry = Registry(clock)
    ledger = make_ledger(sqlite, registry, wall)
    open_socket(registry, "a").bytes_out = 5

    async def body() -> None:
        wall.now = T0 + 12
        assert ledger.flush_lag() == 12
        ledger.sample()
        assert await ledger.flush()
        wall.now = T0 + 15
        assert ledger.flush_lag() == 3

    run_ledger(ledger, body)


def test_an_idle_ledger_has_no_lag_beyond_its_last_sample(sqlite: SQLiteStore) -> None:
    # Nothing to write is not a write that is late: an idle gateway's lag
    # (tether_ledger_flush_lag_seconds) must not grow without bound.
    clock, wall = FakeClock(), Wall()
    registry = Registry(clock)
    ledger = make_ledger(sqlite, registry, wall)

    async def body() -> None:
        for minutes in range(1, 4):
            wall.now = T0 + 60 * minutes
            ledger.sample()
            assert ledger.pending_rows == 0
            assert await ledger.flush()
            assert ledger.flush_lag() == 0.0
        wall.now += 2
        assert ledger.flush_lag() == 2

    run_ledger(ledger, body)


@pytest.mark.parametrize(
    ("interval", "now_mod_60", "expected"),
    [
        (5.0, 0.0, 5.0),
        (5.0, 57.5, 2.5),
        (7.0, 56.0, 4.0),  # the minute boundary comes before the next multiple of 7
        (60.0, 1.0, 59.0),
        (0.5, 0.25, 0.25),
    ],
)
def test_ticks_fall_on_interval_multiples_and_minute_boundaries(
    interval: float, now_mod_60: float, expected: float
) -> None:
    ledger = make_ledger(SQLiteStore(":memory:"), Registry(FakeClock()), Wall(),
                         flush_interval=interval)
    assert ledger._delay(1_796_000_040.0 + now_mod_60) == pytest.approx(expected)


# -- the property: the ledger adds up to the close lines ---------------------------------

APPS = ("a", "b", "c")
operations = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.sampled_from(APPS)),
        st.tuples(st.just("send"), st.integers(0, 50), st.integers(0, 10**6), st.booleans()),
        st.tuples(st.just("close"), st.integers(0, 50)),
        st.tuples(st.just("deny"), st.sampled_from(APPS)),
        st.tuples(st.just("time"), st.floats(0.0, 200.0)),
        st.tuples(st.just("sample")),
    ),
    max_size=80,
)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_the_rows_add_up_to_the_audit_close_lines(ops: list[tuple[Any, ...]]) -> None:
    clock, wall = FakeClock(), Wall()
    registry = Registry(clock)
    ledger = make_ledger(SQLiteStore(":memory:"), registry, wall)
    audit = _Lines()
    logger = logging.getLogger("tether.audit")
    logger.addHandler(audit)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        live: list[SocketRecord] = []
        samples = [T0]
        for op in ops:
            if op[0] == "open":
                live.append(open_socket(registry, op[1]))
            elif op[0] == "send" and live:
                record = live[op[1] % len(live)]
                if op[3]:
                    record.bytes_out += op[2]
                else:
                    record.bytes_in += op[2]
            elif op[0] == "close" and live:
                live.pop(op[1] % len(live)).finish("closed by the app")
            elif op[0] == "deny":
                registry.app_usage(op[1]).connects_denied += 1
            elif op[0] == "time":
                clock.advance(op[1])
                wall.now += op[1]
            elif op[0] == "sample":
                ledger.sample()
                samples.append(wall.now)
        for record in live:
            record.finish("gateway shutting down")
        ledger.stop()  # the last sample, as at shutdown
        samples.append(wall.now)
    finally:
        logger.removeHandler(audit)
        logger.setLevel(old_level)
    rows = ledger._open
    closes = [line for line in audit.lines if line["event"] == "close"]
    for app in APPS:
        got = ZERO
        for (row_app, _), counters in rows.items():
            if row_app == app:
                got = add(got, counters)
        mine = [line for line in closes if line["app"] == app]
        assert got.bytes_out == sum(line["bytes_out"] for line in mine)
        assert got.bytes_in == sum(line["bytes_in"] for line in mine)
        assert got.connects == len(mine)
        # A close line rounds its duration to the microsecond.
        assert got.socket_seconds == pytest.approx(
            sum(line["duration_s"] for line in mine), abs=1e-6 * (len(mine) + 1)
        )
        assert got == (cumulative(registry).get(app, ZERO))
    # Every row is a whole minute that some pair of samples has its midpoint in.
    midpoints = {minute_of((a + b) / 2) for a, b in itertools.pairwise(samples)}
    assert {minute for _, minute in rows} <= midpoints
    assert all(min(c) >= 0 for c in rows.values())


def test_writes_happen_off_the_event_loop(sqlite: SQLiteStore) -> None:
    clock, wall = FakeClock(), Wall()
    registry = Registry(clock)
    threads: list[str] = []

    class Recording(Flaky):
        def apply(self, batch: Batch) -> bool:
            import threading

            threads.append(threading.current_thread().name)
            return super().apply(batch)

    ledger = make_ledger(Recording(sqlite), registry, wall)
    open_socket(registry, "a").bytes_out = 1

    async def body() -> None:
        ledger.sample()
        assert await ledger.flush()

    run_ledger(ledger, body)
    assert threads and all(name.startswith("tether-ledger") for name in threads)
    assert isinstance(ledger._executor, concurrent.futures.ThreadPoolExecutor)
