"""`[usage]` parsing and `tether usage`'s pure parts: times, formats, argument errors."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import pytest

from tether.cli.main import build_parser
from tether.cli.usage import parse_time, render
from tether.cli.usage import run as usage_run
from tether.config import parse_config
from tether.errors import ConfigError
from tether.usage.config import DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_PENDING_ROWS
from tether.usage.location import PostgresLocation
from tether.usage.model import Batch, Counters
from tether.usage.store import SQLiteStore, Total

NOW = 1_796_472_000.0  # 2026-12-05T12:00:00Z

# -- [usage] --------------------------------------------------------------------------


def test_no_usage_section_means_no_ledger() -> None:
    assert parse_config({}).usage is None


def test_defaults_a_sqlite_file_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    usage = parse_config({"usage": {}}, source="/etc/tether/tether.toml").usage
    assert usage is not None
    assert usage.location == str(tmp_path / "usage.sqlite3")
    assert usage.flush_interval == DEFAULT_FLUSH_INTERVAL == 5.0
    assert usage.max_pending_rows == DEFAULT_MAX_PENDING_ROWS


def test_a_relative_path_is_the_working_directorys_like_audit_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As gateway.audit_log: the same for a development gateway, whose config
    # is a temporary copy somewhere else.
    monkeypatch.chdir(tmp_path)
    usage = parse_config(
        {"usage": {"path": "var/u.db", "flush_interval": 2}}, source="/tmp/tether-dev-x.toml"
    ).usage
    assert usage is not None
    assert usage.location == str(tmp_path / "var" / "u.db")
    assert usage.flush_interval == 2.0
    absolute = parse_config({"usage": {"path": "/srv/usage.db"}}).usage
    assert absolute is not None and absolute.location == "/srv/usage.db"


def test_a_postgresql_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    usage = parse_config(
        {"usage": {"url": "postgresql://bill:s%40cret@db.test:6543/acct", "schema": "billing"}}
    ).usage
    assert usage is not None
    loc = usage.location
    assert isinstance(loc, PostgresLocation)
    assert (loc.user, loc.password, loc.host, loc.port, loc.database, loc.schema) == (
        "bill", "s@cret", "db.test", 6543, "acct", "billing",
    )
    # The password is in no repr and no log line.
    assert "cret" not in repr(usage) and "cret" not in str(loc)


def test_the_password_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASSWORD", "from-env")
    usage = parse_config({"usage": {"url": "postgresql://127.0.0.1/test"}}).usage
    assert usage is not None
    assert isinstance(usage.location, PostgresLocation)
    assert usage.location.password == "from-env"
    assert usage.location.schema == "public"


BAD = [
    ({"usage": []}, "usage", "must be a table"),
    ({"usage": {"paht": "x"}}, "usage.paht", "unknown setting"),
    ({"usage": {"path": "a", "url": "postgresql://h/d"}}, "usage.url", "not both"),
    ({"usage": {"path": ""}}, "usage.path", "must be a file path"),
    ({"usage": {"path": 3}}, "usage.path", "must be a file path"),
    ({"usage": {"url": "mysql://h/d"}}, "usage.url", "is not a postgresql://"),
    ({"usage": {"url": "postgresql://h"}}, "usage.url", "names no database"),
    ({"usage": {"url": "postgresql://h:99999/d"}}, "usage.url", "port"),
    ({"usage": {"url": "postgresql://u:pw@h/d?sslmode=x"}}, "usage.url", "not supported"),
    ({"usage": {"url": 5}}, "usage.url", "must be a postgresql://"),
    ({"usage": {"url": "postgresql://h/d", "schema": "a-b"}}, "usage.schema", "plain SQL name"),
    ({"usage": {"url": "postgresql://h/d", "schema": 1}}, "usage.schema", "must be a string"),
    ({"usage": {"schema": "s"}}, "usage.schema", "only used with usage.url"),
    ({"usage": {"flush_interval": 0}}, "usage.flush_interval", "above 0, at most 60"),
    ({"usage": {"flush_interval": 61}}, "usage.flush_interval", "above 0, at most 60"),
    ({"usage": {"flush_interval": True}}, "usage.flush_interval", "above 0"),
    ({"usage": {"max_pending_rows": 0}}, "usage.max_pending_rows", "1 or more"),
    ({"usage": {"max_pending_rows": 1.5}}, "usage.max_pending_rows", "1 or more"),
]


@pytest.mark.parametrize(("data", "path", "message"), BAD)
def test_bad_usage_settings_name_their_key(data: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.path == path
    assert message in info.value.message


def test_a_bad_url_never_shows_its_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"usage": {"url": "postgresql://u:hunter2@h:99999/d"}})
    assert "hunter2" not in str(info.value)


# -- times --------------------------------------------------------------------------------

TIMES = [
    ("90s", NOW - 90),
    ("15m", NOW - 900),
    ("2h", NOW - 7200),
    ("1d", NOW - 86_400),
    ("1w", NOW - 604_800),
    ("now", NOW),
    ("today", 1_796_428_800.0),
    ("2026-12-05", 1_796_428_800.0),
    ("2026-12-05T10:30", 1_796_428_800.0 + 10.5 * 3600),
    ("2026-12-05T10:30Z", 1_796_428_800.0 + 10.5 * 3600),
    ("2026-12-05T10:30+01:00", 1_796_428_800.0 + 9.5 * 3600),
]


@pytest.mark.parametrize(("text", "expected"), TIMES)
def test_times_absolute_and_relative(text: str, expected: float) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "5 parsecs", "-1h", "2026-13-01", ""])
def test_a_bad_time_says_what_forms_there_are(text: str) -> None:
    with pytest.raises(ValueError, match="is not a time"):
        parse_time(text, NOW)


# -- output -------------------------------------------------------------------------------

TOTALS = [
    Total("billing", 1_796_428_800, Counters(1234, 56, 3, 1, 0, 12.3456)),
    Total("a-much-longer-app", 1_796_428_860, Counters(7, 8, 1, 0, 2, 0.5)),
]


def test_table_aligns_numbers_right() -> None:
    out = io.StringIO()
    render(TOTALS, "minute", "table", out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["APP", "PERIOD", "BYTES_OUT", "BYTES_IN", "CONNECTS", "DENIED",
                                "QUOTA_REFUSED", "SOCKET_SECONDS"]
    assert lines[1].split() == ["billing", "2026-12-05T00:00Z", "1234", "56", "3", "1", "0",
                                "12.346"]
    # Right-aligned: the last digits of BYTES_OUT share a column.
    end = lines[0].index("BYTES_OUT") + len("BYTES_OUT")
    assert lines[1][end - 4 : end] == "1234" and lines[2][end - 1 : end] == "7"


def test_json_lines_and_csv_carry_the_same_values() -> None:
    out = io.StringIO()
    render(TOTALS, "day", "json", out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows[0] == {
        "app": "billing", "period": "2026-12-05", "bytes_out": 1234, "bytes_in": 56,
        "connects": 3, "denied_connects": 1, "quota_refusals": 0, "socket_seconds": 12.346,
    }
    out = io.StringIO()
    render(TOTALS, None, "csv", out)
    lines = out.getvalue().splitlines()
    assert lines[0].split(",") == [
        "app", "bytes_out", "bytes_in", "connects", "denied_connects", "quota_refusals",
        "socket_seconds",
    ]
    assert lines[2] == "a-much-longer-app,7,8,1,0,2,0.5"


def test_an_empty_period_says_so() -> None:
    out = io.StringIO()
    render([], None, "table", out)
    assert "(no usage in the ledger for this period)" in out.getvalue()


# -- the command ----------------------------------------------------------------------------


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["usage", *argv])


def test_periods_select_whole_minutes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "u.sqlite3"
    store = SQLiteStore(path)
    minute = 1_796_428_800 + 36_000  # 10:00Z
    store.apply(Batch("n", "r", 1, NOW, NOW, {
        ("a", minute - 60): Counters(1, 0, 0, 0, 0, 0.0),
        ("a", minute): Counters(2, 0, 0, 0, 0, 0.0),
        ("a", minute + 60): Counters(4, 0, 0, 0, 0, 0.0),
    }))
    store.close()

    def out_bytes(*argv: str) -> int:
        assert usage_run(args("--ledger", str(path), "--json", *argv), now=lambda: NOW) == 0
        return sum(json.loads(line)["bytes_out"] for line in capsys.readouterr().out.splitlines())

    assert out_bytes() == 7
    # 10:00:30 still shows 10:00's row: a row is not split.
    assert out_bytes("--since", "2026-12-05T10:00:30") == 6
    assert out_bytes("--until", "2026-12-05T10:00") == 1
    assert out_bytes("--until", "2026-12-05T10:00:01") == 3
    assert out_bytes("--since", "2026-12-05T10:00", "--until", "2026-12-05T10:01") == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ledger", "x.db", "--since", "soon"], "is not a time"),
        (["--ledger", "x.db", "--since", "1h", "--until", "2h"], "--until must be after --since"),
        (["--config", "{cfg}", "--schema", "s"], "--schema goes with --ledger"),
        (["--config", "{cfg}"], "has no [usage] section"),
        (["--ledger", "postgresql://h"], "names no database"),
    ],
)
def test_usage_errors_exit_2_and_say_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    cfg = tmp_path / "tether.toml"
    cfg.write_text('[apps.a]\nkey = "k"\n')
    argv = [a.replace("{cfg}", str(cfg)) for a in argv]
    assert usage_run(args(*argv), now=lambda: NOW) == 2
    assert message in capsys.readouterr().err


def test_a_missing_ledger_exits_1_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nothing-here.sqlite3"
    assert usage_run(args("--ledger", str(path)), now=lambda: NOW) == 1
    assert "usage ledger" in capsys.readouterr().err
    assert not path.exists()
