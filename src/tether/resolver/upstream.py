"""An asyncio resolver that asks named DNS servers (``[resolver] mode = "upstream"``).

Queries go out with dnspython's asyncio API (no threads): UDP first, TCP when
the answer comes back truncated. Servers are tried in order, `attempts`
rounds over the list, each try bounded by `timeout`. Answers, including
negative ones (RFC 2308), are kept in a `TTLCache`.

Failures map to the codes glibc's getaddrinfo gives for the same DNS
outcome, so an app sees what a local lookup would have raised:

==========================  ==================================
DNS outcome                 error
==========================  ==================================
NXDOMAIN                    EAI_NONAME
name exists, no A/AAAA      EAI_NODATA
SERVFAIL, REFUSED, timeout  EAI_AGAIN (not cached)
==========================  ==================================
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.reversename

from tether.endpoint import host_port
from tether.policy._resolution import ResolutionError
from tether.resolver.cache import TTLCache

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_TIMEOUT",
    "HostAnswer",
    "Outcome",
    "QueryResult",
    "UpstreamResolver",
]

log = logging.getLogger("tether.resolver")

# dnspython's per-server timeout default (dns.resolver.Resolver.timeout).
DEFAULT_TIMEOUT = 2.0
# glibc's resolv.conf `attempts` default.
DEFAULT_ATTEMPTS = 2
# EDNS buffer size recommended by DNS Flag Day 2020: fits an unfragmented datagram.
EDNS_PAYLOAD = 1232

# glibc's gai_strerror() texts, so messages start as the stdlib's would.
_NONAME = "Name or service not known"
_NODATA = "No address associated with hostname"
_AGAIN = "Temporary failure in name resolution"


class Outcome(enum.Enum):
    ANSWER = "answer"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    FAILURE = "failure"  # every server failed or timed out


@dataclass(frozen=True)
class QueryResult:
    """The outcome of one (name, type) question, as cached.

    `values` are the answer's records in presentation form (addresses, or a
    PTR's target without the final dot); `aliases` are the names the CNAME
    chain went through, `canonical` where it ended.
    """

    outcome: Outcome
    canonical: str
    aliases: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class HostAnswer:
    """A name's addresses: IPv4 first, then IPv6, each in the server's order."""

    canonical: str
    aliases: tuple[str, ...]
    addresses: tuple[str, ...]


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


class UpstreamResolver:
    """Resolves from `servers` ((host, port) pairs, numeric hosts), with a cache."""

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
        cache: TTLCache[tuple[str, int], QueryResult] | None = None,
    ) -> None:
        if not servers:
            raise ValueError("upstream resolution needs at least one server")
        for host, _port in servers:
            ipaddress.ip_address(host)  # a name here would need a resolver of its own
        self.servers = tuple(servers)
        self.timeout = timeout
        self.attempts = attempts
        self.cache: TTLCache[tuple[str, int], QueryResult] = (
            cache if cache is not None else TTLCache()
        )
        # One query on the wire per (name, type) at a time; later askers wait for it.
        self._inflight: dict[tuple[str, int], asyncio.Future[QueryResult]] = {}

    # -- one question ----------------------------------------------------------

    async def query(self, name: str, rdtype: int) -> QueryResult:
        """The answer to one question, from the cache when it is still fresh."""
        qname = dns.name.from_text(name)
        key = (_text(qname), int(rdtype))
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[QueryResult] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result, ttl = await self._ask(qname, rdtype)
            if result.outcome is not Outcome.FAILURE:
                negative = result.outcome is not Outcome.ANSWER
                self.cache.put(key, result, ttl, negative=negative)
            future.set_result(result)
            return result
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here, so an unawaited future logs nothing
            raise
        finally:
            del self._inflight[key]

    async def _ask(self, qname: dns.name.Name, type_code: int) -> tuple[QueryResult, float]:
        rdtype = dns.rdatatype.RdataType.make(type_code)
        what = f"{_text(qname)} {dns.rdatatype.to_text(rdtype)}"
        problems: list[str] = []
        for _attempt in range(self.attempts):
            for host, port in self.servers:
                server = host_port(host, port)
                query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
                try:
                    response, _tcp = await dns.asyncquery.udp_with_fallback(
                        query, host, timeout=self.timeout, port=port
                    )
                except dns.exception.Timeout:
                    problems.append(f"{server} did not answer within {self.timeout:g} s")
                    continue
                except (OSError, dns.exception.DNSException) as exc:
                    problems.append(f"{server} failed: {exc}")
                    continue
                rcode = response.rcode()
                if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    problems.append(f"{server} answered {dns.rcode.to_text(rcode)}")
                    continue
                try:
                    return _result(response, rdtype)
                except dns.exception.DNSException as exc:
                    problems.append(f"{server} sent an unusable answer: {exc}")
        detail = (
            f"no answer for {what} after {self.attempts} round(s) over "
            f"{len(self.servers)} server(s): {'; '.join(problems[-len(self.servers) :])}"
        )
        log.warning("upstream resolution failed: %s", detail)
        return QueryResult(Outcome.FAILURE, _text(qname), detail=detail), 0.0

    # -- what the gateway asks -------------------------------------------------

    async def host(self, name: str, family: int = socket.AF_UNSPEC) -> HostAnswer:
        """The addresses of `name` (A and/or AAAA); ResolutionError as glibc would raise."""
        types: tuple[int, ...] = (dns.rdatatype.A, dns.rdatatype.AAAA)
        if family == socket.AF_INET:
            types = (dns.rdatatype.A,)
        elif family == socket.AF_INET6:
            types = (dns.rdatatype.AAAA,)
        try:
            results = await asyncio.gather(*(self.query(name, t) for t in types))
        except (dns.exception.DNSException, ValueError) as exc:
            # An unusable name (an empty label, one over 63 bytes): no DNS server knows it.
            raise ResolutionError(socket.EAI_NONAME, f"{_NONAME}: {name!r}: {exc}") from exc
        addresses = tuple(a for r in results for a in r.values)
        if addresses:
            first = next(r for r in results if r.values)
            return HostAnswer(first.canonical, first.aliases, addresses)
        raise _host_error(name, results)

    async def reverse(self, address: str) -> str | None:
        """The PTR name of a numeric address; None when there is none.

        ResolutionError(EAI_AGAIN) when no server answered.
        """
        ptr = dns.reversename.from_address(address.split("%", 1)[0])
        result = await self.query(ptr.to_text(), dns.rdatatype.PTR)
        if result.outcome is Outcome.FAILURE:
            raise ResolutionError(socket.EAI_AGAIN, f"{_AGAIN}: {result.detail}")
        return result.values[0] if result.values else None


def _result(response: dns.message.Message, rdtype: int) -> tuple[QueryResult, float]:
    assert isinstance(response, dns.message.QueryMessage)
    chain = response.resolve_chaining()
    aliases = tuple(_text(rrset.name) for rrset in chain.cnames)
    canonical = _text(chain.canonical_name)
    if chain.answer is not None:
        values = tuple(
            _text(rd.target) if rdtype == dns.rdatatype.PTR else rd.to_text() for rd in chain.answer
        )
        return QueryResult(Outcome.ANSWER, canonical, aliases, values), float(chain.minimum_ttl)
    outcome = Outcome.NXDOMAIN if response.rcode() == dns.rcode.NXDOMAIN else Outcome.NODATA
    # minimum_ttl is RFC 2308's negative TTL here: min(SOA TTL, SOA MINIMUM, CNAME TTLs).
    return QueryResult(outcome, canonical, aliases), float(chain.minimum_ttl)


def _host_error(name: str, results: Sequence[QueryResult]) -> ResolutionError:
    # glibc: NXDOMAIN -> EAI_NONAME; every answer a timeout/failure -> EAI_AGAIN;
    # otherwise the name exists without addresses -> EAI_NODATA.
    outcomes = {r.outcome for r in results}
    if Outcome.NXDOMAIN in outcomes:
        return ResolutionError(socket.EAI_NONAME, _NONAME)
    if outcomes == {Outcome.FAILURE}:
        return ResolutionError(socket.EAI_AGAIN, f"{_AGAIN}: {results[0].detail}")
    return ResolutionError(socket.EAI_NODATA, _NODATA)
