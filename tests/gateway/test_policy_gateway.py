"""The policy as the gateway applies it: per-app rules, report mode, the audit log."""

from __future__ import annotations

import contextlib
import json
import socket as std
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import gateway_config, start_gateway, use_gateway
from tcpservers import Server

import tether.socket as ts
from tether.client import settings as client_settings
from tether.devmode import GatewayProcess

KEY = "k-policy"


def greet(server: Server, conn: std.socket) -> None:
    conn.sendall(b"hi")


@pytest.fixture
def ports() -> Iterator[list[int]]:
    """Three stdlib servers that greet and close (targets, not tethered)."""
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(Server(greet)) for _ in range(3)]
        yield [s.port for s in servers]


@pytest.fixture
def policy_gateway(tmp_path: Path, ports: list[int]) -> Iterator[GatewayProcess]:
    a, b, _c = ports
    extra = f"""
[apps.tests.policy]
allow = ["127.0.0.1:{b}"]

[apps.other.policy]
mode = "report"

[apps.audited]
key = "audited-{KEY}"
"""
    text = gateway_config(
        KEY,
        allow=[f"127.0.0.1:{a}"],
        extra=extra,
        gateway=f'audit_log = "{tmp_path / "audit.jsonl"}"',
    )
    gw = start_gateway(tmp_path, text, KEY).process
    yield gw
    gw.stop()
    client_settings.configure(None)


def as_app(gw: GatewayProcess, app: str, key: str) -> None:
    use_gateway(gw.address, app, key)


def connect(port: int) -> bytes:
    with ts.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.recv(2)


def audit_lines(path: Path, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 5
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line]
            if len(lines) >= count:
                break
        time.sleep(0.05)
    return lines


def test_per_app_rules(policy_gateway: GatewayProcess, ports: list[int]) -> None:
    a, b, c = ports
    as_app(policy_gateway, "tests", KEY)
    assert connect(a) == b"hi"  # global rule
    assert connect(b) == b"hi"  # this app's own rule
    with pytest.raises(PermissionError, match=f"127.0.0.1:{c}"):
        connect(c)
    as_app(policy_gateway, "audited", f"audited-{KEY}")
    assert connect(a) == b"hi"
    with pytest.raises(PermissionError, match="loopback"):
        connect(b)  # tests' rule does not apply to another app


def test_report_mode_allows_and_logs(
    policy_gateway: GatewayProcess, ports: list[int], tmp_path: Path
) -> None:
    _a, _b, c = ports
    as_app(policy_gateway, "other", f"other-{KEY}")
    assert connect(c) == b"hi"  # enforce would deny it; report mode lets it through
    lines = audit_lines(tmp_path / "audit.jsonl", 2)
    decision = next(line for line in lines if line["event"] == "decision")
    assert decision["app"] == "other"
    assert decision["would_deny"] is True
    assert decision["mode"] == "report"
    assert decision["outcome"] == "connected"
    assert "loopback" in str(decision["reason"])


def test_audit_lines_for_decision_and_close(
    policy_gateway: GatewayProcess, ports: list[int], tmp_path: Path
) -> None:
    a, _b, c = ports
    as_app(policy_gateway, "tests", KEY)
    assert connect(a) == b"hi"
    with pytest.raises(PermissionError):
        connect(c)
    lines = audit_lines(tmp_path / "audit.jsonl", 3)
    events = [(line["event"], line.get("outcome")) for line in lines]
    assert ("decision", "connected") in events
    assert ("decision", "denied") in events
    assert ("close", None) in events
    connected = next(line for line in lines if line.get("outcome") == "connected")
    closed = next(line for line in lines if line["event"] == "close")
    assert connected["chosen"] == f"127.0.0.1:{a}"
    assert connected["descriptor"] == closed["descriptor"]
    assert closed["bytes_in"] == 2 and closed["bytes_out"] == 0
    assert closed["app"] == "tests"
    assert isinstance(closed["duration_s"], float)
    denied = next(line for line in lines if line.get("outcome") == "denied")
    assert denied["port"] == c and denied["verdict"] == "deny"
    assert denied["candidates"] == [
        {"address": "127.0.0.1", "verdict": "deny", "reason": denied["reason"],
         "rule": denied["rule"]}
    ]
