"""Helpers shared by the test packages (importable as `support`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

import tether
from tether.client import control
from tether.client import settings as client_settings
from tether.devmode import GatewayProcess
from tether.endpoint import parse_endpoint
from tether.gateway.embedded import EmbeddedGateway
from tether.wire import pb

APP = "tests"
TIMEOUT = 10.0  # the helpers' default bound on any one wait

# Test gateways resolve only from this table ("static" mode): nothing in the
# suite ever asks a real DNS server, and every name maps to loopback.
STATIC_HOSTS = {
    "localhost": ["127.0.0.1"],
    "mail.test": ["127.0.0.1"],
    "www.test": ["127.0.0.1"],
    "dual.test": ["127.0.0.1", "::1"],
    "v6only.test": ["::1"],
}


@dataclass
class Gateway:
    """A running `tether serve` child process and how to reach it as the test app."""

    process: GatewayProcess
    address: str  # host:port
    app: str
    key: str
    config_path: Path

    def log_text(self) -> str:
        return self.process.log_text()


def gateway_config(
    key: str, *, extra: str = "", allow: list[str] | None = None, gateway: str = ""
) -> str:
    """A config for the test apps; `gateway` lines go into [gateway], `extra` at the end."""
    rules = allow if allow is not None else ["127.0.0.0/8:*", "[::1]:*"]
    hosts = "\n".join(
        f'"{name}" = [{", ".join(repr(a).replace(chr(39), chr(34)) for a in addrs)}]'
        for name, addrs in STATIC_HOSTS.items()
    )
    allow_list = ", ".join(f'"{r}"' for r in rules)
    text = textwrap.dedent(
        f"""\
        [gateway]
        {{gateway}}listen = ["127.0.0.1:0"]

        [resolver]
        mode = "static"

        [resolver.hosts]
        {{hosts}}

        [policy]
        allow = [{allow_list}]

        [apps.{APP}]
        key = "{key}"

        [apps.other]
        key = "other-{key}"
        """
    )
    gateway_lines = gateway + "\n" if gateway else ""
    return text.replace("{gateway}", gateway_lines).replace("{hosts}", hosts) + extra


def start_gateway(
    tmp: Path, config_text: str, key: str, *, name: str = "tether.toml", listen: str = "127.0.0.1:0"
) -> Gateway:
    """Write `config_text` to tmp/name and start `tether serve` on it (its "listening on")."""
    config_path = tmp / name
    config_path.write_text(config_text)
    process = GatewayProcess(config_path, listen=listen)
    address = process.start()
    return Gateway(process, address, APP, key, config_path)


def run_module(
    module: str,
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`python -m module args...` as a child process, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        check=False,
    )


def tether_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The `tether` command line as a child process."""
    return run_module("tether.cli.main", *args, cwd=cwd, env=env)


def client_settings_for(address: str, app: str, key: str) -> client_settings.Settings:
    return client_settings.Settings(gateway=parse_endpoint(address), app=app, key=key)


def use_gateway(address: str, app: str, key: str) -> None:
    """Point tether.socket (without install()) at a gateway as `app`."""
    client_settings.configure(client_settings_for(address, app, key))


def list_sockets(gw: Gateway, app: str | None = None, key: str | None = None) -> list[Any]:
    """The gateway's live sockets as an app sees them (its own only); the test app by default."""
    settings = client_settings_for(gw.address, app or gw.app, key or gw.key)
    channel = control.ControlChannel(settings)
    try:
        response = channel.request(pb.Request(list_sockets=pb.ListSockets()))
    finally:
        channel.close()
    return list(response.sockets.sockets)


def stdlib_socket_class() -> type[socket.socket]:
    """The stdlib's socket class, even while tether.install() has replaced socket.socket."""
    for cls in socket.socket.__mro__:
        if cls.__module__ == "socket" and cls.__name__ == "socket":
            return cls
    raise RuntimeError("no stdlib socket class in socket.socket's MRO")


StdSocket = stdlib_socket_class()


# The machine's loopback services (PostgreSQL, MariaDB, Redis, RabbitMQ,
# Mosquitto, NATS). A developer without one gets a skip that names it; CI sets
# TETHER_REQUIRE_SERVICES=1 so a missing service fails the run instead. Read
# at import: the suite's autouse fixture clears TETHER_* before each test.
REQUIRE_SERVICES = os.environ.get("TETHER_REQUIRE_SERVICES", "") not in ("", "0")


def service_reachable(port: int, host: str = "127.0.0.1") -> OSError | None:
    """None if a plain (untethered) TCP connect to the service succeeds, else why not."""
    probe = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect((host, port))
    except OSError as exc:
        return exc
    finally:
        probe.close()
    return None


def needs_program(name: str) -> pytest.MarkDecorator:
    """Skip a test whose client program `name` is not installed, on a developer's
    machine only: in CI (TETHER_REQUIRE_SERVICES=1) the test runs and fails."""
    missing = shutil.which(name) is None and not REQUIRE_SERVICES
    return pytest.mark.skipif(missing, reason=f"{name} is not installed")


def require_service(port: int, name: str) -> None:
    """Skip (or, with TETHER_REQUIRE_SERVICES=1, fail) unless `name` answers on `port`."""
    problem = service_reachable(port)
    if problem is None:
        return
    message = f"{name} is not reachable on 127.0.0.1:{port} on this machine: {problem}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (TETHER_REQUIRE_SERVICES is set: a missing service is a failure)")
    pytest.skip(message)


# -- streams -------------------------------------------------------------------------


def stream(seed: bytes, offset: int, n: int) -> bytes:
    """n bytes at `offset` of a deterministic stream (shake_128 blocks of 64 KiB).

    Any lost, duplicated or reordered byte shows as a mismatch.
    """
    block = 64 * 1024
    first, last = offset // block, (offset + n + block - 1) // block
    data = b"".join(
        hashlib.shake_128(seed + k.to_bytes(8, "big")).digest(block) for k in range(first, last)
    )
    start = offset - first * block
    return data[start : start + n]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes; EOF before that fails the test."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 256 * 1024))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT, step: float = 0.02) -> bool:
    """Poll until predicate() holds (bounded); its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def audit_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    """The `event` lines ("decision", "close") an in-thread gateway wrote to `tether.audit`."""
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tether.audit"]
    return [line for line in lines if line["event"] == event]


def descriptor(sock: socket.socket) -> str:
    """A tether socket's descriptor, as the gateway names it."""
    t = sock._tether  # type: ignore[attr-defined]
    assert t is not None
    return str(t.descriptor)


# -- peers: stdlib servers on loopback (targets, not tethered) ----------------------


@contextlib.contextmanager
def embedded_gateway() -> Iterator[tuple[EmbeddedGateway, client_settings.Settings]]:
    """An in-thread gateway for app 'a' (loopback allowed), configured as the client's.

    Never with install() active: the gateway's own sockets must be the stdlib's.
    """
    from tether.config import parse_config

    assert not tether.installed()
    config = parse_config({
        "gateway": {"listen": ["127.0.0.1:0"]},
        "resolver": {"mode": "static"},
        "policy": {"allow": ["127.0.0.0/8:*"]},
        "apps": {"a": {"key": "key-a"}},
    })
    gw = EmbeddedGateway(config)
    endpoint = gw.start()[0]
    settings = client_settings.Settings(gateway=parse_endpoint(str(endpoint)), app="a", key="key-a")
    client_settings.configure(settings)
    try:
        yield gw, settings
    finally:
        client_settings.configure(None)
        control.close_all()
        gw.stop()


@contextlib.contextmanager
def installed(gw: Gateway) -> Iterator[Gateway]:
    """The stdlib socket module routed through `gw` (tether.install) while inside."""
    tether.install(gateway=gw.address, app=gw.app, key=gw.key)
    try:
        yield gw
    finally:
        tether.uninstall()


class Running:
    """``with server:`` starts it and stops it, whatever happens inside."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Peer:
    """A one-connection stdlib server on loopback running `handler(conn)` in a thread.

    The handler's exception (if any) is re-raised by the ``with`` block's end,
    so a failed check in the peer fails the test.
    """

    def __init__(
        self,
        handler: Callable[[socket.socket], Any],
        host: str = "127.0.0.1",
        timeout: float = TIMEOUT,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.timeout = timeout
        self.listener = StdSocket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(4)
        self.listener.settimeout(timeout)
        self.port: int = self.listener.getsockname()[1]
        self.address = (host, self.port)
        self.error: BaseException | None = None
        self.result: Any = None
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, args=(handler,), daemon=True)
        self.thread.start()

    def _run(self, handler: Callable[[socket.socket], Any]) -> None:
        try:
            with self.listener:
                conn, _ = self.listener.accept()
            self.conn = conn
            with conn:
                conn.settimeout(self.timeout)
                self.result = handler(conn)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Peer:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if typ is not None:
            # The test failed: unblock the handler rather than wait for its timeout.
            self.listener.close()
            if self.conn is not None:
                with contextlib.suppress(OSError):
                    self.conn.shutdown(socket.SHUT_RDWR)
        self.thread.join(self.timeout * 2)
        self.listener.close()
        if typ is None:
            assert not self.thread.is_alive(), "the peer did not finish"
            if self.error is not None:
                raise self.error


def echo(conn: socket.socket) -> None:
    """Send back everything until the client's EOF."""
    while data := conn.recv(65536):
        conn.sendall(data)


class FakeClock:
    """A gateway's monotonic clock, moved only by the test (Gateway(clock=...))."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
