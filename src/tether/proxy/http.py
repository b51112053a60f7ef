"""The HTTP proxy's request side, sans-I/O: what an app asks a proxy for, and the answers.

An app (curl, git, wget, pip, any client given ``HTTP_PROXY``) opens a
connection to the proxy and sends one request head:

* ``CONNECT host:port`` (RFC 9110 §9.3.6): a tunnel. After ``200`` the
  connection carries raw bytes to and from the destination (TLS end to end);
* ``METHOD http://host[:port]/path`` (absolute form, RFC 9112 §3.2.2): a plain
  HTTP request for the proxy to forward. The gateway sends the destination
  the same request in origin form (``METHOD /path``), with ``Host`` set from
  the URI, hop-by-hop headers dropped (``Proxy-Authorization`` among them),
  ``Via`` added and ``Connection: close``; the body and the response then
  pass as raw bytes. One request per connection: the destination closes
  after its response, and a client that wanted to reuse the connection opens
  another (what curl, wget, pip and git do when a proxy closes).

The app says who it is with ``Proxy-Authorization: Basic base64(APP:KEY)``.

:class:`HttpProxy` parses the head with h11 (fed bytes, gives events, never
touches a socket) and makes the answers' bytes. The front-end
(``tether.gateway.frontends.http_proxy``) authenticates, admits and dials on
the gateway core, and answers with :meth:`HttpProxy.established` (a tunnel's
200), :meth:`HttpProxy.forwarded` (a forwarded request's head goes to the
destination; the app hears from the destination) or :meth:`HttpProxy.refuse`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import Final, NamedTuple

import h11

# A request head larger than this is refused with 431 (RFC 6585). h11's own
# default (DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, 16 KiB); curl's request heads
# are a few hundred bytes, and nginx's default for a whole head is 8-32 KiB.
MAX_HEAD: Final = 16 * 1024
# What a DNS name can be written as (RFC 1035 §2.3.4: 255 octets on the
# wire, 253 characters as text).
MAX_HOST: Final = 253
# The realm the 407 names (RFC 7617 §2): what a client shows when it asks
# for credentials.
REALM: Final = "tether"
# Headers only for the connection they arrive on (RFC 9110 §7.6.1), never
# forwarded; plus those the Connection header names. Transfer-Encoding is
# hop-by-hop too, but the body is relayed as the app framed it, so its
# framing header goes with it.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)

_REASONS: Final = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
# A host name as the proxy takes it: letters, digits, '-', '_' and dots (the
# policy normalises it further); an IPv6 address comes in brackets.
_NAME: Final = re.compile(rb"[A-Za-z0-9_.-]+")
# What may go into a header value we write: visible ASCII and spaces, so a
# reason quoting what the app sent can never end the header or add one.
_UNSAFE_HEADER: Final = re.compile(r"[^\x20-\x7e]")


class ProxyRequestError(ValueError):
    """The app's request is not one this proxy serves; `status` is the answer's code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Credentials(NamedTuple):
    """What ``Proxy-Authorization: Basic`` said: the app's name and key."""

    app: str
    key: str


@dataclass(frozen=True, slots=True)
class Tunnel:
    """``CONNECT host:port``: open a raw byte stream to the destination."""

    host: str
    port: int
    credentials: Credentials | None
    # Why a Proxy-Authorization header that was sent could not be read ("" if none).
    auth_error: str = ""


@dataclass(frozen=True, slots=True)
class Forward:
    """A plain ``http://`` request: `head` (origin form) goes to host:port, then the body."""

    host: str
    port: int
    credentials: Credentials | None
    auth_error: str
    method: str
    head: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    """The app closed its side before a whole request head (`partial`: some of one came)."""

    partial: bool


class _Need:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _Need()
Event = Tunnel | Forward | Closed | _Need


class State(enum.Enum):
    HEAD = "reading the request head"
    DECIDING = "the request is being decided"
    RELAY = "relaying raw bytes"
    CLOSED = "closed"


class HttpProxy:
    """One app connection to the HTTP proxy, as bytes in and bytes out.

    ``receive_data(data)`` (``b""``: the app closed its side), then
    ``next_event()``: NEED_DATA until a head is complete, then one
    :class:`Tunnel` or :class:`Forward` (or :class:`Closed`); a head this
    proxy does not serve raises :class:`ProxyRequestError`, whose status and
    message go to :meth:`refuse`. After the answer, :attr:`trailing_data` is
    what the app sent behind the head (a TLS ClientHello, a request body):
    the first bytes for the destination.
    """

    def __init__(self, *, max_head: int = MAX_HEAD) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self.state = State.HEAD
        self._received = False
        self._event: Tunnel | Forward | None = None

    def receive_data(self, data: bytes) -> None:
        if data:
            self._received = True
        if self.state is State.HEAD or self.state is State.DECIDING:
            # While deciding: kept as the destination's first bytes.
            self._h11.receive_data(data)
        elif self.state is State.RELAY:
            raise RuntimeError("receive_data() while relaying: the bytes are the destination's")
        # CLOSED: what an app sends after a refusal is dropped.

    def next_event(self) -> Event:
        if self.state is State.CLOSED:
            return Closed(partial=False)
        if self.state is not State.HEAD:
            raise RuntimeError(f"next_event() while {self.state.value}")
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            if self._h11.trailing_data[1]:  # the app closed in the middle of a head
                self.state = State.CLOSED
                return Closed(partial=True)
            self.state = State.CLOSED
            raise ProxyRequestError(
                exc.error_status_hint, f"malformed request head: {exc}"
            ) from exc
        if event is h11.NEED_DATA:
            return NEED_DATA
        if isinstance(event, h11.ConnectionClosed):
            self.state = State.CLOSED
            return Closed(partial=self._received)
        assert isinstance(event, h11.Request)  # a server's h11 gives nothing else first
        try:
            request = _request(event)
        except ProxyRequestError:
            self.state = State.CLOSED
            raise
        self._event = request
        self.state = State.DECIDING
        return request

    @property
    def trailing_data(self) -> bytes:
        """What the app sent after the request head (and has not been handed on)."""
        return self._h11.trailing_data[0]

    # -- answers -----------------------------------------------------------

    def established(self) -> bytes:
        """The tunnel is open: the 200's bytes; raw bytes from here on."""
        self._answered(Tunnel)
        return b"HTTP/1.1 200 Connection established\r\n\r\n"

    def forwarded(self) -> bytes:
        """The destination is connected: the forwarded head's bytes; raw bytes from here on."""
        event = self._answered(Forward)
        assert isinstance(event, Forward)
        return event.head

    def refuse(
        self, status: int, message: str, headers: list[tuple[str, str]] | None = None
    ) -> bytes:
        """A refusal's bytes (`message` as the body); the connection closes after them."""
        self.state = State.CLOSED
        return response(status, message, headers)

    def _answered(self, kind: type) -> Tunnel | Forward:
        event = self._event
        if self.state is not State.DECIDING or event is None or not isinstance(event, kind):
            raise RuntimeError(f"no {kind.__name__} request to answer (state: {self.state.value})")
        self.state = State.RELAY
        return event


def _request(req: h11.Request) -> Tunnel | Forward:
    """The event for a parsed head; ProxyRequestError for one this proxy does not serve."""
    if req.http_version not in (b"1.0", b"1.1"):
        raise ProxyRequestError(
            505, f"HTTP/{req.http_version.decode()} is not served here (HTTP/1.0 and HTTP/1.1 are)"
        )
    credentials, auth_error = _credentials(req.headers)
    method = req.method.decode("ascii")
    target = req.target
    if method == "CONNECT":
        host, port = _authority(target, default_port=None)
        return Tunnel(host, port, credentials, auth_error)
    scheme, sep, rest = target.partition(b"://")
    if not sep or b"/" in scheme:
        raise ProxyRequestError(
            400,
            f"{method} {_show(target)}: this is a proxy: give an "
            "absolute URI (http://host/path) or use CONNECT host:port",
        )
    if scheme.lower() != b"http":
        raise ProxyRequestError(
            501,
            f"{method} {_show(target)}: this proxy forwards plain http:// "
            "requests only; for https:// and other protocols use CONNECT "
            "host:port",
        )
    end = len(rest)
    for stop in (b"/", b"?", b"#"):
        found = rest.find(stop)
        if found != -1:
            end = min(end, found)
    authority, path = rest[:end], rest[end:]
    path = path.partition(b"#")[0]  # a fragment is never sent (RFC 9110 §4.2.4)
    if not path.startswith(b"/"):
        path = b"/" + path
    if b"@" in authority:
        raise ProxyRequestError(
            400,
            f"{_show(target)}: credentials in an http URI are not "
            "forwarded (RFC 9110 §4.2.4); send them in a header",
        )
    host, port = _authority(authority, default_port=80)
    head = _origin_head(req, path, authority)
    return Forward(host, port, credentials, auth_error, method, head)


def _authority(text: bytes, *, default_port: int | None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (`default_port`: the port may be left out)."""
    shown = _show(text)
    if text.startswith(b"["):
        literal, sep, rest = text[1:].partition(b"]")
        if not sep:
            raise ProxyRequestError(400, f"{shown}: an IPv6 address needs its closing ']'")
        try:
            host = str(ipaddress.IPv6Address(literal.decode("ascii")))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProxyRequestError(400, f"{shown}: not an IPv6 address in brackets") from exc
        port_text = rest[1:] if rest.startswith(b":") else None
        if rest and port_text is None:
            raise ProxyRequestError(400, f"{shown}: expected ':port' after the ']'")
    else:
        name, sep, port_bytes = text.rpartition(b":")
        if not sep:
            name, port_bytes = text, b""
        port_text = port_bytes if sep else None
        if not _NAME.fullmatch(name) or len(name) > MAX_HOST:
            raise ProxyRequestError(
                400,
                f"{shown}: not a host name or IPv4 address "
                f"(letters, digits, '-', '_', '.', at most {MAX_HOST})",
            )
        host = name.decode("ascii")
    if port_text is None or port_text == b"":
        if default_port is None:
            raise ProxyRequestError(400, f"CONNECT {shown}: give the port (CONNECT host:port)")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ProxyRequestError(400, f"{shown}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def _credentials(headers: h11._headers.Headers) -> tuple[Credentials | None, str]:
    """(credentials, "") from Proxy-Authorization; (None, why) when it cannot be read."""
    values = [v for name, v in headers if name == b"proxy-authorization"]
    if not values:
        return None, ""
    if len(values) > 1:
        return None, "more than one Proxy-Authorization header"
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None, (
            f"Proxy-Authorization scheme '{_show(scheme)}' is not served (Basic with APP:KEY is)"
        )
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None, "Proxy-Authorization Basic is not base64 of UTF-8 APP:KEY"
    app, sep, key = decoded.partition(":")
    if not sep or not app:
        return None, "Proxy-Authorization Basic must be APP:KEY"
    return Credentials(app, key), ""


def _origin_head(req: h11.Request, path: bytes, authority: bytes) -> bytes:
    """The request head for the destination: origin form, Host from the URI,
    no hop-by-hop header, Via, Connection: close."""
    named = set(HOP_BY_HOP)
    for name, value in req.headers:
        if name == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    version = req.http_version
    lines = [b"%s %s HTTP/%s" % (req.method, path, version), b"Host: " + authority]
    for name, value in req.headers.raw_items():
        lowered = name.lower()
        if lowered in named or lowered == b"host":
            continue
        lines.append(name + b": " + value)
    lines.append(b"Via: %s tether" % version)
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def response(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> bytes:
    """A complete response: `message` (a line of text) as a text/plain body, then close."""
    body = (message + "\n").encode("utf-8", "replace")
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    for name, value in headers or ():
        lines.append(f"{name}: {header_value(value)}")
    lines += [
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def header_value(text: str) -> str:
    """`text` as a header value: any character that is not visible ASCII or a space as \\xNN."""
    return _UNSAFE_HEADER.sub(lambda m: "".join(f"\\x{b:02x}" for b in m[0].encode()), text)


def _show(data: bytes) -> str:
    """What the app sent, for an error message: printable, at most 200 characters."""
    text = data[:200].decode("ascii", "backslashreplace")
    return text + ("..." if len(data) > 200 else "")


__all__ = [
    "MAX_HEAD",
    "NEED_DATA",
    "REALM",
    "Closed",
    "Credentials",
    "Forward",
    "HttpProxy",
    "ProxyRequestError",
    "State",
    "Tunnel",
    "header_value",
    "response",
]
