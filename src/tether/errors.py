"""tether's own exception classes, shared by several tether packages.

An error an app can meet at run time derives from the stdlib exception the
app already catches (urllib3's style): ``PolicyDenied`` *is* a
``PermissionError``, so ``except PermissionError`` and ``except OSError``
keep working, and a program that wants to know more reads its attributes.
``LimitExceeded`` is an ``OSError`` with errno ``EMFILE`` (a gateway cap),
and ``QuotaExceeded``, the app's own quota, a ``LimitExceeded`` with errno
``EDQUOT`` ("Disk quota exceeded", the errno a quota has) that names the
limit, its window and when it refills. The client maps the gateway's error
to each in ``tether.client.errors``.
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


class NodeGone(ConnectionResetError):
    """A handed-off socket's node has left the cluster: the socket was lost with it.

    A ``ConnectionResetError`` (errno ``ECONNRESET``): the connection is
    gone, as when a peer resets it, and a TCP connection cannot outlive the
    kernel that held it. Raised by a resume (``pickle.loads``,
    ``handoff.from_bytes``) at once, not after a timeout. `node` names the
    node that held it.
    """

    def __init__(self, message: str, node: str = "") -> None:
        super().__init__(errno.ECONNRESET, message)
        self.node = node

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.strerror, self.node))


class QuotaExceeded(LimitExceeded):
    """The app's quota refused a connect, a lookup or a UDP socket (docs/quotas.md).

    An ``OSError`` with errno ``EDQUOT``, and a :class:`LimitExceeded` (so
    ``except LimitExceeded`` catches the ``sockets`` quota as it caught
    the per-app socket cap that became it). The text is the gateway's
    sentence: ``tether: app 'billing' is over its connects_per_minute quota
    (60 a minute, quota.connects_per_minute); it has room again in 0.8 s``.

    `app` is the app; `limit` the quota's name (``enabled``, ``sockets``,
    ``connects_per_minute``, ``bytes_out_per_day``, ``bytes_in_per_day``);
    `value` its value (bytes for the byte limits, 0 for ``enabled``);
    `window` what it is counted over (``minute``, ``day``, ``concurrent``,
    or "" for ``enabled``); `retry_after` the seconds until it has room
    again (0.0: not known, e.g. until one of the app's sockets closes).
    """

    def __init__(
        self,
        message: str,
        limit: str = "",
        value: int = 0,
        *,
        app: str = "",
        window: str = "",
        retry_after: float = 0.0,
    ) -> None:
        OSError.__init__(self, errno.EDQUOT, message)
        self.limit = limit
        self.value = value
        self.app = app
        self.window = window
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (_quota_exceeded, (self.strerror, self.limit, self.value, self.app,
                                  self.window, self.retry_after))


def _quota_exceeded(
    message: str, limit: str, value: int, app: str, window: str, retry_after: float
) -> QuotaExceeded:
    # pickle passes positional arguments only; the keywords are rebuilt here.
    return QuotaExceeded(message, limit, value, app=app, window=window, retry_after=retry_after)


__all__ = ["ConfigError", "LimitExceeded", "NodeGone", "PolicyDenied", "QuotaExceeded"]
