"""Signals to a real `tether serve` process, sent with os.kill to its own PID.

SIGHUP without --config reloads nothing and says so (it used to end the
gateway); SIGTERM tells connected apps the gateway is shutting down, in
words their next call reads, and exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import APP, gateway_config, start_gateway, use_gateway

import tether.socket as ts
from tether.client import control
from tether.client import settings as client_settings
from tether.devmode import GatewayProcess
from tether.wire import PREAMBLE, Connection, Role, encode_frame, pb


@pytest.fixture(autouse=True)
def _reset_settings() -> Iterator[None]:
    yield
    control.close_all()
    client_settings.configure(None)


def test_sighup_without_config_reloads_nothing_and_keeps_serving(echo_port: int) -> None:
    gw = GatewayProcess(None)
    gw.start()
    assert gw.proc is not None
    try:
        os.kill(gw.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any("nothing to reload" in line for line in gw.log):
            assert gw.proc.poll() is None, f"the gateway exited on SIGHUP:\n{gw.log_text()}"
            assert time.monotonic() < deadline, gw.log_text()
            time.sleep(0.02)
        assert "started without --config" in gw.log_text()
        time.sleep(0.2)
        assert gw.proc.poll() is None
        # Still accepting: a hello is answered (no app is configured: refused, in words).
        host, port = gw.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(PREAMBLE + encode_frame(pb.ClientHello(protocol_version=1, app="x")))
            assert raw.recv(4096)
    finally:
        assert gw.stop() == 0


def test_sigterm_tells_apps_the_gateway_is_shutting_down(tmp_path: Path, echo_port: int) -> None:
    key = "k-term"
    # drain_timeout = 0: no drain, the sockets are reset at once (the drain: test_drain.py).
    gw = start_gateway(tmp_path, gateway_config(key, gateway="drain_timeout = 0"), key)
    proc = gw.process.proc
    assert proc is not None
    use_gateway(gw.address, APP, key)
    sock = ts.create_connection(("127.0.0.1", echo_port), timeout=5)
    sock.sendall(b"x")
    assert sock.recv(1) == b"x"
    # An authenticated control stream, idle between requests.
    host, port = gw.address.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=5)
    wire = Connection(Role.CLIENT)
    raw.sendall(wire.send(pb.ClientHello(protocol_version=1, app=APP, key=key)))
    try:
        os.kill(proc.pid, signal.SIGTERM)
        # The app's next call on its socket raises, and says why.
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError) as info:
            sock.recv(1)
        assert str(info.value.strerror) == (
            f"tether: socket to 127.0.0.1:{echo_port} was gateway shutting down")
        # The control stream got an Error frame saying so before it closed.
        data = b""
        while chunk := raw.recv(65536):
            data += chunk
        wire.receive_data(data)
        events = []
        while not isinstance(event := wire.next_event(), type(None)) and len(events) < 5:
            events.append(event)
            if isinstance(event, pb.Error):
                break
        errors = [e for e in events if isinstance(e, pb.Error)]
        assert errors and errors[0].message == "tether: the gateway is shutting down", events
        assert proc.wait(10) == 0
        assert "shutting down" in gw.log_text()
    finally:
        raw.close()
        sock.close()
        gw.process.stop()


def test_sigterm_with_no_sockets_exits_at_once(tmp_path: Path) -> None:
    key = "k-term-idle"
    gw = start_gateway(tmp_path, gateway_config(key), key)
    proc = gw.process.proc
    assert proc is not None
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(10) == 0
    # No socket was reset, so nobody is waited for (the grace is for askers).
    assert time.monotonic() - started < 1.5
    gw.process.stop()
