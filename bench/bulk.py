"""Bulk transfer: one connection moves `size` bytes; MB/s (10^6 bytes per second).

Download: the client sends the size, the ``source`` server sends that many
bytes, the client reads them with ``recv_into`` into a reused 1 MiB buffer.
Upload: the client sends the size and then the bytes (``sendall`` of a reused
1 MiB buffer); the ``sink`` server answers one byte once it has them all, and
the clock stops at that byte. Connecting is not timed.
"""

from __future__ import annotations

import struct
import time
from typing import Any

from bench.paths import Path

CHUNK = 1 << 20
_HEADER = struct.Struct("!Q")
_PAYLOAD = memoryview(bytes(CHUNK))
SOCKET_TIMEOUT = 30.0


class BenchError(RuntimeError):
    pass


def download(path: Path, port: int, size: int, limit: float) -> dict[str, Any]:
    buf = memoryview(bytearray(CHUNK))
    s = path.connect(port, SOCKET_TIMEOUT)
    try:
        start = time.perf_counter()
        deadline = start + limit
        s.sendall(_HEADER.pack(size))
        got = 0
        while got < size:
            n = s.recv_into(buf)
            if n == 0:
                raise BenchError(f"download: the stream ended after {got} of {size} bytes")
            got += n
            if time.perf_counter() > deadline:
                raise BenchError(f"download: over the {limit:g} s limit at {got} bytes")
        elapsed = time.perf_counter() - start
    finally:
        s.close()
    return {"mb_s": size / elapsed / 1e6, "seconds": elapsed, "bytes": size}


def upload(path: Path, port: int, size: int, limit: float) -> dict[str, Any]:
    s = path.connect(port, SOCKET_TIMEOUT)
    try:
        start = time.perf_counter()
        deadline = start + limit
        s.sendall(_HEADER.pack(size))
        left = size
        while left > 0:
            n = min(left, CHUNK)
            s.sendall(_PAYLOAD[:n])
            left -= n
            if time.perf_counter() > deadline:
                raise BenchError(f"upload: over the {limit:g} s limit, {left} bytes left")
        ack = s.recv(1)
        elapsed = time.perf_counter() - start
        if ack != b"k":
            raise BenchError(f"upload: the sink answered {ack!r}, not b'k'")
    finally:
        s.close()
    return {"mb_s": size / elapsed / 1e6, "seconds": elapsed, "bytes": size}
