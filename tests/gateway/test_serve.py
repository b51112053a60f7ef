"""`tether serve` as a process: start-up validation, listeners, shutdown, isolation."""

from __future__ import annotations

import contextlib
import platform
import signal
import socket as std
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import APP, Gateway, gateway_config, run_module, start_gateway, use_gateway

import tether.socket as ts
from tether.client import settings as client_settings
from tether.devmode import GatewayProcess
from tether.wire import PREAMBLE, Connection, Role, pb


def use(gw_address: str, key: str) -> None:
    use_gateway(gw_address, APP, key)


@pytest.fixture(autouse=True)
def _reset_settings() -> Iterator[None]:
    yield
    client_settings.configure(None)


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("tether.gateway", *args, timeout=20)


def test_bad_config_exits_before_listening(tmp_path: Path) -> None:
    bad = tmp_path / "t.toml"
    bad.write_text('[gateway]\nlisten = ["127.0.0.1:0"]\nidle_timeout = -5\n')
    result = run_serve("--config", str(bad))
    assert result.returncode == 2
    assert "gateway.idle_timeout" in result.stderr
    assert "listening on" not in result.stderr


def test_bad_listen_flag(tmp_path: Path) -> None:
    result = run_serve("--listen", "nonsense:port")
    assert result.returncode == 2
    assert "--listen[0]" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_sockets_and_exits_zero(
    tmp_path: Path, echo_port: int, sig: signal.Signals
) -> None:
    key = "k-signal"
    # drain_timeout = 0: SIGTERM closes at once, as SIGINT does (the drain: test_drain.py).
    gw = start_gateway(tmp_path, gateway_config(key, gateway="drain_timeout = 0"), key).process
    try:
        use(gw.address, key)
        sock = ts.create_connection(("127.0.0.1", echo_port), timeout=5)
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        assert gw.proc is not None
        gw.proc.send_signal(sig)
        started = time.monotonic()
        status = gw.proc.wait(10)
        assert status == 0
        assert time.monotonic() - started < 5
        # The app's socket was closed by the gateway: EOF or reset, not a hang.
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
        sock.close()
    finally:
        gw.stop()


def test_unix_socket_listener(tmp_path: Path, echo_port: int) -> None:
    key = "k-unix"
    path = tmp_path / "gw.sock"
    started = start_gateway(tmp_path, gateway_config(key), key, listen=f"unix:{path}")
    gw, address = started.process, started.address
    try:
        assert address == f"unix:{path}"
        use(address, key)
        with ts.create_connection(("127.0.0.1", echo_port), timeout=5) as sock:
            sock.sendall(b"over unix")
            assert sock.recv(9) == b"over unix"
            assert sock.family == std.AF_INET
            assert sock.getpeername() == ("127.0.0.1", echo_port)
    finally:
        gw.stop()
    assert not path.exists()  # removed at shutdown


def raw_stream(address: str) -> std.socket:
    host, port = address.rsplit(":", 1)
    return std.create_connection((host, int(port)), timeout=5)


def read_error(sock: std.socket) -> pb.Error | pb.ServerHello:
    wire = Connection(Role.CLIENT)
    wire.send(pb.ClientHello(protocol_version=1))  # let it accept a ServerHello
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    wire.receive_data(data)
    wire.receive_data(b"")
    event = wire.next_event()
    assert isinstance(event, pb.Error | pb.ServerHello), event
    return event


def test_garbage_closes_one_stream_not_the_gateway(gateway: Gateway, echo_port: int) -> None:
    with raw_stream(gateway.address) as bad:
        bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        err = read_error(bad)
        assert isinstance(err, pb.Error)
        assert "not a tether client" in err.message
    use(gateway.address, gateway.key)
    with ts.create_connection(("127.0.0.1", echo_port), timeout=5) as ok:
        ok.sendall(b"still here")
        assert ok.recv(10) == b"still here"


def test_oversize_frame_refused_from_its_length(gateway: Gateway) -> None:
    with raw_stream(gateway.address) as bad:
        bad.sendall(PREAMBLE + struct.pack(">I", 50 * 1024 * 1024))
        err = read_error(bad)
        assert isinstance(err, pb.Error)
        assert "over the limit" in err.message


def test_version_mismatch_is_a_clear_error(
    gateway: Gateway, echo_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tether.client import exchange

    monkeypatch.setattr(exchange, "PROTOCOL_VERSION", 99)
    use(gateway.address, gateway.key)
    with ts.socket() as sock, pytest.raises(ConnectionError) as info:
        sock.connect(("127.0.0.1", echo_port))
    message = str(info.value)
    assert "version 99" in message and "version 1" in message


def test_wrong_key_is_permission_error(gateway: Gateway, echo_port: int) -> None:
    use(gateway.address, "wrong")
    with ts.socket() as sock, pytest.raises(PermissionError) as info:
        sock.connect(("127.0.0.1", echo_port))
    assert str(info.value).endswith("tether: app 'tests' authentication failed")
    assert "wrong" not in gateway.log_text()  # keys are never logged


def test_unknown_app_is_the_same_error(gateway: Gateway, echo_port: int) -> None:
    use_gateway(gateway.address, "nobody", "x")
    with ts.socket() as sock, pytest.raises(PermissionError, match="app 'nobody'"):
        sock.connect(("127.0.0.1", echo_port))


def test_close_is_logged_with_bytes(gateway: Gateway, echo_port: int) -> None:
    use(gateway.address, gateway.key)
    with ts.create_connection(("127.0.0.1", echo_port), timeout=5) as sock:
        sock.sendall(b"12345")
        assert sock.recv(5) == b"12345"
        descriptor_hint = sock.getsockname()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [ln for ln in gateway.process.log if '"event":"close"' in ln and
                 f'"peer":"127.0.0.1:{echo_port}"' in ln and '"bytes_out":5' in ln]
        if lines:
            break
        time.sleep(0.05)
    assert lines, gateway.log_text()
    assert '"bytes_in":5' in lines[-1]
    assert descriptor_hint[0] == "127.0.0.1"




def wait_for_log(gw: GatewayProcess, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in gw.log):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in gateway log:\n{gw.log_text()}")


def test_sighup_reloads_policy_and_keeps_sockets(tmp_path: Path, echo_port: int) -> None:
    key = "k-reload"
    started = start_gateway(tmp_path, gateway_config(key, allow=[f"127.0.0.1:{echo_port}"]), key)
    gw, address, config = started.process, started.address, started.config_path
    assert gw.proc is not None
    try:
        use(address, key)
        kept = ts.create_connection(("127.0.0.1", echo_port), timeout=5)
        # Now deny it: no allow rule for the port.
        config.write_text(gateway_config(key, allow=[]))
        gw.proc.send_signal(signal.SIGHUP)
        wait_for_log(gw, "reloaded")
        with pytest.raises(PermissionError, match="loopback"):
            ts.create_connection(("127.0.0.1", echo_port), timeout=5)
        kept.sendall(b"still open")  # the open socket survived the reload
        assert kept.recv(10) == b"still open"
        # A broken file keeps the policy in force and says why.
        config.write_text("[gateway]\nidle_timeout = -1\n")
        gw.proc.send_signal(signal.SIGHUP)
        wait_for_log(gw, "reload failed")
        assert "gateway.idle_timeout" in gw.log_text()
        with pytest.raises(PermissionError):
            ts.create_connection(("127.0.0.1", echo_port), timeout=5)
        kept.close()
    finally:
        gw.stop()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")
def test_gateway_keeps_relay_buffers_in_the_heap() -> None:
    """serve() tunes glibc so relay-sized chunks are not mmapped and unmapped per read."""
    from tether.gateway.server import tune_malloc

    assert tune_malloc() is True
