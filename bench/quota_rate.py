"""The throttle's accuracy: ``python -m bench.quota_rate``.

A real ``tether serve`` (a child process) with an app whose
``bytes_out_per_minute`` is R; the app uploads the burst (R bytes, which
pass at once) and then R/60 x ``--seconds`` more through ``tether.socket``
to a stdlib sink on loopback that timestamps what arrives. The budget
refills from the first byte on, so by the time the last byte arrives the
app may have sent the burst plus the rate times the time since the first:
the measured rate is (bytes - burst) / (last byte's time - first byte's).
It can be above the configured rate by at most one gateway read (256 KiB,
which passes before the pause takes effect) over the whole time, so the run
reports that bound with it. Also: whether every byte arrived intact
(sha256).

Loopback only, bounded: each rate runs ``--seconds`` at its rate plus the
burst, and the whole run stops at ``--limit`` seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.procs import raise_fd_limit

KiB = 1024
MiB = 1024 * KiB
# asyncio's selector transports read at most 256 KiB at a time (max_size):
# the most that can pass before a throttle's pause takes effect.
READ_AHEAD = 256 * KiB
RATES = (6 * MiB, 60 * MiB, 600 * MiB)  # per minute: 100 KiB/s, 1 MiB/s, 10 MiB/s


class Sink:
    """Accepts one connection; records (time, total bytes) per chunk and the digest."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.marks: list[tuple[float, int]] = []
        self.digest = hashlib.sha256()
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        total = 0
        with conn:
            while chunk := conn.recv(MiB):
                total += len(chunk)
                self.digest.update(chunk)
                self.marks.append((time.monotonic(), total))
        self.done.set()

    def at(self, n: int) -> tuple[float, int]:
        """The first mark with at least `n` bytes: (when, how many)."""
        return next((t, total) for t, total in self.marks if total >= n)


def measure(rate: int, seconds: float, limit: float) -> dict[str, float | bool]:
    from tether.client import control
    from tether.client import settings as client_settings
    from tether.client.settings import Settings
    from tether.devmode import GatewayProcess
    from tether.endpoint import parse_endpoint
    from tether.socket import socket as tsocket

    extra = int(rate / 60 * seconds)
    payload = os.urandom(rate + extra)
    with tempfile.TemporaryDirectory(prefix="tether-quota-rate-") as tmp:
        config = Path(tmp) / "tether.toml"
        config.write_text(
            '[resolver]\nmode = "static"\n[policy]\nallow = ["127.0.0.1:*"]\n'
            f'[apps.rate]\nkey = "k"\n[apps.rate.quota]\nbytes_out_per_minute = {rate}\n'
        )
        gw = GatewayProcess(config)
        gw.start()
        sink = Sink()
        try:
            client_settings.configure(
                Settings(gateway=parse_endpoint(gw.address), app="rate", key="k"))
            sock = tsocket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(limit)
            sock.connect(("127.0.0.1", sink.port))
            sock.sendall(payload)
            sock.close()
            if not sink.done.wait(limit):
                raise RuntimeError(f"the transfer did not finish within {limit:g} s")
        finally:
            client_settings.configure(None)
            control.close_all()
            gw.stop()
    start = sink.marks[0][0]
    end, total = sink.marks[-1]
    elapsed = end - start
    return {
        "configured_Bps": rate / 60,
        "measured_Bps": (total - rate) / elapsed,
        "read_ahead_bound": READ_AHEAD / elapsed / (rate / 60),
        "seconds": elapsed,
        "intact": sink.digest.hexdigest() == hashlib.sha256(payload).hexdigest(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quota_rate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="seconds of transfer past the burst, per rate (default 20)")
    parser.add_argument("--limit", type=float, default=300.0,
                        help="give up on a rate after this many seconds (default 300)")
    args = parser.parse_args(argv)
    raise_fd_limit()
    print("| bytes_out_per_minute | configured | measured | error | one read's bound | "
          "seconds | intact |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    worst = 0.0
    for rate in RATES:
        r = measure(rate, args.seconds, args.limit)
        error = r["measured_Bps"] / r["configured_Bps"] - 1
        worst = max(worst, abs(error))
        print(f"| {rate // MiB} MiB | {r['configured_Bps'] / KiB:.1f} KiB/s | "
              f"{r['measured_Bps'] / KiB:.1f} KiB/s | {error:+.1%} | "
              f"+{r['read_ahead_bound']:.1%} | {r['seconds']:.1f} | {r['intact']} |", flush=True)
    print(f"worst error: {worst:.1%} (the issue asks for 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
