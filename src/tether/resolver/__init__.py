"""Name resolvers for the egress decider.

`StaticResolver` answers from a fixed table (tests, `tether check`, and
sandboxes that must never query DNS); `SystemResolver` uses the C library.
"""

from __future__ import annotations

from tether.policy._resolution import ResolutionError, Resolver
from tether.resolver.static import StaticResolver
from tether.resolver.system import SystemResolver

__all__ = ["ResolutionError", "Resolver", "StaticResolver", "SystemResolver"]
