"""The gateway's usage ledger: sample the meter, attribute to minutes, flush in batches.

Nothing here runs on the data path. The relay and the UDP pump already
count bytes on each socket's record, and the registry adds a record's
totals to its app's ``AppUsage`` when it closes; every ``flush_interval``
the ledger reads those cumulative counters (closed sockets' totals plus the
live records' bytes and ages: one pass over the registry), subtracts what
it read last time, and adds the difference to the current minute's row.
So the ledger's sum of ``bytes_out`` over a run is exactly the registry's
final total, which is exactly the sum of the audit log's close lines.

Writing happens on one thread of the ledger's own (``run_in_executor``):
the event loop never waits for the database. A batch that fails stays in
memory and is retried with the same sequence number (``store.py`` explains
why that never counts twice); what is sampled meanwhile waits in the next
batch, bounded by ``max_pending_rows`` (the oldest minutes are dropped past
it, and the log says how much).

What a SIGKILL loses: what was sampled or metered since the last batch the
store confirmed, i.e. at most ``flush_interval`` of counts while the store
is healthy (docs/usage.md). SIGTERM and SIGINT make a final flush
(``close()``, from ``server.Gateway.close``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tether.usage.model import MINUTE, ZERO, Batch, Counters, Key, add, minute_of, sub
from tether.usage.store import LedgerError, Store, open_store

if TYPE_CHECKING:
    from tether.gateway.core.registry import Registry
    from tether.usage.config import UsageConfig

__all__ = ["Ledger", "cumulative"]

log = logging.getLogger("tether.usage")

# After SIGTERM, how long the final flush may try: a healthy store takes
# milliseconds, and a few attempts RETRY_PAUSE apart ride out a blip. 3 s,
# because the drain (gateway.drain_timeout, 25 s) and SHUTDOWN_GRACE (2 s)
# come first, inside Kubernetes' 30 s between SIGTERM and SIGKILL.
SHUTDOWN_FLUSH_TIMEOUT = 3.0
RETRY_PAUSE = 0.5
# While the store keeps failing, one log line per this many seconds.
FAILURE_LOG_WINDOW = 60.0


def cumulative(registry: Registry) -> dict[str, Counters]:
    """Every app's counters since the gateway started: closed sockets' plus live ones'."""
    now = registry.clock()
    live: dict[str, list[float]] = {}
    for record in registry:
        sums = live.get(record.app)
        if sums is None:
            sums = live[record.app] = [0, 0, 0.0]
        sums[0] += record.bytes_out
        sums[1] += record.bytes_in
        sums[2] += now - record.created
    totals: dict[str, Counters] = {}
    for app, usage in registry.usage.items():
        out, in_, seconds = live.get(app, (0, 0, 0.0))
        totals[app] = Counters(
            bytes_out=usage.bytes_out + int(out),
            bytes_in=usage.bytes_in + int(in_),
            connects=usage.sockets_opened,
            # Refused by the policy or by a socket cap (a quota's are quota_refusals).
            denied_connects=usage.connects_denied + usage.limit_refusals,
            quota_refusals=usage.quota_refusals,
            socket_seconds=usage.socket_seconds + seconds,
        )
    return totals


class Ledger:
    """One gateway process's ledger: `core.ledger` (None without ``[usage]``).

    The state (samples, batches, what is confirmed) changes only on the
    event loop; the store is touched only on the ledger's thread.
    """

    def __init__(
        self,
        store: Callable[[], Store],
        registry: Registry,
        *,
        flush_interval: float,
        max_pending_rows: int,
        where: str = "",
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._new_store = store
        self.registry = registry
        self.flush_interval = flush_interval
        self.max_pending_rows = max_pending_rows
        self.where = where  # the store, for log lines
        self.wall = wall
        # One gateway process: its batches are (node, run, seq).
        self.node = ""
        self.run = secrets.token_hex(8)
        self.started = wall()
        self._seq = 0
        self._last: dict[str, Counters] = {}
        self._last_sample = self.started
        self._open: dict[Key, Counters] = {}  # sampled, not yet in a batch
        self._inflight: Batch | None = None  # sent to the store, not confirmed
        # Wall-clock time up to which every count is in the store.
        self.last_flush: float | None = None
        self.failures = 0  # consecutive failed writes
        self.dropped_rows = 0
        self.dropped = ZERO
        self._last_failure_log = -FAILURE_LOG_WINDOW
        self._last_drop_log = -FAILURE_LOG_WINDOW
        self._store: Store | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._flushing: asyncio.Task[bool] | None = None
        self._stopped = False

    @classmethod
    def from_config(cls, config: UsageConfig, registry: Registry) -> Ledger:
        location = config.location
        return cls(
            lambda: open_store(location),
            registry,
            flush_interval=config.flush_interval,
            max_pending_rows=config.max_pending_rows,
            where=str(location),
        )

    # -- what the metrics read ---------------------------------------------------

    def flush_lag(self, now: float | None = None) -> float:
        """Seconds of counts not yet in the store: since the last confirmed flush's sample
        (since start-up before the first). Up to flush_interval when healthy."""
        now = self.wall() if now is None else now
        since = self.started if self.last_flush is None else self.last_flush
        return max(0.0, now - since)

    @property
    def pending_rows(self) -> int:
        return len(self._open) + (len(self._inflight.rows) if self._inflight else 0)

    # -- sampling (the event loop) --------------------------------------------------

    def sample(self, now: float | None = None) -> None:
        """Add what every app did since the last sample to the current minute's rows.

        The change is attributed to the minute of the midpoint between the
        two samples: the ticks fall on minute boundaries (_delay), so a late
        tick's few milliseconds do not move a whole interval to the next minute.
        """
        now = self.wall() if now is None else now
        current = cumulative(self.registry)
        minute = minute_of((self._last_sample + now) / 2)
        last = self._last
        rows = self._open
        for app, counters in current.items():
            delta = sub(counters, last.get(app, ZERO))
            if any(delta):
                key = (app, minute)
                rows[key] = add(rows.get(key, ZERO), delta)
        self._last = current
        self._last_sample = now
        self._bound(now)

    def _bound(self, now: float) -> None:
        excess = self.pending_rows - self.max_pending_rows
        if excess <= 0:
            return
        for key in sorted(self._open, key=lambda k: k[1])[:excess]:
            self.dropped = add(self.dropped, self._open.pop(key))
            self.dropped_rows += 1
        if now - self._last_drop_log >= FAILURE_LOG_WINDOW:
            self._last_drop_log = now
            log.error(
                "usage ledger %s: %d rows waiting, past [usage] max_pending_rows %d: the oldest "
                "minutes are dropped; %d rows so far (%d bytes out, %d bytes in, %d connects) "
                "will never reach the ledger",
                self.where, self.pending_rows + excess, self.max_pending_rows, self.dropped_rows,
                self.dropped.bytes_out, self.dropped.bytes_in, self.dropped.connects,
            )

    def take_batch(self) -> Batch | None:
        """The batch to write next: the unconfirmed one again, else one of what is waiting."""
        if self._inflight is None and self._open:
            self._seq += 1
            self._inflight = Batch(
                self.node, self.run, self._seq, self.started, self._last_sample, self._open
            )
            self._open = {}
        return self._inflight

    def confirmed(self, batch: Batch) -> None:
        if self._inflight is batch:
            self._inflight = None
        self.last_flush = batch.sampled
        if self.failures:
            log.warning(
                "usage ledger %s: written again after %d failed attempts",
                self.where, self.failures,
            )
            self.failures = 0

    def failed(self, batch: Batch, exc: Exception) -> None:
        self.failures += 1
        now = self.wall()
        if self.failures == 1 or now - self._last_failure_log >= FAILURE_LOG_WINDOW:
            self._last_failure_log = now
            log.error(  # LedgerError says what failed; a bug gets its traceback
                "usage ledger %s: batch %d not written (%s); %d rows kept in memory and retried "
                "every %g s (failed %d times in a row)",
                self.where, batch.seq, exc, self.pending_rows, self.flush_interval, self.failures,
                exc_info=not isinstance(exc, LedgerError),
            )

    # -- writing (the ledger's thread) ---------------------------------------------------

    def _write(self, batch: Batch) -> bool:
        try:
            if self._store is None:
                self._store = self._new_store()
            return self._store.apply(batch)
        except Exception:
            # The connection may be broken: a new one for the retry.
            self._close_store()
            raise

    def _close_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    # -- the schedule (the event loop) ------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, node: str) -> None:
        """Sample and flush every flush_interval on `loop`, as gateway `node`."""
        self.node = node
        self._loop = loop
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tether-ledger"
        )
        self._ticker = loop.create_task(self._tick())
        log.info(
            "usage ledger: %s, flushed every %g s (node %r)", self.where, self.flush_interval, node
        )
        # Opened now, on the ledger's thread: a wrong URL or path is in the
        # log at start-up, not at the first flush with something to write.
        self._executor.submit(self._open_early)

    def _open_early(self) -> None:
        try:
            if self._store is None:
                self._store = self._new_store()
        except LedgerError as exc:
            log.error(  # noqa: TRY400 - LedgerError says what failed and why
                "%s; counts are kept in memory and the store is tried again at every flush", exc
            )

    def _delay(self, now: float) -> float:
        # The next multiple of the interval, or the next minute if sooner, so
        # that a sample falls on every minute boundary.
        interval = self.flush_interval
        return max(0.001, min(interval - now % interval, MINUTE - now % MINUTE))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._delay(self.wall()))
            self.sample()
            if self._flushing is None or self._flushing.done():
                assert self._loop is not None
                self._flushing = self._loop.create_task(self.flush())

    async def flush(self) -> bool:
        """Write every batch there is; True if the store has everything sampled."""
        assert self._loop is not None
        while (batch := self.take_batch()) is not None:
            try:
                await self._loop.run_in_executor(self._executor, self._write, batch)
            except Exception as exc:  # a store error or a bug: the rows stay, retried
                self.failed(batch, exc)
                return False
            self.confirmed(batch)
        # Nothing waiting: every count sampled so far is in the store, so an
        # idle gateway's lag stays below flush_interval (the metric's alert
        # would otherwise fire on every quiet gateway).
        if self.failures == 0 and not self.pending_rows:
            self.last_flush = self._last_sample
        return True

    def stop(self) -> None:
        """No more periodic samples; take the last one (every socket is closed by now)."""
        if self._stopped:
            return
        self._stopped = True
        if self._ticker is not None:
            self._ticker.cancel()
        self.sample()

    async def close(self, timeout: float = SHUTDOWN_FLUSH_TIMEOUT) -> None:
        """The final flush (SIGTERM, shutdown), retried for up to `timeout` seconds."""
        self.stop()
        if self._loop is None or self._executor is None:
            return  # never started
        written = False
        try:
            async with asyncio.timeout(timeout):
                if self._flushing is not None:
                    await asyncio.wait({self._flushing})  # its outcome is flush()'s to report
                while not (written := await self.flush()):
                    await asyncio.sleep(RETRY_PAUSE)
        except TimeoutError:
            pass
        if written:
            log.info("usage ledger: final flush written to %s", self.where)
        else:
            lost = ZERO
            batches = [self._open, self._inflight.rows if self._inflight else {}]
            for counters in (c for rows in batches for c in rows.values()):
                lost = add(lost, counters)
            log.error(
                "usage ledger %s: %d rows could not be written before exit and are lost: "
                "%d bytes out, %d bytes in, %d connects, %d denied connects",
                self.where, self.pending_rows, lost.bytes_out, lost.bytes_in, lost.connects,
                lost.denied_connects,
            )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self._loop.run_in_executor(self._executor, self._close_store), RETRY_PAUSE * 4
            )
        self._executor.shutdown(wait=False)
