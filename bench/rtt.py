"""Request/response latency: 64-byte messages, one at a time, on one connection.

Each round trip is ``sendall`` of 64 bytes and ``recv_into`` until the 64
echoed bytes are back, timed with ``perf_counter_ns``. A short warm-up is
not counted. Reports p50, p99 and mean in microseconds.
"""

from __future__ import annotations

import time
from array import array
from typing import Any

from bench.bulk import BenchError
from bench.paths import Path

MESSAGE = 64
WARMUP = 500
SOCKET_TIMEOUT = 10.0


def percentile(sorted_values: Any, q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[k])


def round_trips(path: Path, port: int, count: int, limit: float) -> dict[str, Any]:
    msg = b"x" * MESSAGE
    buf = bytearray(MESSAGE)
    view = memoryview(buf)
    samples = array("q")
    s = path.connect(port, SOCKET_TIMEOUT)
    clock = time.perf_counter_ns
    try:
        deadline = time.perf_counter() + limit
        for i in range(WARMUP + count):
            t0 = clock()
            s.sendall(msg)
            got = 0
            while got < MESSAGE:
                n = s.recv_into(view[got:])
                if n == 0:
                    raise BenchError(f"round trips: the stream ended after {i} round trips")
                got += n
            t1 = clock()
            if i >= WARMUP:
                samples.append(t1 - t0)
            if i % 1000 == 0 and time.perf_counter() > deadline:
                raise BenchError(f"round trips: over the {limit:g} s limit after {i}")
    finally:
        s.close()
    return latency_result(samples)


def latency_result(samples: array[int]) -> dict[str, Any]:
    """p50, p99 and mean in microseconds of nanosecond samples."""
    ordered = sorted(samples)
    return {
        "p50_us": percentile(ordered, 50) / 1e3,
        "p99_us": percentile(ordered, 99) / 1e3,
        "mean_us": sum(ordered) / len(ordered) / 1e3,
        "count": len(ordered),
    }
