"""A Tether gateway for the benchmark: ``python -m tether.gateway`` as a pinned child.

Listens on loopback TCP and on a Unix socket at once. The config is what a
deployment would have: a static resolver, allow rules naming exactly the
benchmark servers' ports (so the policy check runs on every connect), one
app with a key (so every connect authenticates), and the audit log written
to a file (one decision line and one close line per connection, on the
measured path like the meter).
"""

from __future__ import annotations

import re
import secrets
import textwrap
from collections.abc import Iterable
from pathlib import Path

from bench.procs import Child, Pinning, python, python_env, wait_until

APP = "bench"
# The one app may use the gateway's whole capacity: the per-app default cap is
# half of it (core/gateway.py derive_caps), 4,500 sockets at 20,000 open files,
# below the memory test's 5,000 idle connections. The gateway-wide cap still holds.
APP_MAX_SOCKETS = 1_000_000
# The app of the tether-quota path: the same key, every quota set, none binding.
QUOTA_APP = "bench-quota"
# Far above what a benchmark moves in a minute or a day (loopback bulk runs at
# a few GB/s, the connection rate at thousands a second): checked and charged
# on every connect and chunk, never reached.
QUOTA_LIMITS = {
    "sockets": "100000",
    "connects_per_minute": "1000000000",
    "bytes_out_per_minute": '"1000TiB"',
    "bytes_out_per_day": '"100000TiB"',
    "bytes_in_per_day": '"100000TiB"',
    "datagrams_per_minute": "1000000000",
}
START_TIMEOUT = 30.0


def config_text(
    ports: Iterable[int], key: str, unix_path: Path, audit_log: Path, *, quota: bool = False
) -> str:
    """The gateway's config; `quota` adds QUOTA_APP (left out otherwise, so a
    --tether-src from before quotas still reads it)."""
    allow = ", ".join(f'"127.0.0.1:{p}"' for p in sorted(set(ports)))
    quota_app = ""
    if quota:
        limits = "".join(f"{k} = {v}\n" for k, v in QUOTA_LIMITS.items())
        quota_app = f'\n[apps.{QUOTA_APP}]\nkey = "{key}"\n\n[apps.{QUOTA_APP}.quota]\n{limits}'
    return textwrap.dedent(
        f"""\
        [gateway]
        listen = ["127.0.0.1:0", "unix:{unix_path}"]
        socks5_listen = ["127.0.0.1:0"]
        http_proxy_listen = ["127.0.0.1:0"]
        audit_log = "{audit_log}"

        [resolver]
        mode = "static"

        [resolver.hosts]
        "bench.test" = ["127.0.0.1"]

        [policy]
        allow = [{allow}]

        [apps.{APP}]
        key = "{key}"
        max_sockets = {APP_MAX_SOCKETS}
        """
    ) + quota_app


class TetherGateway:
    """One gateway child; `tcp` and `unix` are its endpoints once started."""

    def __init__(self, workdir: Path, ports: Iterable[int], pinning: Pinning,
                 name: str = "gateway", *, quota: bool = False) -> None:
        self.workdir = workdir
        self.key = secrets.token_urlsafe(24)
        self.app = APP
        self.unix_path = workdir / f"{name}.sock"
        self.config_path = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.audit_path = workdir / f"{name}-audit.log"
        self.config_path.write_text(
            config_text(ports, self.key, self.unix_path, self.audit_path, quota=quota)
        )
        self.tcp = ""
        self.unix = ""
        self.socks5 = ""  # the SOCKS5 front-end, host:port
        self.http = ""  # the HTTP proxy front-end, host:port
        self._log = self.log_path.open("w")
        self.child = Child(
            name,
            [python(), "-m", "tether.gateway", "--config", str(self.config_path)],
            pinning=pinning,
            env=python_env(),
            stderr=self._log,
        )

    @property
    def pid(self) -> int:
        return self.child.pid

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            found = re.findall(r"listening on (\S+)", self.log_path.read_text())
            for addr in found:
                if addr.startswith("unix:"):
                    self.unix = addr
                else:
                    self.tcp = addr
            socks = re.findall(r"SOCKS5 front-end at (\S+)", self.log_path.read_text())
            self.socks5 = socks[-1] if socks else ""
            http = re.findall(r"HTTP proxy front-end at (\S+)", self.log_path.read_text())
            self.http = http[-1] if http else ""
            return bool(self.tcp and self.unix and self.socks5 and self.http)

        try:
            wait_until(ready, timeout, "tether gateway", alive=self.child.alive)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.log_path.read_text()}") from exc

    def stop(self) -> None:
        self.child.stop()
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])
