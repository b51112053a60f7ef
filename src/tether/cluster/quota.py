"""Global quotas: each node spends budget leased from Redis in chunks.

The quota book (tether.quota) asks its store synchronously, on the connect
path and on the relay's: :class:`LeasedStore` answers from memory. Per
``(app, limit, window)`` it holds a :class:`Budget` of units (connects,
bytes, datagrams) leased from Redis by one atomic Lua script that never
grants past the limit in the window. A node asks for the next chunk in the
background once its budget falls below half a chunk, so a steady stream of
connects makes no Redis round trip; only the first connect of an app in a
window waits for one (``ready()``, from admission), and only on that node.

Windows are Redis's: the per-minute windows are whole minutes of Redis's
clock (``TIME`` inside the script), a quota day is the book's day. A
minute lease ends, at the node, at the window's end measured from *before*
the request was sent, so a node stops spending a window's budget no later
than Redis starts the next window. Accepted units per window are therefore
at most the limit; the stated bound, allowing for node clocks running at
different rates within a minute, is the limit plus nodes x chunk
(docs/deploy.md). Budget left at a node when its window ends expires with
it (an under-use of at most nodes x chunk); a node that stops returns what
it holds of the current windows.

Redis down: the budget in hand is spent; after that admission fails
closed for apps with quotas (``cluster.quota_fail = "closed"``, the
default) or falls back to this node's own counting (``"open"``). Bytes of
sockets already open are counted locally meanwhile, never cut. Every Redis
call is bounded (``redis_timeout``) and a failed one is not retried for
``RETRY_AFTER_FAILURE`` seconds, so an outage costs no connect a wait.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tether.cluster.config import ClusterConfig
from tether.cluster.membership import StoreUnavailable, bounded
from tether.gateway.core.errors import Refusal
from tether.quota import LocalStore
from tether.quota.limits import SECONDS_PER_MINUTE
from tether.wire import pb

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from tether.quota import QuotaBook

log = logging.getLogger("tether.cluster")

# After a failed Redis call, how long to answer from what is in hand before
# trying again: a second is short beside a minute window and keeps an
# outage from costing every connect a timed-out call.
RETRY_AFTER_FAILURE = 1.0
# A day's counters outlive their day by this much in Redis (late spends and
# a clock skew between nodes), then expire by themselves.
DAY_KEY_SLACK = 2 * 86_400

# KEYS[1]: the counter's key without its window; ARGV: chunk, cap, window
# seconds (minute) or "" (a day), the day's id. Returns the units granted,
# the window id, the seconds left in it (text: Lua numbers lose fractions
# as replies), and the window's total granted so far.
_LEASE = """
local chunk, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local id, left, expire_at
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[3] ~= '' then
  local w = tonumber(ARGV[3])
  local n = math.floor(now / w)
  id = tostring(n)
  left = (n + 1) * w - now
  expire_at = (n + 2) * w
else
  id = ARGV[4]
  left = 0
  -- the day's end plus slack; never already past (a node's day ahead of Redis's clock)
  expire_at = math.max(tonumber(ARGV[4]) + tonumber(ARGV[5]), now + tonumber(ARGV[5]))
end
local key = KEYS[1] .. id
local used = tonumber(redis.call('GET', key) or '0')
local grant = math.min(chunk, cap - used)
if grant < 0 then grant = 0 end
if grant > 0 then
  used = redis.call('INCRBY', key, grant)
  redis.call('EXPIREAT', key, math.ceil(expire_at))
end
return {grant, id, tostring(left), used}
"""
# Give back unspent units of a window that is still the current one.
_RETURN = """
local v = redis.call('GET', KEYS[1])
if v then
  local back = math.min(tonumber(ARGV[1]), tonumber(v))
  if back > 0 then redis.call('DECRBY', KEYS[1], back) end
  return back
end
return 0
"""


@dataclass(slots=True)
class Budget:
    """One (app, limit)'s units in hand for one window."""

    window: str = ""  # Redis's id of the window these units belong to
    units: float = 0.0
    ends: float = math.inf  # monotonic time the window ends (minute windows)
    exhausted: bool = False  # Redis granted nothing more in this window
    granted: int = 0  # the window's total granted to all nodes, as last seen
    fetching: asyncio.Task[None] | None = None


class LeasedStore:
    """A tether.quota QuotaStore whose totals hold across the cluster (module docstring)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        config: ClusterConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.config = config
        self.loop = loop
        self.clock = clock
        self.local = LocalStore()  # the pacing within this node, and the fallback
        self.budgets: dict[tuple[str, str], Budget] = {}
        self.down_until = 0.0  # after a failed call: answer from what is in hand until then
        self.last_error = ""
        self._lease = redis.register_script(_LEASE)
        self._return = redis.register_script(_RETURN)

    # -- keys and windows ------------------------------------------------------------

    def _base(self, app: str, limit: str) -> str:
        return f"{self.config.prefix}quota:{app}:{limit}:"

    def _budget(self, app: str, limit: str, day: float | None) -> Budget:
        key = (app, limit)
        budget = self.budgets.get(key)
        if budget is None:
            budget = self.budgets[key] = Budget()
        if day is not None and budget.window != _day_id(day):
            self._renew(budget, _day_id(day))
        elif day is None and budget.window and self.clock() >= budget.ends:
            self._renew(budget, "")
        return budget

    @staticmethod
    def _renew(budget: Budget, window: str) -> None:
        # A new window: what was left of the old one expired with it.
        budget.window, budget.units, budget.ends = window, 0.0, math.inf
        budget.exhausted, budget.granted = False, 0

    @property
    def down(self) -> bool:
        return self.clock() < self.down_until

    def chunk(self, cap: int) -> int:
        return max(1, math.ceil(cap * self.config.lease_fraction))

    # -- leasing -------------------------------------------------------------------

    def refill(self, app: str, limit: str, cap: int, day: float | None) -> Budget:
        """Ask for the next chunk in the background (once at a time); the budget."""
        budget = self._budget(app, limit, day)
        if budget.fetching is None and not budget.exhausted and not self.down:
            budget.fetching = self.loop.create_task(self._fetch(app, limit, cap, day, budget))
        return budget

    async def _fetch(
        self, app: str, limit: str, cap: int, day: float | None, budget: Budget
    ) -> None:
        sent = self.clock()
        args: list[str | int] = [self.chunk(cap), cap]
        args += ["", _day_id(day), DAY_KEY_SLACK] if day is not None else [
            int(SECONDS_PER_MINUTE), "", 0]
        try:
            grant, window, left, granted = await bounded(
                self._lease(keys=[self._base(app, limit)], args=args),
                self.config.redis_timeout, f"a lease for {limit} of app {app!r}",
            )
        except StoreUnavailable as exc:
            self._failed(exc)
            return
        finally:
            budget.fetching = None
        self.down_until = 0.0
        window = window.decode() if isinstance(window, bytes) else str(window)
        if day is None:
            if budget.window != window:
                self._renew(budget, window)
            # Measured from before the request: the lease ends no later than Redis's window.
            budget.ends = sent + float(left)
        elif budget.window != window:
            return  # the book has moved to another day meanwhile
        budget.units += int(grant)
        budget.granted = int(granted)
        budget.exhausted = int(grant) < self.chunk(cap)

    def _failed(self, exc: StoreUnavailable) -> None:
        if not self.down and self.last_error != str(exc):
            log.warning("cluster quotas: %s; %s until it answers", exc,
                        "connects of apps with quotas are refused"
                        if self.config.quota_fail == "closed" else
                        "each node counts quotas on its own")
        self.last_error = str(exc)
        self.down_until = self.clock() + RETRY_AFTER_FAILURE

    async def ready(self, book: QuotaBook, app: str) -> Refusal | None:
        """Before admission counts a connect of `app`: budget in hand, or why not.

        Steady state returns at once (budget in hand, or the window's limit
        reached: the book refuses with its own words). Only with no budget
        and no answer yet for this window does it wait for Redis (bounded);
        Redis away, it refuses (fail closed) or lets the book count locally.
        """
        cap = book.limits(app).connects_per_minute
        if cap is None:
            return None
        budget = self._budget(app, "connects_per_minute", None)
        if budget.units >= 1 or budget.exhausted:
            return None  # steady state (the next chunk is asked for at half a chunk: rate())
        self.refill(app, "connects_per_minute", cap, None)  # nothing in hand: lease now
        if budget.fetching is not None:
            await asyncio.shield(budget.fetching)
            budget = self._budget(app, "connects_per_minute", None)
            if budget.units >= 1 or budget.exhausted:
                return None
        if self.config.quota_fail == "open":
            return None
        return Refusal(pb.Error.UNAVAILABLE, errno.EAGAIN,
            f"tether: app {app!r} has a connects_per_minute quota ({cap}) counted across the "
            f"cluster, and {self.last_error or 'the cluster Redis cannot be reached'}: its "
            "connects are refused until Redis answers (cluster.quota_fail = \"closed\")",
            rule="cluster.quota_fail")

    async def give_back(self) -> None:
        """Return what this node holds of the current windows (at shutdown)."""
        for (app, limit), budget in list(self.budgets.items()):
            units = int(budget.units)
            if units <= 0 or not budget.window or self.clock() >= budget.ends:
                continue
            budget.units = 0
            try:
                await bounded(self._return(keys=[self._base(app, limit) + budget.window],
                                           args=[units]),
                              self.config.redis_timeout, "returning leased quota")
            except StoreUnavailable as exc:
                log.info("cluster quotas: %s; the lease expires with its window", exc)
                return

    # -- QuotaStore ----------------------------------------------------------------

    def rate(
        self, app: str, limit: str, cost: float, interval: float, now: float, *, force: bool
    ) -> float:
        cap = round(SECONDS_PER_MINUTE / interval)
        budget = self._budget(app, limit, None)
        if budget.units - cost < self.chunk(cap) / 2:
            self.refill(app, limit, cap, None)
        if not force and budget.units < cost:
            if self.down and self.config.quota_fail == "open":
                pass  # counted by this node alone until Redis answers
            elif budget.exhausted:
                return max(budget.ends - self.clock(), interval)  # the next window
            else:
                return interval  # the next chunk is on its way (refill above)
        wait = self.local.rate(app, limit, cost, interval, now, force=force)
        if wait == 0.0 or force:
            # Below 0 for bytes already relayed (force): the next lease pays it.
            budget.units -= cost
        return wait

    def spend(self, app: str, limit: str, amount: int, cap: int, day: float, *, whole: bool) -> int:
        budget = self._budget(app, limit, day)
        if budget.exhausted and budget.units < amount:
            # The day's limit is all leased: what is left here is all there is.
            room = max(int(budget.units), 0)
            taken = amount if amount <= room else (0 if whole else room)
        else:
            # Bytes are never held back waiting for a lease (or for Redis): the
            # budget goes below 0 and the next lease pays for them.
            taken = amount
        budget.units -= taken
        if budget.units < self.chunk(cap) / 2:
            self.refill(app, limit, cap, day)
        return taken

    def spent(self, app: str, limit: str, day: float) -> int:
        budget = self._budget(app, limit, day)
        if not budget.exhausted:
            return 0  # some of the day's limit is still to be leased: not reached
        # Every other node's lease counted as spent: reached once ours is spent too.
        return budget.granted - max(int(budget.units), 0)


def _day_id(day: float) -> str:
    return str(int(day))


__all__ = ["Budget", "LeasedStore"]
