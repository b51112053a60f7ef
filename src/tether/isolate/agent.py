"""The agent: the namespace's only way out, served from ``tether run``'s own process.

It holds sockets made inside the namespace (enter.py sends them over) and
serves them from outside it, where the gateway is reachable:

- **redirected TCP.** Every outbound connection in the namespace arrives
  at the agent's listener (rules.py). The agent reads the original
  destination (``SO_ORIGINAL_DST``), turns a fake address back into the name
  the program resolved (names.py) and asks the gateway to connect to that
  name (a number passes as the number), with the tether client's asyncio
  driver; then it relays bytes both ways. When the gateway refuses, the
  program's connection is reset (``SO_LINGER`` 0, so ECONNRESET) and one
  line on stderr says why; the gateway's audit line has the rule. The
  program's own handshake already completed with the agent (REDIRECT
  terminates it locally), so the reset comes right *after* connect()
  returned, on the first read or write, not as a refused connect.
- **DNS.** Queries to 127.0.0.1:53 are answered by dns.Responder, asking
  the gateway's resolver whether each name resolves for this app.
- **the gateway's Unix socket, for Python.** Python processes in the
  namespace use tether's drop-in (``tether run`` installs it) over a Unix
  socket, which crosses network namespaces. When the gateway itself
  listens on TCP, the agent offers a Unix socket that relays each stream
  to it, byte for byte (a bridge: the app's descriptor still carries the
  peer's stream after the handshake; only a hop is added).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from tether.client import resolve as tether_resolve
from tether.client.settings import Settings
from tether.endpoint import arm_reset, host_port
from tether.errors import PolicyDenied
from tether.isolate.dns import Lookup, Responder
from tether.isolate.names import FakeNames

SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>; IP6T_SO_ORIGINAL_DST is the same number
_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, address
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")  # family, port, flowinfo, address, scope id


class NoDestinationError(ConnectionRefusedError):
    """A redirected connection names no destination the agent can ask the gateway for."""


@dataclass(frozen=True)
class Destination:
    """Where the gateway is asked to connect: a name (from a fake address) or a number."""

    host: str
    port: int
    dialled: str  # the address the program connected to, as it wrote it

    def __str__(self) -> str:
        target = host_port(self.host, self.port)
        return target if self.dialled == target else f"{target} (dialled {self.dialled})"


def original_destination(sock: socket.socket | socket.SocketType) -> tuple[str, int]:
    """The address a redirected connection was made to (conntrack's record of it)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
        port, packed = _SOCKADDR_IN6.unpack(raw)
        return str(ipaddress.IPv6Address(packed)), port
    raw = sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
    port, packed = _SOCKADDR_IN.unpack(raw)
    return str(ipaddress.IPv4Address(packed)), port


def destination(names: FakeNames, address: str, port: int, own_port: int) -> Destination:
    """What to ask the gateway for; NoDestinationError for what names none (pure)."""
    dialled = host_port(address, port)
    ip = ipaddress.ip_address(address)
    if port == own_port and ip.is_loopback:
        raise NoDestinationError(
            f"tether isolate: a connection to {dialled} reached the agent itself (not "
            f"redirected), which is no destination"
        )
    if names.is_fake(address):
        name = names.name_of(address)
        if name is None:
            raise NoDestinationError(
                f"tether isolate: {address} is in the namespace's fake range "
                f"{names.network} but no name was given that address; connect by a name "
                f"the namespace's DNS answered"
            )
        return Destination(name, port, dialled)
    return Destination(str(ip), port, dialled)


def reset(transport: asyncio.Transport) -> None:
    """Close the program's connection with a RST, so it sees ECONNRESET."""
    arm_reset(transport)
    transport.abort()


# -- the byte relay -----------------------------------------------------------------


class Half(asyncio.Protocol):
    """One side of a relay: what it reads is written to the other side.

    Flow control is the transports': a side whose write buffer passes its
    high-water mark pauses reading on the other (so nothing buffers without
    bound); half-closes pass on with write_eof, and the pair closes when
    both directions have ended or either side is lost.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: Half | None = None
        self.ended = False  # this side sent EOF
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.write(data)

    def eof_received(self) -> bool:
        self.ended = True
        other = self.other
        if other is None or other.transport is None or other.lost:
            return False
        if other.ended:
            other.transport.close()
            return False
        if other.transport.can_write_eof():
            other.transport.write_eof()
        return True  # keep the transport open: the other direction still runs

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        other = self.other
        if other is not None and other.transport is not None and not other.lost:
            if isinstance(exc, ConnectionResetError):
                reset(other.transport)  # pass a reset on as a reset
            else:
                other.transport.close()
        self.other = None  # break the cycle: a closed pair is freed by reference counting

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


Dialler = Callable[[Callable[[], Half]], Awaitable[tuple[asyncio.BaseTransport, Half]]]


class Pending(Half):
    """The program's side: held (not read) until the other side is connected, then a Half.

    `dial(factory)` opens the other side with a Half from `factory` (already
    linked to this one, so nothing it receives is lost); on failure, `refused`
    gets the exception and the program's connection is reset.
    """

    def __init__(
        self,
        dial: Callable[[Pending], Dialler | None],
        refused: Callable[[Pending, BaseException], None],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        super().__init__()
        self._dial = dial
        self._refused = refused
        self._tasks = tasks
        # What arrives before the other side is there: uvloop may deliver the
        # first read even though connection_made paused reading.
        self._early = bytearray()
        self._early_eof = False

    def data_received(self, data: bytes) -> None:
        if self.other is None:
            self._early += data
        else:
            super().data_received(data)

    def eof_received(self) -> bool:
        if self.other is None:
            self._early_eof = True
            return True
        return super().eof_received()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        assert self.transport is not None
        try:
            dialler = self._dial(self)
            if dialler is None:
                return  # refused already (the dial function said why)
            other = Half()
            other.other = self

            def factory() -> Half:
                return other

            await dialler(factory)
        except asyncio.CancelledError:
            reset(self.transport)
            raise
        except Exception as exc:  # every refusal and failure: the program gets a reset
            self._refused(self, exc)
            reset(self.transport)
            return
        if self.lost:
            if other.transport is not None:
                other.transport.close()  # the program left while the gateway dialled
            return
        self.other = other
        if self._early:
            assert other.transport is not None
            other.transport.write(bytes(self._early))
            self._early.clear()
        if self._early_eof:
            self.eof_received()
        else:
            self.transport.resume_reading()


# -- the agent ------------------------------------------------------------------------


class Agent:
    """Serves the namespace's sockets on this process's loop (see the module's doc)."""

    def __init__(
        self,
        settings: Settings,
        *,
        names: FakeNames | None = None,
        own_port: int,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.names = names or FakeNames()
        self.responder = Responder(self.names)
        self.own_port = own_port
        self.log = log or _stderr
        self.tasks: set[asyncio.Task[None]] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.dns_transport: asyncio.DatagramTransport | None = None
        self.refusals = 0

    # -- redirected TCP

    def _dial_destination(self, pending: Pending) -> Dialler | None:
        assert pending.transport is not None
        sock = pending.transport.get_extra_info("socket")
        try:
            address, port = original_destination(sock)
            target = destination(self.names, address, port, self.own_port)
        except OSError as exc:
            self._refused_line("a connection", exc)
            reset(pending.transport)
            return None
        from tether.aio.connection import create_connection

        async def dial(factory: Callable[[], Half]) -> tuple[asyncio.BaseTransport, Half]:
            try:
                transport, half = await create_connection(
                    asyncio.get_running_loop(), factory, target.host, target.port
                )
            except Exception as exc:
                raise _Refused(target, exc) from exc
            assert isinstance(half, Half)
            return transport, half

        return dial

    def _refused(self, pending: Pending, exc: BaseException) -> None:
        if isinstance(exc, _Refused):
            self._refused_line(f"the connection to {exc.target}", exc.cause)
        else:
            self._refused_line("a connection", exc)

    def _refused_line(self, what: str, exc: BaseException) -> None:
        self.refusals += 1
        kind = "denied by policy" if isinstance(exc, PolicyDenied) else type(exc).__name__
        self.log(f"tether isolate: reset {what}: {kind}: {exc}")

    async def serve_tcp(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        server = await loop.create_server(
            lambda: Pending(self._dial_destination, self._refused, self.tasks), sock=listener
        )
        self.servers.append(server)

    # -- DNS

    async def serve_dns(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(lambda: _DnsProtocol(self), sock=sock)
        self.dns_transport = transport

    def _lookup(self, lookup: Lookup, addr: tuple[str, int]) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(lookup, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, lookup: Lookup, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            found = await loop.run_in_executor(None, gateway_resolves, lookup.name)
        except OSError as exc:
            self.log(f"tether isolate: DNS {lookup.name!r}: the gateway could not be asked: {exc}")
            reply = self.responder.failure(lookup)
        else:
            reply = self.responder.answer(lookup, found)
        if self.dns_transport is not None and not self.dns_transport.is_closing():
            self.dns_transport.sendto(reply, addr)

    # -- the bridge to the gateway for Python's drop-in

    async def serve_bridge(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(
            lambda: Pending(self._dial_gateway, self._bridge_failed, self.tasks), path=path
        )
        self.servers.append(server)

    def _dial_gateway(self, pending: Pending) -> Dialler:
        endpoint = self.settings.gateway

        async def dial(factory: Callable[[], Half]) -> tuple[asyncio.BaseTransport, Half]:
            loop = asyncio.get_running_loop()
            if endpoint.is_unix:
                return await loop.create_unix_connection(factory, endpoint.path)
            return await loop.create_connection(factory, endpoint.host, endpoint.port)

        return dial

    def _bridge_failed(self, pending: Pending, exc: BaseException) -> None:
        self.log(f"tether isolate: the bridge cannot reach the gateway at {self.settings.gateway}: "
                 f"{exc}")

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        if self.dns_transport is not None:
            self.dns_transport.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class _Refused(Exception):
    """The gateway refused or could not reach `target` (the cause says which)."""

    def __init__(self, target: Destination, cause: BaseException) -> None:
        super().__init__(f"{target}: {cause}")
        self.target = target
        self.cause = cause


class _DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The default loop's datagram transport is not a DatagramTransport subclass.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        out = self.agent.responder.receive(data)
        if isinstance(out, Lookup):
            self.agent._lookup(out, addr)
        elif out is not None and self.transport is not None:
            self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # a client that went away before its answer: nothing to do


def gateway_resolves(name: str) -> bool:
    """Whether the gateway's resolver gives `name` any address for this app (blocking).

    A name it does not know (or hides from this app, ``hide_denied``) is
    False; an unreachable gateway raises OSError.
    """
    try:
        return bool(tether_resolve.getaddrinfo(name, None, 0, socket.SOCK_STREAM))
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise  # a temporary failure: SERVFAIL, the program may retry
        return False
    except PermissionError:
        return False


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
