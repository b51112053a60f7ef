"""UDP test helpers (importable as `udpsupport`): echo peers and an in-thread gateway.

Everything is on loopback. The gateway runs in a thread (EmbeddedGateway)
with a policy that allows UDP to the echo peers' ports only, so any other
loopback port is a denied destination; the client side is
``tether.socket`` used with ``settings.configure()`` (no install(): the
in-thread gateway needs the stdlib's sockets).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from support import FakeClock, stdlib_socket_class

from tether.client import control
from tether.client import settings as client_settings
from tether.client.settings import Settings
from tether.config import parse_config
from tether.endpoint import parse_endpoint
from tether.gateway.core.registry import SocketRecord
from tether.gateway.embedded import EmbeddedGateway

TIMEOUT = 5.0
IDLE = 60.0  # [gateway] idle_timeout of the UDP test gateway


StdSocket = stdlib_socket_class()


class UdpPeer:
    """A stdlib UDP socket on loopback that echoes (or only records) what it gets."""

    def __init__(self, host: str = "127.0.0.1", *, echo: bool = True) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = StdSocket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.address = (host, self.port)
        self.echo = echo
        self.received: list[tuple[bytes, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received.append((data, source))
            if self.echo:
                self.sock.sendto(data, source)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.sock.close()


class UdpEnv:
    """An in-thread gateway allowing UDP to `peers` (and to nothing else)."""

    def __init__(self, peers: list[UdpPeer], clock: FakeClock, extra_allow: list[str]) -> None:
        self.peers = peers
        self.clock = clock
        allow = [f"{_host(p.address[0])}:{p.port}/udp" for p in peers]
        config = parse_config({
            "gateway": {"listen": ["127.0.0.1:0"], "idle_timeout": IDLE},
            "resolver": {"mode": "static", "hosts": {"echo.test": ["127.0.0.1"]}},
            "policy": {"allow": [*allow, *extra_allow]},
            "apps": {"a": {"key": "key-a"}},
        })
        self.gw = EmbeddedGateway(config, clock=clock)
        self.gw.start()
        self.address = str(self.gw.endpoints[0])
        client_settings.configure(
            Settings(gateway=parse_endpoint(self.address), app="a", key="key-a")
        )

    def records(self) -> list[SocketRecord]:
        gateway = self.gw.gateway
        assert gateway is not None
        return self.gw.call(lambda: list(gateway.registry))

    def sweep(self) -> int:
        gateway = self.gw.gateway
        assert gateway is not None
        return self.gw.call(gateway.sweep)

    def close(self) -> None:
        client_settings.configure(None)
        control.close_all()
        self.gw.stop()


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@contextmanager
def udp_env(n_peers: int = 2, extra_allow: list[str] | None = None) -> Iterator[UdpEnv]:
    peers = [UdpPeer() for _ in range(n_peers)]
    env = UdpEnv(peers, FakeClock(), extra_allow or [])
    try:
        yield env
    finally:
        env.close()
        for peer in peers:
            peer.close()


def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def free_udp_port() -> int:
    """A loopback UDP port nothing listens on (bound, then closed)."""
    with StdSocket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port
