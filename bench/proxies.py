"""Debian's SOCKS5 servers, set up by the suite: Dante (``danted``) and microsocks.

Both are installed with apt-get when missing (root only; ``apt-get update``
is run first when the install fails on stale lists), configured for
127.0.0.1 only with no authentication, and run in the foreground as pinned
children of the suite, each on a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

from bench.procs import Child, Pinning, free_port, port_open, wait_until

PACKAGES = {"dante": "dante-server", "microsocks": "microsocks"}
BINARIES = {"dante": "danted", "microsocks": "microsocks"}
SEARCH = ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
APT_TIMEOUT = 600.0


def find_binary(proxy: str) -> str | None:
    name = BINARIES[proxy]
    found = shutil.which(name)
    if found:
        return found
    for d in SEARCH:
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ensure_installed(proxies: list[str], log: Path) -> dict[str, str]:
    """Install what is missing; returns {proxy: reason} for those still unavailable."""
    missing = [p for p in proxies if find_binary(p) is None]
    if not missing:
        return {}
    if os.geteuid() != 0:
        return {p: f"{BINARIES[p]} not installed (run as root or: apt-get install "
                   f"{PACKAGES[p]})" for p in missing}
    if shutil.which("apt-get") is None:
        return {p: "not installed and no apt-get on this machine" for p in missing}
    pkgs = [PACKAGES[p] for p in missing]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *pkgs]
    with log.open("a") as out:
        print(f"bench: installing {' '.join(pkgs)} with apt-get", flush=True)
        rc = subprocess.run(install, stdout=out, stderr=subprocess.STDOUT, env=env,
                            timeout=APT_TIMEOUT, check=False).returncode
        if rc != 0:
            subprocess.run(["apt-get", "update", "-q"], stdout=out, stderr=subprocess.STDOUT,
                           env=env, timeout=APT_TIMEOUT, check=False)
            subprocess.run(install, stdout=out, stderr=subprocess.STDOUT, env=env,
                           timeout=APT_TIMEOUT, check=False)
    return {p: f"apt-get install {PACKAGES[p]} failed (see {log})"
            for p in missing if find_binary(p) is None}


def package_version(proxy: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", PACKAGES[proxy]],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "?"


def dante_config(port: int, logfile: Path) -> str:
    # The leanest Dante: no authentication, and only errors logged (Tether, by
    # contrast, writes its audit lines on every connection).
    return textwrap.dedent(
        f"""\
        logoutput: {logfile}
        internal: 127.0.0.1 port = {port}
        external: 127.0.0.1
        clientmethod: none
        socksmethod: none
        user.privileged: root
        user.unprivileged: nobody
        client pass {{
            from: 127.0.0.1/32 to: 127.0.0.1/32
            log: error
        }}
        socks pass {{
            from: 127.0.0.1/32 to: 127.0.0.1/32
            command: connect
            log: error
        }}
        """
    )


class SocksServer:
    """A running SOCKS5 server child: `port` on 127.0.0.1."""

    def __init__(self, proxy: str, workdir: Path, pinning: Pinning, tag: str = "") -> None:
        binary = find_binary(proxy)
        if binary is None:
            raise RuntimeError(f"{BINARIES[proxy]} is not installed")
        self.proxy = proxy
        self.port = free_port()
        self.log_path = workdir / f"{proxy}{tag}.log"
        self._log = self.log_path.open("w")
        if proxy == "dante":
            conf = workdir / f"danted{tag}.conf"
            conf.write_text(dante_config(self.port, workdir / f"danted{tag}-sockd.log"))
            argv = [binary, "-f", str(conf), "-N", "1"]
        else:
            argv = [binary, "-i", "127.0.0.1", "-p", str(self.port)]
        self.child = Child(proxy, argv, pinning=pinning, stdout=self._log, stderr=self._log)

    @property
    def pid(self) -> int:
        return self.child.pid

    def wait_ready(self, timeout: float = 20.0) -> None:
        try:
            wait_until(lambda: port_open(self.port), timeout, self.proxy, alive=self.child.alive)
        except RuntimeError as exc:
            self._log.flush()
            raise RuntimeError(f"{exc}\n{self.log_path.read_text()[-2000:]}") from exc

    def stop(self) -> None:
        self.child.stop()
        self._log.close()
