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
        if not first_byte_ok(first, errors):
            continue
        samples.append(clock() - t0)
        if time.perf_counter() > deadline:
            truncated = i + 1 < count
            break
    elapsed = time.perf_counter() - start
    made = max(1, len(samples))
    proxy_us = (cpu_seconds(proxy) - proxy_cpu) / made * 1e6 if proxy else None
    return rate_result(samples, elapsed, client_cpu, count, truncated, errors) | {
        "proxy_cpu_us": proxy_us,
    }


def first_byte_ok(first: bytes, errors: list[str]) -> bool:
    """Whether a connection gave the greet server's byte; a batch gives up at MAX_ERRORS."""
    if first == b"!":
        return True
    errors.append(f"first byte {first!r}")
    if len(errors) >= MAX_ERRORS:
        raise BenchError(f"connection rate: {len(errors)} errors: {errors[:3]}")
    return False


def rate_result(samples: array[int], elapsed: float, cpu_start: float, count: int,
                truncated: bool, errors: list[str]) -> dict[str, Any]:
    """A batch's figures: the rate, one connection's p50/p99, this process's CPU per connection."""
    made = max(1, len(samples))
    ordered = sorted(samples)
    return {
        "client_cpu_us": (time.process_time() - cpu_start) / made * 1e6,
        "per_s": len(ordered) / elapsed,
        "p50_us": percentile(ordered, 50) / 1e3,
        "p99_us": percentile(ordered, 99) / 1e3,
        "count": len(ordered),
        "requested": count,
        "truncated": truncated,
        "errors": len(errors),
        "error_samples": errors[:3],
    }
