"""tether's own exception classes, shared by several tether packages.

An error an app can meet at run time derives from the stdlib exception the
app already catches (urllib3's style): ``PolicyDenied`` *is* a
``PermissionError``, so ``except PermissionError`` and ``except OSError``
keep working, and a program that wants to know more reads its attributes.
A later refusal of the same kind follows the same pattern, e.g. a
``QuotaExceeded(PermissionError)`` carrying the quota that ran out; the
client maps the gateway's error to it in ``tether.client.errors``.
"""

from __future__ import annotations

import errno
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range.

    `path` names where it is, as a dotted path into the TOML document
    (``policy.allow[2]``, ``apps.billing.key``), so the operator can find it.
    """

    def __init__(self, path: str, message: str, *, source: str | None = None) -> None:
        self.path = path
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {message}")


class PolicyDenied(PermissionError):
    """The gateway's egress policy refused a destination (a TCP connect, a UDP destination).

    It is a ``PermissionError`` with errno ``EACCES`` and the gateway's
    sentence as its text (``tether: connection to 10.1.2.3:5432 denied for
    app 'billing': 10.0.0.0/8 is private (rule: deny 10.0.0.0/8)``), so code
    that catches PermissionError or OSError sees what it always saw.

    `rule` is the policy rule that decided (``deny 10.0.0.0/8``); `reason`
    the policy's reason without the destination and the app (``10.0.0.0/8
    is private``), or "" from a gateway that does not send it.
    """

    def __init__(self, message: str, rule: str = "", reason: str = "") -> None:
        super().__init__(errno.EACCES, message)
        self.rule = rule
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError pickles its (errno, text) args, which this __init__ does not take.
        return (type(self), (self.strerror, self.rule, self.reason))


class LimitExceeded(OSError):
    """The gateway refused a new socket because a resource limit is reached.

    An ``OSError`` with errno ``EMFILE`` ("Too many open files"): what an
    app that runs out of descriptors on its own host already meets from
    ``socket()`` or ``accept()``, and what its ``except OSError`` (and
    connection pools that back off on EMFILE) already handle. The text is the
    gateway's sentence (``tether: app 'billing' has 100 open sockets, its
    max_sockets``).

    `limit` names the limit (``max_sockets`` of the app, or the gateway's
    ``max_sockets``); `value` is its value (0 from a gateway that does not say).
    """

    def __init__(self, message: str, limit: str = "", value: int = 0) -> None:
        super().__init__(errno.EMFILE, message)
        self.limit = limit
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.strerror, self.limit, self.value))


__all__ = ["ConfigError", "LimitExceeded", "PolicyDenied"]
