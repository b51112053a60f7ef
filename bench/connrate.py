"""Connection rate: connect (through the proxy: authentication and policy
included), read the first byte the target sends, close; one after another.

The ``greet`` server writes one byte on accept and closes. Reports connections per
second over the whole batch and the p50/p99 of one connection's time. The
batch is bounded in count and in time: a path too slow to finish `count`
connections within `budget` seconds (microsocks, whose first byte waits on
a delayed ACK) is measured over the connections made by then, and the
result says so (``truncated``).
"""

from __future__ import annotations

import time
from array import array
from typing import Any

from bench.bulk import BenchError
from bench.paths import Path
from bench.procs import cpu_seconds, descendants
from bench.rtt import percentile

WARMUP = 50
SOCKET_TIMEOUT = 10.0
MAX_ERRORS = 10


def connections(path: Path, port: int, count: int, budget: float) -> dict[str, Any]:
    """Also where the CPU went: this process (the client library) and the proxy's.

    On one pinned CPU the rate is the inverse of the CPU all processes spend
    per connection, so the split says whose work to cut (bench/README.md).
    """
    for _ in range(WARMUP):
        s = path.connect(port, SOCKET_TIMEOUT)
        s.recv(1)
        s.close()
    samples = array("q")
    errors: list[str] = []
    clock = time.perf_counter_ns
    root = path.proxy_pid()
    proxy = descendants(root) if root is not None else []
    client_cpu, proxy_cpu = time.process_time(), cpu_seconds(proxy)
    start = time.perf_counter()
    deadline = start + budget
    truncated = False
    for i in range(count):
        t0 = clock()
        try:
            s = path.connect(port, SOCKET_TIMEOUT)
            try:
                first = s.recv(1)
            finally:
                s.close()
        except OSError as exc:
            first = f"{type(exc).__name__}: {exc}".encode()
        if first != b"!":
            errors.append(f"first byte {first!r}")
            if len(errors) >= MAX_ERRORS:
                raise BenchError(f"connection rate: {len(errors)} errors: {errors[:3]}")
            continue
        samples.append(clock() - t0)
        if time.perf_counter() > deadline:
            truncated = i + 1 < count
            break
    elapsed = time.perf_counter() - start
    made = max(1, len(samples))
    client_us = (time.process_time() - client_cpu) / made * 1e6
    proxy_us = (cpu_seconds(proxy) - proxy_cpu) / made * 1e6 if proxy else None
    ordered = sorted(samples)
    return {
        "client_cpu_us": client_us,
        "proxy_cpu_us": proxy_us,
        "per_s": len(ordered) / elapsed,
        "p50_us": percentile(ordered, 50) / 1e3,
        "p99_us": percentile(ordered, 99) / 1e3,
        "count": len(ordered),
        "requested": count,
        "truncated": truncated,
        "errors": len(errors),
        "error_samples": errors[:3],
    }
