"""Development mode: a real gateway process started for you, no server to run.

:class:`GatewayProcess` runs ``python -m tether.gateway`` (the same code as
``tether serve``) as a child process on an ephemeral loopback port and waits
for its ``listening on ADDR`` line. A child process, not a thread: after
``install()`` the stdlib ``socket`` module of this process is tether's, and
the gateway must open real sockets. ``tether run`` and
``tether.install(dev=True)`` use it; so does the test suite.

The child gets the config from ``--config`` or ``./tether.toml``; if that
config defines no app of the wanted name, one is added with a random key
that only this process tree knows.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tether.client.settings import Settings
from tether.config import Config, load_config
from tether.endpoint import parse_endpoint

DEV_APP = "dev"
DEFAULT_CONFIG = "tether.toml"
START_TIMEOUT = 20.0  # a cold interpreter start plus imports; seconds


class GatewayProcess:
    """A ``tether serve`` child process; stop() sends SIGINT and waits.

    SIGINT, not SIGTERM: SIGTERM drains (live sockets get up to
    gateway.drain_timeout to finish), which serves a fleet; a development
    gateway is stopped when its app is done, so it stops at once.
    """

    def __init__(
        self,
        config_path: Path | None,
        *,
        listen: str = "127.0.0.1:0",
        prefix: list[str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.config_path = config_path  # None: the built-in defaults (no --config)
        self.listen = listen
        self.args = args or []  # more `tether serve` options
        self.prefix = prefix or []  # a command the gateway runs under (tests: prlimit)
        self.log: list[str] = []
        self.address = ""
        self.proc: subprocess.Popen[str] | None = None
        self._drainer: threading.Thread | None = None

    def start(self, timeout: float = START_TIMEOUT) -> str:
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "tether.gateway",
             *(["--config", str(self.config_path)] if self.config_path is not None else []),
             "--listen", self.listen, *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=gateway_env(),
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line.rstrip("\n"))
            found = re.search(r"listening on (\S+)", line)
            if found:
                self.address = found.group(1)
                break
        if not self.address:
            self.stop()
            raise RuntimeError("tether: the gateway did not start:\n" + "\n".join(self.log))
        # Keep reading its log so the pipe never fills and blocks the gateway.
        self._drainer = threading.Thread(target=self._drain, name="tether-gateway-log", daemon=True)
        self._drainer.start()
        return self.address

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))

    def stop(self, timeout: float = 10.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._drainer is not None:
            self._drainer.join(timeout)  # the log ends at the child's exit
        if proc.stderr is not None:
            proc.stderr.close()
        return proc.returncode

    def log_text(self) -> str:
        return "\n".join(self.log)


def gateway_env() -> dict[str, str]:
    """The environment for a gateway child: this tether importable, no TETHER_* settings.

    The gateway itself must never be tethered (TETHER_AUTOINSTALL), and a
    source checkout that is not installed must still find the package.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    import tether

    root = str(Path(tether.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def dev_config_file(config_path: str | os.PathLike[str] | None) -> tuple[Path, str, str]:
    """Write the dev gateway's config; returns (path, app, key). Raises ConfigError."""
    path: Path | None = Path(config_path) if config_path else None
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = Path(DEFAULT_CONFIG)
    config = load_config(path)  # validate the user's file before anything starts
    text = path.read_text() if path is not None else ""
    app = os.environ.get("TETHER_APP") or DEV_APP
    if app in config.apps:
        key = config.apps[app].key
    else:
        key = secrets.token_urlsafe(24)
        text += f'\n[apps.{app}]\nkey = "{key}"\n'
    fd, name = tempfile.mkstemp(prefix="tether-dev-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return Path(name), app, key


def dev_proxy_args(config: Config) -> list[str]:
    """The proxy front-ends a development gateway offers, on ephemeral loopback ports,
    unless its config places them: so `tether run` can give non-Python programs
    HTTP_PROXY and ALL_PROXY (docs/proxies.md)."""
    args = []
    if not config.http_proxy_listen:
        args += ["--http-proxy-listen", "127.0.0.1:0"]
    if not config.socks5_listen:
        args += ["--socks5-listen", "127.0.0.1:0"]
    return args


def start_dev_gateway(
    config_path: str | os.PathLike[str] | None = None,
) -> tuple[GatewayProcess, Settings]:
    path, app, key = dev_config_file(config_path)
    gateway = GatewayProcess(path, args=dev_proxy_args(load_config(path)))
    try:
        address = gateway.start()
    finally:
        path.unlink(missing_ok=True)  # read at start-up; the key should not linger on disk
    return gateway, Settings(gateway=parse_endpoint(address), app=app, key=key)
