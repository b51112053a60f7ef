"""``[usage]``: where the usage ledger is written and how often.

Parsed here and hooked into :func:`tether.config.parse_config`; absent, the
gateway keeps no ledger (``Config.usage`` is None). Every problem is a
:class:`~tether.errors.ConfigError` naming ``usage.KEY``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.errors import ConfigError
from tether.usage.location import DEFAULT_SCHEMA, PostgresLocation, check_schema, parse_url

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_MAX_PENDING_ROWS",
    "DEFAULT_PATH",
    "UsageConfig",
    "parse_usage",
]

# The issue asks for a flush "every few seconds". 5 s bounds what a SIGKILL
# loses to 5 s of counts; it is one small transaction per gateway per 5 s
# (100 gateways: 20 a second on a shared PostgreSQL); and it divides 60, so
# the ticks fall on minute boundaries.
DEFAULT_FLUSH_INTERVAL = 5.0
# Rows held in memory while the store is failing: one per app per minute, so
# 100 busy apps keep ~16 hours, at ~200 bytes a row ~20 MB at most.
DEFAULT_MAX_PENDING_ROWS = 100_000
# `[usage]` with neither path nor url: this file in the working directory.
DEFAULT_PATH = "usage.sqlite3"
KEYS = {"path", "url", "schema", "flush_interval", "max_pending_rows"}


@dataclass(frozen=True)
class UsageConfig:
    """What ``[usage]`` says (docs/usage.md, docs/configuration.md)."""

    # A SQLite file path (absolute: a relative one is resolved against the
    # working directory) or a PostgreSQL location (its password never in a repr).
    location: PostgresLocation | str
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    max_pending_rows: int = DEFAULT_MAX_PENDING_ROWS


def parse_usage(table: Any) -> UsageConfig | None:
    """``[usage]`` (the table or None) as a UsageConfig; ConfigError naming the key."""
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise ConfigError("usage", "must be a table")
    for key in table:
        if key not in KEYS:
            raise ConfigError(f"usage.{key}", f"unknown setting (known: {', '.join(sorted(KEYS))})")
    path, url = table.get("path"), table.get("url")
    if path is not None and url is not None:
        raise ConfigError(
            "usage.url", "give either path (a SQLite file) or url (PostgreSQL), not both"
        )
    schema = table.get("schema")
    location: PostgresLocation | str
    if url is not None:
        if not isinstance(url, str):
            raise ConfigError("usage.url", "must be a postgresql://[user@]host[:port]/database URL")
        if schema is not None and not isinstance(schema, str):
            raise ConfigError("usage.schema", "must be a string")
        try:
            check_schema(schema or DEFAULT_SCHEMA)
        except ValueError as exc:
            raise ConfigError("usage.schema", str(exc)) from exc
        try:
            location = parse_url(url, schema or DEFAULT_SCHEMA)
        except ValueError as exc:
            raise ConfigError("usage.url", str(exc)) from exc
    else:
        if schema is not None:
            raise ConfigError("usage.schema", "only used with usage.url (PostgreSQL)")
        if path is not None and (not isinstance(path, str) or not path):
            raise ConfigError("usage.path", "must be a file path")
        # Relative to the working directory, like gateway.audit_log (and so
        # the same for a development gateway, whose config is a temporary copy).
        location = str(Path.cwd() / (path or DEFAULT_PATH))
    interval = table.get("flush_interval", DEFAULT_FLUSH_INTERVAL)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not (
        0 < interval <= 60
    ):
        # Past a minute, a sample spans minutes and cannot say which one.
        raise ConfigError("usage.flush_interval", "must be a number of seconds above 0, at most 60")
    pending = table.get("max_pending_rows", DEFAULT_MAX_PENDING_ROWS)
    if isinstance(pending, bool) or not isinstance(pending, int) or pending < 1:
        raise ConfigError("usage.max_pending_rows", "must be a whole number, 1 or more")
    return UsageConfig(location=location, flush_interval=float(interval), max_pending_rows=pending)
