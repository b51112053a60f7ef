"""End to end: a `tether serve` in upstream mode, asked by an app through tether.

The gateway's upstream is the loopback test DNS server; the static hosts
table (tests/support.py) still answers first. getaddrinfo results for the
table's names and for numeric literals are compared with the stdlib's, which
is only ever called with numeric hosts and AI_NUMERICHOST (no DNS).
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
from dnsserver import DNSServer
from support import STATIC_HOSTS, Gateway, gateway_config, installed, start_gateway

from tether.config import load_config
from tether.policy import Decider

STD_GETADDRINFO = socket.getaddrinfo  # bound before any install(): the stdlib's


def std_numeric(host: str | None, *args: object) -> list[tuple[object, ...]]:
    if host is not None:
        ipaddress.ip_address(host)  # never a name: the stdlib would ask real DNS
    port, family, socktype, proto, flags = [*args, None, 0, 0, 0, 0][:5]
    return list(STD_GETADDRINFO(host, port, family, socktype, proto, flags | socket.AI_NUMERICHOST))


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer() as srv:
        srv.add_host("ns.test", "127.0.0.1")
        srv.add_host("www.up.test", "127.0.0.1", "::1")
        srv.add("alias.up.test", "CNAME", "www.up.test")
        srv.add("mx.up.test", "MX", "10 www.up.test.")
        srv.add_host("mixed.up.test", "127.0.0.1", "10.0.0.1")
        srv.add_ptr("127.0.0.5", "five.up.test")
        srv.rcodes["broken.up.test"] = dns.rcode.SERVFAIL
        yield srv


def upstream_config(key: str, srv: DNSServer, extra: str = "") -> str:
    text = gateway_config(key)
    return text.replace(
        'mode = "static"',
        f'mode = "upstream"\nservers = ["{srv.address}"]\ntimeout = 1\nattempts = 1\n{extra}',
    )


def _start(tmp: Path, srv: DNSServer, extra: str = "") -> Iterator[Gateway]:
    key = secrets.token_urlsafe(16)
    gw = start_gateway(tmp, upstream_config(key, srv, extra), key)
    yield gw
    gw.process.stop()


@pytest.fixture(scope="module")
def upstream_gateway(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DNSServer
) -> Iterator[Gateway]:
    yield from _start(tmp_path_factory.mktemp("upstream"), dns_server)


@pytest.fixture(scope="module")
def hiding_gateway(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DNSServer
) -> Iterator[Gateway]:
    yield from _start(tmp_path_factory.mktemp("hiding"), dns_server, "hide_denied = true\n")


@pytest.fixture
def app(upstream_gateway: Gateway) -> Iterator[Gateway]:
    with installed(upstream_gateway):
        yield upstream_gateway


@pytest.fixture
def hiding_app(hiding_gateway: Gateway) -> Iterator[Gateway]:
    with installed(hiding_gateway):
        yield hiding_gateway


def test_names_from_the_upstream_server(app: Gateway, dns_server: DNSServer) -> None:
    infos = socket.getaddrinfo(
        "alias.up.test", 80, type=socket.SOCK_STREAM, flags=socket.AI_CANONNAME
    )
    assert [i[4][0] for i in infos] == ["127.0.0.1", "::1"]
    assert infos[0][3] == "www.up.test"  # the end of the CNAME chain, as glibc says
    assert socket.gethostbyname("www.up.test") == "127.0.0.1"
    assert socket.gethostbyname_ex("alias.up.test") == (
        "www.up.test",
        ["alias.up.test"],
        ["127.0.0.1"],
    )
    assert socket.gethostbyaddr("127.0.0.5") == ("five.up.test", [], ["127.0.0.5"])
    assert socket.getnameinfo(("127.0.0.5", 80), 0) == ("five.up.test", "http")
    assert socket.getnameinfo(("127.0.0.9", 80), 0) == ("127.0.0.9", "http")
    assert socket.getfqdn("127.0.0.5") == "five.up.test"


@pytest.mark.parametrize(
    ("call", "error", "code"),
    [
        (lambda: socket.getaddrinfo("nope.up.test", 80), socket.gaierror, socket.EAI_NONAME),
        (lambda: socket.getaddrinfo("mx.up.test", 80), socket.gaierror, socket.EAI_NODATA),
        (lambda: socket.getaddrinfo("broken.up.test", 80), socket.gaierror, socket.EAI_AGAIN),
        (lambda: socket.gethostbyname("nope.up.test"), socket.gaierror, socket.EAI_NONAME),
        (lambda: socket.gethostbyaddr("127.0.0.9"), socket.herror, 1),
        (
            lambda: socket.getnameinfo(("127.0.0.9", 80), socket.NI_NAMEREQD),
            socket.gaierror,
            socket.EAI_NONAME,
        ),
    ],
)
def test_errors(app: Gateway, call: object, error: type[OSError], code: int) -> None:
    with pytest.raises(error) as caught:
        call()  # type: ignore[operator]
    assert caught.value.errno == code


def test_static_table_answers_first(app: Gateway, dns_server: DNSServer) -> None:
    dns_server.reset_counts()
    assert socket.gethostbyname("mail.test") == "127.0.0.1"
    assert dns_server.count() == 0


def test_connect_by_name_resolves_once_then_from_the_cache(
    app: Gateway, dns_server: DNSServer
) -> None:
    dns_server.reset_counts()
    for _ in range(2):
        # A TCP connection through the gateway to the DNS server, found by its name.
        with socket.create_connection(("ns.test", dns_server.port), timeout=5) as sock:
            query = dns.message.make_query("www.up.test", "A")
            dns.query.send_tcp(sock, query)
            reply, _ = dns.query.receive_tcp(sock)
            assert reply.answer[0][0].to_text() == "127.0.0.1"
    assert dns_server.count("ns.test", "A") == 1  # the second connect used the cache


def test_dnspython_tcp_query_through_tether(app: Gateway, dns_server: DNSServer) -> None:
    reply = dns.query.tcp(
        dns.message.make_query("alias.up.test", "AAAA"),
        "127.0.0.1",
        port=dns_server.port,
        timeout=5,
    )
    assert [r.to_text() for r in reply.answer] == [
        "alias.up.test. 300 IN CNAME www.up.test.",
        "www.up.test. 300 IN AAAA ::1",
    ]


def test_denied_addresses_are_shown_by_default(app: Gateway) -> None:
    infos = socket.getaddrinfo("mixed.up.test", 80, type=socket.SOCK_STREAM)
    # (an RRset has no order: compare as sets)
    assert {i[4][0] for i in infos} == {"127.0.0.1", "10.0.0.1"}
    # The gateway refuses before it opens any socket; make sure its policy
    # says so first, so a config change can never make this test send.
    policy = load_config(app.config_path).policy
    assert not Decider(policy).decide(app.app, "10.0.0.1", 80).allowed
    with pytest.raises(PermissionError):
        socket.create_connection(("10.0.0.1", 80), timeout=5)


def test_hide_denied_leaves_them_out(hiding_app: Gateway) -> None:
    infos = socket.getaddrinfo("mixed.up.test", 80, type=socket.SOCK_STREAM)
    assert [i[4][0] for i in infos] == ["127.0.0.1"]
    assert socket.gethostbyname_ex("mixed.up.test")[2] == ["127.0.0.1"]
    assert [i[4][0] for i in socket.getaddrinfo("mixed.up.test", None)] == ["127.0.0.1"] * 3


# -- the stdlib's shapes ----------------------------------------------------------

FAMILIES = [0, socket.AF_INET, socket.AF_INET6]
SOCKTYPES = [0, socket.SOCK_STREAM, socket.SOCK_DGRAM]
PORTS = [None, 80, "http", "domain", "0"]
FLAGS = [0, socket.AI_PASSIVE, socket.AI_CANONNAME, socket.AI_CANONNAME | socket.AI_PASSIVE]


def expected_for_name(name: str, port: object, family: int, socktype: int, flags: int) -> list:
    out: list[tuple[object, ...]] = []
    for address in STATIC_HOSTS[name]:
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        if family in (0, fam):
            out.extend(std_numeric(address, port, fam, socktype, 0, flags))
    if out and flags & socket.AI_CANONNAME:
        out = [(*e[:3], name if i == 0 else "", e[4]) for i, e in enumerate(out)]
    return out


@pytest.mark.parametrize("name", sorted(STATIC_HOSTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_getaddrinfo_matches_the_stdlib_for_table_names(
    app: Gateway, name: str, family: int
) -> None:
    for socktype in SOCKTYPES:
        for port in PORTS:
            for flags in FLAGS:
                args = (name, port, family, socktype, 0, flags)
                try:
                    expected: object = expected_for_name(name, port, family, socktype, flags)
                except socket.gaierror as exc:
                    expected = exc.errno  # a service the socket type has not: EAI_SERVICE
                try:
                    got: object = socket.getaddrinfo(*args)
                except socket.gaierror as exc:
                    got = exc.errno
                if expected == []:  # no address of that family: some gaierror
                    assert isinstance(got, int), args
                else:
                    assert got == expected, args


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "10.1.2.3", "fe80::1%1", None])
@pytest.mark.parametrize("numeric", [0, socket.AI_NUMERICHOST])
def test_getaddrinfo_matches_the_stdlib_for_literals(
    app: Gateway, host: str | None, numeric: int
) -> None:
    for family in FAMILIES:
        for socktype in SOCKTYPES:
            for port in PORTS:
                for flags in FLAGS:
                    args = (host, port, family, socktype, 0, flags | numeric)
                    try:
                        expected: object = std_numeric(*args)
                    except socket.gaierror as exc:
                        expected = exc.errno
                    try:
                        got: object = socket.getaddrinfo(*args)
                    except socket.gaierror as exc:
                        got = exc.errno
                    assert got == expected, args


def test_numerichost_with_a_name_is_eai_noname(app: Gateway, dns_server: DNSServer) -> None:
    dns_server.reset_counts()
    with pytest.raises(socket.gaierror) as caught:
        socket.getaddrinfo("www.up.test", 80, flags=socket.AI_NUMERICHOST)
    assert caught.value.errno == socket.EAI_NONAME
    assert dns_server.count() == 0
