"""SOCKS5, server side, as a sans-I/O state machine (RFC 1928, RFC 1929).

Feed what the client sent to :meth:`Socks5Server.receive_data` (``b""`` at
the end of the stream), pull events with :meth:`Socks5Server.next_event`,
and answer each with the method that returns the bytes to send:

=========================  ==============================================
event                      answer
=========================  ==============================================
:class:`Greeting`          :meth:`~Socks5Server.choose_method`
:class:`Auth`              :meth:`~Socks5Server.auth_status`
:class:`Request`           :meth:`~Socks5Server.reply`
:class:`Closed`            none: the client hung up between messages
=========================  ==============================================

:data:`NEED_DATA` means "feed more", :data:`PAUSED` "an answer is due".
Anything the client sends that SOCKS5 does not allow raises
:class:`Socks5Error`; :meth:`~Socks5Server.refuse` gives the bytes that tell
the client (a reply code where the protocol has one) and closes the machine.

After a successful reply to CONNECT the stream is the target's raw bytes
(:attr:`State.RELAY`; what the client sent early is in
:attr:`~Socks5Server.trailing_data`); after one to UDP ASSOCIATE it only
holds the association open (:attr:`State.ASSOCIATED`). The UDP request
header (RFC 1928 section 7) is :func:`parse_datagram` / :func:`build_datagram`.

No sockets and no event loop here: the gateway's front-end
(``tether.gateway.frontends.socks5``) drives it, and the tests feed it bytes.
"""

from __future__ import annotations

import enum
import errno as _errno
import socket
import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

VERSION: Final = 5  # RFC 1928
AUTH_VERSION: Final = 1  # RFC 1929's subnegotiation version

# Methods (RFC 1928 section 3).
NO_AUTH: Final = 0x00
GSSAPI: Final = 0x01
USERPASS: Final = 0x02
NO_ACCEPTABLE: Final = 0xFF

# Commands (section 4).
CONNECT: Final = 0x01
BIND: Final = 0x02
UDP_ASSOCIATE: Final = 0x03

# Address types (section 5).
ATYP_IPV4: Final = 0x01
ATYP_DOMAIN: Final = 0x03
ATYP_IPV6: Final = 0x04

# Reply codes (section 6).
SUCCEEDED: Final = 0x00
GENERAL_FAILURE: Final = 0x01
NOT_ALLOWED: Final = 0x02  # "connection not allowed by ruleset"
NETWORK_UNREACHABLE: Final = 0x03
HOST_UNREACHABLE: Final = 0x04
CONNECTION_REFUSED: Final = 0x05
TTL_EXPIRED: Final = 0x06  # what SOCKS servers answer for a connect that timed out
COMMAND_NOT_SUPPORTED: Final = 0x07
ADDRESS_TYPE_NOT_SUPPORTED: Final = 0x08

REPLY_NAMES: Final = {
    SUCCEEDED: "succeeded",
    GENERAL_FAILURE: "general SOCKS server failure",
    NOT_ALLOWED: "connection not allowed by ruleset",
    NETWORK_UNREACHABLE: "network unreachable",
    HOST_UNREACHABLE: "host unreachable",
    CONNECTION_REFUSED: "connection refused",
    TTL_EXPIRED: "TTL expired",
    COMMAND_NOT_SUPPORTED: "command not supported",
    ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}
_COMMAND_NAMES: Final = {CONNECT: "CONNECT", BIND: "BIND", UDP_ASSOCIATE: "UDP ASSOCIATE"}

# RFC 1929 status: 0 is success, anything else failure (the server then closes).
AUTH_OK: Final = b"\x01\x00"
AUTH_FAILED: Final = b"\x01\x01"

_PORT = struct.Struct(">H")
_ADDRESS_LENGTHS: Final = {ATYP_IPV4: 4, ATYP_IPV6: 16}
_ZERO_BIND: Final = ("0.0.0.0", 0)


class State(enum.Enum):
    GREETING = "greeting"  # waiting for the client's methods
    METHOD = "method"  # the method choice is due
    AUTH = "auth"  # waiting for the client's username and password
    AUTH_STATUS = "auth-status"  # the authentication status is due
    REQUEST = "request"  # waiting for the client's request
    REPLY = "reply"  # the request's reply is due
    RELAY = "relay"  # CONNECT succeeded: raw bytes from here on
    ASSOCIATED = "associated"  # UDP ASSOCIATE succeeded: the stream holds the association
    CLOSED = "closed"


class _Sentinel(enum.Enum):
    NEED_DATA = "need-data"
    PAUSED = "paused"


NEED_DATA: Final = _Sentinel.NEED_DATA
PAUSED: Final = _Sentinel.PAUSED


class Socks5Error(ValueError):
    """The client sent something SOCKS5 does not allow here; the stream must close.

    `reply` is the code that tells the client: a reply code for a request
    the server cannot serve (COMMAND_NOT_SUPPORTED, ADDRESS_TYPE_NOT_SUPPORTED),
    NO_ACCEPTABLE for a greeting with no method; None where the protocol has
    no way to say it.
    """

    def __init__(self, message: str, reply: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Greeting:
    """The client's offered authentication methods, in its order."""

    methods: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Auth:
    """RFC 1929 username and password (the app's name and key at the gateway)."""

    username: str
    password: str = ""

    def __repr__(self) -> str:  # the password never reaches a log line
        return f"Auth(username={self.username!r}, password=<{len(self.password)} chars>)"


@dataclass(frozen=True, slots=True)
class Request:
    """CONNECT or UDP ASSOCIATE to `host`:`port`; `atyp` says whether host is a name."""

    command: int
    host: str
    port: int
    atyp: int

    @property
    def by_name(self) -> bool:
        return self.atyp == ATYP_DOMAIN


@dataclass(frozen=True, slots=True)
class Closed:
    """The client closed the stream between messages."""


Event: TypeAlias = Greeting | Auth | Request | Closed


class Socks5Server:
    """One client stream, server side; see the module docstring.

    `commands` are the requests served; any other is refused with
    COMMAND_NOT_SUPPORTED (the gateway does not serve BIND: it opens no
    listening sockets for apps).
    """

    __slots__ = ("_buf", "_command", "_eof", "commands", "state")

    def __init__(self, commands: tuple[int, ...] = (CONNECT, UDP_ASSOCIATE)) -> None:
        self.commands = commands
        self.state = State.GREETING
        self._buf = bytearray()
        self._eof = False
        self._command = 0

    # -- input -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """What the client sent; ``b""`` when it closed its side."""
        if not data:
            self._eof = True
        elif self.state is not State.ASSOCIATED:
            # The association's stream carries nothing (RFC 1928 section 7):
            # what a client sends there is dropped, never buffered.
            self._buf += data

    def next_event(self) -> Event | _Sentinel:
        """The next event, NEED_DATA, or PAUSED; raises Socks5Error."""
        state = self.state
        if state is State.GREETING:
            event: Event | None = self._greeting()
        elif state is State.AUTH:
            event = self._auth()
        elif state is State.REQUEST:
            event = self._request()
        elif state in (State.METHOD, State.AUTH_STATUS, State.REPLY):
            return PAUSED
        elif state is State.ASSOCIATED:
            event = None
        else:  # RELAY, CLOSED: the machine has nothing more to say
            return NEED_DATA
        if event is not None:
            return event
        if self._eof:
            if self._buf:
                self.state = State.CLOSED
                raise Socks5Error(
                    f"the client closed the stream in the middle of its {state.value} message "
                    f"({len(self._buf)} bytes of it received)"
                )
            self.state = State.CLOSED
            return Closed()
        return NEED_DATA

    @property
    def trailing_data(self) -> bytes:
        """After a CONNECT's success: what the client sent behind its request (taken once)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    # -- parsing -----------------------------------------------------------

    def _greeting(self) -> Greeting | None:
        buf = self._buf
        if not buf:
            return None
        _check_version(buf[0], "greeting")
        if len(buf) < 2:
            return None
        count = buf[1]
        if count == 0:
            raise Socks5Error(
                "the client's greeting offers no authentication method", NO_ACCEPTABLE
            )
        if len(buf) < 2 + count:
            return None
        methods = tuple(buf[2 : 2 + count])
        del buf[: 2 + count]
        self.state = State.METHOD
        return Greeting(methods)

    def _auth(self) -> Auth | None:
        buf = self._buf
        if not buf:
            return None
        if buf[0] != AUTH_VERSION:
            raise Socks5Error(
                f"the username/password message starts with {buf[0]:#04x}, not RFC 1929's "
                f"version {AUTH_VERSION:#04x}"
            )
        if len(buf) < 2:
            return None
        user_end = 2 + buf[1]
        if len(buf) < user_end + 1:
            return None
        end = user_end + 1 + buf[user_end]
        if len(buf) < end:
            return None
        # Not UTF-8: such a name is no app's, and its key no key (replaced, not raised).
        username = buf[2:user_end].decode("utf-8", "replace")
        password = buf[user_end + 1 : end].decode("utf-8", "replace")
        del buf[:end]
        self.state = State.AUTH_STATUS
        return Auth(username, password)

    def _request(self) -> Request | None:
        buf = self._buf
        if not buf:
            return None
        _check_version(buf[0], "request")
        if len(buf) < 5:
            return None
        command, atyp = buf[1], buf[3]
        parsed = _address(buf, 3)
        if parsed is None:
            return None
        host, port, end = parsed
        if command not in self.commands:
            name = _COMMAND_NAMES.get(command, f"{command:#04x}")
            raise Socks5Error(
                f"SOCKS5 command {name} is not supported (supported: "
                f"{', '.join(_COMMAND_NAMES.get(c, str(c)) for c in self.commands)})",
                COMMAND_NOT_SUPPORTED,
            )
        del buf[:end]
        self._command = command
        self.state = State.REPLY
        return Request(command, host, port, atyp)

    # -- output ------------------------------------------------------------

    def choose_method(self, method: int) -> bytes:
        """Answer the Greeting; NO_ACCEPTABLE closes the machine (the client must hang up)."""
        self._expect(State.METHOD, "choose a method")
        if method == NO_ACCEPTABLE:
            self.state = State.CLOSED
        elif method == USERPASS:
            self.state = State.AUTH
        elif method == NO_AUTH:
            self.state = State.REQUEST
        else:
            raise ValueError(f"method {method:#04x} is not one this server speaks")
        return bytes((VERSION, method))

    def auth_status(self, ok: bool) -> bytes:
        """Answer the Auth; a failure closes the machine (RFC 1929: the server closes)."""
        self._expect(State.AUTH_STATUS, "answer an authentication")
        self.state = State.REQUEST if ok else State.CLOSED
        return AUTH_OK if ok else AUTH_FAILED

    def reply(self, code: int, bind: tuple[str, int] = _ZERO_BIND) -> bytes:
        """Answer the Request with `code` and BND.ADDR/BND.PORT `bind` (a numeric address).

        SUCCEEDED moves to RELAY (CONNECT) or ASSOCIATED (UDP ASSOCIATE);
        any other code closes the machine.
        """
        self._expect(State.REPLY, "reply to a request")
        if code == SUCCEEDED:
            self.state = State.RELAY if self._command == CONNECT else State.ASSOCIATED
            if self.state is State.ASSOCIATED:
                self._buf.clear()
        else:
            self.state = State.CLOSED
        return bytes((VERSION, code, 0)) + encode_address(*bind)

    def refuse(self, error: Socks5Error) -> bytes:
        """The bytes that tell the client about `error` (b"" where SOCKS5 has none); closes."""
        state = self.state
        self.state = State.CLOSED
        if state is State.AUTH:
            return AUTH_FAILED
        if state is State.REQUEST and error.reply is not None:
            return bytes((VERSION, error.reply, 0)) + encode_address(*_ZERO_BIND)
        if state is State.GREETING and error.reply == NO_ACCEPTABLE:
            return bytes((VERSION, NO_ACCEPTABLE))
        return b""

    def _expect(self, state: State, what: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"cannot {what} in state {self.state.value}")


def _check_version(byte: int, what: str) -> None:
    if byte == VERSION:
        return
    hint = ""
    if byte == 4:
        hint = " (a SOCKS4 client: use SOCKS5, e.g. curl --socks5-hostname)"
    elif 0x41 <= byte <= 0x5A:
        hint = " (it looks like an HTTP request: this is the SOCKS5 port)"
    raise Socks5Error(f"not SOCKS5: the {what} starts with {byte:#04x}, not 0x05{hint}")


def _address(buf: bytes | bytearray, at: int) -> tuple[str, int, int] | None:
    """ATYP, DST.ADDR, DST.PORT starting at `at`: (host, port, end), or None if incomplete."""
    atyp = buf[at]
    start = at + 1
    if atyp == ATYP_DOMAIN:
        if len(buf) < start + 1:
            return None
        size = buf[start]
        if size == 0:
            raise Socks5Error("the request names an empty domain name", GENERAL_FAILURE)
        start += 1
    elif atyp in _ADDRESS_LENGTHS:
        size = _ADDRESS_LENGTHS[atyp]
    else:
        raise Socks5Error(
            f"SOCKS5 address type {atyp:#04x} is not one of IPv4 (1), domain name (3), IPv6 (4)",
            ADDRESS_TYPE_NOT_SUPPORTED,
        )
    end = start + size + 2
    if len(buf) < end:
        return None
    raw = bytes(buf[start : start + size])
    if atyp == ATYP_DOMAIN:
        # Names are ASCII (IDNA); anything else is left for the policy to refuse by name.
        host = raw.decode("utf-8", "replace")
    else:
        host = socket.inet_ntop(socket.AF_INET if atyp == ATYP_IPV4 else socket.AF_INET6, raw)
    (port,) = _PORT.unpack_from(buf, start + size)
    return host, port, end


def encode_address(host: str, port: int) -> bytes:
    """ATYP, ADDR, PORT for a numeric address or a name (at most 255 bytes)."""
    try:
        if ":" in host:
            return bytes((ATYP_IPV6,)) + socket.inet_pton(socket.AF_INET6, host) + _PORT.pack(port)
        return bytes((ATYP_IPV4,)) + socket.inet_pton(socket.AF_INET, host) + _PORT.pack(port)
    except OSError:
        pass
    name = host.encode("idna")
    if not 0 < len(name) <= 255:
        raise ValueError(f"host name {host!r} does not fit a SOCKS5 address (1 to 255 bytes)")
    return bytes((ATYP_DOMAIN, len(name))) + name + _PORT.pack(port)


# -- UDP (RFC 1928 section 7) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Datagram:
    """A client's UDP datagram: where it goes and its payload."""

    host: str
    port: int
    atyp: int
    data: bytes


def parse_datagram(packet: bytes) -> Datagram:
    """RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA; raises Socks5Error for a bad or fragmented one.

    Fragments are refused: RFC 1928 lets a server that does not reassemble
    drop any datagram whose FRAG is not 0, and no common client fragments.
    """
    if len(packet) < 4:
        raise Socks5Error(
            f"a SOCKS5 UDP datagram of {len(packet)} bytes is shorter than its header"
        )
    if packet[2] != 0:
        raise Socks5Error(f"SOCKS5 UDP fragment {packet[2]} dropped: fragments are not reassembled")
    parsed = _address(packet, 3)
    if parsed is None:
        raise Socks5Error("a SOCKS5 UDP datagram ends inside its header's address")
    host, port, end = parsed
    return Datagram(host, port, packet[3], packet[end:])


def build_datagram(host: str, port: int, data: bytes) -> bytes:
    """The header a reply from `host`:`port` carries back to the client, then `data`."""
    return b"\x00\x00\x00" + encode_address(host, port) + data


def reply_for_errno(err: int | None) -> int:
    """The reply code for a failed outbound connect's errno."""
    return _ERRNO_REPLIES.get(err or 0, GENERAL_FAILURE)


_ERRNO_REPLIES: Final = {
    _errno.ECONNREFUSED: CONNECTION_REFUSED,
    _errno.ENETUNREACH: NETWORK_UNREACHABLE,
    _errno.ENETDOWN: NETWORK_UNREACHABLE,
    _errno.EHOSTUNREACH: HOST_UNREACHABLE,
    _errno.EHOSTDOWN: HOST_UNREACHABLE,
    _errno.ETIMEDOUT: TTL_EXPIRED,
    _errno.EACCES: NOT_ALLOWED,
    _errno.EPERM: NOT_ALLOWED,
    _errno.EAFNOSUPPORT: ADDRESS_TYPE_NOT_SUPPORTED,
}


__all__ = [
    "ADDRESS_TYPE_NOT_SUPPORTED",
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "AUTH_FAILED",
    "AUTH_OK",
    "BIND",
    "COMMAND_NOT_SUPPORTED",
    "CONNECT",
    "CONNECTION_REFUSED",
    "GENERAL_FAILURE",
    "HOST_UNREACHABLE",
    "NEED_DATA",
    "NETWORK_UNREACHABLE",
    "NOT_ALLOWED",
    "NO_ACCEPTABLE",
    "NO_AUTH",
    "PAUSED",
    "REPLY_NAMES",
    "SUCCEEDED",
    "TTL_EXPIRED",
    "UDP_ASSOCIATE",
    "USERPASS",
    "Auth",
    "Closed",
    "Datagram",
    "Event",
    "Greeting",
    "Request",
    "Socks5Error",
    "Socks5Server",
    "State",
    "build_datagram",
    "encode_address",
    "parse_datagram",
    "reply_for_errno",
]
