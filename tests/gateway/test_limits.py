"""Socket caps: a real `tether serve` under `prlimit --nofile=1024`, one app greedy, one not.

The gateway derives its caps from its open-files limit (docs/configuration.md,
"Limits"): 1024 - a reserve of 102 leaves 461 sockets (two descriptors
each), 230 per app. An app at its cap gets a LimitExceeded naming the
limit (at its own cap, the sockets quota: a QuotaExceeded, which is a
LimitExceeded); another app keeps connecting; every refusal is an audit line.
"""

from __future__ import annotations

import errno
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import APP, StdSocket, gateway_config, use_gateway

import tether.socket as ts
from tether.client import control
from tether.client import settings as client_settings
from tether.devmode import GatewayProcess
from tether.errors import LimitExceeded, QuotaExceeded
from tether.wire import PREAMBLE, encode_frame, pb

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")

NOFILE = 1024
# What derive_caps() gives for 1024: a reserve of max(64, 1024 // 10) = 102,
# (1024 - 102) // 2 = 461 sockets for all apps, half of that per app.
GLOBAL_CAP = 461
PER_APP_CAP = 230


@pytest.fixture
def target() -> Iterator[int]:
    """A loopback listener that never accepts: connections complete in its backlog."""
    with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        yield listener.getsockname()[1]


@pytest.fixture(autouse=True)
def _reset_settings() -> Iterator[None]:
    yield
    control.close_all()
    client_settings.configure(None)


def start(tmp_path: Path, *, gateway: str = "", app_lines: str = "") -> GatewayProcess:
    key = "k-limits"
    text = gateway_config(key, gateway=gateway)
    if app_lines:
        text = text.replace(f'key = "{key}"\n', f'key = "{key}"\n{app_lines}\n', 1)
    path = tmp_path / "tether.toml"
    path.write_text(text)
    gw = GatewayProcess(path, prefix=["prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"])
    gw.start()
    return gw


def fill(port: int, most: int) -> tuple[list[socket.socket], LimitExceeded]:
    """Open sockets as the current app until refused (at most `most`)."""
    held: list[socket.socket] = []
    for _ in range(most):
        sock = ts.socket()
        sock.settimeout(10)
        try:
            sock.connect(("127.0.0.1", port))
        except LimitExceeded as exc:
            sock.close()
            return held, exc
        held.append(sock)
    raise AssertionError(f"{most} sockets opened and none refused")


def wait_for_line(gw: GatewayProcess, text: str, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(gw.log):
            if text in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the gateway log:\n{gw.log_text()[-3000:]}")


def test_greedy_app_is_capped_and_another_app_keeps_connecting(
    tmp_path: Path, target: int
) -> None:
    gw = start(tmp_path)
    held: list[socket.socket] = []
    try:
        # The limits and the caps derived from them are in the log at start.
        line = wait_for_line(gw, "open files: limit")
        assert f"limit {NOFILE}, 102 kept" in line and f"max_sockets {GLOBAL_CAP}" in line
        assert f"{PER_APP_CAP} per app" in line
        use_gateway(gw.address, APP, "k-limits")
        started = time.monotonic()
        held, refused = fill(target, PER_APP_CAP + 50)
        took = time.monotonic() - started
        assert len(held) == PER_APP_CAP
        assert isinstance(refused, QuotaExceeded) and refused.errno == errno.EDQUOT
        assert (refused.app, refused.limit, refused.value, refused.window) == (
            APP, "sockets", PER_APP_CAP, "concurrent")
        assert str(refused.strerror) == (
            f"tether: app '{APP}' has {PER_APP_CAP} open sockets, its sockets quota "
            f"({PER_APP_CAP}, gateway.max_sockets_per_app); close one before opening another")
        assert took < 30, took
        # The other app is not affected: it connects, again and again.
        use_gateway(gw.address, "other", "other-k-limits")
        for _ in range(20):
            with ts.create_connection(("127.0.0.1", target), timeout=10):
                pass
        audit = wait_for_line(gw, f'"outcome":"refused: gateway.max_sockets_per_app {PER_APP_CAP}')
        assert f'"app":"{APP}"' in audit
        assert "Traceback" not in gw.log_text()
    finally:
        for sock in held:
            sock.close()
        assert gw.stop() == 0


def test_global_cap_names_the_gateway_limit(tmp_path: Path, target: int) -> None:
    gw = start(tmp_path, gateway="max_sockets_per_app = 5000")
    held: list[socket.socket] = []
    try:
        use_gateway(gw.address, APP, "k-limits")
        held, refused = fill(target, GLOBAL_CAP + 20)
        assert len(held) == GLOBAL_CAP
        assert (refused.limit, refused.value) == ("gateway.max_sockets", GLOBAL_CAP)
        assert "for all apps together" in str(refused)
        wait_for_line(gw, f'"outcome":"refused: gateway.max_sockets {GLOBAL_CAP} reached"')
        # Nothing ran out of descriptors: the reserve held.
        assert "Too many open files" not in gw.log_text()
    finally:
        for sock in held:
            sock.close()
        assert gw.stop() == 0


def test_per_app_max_sockets_and_udp_associations_count(
    tmp_path: Path, target: int, echo_port: int
) -> None:
    gw = start(tmp_path, app_lines="max_sockets = 3")
    held: list[socket.socket] = []
    try:
        use_gateway(gw.address, APP, "k-limits")
        echoing = ts.create_connection(("127.0.0.1", echo_port), timeout=10)
        held.append(echoing)
        udp = ts.socket(socket.AF_INET, socket.SOCK_DGRAM)
        held.append(udp)
        udp.sendto(b"x", ("127.0.0.1", target))  # opens an association: a socket
        held.append(ts.create_connection(("127.0.0.1", target), timeout=10))
        with pytest.raises(LimitExceeded) as info:
            ts.create_connection(("127.0.0.1", target), timeout=10)
        assert (info.value.limit, info.value.value) == ("sockets", 3)
        assert f"app '{APP}' has 3 open sockets, its sockets quota (3, apps.{APP}.max_sockets)" in (
            str(info.value))
        # A UDP socket is refused the same way, before anything is opened.
        with ts.socket(socket.AF_INET, socket.SOCK_DGRAM) as second, pytest.raises(
            LimitExceeded, match="max_sockets"
        ):
            second.sendto(b"y", ("127.0.0.1", target))
        # More destinations on the open association are not more sockets.
        udp.sendto(b"z", ("127.0.0.1", echo_port))
        # A socket closed (by both sides) frees its place.
        held.remove(echoing)
        echoing.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                held.append(ts.create_connection(("127.0.0.1", target), timeout=10))
                break
            except LimitExceeded:
                assert time.monotonic() < deadline, "the freed place never came back"
                time.sleep(0.05)
    finally:
        for sock in held:
            sock.close()
        assert gw.stop() == 0


def test_out_of_descriptors_is_logged_once_and_the_gateway_serves_again(
    tmp_path: Path, echo_port: int
) -> None:
    """Idle authenticated streams past the limit: accept() fails, nothing crashes."""
    path = tmp_path / "tether.toml"
    path.write_text(gateway_config("k-limits"))
    gw = GatewayProcess(path, prefix=["prlimit", "--nofile=128:128", "--"])
    gw.start()
    host, port = gw.address.rsplit(":", 1)
    hello = PREAMBLE + encode_frame(
        pb.ClientHello(protocol_version=1, app=APP, key="k-limits"))
    streams: list[socket.socket] = []
    try:
        for _ in range(200):  # each holds one of the gateway's 128 descriptors
            raw = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
            raw.connect((host, int(port)))
            raw.sendall(hello)
            streams.append(raw)
        line = wait_for_line(gw, "out of file descriptors")
        assert "Too many open files" in line
        for raw in streams:
            raw.close()
        streams.clear()
        # Once descriptors are free again, another app is served.
        use_gateway(gw.address, "other", "other-k-limits")
        deadline = time.monotonic() + 10
        while True:
            try:
                with ts.create_connection(("127.0.0.1", echo_port), timeout=5) as sock:
                    sock.sendall(b"back")
                    assert sock.recv(4) == b"back"
                break
            except OSError:
                assert time.monotonic() < deadline, gw.log_text()[-3000:]
                time.sleep(0.1)
        assert sum("out of file descriptors" in ln for ln in gw.log) == 1  # once per window
        assert gw.proc is not None and gw.proc.poll() is None
    finally:
        for raw in streams:
            raw.close()
        assert gw.stop() == 0
