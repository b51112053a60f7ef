"""The ledger in a real `tether serve` process: SIGTERM's final flush, SIGKILL's loss bound,
and `tether usage` checked against the audit log's close lines.

Each runs once with a SQLite ledger and once with the machine's PostgreSQL
(a schema of the test's own, dropped afterwards).
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import APP, Gateway, gateway_config, recv_exact, start_gateway, tether_cli, use_gateway
from support import wait_for as wait_until
from udpsupport import UdpPeer

import tether
import tether.socket as ts
from tether.usage.location import PostgresLocation, parse_url
from tether.usage.model import Counters
from tether.usage.store import LedgerError, open_store

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_section(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The config's [usage] section for this run's store (flush interval added by the test)."""
    if request.param == "sqlite":
        yield f'[usage]\npath = "{tmp_path / "usage.sqlite3"}"\n'
        return
    from support import require_service

    require_service(5432, "PostgreSQL")
    schema = f"ledger_test_{secrets.token_hex(4)}"
    yield f'[usage]\nurl = "{PG_URL}"\nschema = "{schema}"\n'
    import pg8000.native

    db = pg8000.native.Connection("postgres", host="127.0.0.1", port=5432, database="test")
    try:
        db.run(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        db.close()


def location_of(section: str, tmp_path: Path) -> PostgresLocation | str:
    if "url =" in section:
        schema = section.split('schema = "')[1].split('"', maxsplit=1)[0]
        return parse_url(PG_URL, schema)
    return str(tmp_path / "usage.sqlite3")


def start(
    tmp_path: Path, section: str, interval: float, echo_port: int, udp_port: int = 9
) -> tuple[Gateway, Path]:
    key = secrets.token_urlsafe(12)
    audit = tmp_path / "audit.jsonl"
    text = gateway_config(
        key,
        # Only the echo servers: a connect anywhere else is denied (and counted).
        allow=[f"127.0.0.1:{echo_port}", f"127.0.0.1:{udp_port}/udp"],
        gateway=f'audit_log = "{audit}"',
        # App "other" is switched off: its connects are quota refusals.
        extra=f"\n{section}flush_interval = {interval}\n\n[apps.other.quota]\nenabled = false\n",
    )
    gw = start_gateway(tmp_path, text, key)
    use_gateway(gw.address, APP, key)
    return gw, audit


def exchange(echo_port: int, sizes: list[int]) -> int:
    """One socket per size: send that many bytes, read them back, close. Returns the sum."""
    for size in sizes:
        sock = ts.create_connection(("127.0.0.1", echo_port), timeout=10)
        try:
            data = os.urandom(size)
            sock.sendall(data)
            assert recv_exact(sock, size) == data
        finally:
            sock.close()
    return sum(sizes)


def ledger_totals(location: PostgresLocation | str, app: str = APP) -> Counters | None:
    try:
        store = open_store(location, create=False)
    except LedgerError:
        return None  # not created yet
    try:
        totals = store.totals(app=app)
    finally:
        store.close()
    return totals[0].counters if totals else None


def close_lines(audit: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in audit.read_text().splitlines() if line]
    return [line for line in lines if line["event"] == "close" and line["app"] == APP]


def test_sigterm_flushes_and_tether_usage_agrees_with_the_audit_log(
    tmp_path: Path, ledger_section: str, echo_port: int
) -> None:
    peer = UdpPeer()
    # 60 s: no periodic flush is due during the test (at most one, at a
    # minute boundary); what the ledger holds at the end is the final flush's.
    gw, audit = start(tmp_path, ledger_section, 60, echo_port, peer.port)
    sizes = [1, 1000, 65_536, 300_000, 7]
    datagrams = [b"x" * 512, b"y" * 1200, b"z"]
    try:
        sent = exchange(echo_port, sizes)
        with ts.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(10)
            for datagram in datagrams:
                udp.sendto(datagram, ("127.0.0.1", peer.port))
                assert udp.recvfrom(4096)[0] == datagram
        sent += sum(map(len, datagrams))
        with pytest.raises(tether.PolicyDenied):
            ts.create_connection(("127.0.0.1", 1), timeout=10)
        use_gateway(gw.address, "other", f"other-{gw.key}")
        with pytest.raises(tether.QuotaExceeded):
            ts.create_connection(("127.0.0.1", echo_port), timeout=10)
        # Every socket is closed at the gateway (its close line) before SIGTERM.
        assert wait_until(lambda: _closed(audit) == len(sizes) + 1)
    finally:
        peer.close()
        assert gw.process.stop() == 0  # SIGTERM
    assert "usage ledger: final flush written" in gw.log_text()
    closes = close_lines(audit)
    assert len(closes) == len(sizes) + 1
    assert [line["transport"] for line in closes].count("udp") == 1
    audit_out = sum(line["bytes_out"] for line in closes)
    audit_in = sum(line["bytes_in"] for line in closes)
    assert audit_out == audit_in == sent
    location = location_of(ledger_section, tmp_path)
    got = ledger_totals(location)
    assert got is not None
    assert (got.bytes_out, got.bytes_in, got.connects, got.denied_connects) == (
        audit_out, audit_in, len(closes), 1,
    )
    assert ledger_totals(location, "other") == Counters(quota_refusals=1)
    # The close lines round each duration to the microsecond.
    assert got.socket_seconds == pytest.approx(
        sum(line["duration_s"] for line in closes), abs=1e-6 * len(closes)
    )

    # `tether usage` in each format, from the same config file.
    config = str(gw.config_path)
    result = tether_cli("usage", "--config", config, "--app", APP, "--json")
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert (row["app"], row["bytes_out"], row["bytes_in"], row["connects"]) == (
        APP, audit_out, audit_in, len(closes),
    )
    assert row["denied_connects"] == 1 and row["quota_refusals"] == 0

    result = tether_cli("usage", "--config", config, "--by", "minute", "--csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert sum(int(r["bytes_out"]) for r in rows if r["app"] == APP) == audit_out
    assert all(r["period"].endswith("Z") for r in rows)

    result = tether_cli("usage", "--config", config, "--since", "1h")
    assert result.returncode == 0, result.stderr
    header, *body = result.stdout.splitlines()
    assert header.split() == ["APP", "BYTES_OUT", "BYTES_IN", "CONNECTS", "DENIED",
                              "QUOTA_REFUSED", "SOCKET_SECONDS"]
    (line,) = [b for b in body if b.split()[0] == APP]
    assert line.split()[1:5] == [str(audit_out), str(audit_in), str(len(closes)), "1"]
    (other,) = [b for b in body if b.split()[0] == "other"]
    assert other.split()[1:6] == ["0", "0", "0", "0", "1"]


def _closed(audit: Path) -> int:
    return len(close_lines(audit)) if audit.exists() else 0


def test_sigkill_loses_at_most_what_came_after_the_last_flush(
    tmp_path: Path, ledger_section: str, echo_port: int
) -> None:
    gw, audit = start(tmp_path, ledger_section, 0.5, echo_port)
    location = location_of(ledger_section, tmp_path)
    proc = gw.process.proc
    assert proc is not None
    try:
        # Flushed while the gateway runs, with no shutdown to help.
        first = exchange(echo_port, [50_000, 20_000])
        assert wait_until(lambda: (ledger_totals(location) or Counters()).bytes_out == first,
                          timeout=30), gw.log_text()
        # The ledger counts live sockets too: wait for the gateway's close
        # lines as well, so the kill below cannot catch them unwritten.
        assert wait_until(lambda: _closed(audit) == 2)
        # Then more on a socket still open, counted by the gateway (echoed
        # back), and the process killed: no final flush, no close line.
        sock = ts.create_connection(("127.0.0.1", echo_port), timeout=10)
        later = 400_000
        data = os.urandom(later)
        sock.sendall(data)
        assert recv_exact(sock, later) == data
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        sock.close()
    finally:
        gw.process.stop()
    got = ledger_totals(location)
    assert got is not None
    # Everything flushed before the kill is there; nothing is counted twice or
    # invented; the loss is at most what was carried after the last flush.
    assert first <= got.bytes_out <= first + later
    assert first <= got.bytes_in <= first + later
    assert "final flush" not in gw.log_text()
    assert sum(line["bytes_out"] for line in close_lines(audit)) == first
