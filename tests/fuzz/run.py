"""``make fuzz``: run the gateway fuzz target for FUZZ_SECONDS (default 600), then summarise.

Batches of sequences run until the time is up; Hypothesis keeps what it
finds in .hypothesis/examples (gitignored), and every failure is shrunk to a
minimal sequence, printed as data for tests/gateway/test_fuzz_regressions.py.
The summary (seconds, sequences and steps tried, failures, the process's RSS
at start and end) goes to stdout and .hypothesis/fuzz-summary.txt. Exit
status 1 if anything failed.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from fuzz import gateway_machine as gm  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

DEFAULT_SECONDS = 600  # the issue asks for a 10-minute run
BATCH = 100  # sequences per Hypothesis run: the time limit is checked between batches
STEPS = 40  # steps per sequence at most (the normal suite: 15)


class Counting(gm.GatewayFuzz):
    sequences = 0
    steps = 0

    def __init__(self) -> None:
        super().__init__()
        Counting.sequences += 1

    def _run(self, op: gm.Op) -> None:
        Counting.steps += 1
        super()._run(op)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    seconds = float(os.environ.get("FUZZ_SECONDS", DEFAULT_SECONDS))
    db = DirectoryBasedExampleDatabase(str(ROOT / ".hypothesis" / "examples"))
    failures: list[str] = []
    start = time.monotonic()
    gm.shared_target()
    rss_start = rss_mib()
    batches = 0
    with gm.quiet_gateway_log():
        while time.monotonic() - start < seconds:
            # The first batch replays what the database kept from earlier runs.
            phases = [Phase.generate, Phase.shrink]
            if batches == 0:
                phases.insert(0, Phase.reuse)
            Counting.TestCase.settings = settings(
                max_examples=BATCH,
                stateful_step_count=STEPS,
                deadline=None,
                database=db,
                phases=phases,
                suppress_health_check=list(HealthCheck),
                print_blob=True,
            )
            batches += 1
            try:
                Counting.TestCase().runTest()
            except Exception as exc:  # a failure: keep it and go on fuzzing
                # The notes hold the shrunk steps and the sequence as data.
                text = "\n".join([f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", [])])
                failures.append(text)
                print(f"FAILURE in batch {batches}:\n{text}", flush=True)
                if len(failures) >= 20:
                    break
            print(
                f"{time.monotonic() - start:7.1f} s: {Counting.sequences} sequences, "
                f"{Counting.steps} steps, {len(failures)} failures",
                flush=True,
            )
    elapsed = time.monotonic() - start
    rss_end = rss_mib()
    target = gm.shared_target()
    summary = "\n".join(
        [
            "tether gateway fuzz summary",
            f"seconds: {elapsed:.0f} (FUZZ_SECONDS={seconds:g})",
            f"batches: {batches} of up to {BATCH} sequences, up to {STEPS} steps each",
            f"sequences tried: {Counting.sequences}",
            f"steps run: {Counting.steps}",
            f"failures: {len(failures)}",
            f"gateway registry at end: {len(target.core.registry)} records, "
            f"{len(target.core.streams)} streams",
            f"RSS: {rss_start:.1f} MiB at start, {rss_end:.1f} MiB at end",
            *[f"--- failure {n + 1}:\n{f}" for n, f in enumerate(failures)],
        ]
    )
    print(summary)
    out = ROOT / ".hypothesis" / "fuzz-summary.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(summary + "\n")
    target.stop()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
