"""dnspython's UDP queries through tether: a loopback DNS server, a real gateway process.

`tethered` routes the stdlib socket module through the session gateway (a
`tether serve` child process that allows loopback); the DNS server
(tests/dnsserver.py) holds real stdlib sockets. Every query therefore goes
app -> gateway relay -> server and back as datagrams, and a truncated
answer is retried over TCP through the gateway too. No real DNS anywhere.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest
from dnsserver import DNSServer
from support import Gateway

from tether.client.dgram import DatagramSocket

TIMEOUT = 5.0


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer() as server:
        server.add("www.test", "A", "127.0.0.1", ttl=30)
        server.add("alias.test", "CNAME", "www.test")
        server.add_host("dual.test", "127.0.0.1", "::1")
        # 40 addresses: an answer well over the classic 512-byte UDP limit.
        for i in range(1, 41):
            server.add("big.test", "A", f"127.0.1.{i}")
        server.truncate_names.add("big.test")
        yield server


def test_dns_query_udp_through_tether(tethered: Gateway, dns_server: DNSServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        assert isinstance(probe, DatagramSocket)
    query = dns.message.make_query("www.test", "A")
    answer = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=TIMEOUT)
    assert answer.rcode() == dns.rcode.NOERROR
    assert [rr.address for rr in answer.answer[0]] == ["127.0.0.1"]
    assert dns_server.count("www.test", "A", transport="udp") == 1


def test_resolver_through_tether(tethered: Gateway, dns_server: DNSServer) -> None:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_server.host]
    resolver.port = dns_server.port
    resolver.lifetime = TIMEOUT
    answer = resolver.resolve("alias.test", "A")
    assert [rr.address for rr in answer] == ["127.0.0.1"]
    assert answer.canonical_name.to_text() == "www.test."
    v6 = resolver.resolve("dual.test", "AAAA")
    assert [rr.address for rr in v6] == ["::1"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("missing.test", "A")


def test_truncated_udp_answer_is_retried_over_tcp(
    tethered: Gateway, dns_server: DNSServer
) -> None:
    query = dns.message.make_query("big.test", "A")
    answer, used_tcp = dns.query.udp_with_fallback(
        query, dns_server.host, port=dns_server.port, timeout=TIMEOUT
    )
    assert used_tcp
    assert len(answer.answer[0]) == 40
    assert dns_server.count("big.test", "A", transport="udp") == 1
    assert dns_server.count("big.test", "A", transport="tcp") == 1


def test_many_queries_on_one_socket(tethered: Gateway, dns_server: DNSServer) -> None:
    # dnspython with a socket the app keeps: one association, many datagrams.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for i in range(50):
            query = dns.message.make_query("www.test", "A", id=i)
            answer = dns.query.udp(
                query, dns_server.host, port=dns_server.port, timeout=TIMEOUT, sock=sock
            )
            assert answer.id == i
    assert dns_server.count("www.test", "A", transport="udp") == 50


def test_round_trip_cost_through_the_gateway(tethered: Gateway, dns_server: DNSServer) -> None:
    # Not a benchmark: a bound on the relay's overhead, and a number in the log.
    query = dns.message.make_query("www.test", "A").to_wire()
    rounds = 200
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((dns_server.host, dns_server.port))
        start = time.perf_counter()
        for _ in range(rounds):
            sock.send(query)
            sock.recv(512)
        per_query = (time.perf_counter() - start) / rounds
    print(f"UDP DNS round trip through tether: {per_query * 1e6:.0f} us")
    assert per_query < 0.05
