"""Revocation on reload: an app removed from the config, or whose key changed, loses
its live sockets and streams, each closed with a reason its next call reads.

A real gateway process, reloaded with SIGHUP sent to its own PID.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import APP, Gateway, gateway_config, start_gateway, use_gateway

import tether.socket as ts
from tether.client import control
from tether.client import settings as client_settings
from tether.wire import pb

KEY = "k-revoke"


@pytest.fixture(autouse=True)
def _reset_settings() -> Iterator[None]:
    yield
    control.close_all()
    client_settings.configure(None)


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    started = start_gateway(tmp_path, gateway_config(KEY), KEY)
    yield started
    assert started.process.stop() == 0


def reload(gw: Gateway, config_text: str) -> None:
    gw.config_path.write_text(config_text)
    before = sum("reloaded" in line for line in gw.process.log)
    assert gw.process.proc is not None
    os.kill(gw.process.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while sum("reloaded" in line for line in gw.process.log) == before:
        assert time.monotonic() < deadline, gw.log_text()
        time.sleep(0.02)


def without_test_app(text: str) -> str:
    start = text.index(f"[apps.{APP}]")
    end = text.index("[apps.other]")
    return text[:start] + text[end:]


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        ("removed", f"app '{APP}' was removed from the gateway's config"),
        ("key", f"app '{APP}''s key changed"),
    ],
)
def test_revoked_app_loses_its_sockets_and_streams(
    gw: Gateway, echo_port: int, change: str, cause: str
) -> None:
    use_gateway(gw.address, APP, KEY)
    sock = ts.create_connection(("127.0.0.1", echo_port), timeout=5)
    sock.sendall(b"x")
    assert sock.recv(1) == b"x"
    # This process's control stream, opened now and kept open.
    listed = control.channel(client_settings.current()).request(
        pb.Request(list_sockets=pb.ListSockets()), timeout=5)
    assert len(listed.sockets.sockets) == 1
    # The other app's socket is not touched.
    use_gateway(gw.address, "other", f"other-{KEY}")
    kept = ts.create_connection(("127.0.0.1", echo_port), timeout=5)
    use_gateway(gw.address, APP, KEY)

    new_config = gateway_config(KEY)
    if change == "removed":
        new_config = without_test_app(new_config)
    else:
        new_config = new_config.replace(f'key = "{KEY}"', 'key = "a-new-key"', 1)
    reload(gw, new_config)

    sock.settimeout(5)
    # The live socket was reset; its next call says why.
    with pytest.raises(ConnectionResetError) as info:
        sock.recv(1)
    assert str(info.value.strerror) == (
        f"tether: socket to 127.0.0.1:{echo_port} was revoked: {cause}")
    sock.close()
    # The control stream was ended with the cause, and a new one is refused with it.
    with pytest.raises(PermissionError, match=f"tether: {cause}"):
        control.channel(client_settings.current()).request(
            pb.Request(list_sockets=pb.ListSockets()), timeout=5)
    # A new connect is refused with the real cause, not a policy reason.
    with pytest.raises(PermissionError) as denied:
        ts.create_connection(("127.0.0.1", echo_port), timeout=5)
    assert str(denied.value.strerror) == f"tether: {cause}"
    # The close line in the audit log says why.
    assert any('"reason":"revoked: ' in line and '"event":"close"' in line
               for line in gw.process.log), gw.log_text()
    # The other app's socket still works.
    kept.sendall(b"still")
    assert kept.recv(5) == b"still"
    kept.close()


def test_revoked_app_udp_association_is_ended_with_the_reason(
    gw: Gateway, echo_port: int
) -> None:
    use_gateway(gw.address, APP, KEY)
    with ts.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.sendto(b"x", ("127.0.0.1", echo_port))  # the association opens
        reload(gw, without_test_app(gateway_config(KEY)))
        with pytest.raises(ConnectionResetError, match="removed from the gateway's config"):
            for _ in range(50):  # the association's stream ends a moment after the reload
                udp.sendto(b"after", ("127.0.0.1", echo_port))
                time.sleep(0.02)


def test_reload_that_keeps_an_app_keeps_its_sockets(gw: Gateway, echo_port: int) -> None:
    use_gateway(gw.address, APP, KEY)
    with ts.create_connection(("127.0.0.1", echo_port), timeout=5) as sock:
        reload(gw, gateway_config(KEY, allow=["127.0.0.0/8:*"]))
        sock.sendall(b"same")
        assert sock.recv(4) == b"same"
    assert "revoked" not in gw.log_text()
