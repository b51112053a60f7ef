"""Name resolution through the gateway, with the stdlib's signatures and shapes.

Numeric hosts are answered locally by the stdlib (libc parses them without
any lookup, so the answer is the same and a round trip is saved); names go
to the gateway over the control stream. Failures raise the stdlib's own
``socket.gaierror`` / ``socket.herror`` with libc's codes.
"""

from __future__ import annotations

import ipaddress
import socket as _socket_mod
from typing import Any

from tether.client import control
from tether.client.settings import current
from tether.wire import pb
from tether.wire.convert import (
    FAMILY_FROM_WIRE,
    FAMILY_TO_WIRE,
    SOCKTYPE_FROM_WIRE,
    SOCKTYPE_TO_WIRE,
    address_from_wire,
    address_to_wire,
)

# The stdlib's own functions, captured before install() can patch them.
_std_getaddrinfo = _socket_mod.getaddrinfo
_std_gethostbyname = _socket_mod.gethostbyname
_std_gethostbyname_ex = _socket_mod.gethostbyname_ex
_std_getnameinfo = _socket_mod.getnameinfo
_std_gethostname = _socket_mod.gethostname


def _is_numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _host_text(host: Any) -> str | None:
    if host is None:
        return None
    if isinstance(host, bytes | bytearray):
        return bytes(host).decode("ascii", "surrogateescape")
    if isinstance(host, str):
        return host
    raise TypeError(f"getaddrinfo() argument 1 must be string or None, not {type(host).__name__}")


def _request(req: pb.Request) -> pb.Response:
    return control.channel(current()).request(req)


def getaddrinfo(
    host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
) -> list[tuple[Any, Any, int, str, Any]]:
    text = _host_text(host)
    if text is None or text == "" or _is_numeric(text) or flags & _socket_mod.AI_NUMERICHOST:
        # No name to look up: libc answers without any I/O.
        return _std_getaddrinfo(host, port, family, type, proto, flags)
    if isinstance(port, int):
        port_text: str | None = str(port)
    elif isinstance(port, bytes | bytearray):
        port_text = bytes(port).decode()
    elif port is None or isinstance(port, str):
        port_text = port
    else:
        raise OSError("Int or String expected")
    if family not in FAMILY_TO_WIRE:
        raise _socket_mod.gaierror(_socket_mod.EAI_FAMILY, "ai_family not supported")
    req = pb.GetAddrInfo(
        host=text,
        has_host=True,
        port=port_text or "",
        has_port=port_text is not None,
        family=FAMILY_TO_WIRE[family],
        socktype=SOCKTYPE_TO_WIRE.get(type, pb.SOCKTYPE_ANY),
        proto=proto,
        passive=bool(flags & _socket_mod.AI_PASSIVE),
        canonname=bool(flags & _socket_mod.AI_CANONNAME),
        numerichost=bool(flags & _socket_mod.AI_NUMERICHOST),
        numericserv=bool(flags & _socket_mod.AI_NUMERICSERV),
        addrconfig=bool(flags & _socket_mod.AI_ADDRCONFIG),
        v4mapped=bool(flags & _socket_mod.AI_V4MAPPED),
        all=bool(flags & _socket_mod.AI_ALL),
    )
    response = _request(pb.Request(getaddrinfo=req))
    out: list[tuple[Any, Any, int, str, Any]] = []
    for entry in response.addrinfo.entries:
        fam = FAMILY_FROM_WIRE[entry.family]
        kind = SOCKTYPE_FROM_WIRE.get(entry.socktype, 0)
        out.append(
            (
                _socket_mod.AddressFamily(fam),
                _socket_mod.SocketKind(kind) if kind else kind,
                entry.proto,
                entry.canonname,
                address_from_wire(entry.address),
            )
        )
    return out


def gethostbyname(hostname: str) -> str:
    if not isinstance(hostname, str):
        raise TypeError(f"gethostbyname() argument 1 must be str, not {type(hostname).__name__}")
    if hostname in ("", "<broadcast>") or _is_numeric(hostname) or _inet_aton_ok(hostname):
        return _std_gethostbyname(hostname)
    return gethostbyname_ex(hostname)[2][0]


def gethostbyname_ex(hostname: str) -> tuple[str, list[str], list[str]]:
    if not isinstance(hostname, str):
        raise TypeError(
            f"gethostbyname_ex() argument 1 must be str, not {type(hostname).__name__}"
        )
    if hostname in ("", "<broadcast>") or _is_numeric(hostname) or _inet_aton_ok(hostname):
        return _std_gethostbyname_ex(hostname)
    response = _request(pb.Request(gethostbyname=pb.GetHostByName(name=hostname)))
    host = response.host
    return (host.name, list(host.aliases), list(host.addresses))


def gethostbyaddr(ip_address: str) -> tuple[str, list[str], list[str]]:
    if not isinstance(ip_address, str):
        raise TypeError(
            f"gethostbyaddr() argument 1 must be str, not {type(ip_address).__name__}"
        )
    response = _request(pb.Request(gethostbyaddr=pb.GetHostByAddr(address=ip_address)))
    host = response.host
    return (host.name, list(host.aliases), list(host.addresses))


def getnameinfo(sockaddr: Any, flags: int) -> tuple[str, str]:
    if not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
        raise TypeError("getnameinfo() argument 1 must be a tuple")
    host = sockaddr[0]
    if flags & _socket_mod.NI_NUMERICHOST or not isinstance(host, str) or not _is_numeric(host):
        # Numeric answers (and the stdlib's own argument errors) need no lookup.
        return _std_getnameinfo(sockaddr, flags)
    family = _socket_mod.AF_INET6 if ":" in host else _socket_mod.AF_INET
    req = pb.GetNameInfo(
        address=address_to_wire(sockaddr, family),
        numerichost=bool(flags & _socket_mod.NI_NUMERICHOST),
        numericserv=bool(flags & _socket_mod.NI_NUMERICSERV),
        namereqd=bool(flags & _socket_mod.NI_NAMEREQD),
        nofqdn=bool(flags & _socket_mod.NI_NOFQDN),
        dgram=bool(flags & _socket_mod.NI_DGRAM),
    )
    response = _request(pb.Request(getnameinfo=req))
    return (response.nameinfo.host, response.nameinfo.service)


def getfqdn(name: str = "") -> str:
    """The stdlib's algorithm, with lookups through the gateway."""
    name = name.strip()
    if not name or name in ("0.0.0.0", "::"):
        name = _std_gethostname()
    try:
        hostname, aliases, _ipaddrs = gethostbyaddr(name)
    except OSError:
        pass
    else:
        aliases.insert(0, hostname)
        for candidate in aliases:
            if "." in candidate:
                name = candidate
                break
        else:
            name = hostname
    return name


def _inet_aton_ok(host: str) -> bool:
    try:
        _socket_mod.inet_aton(host)
    except OSError:
        return False
    return True
