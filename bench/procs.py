"""Child processes of the suite: started pinned, waited for, stopped by PID.

Every process the suite starts is a :class:`Child`; stopping one sends
SIGTERM to that PID (SIGKILL after a grace period) and nothing else, so the
suite never touches a process it did not start.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Where the tether package under test lives (``--tether-src``): its parent dir.
TETHER_SRC = [REPO_ROOT / "src"]


class Pinning:
    """Where processes run: one CPU for everything (``--pin one``) or anywhere."""

    def __init__(self, mode: str, cpu: int | None = None) -> None:
        self.mode = mode
        self.cpu: int | None = None
        if mode == "one":
            allowed = sorted(os.sched_getaffinity(0))
            self.cpu = cpu if cpu is not None else allowed[-1]

    def apply_to_self(self) -> None:
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})

    def prefix(self) -> list[str]:
        """The ``taskset`` prefix for a child's command line (empty when not pinned)."""
        if self.cpu is None:
            return []
        taskset = shutil.which("taskset")
        if taskset is None:
            return []  # children inherit this process's affinity anyway
        return [taskset, "-c", str(self.cpu)]

    def describe(self) -> str:
        return f"one CPU (cpu {self.cpu})" if self.cpu is not None else "none"


def raise_fd_limit() -> tuple[int, int]:
    """Soft open-files limit up to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment minus TETHER_* settings, with the repo (for ``bench``) importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    paths = [str(TETHER_SRC[0]), str(REPO_ROOT)]
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    if extra:
        env.update(extra)
    return env


class Child:
    """One child process of the suite."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        pinning: Pinning,
        env: dict[str, str] | None = None,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.DEVNULL,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [*pinning.prefix(), *argv]
        # taskset execs the command, so the PID is the program's own.
        self.proc = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=cwd,
            text=True,
            start_new_session=False,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> int | None:
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(grace)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return proc.returncode


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool] | None = None
) -> None:
    """Poll `check` (bounded by `timeout`); RuntimeError names `what` if it never holds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        if check():
            return
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the process exited")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise RuntimeError(f"{what}: not ready after {timeout:g} s")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A loopback port nobody listens on right now (for servers that need one given)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (from /proc), for a multi-process proxy's memory."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory_kib(pids: Sequence[int]) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over `pids` (PSS counts shared pages once)."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return rss, pss


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of `pids` (from /proc; exited ones count 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (man 5 proc)
    return total / tick


def python() -> str:
    return sys.executable
