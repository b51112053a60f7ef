"""Tether: real outbound sockets for programs with no network of their own.

``tether.socket`` is a drop-in replacement for the standard ``socket``
module; :func:`install` patches the standard module in place so that
unmodified libraries go through the gateway.
"""

from __future__ import annotations

__version__ = "0.1.0"

from tether.client.install import install, installed, uninstall
from tether.client.sock import keepalive
from tether.errors import LimitExceeded, NodeGone, PolicyDenied, QuotaExceeded

__all__ = [
    "LimitExceeded",
    "NodeGone",
    "PolicyDenied",
    "QuotaExceeded",
    "__version__",
    "install",
    "installed",
    "keepalive",
    "uninstall",
]
