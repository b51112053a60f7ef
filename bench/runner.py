"""The suite's driver: set up servers and proxies, run every workload on every
path for several repetitions, print the table, write JSON (and the README).

The benchmark process itself is the client. Target servers, the gateway
and the SOCKS servers are separate child processes; with ``--pin one``
(the default) all of them and this process run on the same CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path as FsPath
from typing import Any

from bench import aio, bulk, connrate, handoff, memory, procs, proxies, report, rtt
from bench import cluster as gateway_cluster
from bench import workers as gateway_workers
from bench.floor import FloorRelay
from bench.gateway import QUOTA_APP, TetherGateway
from bench.paths import (
    ORDER,
    PROXIES,
    TETHER,
    TETHER_HTTP,
    TETHER_QUOTA,
    TETHER_SOCKS5,
    Path,
    direct,
    floor,
    http_connect,
    pysocks,
    pysocks_available,
    tether,
)
from bench.procs import REPO_ROOT, Child, Pinning, descendants, python, python_env, raise_fd_limit

WORKLOADS = ["download", "upload", "rtt", "connrate", "handoff", "memory", *aio.WORKLOADS,
             "workers", "cluster"]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
README = REPO_ROOT / "bench" / "README.md"

FULL = {"reps": 5, "bulk_mib": 512, "round_trips": 20_000, "connections": 2_000,
        "conn_seconds": 15.0, "handoffs": 500, "idle_connections": 5_000, "memory_reps": 3}
QUICK = {"reps": 3, "bulk_mib": 64, "round_trips": 5_000, "connections": 500,
         "conn_seconds": 4.0, "handoffs": 100, "idle_connections": 1_000, "memory_reps": 1}

# Upper bounds on one measurement, whatever the sizes asked for.
LIMIT_BULK = 120.0
LIMIT_RTT = 120.0
LIMIT_MEMORY = 300.0
LIMIT_HANDOFF = 120.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Tether vs direct sockets vs SOCKS5 proxies (Dante, microsocks), loopback.",
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke run (~1 minute): fewer repetitions, smaller sizes")
    p.add_argument("--pin", choices=["one", "none"], default="one",
                   help="run every process on one CPU (default) or let them float")
    p.add_argument("--cpu", type=int, help="the CPU for --pin one (default: the last allowed)")
    p.add_argument("--reps", type=int, help="repetitions (default 5; quick 2)")
    p.add_argument("--bulk-mib", type=int, help="bytes per bulk transfer, MiB (default 512)")
    p.add_argument("--round-trips", type=int, help="64-byte round trips (default 20000)")
    p.add_argument("--connections", type=int, help="connections for the rate (default 2000)")
    p.add_argument("--conn-seconds", type=float,
                   help="time budget of one connection-rate batch (default 15 s; quick 4 s)")
    p.add_argument("--handoffs", type=int,
                   help="socket handoffs (pickle -> first byte in another process; "
                        "default 500)")
    p.add_argument("--idle-connections", type=int,
                   help="connections held for the memory figure (default 5000)")
    p.add_argument("--memory-reps", type=int, help="repetitions of the memory test (default 3)")
    p.add_argument("--paths", default=",".join(ORDER),
                   help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--loops", default=",".join(aio.LOOPS),
                   help="event loops for the aio-* workloads (default: asyncio,uvloop)")
    p.add_argument("--no-install", action="store_true",
                   help="do not apt-get install the proxies when they are missing")
    p.add_argument("--results", type=FsPath, default=RESULTS_DIR, help="where the JSON goes")
    p.add_argument("--readme", choices=["auto", "yes", "no"], default="auto",
                   help="update bench/README.md (auto: full default runs only)")
    p.add_argument("--tether-src", type=FsPath, metavar="DIR",
                   help="benchmark the tether package in DIR (a checkout's src/), for A/B "
                        "comparisons; default: this repository's src/")
    p.add_argument("--py-spy", type=FsPath, metavar="DIR",
                   help="record the gateway with py-spy (raw collapsed stacks) during each "
                        "Tether measurement of the first repetition, into DIR "
                        "(more py-spy options from $BENCH_PY_SPY_ARGS, e.g. --native)")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, default in base.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    args.path_list = [x for x in args.paths.split(",") if x]
    args.workload_list = [x for x in args.workloads.split(",") if x]
    for x in args.path_list:
        if x not in ORDER:
            p.error(f"unknown path {x!r} (known: {', '.join(ORDER)})")
    for x in args.workload_list:
        if x not in WORKLOADS:
            p.error(f"unknown workload {x!r} (known: {', '.join(WORKLOADS)})")
    args.loop_list = [x for x in args.loops.split(",") if x]
    for x in args.loop_list:
        if x not in aio.LOOPS:
            p.error(f"unknown loop {x!r} (known: {', '.join(aio.LOOPS)})")
    if args.reps < 1 or args.memory_reps < 1:
        p.error("--reps and --memory-reps must be at least 1")
    return args


class Targets:
    """The target servers' child process and its ports."""

    def __init__(self, pinning: Pinning) -> None:
        self.child = Child("servers", [python(), "-m", "bench.servers"], pinning=pinning,
                           env=python_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=None, cwd=REPO_ROOT)
        assert self.child.proc.stdout is not None
        line = self.child.proc.stdout.readline()
        if not line:
            self.child.stop()
            raise RuntimeError("bench.servers did not start")
        self.ports: dict[str, int] = json.loads(line)

    def stop(self) -> None:
        self.child.stop()


class Suite:
    def __init__(self, args: argparse.Namespace, workdir: FsPath, pinning: Pinning) -> None:
        self.args = args
        self.workdir = workdir
        self.pinning = pinning
        self.paths: dict[str, Path] = {}
        self.status: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.cleanup: list[Callable[[], None]] = []
        self.targets: Targets | None = None
        self.gateway: TetherGateway | None = None
        self.audit: aio.AuditCounter | None = None
        self.workers: dict[str, handoff.Worker] = {}
        self.handoff_note = ""
        # `tether serve` vs `--workers 2` with parallel clients (bench/workers.py)
        self.workers_result: dict[str, Any] | None = None
        # a handoff resumed through another cluster node (bench/cluster.py)
        self.cluster_result: dict[str, Any] | None = None
        self.versions: dict[str, str] = {"dante": "-", "microsocks": "-"}

    # -- setup ----------------------------------------------------------------

    def setup(self) -> None:
        wanted = self.args.path_list
        for name in wanted:
            self.status[name] = {"available": True, "reason": ""}
        self.targets = Targets(self.pinning)
        self.cleanup.append(self.targets.stop)
        ports = self.targets.ports
        if "direct" in wanted:
            self.paths["direct"] = direct()
        if any(t in wanted for t in (*TETHER, TETHER_SOCKS5, TETHER_HTTP, TETHER_QUOTA)):
            gw = self.gateway = self.start_gateway("gateway", quota=TETHER_QUOTA in wanted)
            self.audit = aio.AuditCounter(gw.audit_path)
            for t, addr in (("tether-tcp", gw.tcp), ("tether-unix", gw.unix)):
                if t in wanted:
                    self.paths[t] = tether(t, addr, gw.app, gw.key, constant(gw.pid))
                    self.start_worker(t, addr, gw)
            if TETHER_SOCKS5 in wanted:
                self.setup_tether_socks5(gw)
            if TETHER_HTTP in wanted:
                self.paths[TETHER_HTTP] = http_path(gw)
            if TETHER_QUOTA in wanted:
                # The same gateway and client as tether-tcp, as an app with quotas.
                self.paths[TETHER_QUOTA] = tether(
                    TETHER_QUOTA, gw.tcp, QUOTA_APP, gw.key, constant(gw.pid))
        if "floor" in wanted:
            relay = self.start_floor("")
            self.paths["floor"] = floor(relay.port, constant(relay.pid))
        socks_wanted = [p for p in PROXIES if p in wanted]
        if socks_wanted:
            self.setup_proxies(socks_wanted)
        say(f"targets: {ports}; paths: {', '.join(self.paths)}")

    def start_worker(self, name: str, addr: str, gw: TetherGateway) -> None:
        if "handoff" not in self.args.workload_list:
            return
        if not handoff.available():
            self.handoff_note = "this tether has no socket handoff"
            return
        try:
            worker = handoff.Worker(addr, gw.app, gw.key, self.pinning)
        except (bulk.BenchError, OSError) as exc:
            self.handoff_note = f"handoff worker: {exc}"
            return
        self.cleanup.append(worker.stop)
        self.workers[name] = worker

    def start_gateway(self, name: str, *, quota: bool = False) -> TetherGateway:
        assert self.targets is not None
        gw = TetherGateway(self.workdir, self.targets.ports.values(), self.pinning, name=name,
                           quota=quota)
        self.cleanup.append(gw.stop)
        gw.wait_ready()
        return gw

    def setup_proxies(self, wanted: list[str]) -> None:
        if not pysocks_available():
            for p in wanted:
                self.status[p] = {"available": False,
                                  "reason": "PySocks is not installed (pip install PySocks)"}
            return
        if self.args.no_install:
            missing = {p: f"{proxies.BINARIES[p]} not installed (--no-install)"
                       for p in wanted if proxies.find_binary(p) is None}
        else:
            missing = proxies.ensure_installed(wanted, self.workdir / "apt.log")
        for p in wanted:
            if p in missing:
                self.status[p] = {"available": False, "reason": missing[p]}
                continue
            self.versions[p] = proxies.package_version(p)
            try:
                server = self.start_proxy(p, "")
            except RuntimeError as exc:
                self.status[p] = {"available": False, "reason": f"did not start: {exc}"}
                continue
            self.paths[p] = pysocks(p, server.port, constant(server.pid))

    def setup_tether_socks5(self, gw: TetherGateway) -> None:
        """The gateway's SOCKS5 front-end, driven by the PySocks client Dante and microsocks are."""
        if not pysocks_available():
            self.status[TETHER_SOCKS5] = {
                "available": False, "reason": "PySocks is not installed (pip install PySocks)"}
            return
        self.paths[TETHER_SOCKS5] = socks5_path(gw)

    def start_floor(self, tag: str) -> FloorRelay:
        relay = FloorRelay(self.workdir, self.pinning, tag)
        self.cleanup.append(relay.stop)
        relay.wait_ready()
        return relay

    def start_proxy(self, proxy: str, tag: str) -> proxies.SocksServer:
        server = proxies.SocksServer(proxy, self.workdir, self.pinning, tag)
        self.cleanup.append(server.stop)
        server.wait_ready()
        return server

    def teardown(self) -> None:
        while self.cleanup:
            with contextlib.suppress(Exception):
                self.cleanup.pop()()

    # -- running ---------------------------------------------------------------

    def record(self, workload: str, path: str, result: dict[str, Any]) -> None:
        self.runs.setdefault(workload, {}).setdefault(path, []).append(result)

    def measure(self, workload: str, path: Path, rep: int,
                fn: Callable[[], dict[str, Any]]) -> None:
        try:
            with self.profiling(workload, path, rep):
                result = fn()
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"  {workload:9} {path.name:12} ERROR {result['error']}")
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
        else:
            say(f"  {workload:9} {path.name:12} {brief(workload, result)}")
        self.record(workload, path.name, result)

    @contextlib.contextmanager
    def profiling(self, workload: str, path: Path, rep: int) -> Iterator[None]:
        out_dir = self.args.py_spy
        pid = path.proxy_pid()
        if out_dir is None or rep != 0 or path.name not in TETHER or pid is None:
            yield
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"{workload}-{path.name}.txt"
        binary = shutil.which("py-spy") or str(FsPath(sys.executable).parent / "py-spy")
        spy = Child("py-spy", [binary, "record", "--pid", str(pid),
                               "--rate", "500", "--format", "raw", "--output", str(out),
                               *shlex.split(os.environ.get("BENCH_PY_SPY_ARGS", ""))],
                    pinning=Pinning("none"), stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached before the measurement starts
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(spy.pid, signal.SIGINT)
            try:
                spy.proc.wait(30)
            except subprocess.TimeoutExpired:
                spy.stop()

    def run(self) -> None:
        args = self.args
        assert self.targets is not None
        names = [n for n in ORDER if n in self.paths]
        for rep in range(args.reps):
            say(f"repetition {rep + 1}/{args.reps}")
            # A different path goes first each repetition, so drift spreads evenly.
            order = names[rep % len(names):] + names[:rep % len(names)] if names else []
            for workload in args.workload_list:
                if workload in ("memory", "workers", "cluster") or workload in aio.WORKLOADS:
                    continue
                for name in order:
                    path = self.paths[name]
                    fn = self.job(workload, path)
                    if fn is not None:
                        self.measure(workload, path, rep, fn)
            self.run_aio(order)
        if "workers" in args.workload_list:
            assert self.targets is not None
            say("workers: 1 vs 2 gateway workers, parallel clients")
            self.workers_result = gateway_workers.measure(
                self.workdir, self.targets.ports, reps=args.reps,
                seconds=gateway_workers.QUICK_SECONDS if args.quick
                else gateway_workers.DEFAULT_SECONDS)
        if "cluster" in args.workload_list:
            say("cluster: handoffs resumed through another node (TLS and Unix links)")
            self.cluster_result = gateway_cluster.measure(args.handoffs)
        if "memory" in args.workload_list:
            self.run_memory()

    def job(self, workload: str, path: Path) -> Callable[[], dict[str, Any]] | None:
        args = self.args
        assert self.targets is not None
        ports = self.targets.ports
        if workload == "handoff":
            worker = self.workers.get(path.name)
            if worker is None:
                return None  # only Tether sockets can be handed off
            return partial(handoff.handoffs, path, worker, ports["echo"], args.handoffs,
                           LIMIT_HANDOFF)
        if workload == "download":
            return partial(bulk.download, path, ports["source"], args.bulk_mib << 20, LIMIT_BULK)
        if workload == "upload":
            return partial(bulk.upload, path, ports["sink"], args.bulk_mib << 20, LIMIT_BULK)
        if workload == "rtt":
            return partial(rtt.round_trips, path, ports["echo"], args.round_trips, LIMIT_RTT)
        return partial(connrate.connections, path, ports["greet"], args.connections,
                       args.conn_seconds)

    def run_aio(self, order: list[str]) -> None:
        """The event-loop workloads: one client process per loop and path (bench/aio.py)."""
        kinds = [w.removeprefix("aio-") for w in self.args.workload_list if w in aio.WORKLOADS]
        if not kinds:
            return
        for loop in self.args.loop_list:
            for name in [n for n in order if n in aio.PATHS]:
                self.measure_aio(loop, kinds, self.paths[name])

    def measure_aio(self, loop: str, kinds: list[str], path: Path) -> None:
        args = self.args
        assert self.targets is not None
        gateway, env = None, python_env()
        if path.name in TETHER:
            gw = self.gateway
            assert gw is not None and self.audit is not None
            gateway = gw.tcp if path.name == "tether-tcp" else gw.unix
            env = python_env({"TETHER_GATEWAY": gateway, "TETHER_APP": gw.app,
                              "TETHER_KEY": gw.key})
        limits = {"bulk": LIMIT_BULK, "rtt": LIMIT_RTT}
        spec = aio.client_spec(args, loop, kinds, self.targets.ports, gateway, limits)
        # Every workload within its own bound, plus the process's start.
        timeout = 60.0 + len(kinds) * max(LIMIT_BULK, LIMIT_RTT, args.conn_seconds + 30)
        before = self.audit.count() if gateway is not None and self.audit else 0
        try:
            results = aio.run_client(spec, env, self.pinning.prefix(), timeout)
            refused = (aio.verify_through_gateway(results, self.audit, before)
                       if gateway is not None and self.audit else None)
        except (bulk.BenchError, OSError, ValueError, subprocess.SubprocessError) as exc:
            results, refused = {}, f"{type(exc).__name__}: {exc}"
        for kind in kinds:
            result = results.get(kind) or {"error": refused or "no result"}
            if refused:
                result = {"error": refused}
            name = aio.recorded_name(loop, kind)
            if "error" in result:
                say(f"  {name:16} {path.name:12} ERROR {result['error']}")
            else:
                say(f"  {name:16} {path.name:12} {brief(kind, result)}")
            self.record(name, path.name, result)

    def run_memory(self) -> None:
        """A fresh proxy for each repetition and path; the shared ones are left alone."""
        args = self.args
        assert self.targets is not None
        port, greet = self.targets.ports["hello"], self.targets.ports["greet"]
        for rep in range(args.memory_reps):
            say(f"memory {rep + 1}/{args.memory_reps}: {args.idle_connections} idle connections")
            for name in [n for n in ORDER if n in self.paths and n != "direct"]:
                stop: Callable[[], None]
                if name in TETHER:
                    gw = self.start_gateway(f"memgw{rep}-{name}")
                    addr = gw.tcp if name == "tether-tcp" else gw.unix
                    path = tether(name, addr, gw.app, gw.key, constant(gw.pid))
                    pid, stop = gw.pid, gw.stop
                elif name in (TETHER_SOCKS5, TETHER_HTTP):
                    gw = self.start_gateway(f"memgw{rep}-{name}")
                    path = socks5_path(gw) if name == TETHER_SOCKS5 else http_path(gw)
                    pid, stop = gw.pid, gw.stop
                elif name == TETHER_QUOTA:
                    gw = self.start_gateway(f"memgw{rep}-{name}", quota=True)
                    path = tether(name, gw.tcp, QUOTA_APP, gw.key, constant(gw.pid))
                    pid, stop = gw.pid, gw.stop
                elif name == "floor":
                    relay = self.start_floor(f"-mem{rep}")
                    path = floor(relay.port, constant(relay.pid))
                    pid, stop = relay.pid, relay.stop
                else:
                    server = self.start_proxy(name, f"-mem{rep}")
                    path = pysocks(name, server.port, constant(server.pid))
                    pid, stop = server.pid, server.stop

                def pids(root: int = pid) -> list[int]:
                    return descendants(root)

                self.measure("memory", path, rep, partial(
                    memory.idle_connections, path, pids, port, greet, args.idle_connections,
                    LIMIT_MEMORY))
                stop()


def socks5_path(gw: TetherGateway) -> Path:
    """PySocks through `gw`'s SOCKS5 front-end, as its app (RFC 1929 with the app's key)."""
    port = int(gw.socks5.rsplit(":", 1)[1])
    return pysocks(TETHER_SOCKS5, port, constant(gw.pid), username=gw.app, password=gw.key)


def http_path(gw: TetherGateway) -> Path:
    """CONNECT tunnels through `gw`'s HTTP proxy front-end, as its app (Basic with the key)."""
    port = int(gw.http.rsplit(":", 1)[1])
    return http_connect(TETHER_HTTP, port, constant(gw.pid), gw.app, gw.key)


def constant(value: int) -> Callable[[], int | None]:
    def get() -> int | None:
        return value

    return get


def brief(workload: str, r: dict[str, Any]) -> str:
    if workload in ("download", "upload"):
        return f"{r['mb_s']:8.0f} MB/s"
    if workload == "rtt":
        return f"p50 {r['p50_us']:7.1f} us  p99 {r['p99_us']:7.1f} us"
    if workload == "connrate":
        errs = f"  {r['errors']} errors" if r["errors"] else ""
        part = f"  (time budget: {r['count']} of {r['requested']})" if r["truncated"] else ""
        return f"{r['per_s']:8.0f} /s  p50 {r['p50_us']:6.0f} us{errs}{part}"
    if workload == "handoff":
        return f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms"
    if workload == "memory":
        return (f"{r['rss_kib_per_conn']:6.1f} KiB/conn RSS ({r['pss_kib_per_conn']:.1f} PSS), "
                f"{r['held']} held, {r['errors']} errors, {r['processes']} processes")
    return json.dumps(r)


def say(text: str) -> None:
    print(text, flush=True)


def machine_meta(args: argparse.Namespace, pinning: Pinning, fds: tuple[int, int],
                 versions: dict[str, str]) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in FsPath("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop

        uv = str(getattr(uvloop, "__version__", "?"))
    except ImportError:
        uv = "not installed"
    try:
        import socks

        pys = getattr(socks, "__version__", "?")
    except ImportError:
        pys = "not installed"
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(procs.TETHER_SRC[0])]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True,
                               text=True, timeout=10, check=False).stdout.strip()
        if dirty:
            commit += "+dirty"
    import tether

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench" + ("" if not sys.argv[1:] else " " + shlex.join(
            sys.argv[1:])),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uv,
        "pysocks": pys,
        "tether": tether.__version__,
        "tether_commit": commit,
        "tether_src": str(procs.TETHER_SRC[0]),
        "dante": versions.get("dante", "-"),
        "microsocks": versions.get("microsocks", "-"),
        "pinning": pinning.describe(),
        "fd_limit": list(fds),
    }


def use_tether_src(src: FsPath) -> None:
    """Import tether (client and gateway children) from `src` instead of this repo."""
    src = src.resolve()
    if not (src / "tether" / "__init__.py").is_file():
        raise SystemExit(f"bench: --tether-src {src}: no tether package there")
    if "tether" in sys.modules:
        raise SystemExit("bench: --tether-src must be applied before tether is imported")
    procs.TETHER_SRC[0] = src
    sys.path.insert(0, str(src))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tether_src is not None:
        use_tether_src(args.tether_src)
    pinning = Pinning(args.pin, args.cpu)
    pinning.apply_to_self()
    fds = raise_fd_limit()
    need = 4 * args.idle_connections + 1000 if "memory" in args.workload_list else 0
    if fds[0] < need // 2:
        say(f"bench: open-files limit {fds[0]} is low for {args.idle_connections} idle "
            "connections; the memory test may fail")
    started = time.monotonic()
    say(f"bench: pinning {pinning.describe()}; reps {args.reps}; bulk {args.bulk_mib} MiB; "
        f"{args.round_trips} round trips; {args.connections} connections; "
        f"{args.idle_connections} idle x {args.memory_reps}")
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        suite = Suite(args, FsPath(tmp), pinning)
        try:
            suite.setup()
            suite.run()
        except KeyboardInterrupt:
            say("bench: interrupted")
            return 130
        finally:
            suite.teardown()
    settings = {k: getattr(args, k) for k in FULL} | {
        "quick": args.quick, "paths": args.path_list, "workloads": args.workload_list,
        "pin": args.pin, "loops": args.loop_list,
    }
    results: dict[str, Any] = {
        "meta": machine_meta(args, pinning, fds, suite.versions),
        "settings": settings,
        "paths": {p: suite.status.get(p, {"available": False, "reason": "not selected"})
                  for p in args.path_list},
        "runs": suite.runs,
    }
    results["summary"] = report.summarise(suite.runs)
    results["ratios"] = report.ratios(results["summary"])
    results["proxy_ratios"] = report.proxy_ratios(results["summary"])
    results["http_proxy_ratios"] = report.proxy_ratios(results["summary"], TETHER_HTTP)
    results["aio_ratios"] = report.aio_ratios(results["summary"])
    results["targets"] = report.targets(results["summary"], settings)
    if "handoff" in args.workload_list and not suite.workers:
        results["handoff_note"] = suite.handoff_note or "no Tether path selected"
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    table = report.render(results)
    if suite.workers_result is not None:
        results["workers"] = suite.workers_result
        table += "\n\n" + gateway_workers.render(suite.workers_result)
    if suite.cluster_result is not None:
        results["cluster"] = suite.cluster_result
        table += "\n\n" + gateway_cluster.render(suite.cluster_result)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = report.write_json(results, args.results, stamp)
    say("")
    say(table)
    say("")
    say(f"bench: {results['meta']['seconds']:.0f} s; results in {out}")
    default_run = (not args.quick and args.path_list == ORDER
                   and args.workload_list == WORKLOADS
                   and args.loop_list == list(aio.LOOPS)
                 and all(getattr(args, k) == v for k, v in FULL.items()))
    if args.readme == "yes" or (args.readme == "auto" and default_run):
        report.update_readme(README, results, table, out.name)
        say(f"bench: table written to {README}")
    return 0
