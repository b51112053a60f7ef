"""``tether usage``: what each app used over a period, read from the usage ledger.

The ledger is the one ``[usage]`` in ``--config`` names, or ``--ledger`` (a
SQLite file or a ``postgresql://`` URL). Times are UTC. Exit status: 0,
1 when the ledger cannot be read, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from tether.errors import ConfigError
from tether.usage.location import DEFAULT_SCHEMA, PostgresLocation, parse_location
from tether.usage.model import COLUMNS, minute_of
from tether.usage.store import BUCKETS, LedgerError, Total, open_store

__all__ = ["parse_time", "register", "render", "run"]

EXIT_OK = 0
EXIT_LEDGER = 1
EXIT_USAGE = 2

_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
# The table's column headings, in Counters' order.
_HEADINGS = ("BYTES_OUT", "BYTES_IN", "CONNECTS", "DENIED", "QUOTA_REFUSED", "SOCKET_SECONDS")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "usage",
        help="usage per app over a period, from the usage ledger",
        description=(
            "Totals per app (bytes out and in, connects, denied connects, quota refusals, "
            "socket-seconds) from the gateway's usage ledger, over a period and optionally "
            "per minute, hour or day (UTC). Reads the ledger [usage] in --config names, or "
            "--ledger."
        ),
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, metavar="FILE",
                       help="the gateway's config: its [usage] ledger")
    where.add_argument("--ledger", metavar="PATH|URL",
                       help="a SQLite ledger file or a postgresql://[user@]host[:port]/db URL")
    p.add_argument("--schema", help=f"the PostgreSQL schema with --ledger URL ({DEFAULT_SCHEMA})")
    p.add_argument("--app", help="this app only")
    p.add_argument("--node", help="this gateway node only (default: all nodes added up)")
    p.add_argument("--since", metavar="TIME",
                   help="from TIME (inclusive): 2026-12-05, 2026-12-05T10:00, an ISO time with "
                   "an offset, 'today', or a time ago: 90s, 15m, 1h, 2d, 1w (default: the start)")
    p.add_argument("--until", metavar="TIME", help="up to TIME (exclusive), same forms")
    p.add_argument("--by", choices=tuple(BUCKETS), help="one row per app per minute, hour or day")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per row")
    out.add_argument("--csv", action="store_true", help="CSV with a header line")
    p.set_defaults(func=run)


def parse_time(text: str, now: float) -> float:
    """`text` as epoch seconds: an ISO date or time (UTC unless it says), 'today', or an age."""
    text = text.strip()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        return now - int(relative.group(1)) * _UNITS[relative.group(2)]
    if text == "today":
        return float(now - now % 86_400)
    if text == "now":
        return now
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: give an ISO date or time (2026-12-05, "
            "2026-12-05T10:00, 2026-12-05T10:00+01:00), 'today', 'now', or an age (15m, 2h, 1d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%MZ")


def _period_text(total: Total, by: str | None) -> str:
    if total.period is None:
        return ""
    if by == "day":
        return datetime.fromtimestamp(total.period, UTC).strftime("%Y-%m-%d")
    return _iso(total.period)


def _record(total: Total, by: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"app": total.app}
    if by is not None:
        row["period"] = _period_text(total, by)
    row.update(zip(COLUMNS, total.counters, strict=True))
    row["socket_seconds"] = round(total.counters.socket_seconds, 3)
    return row


def render(totals: list[Total], by: str | None, fmt: str, out: TextIO) -> None:
    """Print `totals` as a table, JSON lines or CSV."""
    records = [_record(t, by) for t in totals]
    if fmt == "json":
        for record in records:
            print(json.dumps(record), file=out)
        return
    keys = ["app", *(["period"] if by is not None else []), *COLUMNS]
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(keys)
        writer.writerows([record[k] for k in keys] for record in records)
        return
    headings = ["APP", *(["PERIOD"] if by is not None else []), *_HEADINGS]
    table = [headings] + [[str(record[k]) for k in keys] for record in records]
    # Names left-aligned, numbers right-aligned (so digits line up).
    text_columns = 2 if by is not None else 1
    widths = [max(len(line[i]) for line in table) for i in range(len(headings))]
    for line in table:
        cells = [
            cell.ljust(w) if i < text_columns else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)
    if not records:
        print("(no usage in the ledger for this period)", file=out)


def _location(args: argparse.Namespace) -> PostgresLocation | str:
    if args.ledger is not None:
        return parse_location(args.ledger, args.schema or DEFAULT_SCHEMA)
    if args.schema is not None:
        raise ValueError("--schema goes with --ledger URL (with --config, [usage] schema says it)")
    from tether.config import load_config

    config = load_config(args.config)
    if config.usage is None:
        raise ValueError(f"{args.config} has no [usage] section: this gateway keeps no ledger")
    return config.usage.location


def run(args: argparse.Namespace, now: Callable[[], float] | None = None) -> int:
    """Entry point for ``tether usage``."""
    current = (now or (lambda: datetime.now(UTC).timestamp()))()
    try:
        location = _location(args)
        since = parse_time(args.since, current) if args.since else None
        until = parse_time(args.until, current) if args.until else None
    except (ConfigError, ValueError) as exc:
        print(f"tether usage: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Rows are whole minutes: a minute is in the period if it starts in it
    # (--since 10:00:30 still shows 10:00's row, as the row cannot be split).
    since_minute = minute_of(since) if since is not None else None
    until_minute = minute_of(until + 59.999) if until is not None else None
    if since_minute is not None and until_minute is not None and until_minute <= since_minute:
        print("tether usage: --until must be after --since", file=sys.stderr)
        return EXIT_USAGE
    try:
        store = open_store(location, create=False)
        try:
            totals = store.totals(
                since=since_minute, until=until_minute, app=args.app, node=args.node, by=args.by
            )
        finally:
            store.close()
    except LedgerError as exc:
        print(f"tether usage: {exc}", file=sys.stderr)
        return EXIT_LEDGER
    fmt = "json" if args.json else "csv" if args.csv else "table"
    render(totals, args.by, fmt, sys.stdout)
    return EXIT_OK
