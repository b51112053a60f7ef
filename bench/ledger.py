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
  flush interval can carry;
- with ``--connrate N``: the connection rate (connect through a real
  ``tether serve``, read the target's first byte, close; N in a row) of a
  gateway without ``[usage]`` and of one with a SQLite ledger flushed every
  second, alternated --ab-reps times, medians compared.

Nothing is on the relay's per-chunk path: the relay's counters are the ones
metering always kept.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import tempfile
import threading
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


def _greet_server() -> tuple[socket.socket, int]:
    """A loopback target that sends one byte on accept and closes (a thread)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the run is over
            with conn:
                conn.sendall(b"x")

    threading.Thread(target=serve, daemon=True).start()
    return listener, listener.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connrate(workdir: Path, port: int, count: int, ledger: bool) -> tuple[float, float]:
    """(connections per second, the gateway's CPU µs per connection) through a fresh
    `tether serve`, with or without a ledger. The CPU is what a loaded machine
    disturbs least: the rate there is mostly the other processes'."""
    from tether.client import control
    from tether.client import settings as client_settings
    from tether.devmode import GatewayProcess
    from tether.endpoint import parse_endpoint
    from tether.socket import create_connection

    usage = f'\n[usage]\npath = "{workdir / "usage.sqlite3"}"\nflush_interval = 1\n'
    config = workdir / "tether.toml"
    config.write_text(
        f'[gateway]\naudit_log = "{workdir / "audit.log"}"\n\n[resolver]\nmode = "static"\n\n'
        f'[policy]\nallow = ["127.0.0.1:{port}"]\n\n[apps.bench]\nkey = "bench-key"\n'
        + (usage if ledger else "")
    )
    gateway = GatewayProcess(config)
    address = gateway.start()
    client_settings.configure(
        client_settings.Settings(gateway=parse_endpoint(address), app="bench", key="bench-key")
    )
    try:
        for _ in range(50):  # warm-up
            with create_connection(("127.0.0.1", port), timeout=10) as s:
                s.recv(1)
        assert gateway.proc is not None
        cpu = _cpu_seconds(gateway.proc.pid)
        start = time.perf_counter()
        for _ in range(count):
            with create_connection(("127.0.0.1", port), timeout=10) as s:
                s.recv(1)
        rate = count / (time.perf_counter() - start)
        time.sleep(1.5)  # the closes, and a ledger flush or two, are the gateway's cost too
        return rate, (_cpu_seconds(gateway.proc.pid) - cpu) / count * 1e6
    finally:
        control.close_all()
        client_settings.configure(None)
        gateway.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__)
    parser.add_argument("--sockets", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--apps", type=int, nargs="+", default=[10, 100, 1_000])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--postgres", metavar="URL",
                        help="also write to this PostgreSQL (a schema made and dropped)")
    parser.add_argument("--connrate", type=int, metavar="N",
                        help="also: connection rate without and with a ledger, N connections")
    parser.add_argument("--ab-reps", type=int, default=3, help="alternations for --connrate")
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
    if args.connrate:
        listener, port = _greet_server()
        rates: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        try:
            for _ in range(args.ab_reps):
                for ledger in (False, True):
                    with tempfile.TemporaryDirectory() as tmp:
                        rates[ledger].append(connrate(Path(tmp), port, args.connrate, ledger))
        finally:
            listener.close()
        for ledger, label in ((False, "no ledger"), (True, "SQLite ledger, 1 s flushes")):
            runs = rates[ledger]
            rate = statistics.median(r for r, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            print(f"connrate {label:<27} {rate:7.0f} conn/s, gateway CPU {cpu:5.0f} us/conn "
                  f"(medians of {', '.join(f'{r:.0f}/{c:.0f}' for r, c in runs)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
