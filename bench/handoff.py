"""Handoff latency: pickle a connected socket here, first byte read in another process.

For each sample the benchmark process connects a Tether socket to the
``echo`` target, sends one byte and does not read its echo (so the stream
has a byte in flight), then starts the clock, ``pickle.dumps(sock)`` (which
detaches the socket at the gateway and collects its unread tail) and writes
the payload to a worker process over a pipe. The worker (``python -m
bench.handoff``, with its own ``TETHER_*`` settings: same app, its own
stream) does ``pickle.loads(payload)`` and ``recv(1)``; the clock stops when
that byte is in the worker's hands (``time.monotonic_ns``, one clock for
every process on the machine). p50/p99 in milliseconds.

Only Tether paths have handoff; the SOCKS paths and direct sockets show "-".
"""

from __future__ import annotations

import pickle
import select
import struct
import subprocess
import sys
import time
from array import array
from typing import IO, Any

from bench.bulk import BenchError
from bench.paths import Path
from bench.procs import Child, Pinning, python, python_env
from bench.rtt import percentile

SOCKET_TIMEOUT = 10.0
SAMPLE_TIMEOUT = 10.0
WARMUP = 20
_LEN = struct.Struct("!I")


def available() -> bool:
    """Whether this tether can hand sockets off (pickle.loads resumes them)."""
    try:
        from tether.client import handoff  # noqa: F401
    except ImportError:
        return False
    return True


class Worker:
    """The resuming process: reads payloads on stdin, answers a timestamp per byte."""

    def __init__(self, gateway: str, app: str, key: str, pinning: Pinning) -> None:
        env = python_env({"TETHER_GATEWAY": gateway, "TETHER_APP": app, "TETHER_KEY": key})
        self.child = Child("handoff-worker", [python(), "-m", "bench.handoff"], pinning=pinning,
                           env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        proc = self.child.proc
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin: IO[bytes] = proc.stdin.buffer  # type: ignore[attr-defined]
        self.stdout: IO[bytes] = proc.stdout.buffer  # type: ignore[attr-defined]
        if self._line(SAMPLE_TIMEOUT * 3) != "ready":
            self.stop()
            raise BenchError("handoff worker did not start")

    def _line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.stdout], [], [], timeout)
        if not ready:
            raise BenchError(f"handoff worker: no answer in {timeout:g} s")
        return self.stdout.readline().decode().strip()

    def resume(self, payload: bytes) -> int:
        """Send one payload; the worker's clock when it read the first byte."""
        self.stdin.write(_LEN.pack(len(payload)) + payload)
        self.stdin.flush()
        answer = self._line(SAMPLE_TIMEOUT)
        if not answer.isdigit():
            raise BenchError(f"handoff worker: {answer or 'exited'}")
        return int(answer)

    def stop(self) -> None:
        self.child.stop()


def handoffs(path: Path, worker: Worker, port: int, count: int,
             limit: float, gap: float = 0.0) -> dict[str, Any]:
    """`count` handoffs after WARMUP; `gap` seconds between them (0: back to back)."""
    samples = array("q")
    deadline = time.perf_counter() + limit
    for i in range(WARMUP + count):
        if time.perf_counter() > deadline:
            raise BenchError(f"handoff: over the {limit:g} s limit after {i}")
        s = path.connect(port, SOCKET_TIMEOUT)
        try:
            s.sendall(b"h")  # echoed back while the socket changes hands
            t0 = time.monotonic_ns()
            payload = pickle.dumps(s)
        finally:
            s.close()
        t1 = worker.resume(payload)
        if i >= WARMUP:
            samples.append(t1 - t0)
        if gap:
            time.sleep(gap)
    ordered = sorted(samples)
    return {
        "p50_ms": percentile(ordered, 50) / 1e6,
        "p99_ms": percentile(ordered, 99) / 1e6,
        "count": len(ordered),
    }


def worker_main() -> int:
    """``python -m bench.handoff``: resume each payload from stdin, read one byte."""
    import tether.socket  # noqa: F401 - the socket class pickle.loads rebuilds

    out = sys.stdout.buffer
    inp = sys.stdin.buffer
    out.write(b"ready\n")
    out.flush()
    while True:
        head = inp.read(_LEN.size)
        if len(head) < _LEN.size:
            return 0
        (n,) = _LEN.unpack(head)
        payload = inp.read(n)
        try:
            sock = pickle.loads(payload)
            try:
                sock.settimeout(SOCKET_TIMEOUT)
                first = sock.recv(1)
                t1 = time.monotonic_ns()
            finally:
                sock.close()
            answer = str(t1) if first == b"h" else f"first byte {first!r}, not b'h'"
        except Exception as exc:
            answer = f"{type(exc).__name__}: {exc}"
        out.write(answer.replace("\n", " ").encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    sys.exit(worker_main())
