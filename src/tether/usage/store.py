"""Ledger stores: a SQLite file (embedded) or PostgreSQL (several gateways).

Both hold two tables::

    tether_usage       (node, app, minute) -> bytes_out, bytes_in, connects,
                       denied_connects, quota_refusals, socket_seconds
    tether_usage_runs  (node, run) -> seq, started, flushed

A batch (:class:`~tether.usage.model.Batch`) is applied in one transaction:
first the run's row is moved to the batch's ``seq`` *only if it is behind*,
and the rows' deltas are added only when that moved it. A batch the store
already holds (a retry after an error that hid a successful COMMIT) changes
nothing, and deltas from several processes with the same node name (workers,
a restarted gateway within one minute) add up instead of overwriting each
other, which absolute "SET x = excluded.x" rows would do.

``minute`` is the UTC minute as epoch seconds (a multiple of 60): the same
integer arithmetic groups it by hour and day in both databases.

Every method blocks: the gateway calls them from the ledger's own thread
(``Ledger``), never on its event loop; ``tether usage`` calls them directly.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.usage.location import PostgresLocation
from tether.usage.model import COLUMNS, Batch, Counters

__all__ = [
    "LedgerError",
    "PostgresStore",
    "SQLiteStore",
    "Store",
    "Total",
    "open_store",
]

USAGE_TABLE = "tether_usage"
RUNS_TABLE = "tether_usage_runs"
# How long a SQLite writer waits for another (a worker of the same gateway)
# to finish its transaction: a flush is a few hundred rows, milliseconds.
SQLITE_BUSY_TIMEOUT = 5.0
# A PostgreSQL connect or statement that takes longer is a failed flush
# (retried next interval), not a hung ledger thread at shutdown.
PG_TIMEOUT = 10.0
BUCKETS = {"minute": 60, "hour": 3600, "day": 86_400}
_PG_TYPES = {c: "double precision" if c == "socket_seconds" else "bigint" for c in COLUMNS}


class LedgerError(OSError):
    """The ledger's store could not be opened, read or written (says which and why)."""


@dataclass(frozen=True)
class Total:
    """Usage of one app over one period (or the whole query range: ``period`` None)."""

    app: str
    period: int | None  # epoch seconds (UTC) of the period's start
    counters: Counters


def _schema_sql(usage: str, runs: str, index: str) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS {usage} (
            node TEXT NOT NULL,
            app TEXT NOT NULL,
            minute BIGINT NOT NULL,
            bytes_out BIGINT NOT NULL DEFAULT 0,
            bytes_in BIGINT NOT NULL DEFAULT 0,
            connects BIGINT NOT NULL DEFAULT 0,
            denied_connects BIGINT NOT NULL DEFAULT 0,
            quota_refusals BIGINT NOT NULL DEFAULT 0,
            socket_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
            PRIMARY KEY (node, app, minute)
        )""",
        # `tether usage` reads a period of every app: by minute first.
        f"CREATE INDEX IF NOT EXISTS {index} ON {usage} (minute, app)",
        f"""CREATE TABLE IF NOT EXISTS {runs} (
            node TEXT NOT NULL,
            run TEXT NOT NULL,
            seq BIGINT NOT NULL,
            started DOUBLE PRECISION NOT NULL,
            flushed DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (node, run)
        )""",
    ]


def _claim_sql(runs: str) -> str:
    # RETURNING gives a row only when the run's seq moved: the batch is new.
    return (
        f"INSERT INTO {runs} AS r (node, run, seq, started, flushed) "
        "VALUES (:node, :run, :seq, :started, :flushed) "
        "ON CONFLICT (node, run) DO UPDATE SET seq = excluded.seq, flushed = excluded.flushed "
        "WHERE r.seq < excluded.seq RETURNING seq"
    )


_ADD = ", ".join(f"{c} = u.{c} + excluded.{c}" for c in COLUMNS)


def _totals_sql(usage: str, by: str | None, where: list[str]) -> str:
    sums = ", ".join(f"SUM({c})" for c in COLUMNS)
    if by is None:
        period, group = "NULL", "app"
    else:
        seconds = BUCKETS[by]
        period, group = f"minute - minute % {seconds}", "app, period"
    condition = f"WHERE {' AND '.join(where)} " if where else ""
    return (
        f"SELECT app, {period} AS period, {sums} FROM {usage} {condition}"
        f"GROUP BY {group} ORDER BY {'period, app' if by else 'app'}"
    )


def _conditions(
    since: int | None, until: int | None, app: str | None, node: str | None
) -> tuple[list[str], dict[str, Any]]:
    where: list[str] = []
    params: dict[str, Any] = {}
    for name, value, test in (
        ("since", since, "minute >= :since"),
        ("until", until, "minute < :until"),
        ("app", app, "app = :app"),
        ("node", node, "node = :node"),
    ):
        if value is not None:
            where.append(test)
            params[name] = value
    return where, params


def _total(row: Sequence[Any]) -> Total:
    app, period, out, in_, connects, denied, quota, seconds = row
    # PostgreSQL's SUM of bigints is a numeric (Decimal); an empty SUM is NULL.
    counters = Counters(
        int(out or 0), int(in_ or 0), int(connects or 0), int(denied or 0), int(quota or 0),
        float(seconds or 0),
    )
    return Total(app, None if period is None else int(period), counters)


def _sorted_rows(batch: Batch) -> Iterator[tuple[str, int, Counters]]:
    # One order for every writer: two transactions upserting the same rows
    # in different orders could deadlock (PostgreSQL).
    for (app, minute), counters in sorted(batch.rows.items()):
        yield app, minute, counters


class Store:
    """A ledger's store: one transaction per batch, the same SQL to read totals.

    A subclass gives its driver's statement call (``_run``, named
    parameters), the errors it raises, how a transaction begins and rolls
    back, and how a batch's rows are upserted.
    """

    usage = USAGE_TABLE
    runs = RUNS_TABLE
    begin = "BEGIN"
    errors: tuple[type[BaseException], ...] = ()

    def _run(self, sql: str, params: dict[str, Any]) -> list[Sequence[Any]]:
        raise NotImplementedError

    def _add(self, batch: Batch) -> None:
        raise NotImplementedError

    def _rollback(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def apply(self, batch: Batch) -> bool:
        """Apply `batch` once: True if applied now, False if the store already had it."""
        try:
            self._run(self.begin, {})
            try:
                claimed = self._run(_claim_sql(self.runs), {
                    "node": batch.node, "run": batch.run, "seq": batch.seq,
                    "started": batch.started, "flushed": batch.sampled,
                })
                if claimed and batch.rows:
                    self._add(batch)
                self._run("COMMIT", {})
            except BaseException:
                # The connection may be gone: the ledger drops it and reconnects.
                self._rollback()
                raise
        except self.errors as exc:
            raise LedgerError(f"usage ledger {self}: writing batch {batch.seq}: {exc}") from exc
        return bool(claimed)

    def totals(
        self,
        *,
        since: int | None = None,
        until: int | None = None,
        app: str | None = None,
        node: str | None = None,
        by: str | None = None,
    ) -> list[Total]:
        """Sums per app (and per `by` period) of the minutes in [since, until)."""
        where, params = _conditions(since, until, app, node)
        try:
            rows = self._run(_totals_sql(self.usage, by, where), params)
        except self.errors as exc:
            raise LedgerError(f"usage ledger {self}: {exc}") from exc
        return [_total(row) for row in rows]


class SQLiteStore(Store):
    """A SQLite file; WAL mode, so `tether usage` reads while the gateway writes."""

    # The write lock first: two writers never deadlock upgrading a read lock.
    begin = "BEGIN IMMEDIATE"
    errors = (sqlite3.Error,)

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = str(path)
        try:
            if create:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(
                    self.path, timeout=SQLITE_BUSY_TIMEOUT, isolation_level=None,
                    check_same_thread=False,
                )
                self.db.execute("PRAGMA journal_mode=WAL")
                for statement in _schema_sql(USAGE_TABLE, RUNS_TABLE, f"{USAGE_TABLE}_minute"):
                    self.db.execute(statement)
            else:
                # A reader never creates a file where the operator mistyped a path.
                uri = f"{Path(self.path).resolve().as_uri()}?mode=ro"
                self.db = sqlite3.connect(
                    uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT, isolation_level=None,
                    check_same_thread=False,
                )
                self.db.execute(f"SELECT 1 FROM {USAGE_TABLE} LIMIT 1")
        except sqlite3.Error as exc:
            raise LedgerError(f"usage ledger {self.path}: {exc}") from exc

    def __str__(self) -> str:
        return self.path

    def _run(self, sql: str, params: dict[str, Any]) -> list[Sequence[Any]]:
        return self.db.execute(sql, params).fetchall()

    def _add(self, batch: Batch) -> None:
        self.db.executemany(
            f"INSERT INTO {USAGE_TABLE} AS u (node, app, minute, {', '.join(COLUMNS)}) "
            f"VALUES (?, ?, ?, {', '.join('?' * len(COLUMNS))}) "
            f"ON CONFLICT (node, app, minute) DO UPDATE SET {_ADD}",
            [(batch.node, app, minute, *c) for app, minute, c in _sorted_rows(batch)],
        )

    def _rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def close(self) -> None:
        self.db.close()


class PostgresStore(Store):
    """PostgreSQL through pg8000 (pure Python; the `postgres` extra), in its own schema."""

    def __init__(self, location: PostgresLocation, *, create: bool = True) -> None:
        self.location = location
        schema = f'"{location.schema}"'
        self.usage = f"{schema}.{USAGE_TABLE}"
        self.runs = f"{schema}.{RUNS_TABLE}"
        try:
            import pg8000.native  # type: ignore[import-untyped]
        except ImportError as exc:
            raise LedgerError(
                f"usage ledger {location}: PostgreSQL needs pg8000 "
                "(pip install 'tether[postgres]')"
            ) from exc
        self.errors = (pg8000.native.Error, OSError)
        try:
            self.db = pg8000.native.Connection(
                location.user, host=location.host, port=location.port,
                database=location.database, password=location.password, timeout=PG_TIMEOUT,
                application_name="tether-usage",
            )
        except self.errors as exc:
            raise LedgerError(f"usage ledger {location}: cannot connect: {exc}") from exc
        try:
            if create:
                self._create(schema)
            else:
                self.db.run(f"SELECT 1 FROM {self.usage} LIMIT 1")
        except self.errors as exc:
            self.close()
            raise LedgerError(f"usage ledger {location}: {exc}") from exc

    def _create(self, schema: str) -> None:
        # Tables a DBA made beforehand are used as they are: CREATE ... IF NOT
        # EXISTS still needs the CREATE privilege, which a writer need not have.
        (exists,) = self.db.run(
            "SELECT to_regclass(:usage) IS NOT NULL AND to_regclass(:runs) IS NOT NULL",
            usage=self.usage, runs=self.runs,
        )[0]
        if exists:
            return
        # Two gateways creating the tables at once can collide in the
        # catalogue (a unique violation); one transaction each, and the
        # loser's retry finds them made.
        for attempt in (1, 2):
            try:
                self.db.run("BEGIN")
                self.db.run(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                for statement in _schema_sql(self.usage, self.runs, f"{USAGE_TABLE}_minute"):
                    self.db.run(statement)
                self.db.run("COMMIT")
                return
            except self.errors:
                self.db.run("ROLLBACK")
                if attempt == 2:
                    raise

    def __str__(self) -> str:
        return str(self.location)

    def _run(self, sql: str, params: dict[str, Any]) -> list[Sequence[Any]]:
        rows: list[Sequence[Any]] | None = self.db.run(sql, **params)
        return rows or []

    def _add(self, batch: Batch) -> None:
        rows = list(_sorted_rows(batch))
        # One statement for the whole batch: an array per column.
        arrays = {c: [r[2][i] for r in rows] for i, c in enumerate(COLUMNS)}
        casts = ", ".join(f"CAST(:{c} AS {_PG_TYPES[c]}[])" for c in COLUMNS)
        self.db.run(
            f"INSERT INTO {self.usage} AS u (node, app, minute, {', '.join(COLUMNS)}) "
            f"SELECT :node, * FROM unnest(CAST(:apps AS text[]), CAST(:minutes AS bigint[]), "
            f"{casts}) ON CONFLICT (node, app, minute) DO UPDATE SET {_ADD}",
            node=batch.node, apps=[r[0] for r in rows], minutes=[r[1] for r in rows], **arrays,
        )

    def _rollback(self) -> None:
        with contextlib.suppress(*self.errors):
            self.db.run("ROLLBACK")

    def close(self) -> None:
        with contextlib.suppress(*self.errors):
            self.db.close()


def open_store(location: PostgresLocation | str, *, create: bool = True) -> Store:
    """The store at `location` (a PostgresLocation or a SQLite path); LedgerError if it fails.

    With `create` (the gateway) the file, schema and tables are made on
    first use; without (``tether usage``) a missing ledger is an error.
    """
    if isinstance(location, PostgresLocation):
        return PostgresStore(location, create=create)
    return SQLiteStore(location, create=create)
