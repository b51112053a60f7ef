"""UpstreamResolver against the loopback test DNS server: answers, errors, TC, cache."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import dns.rcode
import pytest
from dnsserver import DNSServer

from tether.policy import ResolutionError
from tether.resolver import TTLCache, UpstreamResolver
from tether.resolver.upstream import QueryResult


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def server() -> Iterator[DNSServer]:
    with DNSServer(negative_ttl=30) as srv:
        srv.add_host("www.test", "127.0.0.1", "::1", ttl=60)
        srv.add_host("v4.test", "127.0.0.2", ttl=60)
        srv.add("alias.test", "CNAME", "mid.test", ttl=10)
        srv.add("mid.test", "CNAME", "www.test", ttl=20)
        srv.add("mx.test", "MX", "10 www.test.")
        srv.add_ptr("127.0.0.1", "www.test")
        srv.add_ptr("::1", "v6.www.test")
        for i in range(100):  # too big for one UDP answer: TC, then TCP
            srv.add("big.test", "A", f"127.0.1.{i}")
        srv.rcodes["broken.test"] = dns.rcode.SERVFAIL
        srv.rcodes["refused.test"] = dns.rcode.REFUSED
        yield srv


@pytest.fixture
def silent() -> Iterator[DNSServer]:
    with DNSServer() as srv:
        srv.silent = True
        yield srv


def resolver(*servers: DNSServer, clock: Clock | None = None, **kw: float) -> UpstreamResolver:
    cache: TTLCache[tuple[str, int], QueryResult] = TTLCache(clock=clock or Clock())
    return UpstreamResolver(
        [(s.host, s.port) for s in servers],
        timeout=kw.get("timeout", 1.0),
        attempts=int(kw.get("attempts", 1)),
        cache=cache,
    )


@pytest.mark.parametrize(
    ("name", "family", "canonical", "aliases", "addresses"),
    [
        ("www.test", socket.AF_UNSPEC, "www.test", (), ("127.0.0.1", "::1")),
        ("WWW.Test.", socket.AF_INET, "www.test", (), ("127.0.0.1",)),
        ("www.test", socket.AF_INET6, "www.test", (), ("::1",)),
        (
            "alias.test",
            socket.AF_UNSPEC,
            "www.test",
            ("alias.test", "mid.test"),
            ("127.0.0.1", "::1"),
        ),
    ],
)
def test_addresses(
    server: DNSServer,
    name: str,
    family: int,
    canonical: str,
    aliases: tuple[str, ...],
    addresses: tuple[str, ...],
) -> None:
    answer = asyncio.run(resolver(server).host(name, family))
    assert (answer.canonical, answer.aliases, answer.addresses) == (canonical, aliases, addresses)


@pytest.mark.parametrize(
    ("name", "family", "eai"),
    [
        ("nope.test", socket.AF_UNSPEC, socket.EAI_NONAME),  # NXDOMAIN
        ("mx.test", socket.AF_UNSPEC, socket.EAI_NODATA),  # exists, no address
        ("v4.test", socket.AF_INET6, socket.EAI_NODATA),
        ("broken.test", socket.AF_UNSPEC, socket.EAI_AGAIN),  # SERVFAIL
        ("refused.test", socket.AF_INET, socket.EAI_AGAIN),
        ("bad..name", socket.AF_UNSPEC, socket.EAI_NONAME),  # no server could know it
    ],
)
def test_errors_are_glibcs(server: DNSServer, name: str, family: int, eai: int) -> None:
    with pytest.raises(ResolutionError) as caught:
        asyncio.run(resolver(server).host(name, family))
    assert caught.value.eai == eai


def test_a_server_that_never_answers_times_out_with_eai_again(silent: DNSServer) -> None:
    with pytest.raises(ResolutionError) as caught:
        asyncio.run(resolver(silent, timeout=0.1, attempts=2).host("www.test", socket.AF_INET))
    assert caught.value.eai == socket.EAI_AGAIN
    assert f"{silent.address} did not answer within 0.1 s" in caught.value.message
    assert silent.count("www.test", "A") == 2  # one try per attempt


def test_the_next_server_answers_when_the_first_is_silent(
    silent: DNSServer, server: DNSServer
) -> None:
    answer = asyncio.run(resolver(silent, server, timeout=0.1).host("v4.test"))
    assert answer.addresses == ("127.0.0.2",)


def test_truncated_answer_is_asked_again_over_tcp(server: DNSServer) -> None:
    server.reset_counts()
    answer = asyncio.run(resolver(server).host("big.test", socket.AF_INET))
    assert len(answer.addresses) == 100
    assert server.count("big.test", "A", transport="udp") == 1
    assert server.count("big.test", "A", transport="tcp") == 1


def test_chosen_name_truncated_goes_over_tcp() -> None:
    with DNSServer() as srv:
        srv.add_host("small.test", "127.0.0.3")
        srv.truncate_names.add("small.test")
        answer = asyncio.run(resolver(srv).host("small.test", socket.AF_INET))
        assert answer.addresses == ("127.0.0.3",)
        assert srv.count("small.test", transport="tcp") == 1


@pytest.mark.parametrize(
    ("address", "name"), [("127.0.0.1", "www.test"), ("::1", "v6.www.test"), ("127.0.0.9", None)]
)
def test_reverse(server: DNSServer, address: str, name: str | None) -> None:
    assert asyncio.run(resolver(server).reverse(address)) == name


def test_reverse_timeout_is_eai_again(silent: DNSServer) -> None:
    with pytest.raises(ResolutionError) as caught:
        asyncio.run(resolver(silent, timeout=0.1).reverse("127.0.0.1"))
    assert caught.value.eai == socket.EAI_AGAIN


def test_cache_honours_the_smallest_ttl_of_the_chain(server: DNSServer) -> None:
    clock = Clock()
    res = resolver(server, clock=clock)

    async def ask(times: list[float]) -> list[int]:
        counts = []
        for t in times:
            clock.now = t
            await res.host("alias.test", socket.AF_INET)
            counts.append(server.count("alias.test", "A"))
        return counts

    server.reset_counts()
    # alias (TTL 10) -> mid (20) -> www (60): the answer lives 10 s.
    assert asyncio.run(ask([0, 9.9, 10, 15])) == [1, 1, 2, 2]


@pytest.mark.parametrize(("name", "family"), [("nope.test", 0), ("mx.test", socket.AF_INET)])
def test_negative_answers_are_cached_for_the_soa_minimum(
    server: DNSServer, name: str, family: int
) -> None:
    clock = Clock()
    res = resolver(server, clock=clock)

    async def ask(t: float) -> int:
        clock.now = t
        with pytest.raises(ResolutionError):
            await res.host(name, family)
        return server.count(name, "A")

    async def run() -> list[int]:
        return [await ask(t) for t in (0, 29.9, 30)]

    server.reset_counts()
    assert asyncio.run(run()) == [1, 1, 2]  # negative_ttl=30 (SOA TTL and MINIMUM)


def test_failures_are_not_cached(server: DNSServer) -> None:
    res = resolver(server)

    async def run() -> None:
        for _ in range(2):
            with pytest.raises(ResolutionError):
                await res.host("broken.test", socket.AF_INET)

    server.reset_counts()
    asyncio.run(run())
    assert server.count("broken.test") == 2


def test_concurrent_askers_share_one_query(server: DNSServer) -> None:
    res = resolver(server)

    async def run() -> set[tuple[str, ...]]:
        answers = await asyncio.gather(*(res.host("v4.test", socket.AF_INET) for _ in range(20)))
        return {a.addresses for a in answers}

    server.reset_counts()
    assert asyncio.run(run()) == {("127.0.0.2",)}
    assert server.count("v4.test") == 1


def test_servers_must_be_numeric() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        UpstreamResolver([("dns.example", 53)])
    with pytest.raises(ValueError, match="at least one server"):
        UpstreamResolver([])
