"""The paths from the benchmark process to a target: how each opens a connection.

Every path hands the workloads a connected blocking socket object with a
timeout, TCP_NODELAY set before connect (for Tether it is applied to the
gateway's outbound socket, for PySocks to the hop to the proxy), and the
workloads then use the same calls on all of them (``sendall``,
``recv_into``, ``recv``, ``close``): whatever a path's socket class adds
to those calls is part of what it costs.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TARGET_HOST = "127.0.0.1"

ORDER = ["direct", "tether-tcp", "tether-unix", "floor", "dante", "microsocks", "tether-socks5",
         "tether-http", "tether-quota"]
LABELS = {
    "direct": "direct",
    "tether-tcp": "Tether TCP",
    "tether-unix": "Tether Unix",
    "floor": "uvloop relay (floor)",
    "dante": "Dante+PySocks",
    "microsocks": "microsocks+PySocks",
    "tether-socks5": "Tether SOCKS5+PySocks",
    "tether-http": "Tether HTTP CONNECT",
    "tether-quota": "Tether TCP, quotas on",
}
TETHER = ("tether-tcp", "tether-unix")
PROXIES = ("dante", "microsocks")
# Tether's own SOCKS5 front-end, driven by the same PySocks client as PROXIES.
TETHER_SOCKS5 = "tether-socks5"
# Tether's HTTP proxy front-end: a CONNECT tunnel per connection (http_connect).
TETHER_HTTP = "tether-http"
# Tether TCP as an app with every quota set, high enough never to bind: what
# checking and charging them costs (docs/quotas.md).
TETHER_QUOTA = "tether-quota"
# Proxy front-ends measured against PROXIES in the same run.
FRONT_ENDS = (TETHER_SOCKS5, TETHER_HTTP)


@dataclass
class Path:
    """One way to reach the targets; `connect(port, timeout)` opens a connection."""

    name: str
    connect: Callable[[int, float], Any]
    proxy_pid: Callable[[], int | None] = field(default=lambda: None)

    @property
    def label(self) -> str:
        return LABELS[self.name]


def _open(new_socket: Callable[[], Any], port: int, timeout: float) -> Any:
    """A socket from `new_socket()`, with the timeout and TCP_NODELAY, connected to `port`."""
    s = new_socket()
    try:
        s.settimeout(timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect((TARGET_HOST, port))
    except BaseException:
        s.close()
        raise
    return s


def direct() -> Path:
    def connect(port: int, timeout: float) -> socket.socket:
        return _open(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), port, timeout)

    return Path("direct", connect)


def tether(name: str, gateway: str, app: str, key: str,
           pid: Callable[[], int | None]) -> Path:
    """Tether through `gateway` (``host:port`` or ``unix:/path``), via ``tether.socket``."""
    import tether.socket as tsocket
    from tether.client.settings import Settings, configure
    from tether.endpoint import parse_endpoint

    settings = Settings(gateway=parse_endpoint(gateway), app=app, key=key)

    def new_socket() -> Any:
        # A socket takes the settings in force when it is created.
        configure(settings)
        return tsocket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def connect(port: int, timeout: float) -> Any:
        return _open(new_socket, port, timeout)

    return Path(name, connect, pid)


def pysocks(name: str, proxy_port: int, pid: Callable[[], int | None],
            username: str | None = None, password: str | None = None) -> Path:
    """PySocks (``socks.socksocket``) through a SOCKS5 server on 127.0.0.1:`proxy_port`.

    With `username`, RFC 1929 authentication (Tether's app and key: one
    more round trip per connection than Dante's and microsocks' none).
    """
    import socks

    def new_socket() -> Any:
        s = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
        s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, rdns=False,
                    username=username, password=password)
        return s

    def connect(port: int, timeout: float) -> Any:
        return _open(new_socket, port, timeout)

    return Path(name, connect, pid)


def http_connect(name: str, proxy_port: int, pid: Callable[[], int | None],
                 app: str, key: str) -> Path:
    """A plain socket tunnelled by ``CONNECT`` through an HTTP proxy on 127.0.0.1:`proxy_port`.

    What curl -p or git does: the request head with ``Proxy-Authorization:
    Basic APP:KEY``, then the 200's head read to its exact length (so the
    target's first bytes stay in the kernel for the workload), in one
    round trip to the proxy: as many as SOCKS5 without authentication.
    """
    import base64

    token = base64.b64encode(f"{app}:{key}".encode()).decode()
    established = b"HTTP/1.1 200 Connection established\r\n\r\n"

    def connect(port: int, timeout: float) -> socket.socket:
        s = _open(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM), proxy_port,
                  timeout)
        try:
            s.sendall(f"CONNECT {TARGET_HOST}:{port} HTTP/1.1\r\nHost: {TARGET_HOST}:{port}"
                      f"\r\nProxy-Authorization: Basic {token}\r\n\r\n".encode())
            head = s.recv(len(established), socket.MSG_WAITALL)
            refusal = b"" if head == established else head + s.recv(4096)
        except BaseException:
            s.close()
            raise
        if refusal:
            s.close()
            raise ConnectionError(f"{name}: CONNECT refused: {refusal!r}")
        return s

    return Path(name, connect, pid)


def pysocks_available() -> bool:
    try:
        import socks  # noqa: F401
    except ImportError:
        return False
    return True


def floor(relay_port: int, pid: Callable[[], int | None]) -> Path:
    """A plain socket through bench/floor.py's bare uvloop relay (no auth, policy, meter)."""
    from bench.floor import open_through

    def connect(port: int, timeout: float) -> Any:
        return open_through(relay_port, port, timeout)

    return Path("floor", connect, pid)
