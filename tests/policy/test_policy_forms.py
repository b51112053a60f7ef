"""Property tests: every spelling of a denied address is denied.

No test here resolves a name: numeric hosts need no lookup, and
``socket.inet_aton`` is pure parsing.
"""

# ruff: noqa: RUF001  (fullwidth digits and dots are the point of these tests)

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tether.policy import (
    DEFAULT_DENY_TABLE,
    Decider,
    PolicySet,
    Transport,
    normalize_host,
    parse_c_ipv4,
    parse_policy,
)
from tether.policy.hosts import _DOTTED_QUAD, _parse_c_ipv4
from tether.policy.ranges import DEFAULT_DENY_IPV4

DENY_V4 = [r.network for r in DEFAULT_DENY_IPV4 if isinstance(r.network, ipaddress.IPv4Network)]
DENY_V6 = [r.network for r in DEFAULT_DENY_TABLE if isinstance(r.network, ipaddress.IPv6Network)]
# Public ranges well away from every special-purpose block.
PUBLIC_V4 = [ipaddress.IPv4Network(n) for n in ("1.0.0.0/8", "93.0.0.0/8", "151.101.0.0/16")]

DEFAULT = Decider(PolicySet())
_FULLWIDTH = str.maketrans("0123456789abcdefx.", "０１２３４５６７８９ａｂｃｄｅｆｘ．")

# Hypothesis budget: enough examples to cover every range and spelling
# several times over while keeping the suite's policy tests under a few
# seconds.
PROFILE = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def address_in(draw: st.DrawFn, networks: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Address:
    network = draw(st.sampled_from(networks))
    first = int(network.network_address)
    offset = draw(st.integers(0, network.num_addresses - 1))
    return ipaddress.IPv4Address(first + offset)


@st.composite
def c_number(draw: st.DrawFn, value: int) -> str:
    """One inet_aton part: decimal, octal or hex, any case, extra leading zeros."""
    base = draw(st.sampled_from(["dec", "oct", "hex"]))
    if base == "dec" and value != 0:
        return str(value)
    if base == "oct" or (base == "dec" and value == 0):
        return "0" * draw(st.integers(1, 3)) + format(value, "o")
    digits = format(value, "x")
    digits = "0" * draw(st.integers(0, 3)) + digits
    digits = "".join(draw(st.sampled_from([c.lower(), c.upper()])) for c in digits)
    return draw(st.sampled_from(["0x", "0X"])) + digits


@st.composite
def c_ipv4_text(draw: st.DrawFn, address: ipaddress.IPv4Address) -> str:
    """A spelling inet_aton reads as `address`: a, a.b, a.b.c or a.b.c.d."""
    value = int(address)
    octets = list(address.packed)
    count = draw(st.integers(1, 4))
    if count == 1:
        parts = [value]
    elif count == 2:
        parts = [octets[0], value & 0xFFFFFF]
    elif count == 3:
        parts = [octets[0], octets[1], value & 0xFFFF]
    else:
        parts = octets
    text = ".".join(draw(c_number(part)) for part in parts)
    if draw(st.booleans()):
        text += "."  # trailing dot: read as the address, conservatively
    return text


@st.composite
def embedding_text(draw: st.DrawFn, address: ipaddress.IPv4Address) -> str:
    """An IPv6 spelling that embeds `address` (mapped, compatible, NAT64, 6to4...)."""
    dotted = str(address)
    high, low = f"{int(address) >> 16:x}", f"{int(address) & 0xFFFF:x}"
    forms = [
        f"::ffff:{dotted}",
        f"::ffff:{high}:{low}",
        f"0:0:0:0:0:ffff:{dotted}",
        f"::ffff:0:{dotted}",
        f"64:ff9b::{dotted}",
        f"64:ff9b::{high}:{low}",
        f"2002:{high}:{low}::1",
        f"2002:{high}:{low}:1234::",
    ]
    if int(address) > 1:
        forms.append(f"::{dotted}")
    text = draw(st.sampled_from(forms))
    if draw(st.booleans()):
        text = text.upper()
    if draw(st.booleans()):
        text = f"[{text}]"
    return text


def assert_denied(host: str, port: int = 443) -> None:
    decision = DEFAULT.decide("demo", host, port, Transport.TCP)
    assert not decision.allowed, decision.describe()
    assert decision.addresses == ()


@PROFILE
@given(st.data())
def test_denied_ipv4_is_denied_in_every_c_form(data: st.DataObject) -> None:
    address = data.draw(address_in(DENY_V4))
    text = data.draw(c_ipv4_text(address))
    assert normalize_host(text).address == address
    assert_denied(text)


@PROFILE
@given(st.data())
def test_denied_ipv4_is_denied_in_fullwidth_digits(data: st.DataObject) -> None:
    address = data.draw(address_in(DENY_V4))
    text = data.draw(c_ipv4_text(address)).lower().translate(_FULLWIDTH)
    assert normalize_host(text).address == address
    assert_denied(text)


@PROFILE
@given(st.data())
def test_any_ipv4_is_denied_inside_an_ipv6_embedding(data: st.DataObject) -> None:
    # The embedding ranges are denied by default whatever they carry.
    address = data.draw(st.one_of(address_in(DENY_V4), address_in(PUBLIC_V4)))
    assert_denied(data.draw(embedding_text(address)))


NAT64_OPEN = Decider(
    parse_policy(
        {
            "allow": [
                "[::ffff:0:0/96]",
                "[::ffff:0:0:0/96]",
                "[64:ff9b::/96]",
                "[2002::/16]",
                "[::/96]",
            ]
        }
    )
)


@PROFILE
@given(st.data())
def test_broad_ipv6_allow_does_not_smuggle_denied_ipv4(data: st.DataObject) -> None:
    address = data.draw(address_in(DENY_V4))
    text = data.draw(embedding_text(address))
    decision = NAT64_OPEN.decide("demo", text, 443)
    assert not decision.allowed, decision.describe()


@PROFILE
@given(st.data())
def test_broad_ipv6_allow_opens_public_ipv4(data: st.DataObject) -> None:
    address = data.draw(address_in(PUBLIC_V4))
    text = data.draw(embedding_text(address))
    decision = NAT64_OPEN.decide("demo", text, 443)
    assert decision.allowed, decision.describe()


@PROFILE
@given(st.data())
def test_public_ipv4_is_allowed_in_every_c_form(data: st.DataObject) -> None:
    address = data.draw(address_in(PUBLIC_V4))
    text = data.draw(c_ipv4_text(address))
    decision = DEFAULT.decide("demo", text, 443)
    assert decision.allowed, decision.describe()
    assert decision.addresses == (str(address),)


@st.composite
def ipv6_in(draw: st.DrawFn) -> tuple[ipaddress.IPv6Address, str]:
    network = draw(st.sampled_from(DENY_V6))
    first = int(network.network_address)
    address = ipaddress.IPv6Address(first + draw(st.integers(0, network.num_addresses - 1)))
    text = draw(st.sampled_from([address.compressed, address.exploded]))
    if draw(st.booleans()):
        text = text.upper()
    if address in ipaddress.ip_network("fe80::/10") and draw(st.booleans()):
        text += "%eth0"
    if draw(st.booleans()):
        text = f"[{text}]"
    return address, text


@PROFILE
@given(ipv6_in())
def test_denied_ipv6_is_denied_in_every_spelling(case: tuple[ipaddress.IPv6Address, str]) -> None:
    address, text = case
    target = normalize_host(text)
    assert target.address is not None
    assert int(target.address) == int(address)
    assert_denied(text)


# --- agreement with the C library's inet_aton ---------------------------------

ATON_ALPHABET = "0123456789abcdefxX."


def aton(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


@st.composite
def aton_candidates(draw: st.DrawFn) -> str:
    """Near-miss and valid inet_aton input: random parts, bases and sizes."""
    count = draw(st.integers(1, 5))
    parts = []
    for _ in range(count):
        value = draw(st.one_of(st.integers(0, 300), st.integers(0, 2**33)))
        parts.append(draw(c_number(value)))
    return ".".join(parts)


@PROFILE
@given(st.one_of(st.text(ATON_ALPHABET, max_size=24), aton_candidates()))
@example("0x")
@example("08")
@example("0x.1")
@example("1..2")
@example("1.2.3.")
@example("4294967295")
@example("4294967296")
@example("1.16777215")
@example("1.16777216")
@example("1.2.65535")
@example("1.2.65536")
@example("0" * 40 + "1")
def test_c_parser_agrees_with_inet_aton(text: str) -> None:
    parsed = parse_c_ipv4(text)
    expected = aton(text)
    assert (parsed[0] if parsed is not None else None) == expected
    if parsed is not None:
        assert parsed[1] == ""
    # The host normaliser reads the same address (or, for what inet_aton
    # rejects, never an IPv4 address; a trailing dot is read conservatively).
    target = normalize_host(text)
    if expected is not None:
        assert target.address == expected
        assert target.problem is None
    elif text and not text.endswith("."):  # "" is CPython's INADDR_ANY
        assert not isinstance(target.address, ipaddress.IPv4Address)


@PROFILE
@given(aton_candidates(), st.sampled_from([" ", "\t", "\n", " junk", "\tx y"]))
def test_trailing_whitespace_reads_like_inet_aton_but_is_refused(text: str, tail: str) -> None:
    # glibc's inet_aton ignores anything after whitespace; getaddrinfo does
    # not. Tether reads the same address but refuses the host.
    expected = aton(text + tail)
    parsed = parse_c_ipv4(text + tail)
    assert (parsed[0] if parsed is not None else None) == expected
    if expected is not None:
        target = normalize_host(text + tail)
        assert target.address == expected
        assert target.problem is not None
        assert not DEFAULT.decide("demo", text + tail, 443).allowed


@PROFILE
@given(st.ip_addresses(v=4))
@example(ipaddress.IPv4Address("0.0.0.0"))
@example(ipaddress.IPv4Address("255.255.255.255"))
def test_canonical_quads_take_the_fast_path_to_the_same_answer(
    address: ipaddress.IPv4Address,
) -> None:
    text = str(address)
    assert parse_c_ipv4(text) == (address, "") == _parse_c_ipv4(text)
    assert aton(text) == address


@pytest.mark.parametrize(
    "text", ["010.0.0.1", "1.2.3.04", "1.2.3", "\u0661.2.3.4", "1.2.3.4 ", "256.1.1.1"]
)
def test_near_canonical_forms_are_left_to_the_general_parser(text: str) -> None:
    # Leading zeros are octal, three parts are 8.8.16, non-ASCII digits and
    # trailing text are not a canonical quad: the C reading decides.
    assert not _DOTTED_QUAD.fullmatch(text)
    assert parse_c_ipv4(text) == _parse_c_ipv4(text)


@pytest.mark.parametrize("text", ["1.2.3.4", "0x7f.1", "017700000001", "127.1", "255.255.255.255"])
def test_known_forms_match_inet_aton(text: str) -> None:
    assert normalize_host(text).address == aton(text)
