"""The ``tether run --isolate`` row: a program that knows nothing of tether, made to go through it.

``python -m bench.isolate`` runs bench/aio.py's client (asyncio streams:
bulk download and upload, 64-byte round trips, connection rate) three ways,
against the same targets (bench/servers.py) and one gateway (bench/gateway.py):

- direct: the client connects straight to the targets;
- native (Unix): the client with ``tether.install()`` over the gateway's Unix
  socket (the drop-in: after the handshake the fd carries the stream);
- isolate: the client *without* tether, under ``tether run --isolate
  --gateway unix:...``: nftables redirects its connects to the agent, which
  dials the gateway and relays (two more hops, both through Python).

Every isolate and native batch is checked to have gone through the gateway
(its audit decision lines are counted, as bench/aio.py does for its Tether
rows), and the client checks each connection's kernel peer: the gateway's
socket on the native path, the target's address on the others (under
REDIRECT, getpeername() answers the original destination).

Children are pinned like the main suite's (``--pin one`` by default: one
CPU for everything). Results go to ``bench/results/<UTC>-isolate.json``;
the table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path as FsPath
from typing import Any

from bench import aio
from bench.bulk import BenchError
from bench.gateway import TetherGateway
from bench.procs import Pinning, python, python_env, raise_fd_limit
from bench.runner import Targets

RESULTS = FsPath(__file__).resolve().parent / "results"
PATHS = ("direct", "native", "isolate")
LABELS = {"direct": "direct", "native": "native (Unix)", "isolate": "isolate (transparent)"}
LIMIT = 120.0  # seconds for one bulk transfer or round-trip batch, as the main suite


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.isolate",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smaller batches, one repetition")
    p.add_argument("--pin", choices=("one", "none"), default="one")
    p.add_argument("--loop", choices=aio.LOOPS, default="asyncio")
    p.add_argument("--bulk-mib", type=int, default=256)
    p.add_argument("--round-trips", type=int, default=20_000)
    p.add_argument("--connections", type=int, default=2_000)
    p.add_argument("--conn-seconds", type=float, default=15.0)
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.bulk_mib, args.round_trips, args.connections = 1, 64, 5_000, 500
    return args


def prefix_for(path: str, gw: TetherGateway, pinning: Pinning) -> list[str]:
    """The command the client runs under on `path` (pinned; isolate: inside the namespace)."""
    pin = pinning.prefix()
    if path != "isolate":
        return pin
    # `tether run` installs the drop-in in every Python it starts; the client
    # must stay a plain program here, so it is started without that switch.
    return [*pin, python(), "-m", "tether.cli.main", "run", "--isolate", "--gateway", gw.unix,
            "--app", gw.app, "--", "env", "-u", "TETHER_AUTOINSTALL"]


def measure(args: argparse.Namespace, path: str, gw: TetherGateway, targets: Targets,
            pinning: Pinning, counter: aio.AuditCounter) -> dict[str, Any]:
    kinds = list(aio.KINDS)
    native = path == "native"
    spec = aio.client_spec(args, args.loop, kinds, targets.ports, gw.unix if native else None,
                           {"bulk": LIMIT, "rtt": LIMIT})
    extra = {"TETHER_KEY": gw.key}
    if native:
        extra |= {"TETHER_GATEWAY": gw.unix, "TETHER_APP": gw.app}
    before = counter.count()
    timeout = 60.0 + len(kinds) * max(LIMIT, args.conn_seconds + 30)
    results = aio.run_client(spec, python_env(extra), prefix_for(path, gw, pinning), timeout)
    if path != "direct":
        refused = aio.verify_through_gateway(results, counter, before)
        if refused:
            raise BenchError(refused)
    return results


def brief(result: dict[str, Any]) -> str:
    def figures(r: dict[str, Any]) -> str:
        return json.dumps({m: round(v, 1) for m, v in r.items() if isinstance(v, float)})

    return ", ".join(f"{k}: {figures(r)}" for k, r in result.items())


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Medians per path: MB/s down and up, round trip p50/p99 (µs), connections/s."""
    out: dict[str, dict[str, float]] = {}
    for path, reps in runs.items():
        ok = [r for r in reps if all("error" not in r.get(k, {}) for k in aio.KINDS)]
        if not ok:
            continue
        out[path] = {
            "download_mb_s": statistics.median(r["download"]["mb_s"] for r in ok),
            "upload_mb_s": statistics.median(r["upload"]["mb_s"] for r in ok),
            "rtt_p50_us": statistics.median(r["rtt"]["p50_us"] for r in ok),
            "rtt_p99_us": statistics.median(r["rtt"]["p99_us"] for r in ok),
            "conn_per_s": statistics.median(r["connrate"]["per_s"] for r in ok),
        }
    return out


def render(summary: dict[str, dict[str, float]]) -> str:
    rows = [["", *(LABELS[p] for p in PATHS if p in summary)]]
    fields = [("download MB/s", "download_mb_s", 0), ("upload MB/s", "upload_mb_s", 0),
              ("round trip p50 µs", "rtt_p50_us", 1), ("round trip p99 µs", "rtt_p99_us", 1),
              ("connections/s", "conn_per_s", 0)]
    for title, key, digits in fields:
        rows.append([title, *(f"{summary[p][key]:,.{digits}f}" for p in PATHS if p in summary)])
    if "isolate" in summary and "native" in summary:
        iso, nat = summary["isolate"], summary["native"]
        down = iso["download_mb_s"] / nat["download_mb_s"]
        rows.append(["isolate / native", f"{down:.2f}x down",
                     f"{iso['upload_mb_s'] / nat['upload_mb_s']:.2f}x up",
                     f"{iso['rtt_p50_us'] / nat['rtt_p50_us']:.2f}x rtt p50, "
                     f"{iso['conn_per_s'] / nat['conn_per_s']:.2f}x conn/s"])
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    return "\n".join(" | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    pinning = Pinning(args.pin)
    pinning.apply_to_self()
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
    with tempfile.TemporaryDirectory(prefix="tether-bench-isolate-") as tmp, \
            contextlib.ExitStack() as stack:
        targets = Targets(pinning)
        stack.callback(targets.stop)
        gw = TetherGateway(FsPath(tmp), targets.ports.values(), pinning)
        stack.callback(gw.stop)
        gw.wait_ready()
        counter = aio.AuditCounter(gw.audit_path)
        for rep in range(args.reps):
            order = PATHS[rep % len(PATHS):] + PATHS[:rep % len(PATHS)]
            for path in order:
                try:
                    result = measure(args, path, gw, targets, pinning, counter)
                except (BenchError, OSError, ValueError, subprocess.SubprocessError) as exc:
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"rep {rep + 1} {path:8} ERROR {result['error']}", flush=True)
                else:
                    print(f"rep {rep + 1} {path:8} {brief(result)}", flush=True)
                runs[path].append(result)
    summary = summarise(runs)
    print(render(summary))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = RESULTS / f"{stamp}-isolate{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps({"argv": sys.argv, "settings": vars(args), "pinning":
                               pinning.describe(), "runs": runs, "summary": summary}, indent=1))
    print(f"written to {out}")
    return 0 if len(summary) == len(PATHS) else 1


if __name__ == "__main__":
    sys.exit(main())
