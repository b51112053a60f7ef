"""The tether socket: a stdlib ``socket.socket`` whose fd is a gateway stream.

An AF_INET/AF_INET6 SOCK_STREAM socket owns a real kernel socket from the
moment it is created. ``connect()`` connects that same fd to the gateway,
sends the hello and the Connect request, and reads the answer; from then on
the fd carries exactly the remote byte stream, so send/recv, select,
selectors, poll, makefile, sendfile and ssl work on it natively, at kernel
speed, with the stdlib's own timeout semantics. What the fd cannot answer
for itself is emulated: connect, getpeername (the real target),
getsockname (the gateway's outbound address), the supported socket options,
and the refusal of listen/accept/bind.

The frames in front of the stream (hello, Connect or Resume, the answer,
the gateway's errors) are tether.client.exchange's, which decides without
I/O; this class drives it on its own fd (stream.read_answer). Its state is
a `State`; handing off and resuming are its own steps (_hand_off, _resume).

Other families (AF_UNIX, socketpair()) and sockets built on an existing fd
behave exactly as the stdlib's: every override hands them straight to the
base class.
"""

from __future__ import annotations

import _socket
import errno
import io
import ipaddress
import operator
import os
import socket as _socket_mod
import sys
import threading
import weakref
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Final

from tether.client import control
from tether.client.errors import unreachable
from tether.client.exchange import Exchange
from tether.client.settings import Settings, current
from tether.client.stream import (
    Deadline,
    connect_fd,
    read_answer,
    readable,
    send_now,
)
from tether.endpoint import host_port
from tether.wire import pb
from tether.wire.convert import (
    FAMILY_TO_WIRE,
    OPTION_LEVELS,
    OPTIONS,
    address_from_wire,
    decode_option,
    encode_option,
    option_key,
    option_label,
)

_StdSocket = _socket_mod.socket
# makefile("rwb") objects of tether sockets, for handoff.dumps().
RW_PAIRS: weakref.WeakKeyDictionary[io.BufferedRWPair, socket] = weakref.WeakKeyDictionary()
_AF_INET = _socket_mod.AF_INET
_AF_INET6 = _socket_mod.AF_INET6
_SOCK_STREAM = _socket_mod.SOCK_STREAM
_SOCK_DGRAM = _socket_mod.SOCK_DGRAM
_IPPROTO_TCP = _socket_mod.IPPROTO_TCP
_TCP_NODELAY = _socket_mod.TCP_NODELAY
# The C-level family as a plain int: socket.py's `family` property turns it
# into an AddressFamily member (an enum call) on every read.
_family_of = _socket.socket.family.__get__
_TYPE_MASK = ~(getattr(_socket_mod, "SOCK_NONBLOCK", 0) | getattr(_socket_mod, "SOCK_CLOEXEC", 0))

# How long a non-blocking connect may keep the app waiting in
# getsockopt(SO_ERROR) when it asks before the gateway has answered: the
# gateway's own connect timeout (30 s default) plus slack for the hop.
PENDING_CONNECT_LIMIT = 35.0
# Connecting to the gateway itself (a loopback or LAN hop) inside a
# non-blocking connect(): it is done before returning EINPROGRESS.
GATEWAY_CONNECT_TIMEOUT = 10.0

# Tombstone reasons that explain a reset to the app (sock._explain): an idle
# reclaim, a revocation, a daily quota (gateway/relay.py, Link.over_quota),
# the gateway shutting down.
_EXPLAINED = (
    "reclaimed", "revoked", "closed by its quota", "gateway shutting down",
    "closed when the gateway drained",
)

# getsockopt()'s largest buflen: CPython's sock_getsockopt refuses more.
_MAX_BUFLEN = 1024

_SUPPORTED = ", ".join(
    sorted(
        {
            "SO_KEEPALIVE",
            "SO_DEBUG",
            "TCP_NODELAY",
            "SO_LINGER",
            "SO_OOBINLINE",
            "SO_SNDBUF",
            "SO_RCVBUF",
            "SO_REUSEADDR",
            "SO_ERROR",
            "SO_TYPE",
            "TCP_KEEPIDLE",
            "TCP_KEEPINTVL",
            "TCP_KEEPCNT",
        }
    )
)


# Detaching waits for the gateway's EOF behind at most a socket buffer or
# two of data on loopback or a LAN; resuming is one round trip. Both are
# bounded so a vanished gateway cannot hang a pickle.dumps() forever.
HANDOFF_TIMEOUT = 30.0
RECV_CHUNK = 256 * 1024


class State(StrEnum):
    """Where a tether TCP socket is in its life (`_Tether.state`).

    NEW         made, or its last connect failed (SO_ERROR, the exception
                raised, says why); connect() may be called.
                -> CONNECTING: a blocking connect() sent its request
                -> PENDING: a non-blocking connect() sent its request and
                   returned EINPROGRESS
    PENDING     the answer is read when the app next touches the socket
                (getsockopt(SO_ERROR), recv, send, getpeername, connect).
                -> CONNECTED, or NEW with SO_ERROR set
    CONNECTING  a thread holds the socket's lock and reads the answer (a
                blocking connect(), or socket._resume() on a new socket).
                -> CONNECTED, or NEW with the exception raised
    CONNECTED   the fd carries the remote byte stream.
                -> HANDED_OFF: pickled (socket._hand_off()), with every dup()
    HANDED_OFF  moved to another process: every call raises EBADF. Final.

    A NEW socket that binds or connects to a loopback listener of this
    process leaves tether out: it becomes a plain kernel socket
    (`socket._tether` is None).
    """

    NEW = "new"
    PENDING = "pending"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    HANDED_OFF = "handed-off"


# As module names: the state is tested on every call of a socket, and a
# module global is one lookup where State.X is two.
_NEW: Final = State.NEW
_PENDING: Final = State.PENDING
_CONNECTING: Final = State.CONNECTING
_CONNECTED: Final = State.CONNECTED
_HANDED_OFF: Final = State.HANDED_OFF


@dataclass(frozen=True)
class HandoffState:
    """What a pickled tether socket carries (no secret: the resumer authenticates)."""

    descriptor: str
    token: str
    family: int
    type: int
    proto: int
    timeout: float | None
    peer: tuple[Any, ...]
    local: tuple[Any, ...]
    options: tuple[bytes, ...] = ()  # serialized OptionValue messages
    tail: bytes = field(default=b"", repr=False)
    origin: str = ""  # the gateway it was detached from, for messages
    # In a cluster: the node holding the socket and the cluster's signature
    # (Handoff.node/.signature), sent back in the Resume so any node can route it.
    node: str = ""
    signature: bytes = field(default=b"", repr=False)

    def resume_request(self) -> pb.Resume:
        """The Resume that re-attaches this socket (blocking and asyncio resumes alike)."""
        return pb.Resume(
            descriptor=self.descriptor, token=self.token, tail_length=len(self.tail),
            node=self.node, signature=self.signature,
        )


class _Tether:
    """Per-socket state of a tether TCP socket."""

    __slots__ = (
        "__weakref__",
        "bound",
        "deadline",
        "descriptor",
        "error",
        "exc",
        "exchange",
        "group",
        "late_options",
        "local",
        "lock",
        "options",
        "peer",
        "prefix",
        "real_family",
        "settings",
        "state",
    )

    def __init__(self, settings: Settings | None) -> None:
        self.settings = settings
        # The gateway stream's exchange, once the fd is connected to the gateway.
        self.exchange: Exchange | None = None
        self.state = _NEW  # see State
        # dup() copies of this socket (weak), made at the first dup(): when one
        # is handed off, every copy is (their fds all lead to the detached stream).
        self.group: list[weakref.ref[_Tether]] | None = None
        self.descriptor = ""
        self.peer: tuple[Any, ...] | None = None
        self.local: tuple[Any, ...] | None = None
        self.options: dict[pb.OptionName.ValueType, pb.OptionValue] = {}
        # Options set while the Connect was already on its way: applied at the
        # gateway as soon as the connect completes.
        self.late_options: set[pb.OptionName.ValueType] = set()
        self.error = 0  # SO_ERROR
        self.exc: OSError | None = None  # the full exception behind `error`
        self.real_family = settings.gateway.family if settings else _AF_INET
        # Held while a thread reads the gateway's answer to a connect, so a
        # recv() from another thread waits (as the stdlib's does) instead of
        # reading the same frames. dup() copies share it.
        self.lock = threading.Lock()
        self.deadline: Deadline | None = None
        self.bound = False
        # Bytes the app had already taken from the fd into a buffered reader
        # when it handed the socket off; they travel ahead of the kernel tail.
        self.prefix = b""

    def copy(self) -> _Tether:
        other = _Tether(self.settings)
        for name in self.__slots__:
            if name != "__weakref__":
                setattr(other, name, getattr(self, name))
        other.options = dict(self.options)  # the lock stays shared: same stream
        other.late_options = set(self.late_options)
        if self.group is None:
            self.group = [weakref.ref(self)]
        other.group = self.group
        self.group.append(weakref.ref(other))
        return other

    def handoff_state(
        self, sock: _StdSocket, handoff: pb.Handoff, timeout: float | None, tail: bytes
    ) -> HandoffState:
        """What the pickle of `sock` (this state's socket, detached with `handoff`) carries."""
        return HandoffState(
            descriptor=self.descriptor,
            token=handoff.token,
            node=handoff.node,
            signature=handoff.signature,
            family=int(sock.family),
            type=int(sock.type),
            proto=int(sock.proto),
            timeout=timeout,
            peer=tuple(self.peer or ()),
            local=tuple(self.local or ()),
            options=tuple(v.SerializeToString() for v in self.options.values()),
            tail=tail,
            origin=str(self.settings.gateway if self.settings else ""),
        )

    def restore_options(self, serialized: tuple[bytes, ...]) -> None:
        """The options a handed-off socket carried (HandoffState.options), kept as set."""
        for raw in serialized:
            value = pb.OptionValue()
            value.ParseFromString(raw)
            self.options[value.name] = value

    def mark_handed_off(self) -> None:
        """This socket and every dup() of it now refuse all calls ("handed off")."""
        members = [ref() for ref in self.group] if self.group is not None else [self]
        for member in members:
            if member is not None:
                member.state = _HANDED_OFF


def _refuse_if_handed_off(t: _Tether | None) -> None:
    if t is not None and t.state is _HANDED_OFF:
        raise OSError(
            errno.EBADF, "tether: this socket was handed off (pickled); use the unpickled copy"
        )


def _outbound_only(what: str) -> OSError:
    return OSError(
        errno.EOPNOTSUPP, f"tether: sockets are outbound only; {what} is not supported"
    )


class socket(_StdSocket):
    """A drop-in ``socket.socket``; see the module docstring."""

    # The stdlib class has __slots__; ours adds one for the tether state.
    __slots__ = ("_tether",)
    # The class a new AF_INET/AF_INET6 socket of a type other than
    # SOCK_STREAM is made as: a subclass registers itself for its type
    # (class DatagramSocket(socket, sock_type=SOCK_DGRAM) in client/dgram.py,
    # which tether imports at start), so this module never imports it.
    _by_type: ClassVar[dict[int, type[socket]]] = {}

    def __init_subclass__(cls, *, sock_type: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if sock_type is not None:
            socket._by_type[sock_type] = cls

    def __new__(cls, family: int = -1, type: int = -1, *args: Any, **kwargs: Any) -> socket:
        if (
            type != -1
            and type & _TYPE_MASK != _SOCK_STREAM  # first: a TCP socket() pays only this
            and cls is socket
            and family in (-1, _AF_INET, _AF_INET6)
            and (args[1] if len(args) >= 2 else kwargs.get("fileno")) is None
        ):
            kind = socket._by_type.get(type & _TYPE_MASK)
            if kind is not None:
                return super().__new__(kind)
        return super().__new__(cls)

    def __init__(
        self,
        family: int = -1,
        type: int = -1,
        proto: int = -1,
        fileno: int | None = None,
    ) -> None:
        self._tether: _Tether | None = None
        if fileno is not None:
            super().__init__(family, type, proto, fileno)
            return
        if family == -1:
            family = _AF_INET
        if type == -1:
            type = _SOCK_STREAM
        if proto == -1:
            proto = 0
        if family not in (_AF_INET, _AF_INET6):
            super().__init__(family, type, proto)
            return
        kind = type & _TYPE_MASK
        if kind != _SOCK_STREAM:
            raise OSError(
                errno.EPROTONOSUPPORT,
                f"tether: only TCP (SOCK_STREAM) and UDP sockets are offered, not type {type}",
            )
        if proto not in (0, _socket_mod.IPPROTO_TCP):
            raise OSError(errno.EPROTONOSUPPORT, f"tether: protocol {proto} is not TCP")
        try:
            settings: Settings | None = current()
        except ConnectionError:
            settings = None  # reported at connect(), where the stdlib would fail
        gw_family = settings.gateway.family if settings else _AF_INET
        if gw_family == family:
            # The kernel socket that will become the stream to the gateway is
            # of the app's own family: create it directly (wrapping an fd costs
            # CPython a getsockname() to validate it, and a socket.py object).
            super().__init__(family, type, proto)
        else:
            # The real kernel socket that will become the stream to the gateway.
            real = _StdSocket(gw_family, type)
            super().__init__(family, type, proto, real.detach())
        self._tether = _Tether(settings)

    # -- connect ---------------------------------------------------------------

    def connect(self, address: Any) -> None:
        t = self._tether
        if t is not None and _local_listeners and _is_local_listener(address) and t.state is _NEW:
            self._make_local(t)  # a listener of this process: no gateway involved
            t = None
        if t is None:
            super().connect(address)
            return
        with t.lock:
            self._connect(t, address)

    def connect_ex(self, address: Any) -> int:
        t = self._tether
        if t is not None and _local_listeners and _is_local_listener(address) and t.state is _NEW:
            self._make_local(t)
            t = None
        if t is None:
            return super().connect_ex(address)
        try:
            with t.lock:
                self._connect(t, address)
        except _socket_mod.gaierror:
            raise
        except TimeoutError:
            return errno.EAGAIN  # what the stdlib's connect_ex gives on a timeout
        except OSError as exc:
            if exc.errno is None:
                raise
            return exc.errno
        return 0

    def _connect(self, t: _Tether, address: Any) -> None:
        state = t.state
        if state is _HANDED_OFF or self.fileno() == -1:
            self._check_open()  # raises
        family = _family_of(self)
        host, port = _check_address(family, address, "connect")
        if state is not _NEW:
            if state is _CONNECTED:
                raise OSError(errno.EISCONN, "Transport endpoint is already connected")
            if state is _PENDING or state is _CONNECTING:
                if not self._finish_pending(t, block=False):
                    raise BlockingIOError(errno.EALREADY, "Operation already in progress")
                if t.state is _CONNECTED:
                    raise OSError(errno.EISCONN, "Transport endpoint is already connected")
        settings = t.settings
        if settings is None:
            settings = t.settings = current()  # raises NotConfiguredError
        timeout = self.gettimeout()
        nonblocking = timeout == 0.0
        deadline = Deadline(GATEWAY_CONNECT_TIMEOUT if nonblocking else timeout)
        exchange = t.exchange
        if exchange is None:
            # A blocking connect's deadline is the socket's own timeout, so the
            # gateway hop can be connected on the socket itself.
            self._open_gateway(settings, deadline, own_timeout=not nonblocking)
            exchange = t.exchange = Exchange(settings.gateway)
            first = exchange.open(settings)
        else:
            first = b""  # a stream left framed by a refused connect: try again on it
        request = pb.Connect(
            transport=pb.TRANSPORT_TCP,
            family=FAMILY_TO_WIRE[family],
            host=host,
            port=port,
            timeout=0.0 if timeout is None or nonblocking else timeout,
            options=list(t.options.values()),
        )
        # Set before the request leaves: once it has, the target may accept
        # and another thread may already call recv() on this socket.
        t.state = _PENDING if nonblocking else _CONNECTING
        try:
            send_now(self, first + exchange.send(request, host_port(host, port)), deadline)
        except TimeoutError:
            self._reset_stream(t)
            raise
        except OSError as exc:
            self._reset_stream(t)
            raise unreachable(settings.gateway, exc) from exc
        if nonblocking:
            t.deadline = Deadline(PENDING_CONNECT_LIMIT)
            raise BlockingIOError(errno.EINPROGRESS, "Operation now in progress")
        t.deadline = deadline  # a blocking connect, answered below under t.lock
        self._await_result(t, deadline)

    def _open_gateway(
        self, settings: Settings, deadline: Deadline, *, own_timeout: bool = False
    ) -> None:
        """Connect the fd to the gateway before `deadline`.

        own_timeout: the deadline was just made from this socket's timeout
        (a blocking connect), so the socket's own connect() keeps it.
        """
        t = self._tether
        assert t is not None
        endpoint = settings.gateway
        if endpoint.family != t.real_family:
            self._reset_stream(t)  # configured after this socket was created
        try:
            if own_timeout and endpoint.family == _family_of(self):
                # No second socket object on the fd, so no getsockname() and no
                # settimeout() ioctl; the fd's blocking mode stays the socket's.
                _socket.socket.connect(self, endpoint.sockaddr)
                if not endpoint.is_unix:
                    _socket.socket.setsockopt(self, _IPPROTO_TCP, _TCP_NODELAY, 1)  # see connect_fd
            else:
                connect_fd(self.fileno(), settings, deadline)
        except TimeoutError:
            raise
        except OSError as exc:
            self._reset_stream(self._tether)
            raise unreachable(settings.gateway, exc) from exc

    def _reset_stream(self, t: _Tether | None) -> None:
        """Replace the fd's kernel socket with a fresh one (same fd number)."""
        if t is None or self.fileno() == -1:
            return
        settings = t.settings
        family = settings.gateway.family if settings else _AF_INET
        fresh = _StdSocket(family, _SOCK_STREAM)
        t.real_family = family
        try:
            os.dup2(fresh.fileno(), self.fileno(), inheritable=False)
        finally:
            fresh.close()
        _StdSocket.settimeout(self, self.gettimeout())
        t.exchange = None
        t.state = _NEW

    def _await_result(self, t: _Tether, deadline: Deadline) -> None:
        """Read the answer to the connect (or resume) on the fd: CONNECTED, or raise.

        On a failure the socket is NEW again; its stream is kept only if the
        gateway refused the connect and the stream is framed again, and
        replaced by a fresh kernel socket otherwise (a timeout, a refused
        hello or resume, a broken stream).
        """
        exchange = t.exchange
        assert exchange is not None
        try:
            result = read_answer(self, exchange, deadline)
        except OSError:
            self._answer_failed(t, exchange)
            raise
        self._take_result(t, result)

    def _answer_failed(self, t: _Tether, exchange: Exchange) -> None:
        """After a failed connect or resume: NEW, on the same stream only if it is framed again."""
        if exchange.in_step:
            t.state = _NEW
        else:
            self._reset_stream(t)

    def _take_result(self, t: _Tether, result: Any) -> None:
        """The gateway's ConnectResult for this socket: CONNECTED (tether.aio reads it too)."""
        assert isinstance(result, pb.ConnectResult)
        t.state = _CONNECTED
        t.descriptor = result.descriptor
        if t.late_options:
            for name in sorted(t.late_options):
                _control(t, pb.Request(set_option=pb.SetOption(
                    descriptor=t.descriptor, value=t.options[name])))
            t.late_options.clear()
        t.peer = address_from_wire(result.peer)
        t.local = address_from_wire(result.local)
        if _family_of(self) == _AF_INET6 and len(t.peer) == 2:
            t.peer = (*t.peer, 0, 0)
            t.local = (*t.local, 0, 0)

    @staticmethod
    def _take_error(t: _Tether) -> OSError:
        """The pending connect error as an exception; clears it (like SO_ERROR)."""
        error = t.exc or OSError(t.error, os.strerror(t.error))
        t.error, t.exc = 0, None
        return error

    def _finish_pending(self, t: _Tether, *, block: bool) -> bool:
        """Complete a non-blocking connect if its answer is here (or wait for it).

        A failure is kept for SO_ERROR (and raised by the next call that
        needs the connection), as the kernel keeps a failed connect's.
        """
        if t.state is not _PENDING:
            return True
        if not block and not readable(self.fileno()):
            return False
        if not t.lock.acquire(blocking=block):
            return False  # another thread is reading the answer right now
        try:
            if t.state is not _PENDING:
                return True
            assert t.deadline is not None
            try:
                self._await_result(t, t.deadline)
            except TimeoutError:
                t.error, t.exc = errno.ETIMEDOUT, None  # the kernel's own words for it
            except OSError as exc:
                t.error = exc.errno if isinstance(exc.errno, int) and exc.errno else errno.EIO
                t.exc = exc
            return True
        finally:
            t.lock.release()

    # -- reads and writes while a non-blocking connect is pending ---------------

    def _pending_guard(self) -> None:
        t = self._tether
        _refuse_if_handed_off(t)
        if t is not None and t.state is _CONNECTING:
            # Another thread is in a blocking connect(): a blocking call waits
            # for it, as the stdlib's would; a non-blocking one does not.
            timeout = self.gettimeout()
            if timeout == 0.0:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            if not t.lock.acquire(timeout=-1 if timeout is None else timeout):
                raise TimeoutError("timed out")
            t.lock.release()
        if t is not None and t.state is _PENDING:
            # A blocking call waits for the connect to finish, as on Linux;
            # a non-blocking one only takes the answer if it is already here.
            blocking = self.gettimeout() != 0.0
            if not self._finish_pending(t, block=blocking):
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        if t is not None and t.state is not _CONNECTED:
            if t.error:
                raise self._take_error(t)
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        t = self._tether
        if t is not None and t.state is not _CONNECTED:
            self._pending_guard()
        try:
            return super().recv(bufsize, flags)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise self._explain(exc) from None

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        t = self._tether
        if t is not None and t.state is not _CONNECTED:
            self._pending_guard()
        try:
            return super().recv_into(buffer, nbytes, flags)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise self._explain(exc) from None

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        t = self._tether
        if t is not None:
            if t.state is not _CONNECTED:
                self._pending_guard()
            return super().recv(bufsize, flags), None
        return super().recvfrom(bufsize, flags)

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        t = self._tether
        if t is not None:
            if t.state is not _CONNECTED:
                self._pending_guard()
            return super().recv_into(buffer, nbytes, flags), None
        return super().recvfrom_into(buffer, nbytes, flags)

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> Any:
        t = self._tether
        if t is not None and t.state is not _CONNECTED:
            self._pending_guard()
        data, anc, msg_flags, addr = super().recvmsg(bufsize, ancbufsize, flags)
        return (data, anc, msg_flags, None if t is not None else addr)

    def recvmsg_into(self, buffers: Any, ancbufsize: int = 0, flags: int = 0) -> Any:
        t = self._tether
        if t is not None and t.state is not _CONNECTED:
            self._pending_guard()
        n, anc, msg_flags, addr = super().recvmsg_into(buffers, ancbufsize, flags)
        return (n, anc, msg_flags, None if t is not None else addr)

    def send(self, data: Any, flags: int = 0) -> int:
        t = self._tether
        if t is not None and t.state is not _CONNECTED:
            self._pending_guard()
        try:
            return super().send(data, flags)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise self._explain(exc) from None

    def sendall(self, data: Any, flags: int = 0) -> None:
        t = self._tether
        if t is not None and t.state is not _CONNECTED:
            self._pending_guard()
        try:
            super().sendall(data, flags)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise self._explain(exc) from None

    def sendto(self, data: Any, *args: Any) -> int:
        t = self._tether
        if t is None:
            return super().sendto(data, *args)
        if t.state is not _CONNECTED:
            self._pending_guard()
        # A connected TCP socket ignores the address, as Linux does.
        flags = args[0] if len(args) == 2 else 0
        return super().send(data, flags)

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Any = None) -> int:
        t = self._tether
        if t is None:
            if address is None:
                return super().sendmsg(buffers, ancdata, flags)
            return super().sendmsg(buffers, ancdata, flags, address)
        if t.state is not _CONNECTED:
            self._pending_guard()
        return super().sendmsg(buffers, ancdata, flags)

    # -- addresses -------------------------------------------------------------

    def getpeername(self) -> Any:
        t = self._tether
        if t is None:
            return super().getpeername()
        self._check_open()
        if t.state is _PENDING:
            self._finish_pending(t, block=False)
        if t.state is not _CONNECTED or t.peer is None:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return t.peer

    def getsockname(self) -> Any:
        t = self._tether
        if t is None:
            return super().getsockname()
        self._check_open()
        if t.state is _CONNECTED and t.local is not None:
            return t.local
        if self.family == _AF_INET6:
            return ("::", 0, 0, 0)
        return ("0.0.0.0", 0)

    def _check_open(self) -> None:
        _refuse_if_handed_off(self._tether)
        if self.fileno() == -1:
            raise OSError(errno.EBADF, "Bad file descriptor")

    # -- outbound only -----------------------------------------------------------

    def bind(self, address: Any) -> None:
        t = self._tether
        if t is None:
            super().bind(address)
            return
        host, port = _check_address(self.family, address, "bind")
        if host in ("", "0.0.0.0", "::") and port == 0:
            t.bound = True  # "any address, any port": what connect() does anyway
            return
        if _is_loopback(host) and t.state is _NEW:
            # A socket on this host's loopback never reaches the gateway: it
            # is for in-process plumbing such as the wake-up socket pairs
            # pika and paho-mqtt build with bind/listen/connect.
            self._make_local(t)
            super().bind(address)
            _add_local_listener(self.getsockname()[:2], self)
            return
        raise OSError(
            errno.EACCES,
            f"tether: sockets are outbound only; bind to {host or '*'}:{port} is not allowed "
            "(only ('', 0), meaning any address and port, or a loopback address for a "
            "socket local to this host)",
        )

    def _make_local(self, t: _Tether) -> None:
        """Turn this (unused) tether socket into a plain kernel socket of its family."""
        if t.real_family != self.family:
            fresh = _StdSocket(self.family, _SOCK_STREAM)
            try:
                os.dup2(fresh.fileno(), self.fileno(), inheritable=False)
            finally:
                fresh.close()
            _StdSocket.settimeout(self, self.gettimeout())
        for name, value in t.options.items():
            level, optname = OPTION_LEVELS[name]
            decoded = decode_option(value, 8 if name == pb.SO_LINGER else None)
            _StdSocket.setsockopt(self, level, optname, decoded)
        self._tether = None

    def listen(self, backlog: int = 0, /) -> None:
        if self._tether is None:
            super().listen(backlog)
            return
        raise _outbound_only("listen()")

    def accept(self) -> tuple[_StdSocket, Any]:
        if self._tether is None:
            return super().accept()
        raise _outbound_only("accept()")

    def shutdown(self, how: int, /) -> None:
        t = self._tether
        if t is not None and t.state is not _CONNECTED:
            self._pending_guard()
        super().shutdown(how)

    # -- options -------------------------------------------------------------------

    def setsockopt(
        self, level: int, optname: int, value: Any, optlen: int | None = None, /
    ) -> None:
        t = self._tether
        if t is None:
            if optlen is None:
                super().setsockopt(level, optname, value)
            else:
                super().setsockopt(level, optname, value, optlen)
            return
        if t.state is _HANDED_OFF or self.fileno() == -1:
            self._check_open()  # raises
        set_option(t, level, optname, value, optlen)

    def getsockopt(self, level: int, optname: int, buflen: int | None = None, /) -> Any:
        t = self._tether
        if t is None:
            if buflen is None:
                return super().getsockopt(level, optname)
            return super().getsockopt(level, optname, buflen)
        self._check_open()
        is_so_error = (level, optname) == (_socket_mod.SOL_SOCKET, _socket_mod.SO_ERROR)
        if is_so_error and t.state is _PENDING:
            # The app saw the fd writable and asks how the connect went: wait for it.
            self._finish_pending(t, block=True)
        return get_option(t, int(self.type), level, optname, buflen)

    # -- copies ----------------------------------------------------------------

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        f = super().makefile(  # type: ignore[call-overload]
            mode, buffering, encoding=encoding, errors=errors, newline=newline
        )
        if self._tether is not None and isinstance(f, io.BufferedRWPair):
            # A pair does not expose its SocketIO; handoff.dumps() finds the socket here.
            RW_PAIRS[f] = self
        return f

    def dup(self) -> socket:
        sock = super().dup()
        assert isinstance(sock, socket)
        if self._tether is not None:
            sock._tether = self._tether.copy()
        return sock

    def _explain(self, exc: OSError) -> OSError:
        """A reset from the gateway's side: ask it why, and say so.

        Reclaimed when idle, revoked (the app was removed from the gateway's
        config, or its key changed: the gateway then refuses the question
        itself with that reason), closed at a daily quota (docs/quotas.md),
        or the gateway shutting down.
        """
        t = self._tether
        if t is None or not t.descriptor or t.settings is None:
            return exc
        peer = t.peer or ("?", 0)
        try:
            response = control.channel(t.settings).request(
                pb.Request(close_reason=pb.CloseReason(descriptor=t.descriptor)), timeout=2.0
            )
        except PermissionError as refused:
            # This app's key is no longer accepted: the refusal says why.
            why = str(refused.strerror or refused).removeprefix("tether: ")
            return type(exc)(exc.errno, f"tether: socket to {peer[0]}:{peer[1]} was revoked: {why}")
        except OSError:
            return exc
        reason = response.text.text
        if reason.startswith(_EXPLAINED):
            return type(exc)(exc.errno, f"tether: socket to {peer[0]}:{peer[1]} was {reason}")
        return exc

    # -- handoff (pickling) --------------------------------------------------------

    # A connected socket pickles by moving: see tether.client.handoff (and
    # docs/handoff.md) for the protocol; these are its two ends.

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self._tether is None:
            return super().__reduce_ex__(protocol)  # the stdlib's "cannot pickle" TypeError
        return (socket._resume, (self._hand_off(),))

    def _hand_off(self) -> HandoffState:
        """Detach this socket from this process: CONNECTED -> HANDED_OFF, with every dup()."""
        t = self._tether
        if t is None:
            raise TypeError(f"cannot pickle {type(self).__name__!r} object")
        if t.state is _HANDED_OFF:
            raise OSError(errno.EBADF, "tether: this socket was already handed off")
        if t.state is not _CONNECTED or self.fileno() == -1 or t.settings is None:
            raise OSError(
                errno.ENOTCONN, "tether: only a connected socket can be handed off (pickled)"
            )
        with t.lock:
            timeout = self.gettimeout()
            deadline = Deadline(HANDOFF_TIMEOUT)
            response = control.channel(t.settings).request(
                pb.Request(detach=pb.Detach(descriptor=t.descriptor)), timeout=HANDOFF_TIMEOUT
            )
            handoff = response.handoff
            try:
                # Everything the app wrote goes to the peer before the gateway's
                # EOF; what the gateway had sent until then is the tail.
                _StdSocket.shutdown(self, _socket_mod.SHUT_WR)
                tail = bytearray(t.prefix)
                while True:
                    _StdSocket.settimeout(self, deadline.remaining())
                    chunk = _StdSocket.recv(self, RECV_CHUNK)
                    if not chunk:
                        break
                    tail += chunk
            except TimeoutError as exc:
                raise TimeoutError(
                    f"tether: handing off socket to {t.peer}: the gateway did not finish in "
                    f"{HANDOFF_TIMEOUT:g} s"
                ) from exc
            finally:
                # The stream is spent either way; the object must not be used again.
                _socket.socket.close(self)
                t.mark_handed_off()
        return t.handoff_state(self, handoff, timeout, bytes(tail))

    @classmethod
    def _for_resume(cls, state: HandoffState) -> tuple[socket, _Tether, Settings]:
        """A fresh socket of the handed-off one's kind, as this process's app (both resumes)."""
        settings = current()
        sock = cls(state.family, state.type, state.proto)
        t = sock._tether
        assert t is not None
        t.settings = settings
        return sock, t, settings

    @classmethod
    def _resume(cls, state: HandoffState) -> socket:
        """A live socket for a handed-off one, in this process, as this process's app."""
        sock, t, settings = cls._for_resume(state)
        try:
            with t.lock:
                sock._reattach(t, state, settings)
        except BaseException:
            sock.close()
            raise
        t.restore_options(state.options)
        sock.settimeout(state.timeout)
        return sock

    def _reattach(self, t: _Tether, state: HandoffState, settings: Settings) -> None:
        """Open a stream and resume `state` on it: NEW -> CONNECTING -> CONNECTED, or raise."""
        deadline = Deadline(HANDOFF_TIMEOUT)
        self._open_gateway(settings, deadline)  # raises ConnectionError naming the gateway
        exchange = t.exchange = Exchange(settings.gateway)
        request = state.resume_request()
        target = f"{state.peer[0]}:{state.peer[1]}" if state.peer else state.descriptor[:8]
        t.state = _CONNECTING
        send_now(self, exchange.open(settings) + exchange.send(request, target), deadline)
        self._await_result(t, deadline)
        # Only now the tail: a refused Resume closes the stream, and tail bytes
        # it never read would turn the gateway's message into a reset. The
        # gateway echoes the tail ahead of anything new from the peer.
        send_now(self, state.tail, deadline)

    def __getstate__(self) -> Any:
        raise TypeError(f"cannot pickle {self.__class__.__name__!r} object")


def set_option(t: _Tether, level: int, optname: int, value: Any, optlen: Any = None) -> None:
    """setsockopt() for a tether socket: kept, and applied at the gateway once connected.

    Takes and refuses what the stdlib's does (encode_option, option_key).
    """
    if type(level) is not int or type(optname) is not int:
        level, optname = option_key(level, optname)  # 6.0 would find IPPROTO_TCP's entries
    name = OPTIONS.get((level, optname))
    if name is None:
        raise _unsupported_option(*option_key(level, optname))
    encoded = encode_option(name, value, optlen)
    if t.state is _CONNECTED:
        if t.options.get(name) == encoded:
            # Already so at the gateway (asyncio sets TCP_NODELAY on every
            # transport; tether.aio asks for it in the Connect): no round trip.
            return
        _control(t, pb.Request(set_option=pb.SetOption(descriptor=t.descriptor, value=encoded)))
    elif t.state is _PENDING or t.state is _CONNECTING:
        t.late_options.add(name)
    t.options[name] = encoded


def get_option(t: _Tether, sock_type: int, level: int, optname: int, buflen: int | None) -> Any:
    """getsockopt() for a tether socket: the outbound socket's real value once connected."""
    if buflen is not None:
        buflen = _buflen(buflen)
    if type(level) is not int or type(optname) is not int:
        level, optname = option_key(level, optname)  # 1.0 would pass for SOL_SOCKET
    if level == _socket_mod.SOL_SOCKET and optname == _socket_mod.SO_ERROR:
        err, t.error, t.exc = t.error, 0, None
        return err if buflen is None else err.to_bytes(4, sys.byteorder)[:buflen]
    if level == _socket_mod.SOL_SOCKET and optname == _socket_mod.SO_TYPE:
        return sock_type if buflen is None else sock_type.to_bytes(4, sys.byteorder)[:buflen]
    name = OPTIONS.get((level, optname))
    if name is None:
        raise _unsupported_option(*option_key(level, optname))
    if t.state is _CONNECTED:
        response = _control(t, pb.Request(get_option=pb.GetOption(
            descriptor=t.descriptor, name=name)))
        return decode_option(response.option, buflen)
    value = t.options.get(name)
    if value is None:
        return _default_option(level, optname, buflen)
    return decode_option(value, buflen)


def _control(t: _Tether, req: pb.Request) -> pb.Response:
    assert t.settings is not None
    return control.channel(t.settings).request(req)


# Loopback listeners of this process (see socket.bind): connects to them go
# straight to the kernel. Weak references: a collected listener drops out. A
# plain dict, so that connect() tests for "none at all" without a call.
_local_listeners: dict[tuple[str, int], weakref.ref[socket]] = {}


def _add_local_listener(key: tuple[str, int], sock: socket) -> None:
    def drop(ref: weakref.ref[socket]) -> None:
        if _local_listeners.get(key) is ref:
            del _local_listeners[key]

    _local_listeners[key] = weakref.ref(sock, drop)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _is_local_listener(address: Any) -> bool:
    if not isinstance(address, tuple) or len(address) < 2:
        return False
    ref = _local_listeners.get((address[0], address[1]))
    listener = ref() if ref is not None else None
    return listener is not None and listener.fileno() != -1


def _buflen(buflen: Any) -> int | None:
    """getsockopt()'s buflen as the stdlib takes it: 0 asks for an int, 1-1024 for bytes."""
    size: int = operator.index(buflen)
    if size == 0:
        return None
    if not 0 < size <= _MAX_BUFLEN:
        raise OSError("getsockopt buflen out of range")  # the stdlib's words
    return size


def _unsupported_option(level: int, optname: int) -> OSError:
    return OSError(
        errno.ENOPROTOOPT,
        f"tether: socket option {option_label(level, optname)} is not supported "
        f"(supported: {_SUPPORTED})",
    )


_defaults: dict[tuple[int, int, int | None], Any] = {}


def _default_option(level: int, optname: int, buflen: int | None) -> Any:
    """The kernel's default for an option on a fresh TCP socket (never connected)."""
    key = (level, optname, buflen)
    if key not in _defaults:
        with _StdSocket(_AF_INET, _SOCK_STREAM) as probe:
            if buflen is None:
                _defaults[key] = probe.getsockopt(level, optname)
            else:
                _defaults[key] = probe.getsockopt(level, optname, buflen)
    return _defaults[key]


def _check_address(family: int, address: Any, op: str) -> tuple[str, int]:
    """Validate like the stdlib does; returns (host, port)."""
    if type(address) is tuple and len(address) == 2:
        host, port = address
        if type(host) is str and type(port) is int and 0 <= port <= 65535:
            return host, port  # the common case, valid for both families
    fam = "AF_INET6" if family == _AF_INET6 else "AF_INET"
    if not isinstance(address, tuple):
        raise TypeError(f"{op}(): {fam} address must be tuple, not {type(address).__name__}")
    want = (2, 4) if family == _AF_INET6 else (2, 2)
    if not want[0] <= len(address) <= want[1]:
        raise TypeError(
            f"{op}(): {fam} address must be a pair (host, port)"
            if family == _AF_INET
            else f"{op}(): {fam} address must be a tuple (host, port[, flowinfo[, scopeid]])"
        )
    host, port = address[0], address[1]
    if isinstance(host, bytes | bytearray):
        host = bytes(host).decode("idna")
    if not isinstance(host, str):
        raise TypeError(f"str, bytes or bytearray expected, not {type(host).__name__}")
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"'{type(port).__name__}' object cannot be interpreted as an integer")
    if not 0 <= port <= 65535:
        raise OverflowError(f"{op}(): port must be 0-65535.")
    return host, port


__all__ = ["HandoffState", "State", "socket"]


def keepalive(sock: _StdSocket) -> None:
    """Reset the gateway's idle clock for `sock` without sending it any data.

    A socket with no traffic for the gateway's idle_timeout (10 minutes by
    default) is reclaimed; an app that holds a quiet connection on purpose
    calls this now and then.
    """
    udp_keepalive = getattr(sock, "_udp_keepalive", None)  # a UDP socket (client/dgram.py)
    if udp_keepalive is not None:
        udp_keepalive()
        return
    t = getattr(sock, "_tether", None) or getattr(sock, "_tether_state", None)
    if not isinstance(t, _Tether) or t.state is not _CONNECTED:
        raise OSError(errno.ENOTCONN, "tether: keepalive() needs a connected tether socket")
    _control(t, pb.Request(touch=pb.Touch(descriptor=t.descriptor)))
