"""The policy as the gateway applies it: per-app rules, report mode, the audit log."""

from __future__ import annotations

import json
import socket as std
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import gateway_config

import tether.socket as ts
from tether.client import settings as client_settings
from tether.devmode import GatewayProcess
from tether.endpoint import parse_endpoint

KEY = "k-policy"


@pytest.fixture
def ports() -> Iterator[list[int]]:
    """Three stdlib servers that greet and close (targets, not tethered)."""
    servers = [std.create_server(("127.0.0.1", 0)) for _ in range(3)]
    stop = threading.Event()

    def serve(srv: std.socket) -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(b"hi")

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in servers]
    for t in threads:
        t.start()
    yield [s.getsockname()[1] for s in servers]
    stop.set()
    for t in threads:
        t.join(5)
    for s in servers:
        s.close()


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
    text = gateway_config(KEY, allow=[f"127.0.0.1:{a}"], extra=extra)
    text = text.replace("[gateway]\n", f'[gateway]\naudit_log = "{tmp_path / "audit.jsonl"}"\n')
    (tmp_path / "t.toml").write_text(text)
    gw = GatewayProcess(tmp_path / "t.toml")
    gw.start()
    yield gw
    gw.stop()
    client_settings.configure(None)


def as_app(gw: GatewayProcess, app: str, key: str) -> None:
    client_settings.configure(
        client_settings.Settings(gateway=parse_endpoint(gw.address), app=app, key=key)
    )


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
