"""GCRA as numbers: the burst, the steady rate, the exact wait, the throttle's bound.

Times are generated, not slept: each property holds for every schedule
Hypothesis finds.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.quota import gcra

PERIOD = 60.0

limits = st.integers(min_value=1, max_value=10_000)
# (seconds since the previous request, its cost) pairs.
schedules = st.lists(
    st.tuples(st.floats(min_value=0, max_value=30, allow_nan=False), st.integers(1, 50)),
    min_size=1, max_size=200,
)


def wait_of(tat: float, now: float, cost: float, interval: float, period: float) -> float:
    return gcra.step(tat, now, cost, interval, period)[1]


def tat_after(tat: float, now: float, cost: float, interval: float) -> float:
    return gcra.step(tat, now, cost, interval, PERIOD)[0]


def run(limit: int, schedule: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """The (time, cost) requests that conformed, charging only those."""
    interval = PERIOD / limit
    tat, now, admitted = 0.0, 0.0, []
    for gap, cost in schedule:
        now += gap
        if wait_of(tat, now, cost, interval, PERIOD) == 0.0:
            tat = tat_after(tat, now, cost, interval)
            admitted.append((now, cost))
    return admitted


@pytest.mark.parametrize(
    ("limit", "costs", "admitted"),
    [
        (3, [1, 1, 1, 1], 3),  # a burst of the whole limit, then no more
        (60, [1] * 61, 60),
        (10, [4, 4, 4], 2),  # 8 of 10 used: 4 more does not fit
        (10, [11], 0),  # more than the limit never conforms
        (10, [10], 1),
    ],
)
def test_an_idle_counter_lets_the_whole_limit_through_at_once(
    limit: int, costs: list[int], admitted: int
) -> None:
    assert len(run(limit, [(0.0, c) for c in costs])) == admitted


@pytest.mark.parametrize(("limit", "wait"), [(3, 20.0), (60, 1.0), (6000, 0.01)])
def test_after_the_burst_one_unit_refills_every_interval(limit: int, wait: float) -> None:
    interval = PERIOD / limit
    tat = tat_after(0.0, 0.0, limit, interval)  # the whole burst at t=0
    assert wait_of(tat, 0.0, 1, interval, PERIOD) == pytest.approx(wait)
    assert wait_of(tat, wait, 1, interval, PERIOD) == 0.0
    # Refills stop at the limit: after a long idle, still one burst.
    assert wait_of(tat, 1e6, limit, interval, PERIOD) == 0.0
    assert wait_of(tat, 1e6, limit + 1, interval, PERIOD) > 0.0


@given(limit=limits, schedule=schedules)
def test_no_window_admits_more_than_the_burst_plus_the_rate(
    limit: int, schedule: list[tuple[float, int]]
) -> None:
    admitted = run(limit, schedule)
    rate = limit / PERIOD
    for i, (start, _) in enumerate(admitted):
        total = 0
        for at, cost in admitted[i:]:
            total += cost
            # In [start, at]: at most `limit` at once plus what refilled since.
            assert total <= limit + (at - start) * rate + 1e-6


@given(
    limit=limits,
    tat=st.floats(min_value=0, max_value=1e5),
    now=st.floats(min_value=0, max_value=1e5),
    cost=st.integers(1, 10_000),
)
def test_the_wait_is_exact(limit: int, tat: float, now: float, cost: int) -> None:
    """Refused with a wait w: at now + w it conforms, and a little earlier it did not."""
    interval = PERIOD / limit
    wait = wait_of(tat, now, cost, interval, PERIOD)
    if cost > limit:
        assert wait > 0.0
        return
    if wait == 0.0:
        return
    later = now + wait
    assert wait_of(tat, math.nextafter(later, math.inf), cost, interval, PERIOD) <= 1e-6
    assert wait_of(tat, later - max(1e-6, wait / 2), cost, interval, PERIOD) > 0.0


@given(
    limit=st.integers(min_value=1_000, max_value=10**8),
    chunks=st.lists(st.integers(1, 262_144), min_size=1, max_size=300),
)
def test_a_throttled_sender_never_runs_ahead_of_the_rate(limit: int, chunks: list[int]) -> None:
    """The relay's way: every chunk passes and is charged, then reading waits the delay.

    By any time t the sender has sent at most the burst, what the rate
    allowed since, and the one chunk read before the pause took effect.
    """
    interval = PERIOD / limit
    tat, now, sent = 0.0, 0.0, 0
    for n in chunks:
        wait = wait_of(tat, now, n, interval, PERIOD)
        tat = tat_after(tat, now, n, interval)
        sent += n
        assert sent <= limit + now * limit / PERIOD + n + 1e-6 * sent
        # The delay is the time until the budget is back to the burst line.
        now += wait
    # And it is not slower than the rate: the last delay ends when the
    # schedule has caught up with what was sent.
    assert now <= max(0.0, sent * interval - PERIOD) + 1e-6 * max(1.0, now)
