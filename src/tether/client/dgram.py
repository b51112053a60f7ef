"""Tether UDP sockets: ``socket(AF_INET|AF_INET6, SOCK_DGRAM)`` through the gateway.

The socket's fd is a real kernel UDP socket, so datagram boundaries,
``select``/``selectors``/``poll`` readiness, timeouts and non-blocking mode
are the kernel's own. It never talks to a destination directly: for each
destination ``d`` the gateway opens a relay socket ``R_d`` (see
tether.gateway.udp), and the fd sends ``d``'s datagrams to ``R_d``; the
gateway sends them on to ``d`` from its outbound socket and relays ``d``'s
replies back out of ``R_d``. What the fd cannot answer is emulated:
``recvfrom`` turns ``R_d``'s address back into ``d``'s, ``getsockname``
reports the gateway's outbound address, ``getpeername`` the connected peer.

The association (the gateway's side of this socket) is opened on first use
over a TCP stream of its own, which stays framed and carries this socket's
requests; closing the socket closes the stream and so the association.
Each new destination costs one round trip on that stream (the policy's
decision); a denied one raises PermissionError and sends nothing.
"""

from __future__ import annotations

import _socket
import errno
import socket as _socket_mod
import threading
import weakref
from typing import Any

from tether.client.control import REQUEST_TIMEOUT
from tether.client.exchange import Exchange
from tether.client.settings import NotConfiguredError, Settings, current
from tether.client.sock import (
    GATEWAY_CONNECT_TIMEOUT,
    _check_address,
    _outbound_only,
    _StdSocket,
)
from tether.client.sock import socket as _TetherSocket
from tether.client.stream import Deadline, open_stream, roundtrip
from tether.endpoint import host_port
from tether.wire import pb
from tether.wire.convert import (
    FAMILY_TO_WIRE,
    address_from_wire,
    encode_option,
    option_key,
    option_label,
)

# _StdSocket is the stdlib's class as sock.py saw it at import, before
# install() replaced socket.socket (this module is imported lazily, maybe after).
_AF_INET6 = _socket_mod.AF_INET6
_PEEK_NOW = _socket_mod.MSG_PEEK | _socket_mod.MSG_DONTWAIT

# The options a tether UDP socket takes: they act on the app's own fd (where
# its datagrams queue) and on the gateway's outbound socket.
_UDP_OPTIONS: dict[tuple[int, int], pb.OptionName.ValueType] = {
    (_socket_mod.SOL_SOCKET, _socket_mod.SO_SNDBUF): pb.SO_SNDBUF,
    (_socket_mod.SOL_SOCKET, _socket_mod.SO_RCVBUF): pb.SO_RCVBUF,
    (_socket_mod.SOL_SOCKET, _socket_mod.SO_REUSEADDR): pb.SO_REUSEADDR,
}
# Answered by the fd itself, never sent to the gateway.
_LOCAL_ONLY = {
    (_socket_mod.SOL_SOCKET, _socket_mod.SO_ERROR),
    (_socket_mod.SOL_SOCKET, _socket_mod.SO_TYPE),
}
_SUPPORTED = "SO_SNDBUF, SO_RCVBUF, SO_REUSEADDR, SO_ERROR, SO_TYPE"


class _Route:
    __slots__ = ("local", "peer", "relay")

    def __init__(self, peer: tuple[Any, ...], relay: tuple[Any, ...], local: tuple[Any, ...]):
        self.peer = peer  # the destination, as recvfrom()/getpeername() report it
        self.relay = relay  # the gateway's relay for it, as this fd addresses it
        self.local = local  # the gateway's outbound address towards it


class _Association:
    """The client side of one UDP association, shared by dup()'ed sockets."""

    def __init__(self, settings: Settings | None, family: int) -> None:
        self.settings = settings
        self.family = family
        self.lock = threading.Lock()  # one round trip on the stream at a time
        self.stream: _StdSocket | None = None
        self.exchange: Exchange | None = None
        self.descriptor = ""
        self.outbound_port = 0
        self.source_port = 0  # the fd's own port, once bound for the relays
        self.routes: dict[tuple[str, int], _Route] = {}  # (host, port) as the app gave it
        self.by_relay: dict[tuple[str, int], tuple[Any, ...]] = {}
        self.options: dict[pb.OptionName.ValueType, pb.OptionValue] = {}
        self.peer: _Route | None = None  # set by connect()
        self.lost = ""  # why the association is gone, once it is
        self.refs = 1
        self.dropped = 0  # datagrams on the fd from no relay of ours

    def release(self) -> None:
        self.refs -= 1
        if self.refs <= 0 and self.stream is not None:
            self.stream.close()  # the gateway ends the association and logs it
            self.stream = None


class DatagramSocket(_TetherSocket, sock_type=_socket_mod.SOCK_DGRAM):
    """A tether UDP socket; see the module docstring.

    ``socket(AF_INET|AF_INET6, SOCK_DGRAM)`` makes one: the class registers
    itself with the base class for SOCK_DGRAM.
    """

    __slots__ = ("_udp", "_udp_release")

    def __init__(
        self, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None
    ) -> None:
        self._tether = None  # the TCP machinery of the base class stays out of the way
        self._udp: _Association | None = None
        self._udp_release: weakref.finalize[Any, Any] | None = None
        if fileno is not None:  # dup(): the association is attached by dup()
            _StdSocket.__init__(self, family, type, proto, fileno)
            return
        family = _socket_mod.AF_INET if family == -1 else family
        if proto not in (-1, 0, _socket_mod.IPPROTO_UDP):
            raise OSError(errno.EPROTONOSUPPORT, f"tether: protocol {proto} is not UDP")
        try:
            settings: Settings | None = current()
        except NotConfiguredError:
            settings = None  # reported on first use, where a send would fail
        if settings is not None:
            _check_gateway(settings, family)
        _StdSocket.__init__(self, family, type, 0 if proto == -1 else proto)
        self._attach(_Association(settings, family))

    def _attach(self, assoc: _Association) -> None:
        self._udp = assoc
        # Closing the socket, or losing it to the garbage collector, ends
        # this holder's share of the association exactly once.
        self._udp_release = weakref.finalize(self, assoc.release)

    def _assoc(self) -> _Association:
        if self.fileno() == -1 or self._udp is None:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return self._udp

    # -- the association -----------------------------------------------------

    def _deadline(self) -> Deadline:
        timeout = self.gettimeout()
        if timeout is None:
            return Deadline(REQUEST_TIMEOUT)
        # A non-blocking socket still waits for the gateway's answer about a
        # new destination, as a non-blocking TCP connect waits for the hop.
        return Deadline(timeout if timeout > 0 else GATEWAY_CONNECT_TIMEOUT)

    def _route(self, address: Any, op: str) -> _Route:
        """The route for `address`, asking the gateway if it is new."""
        u = self._assoc()
        host, port = _check_address(self.family, address, op)
        route = u.routes.get((host, port))
        if route is not None:
            self._check_alive(u)
            return route
        with u.lock:
            route = u.routes.get((host, port))
            if route is not None:
                return route
            if u.lost:
                raise ConnectionResetError(errno.ECONNRESET, u.lost)
            deadline = self._deadline()
            if u.stream is None:
                route = self._open(u, deadline, host, port)
            else:
                request = pb.Request(allow_destination=pb.AllowDestination(host=host, port=port))
                answer = self._roundtrip(u, request, deadline).destination
                route = self._new_route(u, answer.peer, answer.relay, answer.local)
            assert route is not None
            u.routes[(host, port)] = route
            return route

    def _open(
        self, u: _Association, deadline: Deadline, host: str = "", port: int = 0
    ) -> _Route | None:
        """Open the association (with its first destination, if one is named)."""
        settings = u.settings = u.settings or current()
        _check_gateway(settings, self.family)
        stream = open_stream(settings, deadline)
        try:
            here = stream.getsockname()[0]
            if not u.source_port:
                # Bind the fd where the gateway's relays can reach it: the
                # address this host reaches the gateway from.
                _StdSocket.bind(self, self._fd_address(here, 0))
                u.source_port = _StdSocket.getsockname(self)[1]
            exchange = Exchange(settings.gateway)
            request = pb.Connect(
                transport=pb.TRANSPORT_UDP,
                family=FAMILY_TO_WIRE[self.family],
                host=host,
                port=port,
                options=list(u.options.values()),
                source=pb.Address(
                    family=FAMILY_TO_WIRE[stream.family], host=here, port=u.source_port
                ),
            )
            data = exchange.open(settings) + exchange.send(request, host_port(host, port))
            result = roundtrip(stream, exchange, data, deadline)
        except BaseException:
            stream.close()
            raise
        assert isinstance(result, pb.ConnectResult)
        u.stream, u.exchange = stream, exchange
        u.descriptor = result.descriptor
        u.outbound_port = result.local.port
        if not host and not port:
            return None
        return self._new_route(u, result.peer, result.relay, result.local)

    def _new_route(
        self, u: _Association, peer: pb.Address, relay: pb.Address, local: pb.Address
    ) -> _Route:
        relay_addr = self._fd_address(relay.host, relay.port)
        route = _Route(self._app_address(peer), relay_addr, self._app_address(local))
        u.by_relay[(relay_addr[0], relay_addr[1])] = route.peer
        return route

    def _fd_address(self, host: str, port: int) -> tuple[Any, ...]:
        """A gateway-side address as this fd (of the app's family) must name it."""
        if self.family == _AF_INET6:
            if ":" not in host:
                host = f"::ffff:{host}"  # an IPv4 gateway, reached from a dual-stack fd
            return (host, port, 0, 0)
        return (host, port)

    def _app_address(self, addr: pb.Address) -> tuple[Any, ...]:
        address = address_from_wire(addr)
        if self.family == _AF_INET6 and len(address) == 2:
            return (*address, 0, 0)
        return address

    def _roundtrip(self, u: _Association, request: pb.Request, deadline: Deadline) -> pb.Response:
        """One request on the association's stream; held u.lock. Errors become OSError."""
        assert u.stream is not None and u.exchange is not None
        exchange = u.exchange
        try:
            response = roundtrip(u.stream, exchange, exchange.send(request), deadline)
        except OSError as exc:
            if not exchange.in_step:
                # Out of step with the gateway (or cut off): the association is over.
                self._lose(u, f"tether: UDP socket lost its gateway stream: {exc}")
            raise
        assert isinstance(response, pb.Response)
        return response

    def _check_alive(self, u: _Association) -> None:
        """Raise if the gateway has ended the association (reclaimed, shut down).

        The gateway says why in an Error frame and closes the stream; a
        non-blocking peek sees it. Skipped while another thread is in a
        round trip (its answer is on the stream then).
        """
        if u.lost:
            raise ConnectionResetError(errno.ECONNRESET, u.lost)
        stream = u.stream
        if stream is None or not u.lock.acquire(blocking=False):
            return
        try:
            try:
                data = stream.recv(65536, _PEEK_NOW)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lose(u, f"tether: UDP socket lost its gateway stream: {exc}")
            else:
                self._lose(u, _why_closed(data, u))
        finally:
            u.lock.release()
        raise ConnectionResetError(errno.ECONNRESET, u.lost)

    @staticmethod
    def _lose(u: _Association, reason: str) -> None:
        u.lost = reason
        if u.stream is not None:
            u.stream.close()
            u.stream = None

    # -- sending ---------------------------------------------------------------

    def sendto(self, data: Any, *args: Any) -> int:
        if len(args) == 1:
            flags, address = 0, args[0]
        elif len(args) == 2:
            flags, address = args
        else:
            raise TypeError(f"sendto() takes 2 or 3 arguments ({len(args) + 1} given)")
        route = self._route(address, "sendto")
        return _StdSocket.sendto(self, data, flags, route.relay)

    def send(self, data: Any, flags: int = 0) -> int:
        u = self._assoc()
        if u.peer is not None:
            self._check_alive(u)
        return _StdSocket.send(self, data, flags)  # unconnected: EDESTADDRREQ, as the stdlib

    def sendall(self, data: Any, flags: int = 0) -> None:
        u = self._assoc()
        if u.peer is not None:
            self._check_alive(u)
        _StdSocket.sendall(self, data, flags)

    def sendmsg(self, *args: Any) -> int:
        raise OSError(errno.EOPNOTSUPP, "tether: sendmsg() is not supported on UDP sockets")

    # -- connecting ------------------------------------------------------------

    def connect(self, address: Any) -> None:
        u = self._assoc()
        route = self._route(address, "connect")
        # Only the relay can reach a connected fd: the kernel drops the rest.
        _StdSocket.connect(self, route.relay)
        u.peer = route

    def connect_ex(self, address: Any) -> int:
        try:
            self.connect(address)
        except _socket_mod.gaierror:
            raise
        except TimeoutError:
            return errno.EAGAIN
        except OSError as exc:
            if exc.errno is None:
                raise
            return exc.errno
        return 0

    # -- receiving -------------------------------------------------------------

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        u = self._assoc()
        while True:
            data, source = _StdSocket.recvfrom(self, bufsize, flags)
            peer = u.by_relay.get((source[0], source[1]))
            if peer is not None:
                return data, peer
            self._drop(u, flags)

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        u = self._assoc()
        while True:
            n, source = _StdSocket.recvfrom_into(self, buffer, nbytes, flags)
            peer = u.by_relay.get((source[0], source[1]))
            if peer is not None:
                return n, peer
            self._drop(u, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._assoc().peer is not None:
            return _StdSocket.recv(self, bufsize, flags)  # connected: the kernel filters
        return self.recvfrom(bufsize, flags)[0]

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self._assoc().peer is not None:
            return _StdSocket.recv_into(self, buffer, nbytes, flags)
        return self.recvfrom_into(buffer, nbytes, flags)[0]

    def _drop(self, u: _Association, flags: int) -> None:
        """A datagram from no relay of ours (another local process): not the app's."""
        u.dropped += 1
        if flags & _socket_mod.MSG_PEEK:
            # Peeking leaves it queued: take it off, or the next peek sees it again.
            _StdSocket.recv(self, 1, (flags & ~_socket_mod.MSG_PEEK) | _socket_mod.MSG_DONTWAIT)

    def recvmsg(self, *args: Any) -> Any:
        raise OSError(errno.EOPNOTSUPP, "tether: recvmsg() is not supported on UDP sockets")

    def recvmsg_into(self, *args: Any) -> Any:
        raise OSError(errno.EOPNOTSUPP, "tether: recvmsg_into() is not supported on UDP sockets")

    # -- addresses -------------------------------------------------------------

    def getsockname(self) -> Any:
        u = self._assoc()
        if u.peer is not None:
            return u.peer.local  # the gateway's address towards the peer
        host = "::" if self.family == _AF_INET6 else "0.0.0.0"
        return self._app_address(pb.Address(
            family=FAMILY_TO_WIRE[self.family], host=host, port=u.outbound_port))

    def getpeername(self) -> Any:
        u = self._assoc()
        if u.peer is None:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return u.peer.peer

    def bind(self, address: Any) -> None:
        u = self._assoc()
        host, port = _check_address(self.family, address, "bind")
        if host not in ("", "0.0.0.0", "::") or port != 0:
            raise OSError(
                errno.EACCES,
                f"tether: sockets are outbound only; bind to {host or '*'}:{port} is not "
                "allowed (only ('', 0), meaning any address and port)",
            )
        with u.lock:
            if u.stream is None and not u.lost:
                # "Any address, any port": open now, so getsockname() has the port.
                self._open(u, self._deadline())

    def listen(self, backlog: int = 0, /) -> None:
        raise _outbound_only("listen()")

    def accept(self) -> tuple[_StdSocket, Any]:
        raise _outbound_only("accept()")

    # -- options ---------------------------------------------------------------

    def setsockopt(
        self, level: int, optname: int, value: Any, optlen: int | None = None, /
    ) -> None:
        u = self._assoc()
        if type(level) is not int or type(optname) is not int:
            level, optname = option_key(level, optname)  # 1.0 would find SOL_SOCKET's
        name = _UDP_OPTIONS.get((level, optname))
        if name is None:
            raise _unsupported(*option_key(level, optname))
        # The fd takes the option first: the stdlib and the kernel check the
        # value exactly as for any UDP socket (encode_option then agrees).
        if optlen is None:
            _StdSocket.setsockopt(self, level, optname, value)
        else:
            _StdSocket.setsockopt(self, level, optname, value, optlen)
        encoded = encode_option(name, value)
        u.options[name] = encoded
        with u.lock:
            if u.stream is not None:
                option = pb.SetOption(descriptor=u.descriptor, value=encoded)
                self._roundtrip(u, pb.Request(set_option=option), self._deadline())

    def getsockopt(self, level: int, optname: int, buflen: int | None = None, /) -> Any:
        self._assoc()
        if type(level) is not int or type(optname) is not int:
            level, optname = option_key(level, optname)
        if (level, optname) not in _UDP_OPTIONS and (level, optname) not in _LOCAL_ONLY:
            raise _unsupported(*option_key(level, optname))
        if buflen is None:
            return _StdSocket.getsockopt(self, level, optname)
        return _StdSocket.getsockopt(self, level, optname, buflen)

    def _udp_keepalive(self) -> None:
        """tether.keepalive(): reset the association's idle clock (one round trip)."""
        u = self._assoc()
        with u.lock:
            if u.lost:
                raise ConnectionResetError(errno.ECONNRESET, u.lost)
            if u.stream is None:
                raise OSError(errno.ENOTCONN, "tether: keepalive() on a UDP socket never used")
            touch = pb.Touch(descriptor=u.descriptor)
            self._roundtrip(u, pb.Request(touch=touch), self._deadline())

    # -- copies and closing ----------------------------------------------------

    def dup(self) -> DatagramSocket:
        u = self._assoc()
        sock = _StdSocket.dup(self)
        assert isinstance(sock, DatagramSocket)
        u.refs += 1
        sock._attach(u)
        return sock

    def detach(self) -> int:
        self._release()
        return _StdSocket.detach(self)

    def _real_close(self, _ss: Any = _socket.socket) -> None:
        self._release()
        _ss.close(self)

    def _release(self) -> None:
        if self._udp_release is not None:
            self._udp_release()  # runs assoc.release() once
        self._udp = None

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "tether: UDP sockets cannot be handed off (pickled) to another process; "
            "open a new socket there"
        )


# -- for event-loop drivers (tether.aio.datagram) -------------------------------


def known_destination(sock: DatagramSocket, address: Any) -> tuple[tuple[str, int], bool]:
    """`address` as `sock` keys its destinations, and whether sendto() to it sends at once.

    At once means without a round trip to the gateway (nor waiting for
    another thread's): the destination was decided before. Otherwise
    sendto() waits for the gateway's decision, which an event loop must not
    do on its own thread: it calls decide() off the loop. Raises what
    sendto() raises for a malformed address.
    """
    key = _check_address(sock.family, address, "sendto")
    return key, key in sock._assoc().routes


def decide(sock: DatagramSocket, address: Any) -> None:
    """Have the gateway decide `address` as a first sendto() would, sending nothing (blocking).

    Raises what that sendto() would: tether.PolicyDenied for a denied
    destination, ConnectionResetError once the association is lost.
    """
    sock._route(address, "sendto")


def _check_gateway(settings: Settings, family: int) -> None:
    """Refuse early, and clearly, a gateway that cannot carry this socket's datagrams."""
    endpoint = settings.gateway
    if endpoint.is_unix:
        raise OSError(
            errno.EPROTONOSUPPORT,
            f"tether: UDP needs the gateway on an IP address (host:port); this process "
            f"reaches it at {endpoint}, a Unix socket, which cannot carry datagrams",
        )
    if family == _socket_mod.AF_INET and endpoint.family == _AF_INET6:
        raise OSError(
            errno.EAFNOSUPPORT,
            f"tether: an AF_INET UDP socket needs the gateway on an IPv4 address; "
            f"it is at {endpoint} (use AF_INET6, or a gateway address such as 127.0.0.1)",
        )


def _why_closed(data: bytes, u: _Association) -> str:
    """The gateway's reason for ending the association, from what it sent last.

    That is an Error frame (reclaimed, shutting down) before it closed the
    stream; the exchange words it as every other gateway error.
    """
    if data and u.exchange is not None:
        try:
            u.exchange.receive(data)
        except OSError as exc:
            return exc.strerror or str(exc)
    return f"tether: UDP socket {u.descriptor[:8]}... was closed by the gateway"


def _unsupported(level: int, optname: int) -> OSError:
    if (level, optname) == (_socket_mod.SOL_SOCKET, _socket_mod.SO_BROADCAST):
        return OSError(
            errno.ENOPROTOOPT,
            "tether: SO_BROADCAST is not supported: UDP through tether reaches single "
            "destinations the policy allows, never a broadcast address",
        )
    return OSError(
        errno.ENOPROTOOPT,
        f"tether: socket option {option_label(level, optname)} is not supported on a UDP "
        f"socket (supported: {_SUPPORTED})",
    )


__all__ = ["DatagramSocket", "decide", "known_destination"]
