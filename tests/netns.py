"""Run a command in a new network namespace with no network but its own loopback.

Importable as `netns` (tests/ is on sys.path). ``unshare -n`` (root) or
``unshare -rn`` (an unprivileged user namespace) gives the child a network
namespace of its own: only ``lo``, brought up inside, which is not the
host's loopback, so the machine's loopback services are unreachable from
inside; a direct connect to them fails (ECONNREFUSED, or ENETUNREACH for
any other address). The mount namespace is shared, so a gateway outside is
reachable through a Unix socket path. Where namespaces are not permitted,
:func:`require_netns` skips the test with the reason the kernel gave.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest

# Inside: bring up the namespace's own loopback, then become the command.
_UP_THEN_EXEC = 'ip link set lo up && exec "$@"'


@functools.cache
def _unshare_prefix() -> tuple[tuple[str, ...], str]:
    """The unshare prefix that works here and "", or () and why none does."""
    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    if missing:
        return (), f"network namespaces need unshare(1) and ip(8); missing: {', '.join(missing)}"
    prefix = ("unshare", "-n") if os.geteuid() == 0 else ("unshare", "-rn")
    probe = subprocess.run([*prefix, "sh", "-c", _UP_THEN_EXEC, "sh", "true"],
                           capture_output=True, text=True, timeout=10, check=False)
    if probe.returncode != 0:
        why = probe.stderr.strip() or f"exit status {probe.returncode}"
        return (), f"network namespaces are not permitted here ({' '.join(prefix)}: {why})"
    return prefix, ""


def require_netns() -> None:
    """Skip the test, with the reason, where a network namespace cannot be made."""
    prefix, why = _unshare_prefix()
    if not prefix:
        pytest.skip(why)


def netns_argv(argv: list[str]) -> list[str]:
    """`argv` as run inside a new network namespace (call require_netns() first)."""
    prefix, why = _unshare_prefix()
    if not prefix:
        raise OSError(why)
    return [*prefix, "sh", "-c", _UP_THEN_EXEC, "sh", *argv]


def run_in_netns(
    argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `argv` in a new network namespace; its output captured as text."""
    return subprocess.run(netns_argv(argv), capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
