"""Decider semantics: rule order, name vs address rules, ports, apps, report mode,
embedded IPv4, the gateway's own addresses, pre-lookup decisions, rebinding."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.policy import (
    DEFAULT_DENY_TABLE,
    Decider,
    Decision,
    PolicySet,
    ResolutionError,
    Target,
    Transport,
    classify,
    parse_policy,
)
from tether.resolver import StaticResolver

TCP, UDP = Transport.TCP, Transport.UDP
PUBLIC = "93.184.216.34"

HOSTS = StaticResolver(
    {
        "a.example.com": ["10.0.0.1"],
        "b.example.com": [PUBLIC],
        "mixed.example.com": ["127.0.0.1", PUBLIC, "::1"],
        "other.test": ["1.1.1.1"],
        "good.test": [PUBLIC],
        "bad.test": [PUBLIC],
        "mail.test": [PUBLIC],
        "db.test": ["10.1.2.3"],
        "dns.test": ["10.0.0.53"],
        "smtp.gmail.com": ["142.250.1.108"],
        "imap.gmail.com": ["142.250.1.109"],
        "localhost": ["127.0.0.1", "::1"],
        "metadata.google.internal": [PUBLIC],
    }
)


def decider(
    policy: dict[str, Any] | None = None,
    apps: dict[str, dict[str, Any]] | None = None,
    self_addresses: Sequence[tuple[str, int]] = (),
) -> Decider:
    return Decider(parse_policy(policy, apps), self_addresses)


class NoLookup:
    """A resolver that fails the test if it is asked anything."""

    def resolve(self, name: str) -> Sequence[str]:
        raise AssertionError(f"unexpected lookup of {name!r}")


# --- name rules vouch for names, not addresses (SSRF) --------------------------


def test_wildcard_name_rule_does_not_open_private_answers() -> None:
    d = decider({"allow": ["*.example.com:443"]})
    decision = d.decide("demo", "a.example.com", 443, resolver=HOSTS)
    assert not decision.allowed
    assert decision.rule == "deny 10.0.0.0/8"
    assert decision.reason == "10.0.0.0/8 is private-use (RFC 1918)"
    allowed = d.decide("demo", "b.example.com", 443, resolver=HOSTS)
    assert allowed.allowed
    assert allowed.rule == "allow *.example.com:443"
    assert allowed.addresses == (PUBLIC,)


def test_address_rule_opens_a_private_range() -> None:
    d = decider({"allow": ["*.example.com:443", "10.0.0.0/8:443"]})
    decision = d.decide("demo", "a.example.com", 443, resolver=HOSTS)
    assert decision.allowed
    assert decision.addresses == ("10.0.0.1",)


def test_name_allow_cannot_reach_an_address_deny_rule() -> None:
    d = decider({"allow": ["*.example.com:443"], "deny": ["93.184.216.0/24"]})
    decision = d.decide("demo", "b.example.com", 443, resolver=HOSTS)
    assert not decision.allowed
    assert decision.rule == "deny 93.184.216.0/24"


def test_mixed_answers_keep_only_allowed_addresses() -> None:
    d = decider({"allow": ["*.example.com:443"]})
    decision = d.decide("demo", "mixed.example.com", 443, resolver=HOSTS)
    assert decision.allowed
    assert decision.addresses == (PUBLIC,)
    assert [(c.address, c.allowed, c.rule) for c in decision.candidates] == [
        ("127.0.0.1", False, "deny 127.0.0.0/8"),
        (PUBLIC, True, "allow *.example.com:443"),
        ("::1", False, "deny ::1/128"),
    ]


def test_allowlist_mode_with_catch_all_deny() -> None:
    d = decider({"allow": ["*.example.com:443", "1.1.1.1:53/udp"], "deny": ["*"]})
    assert d.decide("demo", "b.example.com", 443, resolver=HOSTS).allowed
    assert d.decide("demo", "1.1.1.1", 53, UDP).allowed
    for host, port, transport in [
        ("b.example.com", 80, TCP),
        ("other.test", 443, TCP),
        ("1.1.1.1", 53, TCP),
        ("9.9.9.9", 443, TCP),
    ]:
        decision = d.decide("demo", host, port, transport, resolver=HOSTS)
        assert not decision.allowed
        assert decision.rule == "deny *"
    # The defaults come after the configured allow rules, before the deny.
    assert d.decide("demo", "8.8.8.8", 53, UDP).rule == "allow 8.8.8.8:53"


def test_name_deny_rule() -> None:
    d = decider({"deny": ["bad.test", "*.example.com"]})
    decision = d.decide("demo", "bad.test", 443, resolver=HOSTS)
    assert not decision.allowed
    assert decision.rule == "deny bad.test"
    assert decision.reason == "bad.test matches a deny rule"
    assert not d.decide("demo", "b.example.com", 443, resolver=HOSTS).allowed
    assert d.decide("demo", "good.test", 443, resolver=HOSTS).allowed


def test_allow_rules_come_before_deny_rules() -> None:
    d = decider({"allow": ["good.test:443"], "deny": ["*.test"]})
    assert d.decide("demo", "good.test", 443, resolver=HOSTS).allowed
    assert d.decide("demo", "good.test", 80, resolver=HOSTS).rule == "deny *.test"


def test_transport_specific_rules() -> None:
    d = decider({"allow": ["10.0.0.53:53/udp", "db.test:*/udp"]})
    assert d.decide("demo", "10.0.0.53", 53, UDP).allowed
    tcp = d.decide("demo", "10.0.0.53", 53, TCP)
    assert not tcp.allowed
    assert tcp.rule == "deny 10.0.0.0/8"
    # A name rule for UDP still leaves the private answer to the table.
    assert d.decide("demo", "dns.test", 53, UDP, resolver=HOSTS).allowed
    assert not d.decide("demo", "db.test", 53, UDP, resolver=HOSTS).allowed


# --- ports ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "allowed"),
    [
        ("mail.test", False),
        ("mail.test:*", False),
        ("mail.test:25", True),
        ("mail.test:20-30", True),
        ("93.184.216.0/24", False),
        ("93.184.216.0/24:25", True),
        ("*:25", True),
        ("*", False),
        ("mail.test:25/udp", False),
    ],
)
def test_port_25_needs_a_rule_that_names_it(rule: str, allowed: bool) -> None:
    d = decider({"allow": [rule]})
    decision = d.decide("demo", "mail.test", 25, resolver=HOSTS)
    assert decision.allowed is allowed, decision.describe()
    if not allowed:
        assert decision.rule == "deny port 25"
        assert "587" in decision.reason


def test_port_rule_does_not_open_a_denied_range() -> None:
    d = decider({"allow": ["*:25"]})
    decision = d.decide("demo", "db.test", 25, resolver=HOSTS)
    assert not decision.allowed
    assert decision.rule == "deny 10.0.0.0/8"


def test_custom_deny_ports() -> None:
    d = decider({"deny_ports": [8080]})
    decision = d.decide("demo", PUBLIC, 8080)
    assert not decision.allowed
    assert (decision.rule, decision.reason) == ("deny port 8080", "port 8080 is in deny_ports")
    assert d.decide("demo", PUBLIC, 25).allowed  # the list replaces the default


def test_allow_ports() -> None:
    d = decider({"allow_ports": [443], "allow": ["other.test:8443"]})
    assert d.decide("demo", PUBLIC, 443).allowed
    denied = d.decide("demo", PUBLIC, 80)
    assert not denied.allowed
    assert (denied.rule, denied.reason) == ("allow_ports", "port 80 is not in allow_ports")
    assert d.decide("demo", "other.test", 8443, resolver=HOSTS).allowed
    # App Engine's default allow list names its ports, so allow_ports does not close it.
    assert d.decide("demo", "8.8.8.8", 53, UDP).allowed
    assert d.decide("demo", "smtp.gmail.com", 465, resolver=HOSTS).allowed
    assert d.decide("demo", "smtp.gmail.com", 587, resolver=HOSTS).allowed
    assert d.decide("demo", "imap.gmail.com", 993, resolver=HOSTS).allowed
    assert not d.decide("demo", "smtp.gmail.com", 465, UDP, resolver=HOSTS).allowed


def test_defaults_false_drops_the_default_allow_list() -> None:
    d = decider({"allow_ports": [443], "defaults": False})
    assert not d.decide("demo", "8.8.8.8", 53, UDP).allowed
    assert not d.decide("demo", "smtp.gmail.com", 465, resolver=HOSTS).allowed


def test_default_allow_list_rules_are_reported() -> None:
    d = decider()
    assert d.decide("demo", "8.8.4.4", 53, TCP).rule == "allow 8.8.4.4:53"
    assert (
        d.decide("demo", "2001:4860:4860::8888", 53, UDP).rule == "allow [2001:4860:4860::8888]:53"
    )
    assert d.decide("demo", "smtp.gmail.com", 587, resolver=HOSTS).rule == (
        "allow smtp.gmail.com:587/tcp"
    )


# --- per-app rules and report mode ------------------------------------------------------


def test_app_rules_come_before_global_rules() -> None:
    d = decider(
        {"allow": ["good.test"], "deny": ["bad.test"]},
        {
            "billing": {"allow": ["bad.test:443", "10.1.0.0/16:5432"], "deny": ["good.test"]},
        },
    )
    assert d.decide("billing", "bad.test", 443, resolver=HOSTS).allowed
    assert not d.decide("other", "bad.test", 443, resolver=HOSTS).allowed
    billing_good = d.decide("billing", "good.test", 443, resolver=HOSTS)
    assert not billing_good.allowed
    assert billing_good.rule == "deny good.test"
    assert d.decide("other", "good.test", 443, resolver=HOSTS).allowed
    assert d.decide("billing", "db.test", 5432, resolver=HOSTS).allowed
    assert not d.decide("other", "db.test", 5432, resolver=HOSTS).allowed
    assert not d.decide("", "db.test", 5432, resolver=HOSTS).allowed


def test_report_mode_allows_and_flags() -> None:
    d = decider({"mode": "report"})
    decision = d.decide("demo", "10.1.2.3", 80)
    assert decision.allowed
    assert decision.would_deny
    assert decision.mode == "report"
    assert decision.addresses == ("10.1.2.3",)
    assert decision.rule == "deny 10.0.0.0/8"
    assert decision.describe() == (
        "tether: connection to 10.1.2.3:80 allowed for app 'demo' in report mode; "
        "enforce mode would deny it: 10.0.0.0/8 is private-use (RFC 1918) "
        "(rule: deny 10.0.0.0/8)"
    )
    log = decision.to_log()
    assert (log["verdict"], log["would_deny"], log["mode"]) == ("allow", True, "report")
    # A decision enforce mode would also allow is not flagged.
    assert not d.decide("demo", PUBLIC, 80).would_deny


def test_report_mode_per_app() -> None:
    d = decider({"mode": "enforce"}, {"trial": {"mode": "report"}})
    assert d.decide("trial", "10.0.0.1", 80).would_deny
    assert not d.decide("other", "10.0.0.1", 80).allowed
    d = decider({"mode": "report"}, {"strict": {"mode": "enforce"}})
    assert not d.decide("strict", "10.0.0.1", 80).allowed
    assert d.decide("other", "10.0.0.1", 80).allowed


def test_report_mode_looks_up_names_it_would_deny_before_lookup() -> None:
    d = decider({"mode": "report", "deny": ["bad.test"]})
    for host in ("localhost", "bad.test"):
        target = d.normalize(host)
        assert d.predecide("demo", target, 80, TCP) is None
    decision = d.decide("demo", "localhost", 80, resolver=HOSTS)
    assert decision.allowed and decision.would_deny
    assert decision.rule == "deny localhost"
    assert decision.addresses == ("127.0.0.1", "::1")


def test_report_mode_with_some_answers_allowed_connects_only_to_those() -> None:
    d = decider({"mode": "report"})
    decision = d.decide("demo", "mixed.example.com", 443, resolver=HOSTS)
    assert decision.allowed and not decision.would_deny
    assert decision.addresses == (PUBLIC,)


@pytest.mark.parametrize("host", ["10.0.0.1\x00.example.com", "127.0.0.1 x", "[127.0.0.1]"])
def test_report_mode_never_lifts_a_malformed_host(host: str) -> None:
    decision = decider({"mode": "report"}).decide("demo", host, 80, resolver=NoLookup())
    assert not decision.allowed
    assert decision.rule == "deny invalid host"


def test_report_mode_never_lifts_a_bad_port() -> None:
    assert not decider({"mode": "report"}).decide("demo", PUBLIC, 0).allowed


# --- reserved names ---------------------------------------------------------------------


def test_reserved_names_are_denied_without_a_lookup() -> None:
    d = decider()
    for host, rule in [
        ("localhost", "deny localhost"),
        ("db.localhost", "deny *.localhost"),
        ("metadata.google.internal", "deny metadata.google.internal"),
        ("instance-data", "deny instance-data"),
    ]:
        decision = d.decide("demo", host, 80, resolver=NoLookup())
        assert not decision.allowed
        assert decision.rule == rule
        assert decision.candidates == ()


def test_address_rule_lifts_localhost() -> None:
    # An operator who opens loopback means the name too (the suite's own gateways do).
    d = decider({"allow": ["127.0.0.0/8:*", "[::1]:*"]})
    target = d.normalize("localhost")
    assert d.predecide("demo", target, 8080, TCP) is None
    decision = d.decide("demo", "localhost", 8080, resolver=HOSTS)
    assert decision.allowed
    assert decision.addresses == ("127.0.0.1", "::1")


def test_exact_name_rule_lifts_a_reserved_name_but_not_the_range() -> None:
    d = decider({"allow": ["localhost:5432", "metadata.google.internal:80"]})
    decision = d.decide("demo", "localhost", 5432, resolver=HOSTS)
    assert not decision.allowed
    assert decision.rule == "deny 127.0.0.0/8"
    # A name mapped to a public address (a test double of the metadata server).
    assert d.decide("demo", "metadata.google.internal", 80, resolver=HOSTS).allowed
    assert not d.decide("demo", "metadata.google.internal", 81, resolver=HOSTS).allowed


def test_wildcard_rule_does_not_lift_reserved_names() -> None:
    d = decider({"allow": ["*", "*.localhost"]})
    assert d.decide("demo", "db.localhost", 80, resolver=NoLookup()).rule == "deny *.localhost"


# --- embedded IPv4 ------------------------------------------------------------------------


def test_ipv4_rule_opens_the_mapped_form_only() -> None:
    d = decider({"allow": ["127.0.0.1:80"]})
    assert d.decide("demo", "127.0.0.1", 80).allowed
    assert d.decide("demo", "::ffff:127.0.0.1", 80).allowed
    assert d.decide("demo", "[::ffff:7f00:1]", 80).allowed
    assert not d.decide("demo", "::ffff:127.0.0.2", 80).allowed
    assert d.decide("demo", "64:ff9b::127.0.0.1", 80).rule == "deny 64:ff9b::/96"
    assert d.decide("demo", "2002:7f00:1::", 80).rule == "deny 2002::/16"
    assert d.decide("demo", "::127.0.0.1", 80).rule == "deny ::/96"


def test_exact_ipv6_rule_names_the_embedded_address() -> None:
    d = decider({"allow": ["[::ffff:127.0.0.1]:80"]})
    assert d.decide("demo", "::ffff:127.0.0.1", 80).allowed
    assert not d.decide("demo", "127.0.0.1", 80).allowed


def test_broad_ipv6_rule_does_not_smuggle_embedded_addresses() -> None:
    d = decider({"allow": ["[::ffff:0:0/96]", "[64:ff9b::/96]"]})
    denied = d.decide("demo", "::ffff:127.0.0.1", 80)
    assert not denied.allowed
    assert denied.rule == "deny 127.0.0.0/8"
    assert denied.reason == "::ffff:7f00:1 embeds 127.0.0.1: 127.0.0.0/8 is loopback (RFC 1122)"
    assert not d.decide("demo", "64:ff9b::169.254.169.254", 80).allowed
    assert d.decide("demo", "::ffff:8.8.8.8", 80).allowed
    assert d.decide("demo", "64:ff9b::8.8.8.8", 80).allowed


def test_embedded_address_meets_deny_rules() -> None:
    d = decider({"allow": ["[::ffff:0:0/96]"], "deny": ["93.184.216.0/24"]})
    decision = d.decide("demo", f"::ffff:{PUBLIC}", 80)
    assert not decision.allowed
    assert decision.rule == "deny 93.184.216.0/24"
    # An IPv4 deny rule catches every embedding, even with no IPv6 allow.
    d = decider({"deny": ["93.184.216.0/24"]})
    sixtofour = d.decide("demo", "2002:5db8:d822::1", 80)
    assert sixtofour.rule == "deny 93.184.216.0/24"
    assert "embeds" in sixtofour.reason


def test_local_use_nat64_prefix_rule_sets_the_layout() -> None:
    d = decider({"allow": ["[64:ff9b:1:abcd::/96]"]})
    assert d.decide("demo", "64:ff9b:1:abcd::8.8.8.8", 80).allowed
    assert d.decide("demo", "64:ff9b:1:abcd::127.0.0.1", 80).rule == "deny 127.0.0.0/8"
    # Without a rule naming the prefix, every RFC 6052 reading is judged.
    assert not decider().decide("demo", "64:ff9b:1:abcd::8.8.8.8", 80).allowed


def test_teredo_judges_client_and_server() -> None:
    d = decider({"allow": ["[2001::/32]"]})
    # server 8.8.8.8, client ~f7f7:f7f7 = 8.8.8.8
    assert d.decide("demo", "2001:0:808:808::f7f7:f7f7", 80).allowed
    # client ~80ff:fffe = 127.0.0.1
    assert d.decide("demo", "2001:0:808:808::80ff:fffe", 80).rule == "deny 127.0.0.0/8"
    # server 10.0.0.1
    assert d.decide("demo", "2001:0:a00:1::f7f7:f7f7", 80).rule == "deny 10.0.0.0/8"


# --- the gateway's own addresses ------------------------------------------------------------


def test_own_listening_address_is_always_denied() -> None:
    d = decider(
        {"allow": ["127.0.0.0/8:*", "[::1]:*"], "mode": "report"}, None, [("127.0.0.1", 9000)]
    )
    for host in ("127.0.0.1", "0x7f000001", "::ffff:127.0.0.1"):
        decision = d.decide("demo", host, 9000)
        assert not decision.allowed, host
        assert decision.rule == "deny self 127.0.0.1:9000"
    assert d.decide("demo", "127.0.0.1", 9001).allowed
    assert d.decide("demo", "127.0.0.2", 9000).allowed


def test_wildcard_and_localhost_listeners() -> None:
    d = decider(
        {"allow": ["127.0.0.0/8:*", "[::1]:*", "0.0.0.0/8:*"]},
        None,
        [("0.0.0.0", 9000), ("localhost", 9100), ("::1", 9200)],
    )
    for host, port in [
        ("127.0.0.5", 9000),
        ("::1", 9000),
        ("0.0.0.0", 9000),
        ("127.0.0.1", 9100),
        ("::1", 9100),
        ("::1", 9200),
    ]:
        assert not d.decide("demo", host, port).allowed, (host, port)
    assert d.decide("demo", "127.0.0.1", 9200).allowed


def test_self_address_must_not_need_a_lookup() -> None:
    with pytest.raises(ValueError, match="numeric or localhost"):
        Decider(PolicySet(), [("gateway.internal", 9000)])
    with pytest.raises(ValueError):
        Decider(PolicySet(), [("bad\x00", 9000)])


# --- pre-lookup decisions -------------------------------------------------------------------


def test_predecide_answers_numeric_and_malformed_targets() -> None:
    d = decider()
    for host in ("10.0.0.1", PUBLIC, "[::1]", "bad\x00host", "127.0.0.1 x"):
        decision = d.predecide("demo", d.normalize(host), 80, TCP)
        assert decision is not None
    assert d.predecide("demo", d.normalize("good.test"), 80, TCP) is None


def test_predecide_denies_certain_names_and_ports() -> None:
    d = decider({"deny": ["bad.test"]})
    early = d.predecide("demo", d.normalize("BAD.test."), 443, TCP)
    assert early is not None and early.rule == "deny bad.test"
    early = d.predecide("demo", d.normalize("good.test"), 25, TCP)
    assert early is not None and early.rule == "deny port 25"
    assert early.host == "good.test"
    assert early.addresses == () and early.candidates == ()


def test_predecide_waits_when_an_earlier_address_rule_may_win() -> None:
    d = decider({"deny": ["bad.test"]}, {"billing": {"allow": ["93.184.216.0/24:443"]}})
    assert d.predecide("billing", d.normalize("bad.test"), 443, TCP) is None
    assert d.decide("billing", "bad.test", 443, resolver=HOSTS).allowed
    assert d.predecide("other", d.normalize("bad.test"), 443, TCP) is not None
    # A port rule that could match an answer also defers the port denial.
    d = decider({"allow": ["93.184.216.0/24:25"]})
    assert d.predecide("demo", d.normalize("mail.test"), 25, TCP) is None
    assert d.decide("demo", "mail.test", 25, resolver=HOSTS).allowed


def test_normalize_returns_a_target() -> None:
    d = decider()
    target = d.normalize("0x7f.1")
    assert target == Target("0x7f.1", address=ipaddress.IPv4Address("127.0.0.1"))
    assert not target.needs_lookup
    assert str(target) == "127.0.0.1"
    name = d.normalize("Example.COM.")
    assert (name.name, name.address, name.needs_lookup, name.original) == (
        "example.com",
        None,
        True,
        "Example.COM.",
    )
    assert str(name) == "example.com"
    bad = d.normalize("a b")
    assert bad.problem is not None and not bad.needs_lookup
    idn = d.normalize("Bücher.example")
    assert idn.name == "xn--bcher-kva.example"


# --- resolution: once, every answer judged, no rebinding -------------------------------------


class FlipResolver:
    """Answers a public address first, loopback afterwards (DNS rebinding)."""

    def __init__(self) -> None:
        self.calls = 0

    def resolve(self, name: str) -> Sequence[str]:
        self.calls += 1
        return [PUBLIC] if self.calls == 1 else ["127.0.0.1"]


def test_rebinding_resolver_is_asked_once_per_decision() -> None:
    d = decider()
    resolver = FlipResolver()
    first = d.decide("demo", "rebind.test", 443, resolver=resolver)
    assert resolver.calls == 1
    assert first.allowed
    assert first.addresses == (PUBLIC,)
    second = d.decide("demo", "rebind.test", 443, resolver=resolver)
    assert resolver.calls == 2
    assert not second.allowed
    assert second.addresses == ()
    # The first decision is a value: nothing about it changed.
    assert first.addresses == (PUBLIC,)


def test_decide_resolved_never_looks_up() -> None:
    d = decider()
    target = d.normalize("rebind.test")
    decision = d.decide_resolved("demo", target, 443, TCP, [PUBLIC, "127.0.0.1"])
    assert decision.addresses == (PUBLIC,)


def test_answers_that_are_not_numeric_are_refused() -> None:
    d = decider({"mode": "report"})
    target = d.normalize("odd.test")
    decision = d.decide_resolved("demo", target, 443, TCP, ["localhost", "0x7f.1", PUBLIC])
    assert decision.addresses == (PUBLIC,)
    assert [c.rule for c in decision.candidates[:2]] == ["deny invalid answer"] * 2
    only_bad = d.decide_resolved("demo", target, 443, TCP, ["localhost"])
    assert not only_bad.allowed  # not lifted by report mode: nothing to connect to


def test_duplicate_answers_are_judged_once() -> None:
    d = decider()
    target = d.normalize("dup.test")
    decision = d.decide_resolved("demo", target, 443, TCP, [PUBLIC, PUBLIC, "1.1.1.1"])
    assert decision.addresses == (PUBLIC, "1.1.1.1")
    assert len(decision.candidates) == 2


def test_no_answers_is_a_denial() -> None:
    d = decider()
    decision = d.decide_resolved("demo", d.normalize("empty.test"), 443, TCP, [])
    assert not decision.allowed
    assert decision.reason == "empty.test resolved to no addresses"


def test_literal_target_ignores_answers() -> None:
    d = decider()
    decision = d.decide_resolved("demo", d.normalize("10.0.0.1"), 80, TCP, [PUBLIC])
    assert not decision.allowed
    assert [c.address for c in decision.candidates] == ["10.0.0.1"]


def test_resolution_errors_propagate() -> None:
    d = decider()
    with pytest.raises(ResolutionError) as info:
        d.decide("demo", "unknown.test", 443, resolver=HOSTS)
    assert info.value.eai == socket.EAI_NONAME


def test_a_name_needs_a_resolver() -> None:
    with pytest.raises(ValueError, match="needs a resolver"):
        decider().decide("demo", "good.test", 443)


_DENIED_ROWS = [row.network for row in DEFAULT_DENY_TABLE]


@st.composite
def answer(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        network = draw(st.sampled_from(_DENIED_ROWS))
        offset = draw(st.integers(0, network.num_addresses - 1))
        return str(ipaddress.ip_address(int(network.network_address) + offset))
    return draw(st.sampled_from([PUBLIC, "1.1.1.1", "2606:4700:4700::1111", "151.101.1.69"]))


# Budget: enough random answer lists to mix every range with public ones.
@settings(max_examples=300, deadline=None)
@given(st.lists(answer(), min_size=1, max_size=6))
def test_addresses_are_exactly_the_allowed_answers_in_order(answers: list[str]) -> None:
    d = decider()
    decision = d.decide_resolved("demo", d.normalize("any.test"), 443, TCP, answers)
    expected = list(dict.fromkeys(a for a in answers if classify(ipaddress.ip_address(a)) is None))
    assert list(decision.addresses) == expected
    assert decision.allowed is bool(expected)
    if not expected:
        assert decision.reason == decision.candidates[0].reason


# --- Decision output ---------------------------------------------------------------------------


def test_describe_matches_the_documented_sentence() -> None:
    decision = decider().decide("demo", "10.1.2.3", 80)
    assert decision.describe() == (
        "tether: connection to 10.1.2.3:80 denied for app 'demo': "
        "10.0.0.0/8 is private-use (RFC 1918) (rule: deny 10.0.0.0/8)"
    )


@pytest.mark.parametrize(
    ("host", "port", "transport", "start"),
    [
        ("0x7f.1", 80, TCP, "tether: connection to 0x7f.1:80 (read as 127.0.0.1) denied"),
        ("::1", 80, TCP, "tether: connection to [::1]:80 denied"),
        ("[::1]", 80, TCP, "tether: connection to [::1]:80 denied"),
        ("", 80, TCP, "tether: connection to '':80 (read as 0.0.0.0) denied"),
        ("a\x00b", 80, TCP, "tether: connection to 'a\\x00b':80 denied"),
        ("10.0.0.1", 53, UDP, "tether: UDP traffic to 10.0.0.1:53 denied"),
        (PUBLIC, 443, TCP, f"tether: connection to {PUBLIC}:443 allowed for app 'demo': "),
    ],
)
def test_describe_shapes(host: str, port: int, transport: Transport, start: str) -> None:
    assert decider().decide("demo", host, port, transport).describe().startswith(start)


def test_describe_without_app() -> None:
    assert "for app" not in decider().decide("", "10.0.0.1", 80).describe()


def test_to_log_is_json() -> None:
    decision = decider({"allow": ["*.example.com:443"]}).decide(
        "demo", "mixed.example.com", 443, resolver=HOSTS
    )
    log = decision.to_log()
    assert json.loads(json.dumps(log)) == log
    assert log == {
        "app": "demo",
        "host": "mixed.example.com",
        "normalized": "mixed.example.com",
        "port": 443,
        "transport": "tcp",
        "verdict": "allow",
        "would_deny": False,
        "reason": "mixed.example.com matches an allow rule",
        "rule": "allow *.example.com:443",
        "mode": "enforce",
        "addresses": [PUBLIC],
        "candidates": [
            {
                "address": "127.0.0.1",
                "verdict": "deny",
                "reason": "127.0.0.0/8 is loopback (RFC 1122)",
                "rule": "deny 127.0.0.0/8",
            },
            {
                "address": PUBLIC,
                "verdict": "allow",
                "reason": "mixed.example.com matches an allow rule",
                "rule": "allow *.example.com:443",
            },
            {
                "address": "::1",
                "verdict": "deny",
                "reason": "::1/128 is loopback (RFC 4291)",
                "rule": "deny ::1/128",
            },
        ],
    }


def test_decision_is_frozen() -> None:
    decision = decider().decide("demo", PUBLIC, 80)
    assert isinstance(decision, Decision)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.allowed = False  # type: ignore[misc]


# -- the memo: a decision is a pure function of the policy and the request ------


def test_memo_returns_the_same_decision_for_the_same_request() -> None:
    d = decider({"allow": ["127.0.0.1:5432"]})
    first = d.decide("app", "127.0.0.1", 5432, resolver=HOSTS)
    again = d.decide("app", "127.0.0.1", 5432, resolver=HOSTS)
    assert first is again and first.allowed
    # Every part of the request is in the key: another app, port, transport
    # or spelling of the host is decided on its own.
    assert d.decide("app", "127.0.0.1", 5433).allowed is False
    assert d.decide("app", "127.0.0.1", 5432, UDP).transport is UDP
    assert d.decide("other", "127.0.0.1", 5432).app == "other"
    other = d.decide("app", "127.1", 5432)
    assert other is not first and other.host == "127.1" and other.allowed


def test_memo_keys_a_name_by_its_answers() -> None:
    """A name that resolves elsewhere the next time (rebinding) is judged again."""
    d = decider()
    public = d.decide_resolved("app", d.normalize("rebind.test"), 80, TCP, [PUBLIC])
    private = d.decide_resolved("app", d.normalize("rebind.test"), 80, TCP, ["10.0.0.1"])
    assert public.allowed and public.addresses == (PUBLIC,)
    assert not private.allowed and private.rule == "deny 10.0.0.0/8"


def test_memo_is_per_decider_so_a_reload_decides_afresh() -> None:
    allowing = decider({"allow": ["10.0.0.1:80"]})
    assert allowing.decide("app", "10.0.0.1", 80).allowed
    assert not decider().decide("app", "10.0.0.1", 80).allowed


def test_memo_is_bounded() -> None:
    from tether.policy.decider import MEMO_LIMIT

    d = decider()
    for port in range(1, MEMO_LIMIT + 10):
        d.decide("app", PUBLIC, port)
    assert len(d._decisions) <= MEMO_LIMIT
    assert len(d._targets) <= MEMO_LIMIT
    assert d.decide("app", PUBLIC, 1).allowed


def test_log_json_is_to_log_encoded() -> None:
    decision = decider().decide("app", "10.0.0.1", 80)
    assert json.loads(decision.log_json) == decision.to_log()
