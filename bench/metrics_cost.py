"""What the admin listener costs the hot path: connection rate and bulk, with it and without.

Two gateways with the suite's deployment config (bench/gateway.py), one of
them also with ``[gateway] admin_listen`` and a scraper fetching
``/metrics`` from it once a second for the whole run, so the figure
includes what the latency histograms cost per connection and what the
scrapes cost the loop. The client and both gateways run pinned to one CPU,
as in the suite; the two are measured alternately, rep by rep (the order
swapped every rep), so a load that comes and goes on the machine falls on
both. Loopback only.

    python -m bench.metrics_cost [--reps 5] [--connections 2000] [--bulk-mib 256]
"""

from __future__ import annotations

import argparse
import http.client
import re
import statistics
import tempfile
import threading
from pathlib import Path as FsPath
from typing import Any

from bench import bulk, connrate
from bench import gateway as bench_gateway
from bench.gateway import TetherGateway
from bench.paths import tether
from bench.procs import Pinning, raise_fd_limit
from bench.runner import Targets, constant

SCRAPE_INTERVAL = 1.0  # seconds; Prometheus's default is 60 s, so this is 60 times harsher
BULK_LIMIT = 120.0  # seconds one transfer may take


def _with_admin(text: str) -> str:
    return text.replace("[gateway]\n", '[gateway]\nadmin_listen = "127.0.0.1:0"\n', 1)


def start(workdir: FsPath, ports: list[int], pinning: Pinning, admin: bool) -> TetherGateway:
    original = bench_gateway.config_text
    if admin:
        bench_gateway.config_text = lambda *a, **kw: _with_admin(
            original(*a, **kw)
        )
    try:
        gw = TetherGateway(workdir, ports, pinning, name="admin" if admin else "plain")
    finally:
        bench_gateway.config_text = original
    gw.wait_ready()
    return gw


def admin_port(gw: TetherGateway) -> int:
    found = re.search(r"admin listener on 127\.0\.0\.1:(\d+)", gw.log_path.read_text())
    if found is None:
        raise RuntimeError("the gateway did not log its admin listener:\n" + gw.log_tail())
    return int(found.group(1))


class Scraper(threading.Thread):
    """GET /metrics every SCRAPE_INTERVAL until stopped; counts scrapes and their bytes."""

    def __init__(self, port: int) -> None:
        super().__init__(name="scraper", daemon=True)
        self.port = port
        self.stopped = threading.Event()
        self.scrapes = 0
        self.bytes = 0

    def run(self) -> None:
        while not self.stopped.wait(SCRAPE_INTERVAL):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", "/metrics")
                body = conn.getresponse().read()
            finally:
                conn.close()
            self.scrapes += 1
            self.bytes += len(body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--conn-seconds", type=float, default=15.0)
    p.add_argument("--bulk-mib", type=int, default=256)
    p.add_argument("--pin", choices=("one", "none"), default="one")
    args = p.parse_args(argv)
    pinning = Pinning(args.pin, None)
    pinning.apply_to_self()
    raise_fd_limit()
    size = args.bulk_mib << 20
    results: dict[str, dict[str, list[float]]] = {
        v: {"connrate": [], "gateway_cpu": [], "download": [], "upload": []} for v in ("off", "on")
    }
    with tempfile.TemporaryDirectory(prefix="tether-metrics-cost-") as tmp:
        targets = Targets(pinning)
        gateways: dict[str, TetherGateway] = {}
        scraper: Scraper | None = None
        try:
            ports = list(targets.ports.values())
            gateways["off"] = start(FsPath(tmp), ports, pinning, admin=False)
            gateways["on"] = start(FsPath(tmp), ports, pinning, admin=True)
            scraper = Scraper(admin_port(gateways["on"]))
            scraper.start()
            paths = {
                v: tether(f"tether-tcp ({v})", gw.tcp, gw.app, gw.key, constant(gw.pid))
                for v, gw in gateways.items()
            }
            for rep in range(args.reps):
                order = ("off", "on") if rep % 2 == 0 else ("on", "off")
                for v in order:
                    rate = connrate.connections(
                        paths[v], targets.ports["greet"], args.connections, args.conn_seconds
                    )
                    down = bulk.download(paths[v], targets.ports["source"], size, BULK_LIMIT)
                    up = bulk.upload(paths[v], targets.ports["sink"], size, BULK_LIMIT)
                    results[v]["connrate"].append(rate["per_s"])
                    results[v]["gateway_cpu"].append(rate["proxy_cpu_us"] or 0.0)
                    results[v]["download"].append(down["mb_s"])
                    results[v]["upload"].append(up["mb_s"])
                    print(f"rep {rep + 1} admin {v:3}: {rate['per_s']:7.0f} conn/s "
                          f"(gateway CPU {rate['proxy_cpu_us'] or 0:5.0f} us/conn), "
                          f"download {down['mb_s']:6.0f} MB/s, upload {up['mb_s']:6.0f} MB/s",
                          flush=True)
        finally:
            if scraper is not None:
                scraper.stopped.set()
                scraper.join(15)
            for gw in gateways.values():
                gw.stop()
            targets.stop()
    print()
    print(f"medians of {args.reps} reps ({args.connections} connections, {args.bulk_mib} MiB; "
          f"admin on: {scraper.scrapes if scraper else 0} scrapes, one per "
          f"{SCRAPE_INTERVAL:g} s)")
    summary: dict[str, Any] = {}
    # The gateway's CPU per connection moves less with the machine's load than the rate.
    for workload, unit in (("connrate", "conn/s"), ("gateway_cpu", "us/conn"),
                           ("download", "MB/s"), ("upload", "MB/s")):
        off = statistics.median(results["off"][workload])
        on = statistics.median(results["on"][workload])
        summary[workload] = (off, on)
        print(f"  {workload:11} off {off:8.0f} {unit:7}  on {on:8.0f} {unit:7}  "
              f"({(on - off) / off * 100:+.1f}%; spread off {_spread(results['off'][workload])}, "
              f"on {_spread(results['on'][workload])})")
    return 0


def _spread(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


if __name__ == "__main__":
    raise SystemExit(main())
