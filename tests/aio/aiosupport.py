"""Helpers of the asyncio tests (importable as `aiosupport`): the loop runner, the lag meter."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, T]], T]

# The bound on how long a loop may stall while the gateway connects
# or resolves (docs/asyncio.md): a blocking wait would show as the whole
# connect time (~1 s here), a well-behaved loop as well under 1 ms.
LAG_LIMIT = 0.005


class LagMeter:
    """A task that sleeps 1 ms at a time and records how late the loop woke it."""

    TICK = 0.001

    def __init__(self) -> None:
        self.worst = 0.0
        self.ticks = 0
        self._interval = 0.005
        self._since = time.perf_counter()  # when the tick under way began
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            self._since = time.perf_counter()
            await asyncio.sleep(self.TICK)
            self._late(time.perf_counter())
            self.ticks += 1

    def _late(self, now: float) -> None:
        self.worst = max(self.worst, now - self._since - self.TICK)

    async def __aenter__(self) -> LagMeter:
        # A gateway in this process (EmbeddedGateway) or a peer thread holding
        # the GIL would delay the loop by up to the switch interval (5 ms): a
        # test artefact, not the loop's, so the GIL changes hands sooner.
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        # Likewise a full collection of a long test session's heap (several ms):
        # the process's pause, not a wait of the loop's.
        gc.collect()
        gc.disable()
        self._task = asyncio.get_running_loop().create_task(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        # The tick under way counts too: a loop held until just before this
        # point never let it finish.
        self._late(time.perf_counter())
        sys.setswitchinterval(self._interval)
        gc.enable()
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# A busy machine (two CPUs shared with other test runs) alone stalls an idle
# loop by 5-13 ms now and then: measured here with nothing else on the loop.
# A loop blocked by a gateway wait is blocked on every attempt for the whole
# wait (~1 s), so the best of a few attempts tells the two apart.
ATTEMPTS = 5


def least_lag(measure: Callable[[], tuple[float, float]], slow_at_least: float) -> float:
    """Run `measure` (-> the slow operation's duration, the loop's worst lag) until the
    lag is under LAG_LIMIT, at most ATTEMPTS times; the least lag seen.

    Each attempt must have been slow (`slow_at_least` seconds), or the test proves nothing.
    """
    seen: list[float] = []
    for _ in range(ATTEMPTS):
        took, worst = measure()
        assert took >= slow_at_least, f"took {took:.3f} s: the slow operation was not slow"
        seen.append(worst)
        if worst < LAG_LIMIT:
            break
    assert min(seen) < LAG_LIMIT, (
        "the loop stalled on every attempt: " + ", ".join(f"{w * 1000:.1f} ms" for w in seen)
    )
    return min(seen)


# -- the child side of tests/aio/test_aio_handoff.py (spawned: importable by name) ---------


def resume_in_child(
    kind: str, address: str, app: str, key: str, payload: bytes, expect: bytes, reply: bytes,
    after: bytes, results: Any,
) -> None:
    """Resume a pickled HandoffState as (reader, writer) on a `kind` loop and check the stream.

    `expect`: the bytes the parent had not read (its reader's buffer, then the
    kernel's tail); `reply` is sent, and `after` must follow from the peer.
    """
    import pickle
    import traceback

    import uvloop

    import tether
    import tether.aio

    tether.install(gateway=address, app=app, key=key)  # this process's own credentials

    async def main() -> str:
        state = pickle.loads(payload)
        reader, writer = await tether.aio.resume(state)
        got = await asyncio.wait_for(reader.readexactly(len(expect)), 10)
        if got != expect:
            return f"resumed stream differs from byte {_first_difference(got, expect)}"
        writer.write(reply)
        await writer.drain()
        more = await asyncio.wait_for(reader.readexactly(len(after)), 10)
        writer.close()
        await writer.wait_closed()
        return "ok" if more == after else "the peer's answer differs"

    try:
        runner = uvloop.run if kind == "uvloop" else asyncio.run
        results.put(runner(main()))
    except BaseException:
        results.put(traceback.format_exc())
    finally:
        tether.uninstall()


def _first_difference(a: bytes, b: bytes) -> int:
    differ = (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return next(differ, min(len(a), len(b)))
