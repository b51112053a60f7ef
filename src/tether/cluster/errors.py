"""The cluster's refusals, in the words an app is told (no Redis needed to say them)."""

from __future__ import annotations

import errno

from tether.gateway.core.errors import Refusal
from tether.wire import pb


def node_gone(node: str, why: str) -> Refusal:
    """The socket's owner node is gone: NODE_GONE, at once, saying which node and how we know."""
    return Refusal(pb.Error.NODE_GONE, errno.EHOSTDOWN,
        f"tether: the socket's node {node!r} has left the cluster ({why}): the socket was "
        "lost with it (a TCP connection lives in one kernel)")


__all__ = ["node_gone"]
