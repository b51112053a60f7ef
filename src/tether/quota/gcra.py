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
These are pure functions of the numbers given: the clock is the caller's.
"""

from __future__ import annotations


def conform(tat: float, now: float, cost: float, interval: float, period: float) -> float:
    """The wait before `cost` conforms (0.0: it does now), for the TAT `tat`.

    On 0.0 the caller stores :func:`advance`'s new TAT; otherwise the TAT
    stays as it was (a refused request costs nothing).
    """
    wait = max(tat, now) + cost * interval - period - now
    return wait if wait > 0.0 else 0.0


def advance(tat: float, now: float, cost: float, interval: float) -> float:
    """The TAT after charging `cost` units at `now`."""
    return (tat if tat > now else now) + cost * interval


__all__ = ["advance", "conform"]
