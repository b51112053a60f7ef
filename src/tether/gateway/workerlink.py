"""The workers of one host as one gateway, with no Redis: ``tether serve --workers N``.

The kernel spreads an app's streams over the workers, so the stream that
resumes a pickled socket, or asks about one (an option, a close reason, a
listing), may reach a worker that does not hold it. Without ``[cluster]``
the workers find each other from the list their supervisor gave them
(:class:`~tether.gateway.supervisor.WorkerSpec`) and answer for each other
(``core.cluster`` is a :class:`WorkerLinks`, the interface the front-end
asks a cluster node through):

- **A Resume** names the worker holding the socket (the Handoff says which,
  signed with a key the supervisor made for this run, as a cluster's
  handoffs are). The worker it reached passes **the app's stream itself**
  to the owner: the descriptor over the owner's Unix socket with
  ``SCM_RIGHTS``, with the hello and the Resume it read. From then on the
  owner reads and writes the app's stream directly, as if the app had
  reached it: no relay hop, no per-byte cost for the socket's life (a node
  of a cluster on another host has to forward the stream instead;
  docs/workers.md says why). A worker that is gone refuses the socket
  at once (``NODE_GONE``), and so does the worker its supervisor restarted
  in its place: the handoff names the life of the worker that made it
  (cluster/signing.py).
- **A request about a socket** this worker does not hold is asked of the
  others (each a Tether stream on its link socket, the app's hello and the
  request); the one that holds the socket answers. A listing gathers every
  worker's sockets, each named by its node.

The link sockets are in the supervisor's directory (mode 0700): only the
gateway's own user reaches them, so a worker trusts what a link says about
the app (as a cluster node trusts a node link).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from typing import TYPE_CHECKING

from tether.cluster import signing
from tether.cluster.errors import node_gone
from tether.gateway.core import inspect, peers
from tether.gateway.core.errors import Refusal
from tether.gateway.frontends.tether import TetherSession
from tether.wire import NEED_DATA, PREAMBLE, PROTOCOL_VERSION, Connection, Role, encode_frame, pb

if TYPE_CHECKING:
    from tether.gateway.core.gateway import GatewayCore
    from tether.gateway.supervisor import WorkerSpec
    from tether.quota import QuotaBook

log = logging.getLogger("tether.gateway")

# A sibling worker answers within a loop turn; 3 s bounds one that is stuck
# (it is then left out of a listing, or the app is told it did not answer).
ASK_TIMEOUT = 3.0
# What a worker passing a stream sends with it: the hello and the Resume it
# re-encodes plus what it had read behind them (one read: uvloop reads up to
# 256 KiB). More than this is not a worker of ours.
MAX_PASSED = 1 << 20


class _OwnShare:
    """Quotas of the workers of one host: each enforces its share (supervisor.worker_config).

    Nothing is asked of the other workers before a connect (a cluster's
    ``LeasedStore`` would lease budget from Redis here).
    """

    async def ready(self, book: QuotaBook, app: str) -> Refusal | None:
        return None


class WorkerLinks:
    """This worker's links to its siblings (see the module docstring)."""

    def __init__(self, core: GatewayCore, spec: WorkerSpec, key: bytes) -> None:
        self.core = core
        self.spec = spec
        self.node_id = spec.node_id
        self.key = key
        # This start of the worker: a restarted one refuses its previous life's
        # handoffs with NODE_GONE (cluster/signing.py).
        self.incarnation = signing.new_incarnation()
        self.quota = _OwnShare()
        # A stream for a sibling's socket is passed, not forwarded: none to drain.
        self.forwarding = 0
        self._asks: asyncio.Server | None = None
        self._passed: socket.socket | None = None

    # -- start, stop -----------------------------------------------------------------

    async def start(self) -> None:
        """Listen for the siblings: their requests (a stream) and passed streams (SCM_RIGHTS)."""
        loop = self.core.loop
        path = self.spec.link_path(self.spec.index)
        for stale in (path, path + ".fd"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)  # this worker's previous life
        self._asks = await loop.create_unix_server(
            lambda: TetherSession(self.core, linked=True), path=path
        )
        passed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        passed.bind(path + ".fd")
        passed.listen()
        passed.setblocking(False)
        loop.add_reader(passed, self._accept_passed)
        self._passed = passed
        log.info("worker links on %s (siblings: %s)", path,
                 ", ".join(self.spec.peers) or "none")

    async def stop(self) -> None:
        if self._passed is not None:
            self.core.loop.remove_reader(self._passed)
            self._passed.close()
        if self._asks is not None:
            self._asks.close()

    def end_forwarded(self, reason: str) -> int:
        return 0  # passed streams are the owner's (see `forwarding`)

    # -- handoff ---------------------------------------------------------------------

    def sign_handoff(self, handoff: pb.Handoff, descriptor: str) -> None:
        """Name this worker in a Handoff, signed, so a sibling can pass its Resume here."""
        signing.sign_handoff(self.key, self.node_id, self.incarnation, handoff, descriptor)

    def check_resume(self, app: str, req: pb.Resume) -> Refusal | None:
        if req.node in self.spec.peers or req.node == self.node_id:
            signed = signing.signed_in(self.key, req)
            if signed is not None:
                return signing.restarted(req, self.node_id, self.incarnation, signed)
            # The key is new each run: a handoff from before a restart (whose
            # socket is gone with that run) does not verify either.
            why = ("does not carry this gateway's signature (forged, or made before the "
                   "gateway restarted, its sockets gone)")
        else:
            why = "names no worker of this gateway"
        log.warning("worker links: app %r sent a Resume naming %r that %s; refused unread",
                    app, req.node, why)
        return Refusal(pb.Error.PERMISSION_DENIED, errno.EACCES,
            f"tether: the handoff naming node {req.node!r} {why}; refused without looking "
            "the socket up")

    async def open_resume_link(self, app: str, req: pb.Resume) -> _Pass | Refusal:
        """Connect to the owner's socket for passed streams; the stream goes at join_plain()."""
        path = self.spec.peers[req.node] + ".fd"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                await self.core.loop.sock_connect(sock, path)
        except (OSError, TimeoutError) as exc:
            sock.close()
            return node_gone(req.node, f"its worker does not answer at {path}: {inspect.why(exc)}")
        return _Pass(self, sock, app, req)

    # -- requests --------------------------------------------------------------------

    async def forward_request(self, app: str, admin: bool, req: pb.Request) -> pb.Response | None:
        """The answer to `req` when a sibling must give it; None: this worker answers."""
        if req.WhichOneof("op") == "list_sockets":
            return await self._list_everywhere(app, admin, req)
        if peers.holds_here(self.core.registry, app, req) is None:
            return None
        # Nobody has it: None, this worker's own "no socket" answer.
        return inspect.holders_answer((await self._ask_all(app, req)).values())

    async def _list_everywhere(self, app: str, admin: bool, req: pb.Request) -> pb.Response:
        local = inspect.list_sockets(self.core.registry, app, every_app=admin, node=self.node_id)
        return inspect.gathered(req.id, local, await self._ask_all(app, req))

    async def _ask_all(self, app: str, req: pb.Request) -> dict[str, pb.Response]:
        """`req` asked of every sibling at once, as `app`; the answers of those that gave one."""
        asks = [(node, path, self._ask(path, app, req))
                for node, path in sorted(self.spec.peers.items())]
        return await inspect.ask_each(asks, log, "worker links: worker")

    async def _ask(self, path: str, app: str, req: pb.Request) -> pb.Response:
        """One request on a new stream to the sibling at `path`; its Response."""
        wire = Connection(Role.CLIENT)
        async with asyncio.timeout(ASK_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                writer.write(
                    wire.send(pb.ClientHello(protocol_version=PROTOCOL_VERSION, app=app,
                                             client_version=f"worker {self.node_id}"))
                    + wire.send(req)
                )
                while True:
                    event = wire.next_event()
                    if event is NEED_DATA:
                        wire.receive_data(await reader.read(65536))
                    elif isinstance(event, pb.Response):
                        return event
                    elif isinstance(event, pb.ServerHello) and not event.HasField("error"):
                        continue
                    else:
                        raise ConnectionError(errno.EPROTO, f"worker link answered {event!r}")
            finally:
                writer.close()

    # -- passed streams ----------------------------------------------------------------

    def _accept_passed(self) -> None:
        assert self._passed is not None
        try:
            conn, _ = self._passed.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        _Received(self, conn)

    def took(self, fd: int, replay: bytes) -> None:
        """A sibling passed an app's stream `fd` with what it had read: serve it here."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        self.core.loop.create_task(self._serve(sock, replay))

    async def _serve(self, sock: socket.socket, replay: bytes) -> None:
        try:
            await self.core.loop.connect_accepted_socket(
                lambda: _PassedSession(self.core, replay), sock
            )
        except OSError as exc:
            log.info("worker links: a passed stream was gone before it was served: %s", exc)
            sock.close()


class _PassedSession(TetherSession):
    """An app stream a sibling passed here: what the sibling read is read first."""

    __slots__ = ("_replay",)

    def __init__(self, core: GatewayCore, replay: bytes) -> None:
        # The sibling authenticated the app (by key, listener or peer
        # credentials): the stream is taken as the app it said.
        super().__init__(core, linked=True)
        self._replay = replay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        replay, self._replay = self._replay, b""
        self.data_received(replay)


class _Pass:
    """The passing side: the app's stream descriptor and what was read, to the owner.

    The front-end calls ``join_plain(transport, trailing)`` as it would on a
    cluster's splice; here the stream is handed over rather than joined.
    """

    def __init__(self, links: WorkerLinks, sock: socket.socket, app: str, req: pb.Resume) -> None:
        self.links = links
        self.sock = sock
        self.app = app
        self.req = req

    def join_plain(self, transport: asyncio.Transport, first: bytes = b"") -> None:
        req = self.req
        replay = (
            PREAMBLE
            + encode_frame(pb.ClientHello(protocol_version=PROTOCOL_VERSION, app=self.app,
                                          client_version=f"worker {self.links.node_id}"))
            + encode_frame(req)
            + first
        )
        app_sock = transport.get_extra_info("socket")
        try:
            fd = os.dup(app_sock.fileno())
        except (AttributeError, OSError) as exc:
            log.warning("worker links: cannot pass socket %s's stream: %s",
                        req.descriptor[:8], exc)
            self.sock.close()
            transport.abort()
            return
        try:
            # The descriptor with all of it: a new Unix socket's buffer (over
            # 200 KiB) takes a hello, a Resume and a read's tail at once, so
            # this does not wait; what does not fit follows (_rest).
            sent = socket.send_fds(self.sock, [replay], [fd])
        except OSError as exc:
            log.warning("worker links: %s did not take socket %s's stream: %s",
                        req.node, req.descriptor[:8], exc)
            self.sock.close()
            transport.abort()
            return
        finally:
            os.close(fd)
        # The owner holds the stream now: ours is closed without touching it
        # (the kernel keeps the connection while the owner's descriptor is open).
        transport.set_protocol(asyncio.Protocol())
        transport.close()
        if sent < len(replay):
            self.links.core.loop.create_task(self._rest(replay[sent:]))
        else:
            self.sock.close()  # the owner reads the end of what was passed
        log.info("socket %s of app %r: its resume passed to %s (same host)",
                 req.descriptor[:8], self.app, req.node)

    async def _rest(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                await self.links.core.loop.sock_sendall(self.sock, data)
        except (OSError, TimeoutError) as exc:
            log.warning("worker links: passing socket %s to %s: %s",
                        self.req.descriptor[:8], self.req.node, inspect.why(exc))
        finally:
            self.sock.close()


class _Received:
    """The taking side: one sibling's connection, a descriptor and bytes until EOF."""

    def __init__(self, links: WorkerLinks, conn: socket.socket) -> None:
        self.links = links
        self.conn = conn
        self.fd = -1
        self.data = bytearray()
        links.core.loop.add_reader(conn, self._readable)

    def _readable(self) -> None:
        # Usually all of it is there at once, end included: read until it is not.
        while True:
            try:
                chunk, fds, _flags, _addr = socket.recv_fds(self.conn, 65536, 1)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("worker links: a passed stream broke off: %s", exc)
                self._end()
                return
            for fd in fds:
                if self.fd < 0:
                    self.fd = fd
                else:
                    os.close(fd)
            self.data += chunk
            if len(self.data) > MAX_PASSED:
                log.warning("worker links: a passed stream came with over %d bytes; dropped",
                            MAX_PASSED)
                self._end()
                return
            if not chunk:
                fd, self.fd = self.fd, -1
                data = bytes(self.data)
                self._end()
                if fd >= 0:
                    self.links.took(fd, data)
                return

    def _end(self) -> None:
        self.links.core.loop.remove_reader(self.conn)
        self.conn.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


async def start_worker_links(core: GatewayCore, spec: WorkerSpec) -> WorkerLinks:
    """Make `core` (worker `spec`) answer for its siblings: ``core.cluster``."""
    key = spec.read_key()
    links = WorkerLinks(core, spec, key)
    await links.start()
    core.cluster = links
    return links


__all__ = ["ASK_TIMEOUT", "WorkerLinks", "start_worker_links"]
