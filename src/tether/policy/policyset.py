"""The parsed egress policy (`PolicySet`) and its TOML reader.

TOML shape (tables already loaded by tomllib)::

    [policy]
    allow = ["127.0.0.0/8:18000-18100", "*.example.com:443"]
    deny = ["203.0.113.0/24"]
    deny_ports = [25, 21]      # default
    allow_ports = [80, 443]    # optional; only these ports (and rules naming others)
    defaults = true            # include App Engine's default allow list
    mode = "enforce"           # or "report"

    [apps.billing.policy]
    allow = ["payments.example.net:443"]
    deny = []
    mode = "report"
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.errors import ConfigError
from tether.policy.rules import MAX_PORT, Rule, RuleError

__all__ = [
    "DEFAULT_ALLOW",
    "DEFAULT_DENY_PORTS",
    "MODES",
    "AppPolicy",
    "PolicySet",
    "parse_policy",
]

MODES = ("enforce", "report")

# App Engine's documented exceptions to its blocked ranges (Sockets API for
# legacy bundled services, "Limitations and restrictions"): Google Public
# DNS on port 53 (both transports; DNS uses both) and Gmail's SMTPS/POP3S/
# IMAPS endpoints (TCP only; they are TLS-over-TCP services).
DEFAULT_ALLOW: tuple[Rule, ...] = tuple(
    Rule.parse(text)
    for text in (
        "8.8.8.8:53",
        "8.8.4.4:53",
        "[2001:4860:4860::8888]:53",
        "[2001:4860:4860::8844]:53",
        "smtp.gmail.com:465/tcp",
        "smtp.gmail.com:587/tcp",
        "pop.gmail.com:995/tcp",
        "imap.gmail.com:993/tcp",
    )
)

# App Engine blocked port 25 (SMTP; use authenticated submission on 587)
# and did not support FTP (21), per the same page.
DEFAULT_DENY_PORTS: frozenset[int] = frozenset({25, 21})

_POLICY_KEYS = ("allow", "allow_ports", "defaults", "deny", "deny_ports", "mode")
_APP_KEYS = ("allow", "deny", "mode")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class AppPolicy:
    """Rules for one app, checked before the global ones."""

    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    mode: str | None = None  # None: the global mode

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")


@dataclass(frozen=True)
class PolicySet:
    """The whole egress policy. `PolicySet()` is the default policy."""

    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    deny_ports: frozenset[int] = DEFAULT_DENY_PORTS
    allow_ports: frozenset[int] | None = None
    defaults: bool = True
    mode: str = "enforce"
    apps: Mapping[str, AppPolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        # Read-only copies, so a PolicySet shared between tasks cannot change.
        object.__setattr__(self, "apps", types.MappingProxyType(dict(self.apps)))
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "deny", tuple(self.deny))

    @property
    def global_allow(self) -> tuple[Rule, ...]:
        """The global allow rules: the configured ones, then the defaults."""
        return self.allow + (DEFAULT_ALLOW if self.defaults else ())

    def mode_for(self, app: str) -> str:
        """The app's mode if it sets one, else the global mode."""
        app_policy = self.apps.get(app)
        if app_policy is not None and app_policy.mode is not None:
            return app_policy.mode
        return self.mode

    def ordered_rules(self, app: str) -> tuple[tuple[Rule, bool], ...]:
        """(rule, is_allow) in evaluation order for `app`.

        App allow, app deny, global allow (configured, then defaults),
        global deny; the first rule that matches decides.
        """
        app_policy = self.apps.get(app, AppPolicy())
        return (
            tuple((rule, True) for rule in app_policy.allow)
            + tuple((rule, False) for rule in app_policy.deny)
            + tuple((rule, True) for rule in self.global_allow)
            + tuple((rule, False) for rule in self.deny)
        )


def _key_path(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if _BARE_KEY.fullmatch(key) else f'{prefix}."{key}"'


def _check_keys(table: Mapping[str, Any], prefix: str, allowed: Sequence[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(
                _key_path(prefix, str(key)),
                f"unknown key; expected one of: {', '.join(allowed)}",
            )


def _rules(value: Any, path: str) -> tuple[Rule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(path, f"must be an array of rule strings, not {_type_name(value)}")
    rules: list[Rule] = []
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        if not isinstance(item, str):
            raise ConfigError(item_path, f"must be a rule string, not {_type_name(item)}")
        try:
            rules.append(Rule.parse(item))
        except RuleError as exc:
            raise ConfigError(item_path, str(exc)) from None
    return tuple(rules)


def _ports(value: Any, path: str) -> frozenset[int]:
    if not isinstance(value, list):
        raise ConfigError(path, f"must be an array of port numbers, not {_type_name(value)}")
    ports: set[int] = set()
    for index, item in enumerate(value):
        # bool is an int subclass; `true` is never a port.
        if not isinstance(item, int) or isinstance(item, bool):
            raise ConfigError(f"{path}[{index}]", f"must be a port number, not {_type_name(item)}")
        if not 1 <= item <= MAX_PORT:
            raise ConfigError(f"{path}[{index}]", f"port {item} is not within 1-{MAX_PORT}")
        ports.add(item)
    return frozenset(ports)


def _mode(value: Any, path: str) -> str:
    if not isinstance(value, str) or value not in MODES:
        shown = repr(value) if isinstance(value, str) else _type_name(value)
        raise ConfigError(path, f'must be "enforce" or "report", not {shown}')
    return value


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return names.get(type(value), type(value).__name__)


def parse_policy(
    policy_table: Mapping[str, Any] | None,
    app_tables: Mapping[str, Mapping[str, Any]] | None = None,
) -> PolicySet:
    """Build a `PolicySet` from the ``[policy]`` table and per-app policy tables.

    `app_tables` maps an app name to its ``[apps.NAME.policy]`` table.
    Raises `ConfigError` naming the dotted path of the first bad key or
    value (``policy.allow[2]``, ``apps.billing.policy.mode``); unknown keys
    are errors too, so a typo cannot silently weaken the policy.
    """
    table: Mapping[str, Any] = {} if policy_table is None else policy_table
    if not isinstance(table, Mapping):
        raise ConfigError("policy", f"must be a table, not {_type_name(table)}")
    _check_keys(table, "policy", _POLICY_KEYS)

    defaults = table.get("defaults", True)
    if not isinstance(defaults, bool):
        raise ConfigError("policy.defaults", f"must be true or false, not {_type_name(defaults)}")
    allow_ports = None
    if "allow_ports" in table:
        allow_ports = _ports(table["allow_ports"], "policy.allow_ports")
    deny_ports = DEFAULT_DENY_PORTS
    if "deny_ports" in table:
        deny_ports = _ports(table["deny_ports"], "policy.deny_ports")

    allow = _rules(table.get("allow"), "policy.allow")
    deny = _rules(table.get("deny"), "policy.deny")
    mode = _mode(table["mode"], "policy.mode") if "mode" in table else "enforce"

    apps: dict[str, AppPolicy] = {}
    for name, app_table in (app_tables or {}).items():
        prefix = _key_path("apps", str(name)) + ".policy"
        if not isinstance(name, str) or not name:
            raise ConfigError(prefix, "an app name must be a non-empty string")
        if not isinstance(app_table, Mapping):
            raise ConfigError(prefix, f"must be a table, not {_type_name(app_table)}")
        _check_keys(app_table, prefix, _APP_KEYS)
        apps[name] = AppPolicy(
            allow=_rules(app_table.get("allow"), f"{prefix}.allow"),
            deny=_rules(app_table.get("deny"), f"{prefix}.deny"),
            mode=_mode(app_table["mode"], f"{prefix}.mode") if "mode" in app_table else None,
        )

    return PolicySet(
        allow=allow,
        deny=deny,
        deny_ports=deny_ports,
        allow_ports=allow_ports,
        defaults=defaults,
        mode=mode,
        apps=apps,
    )
