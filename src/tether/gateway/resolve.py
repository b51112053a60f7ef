"""Name resolution at the gateway, for connects and for the apps' own lookups.

Two sources, in order: the config's static hosts table (``[resolver.hosts]``;
operators' overrides and the test suites' loopback names), then, in
``system`` mode, the gateway host's own resolver (libc, run in a thread by
the event loop), or in ``upstream`` mode the configured DNS servers
(`tether.resolver.UpstreamResolver`, asyncio, cached). In ``static`` mode an
unknown name fails with EAI_NONAME and nothing is asked of any DNS server.
Connects (`lookup`) and the apps' own lookups use the same sources, so what
an app resolves is what its connect is decided on.

With ``[resolver] hide_denied = true`` the apps' lookups of a name leave out
the addresses the app's policy would deny (docs/resolution.md).

The answers have the stdlib's shapes so the client can hand them to the app
unchanged: glibc's getaddrinfo lists one entry per socket type (STREAM,
DGRAM, RAW) for each address when no type is asked for, and so does this.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from tether.policy import Decider, ResolutionError, Transport
from tether.resolver.cache import TTLCache
from tether.resolver.upstream import QueryResult, UpstreamResolver
from tether.wire import pb
from tether.wire.convert import (
    FAMILY_FROM_WIRE,
    FAMILY_TO_WIRE,
    SOCKTYPE_FROM_WIRE,
    SOCKTYPE_TO_WIRE,
    address_to_wire,
)

if TYPE_CHECKING:
    from tether.config import Config

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


# h_errno TRY_AGAIN and its hstrerror() text, for a PTR lookup no server answered.
_TRY_AGAIN = 2


class GatewayResolver:
    def __init__(
        self,
        mode: str,
        hosts: Mapping[str, Sequence[str]],
        *,
        upstream: UpstreamResolver | None = None,
        decider: Callable[[], Decider] | None = None,
    ) -> None:
        if mode not in ("system", "static", "upstream"):
            raise ValueError(f"unknown resolver mode {mode!r}")
        if (mode == "upstream") != (upstream is not None):
            raise ValueError("an upstream resolver is given exactly in upstream mode")
        self.mode = mode
        self.upstream = upstream
        # Set: the apps' lookups hide what this decider denies them (hide_denied).
        self.decider = decider
        self.hosts = {k.lower().rstrip("."): list(v) for k, v in hosts.items()}
        self._reverse: dict[str, str] = {}
        for name, addrs in self.hosts.items():
            for a in addrs:
                self._reverse.setdefault(str(ipaddress.ip_address(a)), name)

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        decider: Callable[[], Decider] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> GatewayResolver:
        """The resolver `config` describes; `decider` is used only with hide_denied."""
        upstream = None
        settings = config.resolver_upstream
        if config.resolver_mode == "upstream":
            assert settings is not None
            cache: TTLCache[tuple[str, int], QueryResult] = TTLCache(
                settings.cache_size,
                min_ttl=settings.min_ttl,
                max_ttl=settings.max_ttl,
                clock=clock or time.monotonic,
            )
            upstream = UpstreamResolver(
                settings.servers, timeout=settings.timeout, attempts=settings.attempts, cache=cache
            )
        return cls(
            config.resolver_mode,
            config.resolver_hosts,
            upstream=upstream,
            decider=decider if config.resolver_hide_denied else None,
        )

    def _static(self, name: str) -> list[str] | None:
        return self.hosts.get(name.lower().rstrip("."))

    async def _forward(self, name: str, family: int) -> tuple[str, list[str]] | None:
        """(canonical name, addresses) from the table or the upstream servers.

        None in system mode for a name the table lacks: libc answers those.
        """
        found = self._static(name)
        if found is not None:
            return name, list(found)
        if self.mode == "static":
            raise _gai(socket.EAI_NONAME)
        if self.upstream is None:
            return None
        answer = await self.upstream.host(name, family)
        return answer.canonical, list(answer.addresses)

    # -- for connects ------------------------------------------------------

    async def lookup(self, name: str) -> list[str]:
        """Numeric addresses for `name`, in preference order; ResolutionError if none."""
        forward = await self._forward(name, socket.AF_UNSPEC)
        if forward is not None:
            return forward[1]
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

    async def getaddrinfo(self, req: pb.GetAddrInfo, app: str = "") -> pb.AddrInfoList:
        out = await self._getaddrinfo(req)
        host = req.host if req.has_host else None
        if self.decider is None or not host or _is_numeric(host):
            return out
        # hide_denied: judge each entry as the connect (or datagram) it would make.
        kept = _PolicyView(self.decider(), app, host)
        entries = [
            e
            for e in out.entries
            if kept.visible(e.address.host, e.address.port, SOCKTYPE_FROM_WIRE.get(e.socktype, 0))
        ]
        if not entries:
            raise kept.none_left()
        if out.entries and out.entries[0].canonname and not entries[0].canonname:
            entries[0].canonname = out.entries[0].canonname
        del out.entries[:]
        out.entries.extend(entries)
        return out

    async def _getaddrinfo(self, req: pb.GetAddrInfo) -> pb.AddrInfoList:
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
        static: list[str] | None = None
        if host and not req.numerichost and not _is_numeric(host):
            forward = await self._forward(host, family)
            if forward is not None:
                name, static = forward
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

    async def gethostbyname_ex(self, name: str, app: str = "") -> pb.HostEntry:
        entry = await self._gethostbyname_ex(name)
        if self.decider is None or _is_numeric(name):
            return entry
        view = _PolicyView(self.decider(), app, name)
        kept = [a for a in entry.addresses if view.visible(a, 0, 0)]
        if not kept:
            raise view.none_left()
        del entry.addresses[:]
        entry.addresses.extend(kept)
        return entry

    async def _gethostbyname_ex(self, name: str) -> pb.HostEntry:
        if _is_numeric(name):
            return pb.HostEntry(name=name, addresses=[name]) if ":" not in name else _nope()
        if self.upstream is not None and self._static(name) is None:
            answer = await self.upstream.host(name, socket.AF_INET)
            return pb.HostEntry(
                name=answer.canonical, aliases=answer.aliases, addresses=answer.addresses
            )
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
        if name is None and self.upstream is not None:
            try:
                name = await self.upstream.reverse(canonical)
            except ResolutionError as exc:
                raise HostError(_TRY_AGAIN, f"Host name lookup failure: {exc.message}") from exc
            if name is None:
                raise HostError(1, "Unknown host")
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
        # The wire's uint32 port and free-text host are the app's input: out of
        # range or not an address is the app's error, answered as such (the
        # fuzzer, tests/fuzz, found both raising inside the gateway).
        if port > 65535:
            raise OSError(errno.EINVAL, f"tether: getnameinfo: port {port} is not in 0-65535")
        try:
            canonical = str(ipaddress.ip_address(host.split("%", 1)[0]))
        except ValueError:
            raise _gai(socket.EAI_NONAME) from None
        service = str(port)
        if not req.numericserv:
            try:
                service = socket.getservbyport(port, "udp" if req.dgram else "tcp")
            except OSError:
                service = str(port)
        if req.numerichost:
            return pb.NameInfo(host=host, service=service)
        name = self._reverse.get(canonical)
        if name is None and self.upstream is not None:
            try:
                name = await self.upstream.reverse(canonical)
            except ResolutionError:
                if req.namereqd:
                    raise  # glibc: EAI_AGAIN; without NI_NAMEREQD the numeric form
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


class _PolicyView:
    """What one app's policy lets it see of one name's addresses (hide_denied).

    An address at a port is judged exactly as a connect to it would be. A
    lookup without a port (gethostbyname, getaddrinfo(name, None)) is no
    connect yet: its address stays visible if some port would be allowed.
    The ports tried are the ones where a verdict can change (every rule's
    port range, allow_ports) and one port no rule or port list names.
    """

    def __init__(self, decider: Decider, app: str, name: str) -> None:
        self.decider = decider
        self.app = app
        self.name = name
        self.target = decider.normalize(name)
        self._probes: list[int] | None = None

    def visible(self, address: str, port: int, socktype: int) -> bool:
        transports: Iterable[Transport] = (
            (Transport.UDP,)
            if socktype == socket.SOCK_DGRAM
            else (Transport.TCP,)
            if socktype == socket.SOCK_STREAM
            else (Transport.TCP, Transport.UDP)
        )
        ports = [port] if port else self._probe_ports()
        return any(
            self.decider.decide_resolved(self.app, self.target, p, t, [address]).allowed
            for t in transports
            for p in ports
        )

    def _probe_ports(self) -> list[int]:
        if self._probes is None:
            policy = self.decider.policy
            named: set[int] = set(policy.allow_ports or ())
            app = self.app if self.app in policy.apps else ""
            ranges = [rule.ports for rule, _ in policy.ordered_rules(app) if rule.ports]
            for ports in ranges:
                named.update((ports.low, ports.high))
            unnamed = next(
                (
                    p
                    for p in range(1, 65536)
                    if p not in named
                    and p not in policy.deny_ports
                    and not any(p in r for r in ranges)
                ),
                None,
            )
            self._probes = sorted(named) if unnamed is None else [*sorted(named), unnamed]
        return self._probes

    def none_left(self) -> ResolutionError:
        return ResolutionError(
            socket.EAI_NONAME,
            f"{_gai_message(socket.EAI_NONAME)} (tether: the policy for app {self.app!r} "
            f"denies every address of {self.name!r}, and hide_denied is on)",
        )


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
