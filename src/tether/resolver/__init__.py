"""Name resolvers for the egress decider.

`StaticResolver` answers from a fixed table (tests, `tether check`, and
sandboxes that must never query DNS); `SystemResolver` uses the C library;
`UpstreamResolver` (asyncio) asks named DNS servers, with a `TTLCache`.
"""

from __future__ import annotations

from tether.policy._resolution import ResolutionError, Resolver
from tether.resolver.cache import TTLCache
from tether.resolver.static import StaticResolver
from tether.resolver.system import SystemResolver
from tether.resolver.upstream import HostAnswer, UpstreamResolver

__all__ = [
    "HostAnswer",
    "ResolutionError",
    "Resolver",
    "StaticResolver",
    "SystemResolver",
    "TTLCache",
    "UpstreamResolver",
]
