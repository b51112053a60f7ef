"""Where a ledger lives: a SQLite file path or a ``postgresql://`` URL.

Parsed here once for the config (``[usage] path``/``url``) and the command
line (``tether usage --ledger``), with only the standard library, so
``tether.config`` can import it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

__all__ = ["DEFAULT_SCHEMA", "PostgresLocation", "check_schema", "parse_location", "parse_url"]

POSTGRES_SCHEMES = ("postgresql", "postgres")
# libpq's defaults for what a URL leaves out.
DEFAULT_PG_HOST = "localhost"
DEFAULT_PG_PORT = 5432
DEFAULT_SCHEMA = "public"
# A plain SQL identifier: schemas are written into statements (quoted), so
# nothing else is accepted.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


@dataclass(frozen=True)
class PostgresLocation:
    host: str
    port: int
    database: str
    user: str
    # Never in a repr or a log line.
    password: str | None = field(default=None, repr=False)
    schema: str = DEFAULT_SCHEMA

    def __str__(self) -> str:
        where = f"{self.user}@{self.host}:{self.port}/{self.database}"
        return f"postgresql://{where} (schema {self.schema})"


def parse_url(url: str, schema: str = DEFAULT_SCHEMA) -> PostgresLocation:
    """A ``postgresql://[user[:password]@]host[:port]/database`` URL; ValueError if not one.

    The password may also come from ``PGPASSWORD``, the user from ``PGUSER``
    (libpq's variables), so neither need be written in a config file.
    """
    parts = urlsplit(url)
    if parts.scheme not in POSTGRES_SCHEMES:
        raise ValueError(f"{_redacted(url)!r} is not a postgresql://host[:port]/database URL")
    try:
        port = parts.port or DEFAULT_PG_PORT
    except ValueError as exc:
        raise ValueError(f"{_redacted(url)!r}: the port is not a number from 1 to 65535") from exc
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ValueError(f"{_redacted(url)!r} names no database (postgresql://host/DATABASE)")
    if parts.query or parts.fragment:
        raise ValueError(f"{_redacted(url)!r}: query parameters are not supported")
    user = unquote(parts.username) if parts.username else os.environ.get("PGUSER", "postgres")
    password = unquote(parts.password) if parts.password else os.environ.get("PGPASSWORD")
    return PostgresLocation(
        host=parts.hostname or DEFAULT_PG_HOST, port=port, database=database, user=user,
        password=password, schema=check_schema(schema),
    )


def check_schema(schema: str) -> str:
    if not _IDENTIFIER.fullmatch(schema):
        raise ValueError(
            f"{schema!r} is not a plain SQL name (letters, digits and _, not starting with a digit)"
        )
    return schema


def parse_location(text: str, schema: str = DEFAULT_SCHEMA) -> PostgresLocation | str:
    """A ``postgresql://`` URL as a PostgresLocation, anything else as a SQLite file path."""
    if urlsplit(text).scheme in POSTGRES_SCHEMES:
        return parse_url(text, schema)
    if not text:
        raise ValueError("an empty ledger path")
    return text


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)
