"""SIGTERM drains a real `tether serve`: new work refused, live sockets finish, the rest closed.

A gateway told to stop by SIGTERM refuses new connects with UNAVAILABLE
(a ConnectionRefusedError that says to retry elsewhere), lets a transfer
already under way finish byte for byte, still resumes a socket handed off
to it, and exits once its last socket closed; a socket still open at
gateway.drain_timeout is closed with a reason the app reads.
"""

from __future__ import annotations

import errno
import hashlib
import pickle
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from served import Served
from support import APP, gateway_config, recv_exact, stream, use_gateway
from tcpservers import echo, serving, sink

import tether.socket as ts
from tether.client import control
from tether.client import settings as client_settings
from tether.client.errors import gateway_error
from tether.config import DEFAULT_DRAIN_TIMEOUT, parse_config
from tether.errors import ConfigError
from tether.gateway.core.drain import drain, drained_reason, live, refusal, resume_refusal
from tether.gateway.core.gateway import GatewayCore
from tether.wire import pb

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _reset_settings() -> Iterator[None]:
    yield
    control.close_all()
    client_settings.configure(None)


def start(tmp_path: Path, key: str, drain_timeout: float) -> Served:
    config = tmp_path / "tether.toml"
    config.write_text(gateway_config(key, gateway=f"drain_timeout = {drain_timeout}"))
    served = Served(config, "--listen", "127.0.0.1:0")
    use_gateway(served.address(), APP, key)
    return served


def send_through(sock: socket.socket, size: int) -> tuple[int, str]:
    """`size` bytes to a sink peer, half-closed; what the peer counted and hashed."""
    data = stream(b"drain", 0, size)
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(4096)
        assert chunk, f"EOF before the sink's answer (got {line!r})"
        line += chunk
    count, digest = line.decode().split()
    assert digest == hashlib.sha256(data).hexdigest()
    return int(count), digest


def test_sigterm_refuses_new_work_and_lets_live_sockets_finish(tmp_path: Path) -> None:
    # A drain_timeout far past anything this test waits for: the gateway
    # exits because its last socket closed, not because time ran out.
    served = start(tmp_path, "k-drain", drain_timeout=240)
    try:
        with serving(sink) as sink_server, serving(echo) as echo_server:
            live = ts.create_connection(("127.0.0.1", sink_server.port), timeout=30)
            handed = ts.create_connection(("127.0.0.1", echo_server.port), timeout=30)
            handed.sendall(b"before")
            assert recv_exact(handed, 6) == b"before"
            blob = pickle.dumps(handed)  # detached: waits at the gateway for its resume
            served.signal(signal.SIGTERM)
            served.wait_for(r"draining: 2 sockets open")
            # New work: refused, in words that say where to go.
            with pytest.raises(ConnectionRefusedError) as refused:
                ts.create_connection(("127.0.0.1", echo_server.port), timeout=30)
            assert refused.value.errno == errno.ECONNREFUSED
            assert "is draining (shutting down) and accepts no new connections" in str(
                refused.value)
            assert "retry on another gateway" in str(refused.value)
            # The transfer under way finishes byte for byte.
            assert send_through(live, 8 * MiB)[0] == 8 * MiB
            live.close()
            # The socket handed off here is still this gateway's to resume.
            resumed = pickle.loads(blob)
            resumed.sendall(b"after")
            assert recv_exact(resumed, 5) == b"after"
            assert served.proc.poll() is None, "exited with a socket still open"
            resumed.close()
            assert served.proc.wait(60) == 0
        served.wait_for(r"drained: every socket finished")
    finally:
        served.stop()


@pytest.mark.parametrize(
    ("drain_timeout", "interrupt", "waited", "logged"),
    [
        # The drain runs out: what is still open is closed, saying so.
        (1, False, r"1", r"drain timeout: closing the 1 sockets still open after 1 s"),
        # SIGINT during the drain ends it there.
        (240, True, r"[\d.]+", r"drain interrupted after [\d.]+ s: closing the 1 sockets"),
    ],
    ids=["timeout", "sigint"],
)
def test_sockets_left_at_the_drains_end_are_closed_with_a_reason_the_app_reads(
    tmp_path: Path, drain_timeout: float, interrupt: bool, waited: str, logged: str
) -> None:
    served = start(tmp_path, "k-drain-end", drain_timeout=drain_timeout)
    try:
        with serving(echo) as echo_server:
            sock = ts.create_connection(("127.0.0.1", echo_server.port), timeout=60)
            sock.sendall(b"x")
            assert recv_exact(sock, 1) == b"x"
            served.signal(signal.SIGTERM)
            if interrupt:
                served.wait_for(r"draining: 1 sockets open")
                served.signal(signal.SIGINT)
            # Blocked in recv() through the drain: the reset comes at its end,
            # and the client asks the gateway why while it still answers.
            with pytest.raises(ConnectionResetError) as reset:
                sock.recv(1)
            assert re.fullmatch(
                rf"tether: socket to 127\.0\.0\.1:{echo_server.port} was closed when the "
                rf"gateway drained: still open after {waited} s \(gateway\.drain_timeout\)",
                str(reset.value.strerror),
            ), reset.value.strerror
            sock.close()
            assert served.proc.wait(60) == 0
        served.wait_for(logged)
    finally:
        served.stop()


# -- the pure parts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", DEFAULT_DRAIN_TIMEOUT),
        ("drain_timeout = 0", 0.0),
        ("drain_timeout = 7", 7.0),
        ("drain_timeout = 0.5", 0.5),
    ],
)
def test_drain_timeout_config(text: str, expected: float) -> None:
    import tomllib

    assert parse_config(tomllib.loads(f"[gateway]\n{text}\n")).drain_timeout == expected


@pytest.mark.parametrize("bad", ["-1", "true", '"30"', "inf"])
def test_bad_drain_timeout_names_the_key(bad: str) -> None:
    import tomllib

    with pytest.raises(ConfigError, match=r"gateway\.drain_timeout"):
        parse_config(tomllib.loads(f"[gateway]\ndrain_timeout = {bad}\n"))


def test_default_drain_fits_kubernetes_grace_period() -> None:
    # Kubernetes kills 30 s after SIGTERM; the drain, the close and the
    # answers to apps asking why (server.SHUTDOWN_GRACE) must fit before.
    from tether.gateway.server import SHUTDOWN_GRACE

    assert DEFAULT_DRAIN_TIMEOUT + SHUTDOWN_GRACE < 30


def test_unavailable_is_a_refusal_that_says_to_retry_elsewhere() -> None:
    core = GatewayCore(parse_config({}))
    core.node_id = "gw-a"
    error = gateway_error(pb.Error(code=refusal(core, "connections").code,
                                   message=refusal(core, "connections").message), "127.0.0.1:1")
    assert type(error) is ConnectionRefusedError
    assert error.errno == errno.ECONNREFUSED
    assert str(error.strerror) == (
        "tether: gateway gw-a is draining (shutting down) and accepts no new connections; "
        "retry on another gateway"
    )


def test_resume_refusal_spares_what_this_gateway_holds_or_has_a_tombstone_for() -> None:
    core = GatewayCore(parse_config({}))
    registry = core.registry
    held = registry.add(APP, ("127.0.0.1", 1), ("127.0.0.1", 2), "tcp", 60.0)
    gone = registry.add(APP, ("127.0.0.1", 1), ("127.0.0.1", 3), "tcp", 60.0)
    gone.finish("closed by the peer")
    assert resume_refusal(core, APP, held.descriptor) is None
    assert resume_refusal(core, APP, gone.descriptor) is None  # told its tombstone
    foreign = resume_refusal(core, APP, "not-a-socket-of-this-gateway")
    assert foreign is not None and foreign.code == pb.Error.UNAVAILABLE
    assert "accepts no new resumes" in foreign.message


@pytest.mark.parametrize(("waited", "text"), [
    (25.0, "closed when the gateway drained: still open after 25 s (gateway.drain_timeout)"),
    (0.25, "closed when the gateway drained: still open after 0.25 s (gateway.drain_timeout)"),
    (3.14159, "closed when the gateway drained: still open after 3.14 s (gateway.drain_timeout)"),
])
def test_drained_reason(waited: float, text: str) -> None:
    assert drained_reason(waited) == text


def _with_peers(forwarding: int) -> GatewayCore:
    """A core whose peers (a host's worker links, never started) forward `forwarding` streams."""
    from tether.gateway.supervisor import WorkerSpec
    from tether.gateway.workerlink import WorkerLinks

    core = GatewayCore(parse_config({}))
    spec = WorkerSpec(index=0, count=2, base="h", runtime_dir="/nonexistent", supervisor=1)
    links = WorkerLinks(core, spec, b"k" * 32)
    links.forwarding = forwarding
    core.cluster = links
    return core


@pytest.mark.parametrize(("sockets", "forwarding", "expected"), [
    (0, 0, 0), (2, 0, 2), (0, 1, 1), (2, 3, 5),
])
def test_live_work_is_sockets_and_forwarded_streams(
    sockets: int, forwarding: int, expected: int
) -> None:
    core = _with_peers(forwarding)
    for port in range(sockets):
        core.registry.add(APP, ("127.0.0.1", 1), ("127.0.0.1", 10 + port), "tcp", 60.0)
    assert live(core) == expected


@pytest.mark.parametrize("ends", [True, False], ids=["finishes", "timeout"])
def test_the_drain_waits_for_a_forwarded_stream(ends: bool) -> None:
    """No socket here, one stream forwarded to a peer: the drain waits for it; if it
    ends, nothing is left to close, else the drain reason is returned at the timeout."""
    import asyncio

    core = _with_peers(1)

    async def run() -> str | None:
        core.loop = asyncio.get_running_loop()
        interrupt = asyncio.Event()
        if ends:  # the forwarded stream ends a moment into the drain
            core.loop.call_soon(setattr, core.cluster, "forwarding", 0)
            return await drain(core, 60.0, interrupt)
        return await drain(core, 0.2, interrupt)

    reason = asyncio.run(run())
    assert core.draining
    assert reason == (None if ends else drained_reason(0.2))
