"""Gateway endpoints as written in configs, flags and TETHER_GATEWAY.

``host:port``, ``[v6addr]:port`` or ``unix:/path``. Shared by the gateway
(where it listens) and the client (where it connects).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PORT = 7340  # unassigned by IANA at the time of writing; "TE" on a phone pad-ish


def host_port(host: object, port: object) -> str:
    """``host:port``, or ``[host]:port`` for an IPv6 address: how logs and errors name a peer."""
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


# SO_LINGER on with a 0 s timeout: closing the socket sends a TCP reset, not a FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


def arm_reset(transport: Any) -> None:
    """Make closing `transport` (close() or abort()) send a TCP reset, so its peer's next
    call fails with ECONNRESET instead of reading a clean EOF. A Unix stream has no reset
    to give (its peer sees EOF); a transport without a socket is left as it is."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def same_host(a: str, b: str) -> bool:
    """True if `a` and `b` are the same IP address however written (a zone index ignored)."""
    try:
        x = ipaddress.ip_address(a.split("%", 1)[0])
        y = ipaddress.ip_address(b.split("%", 1)[0])
    except ValueError:
        return False
    return x == y


def address_family(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 address, else AF_INET."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@dataclass(frozen=True)
class Endpoint:
    host: str = ""
    port: int = 0
    path: str = ""  # set for a Unix socket
    # Derived once: every tether connect reads them (see bench/README.md).
    is_unix: bool = field(init=False, repr=False, compare=False)
    family: socket.AddressFamily = field(init=False, repr=False, compare=False)
    sockaddr: str | tuple[str, int] = field(init=False, repr=False, compare=False)
    text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unix = bool(self.path)
        sockaddr: str | tuple[str, int]
        if unix:
            family, sockaddr, text = socket.AF_UNIX, self.path, f"unix:{self.path}"
        else:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sockaddr, text = (self.host, self.port), host_port(self.host, self.port)
        object.__setattr__(self, "is_unix", unix)
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "sockaddr", sockaddr)
        object.__setattr__(self, "text", text)

    def __str__(self) -> str:
        return self.text


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``host:port``, ``[v6]:port`` or ``unix:/path``; ValueError says what is wrong."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError(f"{text!r}: a unix endpoint needs a path (unix:/run/tether.sock)")
        return Endpoint(path=path)
    bracketed = text.startswith("[")
    if bracketed:
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPv6]:PORT")
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, as [::1]:7340")
    if not host:
        raise ValueError(f"{text!r}: missing host (as 127.0.0.1:7340)")
    port = DEFAULT_PORT
    if port_text:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
        port = int(port_text)
    if bracketed or ":" in host:
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError as exc:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from exc
    return Endpoint(host=host, port=port)
