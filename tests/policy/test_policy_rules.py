"""Rule syntax, canonical spelling, and the TOML reader's error paths."""

# ruff: noqa: RUF001  (fullwidth digits are a test input)

from __future__ import annotations

import ipaddress
import tomllib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.errors import ConfigError
from tether.policy import (
    DEFAULT_ALLOW,
    DEFAULT_DENY_PORTS,
    AppPolicy,
    PolicySet,
    PortRange,
    Rule,
    RuleError,
    Transport,
    parse_policy,
)

CANONICAL = [
    "127.0.0.1:8025",
    "127.0.0.0/8:18000-18100",
    "*.example.com:443",
    "8.8.8.8:53",
    "[::1]:80",
    "host.test:*/udp",
    "host.test:53/tcp",
    "*",
    "*:443",
    "example.com",
    "10.0.0.0/8",
    "10.0.0.0/8:*/udp",
    "[fc00::/7]",
    "[fc00::/7]:443",
    "[2001:db8::1]:1-65535/tcp",
    "xn--bcher-kva.example:443",
    "_service.example.com:5432",
    "localhost:5432",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_text_round_trips(text: str) -> None:
    rule = Rule.parse(text)
    assert str(rule) == text
    assert Rule.parse(str(rule)) == rule


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("EXAMPLE.com.", "example.com"),
        ("Example.COM:443", "example.com:443"),
        ("10.0.0.0/8:*", "10.0.0.0/8"),
        ("10.0.0.0/8/udp", "10.0.0.0/8:*/udp"),
        ("host.test/UDP", "host.test:*/udp"),
        ("127.0.0.1/32:80", "127.0.0.1:80"),
        ("[0:0::1]:80", "[::1]:80"),
        ("::1", "[::1]"),
        ("fc00::/7", "[fc00::/7]"),
        ("[fc00::]/7:443", "[fc00::/7]:443"),
        ("[FC00::/7]:443/TCP", "[fc00::/7]:443/tcp"),
        ("[::ffff:127.0.0.1]:80", "[::ffff:7f00:1]:80"),
        (" host.test:80 ", "host.test:80"),
        ("bücher.example:443", "xn--bcher-kva.example:443"),
        ("*.Bücher.Example", "*.xn--bcher-kva.example"),
        ("host.test:8000-8000", "host.test:8000"),
    ],
)
def test_other_spellings_become_canonical(text: str, canonical: str) -> None:
    assert str(Rule.parse(text)) == canonical


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (":80", "no host part"),
        ("10.0.0.1/8", "has host bits set; did you mean 10.0.0.0/8?"),
        ("[fc00::1/7]", "did you mean fc00::/7?"),
        ("127.1", "write IPv4 addresses as four decimal numbers"),
        ("0x7f.0.0.1:80", "write IPv4 addresses as four decimal numbers"),
        ("127.0.0.256", "write IPv4 addresses as four decimal numbers"),
        ("a.*.com", "'*' may only be the whole host or a first label"),
        ("*example.com", "'*' may only be the whole host or a first label"),
        ("*.*.com", "'*' may only be the whole host or a first label"),
        ("host.test:0", "port 0 is not within 1-65535"),
        ("host.test:65536", "port 65536 is not within 1-65535"),
        ("host.test:90-80", "runs backwards"),
        ("host.test:80-", "is not a port"),
        ("host.test:http", "is not a port"),
        ("host.test:+80", "is not a port"),
        ("host.test:８０", "is not a port"),
        ("[1.2.3.4]:80", "brackets are only for IPv6"),
        ("[::1", "'[' without ']'"),
        ("[::1]80", "expected ':PORT'"),
        ("[fe80::1%eth0]:80", "cannot name an IPv6 zone"),
        ("bad host:80", "not allowed in a host name"),
        ("a..b", "empty label"),
        ("a" * 64 + ".test", "longer than 63"),
        ("1.2.3.4.5:80", "write IPv4 addresses as four decimal numbers"),
        ("[zz::1]:80", "not a valid IP address or network"),
        ("10.0.0.0/33", "not a valid IP address or network"),
    ],
)
def test_bad_rules_say_why(text: str, message: str) -> None:
    with pytest.raises(RuleError, match=None) as info:
        Rule.parse(text)
    assert message in str(info.value)


def test_rule_fields() -> None:
    rule = Rule.parse("127.0.0.0/8:18000-18100/tcp")
    assert rule.kind == "address"
    assert rule.network == ipaddress.ip_network("127.0.0.0/8")
    assert rule.ports == PortRange(18000, 18100)
    assert rule.transport is Transport.TCP
    assert rule.names_port
    assert rule.covers(18000, Transport.TCP)
    assert rule.covers(18100, Transport.TCP)
    assert not rule.covers(18101, Transport.TCP)
    assert not rule.covers(18050, Transport.UDP)
    assert not Rule.parse("*.example.com").names_port
    wildcard = Rule.parse("*.example.com")
    assert wildcard.matches_name("a.example.com")
    assert wildcard.matches_name("a.b.example.com")
    assert not wildcard.matches_name("example.com")
    assert not wildcard.matches_name("badexample.com")
    assert Rule.parse("*").matches_name("anything.test")
    assert not Rule.parse("10.0.0.0/8").contains(ipaddress.ip_address("::ffff:10.0.0.1"))


_LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10).filter(
    lambda s: not s[0].isdigit()
)


@st.composite
def rule_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["name", "wildcard", "v4", "v6", "any"]))
    if kind == "name":
        host = ".".join(draw(st.lists(_LABEL, min_size=1, max_size=3)))
    elif kind == "wildcard":
        host = "*." + ".".join(draw(st.lists(_LABEL, min_size=1, max_size=3)))
    elif kind == "v4":
        prefix = draw(st.integers(0, 32))
        net = ipaddress.IPv4Network((draw(st.integers(0, 2**32 - 1)), prefix), strict=False)
        host = str(net)
    elif kind == "v6":
        prefix = draw(st.integers(0, 128))
        net6 = ipaddress.IPv6Network((draw(st.integers(0, 2**128 - 1)), prefix), strict=False)
        host = f"[{net6}]"
    else:
        host = "*"
    low = draw(st.integers(1, 65535))
    high = draw(st.integers(low, 65535))
    port = draw(st.sampled_from([None, "*", str(low), f"{low}-{high}"]))
    proto = draw(st.sampled_from(["", "/tcp", "/udp"]))
    text = host
    if port is not None:
        text += f":{port}"
    elif proto and kind in ("v4", "v6"):
        text += ":*"
    return text + proto


# Budget: a few hundred generated rules exercise every host kind and port form.
@settings(max_examples=300, deadline=None)
@given(rule_texts())
def test_any_rule_round_trips(text: str) -> None:
    rule = Rule.parse(text)
    assert Rule.parse(str(rule)) == rule
    assert str(Rule.parse(str(rule))) == str(rule)


# --- parse_policy -----------------------------------------------------------------


def test_empty_policy_is_the_default() -> None:
    for policy in (parse_policy(None), parse_policy({}), parse_policy({}, {})):
        assert policy == PolicySet()
        assert policy.deny_ports == DEFAULT_DENY_PORTS == frozenset({25, 21})
        assert policy.allow_ports is None
        assert policy.defaults
        assert policy.mode == "enforce"
        assert policy.global_allow == DEFAULT_ALLOW


def test_full_policy_from_toml() -> None:
    data = tomllib.loads(
        """
        [policy]
        allow = ["127.0.0.1:8025", "127.0.0.0/8:18000-18100", "*.example.com:443",
                 "8.8.8.8:53", "[::1]:80", "host.test:*/udp"]
        deny = ["203.0.113.0/24", "bad.example.com"]
        deny_ports = [25]
        allow_ports = [80, 443]
        defaults = false
        mode = "report"

        [apps.billing.policy]
        allow = ["payments.example.net:443"]
        deny = ["*.example.com"]
        mode = "enforce"
        """
    )
    policy = parse_policy(data["policy"], {"billing": data["apps"]["billing"]["policy"]})
    assert [str(r) for r in policy.allow] == [
        "127.0.0.1:8025",
        "127.0.0.0/8:18000-18100",
        "*.example.com:443",
        "8.8.8.8:53",
        "[::1]:80",
        "host.test:*/udp",
    ]
    assert [str(r) for r in policy.deny] == ["203.0.113.0/24", "bad.example.com"]
    assert policy.deny_ports == frozenset({25})
    assert policy.allow_ports == frozenset({80, 443})
    assert not policy.defaults
    assert policy.global_allow == policy.allow
    assert policy.mode == "report"
    assert policy.apps["billing"] == AppPolicy(
        allow=(Rule.parse("payments.example.net:443"),),
        deny=(Rule.parse("*.example.com"),),
        mode="enforce",
    )
    assert policy.mode_for("billing") == "enforce"
    assert policy.mode_for("other") == "report"
    order = [(str(r), allow) for r, allow in policy.ordered_rules("billing")]
    assert order[:2] == [("payments.example.net:443", True), ("*.example.com", False)]
    assert order[-1] == ("bad.example.com", False)


def test_deny_ports_can_be_emptied() -> None:
    assert parse_policy({"deny_ports": []}).deny_ports == frozenset()


BAD: list[tuple[dict[str, Any], dict[str, Any] | None, str, str]] = [
    ({"allow": "127.0.0.1:80"}, None, "policy.allow", "must be an array"),
    ({"allow": ["127.0.0.1:80", "x:0", "y"]}, None, "policy.allow[1]", "port 0"),
    ({"allow": ["a", "b", 3]}, None, "policy.allow[2]", "must be a rule string, not an integer"),
    ({"deny": ["10.0.0.1/8"]}, None, "policy.deny[0]", "did you mean 10.0.0.0/8?"),
    ({"deny_ports": [25, "21"]}, None, "policy.deny_ports[1]", "must be a port number"),
    ({"deny_ports": [True]}, None, "policy.deny_ports[0]", "not a boolean"),
    ({"deny_ports": [0]}, None, "policy.deny_ports[0]", "not within 1-65535"),
    ({"allow_ports": 443}, None, "policy.allow_ports", "must be an array"),
    ({"allow_ports": [443, 70000]}, None, "policy.allow_ports[1]", "not within"),
    ({"defaults": "yes"}, None, "policy.defaults", "must be true or false"),
    ({"mode": "audit"}, None, "policy.mode", 'must be "enforce" or "report", not \'audit\''),
    ({"mode": 1}, None, "policy.mode", "not an integer"),
    ({"alow": []}, None, "policy.alow", "unknown key"),
    ({"weird key": 1}, None, 'policy."weird key"', "unknown key"),
    ({}, {"billing": {"mode": "loud"}}, "apps.billing.policy.mode", "must be"),
    ({}, {"billing": {"allow": ["ok.test", "*.*"]}}, "apps.billing.policy.allow[1]", "'*'"),
    ({}, {"billing": {"deny": "x"}}, "apps.billing.policy.deny", "must be an array"),
    ({}, {"billing": {"deny_ports": [25]}}, "apps.billing.policy.deny_ports", "unknown key"),
    ({}, {"my.app": {"mode": "x"}}, 'apps."my.app".policy.mode', "must be"),
    ({}, {"billing": ["x"]}, "apps.billing.policy", "must be a table"),
]


@pytest.mark.parametrize(("table", "apps", "path", "message"), BAD)
def test_config_errors_name_the_path(
    table: dict[str, Any], apps: dict[str, Any] | None, path: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(table, apps)
    assert info.value.path == path
    assert message in info.value.message
    assert str(info.value).startswith(f"{path}: ")


def test_policy_table_must_be_a_table() -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(["allow"])  # type: ignore[arg-type]
    assert info.value.path == "policy"


def test_policy_set_rejects_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        PolicySet(mode="loud")
    with pytest.raises(ValueError, match="mode"):
        AppPolicy(mode="loud")


def test_policy_set_is_read_only() -> None:
    apps = {"a": AppPolicy()}
    policy = PolicySet(apps=apps)
    apps["b"] = AppPolicy()
    assert "b" not in policy.apps
    with pytest.raises(TypeError):
        policy.apps["c"] = AppPolicy()  # type: ignore[index]


def test_default_allow_list_is_app_engines() -> None:
    assert [str(r) for r in DEFAULT_ALLOW] == [
        "8.8.8.8:53",
        "8.8.4.4:53",
        "[2001:4860:4860::8888]:53",
        "[2001:4860:4860::8844]:53",
        "smtp.gmail.com:465/tcp",
        "smtp.gmail.com:587/tcp",
        "pop.gmail.com:995/tcp",
        "imap.gmail.com:993/tcp",
    ]
