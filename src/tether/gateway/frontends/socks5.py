"""The SOCKS5 front-end: unmodified SOCKS5 clients on the gateway core (docs/proxies.md).

One :class:`Socks5Session` per accepted stream drives the sans-I/O
:class:`tether.proxy.socks5.Socks5Server` and calls the core exactly as the
Tether front-end does: the username and password are the app's name and
key (``Guard.check``, as every front-end; on a Unix listener an app known by
its peer's uid or gid may offer no authentication), the pre-auth guard bounds the
handshake, ``core.admit`` decides every destination (policy, caps, quotas,
the audit line) and ``core.dial`` connects. A CONNECT's stream is then
joined to the socket's :class:`~tether.gateway.relay.Link`, so metering,
throttling, idle reclamation and the close line are the native socket's.

Names are resolved at the gateway (socks5h): a request for a name is
admitted by that name, so name rules apply. A refusal is the reply code
SOCKS5 has for it (:func:`reply_code`); SOCKS5 carries no text, so the
gateway's log says why, and the audit line names the rule.

UDP ASSOCIATE opens a :class:`Socks5Association`: one UDP socket the client
sends its datagrams to (with the RFC 1928 header), one outbound socket the
destinations see, each destination admitted once (``new_socket=False``, as
the native UDP's AllowDestination), datagrams metered on the association's
record; it lives as long as the TCP stream that asked for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from tether.endpoint import Endpoint, address_family, host_port, same_host
from tether.gateway.core.admission import capacity, log_decision
from tether.gateway.core.auth import AuthRefusal
from tether.gateway.core.errors import DialTimeout, Refusal
from tether.gateway.core.gateway import GatewayCore
from tether.gateway.core.registry import SocketRecord
from tether.gateway.frontends.base import PreauthStream
from tether.gateway.udp import BATCH, MAX_DESTINATIONS, RECV_SIZE, quota_drops
from tether.policy import Transport
from tether.proxy import socks5
from tether.proxy.socks5 import (
    NEED_DATA,
    PAUSED,
    Auth,
    Closed,
    Greeting,
    Request,
    Socks5Error,
    Socks5Server,
)
from tether.wire import pb

log = logging.getLogger("tether.gateway")

# A SOCKS5 client cannot pass socket options, and a relay must not add
# Nagle's delay to what the client's own stack has already coalesced:
# the outbound socket keeps TCP_NODELAY on (as Dante and microsocks leave
# theirs to the OS default, this is the faster choice for request/response).
_OUTBOUND_OPTIONS = (pb.OptionValue(name=pb.TCP_NODELAY, int_value=1),)

# The reply code for each kind of refusal (RFC 1928 section 6). A quota is
# the app's rule as much as the policy is; a limit or a gateway that is
# going away is the server's failure, not the destination's.
_REPLY_FOR_CODE: dict[int, int] = {
    pb.Error.PERMISSION_DENIED: socks5.NOT_ALLOWED,
    pb.Error.QUOTA: socks5.NOT_ALLOWED,
    pb.Error.GAI: socks5.HOST_UNREACHABLE,
    pb.Error.HOST_NOT_FOUND: socks5.HOST_UNREACHABLE,
    pb.Error.TIMEOUT: socks5.TTL_EXPIRED,
}

# Datagrams held per destination while it is being admitted (one lookup and
# policy decision): a stub resolver sends one query and waits, so a few are
# plenty; more are dropped, as a kernel drops what its queue cannot hold.
PENDING_DATAGRAMS = 8


def reply_code(failure: Refusal | OSError) -> int:
    """The SOCKS5 reply for a refused admission or a failed connect."""
    if isinstance(failure, Refusal):
        if failure.code == pb.Error.SYSTEM:
            return socks5.reply_for_errno(failure.errno)
        return _REPLY_FOR_CODE.get(failure.code, socks5.GENERAL_FAILURE)
    if isinstance(failure, DialTimeout):
        return socks5.TTL_EXPIRED
    return socks5.reply_for_errno(failure.errno)


def proxy_url(endpoints: Sequence[Endpoint]) -> str:
    """The URL clients use for the first SOCKS5 listener ("" if none): socks5h, names at the
    gateway; a Unix socket as curl spells one (socks5h://localhost/PATH)."""
    for endpoint in endpoints:
        if not endpoint.is_unix:
            return f"socks5h://{endpoint}"
    return f"socks5h://localhost{endpoints[0].path}" if endpoints else ""


class Socks5Session(PreauthStream):
    """One SOCKS5 client stream."""

    def __init__(self, core: GatewayCore, *, unix: bool = False) -> None:
        self.core = core
        self.unix = unix  # a Unix listener: the peer's uid/gid may name the app
        self.machine = Socks5Server()
        self.transport: asyncio.Transport | None = None
        self.app: str | None = None
        self.association: Socks5Association | None = None
        self._guard = core.guard
        self._peer: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._switched = False  # the Link has the stream, or it is being closed

    # -- asyncio protocol --------------------------------------------------

    def end_preauth(self, refusal: Refusal) -> None:
        """The guard closes the stream before it authenticated (SOCKS5 has no words for why)."""
        log.info("closing SOCKS5 stream %s: %s", self.peername, refusal.message)
        self._close()

    def end(self, refusal: Refusal) -> None:
        """The core ends the stream (app revoked, gateway shutting down)."""
        if not self._switched:
            self._close()

    def data_received(self, data: bytes) -> None:
        self.machine.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self.machine.receive_data(b"")
        self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.association is not None:
            self.association.close("closed by the app")

    # -- events ------------------------------------------------------------

    def _process(self) -> None:
        machine = self.machine
        while self._task is None and not self._switched:
            try:
                event = machine.next_event()
            except Socks5Error as exc:
                log.info("closing SOCKS5 stream %s: %s", self.peername, exc)
                self._write(machine.refuse(exc))
                self._close()
                return
            if event is NEED_DATA or event is PAUSED:
                return
            if isinstance(event, Closed):
                self._close()
                return
            if isinstance(event, Greeting):
                self._greeting(event)
            elif isinstance(event, Auth):
                self._auth(event)
            elif isinstance(event, Request):
                self._start(self._request(event))

    def _done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("internal error on SOCKS5 stream %s: %r", self.peername, exc)
            self._close()
            return
        transport = self.transport
        if self._switched or transport is None or transport.is_closing():
            return
        transport.resume_reading()  # an association's stream: read on for its EOF
        self._process()

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        self._switched = True
        if self.transport is not None:
            self.transport.close()

    # -- authentication ----------------------------------------------------

    def _greeting(self, greeting: Greeting) -> None:
        if socks5.USERPASS in greeting.methods:
            self._write(self.machine.choose_method(socks5.USERPASS))
            return
        if socks5.NO_AUTH in greeting.methods:
            # No credentials: only an app known by its Unix peer's uid or gid
            # (as on the Tether protocol's Unix listener) passes.
            checked = self._guard.check(self, None, "", transport=self.transport,
                                        unix=self.unix)
            if not isinstance(checked, AuthRefusal):
                self.app = checked
                self._write(self.machine.choose_method(socks5.NO_AUTH))
                return
        log.info(
            "SOCKS5 stream %s offers methods %s; the gateway needs username/password "
            "(the app's name and key)%s",
            self.peername, list(greeting.methods),
            "" if not self.unix else " or a peer uid/gid mapped to an app",
        )
        self._write(self.machine.choose_method(socks5.NO_ACCEPTABLE))
        self._close()

    def _auth(self, auth: Auth) -> None:
        checked = self._guard.check(self, auth.username, auth.password,
                                    transport=self.transport, unix=self.unix)
        if not isinstance(checked, AuthRefusal):
            self.app = checked
            self._write(self.machine.auth_status(True))
            return
        # RFC 1929 has no words for why; no line per failure either: the
        # guard's summary counts them per app and peer, as for the native hello.
        data = self.machine.auth_status(False)
        self._switched = True  # serve nothing more on this stream
        if checked.delay > 0 and self.transport is not None:
            self.transport.pause_reading()
            self.core.loop.call_later(checked.delay, self._answer_and_close, data)
        else:
            self._answer_and_close(data)

    def _answer_and_close(self, data: bytes) -> None:
        self._write(data)
        self._close()

    # -- requests ----------------------------------------------------------

    async def _request(self, request: Request) -> None:
        assert self.app is not None  # never the admin identity: Guard.check refused it
        if request.command == socks5.CONNECT:
            await self._connect(request)
        else:
            await self._associate(request)

    def _refuse(self, request: Request, failure: Refusal | OSError) -> None:
        """Answer `request` with the reply for `failure`, say why in the log, close."""
        code = reply_code(failure)
        what = "CONNECT" if request.command == socks5.CONNECT else "UDP ASSOCIATE"
        words = failure.message if isinstance(failure, Refusal) else str(failure)
        # The host and the words may hold what the client sent: repr keeps the line one line.
        log.info(
            "SOCKS5 app %r: %s %r refused (reply %d, %s): %r", self.app, what,
            host_port(request.host, request.port), code, socks5.REPLY_NAMES[code], words,
        )
        self._write(self.machine.reply(code))
        self._close()

    async def _connect(self, request: Request) -> None:
        core, app, transport, task = self.core, self.app, self.transport, self._task
        assert app is not None and transport is not None and task is not None
        admitted = await core.admit(app, request.host, request.port, Transport.TCP,
                                    socket.AF_UNSPEC)
        if isinstance(admitted, Refusal):
            self._refuse(request, admitted)  # admit() wrote the audit line, with the rule
            return
        decision, addresses = admitted
        try:
            link = await core.dial(decision, addresses, _OUTBOUND_OPTIONS,
                                   core.config.connect_timeout, task)
        except OSError as exc:  # DialTimeout included; dial wrote the audit line
            self._refuse(request, exc)
            return
        local = link.record.local
        self._write(self.machine.reply(socks5.SUCCEEDED, (str(local[0]), int(local[1]))))
        # Raw bytes from here on: the stream is the socket's (the Link's), as
        # after the Tether protocol's ConnectResult.
        trailing = self.machine.trailing_data
        self._switched = True
        core.streams.discard(transport)
        link.join(transport, trailing)

    async def _associate(self, request: Request) -> None:
        core, app, transport = self.core, self.app, self.transport
        assert app is not None and transport is not None
        peer = transport.get_extra_info("peername")
        if not isinstance(peer, tuple):
            self._refuse(request, Refusal(pb.Error.UNSUPPORTED, 0,
                "tether: UDP ASSOCIATE needs the SOCKS5 front-end on an IP address; over a "
                "Unix socket the client's datagrams cannot reach it"))
            return
        refused = capacity(core, app)  # what admit() checks for a new socket
        if refused is not None:
            self._refuse(request, refused)
            return
        # Where the client reached us (as IPv4 on a dual-stack listener): its datagrams go there.
        here = _plain(str(transport.get_extra_info("sockname")[0]))
        try:
            association = Socks5Association.open(
                core, app, here, (_plain(str(peer[0])), request.port), transport.close
            )
        except OSError as exc:
            self._refuse(request, exc)
            return
        self.association = association
        bound = association.client_sock.getsockname()
        self._write(self.machine.reply(socks5.SUCCEEDED, (str(bound[0]), int(bound[1]))))


class Socks5Association:
    """One UDP ASSOCIATE: the client's datagrams (with their header) to their destinations.

    `client_sock` is where the client sends (the reply's BND address, on
    the address it reached the gateway at); datagrams are taken only from
    the client's host, and from the first port seen there (or the one its
    request named). `outbound` is what every destination sees; a
    datagram arriving there from a source the client never sent to is
    dropped and counted, as on the native UDP path.
    """

    def __init__(
        self,
        core: GatewayCore,
        record: SocketRecord,
        client_sock: socket.socket,
        outbound: socket.socket,
        client: tuple[str, int],
        hang_up: Callable[[], None],
    ) -> None:
        self.core = core
        self.record = record
        self.client_sock = client_sock
        self.outbound = outbound
        self.client_host = client[0]
        # The client's UDP address once known (its request's port, or the
        # first datagram's from its host).
        self.client: tuple[str, int] | None = client if client[1] else None
        self.hang_up = hang_up
        self.allowed: dict[tuple[str, int], tuple[str, int]] = {}  # asked for -> sent to
        self.peers: set[tuple[str, int]] = set()  # replies are taken from these
        self.pending: dict[tuple[str, int], list[bytes]] = {}  # being admitted
        self.denied: set[tuple[str, int]] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        counters = ("datagrams_out", "datagrams_in", "dropped_unsolicited", "dropped",
                    "dropped_denied", "destinations")
        self.counters: dict[str, int] = dict.fromkeys(counters, 0)
        # The app's byte and datagram quotas, charged as on the native UDP
        # path (udp.quota_drops); None: no such limit.
        self.meter = core.quota.datagram_meter(record.app)
        if self.meter is not None:
            self.counters["dropped_quota"] = 0
        record.extra = self.counters
        record.on_finish = self._finished
        loop = core.loop
        loop.add_reader(client_sock.fileno(), self._from_client)
        loop.add_reader(outbound.fileno(), self._from_peers)

    @classmethod
    def open(
        cls, core: GatewayCore, app: str, here: str, client: tuple[str, int],
        hang_up: Callable[[], None],
    ) -> Socks5Association:
        """Open the sockets and register the association (its record, one more descriptor)."""
        client_sock = socket.socket(address_family(here), socket.SOCK_DGRAM)
        outbound: socket.socket | None = None
        try:
            client_sock.setblocking(False)
            client_sock.bind((here, 0))
            outbound = _outbound_socket()
            local = outbound.getsockname()
        except BaseException:
            client_sock.close()
            if outbound is not None:
                outbound.close()
            raise
        record = core.registry.add(app, ("*", 0), local, "udp", core.idle_timeout(app))
        # Three descriptors: the TCP stream and the outbound socket (counted
        # for every socket), and the client's UDP socket.
        record.registry.extra_fds += 1
        return cls(core, record, client_sock, outbound, client, hang_up)

    # -- the client's datagrams ------------------------------------------------

    def _from_client(self) -> None:
        counters = self.counters
        for _ in range(BATCH):
            try:
                packet, source = self.client_sock.recvfrom(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                continue  # an ICMP error for an earlier datagram: nothing to relay
            if not self._is_client(source):
                counters["dropped_unsolicited"] += 1
                continue
            try:
                datagram = socks5.parse_datagram(packet)
            except Socks5Error:
                counters["dropped"] += 1  # a bad header or a fragment (not reassembled)
                continue
            key = (datagram.host, datagram.port)
            target = self.allowed.get(key)
            if target is not None:
                self._send(target, datagram.data)
                if self.closed:
                    return  # a daily quota ended the association
            else:
                self._admit(key, datagram.data)

    def _is_client(self, source: tuple[Any, ...]) -> bool:
        address = (_plain(str(source[0])), int(source[1]))
        if self.client is None:
            if not same_host(address[0], self.client_host):
                return False
            self.client = address
        return address == self.client

    def _send(self, target: tuple[str, int], data: bytes) -> None:
        record = self.record
        meter = self.meter
        if meter is not None and quota_drops(
            meter, record, self.counters, len(data), True, self.close
        ):
            return
        try:
            self.outbound.sendto(data, self._outbound_address(target))
        except OSError:
            # A full send buffer or an unreachable destination: UDP may drop.
            self.counters["dropped"] += 1
            return
        record.bytes_out += len(data)
        self.counters["datagrams_out"] += 1
        record.touch()

    def _admit(self, key: tuple[str, int], data: bytes) -> None:
        """Hold `data` while `key` is admitted (once per destination)."""
        counters = self.counters
        waiting = self.pending.get(key)
        if waiting is not None:
            if len(waiting) < PENDING_DATAGRAMS:
                waiting.append(data)
            else:
                counters["dropped"] += 1
            return
        if key in self.denied:
            counters["dropped_denied"] += 1
            return
        if len(self.allowed) + len(self.pending) + len(self.denied) >= MAX_DESTINATIONS:
            # Each destination costs a decision and an audit line: bounded
            # per association, as the native UDP's relays are.
            counters["dropped"] += 1
            return
        self.pending[key] = [data]
        task = self.core.loop.create_task(self._decide(key))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _decide(self, key: tuple[str, int]) -> None:
        host, port = key
        family = socket.AF_UNSPEC if self.outbound.family == socket.AF_INET6 else socket.AF_INET
        admitted = await self.core.admit(
            self.record.app, host, port, Transport.UDP, family, new_socket=False
        )
        waiting = self.pending.pop(key, [])
        if self.closed:
            return
        if isinstance(admitted, Refusal):
            # admit() wrote the audit line, with the rule; SOCKS5 has no way
            # to tell the client about one datagram: dropped, and counted.
            self.denied.add(key)
            self.counters["dropped_denied"] += len(waiting)
            log.info("SOCKS5 app %r: UDP to %r refused: %r", self.record.app,
                     host_port(host, port), admitted.message)
            return
        decision, addresses = admitted
        target = (_plain(addresses[0]), port)
        self.allowed[key] = target
        self.peers.add(target)
        self.counters["destinations"] = len(self.allowed)
        log_decision(decision, outcome="allowed", descriptor=self.record.descriptor,
                     chosen=target)
        for data in waiting:
            if self.closed:
                return
            self._send(target, data)

    # -- the destinations' datagrams -------------------------------------------

    def _from_peers(self) -> None:
        counters, record, meter = self.counters, self.record, self.meter
        for _ in range(BATCH):
            try:
                data, source = self.outbound.recvfrom(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                continue
            peer = (_plain(str(source[0])), int(source[1]))
            client = self.client
            if peer not in self.peers or client is None:
                counters["dropped_unsolicited"] += 1  # never sent to: no unsolicited inbound
                continue
            if meter is not None and quota_drops(
                meter, record, counters, len(data), False, self.close
            ):
                if self.closed:
                    return
                continue
            try:
                self.client_sock.sendto(socks5.build_datagram(peer[0], peer[1], data), client)
            except OSError:
                counters["dropped"] += 1
                continue
            record.bytes_in += len(data)
            counters["datagrams_in"] += 1
            record.touch()

    def _outbound_address(self, target: tuple[str, int]) -> tuple[str, int]:
        if self.outbound.family == socket.AF_INET6 and ":" not in target[0]:
            return "::ffff:" + target[0], target[1]  # a dual-stack socket sends IPv4 mapped
        return target

    # -- ending ----------------------------------------------------------------

    def close(self, reason: str) -> None:
        self.record.finish(reason)  # the close line, then _finished()

    def _finished(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.core.loop
        for sock in (self.client_sock, self.outbound):
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
            sock.close()
        self.record.registry.extra_fds -= 1
        for task in list(self.tasks):
            task.cancel()
        self.pending.clear()
        # SOCKS5 has no message for why: the association ends with its stream.
        self.hang_up()


def _outbound_socket() -> socket.socket:
    """A UDP socket for every destination: dual-stack IPv6 where the host has IPv6, else IPv4."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        wildcard = "0.0.0.0"
    else:
        wildcard = "::"
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            sock.close()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            wildcard = "0.0.0.0"
    try:
        sock.setblocking(False)
        sock.bind((wildcard, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _plain(host: str) -> str:
    """An IPv4-mapped IPv6 address as IPv4; anything else as it is."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


__all__ = ["Socks5Association", "Socks5Session", "proxy_url", "reply_code"]
