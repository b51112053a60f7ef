"""Table-driven decisions under the default policy: every range, boundary and host form.

Each row is (host, port, transport, allowed, rule that decided). Boundaries
are written out by hand (first and last address inside a range, first
outside) rather than computed from the table under test.
"""

# ruff: noqa: RUF001  (fullwidth and circled characters are test inputs)

from __future__ import annotations

import pytest

from tether.policy import DEFAULT_ALLOW_RULE, Decider, PolicySet, Transport
from tether.resolver import StaticResolver

TCP = Transport.TCP
UDP = Transport.UDP
OK = DEFAULT_ALLOW_RULE
INVALID = "deny invalid host"

RESOLVER = StaticResolver(
    {
        "public.test": ["93.184.216.34"],
        "public6.test": ["2606:4700:4700::1111"],
        "private.test": ["10.0.0.1"],
        "mixed.test": ["10.0.0.1", "93.184.216.34"],
        "allbad.test": ["10.0.0.1", "127.0.0.1"],
        "loop.test": ["127.0.0.1"],
        "v6loop.test": ["::1"],
        "mapped.test": ["::ffff:127.0.0.1"],
        "meta.test": ["169.254.169.254"],
        "ula.test": ["fd00:ec2::254"],
    }
)

V4_RANGES = [
    # 0.0.0.0/8 'this network'
    ("0.0.0.0", False, "deny 0.0.0.0/8"),
    ("0.255.255.255", False, "deny 0.0.0.0/8"),
    ("1.0.0.0", True, OK),
    # 10.0.0.0/8 private-use
    ("9.255.255.255", True, OK),
    ("10.0.0.0", False, "deny 10.0.0.0/8"),
    ("10.255.255.255", False, "deny 10.0.0.0/8"),
    ("11.0.0.0", True, OK),
    # 100.64.0.0/10 shared address space
    ("100.63.255.255", True, OK),
    ("100.64.0.0", False, "deny 100.64.0.0/10"),
    ("100.127.255.255", False, "deny 100.64.0.0/10"),
    ("100.128.0.0", True, OK),
    # 127.0.0.0/8 loopback
    ("126.255.255.255", True, OK),
    ("127.0.0.0", False, "deny 127.0.0.0/8"),
    ("127.0.0.1", False, "deny 127.0.0.0/8"),
    ("127.255.255.255", False, "deny 127.0.0.0/8"),
    ("128.0.0.0", True, OK),
    # 169.254.0.0/16 link-local
    ("169.253.255.255", True, OK),
    ("169.254.0.0", False, "deny 169.254.0.0/16"),
    ("169.254.169.254", False, "deny 169.254.0.0/16"),
    ("169.254.255.255", False, "deny 169.254.0.0/16"),
    ("169.255.0.0", True, OK),
    # 172.16.0.0/12 private-use
    ("172.15.255.255", True, OK),
    ("172.16.0.0", False, "deny 172.16.0.0/12"),
    ("172.31.255.255", False, "deny 172.16.0.0/12"),
    ("172.32.0.0", True, OK),
    # 192.0.0.0/24 IETF protocol assignments
    ("191.255.255.255", True, OK),
    ("192.0.0.0", False, "deny 192.0.0.0/24"),
    ("192.0.0.9", False, "deny 192.0.0.0/24"),
    ("192.0.0.255", False, "deny 192.0.0.0/24"),
    ("192.0.1.0", True, OK),
    # 192.0.2.0/24 TEST-NET-1
    ("192.0.1.255", True, OK),
    ("192.0.2.0", False, "deny 192.0.2.0/24"),
    ("192.0.2.255", False, "deny 192.0.2.0/24"),
    ("192.0.3.0", True, OK),
    # 192.88.99.0/24 6to4 relay anycast
    ("192.88.98.255", True, OK),
    ("192.88.99.0", False, "deny 192.88.99.0/24"),
    ("192.88.99.255", False, "deny 192.88.99.0/24"),
    ("192.88.100.0", True, OK),
    # 192.168.0.0/16 private-use
    ("192.167.255.255", True, OK),
    ("192.168.0.0", False, "deny 192.168.0.0/16"),
    ("192.168.255.255", False, "deny 192.168.0.0/16"),
    ("192.169.0.0", True, OK),
    # 198.18.0.0/15 benchmarking
    ("198.17.255.255", True, OK),
    ("198.18.0.0", False, "deny 198.18.0.0/15"),
    ("198.19.255.255", False, "deny 198.18.0.0/15"),
    ("198.20.0.0", True, OK),
    # 198.51.100.0/24 TEST-NET-2
    ("198.51.99.255", True, OK),
    ("198.51.100.0", False, "deny 198.51.100.0/24"),
    ("198.51.100.255", False, "deny 198.51.100.0/24"),
    ("198.51.101.0", True, OK),
    # 203.0.113.0/24 TEST-NET-3
    ("203.0.112.255", True, OK),
    ("203.0.113.0", False, "deny 203.0.113.0/24"),
    ("203.0.113.255", False, "deny 203.0.113.0/24"),
    ("203.0.114.0", True, OK),
    # 224.0.0.0/4 multicast, 240.0.0.0/4 reserved, limited broadcast
    ("223.255.255.255", True, OK),
    ("224.0.0.0", False, "deny 224.0.0.0/4"),
    ("239.255.255.255", False, "deny 224.0.0.0/4"),
    ("240.0.0.0", False, "deny 240.0.0.0/4"),
    ("255.255.255.254", False, "deny 240.0.0.0/4"),
    ("255.255.255.255", False, "deny 255.255.255.255/32"),
    # Public addresses. Google's own ranges are not blocked (App Engine
    # blocked them to protect its own infrastructure; Tether has no such).
    ("93.184.216.34", True, OK),
    ("1.1.1.1", True, OK),
    ("8.8.8.8", True, OK),
]

V6_RANGES = [
    ("::", False, "deny ::/128"),
    ("::1", False, "deny ::1/128"),
    ("::2", False, "deny 0.0.0.0/8"),  # IPv4-compatible 0.0.0.2
    ("::ffff:8.8.8.8", False, "deny ::ffff:0:0/96"),
    ("::ffff:0:8.8.8.8", False, "deny ::ffff:0:0:0/96"),
    ("::8.8.8.8", False, "deny ::/96"),
    ("64:ff9b::8.8.8.8", False, "deny 64:ff9b::/96"),
    # Every RFC 6052 reading of this one is 8.8.8.8, so the outer range decides.
    ("64:ff9b:1:808:8:808:808:808", False, "deny 64:ff9b:1::/48"),
    ("64:ff9b:1::808:808", False, "deny 0.0.0.0/8"),  # its /48 reading is 0.0.0.0
    ("100::1", False, "deny 100::/64"),
    ("100:0:0:1::", False, "deny ::/3"),
    ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", False, "deny ::/3"),
    ("2000::", True, OK),
    ("2000::1", True, OK),
    ("2000:ffff:ffff:ffff:ffff:ffff:ffff:ffff", True, OK),
    # 2001::/23 IETF assignments, 2001::/32 Teredo inside it
    # (server 8.8.8.8, client ~f7f7:f7f7 = 8.8.8.8: only the outer range
    # can deny these; the others embed a denied server or client)
    ("2001:0:808:808::f7f7:f7f7", False, "deny 2001::/32"),
    ("2001:0:808:808:ffff:ffff:f7f7:f7f7", False, "deny 2001::/32"),
    ("2001::", False, "deny 255.255.255.255/32"),  # client ~0
    ("2001:0:ffff:ffff:ffff:ffff:ffff:ffff", False, "deny 0.0.0.0/8"),  # client ~ffffffff
    ("2001:1::1", False, "deny 2001::/23"),
    ("2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", False, "deny 2001::/23"),
    ("2001:200::", True, OK),
    # 2001:db8::/32 documentation
    ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", True, OK),
    ("2001:db8::", False, "deny 2001:db8::/32"),
    ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", False, "deny 2001:db8::/32"),
    ("2001:db9::", True, OK),
    # 2002::/16 6to4 (these embed public 8.8.8.8, so the outer range decides)
    ("2001:ffff:ffff:ffff:ffff:ffff:ffff:ffff", True, OK),
    ("2002:808:808::", False, "deny 2002::/16"),
    ("2002:808:808:ffff:ffff:ffff:ffff:ffff", False, "deny 2002::/16"),
    ("2003::", True, OK),
    # 3fff::/20 documentation
    ("3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", True, OK),
    ("3fff::", False, "deny 3fff::/20"),
    ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", False, "deny 3fff::/20"),
    ("3fff:1000::", True, OK),
    # Outside 2000::/3
    ("4000::", False, "deny 4000::/2"),
    ("7fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", False, "deny 4000::/2"),
    ("8000::", False, "deny 8000::/1"),
    ("e000::1", False, "deny 8000::/1"),
    ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", False, "deny 8000::/1"),
    ("fc00::", False, "deny fc00::/7"),
    ("fd00:ec2::254", False, "deny fc00::/7"),
    ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", False, "deny fc00::/7"),
    ("fe00::", False, "deny 8000::/1"),
    ("fe80::", False, "deny fe80::/10"),
    ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", False, "deny fe80::/10"),
    ("fec0::1", False, "deny fec0::/10"),
    ("ff02::1", False, "deny ff00::/8"),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", False, "deny ff00::/8"),
    # Public
    ("2606:4700:4700::1111", True, OK),
    ("2001:4860:4860::8888", True, OK),
]

FORMS = [
    # IPv4 forms inet_aton reads (all 127.0.0.1 unless noted)
    ("2130706433", False, "deny 127.0.0.0/8"),
    ("0x7f000001", False, "deny 127.0.0.0/8"),
    ("0X7F000001", False, "deny 127.0.0.0/8"),
    ("0x7f.1", False, "deny 127.0.0.0/8"),
    ("0x7f.0.0.1", False, "deny 127.0.0.0/8"),
    ("0x7f.0x0.0x0.0x1", False, "deny 127.0.0.0/8"),
    ("0177.0.0.1", False, "deny 127.0.0.0/8"),
    ("0177.1", False, "deny 127.0.0.0/8"),
    ("017700000001", False, "deny 127.0.0.0/8"),
    ("00000177.0.0.01", False, "deny 127.0.0.0/8"),
    ("127.1", False, "deny 127.0.0.0/8"),
    ("127.0.1", False, "deny 127.0.0.0/8"),
    ("127.0.0.1.", False, "deny 127.0.0.0/8"),
    ("127.1.", False, "deny 127.0.0.0/8"),
    ("0", False, "deny 0.0.0.0/8"),
    ("0x0", False, "deny 0.0.0.0/8"),
    ("0.0", False, "deny 0.0.0.0/8"),
    ("", False, "deny 0.0.0.0/8"),  # CPython: INADDR_ANY
    ("<broadcast>", False, "deny 255.255.255.255/32"),
    ("4294967295", False, "deny 255.255.255.255/32"),
    ("167772161", False, "deny 10.0.0.0/8"),
    ("0xa.1", False, "deny 10.0.0.0/8"),
    ("012.0.0.1", False, "deny 10.0.0.0/8"),  # octal 12 = 10
    ("0xA9FEA9FE", False, "deny 169.254.0.0/16"),
    ("0251.0376.0251.0376", False, "deny 169.254.0.0/16"),
    ("169.16689662", False, "deny 169.254.0.0/16"),
    ("3232235521", False, "deny 192.168.0.0/16"),
    ("0xc0a80001", False, "deny 192.168.0.0/16"),
    ("192.168.1", False, "deny 192.168.0.0/16"),
    ("1572395042", True, OK),  # 93.184.216.34
    ("0x5d.0xb8.0xd8.0x22", True, OK),
    ("93.12113954", True, OK),
    ("93.184.55330", True, OK),
    # IPv6 forms
    ("[::1]", False, "deny ::1/128"),
    ("0:0:0:0:0:0:0:1", False, "deny ::1/128"),
    ("[::ffff:127.0.0.1]", False, "deny 127.0.0.0/8"),
    ("::FFFF:7F00:1", False, "deny 127.0.0.0/8"),
    ("::ffff:0:127.0.0.1", False, "deny 127.0.0.0/8"),
    ("::127.0.0.1", False, "deny 127.0.0.0/8"),
    ("[::ffff:169.254.169.254]", False, "deny 169.254.0.0/16"),
    ("::ffff:a9fe:a9fe", False, "deny 169.254.0.0/16"),
    ("64:ff9b::127.0.0.1", False, "deny 127.0.0.0/8"),
    ("64:FF9B::A9FE:A9FE", False, "deny 169.254.0.0/16"),
    ("64:ff9b:1:7f00:0:100::", False, "deny 127.0.0.0/8"),
    ("2002:7f00:1::1", False, "deny 127.0.0.0/8"),
    ("2002:a00:1::", False, "deny 10.0.0.0/8"),
    ("2002::", False, "deny 0.0.0.0/8"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", False, "deny 127.0.0.0/8"),  # Teredo
    ("[fe80::1%eth0]", False, "deny fe80::/10"),
    ("fe80::1%25eth0", False, "deny fe80::/10"),
    ("[::]", False, "deny ::/128"),
    ("[2606:4700:4700::1111]", True, OK),
    ("2606:4700:4700:0:0:0:0:1111", True, OK),
    # Reserved names, any case, trailing dot
    ("localhost", False, "deny localhost"),
    ("LOCALHOST", False, "deny localhost"),
    ("LocalHost.", False, "deny localhost"),
    ("localhost.localdomain", False, "deny localhost.localdomain"),
    ("ip6-localhost", False, "deny ip6-localhost"),
    ("foo.localhost", False, "deny *.localhost"),
    ("a.b.LOCALHOST.", False, "deny *.localhost"),
    ("metadata.google.internal", False, "deny metadata.google.internal"),
    ("METADATA.GOOGLE.INTERNAL.", False, "deny metadata.google.internal"),
    ("metadata.goog", False, "deny metadata.goog"),
    ("metadata", False, "deny metadata"),
    ("instance-data", False, "deny instance-data"),
    ("instance-data.ec2.internal", False, "deny instance-data.ec2.internal"),
    # Unicode: NFKC / idna readings
    ("１２７.０.０.１", False, "deny 127.0.0.0/8"),
    ("127。0。0。1", False, "deny 127.0.0.0/8"),
    ("127．0．0．1", False, "deny 127.0.0.0/8"),
    ("①②⑦.0.0.1", False, "deny 127.0.0.0/8"),
    ("１０.０.０.１", False, "deny 10.0.0.0/8"),
    ("０ｘ７ｆ．１", False, "deny 127.0.0.0/8"),
    ("ｌｏｃａｌｈｏｓｔ", False, "deny localhost"),
    ("ＬＯＣＡＬＨＯＳＴ", False, "deny localhost"),
    # Malformed hosts: denied before any lookup
    ("127.0.0.1\x00.example.com", False, INVALID),
    ("public.test\x00", False, INVALID),
    ("127.0.0.256", False, INVALID),
    ("4294967296", False, INVALID),
    ("08.0.0.1", False, INVALID),
    ("1.2.3.4.5", False, INVALID),
    ("0x", False, INVALID),
    ("1.2.3.0x1f0", False, INVALID),
    ("[127.0.0.1]", False, INVALID),
    ("[::1", False, INVALID),
    ("127.0.0.1 x", False, INVALID),
    ("93.184.216.34\t", False, INVALID),
    (" 93.184.216.34", False, INVALID),
    ("exa mple.test", False, INVALID),
    ("a..test", False, INVALID),
    ("public.test..", False, INVALID),
    (":::", False, INVALID),
    ("public.test:80", False, INVALID),
    ("1.2.3.4%eth0", False, INVALID),
    ("a" * 64 + ".test", False, INVALID),
    ("\udcff.test", False, INVALID),
    # Names, resolved by the static table
    ("public.test", True, OK),
    ("PUBLIC.TEST.", True, OK),
    ("public6.test", True, OK),
    ("private.test", False, "deny 10.0.0.0/8"),
    ("mixed.test", True, OK),
    ("allbad.test", False, "deny 10.0.0.0/8"),
    ("loop.test", False, "deny 127.0.0.0/8"),
    ("v6loop.test", False, "deny ::1/128"),
    ("mapped.test", False, "deny 127.0.0.0/8"),
    ("meta.test", False, "deny 169.254.0.0/16"),
    ("ula.test", False, "deny fc00::/7"),
]

PORTS = [
    ("93.184.216.34", 25, TCP, False, "deny port 25"),
    ("93.184.216.34", 25, UDP, False, "deny port 25"),
    ("93.184.216.34", 21, TCP, False, "deny port 21"),
    ("93.184.216.34", 587, TCP, True, OK),
    ("93.184.216.34", 465, TCP, True, OK),
    ("93.184.216.34", 1, TCP, True, OK),
    ("93.184.216.34", 65535, TCP, True, OK),
    ("93.184.216.34", 0, TCP, False, "deny port 0"),
    ("93.184.216.34", 65536, TCP, False, "deny port 65536"),
    ("93.184.216.34", -1, TCP, False, "deny port -1"),
    ("public.test", 25, TCP, False, "deny port 25"),
    ("public.test", 0, TCP, False, "deny port 0"),
    ("8.8.8.8", 53, UDP, True, "allow 8.8.8.8:53"),
    ("8.8.4.4", 53, TCP, True, "allow 8.8.4.4:53"),
    ("2001:4860:4860::8844", 53, UDP, True, "allow [2001:4860:4860::8844]:53"),
    ("255.255.255.255", 53, UDP, False, "deny 255.255.255.255/32"),
    ("<broadcast>", 9, UDP, False, "deny 255.255.255.255/32"),
    ("224.0.0.251", 5353, UDP, False, "deny 224.0.0.0/4"),
    ("ff02::fb", 5353, UDP, False, "deny ff00::/8"),
    ("10.0.0.1", 25, TCP, False, "deny port 25"),  # port rules come before ranges
]

CASES = (
    [pytest.param(h, 80, TCP, a, r, id=f"v4:{h}") for h, a, r in V4_RANGES]
    + [pytest.param(h, 80, TCP, a, r, id=f"v6:{h}") for h, a, r in V6_RANGES]
    + [pytest.param(h, 443, TCP, a, r, id=f"form:{h!r}") for h, a, r in FORMS]
    + [pytest.param(h, p, t, a, r, id=f"port:{h}:{p}/{t.value}") for h, p, t, a, r in PORTS]
)


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 150


@pytest.mark.parametrize(("host", "port", "transport", "allowed", "rule"), CASES)
def test_default_policy(
    host: str, port: int, transport: Transport, allowed: bool, rule: str
) -> None:
    decider = Decider(PolicySet())
    decision = decider.decide("demo", host, port, transport, resolver=RESOLVER)
    assert decision.allowed is allowed, decision.describe()
    assert decision.rule == rule, decision.describe()
    assert not decision.would_deny
    assert decision.mode == "enforce"
    if allowed:
        assert decision.addresses
        assert all(c.allowed for c in decision.candidates if c.address in decision.addresses)
    else:
        assert decision.addresses == ()
        assert not any(c.allowed for c in decision.candidates)
    # Every address handed to the gateway is numeric and was judged allowed.
    judged = {c.address: c for c in decision.candidates}
    for address in decision.addresses:
        assert judged[address].allowed


@pytest.mark.parametrize(("host", "port", "transport", "allowed", "rule"), CASES)
def test_predecide_agrees_with_decide(
    host: str, port: int, transport: Transport, allowed: bool, rule: str
) -> None:
    """A pre-lookup answer, when there is one, is the same as the full decision."""
    decider = Decider(PolicySet())
    target = decider.normalize(host)
    early = decider.predecide("demo", target, port, transport)
    if early is None:
        assert target.needs_lookup
        return
    assert early.allowed is allowed
    assert early.rule == rule
