"""asyncio through the gateway: the same handshake as the blocking client, driven by the loop.

- :func:`open_connection` / :func:`create_connection`: ``asyncio``'s, through
  the gateway, on any loop (the default one or uvloop), install() or not;
- :func:`install_loop_hooks` (called by ``tether.install()``): the loops'
  own ``create_connection``, ``sock_connect``, lookups and
  ``create_datagram_endpoint`` go through the gateway;
- :func:`hand_off` / :func:`resume` / :func:`resume_transport`: move a
  connection to another process;
- :func:`create_datagram_endpoint`: UDP (tether.aio.datagram).

See docs/asyncio.md. The names are loaded on first use, so ``tether``
(which installs the hooks) does not import asyncio for programs that never
use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tether.aio.hooks import install_loop_hooks, loop_hooks_installed, uninstall_loop_hooks

if TYPE_CHECKING:
    from tether.aio.connection import create_connection, open_connection
    from tether.aio.datagram import create_datagram_endpoint
    from tether.aio.handoff import hand_off, resume, resume_transport
    from tether.client.sock import HandoffState

_LAZY = {
    "create_connection": "tether.aio.connection",
    "open_connection": "tether.aio.connection",
    "create_datagram_endpoint": "tether.aio.datagram",
    "hand_off": "tether.aio.handoff",
    "resume": "tether.aio.handoff",
    "resume_transport": "tether.aio.handoff",
    "HandoffState": "tether.client.sock",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tether.aio' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "HandoffState",
    "create_connection",
    "create_datagram_endpoint",
    "hand_off",
    "install_loop_hooks",
    "loop_hooks_installed",
    "open_connection",
    "resume",
    "resume_transport",
    "uninstall_loop_hooks",
]
