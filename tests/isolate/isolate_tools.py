"""What the isolate tests need from the machine (importable as isolate_tools).

nftables is installed with apt-get when missing (root only), as bench/proxies.py
does for the SOCKS servers. A client program that is missing skips its test
on a developer's machine and fails it in CI (TETHER_REQUIRE_SERVICES=1, as
tests/support.py does for the loopback services).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest
from support import REQUIRE_SERVICES

APT_TIMEOUT = 600.0  # an apt-get install on a slow mirror


def _missing(message: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (TETHER_REQUIRE_SERVICES is set: a missing tool is a failure)")
    pytest.skip(message)


@functools.cache
def _install_nftables() -> str:
    """"" once nft(8) is there, else why not."""
    if shutil.which("nft") or os.access("/usr/sbin/nft", os.X_OK):
        return ""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "nft(8) is not installed (apt-get install nftables, as root)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nftables"]
    if subprocess.run(install, capture_output=True, env=env, timeout=APT_TIMEOUT,
                      check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env,
                       timeout=APT_TIMEOUT, check=False)
        subprocess.run(install, capture_output=True, env=env, timeout=APT_TIMEOUT, check=False)
    if shutil.which("nft") or os.access("/usr/sbin/nft", os.X_OK):
        return ""
    return "apt-get install nftables failed"


@functools.cache
def _namespaces() -> str:
    """"" if this process may make a network namespace, else the kernel's answer."""
    prefix = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    done = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30,
                          check=False)
    return "" if done.returncode == 0 else f"network namespaces refused here: {done.stderr.strip()}"


def require_isolation() -> None:
    """nftables installed (or installed now) and namespaces allowed, or skip/fail saying which."""
    why = _namespaces() or _install_nftables()
    if why:
        _missing(why)


def require_program(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        _missing(f"{name} is not installed (Debian package {package})")
        raise AssertionError("unreachable")  # pytest.skip/fail raised
    return path
