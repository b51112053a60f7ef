"""Helpers shared by the test packages (importable as `support`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import socket
import textwrap
from dataclasses import dataclass
from pathlib import Path

from tether.devmode import GatewayProcess

APP = "tests"

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


def gateway_config(key: str, *, extra: str = "", allow: list[str] | None = None) -> str:
    rules = allow if allow is not None else ["127.0.0.0/8:*", "[::1]:*"]
    hosts = "\n".join(
        f'"{name}" = [{", ".join(repr(a).replace(chr(39), chr(34)) for a in addrs)}]'
        for name, addrs in STATIC_HOSTS.items()
    )
    allow_list = ", ".join(f'"{r}"' for r in rules)
    return textwrap.dedent(
        f"""\
        [gateway]
        listen = ["127.0.0.1:0"]

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
    ).replace("{hosts}", hosts) + extra


def start_gateway(tmp: Path, config_text: str, key: str) -> Gateway:
    config_path = tmp / "tether.toml"
    config_path.write_text(config_text)
    process = GatewayProcess(config_path)
    address = process.start()
    return Gateway(process, address, APP, key, config_path)




def stdlib_socket_class() -> type[socket.socket]:
    """The stdlib's socket class, even while tether.install() has replaced socket.socket."""
    for cls in socket.socket.__mro__:
        if cls.__module__ == "socket" and cls.__name__ == "socket":
            return cls
    raise RuntimeError("no stdlib socket class in socket.socket's MRO")


class FakeClock:
    """A gateway's monotonic clock, moved only by the test (Gateway(clock=...))."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
