"""Instructions per connection, counted by valgrind: ``python -m bench.instructions``.

Times on a shared 2-core VM move by 10-20% between runs; instruction counts
do not. This runs the connection-rate workload (connect, first byte, close)
with one process at a time under ``valgrind --tool=callgrind``, once with a
few connections and once with many, and divides the difference, so start-up
and warm-up cancel out. User-space instructions only: the kernel's share
(the TCP handshakes, the wake-ups) is not counted, so this measures the
Python and C work each side does per connection, and nothing else.

- ``--side proxy``: the gateway (or the floor relay) under valgrind, this
  process as the client, unmeasured.
- ``--side client``: a child running the client loop under valgrind,
  against a gateway that is not.

Every process stays on loopback, and each run is bounded (``--limit``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path as FsPath
from typing import Any

from bench.floor import FloorRelay
from bench.gateway import QUOTA_APP, TetherGateway
from bench.paths import TETHER_SOCKS5, Path, floor, pysocks, tether
from bench.procs import REPO_ROOT, Pinning, python, python_env, raise_fd_limit
from bench.runner import Targets, use_tether_src

PATHS = ("tether-tcp", "tether-unix", "floor", "tether-quota", TETHER_SOCKS5)
WARMUP = 20  # connections before either count: imports, caches, first-use paths
SOCKET_TIMEOUT = 10.0


class _Under(Pinning):
    """Pinning whose command prefix also runs the child under callgrind."""

    def __init__(self, out: FsPath) -> None:
        super().__init__("none")
        self.out = out

    def prefix(self) -> list[str]:
        return ["valgrind", "-q", "--tool=callgrind", f"--callgrind-out-file={self.out}"]


def _instructions(out: FsPath) -> int:
    """The total a callgrind output file records (its ``summary:`` line)."""
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"{out}: no summary line (did valgrind finish?)")


def _loop(path: Path, port: int, count: int) -> None:
    for _ in range(count):
        s = path.connect(port, SOCKET_TIMEOUT)
        try:
            if s.recv(1) != b"!":
                raise RuntimeError(f"{path.name}: the target's first byte did not arrive")
        finally:
            s.close()


def _open(name: str, workdir: FsPath, ports: dict[str, int],
          pinning: Pinning) -> tuple[dict[str, Any], Callable[[], None]]:
    """Start the proxy for `name` (under `pinning`'s prefix): how to reach it, and its stop."""
    if name == "floor":
        relay = FloorRelay(workdir, pinning)
        relay.wait_ready(timeout=120.0)  # valgrind starts slowly
        return {"relay_port": relay.port}, relay.stop
    quota = name == "tether-quota"  # tether-tcp as an app with every quota set
    gw = TetherGateway(workdir, ports.values(), pinning, quota=quota)
    gw.wait_ready(timeout=120.0)
    addr = gw.unix if name == "tether-unix" else gw.socks5 if name == TETHER_SOCKS5 else gw.tcp
    return {"gateway": addr, "app": QUOTA_APP if quota else gw.app, "key": gw.key}, gw.stop


def _path(name: str, target: dict[str, Any]) -> Path:
    if name == "floor":
        return floor(target["relay_port"], lambda: None)
    if name == TETHER_SOCKS5:  # PySocks with the app's name and key (RFC 1929)
        port = int(target["gateway"].rsplit(":", 1)[1])
        return pysocks(name, port, lambda: None, username=target["app"], password=target["key"])
    return tether(name, target["gateway"], target["app"], target["key"], lambda: None)


def proxy_side(name: str, count: int, workdir: FsPath, ports: dict[str, int]) -> int:
    """Instructions the proxy spends per connection."""
    totals = []
    for n in (1, count):
        out = workdir / f"proxy-{name}-{n}.out"
        target, stop = _open(name, workdir, ports, _Under(out))
        try:
            _loop(_path(name, target), ports["greet"], WARMUP + n)
        finally:
            stop()  # SIGTERM: the child exits cleanly and valgrind writes its file
        totals.append(_instructions(out))
    return (totals[1] - totals[0]) // (count - 1)


def client_side(name: str, count: int, workdir: FsPath, ports: dict[str, int]) -> int:
    """Instructions the client library spends per connection (this module as the client)."""
    target, stop = _open(name, workdir, ports, Pinning("none"))
    totals = []
    try:
        for n in (1, count):
            out = workdir / f"client-{name}-{n}.out"
            spec = json.dumps({"path": name, "port": ports["greet"], "count": WARMUP + n,
                               "target": target})
            subprocess.run(
                [*_Under(out).prefix(), python(), "-m", "bench.instructions", "--client-loop",
                 spec],
                check=True, env=python_env(), cwd=REPO_ROOT, timeout=600,
            )
            totals.append(_instructions(out))
    finally:
        stop()
    return (totals[1] - totals[0]) // (count - 1)


def run_client_loop(spec_text: str) -> None:
    spec = json.loads(spec_text)
    _loop(_path(spec["path"], spec["target"]), spec["port"], spec["count"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--side", choices=("proxy", "client", "both"), default="both")
    parser.add_argument("--connections", type=int, default=400,
                        help="connections in the larger run (default 400)")
    parser.add_argument("--tether-src", type=FsPath, metavar="DIR",
                        help="measure the tether package in DIR (another checkout's src/)")
    parser.add_argument("--client-loop", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tether_src is not None:
        use_tether_src(args.tether_src)
    if args.client_loop:
        run_client_loop(args.client_loop)
        return 0
    if shutil.which("valgrind") is None:
        print("bench.instructions: valgrind is not installed (apt-get install valgrind)",
              file=sys.stderr)
        return 2
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    if args.connections < 2:
        parser.error("--connections must be at least 2")
    raise_fd_limit()
    # The children's str hashes fixed: a count per connection is the difference
    # of two runs, and a random seed moves the start-up's dict probing by ~1M
    # instructions (~3k a connection at 300; the same tree read 352.1k and
    # 357.9k). At one seed, repeats agree to ~0.5k. PYTHONHASHSEED=random undoes it.
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sides = ["proxy", "client"] if args.side == "both" else [args.side]
    started = time.monotonic()
    rows: list[tuple[str, str, int]] = []
    with tempfile.TemporaryDirectory(prefix="tether-instr-") as tmp:
        workdir = FsPath(tmp)
        targets = Targets(Pinning("none"))
        try:
            for name in paths:
                for side in sides:
                    measure = proxy_side if side == "proxy" else client_side
                    per = measure(name, args.connections, workdir, targets.ports)
                    rows.append((name, side, per))
                    print(f"{name:12s} {side:6s} {per:>9,} instructions per connection",
                          flush=True)
        finally:
            targets.stop()
    print(f"bench.instructions: {time.monotonic() - started:.0f} s, "
          f"{args.connections} connections per count")
    return 0


if __name__ == "__main__":
    sys.exit(main())
