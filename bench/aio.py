"""The event-loop workloads: asyncio streams on the default loop and on uvloop.

``aio-connrate``, ``aio-download``, ``aio-upload`` and ``aio-rtt`` are the
blocking workloads (bench/connrate.py, bulk.py, rtt.py) written the way an
asyncio program writes them: ``asyncio.open_connection("127.0.0.1", port)``
and its (reader, writer). The client is a process of its own
(``python -m bench.aio``), one per loop, path and repetition, running every
selected event-loop workload in turn. On the Tether paths it calls
``tether.install()`` first and nothing else changes: the connections go
through the loop hooks (``tether.aio``), which is what is measured; on the
direct path the same loop connects straight to the target.

**Each Tether row is verified to have gone through the gateway.** A loop
that bypasses the hooks (uvloop connects in C) would connect directly and
look fast. So the suite counts the gateway's audit decision lines with the
outcome "connected" before and after the client process, and refuses the
row (an error naming the shortfall) unless the gateway saw every connection
the client made; and the client checks, on the first connection of every
workload and one more after it (outside the timed part), that its socket's
kernel peer is the gateway's endpoint (the target's address on the direct
path).
"""

from __future__ import annotations

import _socket
import argparse
import asyncio
import contextlib
import json
import os
import struct
import sys
import time
from array import array
from collections.abc import Callable, Coroutine
from pathlib import Path as FsPath
from typing import Any

from bench.bulk import BenchError
from bench.connrate import first_byte_ok, rate_result
from bench.rtt import latency_result

LOOPS = ("asyncio", "uvloop")
KINDS = ("download", "upload", "rtt", "connrate")
WORKLOADS = tuple(f"aio-{k}" for k in KINDS)
# The paths an event-loop client is measured on: the loop direct, and through Tether.
PATHS = ("direct", "tether-tcp", "tether-unix")

CHUNK = 1 << 20
_HEADER = struct.Struct("!Q")
MESSAGE = 64
RTT_WARMUP = 500  # as bench/rtt.py
CONN_WARMUP = 50  # as bench/connrate.py
TIMEOUT = 10.0  # one connect or read
HOST = "127.0.0.1"
# The audit log is written in batches (gateway/audit.py FLUSH_DELAY, 20 ms):
# how long the suite waits for the last lines after the client exits.
AUDIT_SETTLE = 5.0
CONNECTED = b'"outcome":"connected"'
REFUSED = "row refused"  # in a result's error: the report shows "refused", not a figure


def recorded_name(loop: str, kind: str) -> str:
    """The workload name results are kept under: the loop is part of it."""
    return f"{loop}-{kind}"


# -- the client process -------------------------------------------------------------------


class Peers:
    """Checks that a connection's kernel peer is where this path must connect.

    The gateway's endpoint (``host:port`` or ``unix:/path``) on a Tether
    path; the target itself on the direct path.
    """

    def __init__(self, gateway: str | None) -> None:
        self.gateway = gateway
        self.checked = 0

    def check(self, writer: asyncio.StreamWriter, port: int) -> None:
        expect = self.gateway or f"{HOST}:{port}"
        fd = writer.get_extra_info("socket").fileno()
        raw = _socket.socket(fileno=fd)  # only to ask the kernel; detached below
        try:
            peer = raw.getpeername()
        finally:
            raw.detach()
        seen = f"unix:{peer}" if isinstance(peer, str) else f"{peer[0]}:{peer[1]}"
        if seen != expect:
            raise BenchError(f"the connection's peer is {seen}, not {expect}: it did not "
                             f"take the path being measured; {REFUSED}")
        self.checked += 1


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def connrate(port: int, count: int, budget: float, peers: Peers) -> dict[str, Any]:
    open_connection = asyncio.open_connection
    for i in range(CONN_WARMUP):
        reader, writer = await asyncio.wait_for(open_connection(HOST, port), TIMEOUT)
        if i == 0:
            peers.check(writer, port)
        await reader.read(1)
        await _close(writer)
    samples = array("q")
    errors: list[str] = []
    clock = time.perf_counter_ns
    cpu = time.process_time()
    start = time.perf_counter()
    deadline = start + budget
    truncated = False
    opened = CONN_WARMUP
    for i in range(count):
        t0 = clock()
        try:
            opened += 1
            reader, writer = await asyncio.wait_for(open_connection(HOST, port), TIMEOUT)
            try:
                first = await asyncio.wait_for(reader.read(1), TIMEOUT)
            finally:
                await _close(writer)
        except (OSError, TimeoutError) as exc:
            first = f"{type(exc).__name__}: {exc}".encode()
        if not first_byte_ok(first, errors):
            continue
        samples.append(clock() - t0)
        if time.perf_counter() > deadline:
            truncated = i + 1 < count
            break
    elapsed = time.perf_counter() - start
    result = rate_result(samples, elapsed, cpu, count, truncated, errors)
    reader, writer = await asyncio.wait_for(open_connection(HOST, port), TIMEOUT)
    peers.check(writer, port)  # and after the batch, outside the timed part
    await reader.read(1)
    await _close(writer)
    return result | {"connections": opened + 1}


async def _connect(port: int, peers: Peers) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # A 1 MiB stream limit, as the blocking workloads read 1 MiB at a time.
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, port, limit=CHUNK), TIMEOUT)
    peers.check(writer, port)
    return reader, writer


async def download(port: int, size: int, limit: float, peers: Peers) -> dict[str, Any]:
    reader, writer = await _connect(port, peers)
    try:
        start = time.perf_counter()
        deadline = start + limit
        writer.write(_HEADER.pack(size))
        got = 0
        while got < size:
            chunk = await asyncio.wait_for(reader.read(CHUNK), TIMEOUT)
            if not chunk:
                raise BenchError(f"download: the stream ended after {got} of {size} bytes")
            got += len(chunk)
            if time.perf_counter() > deadline:
                raise BenchError(f"download: over the {limit:g} s limit at {got} bytes")
        elapsed = time.perf_counter() - start
    finally:
        await _close(writer)
    return {"mb_s": size / elapsed / 1e6, "seconds": elapsed, "bytes": size, "connections": 1}


async def upload(port: int, size: int, limit: float, peers: Peers) -> dict[str, Any]:
    payload = bytes(CHUNK)
    reader, writer = await _connect(port, peers)
    try:
        start = time.perf_counter()
        deadline = start + limit
        writer.write(_HEADER.pack(size))
        left = size
        while left > 0:
            n = min(left, CHUNK)
            writer.write(payload if n == CHUNK else payload[:n])
            await asyncio.wait_for(writer.drain(), TIMEOUT)
            left -= n
            if time.perf_counter() > deadline:
                raise BenchError(f"upload: over the {limit:g} s limit, {left} bytes left")
        ack = await asyncio.wait_for(reader.read(1), TIMEOUT)
        elapsed = time.perf_counter() - start
        if ack != b"k":
            raise BenchError(f"upload: the sink answered {ack!r}, not b'k'")
    finally:
        await _close(writer)
    return {"mb_s": size / elapsed / 1e6, "seconds": elapsed, "bytes": size, "connections": 1}


async def rtt(port: int, count: int, limit: float, peers: Peers) -> dict[str, Any]:
    msg = b"x" * MESSAGE
    samples = array("q")
    reader, writer = await _connect(port, peers)
    clock = time.perf_counter_ns
    readexactly, write = reader.readexactly, writer.write
    try:
        deadline = time.perf_counter() + limit
        for i in range(RTT_WARMUP + count):
            t0 = clock()
            write(msg)
            await readexactly(MESSAGE)
            t1 = clock()
            if i >= RTT_WARMUP:
                samples.append(t1 - t0)
            if i % 1000 == 0 and time.perf_counter() > deadline:
                raise BenchError(f"round trips: over the {limit:g} s limit after {i}")
    finally:
        await _close(writer)
    return latency_result(samples) | {"connections": 1}


def jobs(spec: dict[str, Any], peers: Peers) -> dict[str, Callable[[], Coroutine[Any, Any, Any]]]:
    ports, limits = spec["ports"], spec["limits"]
    size = spec["bulk_mib"] << 20
    return {
        "download": lambda: download(ports["source"], size, limits["bulk"], peers),
        "upload": lambda: upload(ports["sink"], size, limits["bulk"], peers),
        "rtt": lambda: rtt(ports["echo"], spec["round_trips"], limits["rtt"], peers),
        "connrate": lambda: connrate(ports["greet"], spec["connections"], spec["conn_seconds"],
                                     peers),
    }


async def run_all(spec: dict[str, Any]) -> dict[str, Any]:
    peers = Peers(spec["gateway"])
    table = jobs(spec, peers)
    out: dict[str, Any] = {}
    for kind in spec["kinds"]:
        try:
            out[kind] = await table[kind]()
        except Exception as exc:  # one workload's failure is its row's, not the run's
            out[kind] = {"error": f"{type(exc).__name__}: {exc}", "connections": 0}
    return out


def client_main(argv: list[str] | None = None) -> int:
    """``python -m bench.aio SPEC_JSON``: run the workloads, print one JSON line of results."""
    p = argparse.ArgumentParser(prog="python -m bench.aio")
    p.add_argument("spec", help="the run's settings as JSON (written by the suite)")
    spec = json.loads(p.parse_args(argv).spec)
    if spec["tether"]:
        import tether

        tether.install()  # TETHER_GATEWAY / _APP / _KEY from the suite
    if spec["loop"] == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        loop_class = type(runner.get_loop())
        results = runner.run(run_all(spec))
    expected = "uvloop" if spec["loop"] == "uvloop" else "asyncio"
    if expected not in loop_class.__module__:
        raise SystemExit(f"bench.aio: the loop is {loop_class.__module__}.{loop_class.__name__}, "
                         f"not {spec['loop']}")
    sys.stdout.write(json.dumps(results) + "\n")
    sys.stdout.flush()
    return 0


# -- the suite's side ----------------------------------------------------------------------


class AuditCounter:
    """Connections the gateway made, from its audit log: decision lines with "connected"."""

    def __init__(self, path: FsPath) -> None:
        self.path = path
        self.offset = 0
        self.total = 0
        self._tail = b""

    def count(self) -> int:
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as f:
            f.seek(self.offset)
            data = self._tail + f.read()
            self.offset = f.tell()
            # Only whole lines: a batch is one write(2), but read mid-write is possible.
            cut = data.rfind(b"\n") + 1
            self._tail = data[cut:]
            self.total += data[:cut].count(CONNECTED)
        return self.total


def client_spec(args: argparse.Namespace, loop: str, kinds: list[str], ports: dict[str, int],
                gateway: str | None, limits: dict[str, float]) -> dict[str, Any]:
    """What one client process runs; `gateway` None for the loop direct."""
    return {
        "loop": loop,
        "kinds": kinds,
        "tether": gateway is not None,
        "gateway": gateway,
        "ports": ports,
        "bulk_mib": args.bulk_mib,
        "round_trips": args.round_trips,
        "connections": args.connections,
        "conn_seconds": args.conn_seconds,
        "limits": limits,
    }


def run_client(spec: dict[str, Any], env: dict[str, str], prefix: list[str],
               timeout: float) -> dict[str, Any]:
    """One client process (pinned like every child), its results by kind."""
    import subprocess

    proc = subprocess.run([*prefix, sys.executable, "-m", "bench.aio", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BenchError(f"bench.aio exited {proc.returncode}: {' | '.join(tail)}")
    results: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def verify_through_gateway(results: dict[str, Any], counter: AuditCounter,
                           before: int) -> str | None:
    """None when the gateway saw every connection the client made, else why not."""
    made = sum(int(r.get("connections", 0)) for r in results.values())
    deadline = time.monotonic() + AUDIT_SETTLE
    seen = counter.count() - before
    while seen < made and time.monotonic() < deadline:
        time.sleep(0.02)
        seen = counter.count() - before
    if seen < made:
        return (f"the gateway logged {seen} of the {made} connections the client made: "
                f"the loop connected around it; {REFUSED}")
    return None


if __name__ == "__main__":
    os.environ.pop("PYTHONASYNCIODEBUG", None)  # debug mode would measure itself
    raise SystemExit(client_main())
