"""Name resolution at the gateway, for connects and for the apps' own lookups.

Two sources, in order: the config's static hosts table (``[resolver.hosts]``;
operators' overrides and the test suites' loopback names), then, in
``system`` mode, the gateway host's own resolver (libc, run in a thread by
the event loop). In ``static`` mode an unknown name fails with EAI_NONAME and
nothing is asked of any DNS server.

The answers have the stdlib's shapes so the client can hand them to the app
unchanged: glibc's getaddrinfo lists one entry per socket type (STREAM,
DGRAM, RAW) for each address when no type is asked for, and so does this.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping, Sequence

from tether.policy import ResolutionError
from tether.wire import pb
from tether.wire.convert import (
    FAMILY_FROM_WIRE,
    FAMILY_TO_WIRE,
    SOCKTYPE_FROM_WIRE,
    SOCKTYPE_TO_WIRE,
    address_to_wire,
)

_PROTO_FOR_TYPE = {
    socket.SOCK_STREAM: socket.IPPROTO_TCP,
    socket.SOCK_DGRAM: socket.IPPROTO_UDP,
    socket.SOCK_RAW: 0,
}


class HostError(Exception):
    """gethostbyaddr() failed; `herrno` is the h_errno (1 = HOST_NOT_FOUND)."""

    def __init__(self, herrno: int, message: str) -> None:
        super().__init__(message)
        self.herrno = herrno


def _gai(code: int) -> ResolutionError:
    return ResolutionError(code, _gai_message(code))


def _gai_message(code: int) -> str:
    # glibc's gai_strerror() texts, so messages match what the stdlib shows.
    messages = {
        socket.EAI_NONAME: "Name or service not known",
        socket.EAI_SERVICE: "Servname not supported for ai_socktype",
        socket.EAI_FAMILY: "ai_family not supported",
        socket.EAI_ADDRFAMILY: "Address family for hostname not supported",
        socket.EAI_NODATA: "No address associated with hostname",
        socket.EAI_BADFLAGS: "Bad value for ai_flags",
    }
    return messages.get(code, "Name resolution failed")


class GatewayResolver:
    def __init__(self, mode: str, hosts: Mapping[str, Sequence[str]]) -> None:
        if mode not in ("system", "static"):
            raise ValueError(f"unknown resolver mode {mode!r}")
        self.mode = mode
        self.hosts = {k.lower().rstrip("."): list(v) for k, v in hosts.items()}
        self._reverse: dict[str, str] = {}
        for name, addrs in self.hosts.items():
            for a in addrs:
                self._reverse.setdefault(str(ipaddress.ip_address(a)), name)

    def _static(self, name: str) -> list[str] | None:
        return self.hosts.get(name.lower().rstrip("."))

    # -- for connects ------------------------------------------------------

    async def lookup(self, name: str) -> list[str]:
        """Numeric addresses for `name`, in preference order; ResolutionError if none."""
        found = self._static(name)
        if found is not None:
            return list(found)
        if self.mode == "static":
            raise _gai(socket.EAI_NONAME)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ResolutionError(exc.errno or socket.EAI_NONAME, exc.strerror or str(exc)) from exc
        seen: list[str] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            addr = str(sockaddr[0])
            if addr not in seen:
                seen.append(addr)
        return seen

    # -- for the apps' own lookups ----------------------------------------

    async def getaddrinfo(self, req: pb.GetAddrInfo) -> pb.AddrInfoList:
        host = req.host if req.has_host else None
        port = req.port if req.has_port else None
        family = FAMILY_FROM_WIRE.get(req.family, socket.AF_UNSPEC)
        socktype = SOCKTYPE_FROM_WIRE.get(req.socktype, 0)
        flags = 0
        for wanted, flag in (
            (req.passive, socket.AI_PASSIVE),
            (req.canonname, socket.AI_CANONNAME),
            (req.numerichost, socket.AI_NUMERICHOST),
            (req.numericserv, socket.AI_NUMERICSERV),
            (req.addrconfig, socket.AI_ADDRCONFIG),
            (req.v4mapped, socket.AI_V4MAPPED),
            (req.all, socket.AI_ALL),
        ):
            if wanted:
                flags |= flag
        name = host
        static = self._static(host) if host and not req.numerichost else None
        if static is None and host and self.mode == "static" and not _is_numeric(host):
            raise _gai(socket.EAI_NONAME)
        out = pb.AddrInfoList()
        if static is not None:
            # Numeric lookups of each address give libc's exact entry shapes.
            canon_done = False
            for addr in static:
                fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
                if family not in (socket.AF_UNSPEC, fam):
                    continue
                infos = await self._libc(
                    addr, port, fam, socktype, req.proto, flags | socket.AI_NUMERICHOST
                )
                for info in infos:
                    entry = self._entry(info)
                    if req.canonname and not canon_done:
                        entry.canonname = name or ""
                        canon_done = True
                    else:
                        entry.canonname = ""
                    out.entries.append(entry)
            if not out.entries:
                raise _gai(socket.EAI_ADDRFAMILY if family else socket.EAI_NONAME)
            return out
        infos = await self._libc(host, port, family, socktype, req.proto, flags)
        out.entries.extend(self._entry(info) for info in infos)
        return out

    async def _libc(
        self,
        host: str | None,
        port: str | None,
        family: int,
        socktype: int,
        proto: int,
        flags: int,
    ) -> list[tuple[int, int, int, str, tuple[object, ...]]]:
        if self.mode == "static" and host and not _is_numeric(host):
            raise _gai(socket.EAI_NONAME)
        loop = asyncio.get_running_loop()
        try:
            return [
                (int(f), int(t), p, c, tuple(sa))
                for f, t, p, c, sa in await loop.getaddrinfo(
                    host, port, family=family, type=socktype, proto=proto, flags=flags
                )
            ]
        except socket.gaierror as exc:
            raise ResolutionError(exc.errno or socket.EAI_NONAME, exc.strerror or str(exc)) from exc

    @staticmethod
    def _entry(info: tuple[int, int, int, str, tuple[object, ...]]) -> pb.AddrInfo:
        family, socktype, proto, canon, sockaddr = info
        return pb.AddrInfo(
            family=FAMILY_TO_WIRE[family],
            socktype=SOCKTYPE_TO_WIRE.get(socktype, pb.SOCKTYPE_ANY),
            proto=proto,
            canonname=canon,
            address=address_to_wire(sockaddr, family),
        )

    async def gethostbyname_ex(self, name: str) -> pb.HostEntry:
        if _is_numeric(name):
            return pb.HostEntry(name=name, addresses=[name]) if ":" not in name else _nope()
        static = self._static(name)
        if static is not None:
            v4 = [a for a in static if ":" not in a]
            if not v4:
                raise _gai(socket.EAI_NONAME)
            return pb.HostEntry(name=name.rstrip(".").lower(), addresses=v4)
        if self.mode == "static":
            raise _gai(socket.EAI_NONAME)
        loop = asyncio.get_running_loop()
        try:
            hostname, aliases, addrs = await loop.run_in_executor(
                None, socket.gethostbyname_ex, name
            )
        except socket.gaierror as exc:
            raise ResolutionError(exc.errno or socket.EAI_NONAME, exc.strerror or str(exc)) from exc
        return pb.HostEntry(name=hostname, aliases=aliases, addresses=addrs)

    async def gethostbyaddr(self, address: str) -> pb.HostEntry:
        if not _is_numeric(address):
            found = self._static(address)
            if found is None:
                if self.mode == "static":
                    raise _gai(socket.EAI_NONAME)
                addrs = await self.lookup(address)
                found = addrs
            address = found[0]
        canonical = str(ipaddress.ip_address(address.split("%", 1)[0]))
        name = self._reverse.get(canonical)
        if name is not None:
            return pb.HostEntry(name=name, addresses=[address])
        if self.mode == "static":
            raise HostError(1, "Unknown host")
        loop = asyncio.get_running_loop()
        try:
            hostname, aliases, addrs = await loop.run_in_executor(
                None, socket.gethostbyaddr, address
            )
        except socket.herror as exc:
            raise HostError(exc.errno or 1, exc.strerror or "Unknown host") from exc
        except socket.gaierror as exc:
            raise ResolutionError(exc.errno or socket.EAI_NONAME, exc.strerror or str(exc)) from exc
        return pb.HostEntry(name=hostname, aliases=aliases, addresses=addrs)

    async def getnameinfo(self, req: pb.GetNameInfo) -> pb.NameInfo:
        host = req.address.host
        port = req.address.port
        service = str(port)
        if not req.numericserv:
            try:
                service = socket.getservbyport(port, "udp" if req.dgram else "tcp")
            except OSError:
                service = str(port)
        if req.numerichost:
            return pb.NameInfo(host=host, service=service)
        canonical = str(ipaddress.ip_address(host.split("%", 1)[0]))
        name = self._reverse.get(canonical)
        if name is None and self.mode == "system":
            flags = socket.NI_NAMEREQD if req.namereqd else 0
            if req.nofqdn:
                flags |= socket.NI_NOFQDN
            loop = asyncio.get_running_loop()
            sockaddr: tuple[str, int] | tuple[str, int, int, int] = (host, port)
            if ":" in host:
                sockaddr = (host, port, req.address.flowinfo, req.address.scope_id)
            try:
                name, _ = await loop.getnameinfo(sockaddr, flags | socket.NI_NUMERICSERV)
            except socket.gaierror as exc:
                raise ResolutionError(exc.errno or socket.EAI_NONAME, str(exc)) from exc
        if name is None:
            if req.namereqd:
                raise _gai(socket.EAI_NONAME)
            name = host
        elif req.nofqdn:
            name = name.split(".", 1)[0]
        return pb.NameInfo(host=name, service=service)


def _nope() -> pb.HostEntry:
    raise _gai(socket.EAI_ADDRFAMILY)


def _is_numeric(host: str) -> bool:
    """True for what libc parses as an address without a lookup (incl. ``127.1``)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return True
    try:
        socket.inet_aton(host)  # pure parsing: the short and octal forms libc accepts
    except (OSError, ValueError):
        return False
    return True
