"""Proxy memory per idle connection: hold `count` connections open, measure growth.

Against a freshly started proxy: a warm-up of connections opened and closed
(so one-time costs are not counted), the proxy's memory, then `count`
connections opened one after another, each then confirmed by the first
byte of the ``hello`` target and left idle, a pause, the memory again. Growth
divided by the connections held is the figure; RSS and PSS are both summed
over the proxy's process tree (the same thing for one process; PSS counts
the pages that Dante's processes share once).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from bench.paths import Path
from bench.procs import memory_kib

WARMUP = 100
SETTLE = 1.0
SOCKET_TIMEOUT = 10.0
MAX_ERRORS = 50


def idle_connections(path: Path, pids: Callable[[], list[int]], port: int, warm_port: int,
                     count: int, limit: float) -> dict[str, Any]:
    for _ in range(WARMUP):
        s = path.connect(warm_port, SOCKET_TIMEOUT)
        s.recv(1)
        s.close()
    time.sleep(SETTLE)
    rss0, pss0 = memory_kib(pids())
    held: list[Any] = []
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + limit
    try:
        # Connect them all first, then read every first byte: a proxy that
        # delays the first byte (microsocks: Nagle against a delayed ACK)
        # then costs its delay once, not once per connection.
        for _ in range(count):
            if time.perf_counter() > deadline:
                errors.append(f"over the {limit:g} s limit with {len(held)} connected")
                break
            try:
                held.append(path.connect(port, SOCKET_TIMEOUT))
            except OSError as exc:
                errors.append(f"connect: {exc}")
                if len(errors) >= MAX_ERRORS:
                    break
        for s in held:
            try:
                if s.recv(1) != b"!":
                    errors.append("wrong first byte")
            except OSError as exc:
                errors.append(f"first byte: {exc}")
        opened = time.perf_counter() - start
        time.sleep(SETTLE)
        rss1, pss1 = memory_kib(pids())
        processes = len(pids())
    finally:
        _close_all(held, deadline)
    n = max(1, len(held))
    return {
        "rss_kib_per_conn": (rss1 - rss0) / n,
        "pss_kib_per_conn": (pss1 - pss0) / n,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "held": len(held),
        "errors": len(errors),
        "error_samples": errors[:3],
        "open_seconds": opened,
        "processes": processes,
    }


def _close_all(held: list[Any], deadline: float) -> None:
    """Let the target close first (it does on any byte), then close ours.

    The side that closes first keeps the TIME_WAIT state; on the target's
    side it costs no proxy or client ports.
    """
    for s in held:
        with contextlib.suppress(OSError):
            s.sendall(b"q")
    for s in held:
        with contextlib.suppress(OSError):
            if time.perf_counter() < deadline + 60:
                s.settimeout(1.0)
                s.recv(1)  # the target's EOF
        with contextlib.suppress(OSError):
            s.close()
