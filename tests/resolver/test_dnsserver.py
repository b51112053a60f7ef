"""The loopback test DNS server itself (tests/dnsserver.py): answers, TC, counting."""

from __future__ import annotations

from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
from dnsserver import DNSServer, Record


@pytest.fixture
def server() -> Iterator[DNSServer]:
    with DNSServer([Record("www.test", "A", "127.0.0.1", ttl=30)]) as srv:
        srv.add("www.test", "AAAA", "::1", ttl=40)
        srv.add("alias.test", "CNAME", "www.test", ttl=10)
        srv.add_ptr("127.0.0.1", "www.test")
        for i in range(60):
            srv.add("big.test", "A", f"127.0.1.{i}")
        yield srv


def ask(srv: DNSServer, name: str, rdtype: str, *, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(query, srv.host, port=srv.port, timeout=2)
    return dns.query.udp(query, srv.host, port=srv.port, timeout=2)


@pytest.mark.parametrize(
    ("name", "rdtype", "rcode", "answer"),
    [
        ("www.test", "A", dns.rcode.NOERROR, ["www.test. 30 IN A 127.0.0.1"]),
        ("WWW.test.", "AAAA", dns.rcode.NOERROR, ["www.test. 40 IN AAAA ::1"]),
        (
            "alias.test",
            "A",
            dns.rcode.NOERROR,
            ["alias.test. 10 IN CNAME www.test.", "www.test. 30 IN A 127.0.0.1"],
        ),
        ("alias.test", "CNAME", dns.rcode.NOERROR, ["alias.test. 10 IN CNAME www.test."]),
        (
            "1.0.0.127.in-addr.arpa",
            "PTR",
            dns.rcode.NOERROR,
            ["1.0.0.127.in-addr.arpa. 300 IN PTR www.test."],
        ),
        ("www.test", "MX", dns.rcode.NOERROR, []),
        ("nope.test", "A", dns.rcode.NXDOMAIN, []),
    ],
)
def test_answers(
    server: DNSServer, name: str, rdtype: str, rcode: dns.rcode.Rcode, answer: list[str]
) -> None:
    for tcp in (False, True):
        reply = ask(server, name, rdtype, tcp=tcp)
        assert reply.rcode() == rcode
        # Owner names keep the question's case, as real servers do (DNS 0x20).
        assert [r.to_text().lower() for r in reply.answer] == [a.lower() for a in answer]
        if not answer:
            # Negative answers carry the SOA so resolvers can cache them (RFC 2308).
            assert [r.rdtype for r in reply.authority] == [dns.rdatatype.SOA]


def test_big_answer_is_truncated_over_udp_and_complete_over_tcp(server: DNSServer) -> None:
    udp = ask(server, "big.test", "A")
    assert udp.flags & dns.flags.TC and not udp.answer
    tcp = ask(server, "big.test", "A", tcp=True)
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 60
    assert server.count("big.test", "A", transport="udp") == 1
    assert server.count("big.test", transport="tcp") == 1


def test_chosen_names_truncated_rcodes_and_silence(server: DNSServer) -> None:
    server.truncate_names.add("www.test")
    assert ask(server, "www.test", "A").flags & dns.flags.TC
    server.rcodes["www.test"] = dns.rcode.SERVFAIL
    assert ask(server, "www.test", "A", tcp=True).rcode() == dns.rcode.SERVFAIL
    server.silent_names.add("www.test.")
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(
            dns.message.make_query("www.test", "A"), server.host, port=server.port, timeout=0.2
        )
    assert server.count("www.test") == 3
    server.reset_counts()
    assert server.count() == 0


def test_ipv6_loopback() -> None:
    with DNSServer(host="::1") as srv:
        srv.add_host("v6.test", "::1")
        assert srv.address == f"[::1]:{srv.port}"
        assert ask(srv, "v6.test", "AAAA").answer[0][0].to_text() == "::1"
