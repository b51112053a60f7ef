"""Making the namespace: the syscalls, their failures in plain words, the setup steps.

Python 3.11 has no ``os.unshare`` (3.12 added it), so the syscalls go through
``ctypes`` on the C library (``unshare(2)``, ``mount(2)``): it names the exact
syscall and errno when one is refused, which the ``unshare(1)`` binary would
hide behind its own message. ``ip(8)`` (iproute2) brings ``lo`` up and adds
the routes, and ``nft(8)`` loads the ruleset: both talk netlink, which is
too much to rewrite here.

Everything in this module runs in the helper process (enter.py), a fresh
single-threaded interpreter, because ``unshare(CLONE_NEWUSER)`` is refused
to a process with more than one thread (``tether run`` has several).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

CLONE_NEWNS = 0x00020000  # <linux/sched.h>
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096  # <linux/mount.h>
MS_REC = 16384
MS_PRIVATE = 1 << 18
SETUP_TIMEOUT = 10.0  # seconds for one ip/nft run: they return in milliseconds

_FLAG_NAMES = ((CLONE_NEWUSER, "CLONE_NEWUSER"), (CLONE_NEWNET, "CLONE_NEWNET"),
               (CLONE_NEWNS, "CLONE_NEWNS"))
SYSCTLS = (
    "/proc/sys/kernel/unprivileged_userns_clone",  # Debian/Ubuntu kernels only
    "/proc/sys/user/max_user_namespaces",
    "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",  # Ubuntu 23.10+
)


class NamespaceUnavailableError(OSError):
    """The kernel refused to make the namespaces (which syscall, why, what to enable)."""


class IsolateSetupError(OSError):
    """A step of the namespace's setup failed (which step, what it said)."""


# -- the syscalls (injection points: tests pass their own `unshare`) ----------------

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def libc_unshare(flags: int) -> None:
    """unshare(2); OSError with the errno on refusal."""
    if _c().unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def libc_mount(source: str | None, target: str, flags: int) -> None:
    """mount(2) with no filesystem type and no data (bind and propagation changes)."""
    src = source.encode() if source is not None else None
    if _c().mount(src, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def flag_names(flags: int) -> str:
    return "|".join(name for bit, name in _FLAG_NAMES if flags & bit) or "0"


def read_sysctls(paths: tuple[str, ...] = SYSCTLS) -> dict[str, str]:
    """The sysctls that decide whether unprivileged user namespaces work (those that exist)."""
    found = {}
    for path in paths:
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        found[path.removeprefix("/proc/sys/").replace("/", ".")] = value
    return found


def explain_refusal(flags: int, err: int, euid: int, sysctls: dict[str, str]) -> str:
    """What was refused and what to enable, in words (pure: tests feed it every case)."""
    call = f"unshare({flag_names(flags)})"
    name = errno.errorcode.get(err, str(err))
    head = f"tether run --isolate: the kernel refused {call}: {name} ({os.strerror(err)})"
    facts = ", ".join(f"{k} = {v}" for k, v in sorted(sysctls.items()))
    seen = f"; here: {facts}" if facts else ""
    if err == errno.EINVAL:
        fix = ("this kernel lacks user or network namespaces (CONFIG_USER_NS, CONFIG_NET_NS); "
               "use a kernel built with them")
    elif err == errno.ENOSPC:
        fix = ("the limit of user namespaces is reached or zero: raise it "
               "(sysctl -w user.max_user_namespaces=15000)")
    elif err == errno.EPERM and flags & CLONE_NEWUSER:
        fix = ("unprivileged user namespaces are not allowed: enable them "
               "(sysctl -w kernel.unprivileged_userns_clone=1 on Debian/Ubuntu kernels, "
               "user.max_user_namespaces > 0, and on Ubuntu 23.10+ "
               "kernel.apparmor_restrict_unprivileged_userns=0), or run as root; in a container, "
               "the seccomp profile must allow unshare(2)")
    elif err == errno.EPERM:
        fix = ("making network and mount namespaces needs CAP_SYS_ADMIN: run as root (in a "
               "container: with CAP_SYS_ADMIN and a seccomp profile that allows unshare(2))"
               if euid == 0 else "run as root or enable unprivileged user namespaces")
    else:
        fix = "see unshare(2) for this error"
    return f"{head}; {fix}{seen}"


# -- the setup steps ------------------------------------------------------------------


def unshare_flags(euid: int, user_namespace: bool | None = None) -> int:
    """Root needs no user namespace; anyone else gets one, where they are root.

    `user_namespace` True makes one for root too (the tests run the
    unprivileged path that way, on a machine where they are root).
    """
    base = CLONE_NEWNET | CLONE_NEWNS
    wanted = euid != 0 if user_namespace is None else user_namespace
    return base | CLONE_NEWUSER if wanted else base


def enter_namespaces(
    *,
    uid: int,
    gid: int,
    user_namespace: bool | None = None,
    unshare: Callable[[int], None] | None = None,
    sysctls: Callable[[], dict[str, str]] | None = None,
) -> int:
    """Make the namespaces for this process; the flags used. NamespaceUnavailableError if refused.

    `uid`/`gid` are the caller's real ids, read before (after unshare,
    getuid() is the overflow uid until the map is written). Without root,
    the new user namespace maps this user to its root (uid 0), which holds
    the capabilities the setup needs; :func:`drop_to_user` gives them up
    again before the command runs.
    """
    flags = unshare_flags(uid, user_namespace)
    try:
        # Looked up at call time: a test's helper replaces these to simulate a refusal.
        (unshare or libc_unshare)(flags)
    except OSError as exc:
        err = exc.errno or errno.EPERM
        facts = (sysctls or read_sysctls)()
        raise NamespaceUnavailableError(err, explain_refusal(flags, err, uid, facts)) from exc
    if flags & CLONE_NEWUSER:
        _map_ids(inner_uid=0, inner_gid=0, outer_uid=uid, outer_gid=gid, what="the setup's")
    return flags


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """An OSError inside becomes IsolateSetupError: "tether run --isolate: WHAT: why"."""
    try:
        yield
    except OSError as exc:
        raise IsolateSetupError(
            exc.errno or errno.EPERM, f"tether run --isolate: {what}: {exc.strerror or exc}"
        ) from exc


def _map_ids(*, inner_uid: int, inner_gid: int, outer_uid: int, outer_gid: int, what: str) -> None:
    """Write this process's uid/gid maps (one id each) in its new user namespace."""
    with _step(f"cannot write {what} user namespace id maps (uid {inner_uid} -> {outer_uid}, "
               f"gid {inner_gid} -> {outer_gid})"):
        # "deny" first: an unprivileged gid_map is refused otherwise (user_namespaces(7)).
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{inner_uid} {outer_uid} 1")
        Path("/proc/self/gid_map").write_text(f"{inner_gid} {outer_gid} 1")


def drop_to_user(uid: int, gid: int, *, unshare: Callable[[int], None] = libc_unshare) -> None:
    """Give up the setup's capabilities before the command runs (non-root only).

    A second user namespace, nested, maps the user's own uid back to the
    first one's root: the command runs as that uid, so ``execve`` clears its
    capabilities, and the network namespace (owned by the first user
    namespace) is out of its reach: it cannot change the rules.
    """
    with _step("unshare(CLONE_NEWUSER) for the command (to drop the setup's capabilities) "
               "was refused"):
        unshare(CLONE_NEWUSER)
    _map_ids(inner_uid=uid, inner_gid=gid, outer_uid=0, outer_gid=0, what="the command's")


def private_mounts(mount: Callable[[str | None, str, int], None] = libc_mount) -> None:
    """Stop mounts made here from propagating to the host (systemd makes / shared)."""
    with _step("mount(/, MS_REC|MS_PRIVATE) failed"):
        mount(None, "/", MS_REC | MS_PRIVATE)


def bind_resolv_conf(
    source: str, target: str = "/etc/resolv.conf",
    mount: Callable[[str | None, str, int], None] = libc_mount,
) -> None:
    """Bind the namespace's resolv.conf (nameserver 127.0.0.1) over the system's."""
    with _step(f"cannot bind {source} over {target}"):
        mount(source, target, MS_BIND)


def tool(name: str, package: str) -> str:
    """The path of a setup tool, or IsolateSetupError naming the package to install."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise IsolateSetupError(
            errno.ENOENT,
            f"tether run --isolate needs {name}(8), which is not installed: install {package} "
            f"(Debian/Ubuntu: apt-get install {package})",
        )
    return found


def _run(argv: list[str], what: str, stdin: str | None = None) -> None:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=SETUP_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IsolateSetupError(errno.EIO, f"tether run --isolate: {what}: {exc}") from exc
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().replace("\n", " | ")
        raise IsolateSetupError(
            errno.EIO,
            f"tether run --isolate: {what} failed ({' '.join(argv[:4])}...: exit "
            f"{done.returncode}): {said}",
        )


def network_setup(ruleset: str) -> None:
    """``lo`` up, every address local (so any connect reaches the rules), the ruleset loaded.

    The local default routes make a connect to any address leave through
    ``lo`` (instead of failing with ENETUNREACH before the rules see it);
    the nat rule then sends it to the agent, and the filter drops anything
    else. There is still no interface but ``lo``.
    """
    ip = tool("ip", "iproute2")
    nft = tool("nft", "nftables")
    _run([ip, "link", "set", "lo", "up"], "bringing lo up")
    _run([ip, "route", "add", "local", "0.0.0.0/0", "dev", "lo"], "routing IPv4 to lo")
    if Path("/proc/sys/net/ipv6").exists():
        _run([ip, "-6", "route", "add", "local", "::/0", "dev", "lo"], "routing IPv6 to lo")
    _run([nft, "-f", "-"], "loading the nftables ruleset", stdin=ruleset)
