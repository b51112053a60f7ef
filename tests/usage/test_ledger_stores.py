"""The two stores, against a real SQLite file and the machine's PostgreSQL (127.0.0.1:5432).

Each PostgreSQL test works in a schema of its own (``ledger_test_<random>``),
dropped afterwards; nothing else in the database is touched.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pg8000.native
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import FakeClock, require_service

from tether.gateway.core.registry import Registry
from tether.usage.ledger import Ledger
from tether.usage.location import PostgresLocation, parse_url
from tether.usage.model import Batch, Counters
from tether.usage.store import LedgerError, PostgresStore, SQLiteStore, Store, Total, open_store

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
DAY = 86_400
# 2026-12-05T00:00Z, a day boundary.
D0 = 1_796_428_800
assert D0 % DAY == 0


@pytest.fixture
def pg_location() -> Iterator[PostgresLocation]:
    require_service(5432, "PostgreSQL")
    location = parse_url(PG_URL, schema=f"ledger_test_{secrets.token_hex(4)}")
    yield location
    db = pg8000.native.Connection("postgres", host="127.0.0.1", port=5432, database="test")
    try:
        db.run(f'DROP SCHEMA IF EXISTS "{location.schema}" CASCADE')
    finally:
        db.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> PostgresLocation | str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger" / "usage.sqlite3")
    loc: PostgresLocation = request.getfixturevalue("pg_location")
    return loc


@pytest.fixture
def store(location: PostgresLocation | str) -> Iterator[Store]:
    opened = open_store(location)
    yield opened
    opened.close()


def batch(run: str, seq: int, rows: dict[tuple[str, int], Counters], node: str = "n1") -> Batch:
    return Batch(node, run, seq, float(D0), float(D0 + seq), rows)


def test_a_batch_is_applied_once_and_a_retry_changes_nothing(store: Store) -> None:
    first = batch("r1", 1, {("a", D0): Counters(100, 10, 1, 0, 0, 1.5),
                            ("b", D0): Counters(5, 0, 1, 2, 1, 0.25)})
    assert store.apply(first) is True
    before = store.totals()
    assert store.apply(first) is False  # the same flush again
    assert store.totals() == before
    assert before == [
        Total("a", None, Counters(100, 10, 1, 0, 0, 1.5)),
        Total("b", None, Counters(5, 0, 1, 2, 1, 0.25)),
    ]


def test_runs_and_nodes_add_up_and_stale_batches_are_skipped(store: Store) -> None:
    row = ("a", D0 + 60)
    assert store.apply(batch("r1", 1, {row: Counters(1, 0, 1, 0, 0, 1.0)}))
    assert store.apply(batch("r1", 2, {row: Counters(2, 0, 0, 0, 0, 1.0)}))
    assert not store.apply(batch("r1", 1, {row: Counters(1, 0, 1, 0, 0, 1.0)}))  # stale retry
    # A second process with the same node name (a worker, a restart in the same minute).
    assert store.apply(batch("r2", 1, {row: Counters(4, 0, 1, 0, 0, 1.0)}))
    assert store.apply(batch("r1", 3, {row: Counters(8, 0, 0, 0, 0, 1.0)}, node="n2"))
    assert store.totals() == [Total("a", None, Counters(15, 0, 2, 0, 0, 4.0))]
    assert store.totals(node="n2") == [Total("a", None, Counters(8, 0, 0, 0, 0, 1.0))]


def test_totals_by_minute_hour_and_day_over_a_period(store: Store) -> None:
    rows = {
        ("a", D0): Counters(1, 0, 0, 0, 0, 0.0),
        ("a", D0 + 60): Counters(2, 0, 0, 0, 0, 0.0),
        ("a", D0 + 3600): Counters(4, 0, 0, 0, 0, 0.0),
        ("a", D0 + DAY + 120): Counters(8, 0, 0, 0, 0, 0.0),
        ("b", D0 + 60): Counters(16, 0, 0, 0, 0, 0.0),
    }
    store.apply(batch("r", 1, rows))

    def out(**kw: object) -> list[tuple[str, int | None, int]]:
        return [(t.app, t.period, t.counters.bytes_out) for t in store.totals(**kw)]  # type: ignore[arg-type]

    assert out() == [("a", None, 15), ("b", None, 16)]
    assert out(by="minute") == [
        ("a", D0, 1), ("a", D0 + 60, 2), ("b", D0 + 60, 16), ("a", D0 + 3600, 4),
        ("a", D0 + DAY + 120, 8),
    ]
    assert out(by="hour") == [("a", D0, 3), ("b", D0, 16), ("a", D0 + 3600, 4),
                              ("a", D0 + DAY, 8)]
    assert out(by="day") == [("a", D0, 7), ("b", D0, 16), ("a", D0 + DAY, 8)]
    assert out(since=D0 + 60, until=D0 + 3600) == [("a", None, 2), ("b", None, 16)]
    assert out(app="a", since=D0 + 3600) == [("a", None, 12)]
    assert out(since=D0 + 2 * DAY) == []


def test_large_values_are_exact(store: Store) -> None:
    big = 2**53 + 1  # past a double's exact integers: must stay a bigint
    store.apply(batch("r", 1, {("a", D0): Counters(big, big, 1, 0, 0, 0.0)}))
    store.apply(batch("r", 2, {("a", D0): Counters(big, 0, 0, 0, 0, 0.0)}))
    (total,) = store.totals()
    assert total.counters.bytes_out == 2 * big and total.counters.bytes_in == big


def test_a_reader_never_creates_a_ledger(location: PostgresLocation | str) -> None:
    with pytest.raises(LedgerError) as info:
        open_store(location, create=False)
    assert "usage ledger" in str(info.value)
    if isinstance(location, str):
        assert not Path(location).exists()


def test_two_writers_at_once_lose_nothing(location: PostgresLocation | str) -> None:
    # Two gateway processes (workers) on one ledger, writing the same rows.
    open_store(location).close()  # the schema, made once
    errors: list[BaseException] = []

    def writer(run: str) -> None:
        try:
            store = open_store(location)
            try:
                for seq in range(1, 31):
                    store.apply(batch(run, seq, {("a", D0): Counters(1, 0, 0, 0, 0, 0.0),
                                                 ("b", D0): Counters(2, 0, 0, 0, 0, 0.0)}))
            finally:
                store.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    reader = open_store(location, create=False)
    try:
        assert [(t.app, t.counters.bytes_out) for t in reader.totals()] == [("a", 60), ("b", 120)]
    finally:
        reader.close()


def test_an_unreachable_postgresql_is_a_ledger_error_naming_it() -> None:
    # Port 1 on loopback: nothing listens there, the connect is refused at once.
    location = parse_url("postgresql://postgres@127.0.0.1:1/test")
    with pytest.raises(LedgerError) as info:
        PostgresStore(location)
    assert "postgresql://postgres@127.0.0.1:1/test" in str(info.value)
    assert "cannot connect" in str(info.value)


def test_sqlite_ledger_file_is_in_wal_mode(tmp_path: Path) -> None:
    # WAL: `tether usage` reads while a gateway writes, without waiting.
    store = SQLiteStore(tmp_path / "u.sqlite3")
    try:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()


# Deliveries of batches as a flaky network makes them: in order, repeated
# (a retry after a lost answer), or an older one again (a stale retry).
deliveries = st.lists(
    st.tuples(st.sampled_from(["r1", "r2"]), st.integers(1, 6)),
    max_size=25,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sent=deliveries)
def test_any_order_of_retries_counts_each_batch_once(
    store: Store, sent: list[tuple[str, int]]
) -> None:
    node = f"n-{secrets.token_hex(6)}"  # one node per example: the store is shared
    applied: dict[str, int] = {}  # run -> highest seq applied
    expected = 0
    for run, seq in sent:
        # A batch's content is fixed by its (run, seq): a retry carries the same rows.
        rows = {("a", D0 + 60 * (seq % 3)): _fixed(run, seq), ("b", D0): _fixed(run, seq)}
        new = seq > applied.get(run, 0)
        assert store.apply(batch(run, seq, rows, node=node)) is new
        if new:
            applied[run] = seq
            expected += 2 * _fixed(run, seq).bytes_out
    totals = store.totals(node=node)
    assert sum(t.counters.bytes_out for t in totals) == expected


def _fixed(run: str, seq: int) -> Counters:
    return Counters(seq * 1000 + (7 if run == "r2" else 0), 0, 1, 0, 0, 0.5)


def test_a_dropped_postgresql_connection_is_reopened_and_nothing_is_lost(
    pg_location: PostgresLocation,
) -> None:
    registry = Registry(FakeClock())
    wall = [float(D0 + 1)]  # one second past a minute: the ticker sleeps ~59 s, unused
    ledger = Ledger(lambda: open_store(pg_location), registry, flush_interval=60.0,
                    max_pending_rows=1000, where="test", wall=lambda: wall[0])
    record = registry.add("a", ("127.0.0.1", 9), ("127.0.0.1", 1), "tcp", 600.0)
    admin = pg8000.native.Connection("postgres", host="127.0.0.1", port=5432, database="test")

    async def main() -> None:
        ledger.start(asyncio.get_running_loop(), "n1")
        try:
            record.bytes_out = 100
            wall[0] += 10
            ledger.sample()
            assert await ledger.flush()
            # The server ends the ledger's own session (as a restart or a
            # failover would); only that backend, found by its pid.
            store = ledger._store
            assert isinstance(store, PostgresStore)
            (pid,) = store.db.run("SELECT pg_backend_pid()")[0]
            admin.run("SELECT pg_terminate_backend(:pid)", pid=pid)
            record.bytes_out += 50
            wall[0] += 10
            ledger.sample()
            assert not await ledger.flush()  # the write fails: kept, and the store dropped
            assert ledger.failures == 1 and ledger.pending_rows == 1
            assert await ledger.flush()  # a new connection writes it
        finally:
            await ledger.close()

    try:
        asyncio.run(main())
    finally:
        admin.close()
    reader = open_store(pg_location, create=False)
    try:
        (total,) = reader.totals()
    finally:
        reader.close()
    assert total.counters.bytes_out == 150 and total.counters.connects == 1
