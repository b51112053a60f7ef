"""The Tether protocol front-end: one app stream, hello, then connects or requests.

The stream is driven by the sans-I/O :class:`tether.wire.Connection`; every
step that is not the protocol (authenticate, admit, dial, handoff,
inspection, the error words) is the core's (``tether.gateway.core``). A
protocol error closes this stream only, with an Error frame that says why;
nothing in here can take the gateway down.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import traceback

from tether import __version__
from tether.cluster.errors import node_gone
from tether.gateway.core import drain, handoff, inspect
from tether.gateway.core.admission import lookup_refusal
from tether.gateway.core.auth import ADMIN_APP, AuthRefusal, Guard
from tether.gateway.core.errors import Refusal, wire_error
from tether.gateway.core.gateway import GatewayCore
from tether.gateway.core.options import apply_option, outbound_socket, read_option
from tether.gateway.frontends import tether_udp
from tether.gateway.frontends.base import PreauthStream
from tether.gateway.resolve import HostError
from tether.gateway.udp import UdpAssociation
from tether.policy import ResolutionError, Transport
from tether.wire import (
    NEED_DATA,
    PAUSED,
    PROTOCOL_VERSION,
    Connection,
    ConnectionClosed,
    ProtocolError,
    RemoteProtocolError,
    Role,
    State,
    encode_frame,
    pb,
)
from tether.wire.convert import FAMILY_FROM_WIRE, address_to_wire

log = logging.getLogger("tether.gateway")


class TetherSession(PreauthStream):
    """One app stream speaking the Tether protocol."""

    __slots__ = (
        "__weakref__",
        "_bound",
        "_guard",
        "_peer",
        "_pending",
        "_stall",
        "_switched",
        "_task",
        "_write_paused",
        "admin",
        "app",
        "association",
        "core",
        "linked",
        "transport",
        "unix",
        "wire",
    )

    def __init__(
        self, core: GatewayCore, *, unix: bool = False, app: str | None = None,
        linked: bool = False,
    ) -> None:
        self.core = core
        # A cluster node's link (tether.cluster): that node authenticated the
        # app and forwards its stream here; the hello's app is taken as said.
        self.linked = linked
        # Accepted on a Unix listener (the peer's credentials may say who it
        # is), or on `app`'s own listener (the stream is that app).
        self.unix = unix
        self._bound = app
        self.wire = Connection(Role.GATEWAY, max_frame=core.config.max_frame)
        self.transport: asyncio.Transport | None = None
        self.app: str | None = None
        self.admin = False  # the operator's identity: sees every app's sockets
        self._task: asyncio.Task[None] | None = None
        self._switched = False
        # A ServerHello held back to go out with the ConnectResult of the
        # Connect pipelined behind it: one write and one client wake-up
        # instead of two per connection.
        self._pending = b""
        self.association: UdpAssociation | None = None  # a UDP socket's stream
        self._guard: Guard = core.guard
        self._peer: str | None = None  # peer_key(), asked only when needed
        # The app is not reading its answers (our write buffer is over its
        # high-water mark): no frame is served until it reads, and past
        # write_stall_timeout the stream is closed (_stall is that timer).
        self._write_paused = False
        self._stall: asyncio.TimerHandle | None = None

    # -- asyncio protocol --------------------------------------------------

    def end_preauth(self, refusal: Refusal) -> None:
        """Closed by the guard before authenticating (deadline, a cap): say why."""
        self._reply_error(wire_error(refusal))
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        # asyncio: the app is not reading what we send. Stop reading its
        # requests (each would add an answer), and give up on it after
        # write_stall_timeout.
        self._write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()
        if self._stall is None:
            self._stall = self.core.loop.call_later(
                self.core.config.write_stall_timeout, self._stalled
            )

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        transport = self.transport
        if self._task is None and not self._switched and transport is not None and not (
            transport.is_closing()
        ):
            transport.resume_reading()
            self._process()

    def _stalled(self) -> None:
        self._stall = None
        transport = self.transport
        if self._switched or transport is None or transport.is_closing():
            return  # the socket's relay has the stream now (and its own flow control)
        log.info(
            "closing stream %s of app %r: it has not read its answers for %g s "
            "(%d bytes unread; gateway.write_stall_timeout)",
            self.peername, self.app, self.core.config.write_stall_timeout,
            transport.get_write_buffer_size(),
        )
        # abort, not close: close() would wait for the unread bytes forever.
        transport.abort()

    def data_received(self, data: bytes) -> None:
        self.wire.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self.wire.receive_data(b"")
        self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.association is not None:
            self.association.close("closed by the app")

    # -- events ------------------------------------------------------------

    def _process(self) -> None:
        while self._task is None and not self._switched and not self._write_paused:
            try:
                event = self.wire.next_event()
            except RemoteProtocolError as exc:
                self._fail(exc)
                return
            if self._pending and not isinstance(event, pb.Connect | pb.Resume):
                self._write(b"")
            if event is NEED_DATA or event is PAUSED:
                return
            if isinstance(event, ConnectionClosed):
                self._close()
                return
            if isinstance(event, pb.ClientHello):
                self._hello(event)
            elif isinstance(event, pb.Connect):
                self._start(self._connect(event))
            elif isinstance(event, pb.Resume):
                self._start(self._resume(event))
            elif isinstance(event, pb.Request):
                self._start(self._request(event))
            elif isinstance(event, pb.Error):
                log.info("stream %s sent an error: %r", self.peername, event.message)
                self._close()
                return

    def _done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("internal error on stream %s: %s", self.peername, _one_line(exc))
            self._fail(ProtocolError(f"gateway internal error: {type(exc).__name__}"))
            return
        if self._switched or self.transport is None or self.transport.is_closing():
            return
        if self._write_paused:
            return  # resume_writing() reads on once the app has read
        self.transport.resume_reading()
        self._process()

    def _write(self, data: bytes) -> None:
        if self._pending:
            data, self._pending = self._pending + data, b""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _reply_error(self, error: pb.Error) -> None:
        """An Error frame that ends the stream (the UDP association's reply)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.wire.send_error(error))

    def _fail(self, exc: ProtocolError) -> None:
        log.info("closing stream %s: protocol error: %r", self.peername, str(exc))
        if self.wire.state is not State.RELAY:  # raw bytes now: no frame can be sent
            self._write(self.wire.send_error(exc))
        self._close()

    def end(self, refusal: Refusal) -> None:
        """The core ends this stream (app revoked, gateway shutting down): say why, close."""
        if self._switched or self.transport is None or self.transport.is_closing():
            return
        self._write(self.wire.send_error(wire_error(refusal)))
        self._close()

    def _close(self) -> None:
        if self._pending:
            self._write(b"")
        if self.transport is not None:
            self.transport.close()

    # -- hello -------------------------------------------------------------

    def _hello(self, hello: pb.ClientHello) -> None:
        delay = 0.0
        if hello.protocol_version != PROTOCOL_VERSION:
            reply = pb.ServerHello(protocol_version=PROTOCOL_VERSION, gateway_version=__version__)
            reply.error.CopyFrom(
                pb.Error(
                    code=pb.Error.VERSION_MISMATCH,
                    message=(
                        f"tether: protocol version mismatch: the client speaks version "
                        f"{hello.protocol_version}, this gateway speaks version "
                        f"{PROTOCOL_VERSION} (gateway {__version__}); "
                        "install matching tether versions"
                    ),
                )
            )
            log.warning(
                "stream %s: client protocol version %d refused (client %r)",
                self.peername,
                hello.protocol_version,
                hello.client_version or "unknown",
            )
        else:
            if self.linked and linked_app(self.core, hello.app):
                self._guard.authenticated(self)
                checked: str | AuthRefusal = hello.app
            else:
                checked = self._guard.check(
                    self, hello.app, hello.key, transport=self.transport, unix=self.unix,
                    bound=self._bound, admin=True,
                )
            if not isinstance(checked, AuthRefusal):
                self.app = checked
                self.admin = checked == ADMIN_APP
                # Written by _process or with the answer to the next frame.
                message, frame = _server_hello(self.core)
                self._pending = self.wire.send(message, frame=frame)
                return
            # Built only for a refusal: a successful hello's answer is encoded once (_server_hello).
            reply = pb.ServerHello(protocol_version=PROTOCOL_VERSION, gateway_version=__version__)
            reply.error.CopyFrom(pb.Error(code=pb.Error.AUTH_FAILED, message=checked.message))
            delay = checked.delay
        data = self.wire.send(reply)
        if delay > 0 and self.transport is not None:
            # The answer waits; the stream is still counted as not
            # authenticated meanwhile, so the caps bound how many wait.
            self.transport.pause_reading()
            self.core.loop.call_later(delay, self._answer_and_close, data)
            self._switched = True  # serve nothing more on this stream
            return
        self._answer_and_close(data)

    def _answer_and_close(self, data: bytes) -> None:
        self._write(data)
        self._close()

    # -- connect -----------------------------------------------------------

    async def _connect(self, req: pb.Connect) -> None:
        transport = self.transport
        task = self._task
        assert self.app is not None and transport is not None and task is not None
        core = self.core
        app = self.app
        if self.admin:
            refusal = Refusal(pb.Error.PERMISSION_DENIED, errno.EACCES,
                "tether: the admin identity can list sockets but not open them")
            self._write(self.wire.send(pb.ConnectResult(error=wire_error(refusal))))
            return
        if req.transport == pb.TRANSPORT_UDP:
            result, self.association = await tether_udp.open_association(
                core, app, transport, req, self._reply_error
            )
            self._write(self.wire.send(result))
            return
        family = FAMILY_FROM_WIRE.get(req.family, socket.AF_UNSPEC)
        admitted = await core.admit(app, req.host, req.port, Transport.TCP, family)
        if isinstance(admitted, Refusal):
            self._write(self.wire.send(pb.ConnectResult(error=wire_error(admitted))))
            return
        decision, addresses = admitted
        timeout = req.timeout if req.timeout > 0 else core.config.connect_timeout
        try:
            link = await core.dial(decision, addresses, req.options, timeout, task)
        except OSError as exc:  # DialTimeout included; dial wrote the audit line
            self._write(self.wire.send(pb.ConnectResult(error=wire_error(exc))))
            return
        record = link.record
        peer = record.peer
        family = socket.AF_INET6 if len(peer) == 4 else socket.AF_INET
        self._write(self.wire.send(pb.ConnectResult(
            descriptor=record.descriptor,
            peer=address_to_wire(peer, family),
            local=address_to_wire(record.local, family),
        )))
        # Raw bytes from here on: the stream is the socket's (the Link's).
        trailing = self.wire.trailing_data
        self._switched = True
        core.streams.discard(transport)
        link.join(transport, trailing)

    # -- control requests --------------------------------------------------

    async def _request(self, req: pb.Request) -> None:
        assert self.app is not None
        cluster = self.core.cluster
        if cluster is not None and not self.linked:
            # Another node's socket (resumed here, held there), or a listing of every node's.
            forwarded = await cluster.forward_request(self.app, self.admin, req)
            if forwarded is not None:
                self._write(self.wire.send(forwarded))
                return
        response = pb.Response(id=req.id)
        try:
            await self._answer(req, response)
        except (ResolutionError, HostError, OSError) as exc:
            response.ClearField("result")
            response.error.CopyFrom(wire_error(exc))
        self._write(self.wire.send(response))

    async def _answer(self, req: pb.Request, response: pb.Response) -> None:
        assert self.app is not None
        core = self.core
        app = self.app
        op = req.WhichOneof("op")
        if self.association is not None and op in tether_udp.OPS:
            await tether_udp.answer(core, app, self.association, req, response)
        elif op in _LOOKUPS and (off := lookup_refusal(core, app, op)) is not None:
            response.error.CopyFrom(wire_error(off))  # the app's sockets are switched off
        elif op == "getaddrinfo":
            response.addrinfo.CopyFrom(await core.resolver.getaddrinfo(req.getaddrinfo, app))
        elif op == "gethostbyname":
            response.host.CopyFrom(
                await core.resolver.gethostbyname_ex(req.gethostbyname.name, app)
            )
        elif op == "gethostbyaddr":
            response.host.CopyFrom(await core.resolver.gethostbyaddr(req.gethostbyaddr.address))
        elif op == "getnameinfo":
            response.nameinfo.CopyFrom(await core.resolver.getnameinfo(req.getnameinfo))
        elif op in ("set_option", "get_option", "touch"):
            record = inspect.live(core.registry, app, getattr(req, op).descriptor)
            if isinstance(record, Refusal):
                response.error.CopyFrom(wire_error(record))
                return
            record.touch()  # any operation resets the idle clock
            if op == "touch":
                response.done = True
                return
            sock = outbound_socket(record)
            if isinstance(sock, Refusal):
                response.error.CopyFrom(wire_error(sock))
            elif op == "set_option":
                apply_option(sock, req.set_option.value)
                response.done = True
            else:
                response.option.CopyFrom(read_option(sock, req.get_option.name))
        elif op == "detach":
            record = inspect.live(core.registry, app, req.detach.descriptor)
            token = record if isinstance(record, Refusal) else handoff.detach(record)
            if isinstance(token, Refusal):
                response.error.CopyFrom(wire_error(token))
            else:
                response.handoff.token = token
                if core.cluster is not None:
                    core.cluster.sign_handoff(response.handoff, req.detach.descriptor)
        elif op == "close_reason":
            reason = inspect.close_reason(core.registry, app, req.close_reason.descriptor)
            if isinstance(reason, Refusal):
                response.error.CopyFrom(wire_error(reason))
            else:
                response.text.text = reason
        elif op == "list_sockets":
            response.sockets.SetInParent()
            response.sockets.sockets.extend(
                inspect.list_sockets(core.registry, app, every_app=self.admin)
            )
        else:
            response.error.CopyFrom(wire_error(Refusal(pb.Error.UNSUPPORTED, 0,
                f"tether: request {op!r} is not supported by this gateway")))

    # -- resume ------------------------------------------------------------

    async def _resume(self, req: pb.Resume) -> None:
        assert self.app is not None and self.transport is not None
        core = self.core
        # Draining: a socket held here may still be resumed here, any other goes elsewhere.
        refusal = (core.draining and drain.resume_refusal(core, self.app, req.descriptor)) or (
            self._cluster_refusal(req)
        )
        if not refusal and core.cluster is not None and req.node not in ("", core.cluster.node_id):
            refusal = await self._resume_elsewhere(req)
            if refusal is None:
                return  # the node that holds the socket answers on this stream now
        record = refusal or await handoff.resumable(
            core.registry, self.app, req.descriptor, req.token, req.tail_length
        )
        if isinstance(record, Refusal):
            self._write(self.wire.send(pb.ConnectResult(error=wire_error(record))))
            return
        link = record.link
        assert link is not None  # resumable() checked
        family = socket.AF_INET6 if ":" in str(record.peer[0]) else socket.AF_INET
        self._write(self.wire.send(pb.ConnectResult(
            descriptor=record.descriptor,
            peer=address_to_wire(record.peer, family),
            local=address_to_wire(record.local, family),
        )))
        # Raw bytes from here on (after the tail's echo): the stream is the socket's.
        trailing = self.wire.trailing_data
        self._switched = True
        self.core.streams.discard(self.transport)
        link.attach(self.transport, req.tail_length, trailing)
        log.info("socket %s resumed by app %r", record.descriptor[:8], self.app)
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def _cluster_refusal(self, req: pb.Resume) -> Refusal | None:
        """A Resume naming a node: refused unread unless the cluster signed it."""
        cluster = self.core.cluster
        if cluster is None or not req.node:
            return None
        assert self.app is not None
        refusal = cluster.check_resume(self.app, req)
        if refusal is None and self.linked and req.node != cluster.node_id:
            # A link carries a Resume to the node it names; never on to a third.
            refusal = node_gone(req.node, f"node {cluster.node_id!r} now has its address")
        return refusal

    async def _resume_elsewhere(self, req: pb.Resume) -> Refusal | None:
        """Splice this stream onto a link to the socket's node (tether.cluster); None if done."""
        cluster = self.core.cluster
        transport = self.transport
        assert cluster is not None and self.app is not None and transport is not None
        splice = await cluster.open_resume_link(self.app, req)
        if isinstance(splice, Refusal):
            return splice
        # The owner answers the app (its ServerHello, ConnectResult, the tail's
        # echo): ours are dropped, and the stream is the link's from here on.
        self.wire.send(pb.ConnectResult(descriptor=req.descriptor))
        self._pending = b""
        self._switched = True
        self.core.streams.discard(transport)
        splice.join_plain(transport, self.wire.trailing_data)
        if not transport.is_closing():
            transport.resume_reading()
        return None


def linked_app(core: GatewayCore, app: str) -> bool:
    """On a node link: `app` is one this node serves (or the operator), as the linking node said."""
    return app in core.config.apps or (app == ADMIN_APP and core.config.admin_key is not None)


# Name lookups: refused, like connects, for an app whose sockets are switched off.
_LOOKUPS = frozenset({"getaddrinfo", "gethostbyname", "gethostbyaddr", "getnameinfo"})


def _one_line(exc: BaseException) -> str:
    """An internal error for the log on one line: the frames, then the repr of each exception.

    An exception's text may carry what a client sent; repr keeps it on the line.
    """
    parts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)
        where = " <- ".join(f"{f.filename}:{f.lineno} {f.name}" for f in reversed(frames))
        parts.append(f"{current!r} at {where}" if where else repr(current))
        current = current.__cause__ or current.__context__
    return "; caused by ".join(parts)


# Every successful hello gets the same answer from a gateway: encoded once
# per set of proxy front-ends offered (a handful per process at most).
_SERVER_HELLOS: dict[tuple[str, str], tuple[pb.ServerHello, bytes]] = {}


def _server_hello(core: GatewayCore) -> tuple[pb.ServerHello, bytes]:
    """The ServerHello of a successful hello, offering `core`'s proxy front-ends, and its frame."""
    offer = (core.socks5_proxy, core.http_proxy)
    found = _SERVER_HELLOS.get(offer)
    if found is None:
        message = pb.ServerHello(
            protocol_version=PROTOCOL_VERSION, gateway_version=__version__,
            socks5_proxy=offer[0], http_proxy=offer[1],
        )
        found = _SERVER_HELLOS[offer] = (message, encode_frame(message))
    return found


__all__ = ["TetherSession"]
