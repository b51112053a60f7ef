"""The generic cell rate algorithm (GCRA) for the per-minute limits.

Why GCRA and not a token bucket: both allow the same traffic (a burst of
the whole limit, then the limit's rate; GCRA is a token bucket read as a
schedule), but GCRA keeps one number per counter, the *theoretical arrival
time* (TAT) of the next unit at the steady rate, where a bucket keeps two
(tokens and when they were counted) that must change together. One number
makes the wait exact (``TAT - period - now``: the ``retry_after`` an app is
told), makes a shared store's update one compare-and-set (what Redis-based
limiters such as redis-cell do, and what the cluster's leased store can
do), and costs a subtraction and a comparison per check.

A limit of `limit` units per `period` seconds gives every unit an
*emission interval* ``T = period / limit``. A cost of `n` units moves the
TAT to ``max(TAT, now) + n * T``; the request conforms while the new TAT is
no more than `period` ahead of `now`, so an idle counter lets a burst of
`limit` units through at once and then refills one unit every ``T``.
One pure function of the numbers given (:func:`step`): the clock is the caller's.
"""

from __future__ import annotations


def step(
    tat: float, now: float, cost: float, interval: float, period: float
) -> tuple[float, float]:
    """Charge `cost` units at `now` against the TAT `tat`: (the new TAT, the wait).

    The wait is 0.0 when the cost conforms. A caller that refuses a request
    that does not conform keeps the old TAT (a refused request costs
    nothing); one that lets it through anyway (bytes already relayed)
    stores the new TAT, and the wait is then how long until the budget is
    back to its burst line.
    """
    new = (tat if tat > now else now) + cost * interval
    wait = new - period - now
    return new, (wait if wait > 0.0 else 0.0)


__all__ = ["step"]
