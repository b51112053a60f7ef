"""A bounded cache of DNS answers that honours their TTLs.

Least recently used entries go first when the cache is full; an entry is
never served after its TTL, clamped to [min_ttl, max_ttl], has run out. The
clock is injected so tests expire entries without sleeping.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_MAX_TTL",
    "DEFAULT_MIN_TTL",
    "MAX_NEGATIVE_TTL",
    "TTLCache",
]

# dnspython's dns.resolver.LRUCache default size: a few MB at most for address answers.
DEFAULT_CACHE_SIZE = 100_000
DEFAULT_MIN_TTL = 0.0
# Unbound's cache-max-ttl default (one day): a bad record cannot stick for longer.
DEFAULT_MAX_TTL = 86_400.0
# RFC 2308 section 5: negative answers are cached for at most a few hours ("one to
# three hours have been found to work well"); the upper end is used here.
MAX_NEGATIVE_TTL = 10_800.0

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """An LRU map whose entries expire; `get` never returns an expired value."""

    def __init__(
        self,
        max_size: int = DEFAULT_CACHE_SIZE,
        *,
        min_ttl: float = DEFAULT_MIN_TTL,
        max_ttl: float = DEFAULT_MAX_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 0:
            raise ValueError(f"cache size must be 0 or more, not {max_size}")
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError(f"min_ttl {min_ttl} must be between 0 and max_ttl {max_ttl}")
        self.max_size = max_size
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self.clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V, ttl: float, *, negative: bool = False) -> float:
        """Store `value` for `ttl` seconds, clamped; returns the TTL used (0: not stored).

        A negative answer's TTL is also capped at `MAX_NEGATIVE_TTL`.
        """
        used = min(max(ttl, self.min_ttl), self.max_ttl)
        if negative:
            used = min(used, MAX_NEGATIVE_TTL)
        if used <= 0 or self.max_size == 0:
            self._entries.pop(key, None)
            return 0.0
        self._entries[key] = (self.clock() + used, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)
        return used

    def clear(self) -> None:
        self._entries.clear()
