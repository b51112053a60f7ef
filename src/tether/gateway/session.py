"""One app stream at the gateway: hello, then connects or control requests.

The stream is driven by the sans-I/O :class:`tether.wire.Connection`. A
protocol error closes this stream only, with an Error frame that says why;
nothing in here can take the gateway down.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import hmac
import logging
import os
import socket
from collections.abc import Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

from tether import __version__
from tether.endpoint import host_port
from tether.gateway import audit, udp
from tether.gateway.registry import ATTACHED, DETACHING, HANDED_OFF, SocketRecord
from tether.gateway.relay import DETACH_SETTLE_TIMEOUT, MAX_RESUME_TAIL, Link
from tether.gateway.resolve import HostError
from tether.policy import Decision, ResolutionError, Transport
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
from tether.wire.convert import (
    FAMILY_FROM_WIRE,
    OPTION_LEVELS,
    OPTION_NAMES,
    address_to_wire,
    decode_option,
    encode_option,
)

if TYPE_CHECKING:
    from tether.gateway.server import Gateway

log = logging.getLogger("tether.gateway")

# Compared against when the app is unknown, so a wrong app name costs the
# same time as a wrong key and timing does not reveal which apps exist.
_DUMMY_KEY = os.urandom(32).hex()
ADMIN_APP = "*"  # not a valid app table name in practice; see [gateway] admin_key


class ClientSession(asyncio.Protocol):
    __slots__ = (
        "__weakref__",
        "_pending",
        "_switched",
        "_task",
        "_timed_out",
        "admin",
        "app",
        "association",
        "gateway",
        "transport",
        "wire",
    )

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.wire = Connection(Role.GATEWAY, max_frame=gateway.config.max_frame)
        self.transport: asyncio.Transport | None = None
        self.app: str | None = None
        self.admin = False  # the operator's identity: sees every app's sockets
        self._task: asyncio.Task[None] | None = None
        self._timed_out = False
        self._switched = False
        # A ServerHello held back to go out with the ConnectResult of the
        # Connect pipelined behind it: one write and one client wake-up
        # instead of two per connection.
        self._pending = b""
        self.association: udp.UdpAssociation | None = None  # a UDP socket's stream

    # -- asyncio protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport  # type: ignore[assignment]
        self.gateway.sessions.add(self)

    @property
    def peername(self) -> str:
        """The app stream's address, for log lines (asked only when one is written)."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer) if peer else "unix"

    def data_received(self, data: bytes) -> None:
        self.wire.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self.wire.receive_data(b"")
        self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gateway.sessions.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.association is not None:
            self.association.close("closed by the app")

    # -- events ------------------------------------------------------------

    def _process(self) -> None:
        while self._task is None and not self._switched:
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
                log.info("stream %s sent an error: %s", self.peername, event.message)
                self._close()
                return

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self.transport is not None
        # Read nothing more until this is answered: frames wait in the
        # kernel, and early raw bytes after a Connect stay in order.
        self.transport.pause_reading()
        task = self.gateway.loop.create_task(coro)
        self._task = task
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("internal error on stream %s", self.peername, exc_info=exc)
            self._fail(ProtocolError(f"gateway internal error: {type(exc).__name__}"))
            return
        if self._switched or self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        self._process()

    def _write(self, data: bytes) -> None:
        if self._pending:
            data, self._pending = self._pending + data, b""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, exc: ProtocolError) -> None:
        log.info("closing stream %s: protocol error: %s", self.peername, exc)
        if self.wire.state is not State.RELAY:  # raw bytes now: no frame can be sent
            self._write(self.wire.send_error(exc))
        self._close()

    def _close(self) -> None:
        if self._pending:
            self._write(b"")
        if self.transport is not None:
            self.transport.close()

    # -- hello -------------------------------------------------------------

    def _hello(self, hello: pb.ClientHello) -> None:
        if hello.protocol_version == PROTOCOL_VERSION:
            config = self.gateway.config
            if hello.app == ADMIN_APP:
                # The operator's identity: may list every app's sockets, open none.
                expected = config.admin_key or _DUMMY_KEY
                known = config.admin_key is not None
            else:
                app = config.apps.get(hello.app)
                expected = app.key if app is not None else _DUMMY_KEY
                known = app is not None
            if hmac.compare_digest(hello.key.encode(), expected.encode()) and known:
                self.app = hello.app
                self.admin = hello.app == ADMIN_APP
                # Written by _process or with the answer to the next frame.
                self._pending = self.wire.send(_SERVER_HELLO, frame=_SERVER_HELLO_FRAME)
                return
        reply = pb.ServerHello(protocol_version=PROTOCOL_VERSION, gateway_version=__version__)
        if hello.protocol_version != PROTOCOL_VERSION:
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
                "stream %s: client protocol version %d refused (client %s)",
                self.peername,
                hello.protocol_version,
                hello.client_version or "unknown",
            )
        else:
            reply.error.CopyFrom(
                pb.Error(
                    code=pb.Error.AUTH_FAILED,
                    message=f"tether: app '{hello.app}' authentication failed",
                )
            )
            # The key is never logged, not even a wrong one.
            log.warning("stream %s: app %r authentication failed", self.peername, hello.app)
        self._write(self.wire.send(reply))
        self._close()

    # -- connect -----------------------------------------------------------

    async def _connect(self, req: pb.Connect) -> None:
        assert self.app is not None and self.transport is not None
        gw = self.gateway
        app = self.app
        if self.admin:
            self._write(self.wire.send(_result_error(pb.Error.PERMISSION_DENIED, errno.EACCES,
                "tether: the admin identity can list sockets but not open them")))
            return
        if req.transport == pb.TRANSPORT_UDP:
            await udp.open_association(self, req)
            return
        family = FAMILY_FROM_WIRE.get(req.family, socket.AF_UNSPEC)
        try:
            decision = await gw.decide(app, req.host, req.port, Transport.TCP)
        except ResolutionError as exc:
            self._write(self.wire.send(_result_error(pb.Error.GAI, exc.eai, exc.message)))
            return
        if not decision.allowed:
            gw.registry.app_usage(app).connects_denied += 1
            log_decision(decision, outcome="denied")
            self._write(self.wire.send(pb.ConnectResult(error=pb.Error(
                code=pb.Error.PERMISSION_DENIED, errno=errno.EACCES,
                message=decision.describe(), rule=decision.rule))))
            return
        addresses = (
            list(decision.addresses)
            if family == socket.AF_UNSPEC
            else [a for a in decision.addresses if _family_ok(a, family)]
        )
        if not addresses:
            log_decision(decision, outcome=f"no {_family_name(family)} address")
            self._write(self.wire.send(_result_error(pb.Error.SYSTEM, errno.EAFNOSUPPORT,
                f"tether: {req.host} has no {_family_name(family)} address the policy allows")))
            return
        timeout = req.timeout if req.timeout > 0 else gw.config.connect_timeout
        loop = gw.loop
        link = Link(loop, None)
        # A timer that cancels this task, not asyncio.timeout(): ~8 us less
        # per connect (no Timeout object, no current_task() lookups).
        self._timed_out = False
        timer = loop.call_later(timeout, self._expire)
        try:
            transport = await self._open(link, addresses, req.port, req.options)
        except asyncio.CancelledError:
            if not self._timed_out:
                raise
            log_decision(decision, outcome=f"connect timed out after {timeout:g} s")
            self._write(self.wire.send(_result_error(pb.Error.TIMEOUT, errno.ETIMEDOUT,
                f"timed out connecting to {req.host}:{req.port} after {timeout:g} s")))
            return
        except OSError as exc:
            log_decision(decision, outcome=f"connect failed: {exc.strerror or exc}")
            self._write(self.wire.send(_result_error(pb.Error.SYSTEM, exc.errno or errno.EIO,
                exc.strerror or str(exc))))
            return
        finally:
            timer.cancel()
        self._relay(link, transport, decision, req.options)

    def _expire(self) -> None:
        """The connect timeout: cancel the connect in progress (see _connect)."""
        if self._task is not None:
            self._timed_out = True
            self._task.cancel()

    async def _open(
        self, link: Link, addresses: list[str], port: int, options: Iterable[pb.OptionValue]
    ) -> asyncio.BaseTransport:
        """The outbound transport to the first of `addresses` that answers.

        The buffer sizes shape the handshake (the window scale is fixed in
        the SYN), so with one of them the socket is made and set up first;
        otherwise the event loop connects on its own, which costs ~100 us
        less per connection (bench/README.md, connection rate), and the
        other options follow in _relay before the app hears of the socket.
        """
        loop = self.gateway.loop
        early = [o for o in options if o.name in PRE_CONNECT_OPTIONS]
        last: OSError | None = None
        for address in addresses:
            try:
                if not early:
                    transport, _ = await loop.create_connection(
                        lambda: link.peer_side, address, port
                    )
                    return transport
                fam = socket.AF_INET6 if ":" in address else socket.AF_INET
                sock = socket.socket(fam, socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)
                    for opt in early:
                        apply_option(sock, opt)
                    await loop.sock_connect(sock, (address, port))
                    transport, _ = await loop.create_connection(lambda: link.peer_side, sock=sock)
                except BaseException:
                    sock.close()
                    raise
                return transport
            except OSError as exc:
                last = exc
        assert last is not None
        raise last

    def _relay(
        self,
        link: Link,
        outbound: asyncio.BaseTransport,
        decision: Decision,
        options: Iterable[pb.OptionValue],
    ) -> None:
        assert self.app is not None and self.transport is not None
        gw = self.gateway
        # The peer side starts paused (Link.starting): nothing of the peer may
        # reach the app's stream before the ConnectResult, and the options
        # must be final before the app can ask for them.
        # Both asked of the kernel once, by the transport, at connection_made.
        peer = outbound.get_extra_info("peername")
        local = outbound.get_extra_info("sockname")
        family = socket.AF_INET6 if len(peer) == 4 else socket.AF_INET
        nodelay = 0
        late = []
        for opt in options:
            if opt.name == pb.TCP_NODELAY:
                nodelay = opt.int_value  # already on: the event loop sets it
            elif opt.name not in PRE_CONNECT_OPTIONS:
                late.append(opt)
        try:
            if late or not nodelay:
                with _socket_on(outbound, family) as sock:
                    for opt in late:
                        apply_option(sock, opt)
                    if not nodelay:
                        # asyncio and uvloop switch Nagle off on every
                        # transport: put back the kernel default the app expects.
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        except OSError as exc:
            cast(asyncio.Transport, outbound).abort()
            log_decision(decision, outcome=f"outbound setup failed: {exc}")
            self._write(self.wire.send(_result_error(pb.Error.SYSTEM, exc.errno or errno.EIO,
                f"tether: outbound setup failed: {exc.strerror or exc}")))
            return
        record = gw.registry.add(self.app, peer, local, "tcp", gw.idle_timeout(self.app))
        link.bind(record)
        log_decision(decision, outcome="connected", descriptor=record.descriptor, chosen=peer)
        self._write(self.wire.send(pb.ConnectResult(
            descriptor=record.descriptor,
            peer=address_to_wire(peer, family),
            local=address_to_wire(local, family),
        )))
        trailing = self.wire.trailing_data
        self._switched = True
        gw.sessions.discard(self)
        self.transport.set_protocol(link.app_side)
        link.app_side.connection_made(self.transport)
        link.started()
        if trailing:
            link.app_side.data_received(trailing)
        if not self.transport.is_closing():
            self.transport.resume_reading()

    # -- control requests --------------------------------------------------

    async def _request(self, req: pb.Request) -> None:
        assert self.app is not None
        response = pb.Response(id=req.id)
        try:
            await self._answer(req, response)
        except ResolutionError as exc:
            response.ClearField("result")
            response.error.CopyFrom(pb.Error(code=pb.Error.GAI, errno=exc.eai, message=exc.message))
        except HostError as exc:
            response.error.CopyFrom(
                pb.Error(code=pb.Error.HOST_NOT_FOUND, errno=exc.herrno, message=str(exc))
            )
        except OSError as exc:
            response.error.CopyFrom(
                pb.Error(code=pb.Error.SYSTEM, errno=exc.errno or errno.EIO,
                         message=exc.strerror or str(exc))
            )
        self._write(self.wire.send(response))

    async def _answer(self, req: pb.Request, response: pb.Response) -> None:
        assert self.app is not None
        gw = self.gateway
        op = req.WhichOneof("op")
        if self.association is not None and op in udp.OPS:
            await self.association.answer(req, response)
        elif op == "getaddrinfo":
            response.addrinfo.CopyFrom(await gw.resolver.getaddrinfo(req.getaddrinfo, self.app))
        elif op == "gethostbyname":
            response.host.CopyFrom(
                await gw.resolver.gethostbyname_ex(req.gethostbyname.name, self.app)
            )
        elif op == "gethostbyaddr":
            response.host.CopyFrom(await gw.resolver.gethostbyaddr(req.gethostbyaddr.address))
        elif op == "getnameinfo":
            response.nameinfo.CopyFrom(await gw.resolver.getnameinfo(req.getnameinfo))
        elif op in ("set_option", "get_option", "touch"):
            descriptor = getattr(req, op).descriptor
            record = self._live(descriptor, response)
            if record is None:
                return
            record.touch()  # any operation resets the idle clock
            if op == "touch":
                response.done = True
                return
            link = record.link
            if link is None or link.peer_side.transport is None:
                response.error.CopyFrom(pb.Error(code=pb.Error.CLOSED, errno=errno.EBADF,
                    message=f"tether: socket {descriptor[:8]}... is closing"))
                return
            sock = link.peer_side.transport.get_extra_info("socket")
            if op == "set_option":
                apply_option(sock, req.set_option.value)
                response.done = True
            else:
                response.option.CopyFrom(read_option(sock, req.get_option.name))
        elif op == "detach":
            record = self._live(req.detach.descriptor, response)
            if record is None:
                return
            if record.state != ATTACHED or record.link is None:
                response.error.CopyFrom(pb.Error(code=pb.Error.INVALID_REQUEST,
                    errno=errno.EINVAL,
                    message=f"tether: socket {record.descriptor[:8]}... is {record.state}, "
                    "not attached: it cannot be handed off now"))
                return
            record.link.begin_detach()
            record.handoffs += 1
            response.handoff.token = record.new_token()
        elif op == "close_reason":
            descriptor = req.close_reason.descriptor
            live = gw.registry.get(self.app, descriptor)
            stone = gw.registry.tombstone(self.app, descriptor)
            if live is not None:
                response.text.text = f"open ({live.state})"
            elif stone is not None:
                response.text.text = stone.reason
            else:
                response.error.CopyFrom(pb.Error(code=pb.Error.NOT_FOUND, errno=errno.EBADF,
                    message=f"tether: no socket {descriptor[:8]}... for app '{self.app}'"))
        elif op == "list_sockets":
            now = gw.registry.clock()
            for record in gw.registry:
                if record.app != self.app and not self.admin:
                    continue
                family = socket.AF_INET6 if ":" in str(record.peer[0]) else socket.AF_INET
                response.sockets.sockets.append(pb.SocketInfo(
                    app=record.app,
                    descriptor_prefix=record.descriptor[:8],
                    peer=address_to_wire(record.peer, family),
                    state=record.state,
                    bytes_out=record.bytes_out,
                    bytes_in=record.bytes_in,
                    idle_seconds=max(0.0, now - record.last_active),
                    age_seconds=max(0.0, now - record.created),
                    transport=pb.TRANSPORT_TCP if record.transport == "tcp" else pb.TRANSPORT_UDP,
                ))
            if not response.HasField("sockets"):
                response.sockets.SetInParent()
        else:
            response.error.CopyFrom(pb.Error(code=pb.Error.UNSUPPORTED,
                message=f"tether: request {op!r} is not supported by this gateway"))

    def _live(self, descriptor: str, response: pb.Response) -> SocketRecord | None:
        """This app's live socket, or None with the error filled in (why it is gone)."""
        assert self.app is not None
        gw = self.gateway
        record = gw.registry.get(self.app, descriptor)
        if record is not None:
            return record
        response.error.CopyFrom(self._gone(descriptor))
        return None

    def _gone(self, descriptor: str) -> pb.Error:
        assert self.app is not None
        gw = self.gateway
        owner = gw.registry.owner(descriptor)
        if owner is not None and owner != self.app:
            return pb.Error(code=pb.Error.PERMISSION_DENIED, errno=errno.EACCES,
                message=f"tether: socket {descriptor[:8]}... belongs to another app; "
                f"app '{self.app}' may not use it")
        stone = gw.registry.tombstone(self.app, descriptor)
        if stone is not None:
            return pb.Error(code=pb.Error.CLOSED, errno=errno.ECONNRESET,
                message=f"tether: socket to {stone.peer} was {stone.reason}")
        return pb.Error(code=pb.Error.NOT_FOUND, errno=errno.EBADF,
            message=f"tether: no socket {descriptor[:8]}... for app '{self.app}'")

    # -- resume ------------------------------------------------------------

    async def _resume(self, req: pb.Resume) -> None:
        assert self.app is not None and self.transport is not None
        gw = self.gateway
        record = gw.registry.get(self.app, req.descriptor)
        if record is None:
            self._write(self.wire.send(pb.ConnectResult(error=self._gone(req.descriptor))))
            return
        if req.tail_length > MAX_RESUME_TAIL:
            # Refused before the token is checked, so it stays valid.
            self._write(self.wire.send(pb.ConnectResult(error=pb.Error(
                code=pb.Error.INVALID_REQUEST, errno=errno.EMSGSIZE,
                message=f"tether: resuming socket {record.descriptor[:8]}...: a tail of "
                f"{req.tail_length} bytes is over the gateway's limit of {MAX_RESUME_TAIL}"))))
            return
        link = record.link
        if record.state == DETACHING and link is not None and req.token == record.token:
            # The old holder has read our EOF but its close is still in flight.
            with contextlib.suppress(TimeoutError):
                assert link.settled is not None  # made by begin_detach()
                await asyncio.wait_for(link.settled.wait(), DETACH_SETTLE_TIMEOUT)
            if record.closed_reason is not None:
                # The peer left while we waited: the link is closed and released.
                self._write(self.wire.send(pb.ConnectResult(error=self._gone(req.descriptor))))
                return
        token = record.token
        if (
            record.state != HANDED_OFF
            or link is None
            or token is None
            or not hmac.compare_digest(req.token.encode(), token.encode())
        ):
            already = record.state == ATTACHED
            self._write(self.wire.send(pb.ConnectResult(error=pb.Error(
                code=pb.Error.ALREADY_RESUMED if already else pb.Error.INVALID_REQUEST,
                errno=errno.EALREADY if already else errno.EINVAL,
                message=(
                    f"tether: socket {record.descriptor[:8]}... was already resumed: "
                    "a pickled socket can be resumed once"
                    if already else
                    f"tether: socket {record.descriptor[:8]}... is {record.state}; "
                    "this handoff cannot be resumed"
                )))))
            return
        family = socket.AF_INET6 if ":" in str(record.peer[0]) else socket.AF_INET
        self._write(self.wire.send(pb.ConnectResult(
            descriptor=record.descriptor,
            peer=address_to_wire(record.peer, family),
            local=address_to_wire(record.local, family),
        )))
        trailing = self.wire.trailing_data
        self._switched = True
        gw.sessions.discard(self)
        link.attach(self.transport, req.tail_length, trailing)
        log.info("socket %s resumed by app %r", record.descriptor[:8], self.app)
        if not self.transport.is_closing():
            self.transport.resume_reading()


# Every successful hello gets the same answer.
_SERVER_HELLO = pb.ServerHello(protocol_version=PROTOCOL_VERSION, gateway_version=__version__)
_SERVER_HELLO_FRAME = encode_frame(_SERVER_HELLO)

# Options that must be on the socket before connect(): the buffer sizes
# decide the window scale the SYN announces.
PRE_CONNECT_OPTIONS = frozenset({pb.SO_RCVBUF, pb.SO_SNDBUF})


@contextlib.contextmanager
def _socket_on(transport: asyncio.BaseTransport, family: int) -> Iterator[_socket.socket]:
    """A socket object on the transport's fd, for setsockopt.

    Made with its family, type and protocol given, so the C constructor asks
    the kernel for none of them (uvloop's socket wrapper makes a new socket
    object, with a getsockname(), for every call).
    """
    fd = transport.get_extra_info("socket").fileno()
    sock = _socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fd)
    try:
        yield sock
    finally:
        sock.detach()


def apply_option(sock: Any, value: pb.OptionValue) -> None:
    level, optname = OPTION_LEVELS[value.name]
    if value.name == pb.SO_LINGER:
        packed = decode_option(value, 8)
        assert isinstance(packed, bytes)
        sock.setsockopt(level, optname, packed)
    else:
        sock.setsockopt(level, optname, value.int_value)


def read_option(sock: socket.socket, name: pb.OptionName.ValueType) -> pb.OptionValue:
    level, optname = OPTION_LEVELS[name]
    if name == pb.SO_LINGER:
        return encode_option(name, sock.getsockopt(level, optname, 8))
    return pb.OptionValue(name=name, int_value=sock.getsockopt(level, optname))


def _result_error(code: pb.Error.Code.ValueType, err: int, message: str) -> pb.ConnectResult:
    return pb.ConnectResult(error=pb.Error(code=code, errno=err, message=message))


def _family_ok(address: str, family: int) -> bool:
    if family == socket.AF_UNSPEC:
        return True
    return (":" in address) == (family == socket.AF_INET6)


def _family_name(family: int) -> str:
    names = {int(socket.AF_INET): "IPv4", int(socket.AF_INET6): "IPv6"}
    return names.get(family, "usable")


def log_decision(
    decision: Decision,
    *,
    outcome: str,
    descriptor: str = "",
    chosen: tuple[Any, ...] | None = None,
) -> None:
    """One audit line per decision, written once its outcome is known.

    The descriptor is shortened to 8 characters: enough to match the close
    line, too little to use the socket.
    """
    # The decision's part is encoded once per decision (Decision.log_json);
    # the fields of this connect are appended to it.
    line = f'{{"event":"decision",{decision.log_json[1:-1]},"outcome":{audit.quote(outcome)}'
    if descriptor:
        line += f',"descriptor":{audit.quote(descriptor[:8])}'
    if chosen is not None:
        line += f',"chosen":{audit.quote(host_port(chosen[0], chosen[1]))}'
    audit.emit_line(line + "}")


__all__ = ["OPTION_NAMES", "ClientSession", "apply_option", "log_decision", "read_option"]
