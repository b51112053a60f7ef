"""This gateway as a cluster node: the pieces of tether.cluster, for the front-end.

``core.cluster`` is a :class:`ClusterNode` when ``[cluster]`` is configured
(``start_node``, from ``server.Gateway.start``), None otherwise. The
front-end asks it three things:

* ``sign_handoff``: a Handoff names this node and is signed;
* ``open_resume_link``: a Resume whose socket lives on another node is
  checked (signature; the owner's heartbeat) and given a link to the owner,
  which the front-end splices the app's stream onto for the socket's life
  (why forwarding: docs/deploy.md);
* ``forward_request``: a control request about a socket this node forwards
  (options, detach, close reason) goes to its owner, and a socket listing
  asks every node.

A node's word is trusted on a link: the node that forwards a stream has
authenticated its app, and only nodes hold the cluster's certificates (or
can open a Unix link socket).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from tether import __version__
from tether.cluster import signing
from tether.cluster.config import ClusterConfig, for_worker
from tether.cluster.errors import node_gone
from tether.cluster.link import (
    EOF_FRAME,
    Deframer,
    LinkServer,
    Splice,
    client_context,
    dial,
    frame,
    server_context,
)
from tether.cluster.membership import Membership, StoreUnavailable, connect
from tether.cluster.quota import LeasedStore
from tether.endpoint import Endpoint
from tether.gateway.core import inspect, peers
from tether.gateway.core.errors import Refusal, wire_error
from tether.wire import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    RemoteProtocolError,
    Role,
    encode_frame,
    pb,
)

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from tether.gateway.core.gateway import GatewayCore

log = logging.getLogger("tether.cluster")

# Connecting a link to a live node on a LAN takes a TLS handshake: a few
# milliseconds. A dead node's process refuses at once (its port is closed);
# 3 s only bounds a host that vanished without a reset within its heartbeat TTL.
LINK_CONNECT_TIMEOUT = 3.0
# A forwarded control request or a node's socket listing: answered within
# milliseconds by a live node; a node that does not answer is left out.
LINK_REQUEST_TIMEOUT = 3.0
# Descriptors whose streams this node forwards (and did recently: a CloseReason
# comes right after a reset), bounded like the registry's tombstones.
FORWARDED_LIMIT = 10_000
# Idle links kept open to every other node: a resume takes one (no TCP or TLS
# handshake on its path: that was most of a cross-node resume, ~3 ms of ~4)
# and another is dialled behind it. Two cover a burst of two resumes between
# beats; each costs a descriptor at both ends.
POOL_SIZE = 2


class ClusterNode:
    """Membership, links and signing for one gateway (see the module docstring)."""

    def __init__(self, core: GatewayCore, config: ClusterConfig) -> None:
        self.core = core
        self.config = config
        self.node_id = config.node_id
        # This start of the node: a restarted one (same node_id) refuses its
        # previous life's handoffs with NODE_GONE (signing.py).
        self.incarnation = signing.new_incarnation()
        self.redis: aioredis.Redis = connect(config)
        self.client_tls: ssl.SSLContext | None = None
        server_tls: ssl.SSLContext | None = None
        if config.tls:
            assert config.tls_cert and config.tls_key and config.tls_ca  # parse_cluster checked
            self.client_tls = client_context(config.tls_cert, config.tls_key, config.tls_ca)
            server_tls = server_context(config.tls_cert, config.tls_key, config.tls_ca)
        self._server_tls = server_tls
        self.links: LinkServer | None = None
        self.membership: Membership | None = None
        self.forwarded: OrderedDict[str, str] = OrderedDict()  # descriptor -> owner node
        # A worker of `tether serve --workers N`: its siblings' ids start with this.
        self.siblings = ""
        self.quota = LeasedStore(self.redis, config, core.loop, clock=core.registry.clock)
        # The app streams this node forwards, live now: (app, descriptor) of each.
        # A drain waits for them (core/drain.py), then ends them (end_forwarded).
        self.splices: dict[Splice, tuple[str, str]] = {}
        # (app, descriptor) of the streams end_forwarded cut -> why, for the
        # app's CloseReason while the gateway answers its last questions.
        self.ended: dict[tuple[str, str], str] = {}
        self.pools: dict[Endpoint, list[Splice]] = {}
        self._filling: set[Endpoint] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, session: Callable[[], asyncio.Protocol]) -> Endpoint:
        """Listen for links; join (a first heartbeat, logged if Redis is not there yet)."""
        loop = self.core.loop
        self.links = LinkServer(loop, session, self._server_tls)
        bound = await self.links.start(self.config.link_listen)
        advertise = self.config.advertise or own_address(bound)
        self.membership = Membership(self.redis, self.config, advertise)
        self.membership.start(loop)
        self._spawn(self._keep_links())
        log.info("cluster: node %r, links on %s (advertised as %s, %s)", self.node_id, bound,
                 advertise, "mutual TLS" if self.config.tls else "Unix socket")
        return bound

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for pool in self.pools.values():
            for splice in pool:
                splice.abort()
        if self.links is not None:
            self.links.close()
        self.end_forwarded("closed when the gateway stopped")
        await self.quota.give_back()
        if self.membership is not None:
            await self.membership.leave()
        await self.redis.aclose()

    # -- handoff -----------------------------------------------------------------

    def sign_handoff(self, handoff: pb.Handoff, descriptor: str) -> None:
        """Name this node in a Handoff, signed, so any node can route its Resume here."""
        signing.sign_handoff(self.config.key, self.node_id, self.incarnation, handoff, descriptor)

    def check_resume(self, app: str, req: pb.Resume) -> Refusal | None:
        """A Resume naming a node must carry this cluster's signature; checked before any lookup."""
        signed = signing.signed_in(self.config.key, req)
        if signed is not None:
            return signing.restarted(req, self.node_id, self.incarnation, signed)
        log.warning("cluster: app %r sent a Resume for node %r with a signature that does not "
                    "match; refused without looking it up", app, req.node)
        return Refusal(pb.Error.PERMISSION_DENIED, errno.EACCES,
            f"tether: the handoff naming node {req.node!r} does not carry this cluster's "
            "signature (forged or changed); refused without looking the socket up")

    async def open_resume_link(self, app: str, req: pb.Resume) -> Splice | Refusal:
        """A link to the node holding the socket, with `app`'s hello and the Resume on it.

        The front-end joins the app's stream to the returned splice; the
        owner answers (ServerHello, ConnectResult, the tail's echo, then the
        peer's bytes) as it would the app directly, and checks the one-time
        token, so a handoff is resumed once wherever its Resumes arrive.
        """
        owner = req.node
        assert self.membership is not None
        # An open idle link to the owner's address is proof enough that it is
        # there (a node's links close with its process): no Redis round trip.
        known = self.membership.known.get(owner)
        splice = self._take(known) if known is not None else None
        address = known
        if splice is None:
            found = await self._address(owner)
            if isinstance(found, Refusal):
                return found
            address = found
            splice = self._take(found)
        assert address is not None
        if splice is None:
            try:
                splice = await self._dial(address)
            except (OSError, TimeoutError) as exc:
                return node_gone(owner, f"its link at {address} did not answer: {inspect.why(exc)}")
        wire = Connection(Role.CLIENT)
        splice.link.send(
            wire.send(pb.ClientHello(protocol_version=PROTOCOL_VERSION, app=app,
                                     client_version=f"node {self.node_id} {__version__}"))
            + wire.send(pb.Resume(descriptor=req.descriptor, token=req.token,
                                  tail_length=req.tail_length, node=req.node,
                                  signature=req.signature))
        )
        splice.on_silent_loss = lambda: _refused(
            node_gone(owner, f"its link at {address} closed before it answered"))
        self._remember(req.descriptor, owner)
        self.splices[splice] = (app, req.descriptor)
        taken = splice  # typed for the closure

        def ended() -> None:
            self.splices.pop(taken, None)

        splice.on_end = ended
        log.info("cluster: app %r resumes socket %s of node %r through this node (%s)",
                 app, req.descriptor[:8], owner, address)
        return splice

    @property
    def forwarding(self) -> int:
        return len(self.splices)

    def end_forwarded(self, reason: str) -> int:
        """Cut every forwarded stream (the owner closes the socket, its stream gone);
        the app's CloseReason asked here is told `reason`. How many."""
        cut = list(self.splices.items())
        for splice, (app, descriptor) in cut:
            self.ended[app, descriptor] = reason
            self.forwarded.pop(descriptor, None)
            splice.reset()
        return len(cut)

    # -- links ---------------------------------------------------------------------

    async def _dial(self, address: Endpoint) -> Splice:
        splice = Splice(framed=not address.is_unix)
        await dial(self.core.loop, address, lambda: splice.link,
                   None if address.is_unix else self.client_tls, LINK_CONNECT_TIMEOUT)
        return splice

    def _take(self, address: Endpoint) -> Splice | None:
        """An idle link to `address` from the pool (and another dialled behind it)."""
        pool = self.pools.get(address)
        found = None
        while pool:
            splice = pool.pop(0)
            transport = splice.link.transport
            if transport is not None and not transport.is_closing():
                found = splice
                break
        self._spawn(self._fill(address))
        return found

    async def _fill(self, address: Endpoint) -> None:
        if address in self._filling:
            return
        self._filling.add(address)
        pool = self.pools.setdefault(address, [])
        try:
            while len(pool) < POOL_SIZE:
                splice = await self._dial(address)

                def dropped(splice: Splice = splice) -> None:
                    # Closed while idle (the node left, or stopped): out of the pool.
                    if splice in pool:
                        pool.remove(splice)

                splice.on_end = dropped
                pool.append(splice)
        except (OSError, TimeoutError) as exc:
            log.debug("cluster: no idle link to %s: %s", address, inspect.why(exc))
        finally:
            self._filling.discard(address)

    async def _keep_links(self) -> None:
        """Every beat: idle links to every live node, none to a node that left."""
        assert self.membership is not None
        while True:
            live = {a for n, a in self.membership.known.items() if n != self.node_id}
            for address in live:
                if len(self.pools.get(address, ())) < POOL_SIZE:
                    await self._fill(address)
            for address in set(self.pools) - live:
                for splice in self.pools.pop(address):
                    splice.abort()
            await asyncio.sleep(self.config.heartbeat_interval)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.core.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _address(self, node: str) -> Endpoint | Refusal:
        assert self.membership is not None
        try:
            address = await self.membership.address(node)
        except StoreUnavailable as exc:
            # Redis is away: the members seen at the last beat still route.
            address = self.membership.known.get(node)
            if address is None:
                return Refusal(pb.Error.UNAVAILABLE, errno.EAGAIN,
                    f"tether: cannot find node {node!r}: {exc}; try again")
        if address is None:
            return node_gone(node, f"no heartbeat for {self.config.heartbeat_ttl:g} s")
        return address

    def _remember(self, descriptor: str, owner: str) -> None:
        self.forwarded[descriptor] = owner
        self.forwarded.move_to_end(descriptor)
        while len(self.forwarded) > FORWARDED_LIMIT:
            self.forwarded.popitem(last=False)

    # -- requests ------------------------------------------------------------------

    async def forward_request(self, app: str, admin: bool, req: pb.Request) -> pb.Response | None:
        """The answer to `req` when another node must give it; None: this node answers.

        A request about a socket this node forwards goes to the socket's
        owner; about a socket this node knows nothing of, to every node (the
        workers of one host share the app's streams: its control stream may
        reach a sibling of the owner); a listing adds every other node's
        sockets (each named by node).
        """
        if req.WhichOneof("op") == "list_sockets":
            return await self._list_everywhere(app, admin, req)
        descriptor = peers.holds_here(self.core.registry, app, req)
        if descriptor is None:
            return None  # not about one socket, or it is (or was) here: this node says
        owner = self.forwarded.get(descriptor)
        if owner is None:
            cut = self.ended.get((app, descriptor))
            if cut is not None and req.WhichOneof("op") == "close_reason":
                response = pb.Response(id=req.id)
                response.text.text = cut
                return response
            if not self.siblings:
                return None  # no node could know it
            return await self._ask_siblings(app, req)
        address = await self._address(owner)
        if isinstance(address, Refusal):
            return pb.Response(id=req.id, error=wire_error(address))
        try:
            return await self._ask(address, app, req)
        except (OSError, TimeoutError) as exc:
            return pb.Response(id=req.id, error=wire_error(
                node_gone(owner, f"its link at {address} did not answer: {inspect.why(exc)}")))

    async def _ask_siblings(self, app: str, req: pb.Request) -> pb.Response | None:
        """The answer of the sibling worker that knows the socket `req` names; None if none.

        Only the workers of one host share an app's streams (the kernel spreads
        them), so only they are asked: an app that names descriptors at random
        cannot make its node ask every host of the cluster.
        """
        # Nobody has it: None, this node's own "no socket" answer.
        return inspect.holders_answer((await self._ask_others(app, req, self.siblings)).values())

    async def _ask_others(
        self, app: str, req: pb.Request, prefix: str = ""
    ) -> dict[str, pb.Response]:
        """`req` asked of every other live node (whose id starts with `prefix`) at once,
        as `app`: the answers given."""
        assert self.membership is not None
        try:
            members = await self.membership.members()
        except StoreUnavailable as exc:
            log.warning("cluster: asking the last known nodes: %s", exc)
            members = dict(self.membership.known)
        asks = [(n, a, self._ask(a, app, req)) for n, a in sorted(members.items())
                if n != self.node_id and n.startswith(prefix)]
        return await inspect.ask_each(asks, log, "cluster: node")

    async def _list_everywhere(self, app: str, admin: bool, req: pb.Request) -> pb.Response:
        local = inspect.list_sockets(self.core.registry, app, every_app=admin, node=self.node_id)
        return inspect.gathered(req.id, local, await self._ask_others(app, req))

    async def _ask(self, address: Endpoint, app: str, req: pb.Request) -> pb.Response:
        """One request on a link to the node at `address` (an idle one if there is), as
        `app`; its Response."""
        loop = self.core.loop
        wire = Connection(Role.CLIENT)
        ask = _Ask(loop, wire, framed=not address.is_unix)
        idle = self._take(address)
        transport = idle.link.transport if idle is not None else None
        if transport is not None:
            transport.set_protocol(ask)  # the pooled link is this request's now
        else:
            transport = await dial(loop, address, lambda: ask,
                                   None if address.is_unix else self.client_tls,
                                   LINK_CONNECT_TIMEOUT)
        try:
            payload = wire.send(pb.ClientHello(protocol_version=PROTOCOL_VERSION, app=app,
                                               client_version=f"node {self.node_id}"))
            payload += wire.send(req)
            transport.write(frame(payload) if ask.framed else payload)
            async with asyncio.timeout(LINK_REQUEST_TIMEOUT):
                return await ask.answer
        finally:
            if ask.framed and not transport.is_closing():
                transport.write(EOF_FRAME)  # a clean end: the owner's session closes, no abort
            transport.close()


class _Ask(asyncio.Protocol):
    """Reads one Response (after the ServerHello) from a link."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wire: Connection, framed: bool) -> None:
        self.wire = wire
        self.framed = framed
        self.deframer = Deframer()
        self.answer: asyncio.Future[pb.Response] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        try:
            chunks = self.deframer.feed(data) if self.framed else [data]
            for chunk in chunks:
                self.wire.receive_data(b"" if chunk is None else chunk)
            while not self.answer.done():
                event = self.wire.next_event()
                if event is NEED_DATA:
                    return
                if isinstance(event, pb.ServerHello) and event.HasField("error"):
                    raise ConnectionRefusedError(errno.ECONNREFUSED, event.error.message)
                if isinstance(event, pb.Response):
                    self.answer.set_result(event)
                elif isinstance(event, pb.Error):
                    raise ConnectionError(errno.EPROTO, event.message)
                elif not isinstance(event, pb.ServerHello):
                    raise ConnectionError(errno.EPROTO, f"node link: unexpected {event!r}")
        except (OSError, RemoteProtocolError) as exc:
            if not self.answer.done():
                self.answer.set_exception(
                    exc if isinstance(exc, OSError) else ConnectionError(errno.EPROTO, str(exc)))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(
                ConnectionResetError(errno.ECONNRESET, "node link closed before the answer"))


def own_address(bound: Endpoint) -> Endpoint:
    """The link address to advertise when cluster.advertise is not set.

    The bound address itself, unless it is a wildcard: then the address this
    host's name resolves to (a Kubernetes pod's name resolves to its IP).
    """
    if bound.is_unix or bound.host not in ("0.0.0.0", "::"):
        return bound
    try:
        host = socket.gethostbyname(socket.gethostname())
    except OSError as exc:
        raise OSError(errno.EADDRNOTAVAIL,
            f"cluster.link_listen {bound} is a wildcard address and this host's name does not "
            f"resolve ({exc}): set cluster.advertise") from exc
    if host.startswith("127."):
        raise OSError(errno.EADDRNOTAVAIL,
            f"cluster.link_listen {bound} is a wildcard address and this host's name resolves "
            f"to {host}, a loopback address: set cluster.advertise to the address other nodes "
            "reach this one on")
    return Endpoint(host=host, port=bound.port)


def _refused(refusal: Refusal) -> bytes:
    """A hello's answer and a refused ConnectResult, for an app whose stream we took over."""
    return encode_frame(pb.ServerHello(protocol_version=PROTOCOL_VERSION,
                                       gateway_version=__version__)) + encode_frame(
        pb.ConnectResult(error=wire_error(refusal)))


async def start_node(core: GatewayCore, session: Callable[[], asyncio.Protocol]) -> ClusterNode:
    """Make `core` a node of the cluster its config names (``core.cluster``)."""
    config = core.config.cluster
    assert config is not None
    worker = getattr(core, "worker", None)  # tether serve --workers N (gateway/supervisor.py)
    if worker is not None:
        config = for_worker(config, worker.index, worker.link_path(worker.index))
    node = ClusterNode(core, config)
    if worker is not None:
        node.siblings = config.node_id.rpartition("-")[0] + "-"
    core.node_id = config.node_id
    await node.start(session)
    # The quotas hold across the cluster: the book's counters become leases.
    core.quota.store = node.quota
    core.cluster = node
    return node


__all__ = ["LINK_CONNECT_TIMEOUT", "ClusterNode", "start_node"]
