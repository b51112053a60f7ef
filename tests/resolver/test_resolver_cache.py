"""TTLCache: TTL expiry on an injected clock, the LRU bound, clamping, negative caps."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.resolver.cache import MAX_NEGATIVE_TTL, TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("ttl", "min_ttl", "max_ttl", "negative", "age", "fresh"),
    [
        (30, 0, 86400, False, 29.9, True),
        (30, 0, 86400, False, 30, False),  # expires at exactly its TTL
        (0, 0, 86400, False, 0, False),  # TTL 0: never stored
        (0, 5, 86400, False, 4.9, True),  # min_ttl lifts a short TTL
        (10**6, 0, 60, False, 60, False),  # max_ttl caps a long one
        (10**6, 0, 10**7, True, MAX_NEGATIVE_TTL, False),  # RFC 2308 cap for negatives
        (10**6, 0, 10**7, False, MAX_NEGATIVE_TTL, True),  # ...only for negatives
    ],
)
def test_expiry(
    ttl: float, min_ttl: float, max_ttl: float, negative: bool, age: float, fresh: bool
) -> None:
    clock = Clock()
    cache: TTLCache[str, str] = TTLCache(10, min_ttl=min_ttl, max_ttl=max_ttl, clock=clock)
    cache.put("k", "v", ttl, negative=negative)
    clock.now += age
    assert (cache.get("k") == "v") is fresh
    if not fresh:
        assert len(cache) == 0


def test_least_recently_used_goes_first() -> None:
    cache: TTLCache[str, int] = TTLCache(2, clock=Clock())
    cache.put("a", 1, 60)
    cache.put("b", 2, 60)
    assert cache.get("a") == 1  # a is now the most recently used
    cache.put("c", 3, 60)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)


def test_size_zero_caches_nothing_and_bad_limits_are_refused() -> None:
    cache: TTLCache[str, int] = TTLCache(0, clock=Clock())
    assert cache.put("a", 1, 60) == 0
    assert cache.get("a") is None
    with pytest.raises(ValueError, match="min_ttl 10 must be between 0 and max_ttl 5"):
        TTLCache(1, min_ttl=10, max_ttl=5)


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 100)), max_size=200))
def test_never_over_its_bound_and_never_stale(ops: list[tuple[int, int]]) -> None:
    clock = Clock()
    cache: TTLCache[int, int] = TTLCache(5, clock=clock)
    expiry: dict[int, float] = {}
    for key, ttl in ops:
        cache.put(key, key, ttl)
        expiry[key] = clock.now + ttl
        clock.now += 1
        assert len(cache) <= 5
        for k, until in expiry.items():
            if clock.now >= until:
                assert cache.get(k) is None
