"""Connection rate with gateway workers: ``tether serve`` vs ``tether serve --workers 2``.

``python -m bench.workers`` (and the ``workers`` workload of ``python -m
bench``) runs, for each worker count, a fresh gateway (the suite's config:
static resolver, allow rules, an app key, the audit log to a file), then
`--clients` client processes at once, each connecting through
``tether.socket`` to the ``greet`` target, reading its byte and closing,
as fast as it can for `--seconds`. Reported per worker count:

- the aggregate rate: every client's connections over the common window;
- the gateway's CPU per connection (all its processes, from /proc) and the
  clients' CPU per connection: on a 2-core machine the clients and the
  target share the cores with the workers, so the gateway's CPU per
  connection says whether a rate that does not double is the gateway's
  doing or the machine's.

Nothing is pinned: the workers need both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.gateway import APP, config_text
from bench.procs import Child, Pinning, cpu_seconds, descendants, python, python_env, wait_until
from bench.report import table
from bench.rtt import percentile

if TYPE_CHECKING:  # tether is imported late: --tether-src may point elsewhere
    from tether.endpoint import Endpoint

# Clients started at once: two per core keeps two workers busy while each
# client waits for its answers (a connection is a round trip to the gateway).
DEFAULT_CLIENTS = 4
DEFAULT_SECONDS = 8.0
QUICK_SECONDS = 3.0
# Handoffs of one socket with two workers: about half are passed on, so 500
# gives each kind a p99 of a few samples.
DEFAULT_HANDOFFS = 500
START_TIMEOUT = 60.0
CLIENT_TIMEOUT = 10.0


def _tether_once(port: int) -> bool:
    """One connection the way an app makes it: ``tether.socket`` (settings configured)."""
    import socket

    import tether.socket as tsocket

    with tsocket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(CLIENT_TIMEOUT)
        s.connect(("127.0.0.1", port))
        return bool(s.recv(1) == b"!")


def _raw_once(gateway: Endpoint, request: bytes) -> bool:
    """One connection as pre-encoded frames on a plain socket: the gateway's work, little else.

    The hello and Connect are one write; the answer frames, the target's
    byte and its close are read to EOF (the target closes first).
    """
    import socket

    with socket.socket(gateway.family, socket.SOCK_STREAM) as s:
        s.settimeout(CLIENT_TIMEOUT)
        s.connect(gateway.sockaddr)
        s.sendall(request)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data.endswith(b"!")


def client(gateway: str, key: str, port: int, seconds: float, mode: str) -> dict[str, Any]:
    """One client process: connect, read a byte, close, until `seconds` pass after "go"."""
    from functools import partial

    from tether.client.settings import Settings, configure
    from tether.endpoint import parse_endpoint
    from tether.wire import PREAMBLE, encode_frame, pb

    endpoint = parse_endpoint(gateway)
    configure(Settings(gateway=endpoint, app=APP, key=key))
    request = PREAMBLE + encode_frame(pb.ClientHello(protocol_version=1, app=APP, key=key))
    request += encode_frame(pb.Connect(transport=pb.TRANSPORT_TCP, host="127.0.0.1", port=port))
    once = (partial(_tether_once, port) if mode == "tether"
            else partial(_raw_once, endpoint, request))
    for _ in range(20):  # warm: imports, the first connections' allocations
        once()
    print("ready", flush=True)
    sys.stdin.readline()  # "go": every client starts together
    cpu = time.process_time()
    start = time.monotonic()
    end = start + seconds
    made = errors = 0
    while time.monotonic() < end:
        try:
            ok = once()
        except OSError:
            ok = False
        made += ok
        errors += not ok
    return {"count": made, "errors": errors, "elapsed": time.monotonic() - start,
            "cpu": time.process_time() - cpu}


class Gateway:
    """``python -m tether.gateway`` with --workers `workers` (1: a plain gateway)."""

    def __init__(self, workdir: Path, ports: list[int], workers: int) -> None:
        self.key = secrets.token_urlsafe(24)
        name = f"workers{workers}"
        config = workdir / f"{name}.toml"
        config.write_text(config_text(ports, self.key, workdir / f"{name}.sock",
                                      workdir / f"{name}-audit.log"))
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("w")
        self.workers = workers
        argv = [python(), "-m", "tether.gateway", "--config", str(config)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        self.child = Child(name, argv, pinning=Pinning("none"), env=python_env(),
                           stderr=self._log)
        self.tcp = ""
        self.unix = f"unix:{workdir / f'{name}.sock'}"

    def wait_ready(self) -> None:
        pattern = r"workers ready on (\S+?)," if self.workers > 1 else r"listening on (\d\S+)"

        def ready() -> bool:
            found = re.search(pattern, self.log_path.read_text())
            if found:
                self.tcp = found.group(1)
            return bool(found)

        wait_until(ready, START_TIMEOUT, f"gateway ({self.workers} workers)",
                   alive=self.child.alive)

    def stop(self) -> None:
        self.child.stop()
        self._log.close()


def run_once(workdir: Path, ports: dict[str, int], workers: int, clients: int,
             seconds: float, mode: str = "tether", via: str = "tcp") -> dict[str, Any]:
    gw = Gateway(workdir, list(ports.values()), workers)
    procs: list[subprocess.Popen[str]] = []
    try:
        gw.wait_ready()
        for _ in range(clients):
            procs.append(subprocess.Popen(
                [python(), "-m", "bench.workers", "--client", gw.tcp if via == "tcp" else gw.unix,
                 gw.key,
                 str(ports["greet"]), str(seconds), mode],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=python_env(),
            ))
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a client did not start")
        gateway_pids = descendants(gw.child.pid)
        gateway_cpu = cpu_seconds(gateway_pids)
        start = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 60)
            results.append(json.loads(out.strip().splitlines()[-1]))
        window = time.monotonic() - start
        gateway_cpu = cpu_seconds(gateway_pids) - gateway_cpu
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        gw.stop()
    count = sum(r["count"] for r in results)
    # The clients run for `seconds` each from "go"; the slowest's end bounds the window.
    elapsed = max(r["elapsed"] for r in results)
    return {
        "workers": workers,
        "clients": clients,
        "count": count,
        "errors": sum(r["errors"] for r in results),
        "per_s": count / elapsed,
        "window_s": window,
        "gateway_cpu_us": gateway_cpu / max(1, count) * 1e6,
        "client_cpu_us": sum(r["cpu"] for r in results) / max(1, count) * 1e6,
    }


def measure(workdir: Path, ports: dict[str, int], clients: int = DEFAULT_CLIENTS,
            seconds: float = DEFAULT_SECONDS, reps: int = 3,
            mode: str = "tether", via: str = "tcp") -> dict[str, Any]:
    """Both worker counts, interleaved `reps` times; medians and the ratio of the rates.

    Every CPU is allowed for the processes started here, whatever this
    process is pinned to (children inherit the affinity): the point is two
    workers on two cores.
    """
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    try:
        for rep in range(reps):
            for workers in ((1, 2) if rep % 2 == 0 else (2, 1)):
                result = run_once(workdir, ports, workers, clients, seconds, mode, via)
                runs[workers].append(result)
                print(f"  {mode} via {via} workers={workers} clients={clients}: "
                      f"{result['per_s']:,.0f} conn/s, "
                      f"gateway {result['gateway_cpu_us']:.0f} µs CPU/conn, "
                      f"clients {result['client_cpu_us']:.0f} µs CPU/conn, "
                      f"{result['errors']} errors", file=sys.stderr, flush=True)
    finally:
        os.sched_setaffinity(0, pinned)

    def median(workers: int, key: str) -> float:
        values = sorted(r[key] for r in runs[workers])
        return float(values[len(values) // 2])

    summary = {
        str(w): {k: median(w, k) for k in ("per_s", "gateway_cpu_us", "client_cpu_us")}
        for w in runs
    }
    return {"runs": runs, "median": summary, "mode": mode, "via": via, "clients": clients,
            "ratio": summary["2"]["per_s"] / summary["1"]["per_s"], "cpus": os.cpu_count()}


def handoffs(workdir: Path, ports: dict[str, int], count: int) -> dict[str, Any]:
    """Handoff latency with two workers: a resume reaching the owner vs one passed to it.

    One socket to the ``echo`` target; each sample sends a byte (left in
    flight), then times ``pickle.loads(pickle.dumps(sock))`` and the echo's
    ``recv(1)``. The resume's stream reaches a worker the kernel picks: the
    owner, or its sibling, which passes the stream over (SCM_RIGHTS). Which
    one it was is read from the workers' log (the sibling's "passed to"
    line comes before the owner's "resumed by"), so the two are reported
    apart: p50/p99 in ms.
    """
    import pickle

    import tether.socket as tsocket
    from tether.client.settings import Settings, configure
    from tether.endpoint import parse_endpoint

    gw = Gateway(workdir, list(ports.values()), 2)
    samples: list[float] = []
    try:
        gw.wait_ready()
        configure(Settings(gateway=parse_endpoint(gw.tcp), app=APP, key=gw.key))
        sock = tsocket.create_connection(("127.0.0.1", ports["echo"]), timeout=CLIENT_TIMEOUT)
        try:
            for _ in range(count):
                sock.sendall(b"h")
                t0 = time.perf_counter()
                sock = pickle.loads(pickle.dumps(sock))
                if sock.recv(1) != b"h":
                    raise RuntimeError("handoff: the echo did not come back")
                samples.append(time.perf_counter() - t0)
        finally:
            sock.close()
            configure(None)
    finally:
        gw.stop()
    passed = []
    pending = False
    for line in gw.log_path.read_text().splitlines():
        if "its resume passed to" in line:
            pending = True
        elif " resumed by app " in line:
            passed.append(pending)
            pending = False
    if len(passed) != len(samples):
        raise RuntimeError(f"handoff: {len(samples)} resumes, {len(passed)} in the workers' log")

    def stats(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {"count": len(ordered),
                "p50_ms": percentile(ordered, 50) * 1e3, "p99_ms": percentile(ordered, 99) * 1e3}

    return {
        "owner": stats([t for t, p in zip(samples, passed, strict=True) if not p]),
        "passed": stats([t for t, p in zip(samples, passed, strict=True) if p]),
    }


def render(result: dict[str, Any]) -> str:
    """The suite's tables (markdown): each worker count's rate and CPU, the ratio, handoffs."""
    med = result["median"]
    rows = [[f"gateway workers ({result['clients']} parallel {result['mode']} clients over "
             f"{result.get('via', 'tcp')}, {result['cpus']} CPUs, medians)",
             "conn/s", "gateway CPU/conn", "clients CPU/conn"]]
    for workers in ("1", "2"):
        m = med[workers]
        rows.append([f"tether serve --workers {workers}", f"{m['per_s']:,.0f}",
                     f"{m['gateway_cpu_us']:.0f} µs", f"{m['client_cpu_us']:.0f} µs"])
    rows.append(["2 workers / 1 worker", f"{result['ratio']:.2f}x", "", ""])
    parts = [table(rows)]
    hand = result.get("handoffs")
    if hand:
        hrows = [["handoff, 2 workers", "resumes", "p50", "p99"]]
        for kind, label in (("owner", "resume reached the owner"),
                            ("passed", "passed to the owner (SCM_RIGHTS)")):
            h = hand[kind]
            hrows.append([label, str(h["count"]), f"{h['p50_ms']:.2f} ms",
                          f"{h['p99_ms']:.2f} ms"])
        parts.append(table(hrows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--client"]:
        gateway, key, port, seconds, mode = args[1:6]
        print(json.dumps(client(gateway, key, int(port), float(seconds), mode)), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    p.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    p.add_argument("--seconds", type=float, default=DEFAULT_SECONDS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--handoffs", type=int, default=DEFAULT_HANDOFFS,
                   help="handoffs of one socket with two workers (0: none)")
    p.add_argument("--client", dest="mode", choices=("tether", "raw"), default="tether",
                   help="tether: tether.socket, as an app connects; raw: pre-encoded frames on "
                   "a plain socket, so the clients take less of the machine's CPU")
    p.add_argument("--via", choices=("tcp", "unix"), default="tcp",
                   help="the clients reach the gateway on its TCP or its Unix listener")
    opts = p.parse_args(args)
    import tempfile

    from bench.runner import Targets

    with tempfile.TemporaryDirectory(prefix="tether-bench-workers-") as tmp:
        targets = Targets(Pinning("none"))
        try:
            result = measure(Path(tmp), targets.ports, opts.clients, opts.seconds, opts.reps,
                             opts.mode, opts.via)
            if opts.handoffs:
                result["handoffs"] = handoffs(Path(tmp), targets.ports, opts.handoffs)
        finally:
            targets.stop()
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
