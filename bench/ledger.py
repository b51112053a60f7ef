"""The usage ledger's cost: one sample on the event loop, one batch written off it.

``python -m bench.ledger`` prints, for a registry of N live sockets spread
over A apps (the gateway's own Registry and SocketRecords):

- sample: what ``Ledger.sample()`` takes on the event loop every
  ``[usage] flush_interval`` (a pass over the live sockets, a delta per app),
  the best of --reps;
- write: what one batch of A rows takes to apply in SQLite (a file in a
  temporary directory) and, with ``--postgres URL``, in PostgreSQL (in a
  schema made for the run and dropped after). Writes happen on the ledger's
  own thread, so they cost the loop nothing; they bound how many apps one
  flush interval can carry.

Nothing is on the relay's per-chunk path: the relay's counters are the ones
metering always kept.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from tether.gateway.core.registry import Registry
from tether.usage.ledger import Ledger
from tether.usage.location import parse_url
from tether.usage.model import Batch, Counters
from tether.usage.store import SQLiteStore, Store, open_store


def _registry(sockets: int, apps: int) -> Registry:
    registry = Registry(time.monotonic)
    for i in range(sockets):
        record = registry.add(f"app{i % apps}", ("127.0.0.1", 9), ("127.0.0.1", 1), "tcp", 600.0)
        record.bytes_out = i
    return registry


def sample_ms(sockets: int, apps: int, reps: int) -> float:
    registry = _registry(sockets, apps)
    ledger = Ledger(lambda: SQLiteStore(":memory:"), registry, flush_interval=5.0,
                    max_pending_rows=10**9)
    times = []
    for _ in range(reps):
        for record in registry:
            record.bytes_out += 1  # every app changed: a row each
        start = time.perf_counter()
        ledger.sample()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def write_ms(store: Store, apps: int, reps: int) -> float:
    run = secrets.token_hex(4)
    times = []
    for seq in range(1, reps + 1):
        rows = {
            (f"app{a}", 1_796_428_800 + 60 * seq): Counters(1000 + a, 2000, 3, 0, 0, 1.5)
            for a in range(apps)
        }
        batch = Batch("bench", run, seq, 0.0, 0.0, rows)
        start = time.perf_counter()
        store.apply(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__)
    parser.add_argument("--sockets", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--apps", type=int, nargs="+", default=[10, 100, 1_000])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--postgres", metavar="URL",
                        help="also write to this PostgreSQL (a schema made and dropped)")
    args = parser.parse_args(argv)
    for sockets in args.sockets:
        for apps in args.apps:
            ms = sample_ms(sockets, apps, args.reps)
            print(f"sample  {sockets:>6} live sockets, {apps:>5} apps: {ms:7.2f} ms on the loop")
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SQLiteStore(Path(tmp) / "usage.sqlite3")
        try:
            for apps in args.apps:
                ms = write_ms(sqlite, apps, args.reps)
                print(f"write   SQLite,     {apps:>5} rows a batch: {ms:7.2f} ms (median)")
        finally:
            sqlite.close()
    if args.postgres:
        schema = f"ledger_bench_{secrets.token_hex(4)}"
        pg = open_store(parse_url(args.postgres, schema))
        try:
            for apps in args.apps:
                ms = write_ms(pg, apps, args.reps)
                print(f"write   PostgreSQL, {apps:>5} rows a batch: {ms:7.2f} ms (median)")
        finally:
            pg.db.run(f'DROP SCHEMA "{schema}" CASCADE')  # type: ignore[attr-defined]
            pg.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
