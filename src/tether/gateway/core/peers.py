"""The gateway's peers: what the core and the front-ends ask of ``core.cluster``.

Several gateways may serve as one: the workers of one host (``tether serve
--workers N``, gateway/workerlink.py's ``WorkerLinks``) or the nodes of a
cluster (tether.cluster.node's ``ClusterNode``). Either is ``core.cluster``,
typed :class:`Peers`; both satisfy it structurally (mypy checks the
assignment), and the core imports neither: a gateway alone loads no peer
code and no Redis client.

What they share in logic rather than in shape is here too:
:func:`holds_here`, whether a request about one socket is this gateway's to
answer.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from tether.gateway.core.errors import Refusal
from tether.wire import pb

if TYPE_CHECKING:
    from tether.gateway.core.registry import Registry
    from tether.quota import QuotaBook

# Requests that name one socket: answered by the gateway that holds it.
SOCKET_OPS = ("set_option", "get_option", "touch", "detach", "close_reason")


class QuotaReadiness(Protocol):
    """Budget for a connect before admission counts it (a cluster's leases; workers' shares)."""

    async def ready(self, book: QuotaBook, app: str) -> Refusal | None: ...


class Joinable(Protocol):
    """Where a Resume for another gateway's socket goes: the app's stream is joined to it."""

    def join_plain(self, transport: asyncio.Transport, first: bytes = b"") -> None: ...


class Peers(Protocol):
    """The other gateways this one serves with, as the core and the front-ends use them."""

    @property
    def node_id(self) -> str:
        """This gateway's id among its peers (named in handoffs and listings)."""
        ...

    @property
    def quota(self) -> QuotaReadiness: ...

    @property
    def forwarding(self) -> int:
        """App streams this gateway carries to a peer that holds their socket, live now.

        A drain waits for them as for its own sockets (core/drain.py).
        """
        ...

    def sign_handoff(self, handoff: pb.Handoff, descriptor: str) -> None:
        """Name this gateway in `handoff` (of socket `descriptor`), signed."""
        ...

    def check_resume(self, app: str, req: pb.Resume) -> Refusal | None:
        """Why a Resume naming a gateway is refused unread (a bad signature); None: go on."""
        ...

    async def open_resume_link(self, app: str, req: pb.Resume) -> Joinable | Refusal:
        """Where the app's stream goes to reach the gateway holding `req`'s socket."""
        ...

    async def forward_request(self, app: str, admin: bool, req: pb.Request) -> pb.Response | None:
        """The answer to `req` when a peer must give it; None: this gateway answers."""
        ...

    def end_forwarded(self, reason: str) -> int:
        """End every forwarded stream (shutdown), remembered as closed for `reason`; how many."""
        ...

    async def stop(self) -> None: ...


def holds_here(registry: Registry, app: str, req: pb.Request) -> str | None:
    """The descriptor a request about one socket names, when a peer may hold it; None when
    this gateway answers it (not such a request, or the socket is or was here)."""
    op = req.WhichOneof("op")
    if op not in SOCKET_OPS:
        return None
    descriptor: str = getattr(req, op).descriptor
    if registry.get(app, descriptor) is not None or registry.tombstone(app, descriptor):
        return None
    return descriptor


__all__ = ["SOCKET_OPS", "Joinable", "Peers", "QuotaReadiness", "holds_here"]
