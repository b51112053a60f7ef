"""Tether's egress policy: a pure decider in the style of smokescreen's.

`Decider` judges whether an app may reach a host and port and returns a
`Decision` with the reason and the rule that decided. It knows nothing
about sockets and never looks names up itself: names are resolved once by
a `Resolver` (or by the gateway) and every answer is judged.
See docs/policy.md.
"""

from __future__ import annotations

from tether.policy._resolution import ResolutionError, Resolver
from tether.policy.decider import DEFAULT_ALLOW_RULE, Candidate, Decider, Decision
from tether.policy.hosts import Target, normalize_host, parse_c_ipv4
from tether.policy.policyset import (
    DEFAULT_ALLOW,
    DEFAULT_DENY_PORTS,
    MODES,
    AppPolicy,
    PolicySet,
    parse_policy,
)
from tether.policy.ranges import DEFAULT_DENY_TABLE, SpecialRange, classify
from tether.policy.rules import PortRange, Rule, RuleError, Transport

__all__ = [
    "DEFAULT_ALLOW",
    "DEFAULT_ALLOW_RULE",
    "DEFAULT_DENY_PORTS",
    "DEFAULT_DENY_TABLE",
    "MODES",
    "AppPolicy",
    "Candidate",
    "Decider",
    "Decision",
    "PolicySet",
    "PortRange",
    "ResolutionError",
    "Resolver",
    "Rule",
    "RuleError",
    "SpecialRange",
    "Target",
    "Transport",
    "classify",
    "normalize_host",
    "parse_c_ipv4",
    "parse_policy",
]
