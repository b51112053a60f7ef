"""The ledger hooked into the gateway core: created from [usage], started with the core,
flushed at shutdown; socket-seconds from the core's injected clock.

The gateway runs in a thread (EmbeddedGateway) with a fake monotonic clock;
the client is ``tether.socket`` configured directly (no install()).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from support import FakeClock, client_settings_for, recv_exact, wait_for

import tether.socket as tsock
from tether.client import settings as client_settings
from tether.config import parse_config
from tether.gateway.core.gateway import GatewayCore
from tether.gateway.embedded import EmbeddedGateway
from tether.usage.ledger import Ledger
from tether.usage.store import open_store


def config(tmp_path: Path, usage: bool = True, echo_port: int = 9) -> object:
    data: dict[str, object] = {
        "gateway": {"listen": ["127.0.0.1:0"]},
        "resolver": {"mode": "static"},
        "policy": {"allow": [f"127.0.0.1:{echo_port}"]},
        "apps": {"a": {"key": "key-a"}},
    }
    if usage:
        data["usage"] = {"path": str(tmp_path / "u.sqlite3"), "flush_interval": 60}
    return parse_config(data)


def test_no_usage_section_no_ledger(tmp_path: Path) -> None:
    core = GatewayCore(config(tmp_path, usage=False))  # type: ignore[arg-type]
    assert core.ledger is None


def test_a_reload_that_changes_usage_says_it_waits_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    core = GatewayCore(config(tmp_path))  # type: ignore[arg-type]
    assert isinstance(core.ledger, Ledger)
    with caplog.at_level(logging.WARNING, logger="tether.gateway"):
        core.reload(config(tmp_path, usage=False))  # type: ignore[arg-type]
    assert "reload: [usage] changed; the ledger keeps its store until a restart" in caplog.text


def test_socket_seconds_come_from_the_cores_clock_and_shutdown_flushes(
    tmp_path: Path, echo_port: int
) -> None:
    clock = FakeClock()
    gw = EmbeddedGateway(config(tmp_path, echo_port=echo_port), clock=clock)  # type: ignore[arg-type]
    endpoint = gw.start()[0]
    try:
        client_settings.configure(client_settings_for(str(endpoint), "a", "key-a"))
        sock = tsock.create_connection(("127.0.0.1", echo_port), timeout=10)
        sock.sendall(b"x" * 5000)
        assert recv_exact(sock, 5000) == b"x" * 5000
        clock.advance(42.0)  # the socket is open 42 s by the gateway's clock
        # What the metrics read while it runs (a tick at a minute boundary
        # may have flushed, so only its kind is certain).
        assert gw.gateway is not None
        ledger = gw.gateway.ledger
        assert ledger is not None
        assert gw.call(ledger.flush_lag) >= 0.0
        sock.close()
    finally:
        gw.stop()
    store = open_store(str(tmp_path / "u.sqlite3"), create=False)
    try:
        (total,) = store.totals()
    finally:
        store.close()
    assert total.app == "a"
    assert (total.counters.bytes_out, total.counters.bytes_in, total.counters.connects) == (
        5000, 5000, 1,
    )
    assert total.counters.socket_seconds == 42.0


def test_an_unreachable_store_is_logged_at_start_and_the_loss_at_exit(
    tmp_path: Path, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Port 1 on loopback: nothing listens, every connect is refused at once.
    data = {
        "gateway": {"listen": ["127.0.0.1:0"]},
        "resolver": {"mode": "static"},
        "policy": {"allow": [f"127.0.0.1:{echo_port}"]},
        "apps": {"a": {"key": "key-a"}},
        "usage": {"url": "postgresql://postgres@127.0.0.1:1/test", "flush_interval": 60},
    }
    caplog.set_level(logging.INFO, logger="tether.usage")
    gw = EmbeddedGateway(parse_config(data))
    endpoint = gw.start()[0]
    try:
        assert wait_for(lambda: "cannot connect" in caplog.text), caplog.text
        assert "tried again at every flush" in caplog.text
        client_settings.configure(client_settings_for(str(endpoint), "a", "key-a"))
        sock = tsock.create_connection(("127.0.0.1", echo_port), timeout=10)
        sock.sendall(b"y" * 777)
        assert recv_exact(sock, 777) == b"y" * 777
        sock.close()
    finally:
        gw.stop(timeout=30)  # the final flush tries for SHUTDOWN_FLUSH_TIMEOUT
    assert "rows could not be written before exit and are lost: 777 bytes out" in caplog.text
