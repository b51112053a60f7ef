"""A real `tether serve` child process with any flags (--workers), its log read as it comes.

The workers' and drain tests signal it (and its workers) by PID and wait
for its log lines; every wait is bounded by a deadline, never asserted on.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tether.devmode import gateway_env

# A cold interpreter per worker, on a machine other tests keep busy.
START_TIMEOUT = 60.0


class Served:
    """``python -m tether.gateway --config CONFIG ARGS...``; stderr collected in `log`."""

    def __init__(self, config: Path, *args: str) -> None:
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tether.gateway", "--config", str(config), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=gateway_env(),
        )
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.log.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def text(self) -> str:
        return "\n".join(self.log)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = START_TIMEOUT,
                 after: int = 0) -> list[re.Match[str]]:
        """The first `count` matches of `pattern` in the log lines from index `after` on."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for line in self.log[after:] if (m := regex.search(line))]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{count} x {pattern!r} not in the gateway's log:\n{self.text()}")
                self._changed.wait(min(left, 0.5))

    def address(self, workers: bool = False) -> str:
        """The first address, once the gateway (or, `workers`, every worker) listens."""
        if workers:
            return self.wait_for(r"workers ready on (\S+?),? ")[0].group(1)
        return self.wait_for(r"listening on (\S+)")[0].group(1)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT (no drain) and wait; SIGKILL if it does not exit. Its status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


__all__ = ["START_TIMEOUT", "Served"]
