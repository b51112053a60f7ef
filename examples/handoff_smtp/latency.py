"""Handoff latency: pickle.dumps in one process -> first byte read in another.

Two processes pass one live tether socket back and forth over a
multiprocessing Pipe. Before each handoff the holder sends the peer one byte
and the peer answers with one byte; the holder does not read it. The clock
starts just before ``pickle.dumps(sock)`` and stops when the next holder's
first ``recv(1)`` returns that answer (``time.perf_counter_ns``:
CLOCK_MONOTONIC, one clock for every process on Linux). Loopback only: a
gateway child, a stdlib peer in this process.

    python examples/handoff_smtp/latency.py                 # 200 handoffs
    python examples/handoff_smtp/latency.py --handoffs 1000 --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tether.devmode import GatewayProcess

WARMUP = 10


def peer_server() -> tuple[socket.socket, threading.Thread]:
    """Answers every byte it gets with one byte, until EOF."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(b"q" * len(data))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def holder(
    address: str, app: str, key: str, inbox: Any, outbox: Any, results: Any, total: int
) -> None:
    import tether

    tether.install(gateway=address, app=app, key=key)
    samples: list[tuple[int, int, int, int]] = []
    while True:
        msg = inbox.recv()
        if msg[0] == "stop":
            results.put(("samples", samples))
            return
        if msg[0] == "start":
            sock = socket.create_connection(("127.0.0.1", msg[1]), timeout=30)
            hop = 0
        else:
            _, hop, t0, dumps_ns, payload = msg
            t_loads = time.perf_counter_ns()
            sock = pickle.loads(payload)
            t_resumed = time.perf_counter_ns()
            first = sock.recv(1)
            t1 = time.perf_counter_ns()
            assert first == b"q", first
            samples.append((hop, t1 - t0, dumps_ns, t_resumed - t_loads))
        if hop >= total:
            sock.close()
            results.put(("done",))
            continue
        sock.sendall(b"p")  # its answer is in flight or unread when we pickle
        t0 = time.perf_counter_ns()
        payload = pickle.dumps(sock)
        outbox.send(("hop", hop + 1, t0, time.perf_counter_ns() - t0, payload))


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description="tether handoff latency")
    parser.add_argument("--handoffs", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    total = args.handoffs + WARMUP

    listener, peer = peer_server()
    port = listener.getsockname()[1]
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "tether.toml"
        config.write_text(
            f'[gateway]\nlisten = ["127.0.0.1:0"]\n\n[policy]\nallow = ["127.0.0.1:{port}"]\n\n'
            f'[apps.bench]\nkey = "{key}"\n'
        )
        gateway = GatewayProcess(config)
        address = gateway.start()
        ctx = multiprocessing.get_context("spawn")
        in0, to0 = ctx.Pipe(duplex=False)
        in1, to1 = ctx.Pipe(duplex=False)
        results = ctx.Queue()
        procs = [
            ctx.Process(target=holder, args=(address, "bench", key, in0, to1, results, total)),
            ctx.Process(target=holder, args=(address, "bench", key, in1, to0, results, total)),
        ]
        samples: list[tuple[int, int, int, int]] = []
        try:
            for proc in procs:
                proc.start()
            to0.send(("start", port))
            assert results.get(timeout=300)[0] == "done"
            for end in (to0, to1):
                end.send(("stop",))
            for _ in procs:
                samples.extend(results.get(timeout=30)[1])
        finally:
            for proc in procs:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            gateway.stop()
            listener.close()
            peer.join(5)

    samples = [s for s in samples if s[0] > WARMUP]  # by hop number
    total_ms = [s[1] / 1e6 for s in samples]
    dumps_ms = [s[2] / 1e6 for s in samples]
    loads_ms = [s[3] / 1e6 for s in samples]
    result = {
        "handoffs": len(samples),
        "pickle_to_first_byte_ms": {
            "p50": round(statistics.median(total_ms), 3),
            "p90": round(pct(total_ms, 90), 3),
            "p99": round(pct(total_ms, 99), 3),
            "max": round(max(total_ms), 3),
        },
        "dumps_ms_p50": round(statistics.median(dumps_ms), 3),
        "loads_ms_p50": round(statistics.median(loads_ms), 3),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    if args.json:
        print(json.dumps(result))
    else:
        t = result["pickle_to_first_byte_ms"]
        assert isinstance(t, dict)
        print(f"{result['handoffs']} handoffs between 2 processes (after {WARMUP} warm-up)")
        print(f"pickle -> first byte read in the other process: p50 {t['p50']} ms, "
              f"p90 {t['p90']} ms, p99 {t['p99']} ms, max {t['max']} ms")
        print(f"  of which pickle.dumps (detach + drain): p50 {result['dumps_ms_p50']} ms, "
              f"pickle.loads (resume): p50 {result['loads_ms_p50']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
