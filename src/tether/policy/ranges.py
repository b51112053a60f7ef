"""The default table of address ranges a sandboxed program may not reach.

The table is explicit on purpose. ``ipaddress``'s ``is_global`` and
``is_private`` follow the IANA special-purpose registries, which call some of
these ranges globally reachable (192.0.0.9, parts of 2001::/23), and their
answers for several ranges (IPv4-mapped, NAT64, 6to4) have changed between
Python releases. An egress policy must not move when the interpreter is
upgraded, so every range, its name and its RFC are written down here and in
docs/policy.md.

IPv6 is deny-by-default outside 2000::/3, the only block IANA allocates for
global unicast (RFC 4291 section 2.4); inside it the reserved blocks are
listed one by one.

Some IPv6 forms carry an IPv4 address inside them (mapped, compatible,
NAT64, 6to4, Teredo). `embedded_ipv4` extracts it so the decider can judge
that address as well as the outer one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class SpecialRange:
    """One row of the default deny table."""

    network: IPNetwork
    name: str
    rfc: str

    @property
    def reason(self) -> str:
        """Plain-words reason, e.g. ``10.0.0.0/8 is private-use (RFC 1918)``."""
        return f"{self.network} is {self.name} ({self.rfc})"

    @property
    def rule(self) -> str:
        """The rule text a decision names, e.g. ``deny 10.0.0.0/8``."""
        return f"deny {self.network}"


def _row(cidr: str, name: str, rfc: str) -> SpecialRange:
    return SpecialRange(ipaddress.ip_network(cidr), name, rfc)


# IPv4 rows: the brief's list, which is the IANA IPv4 special-purpose
# registry minus nothing, plus multicast and the reserved class E block.
DEFAULT_DENY_IPV4: tuple[SpecialRange, ...] = (
    _row("0.0.0.0/8", "'this network'; connecting to it reaches the local host", "RFC 1122"),
    _row("10.0.0.0/8", "private-use", "RFC 1918"),
    _row("100.64.0.0/10", "shared address space (carrier-grade NAT)", "RFC 6598"),
    _row("127.0.0.0/8", "loopback", "RFC 1122"),
    _row("169.254.0.0/16", "link-local, where cloud metadata services live", "RFC 3927"),
    _row("172.16.0.0/12", "private-use", "RFC 1918"),
    _row("192.0.0.0/24", "IETF protocol assignments", "RFC 6890"),
    _row("192.0.2.0/24", "documentation (TEST-NET-1)", "RFC 5737"),
    _row("192.88.99.0/24", "the deprecated 6to4 relay anycast block", "RFC 7526"),
    _row("192.168.0.0/16", "private-use", "RFC 1918"),
    _row("198.18.0.0/15", "benchmarking", "RFC 2544"),
    _row("198.51.100.0/24", "documentation (TEST-NET-2)", "RFC 5737"),
    _row("203.0.113.0/24", "documentation (TEST-NET-3)", "RFC 5737"),
    _row("224.0.0.0/4", "multicast", "RFC 5771"),
    _row("240.0.0.0/4", "reserved for future use", "RFC 1112"),
    _row("255.255.255.255/32", "limited broadcast", "RFC 919"),
)

# IPv6 rows. The three "outside 2000::/3" rows are the complement of
# 2000::/3 written as CIDRs, so every denial names a real range; the more
# specific rows inside them win by longest prefix and carry their own name.
DEFAULT_DENY_IPV6: tuple[SpecialRange, ...] = (
    _row("::/3", "outside 2000::/3, the only global unicast block", "RFC 4291"),
    _row("4000::/2", "outside 2000::/3, the only global unicast block", "RFC 4291"),
    _row("8000::/1", "outside 2000::/3, the only global unicast block", "RFC 4291"),
    _row("::/128", "the unspecified address", "RFC 4291"),
    _row("::1/128", "loopback", "RFC 4291"),
    _row("::/96", "IPv4-compatible IPv6 (deprecated)", "RFC 4291"),
    _row("::ffff:0:0/96", "IPv4-mapped IPv6", "RFC 4291"),
    _row("::ffff:0:0:0/96", "IPv4-translated IPv6", "RFC 2765"),
    _row("64:ff9b::/96", "the NAT64 well-known prefix", "RFC 6052"),
    _row("64:ff9b:1::/48", "local-use NAT64", "RFC 8215"),
    _row("100::/64", "discard-only", "RFC 6666"),
    _row("fc00::/7", "unique local", "RFC 4193"),
    _row("fe80::/10", "link-local", "RFC 4291"),
    _row("fec0::/10", "site-local (deprecated)", "RFC 3879"),
    _row("ff00::/8", "multicast", "RFC 4291"),
    _row("2001::/23", "IETF protocol assignments", "RFC 2928"),
    _row("2001::/32", "Teredo", "RFC 4380"),
    _row("2001:db8::/32", "documentation", "RFC 3849"),
    _row("2002::/16", "6to4", "RFC 3056"),
    _row("3fff::/20", "documentation", "RFC 9637"),
)

DEFAULT_DENY_TABLE: tuple[SpecialRange, ...] = DEFAULT_DENY_IPV4 + DEFAULT_DENY_IPV6

# Longest prefix first, so 255.255.255.255/32 beats 240.0.0.0/4 and ::1/128
# beats ::/96 and ::/3.
_BY_SPECIFICITY: tuple[SpecialRange, ...] = tuple(
    sorted(DEFAULT_DENY_TABLE, key=lambda r: -r.network.prefixlen)
)


def classify(address: IPAddress) -> SpecialRange | None:
    """The most specific default-deny row containing `address`, or None."""
    bare = strip_scope(address)
    for row in _BY_SPECIFICITY:
        if row.network.version == bare.version and bare in row.network:
            return row
    return None


def strip_scope(address: IPAddress) -> IPAddress:
    """`address` without an IPv6 zone index (``fe80::1%eth0`` -> ``fe80::1``).

    Zones only pick the interface; they never change which range an address
    is in, and ``ipaddress`` treats scoped and unscoped addresses as unequal.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return ipaddress.IPv6Address(int(address))
    return address


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64_WKP = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_SIXTOFOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")


@dataclass(frozen=True)
class Embedding:
    """An IPv6 address that carries IPv4 addresses inside it."""

    # "mapped", "compatible", "translated", "nat64", "nat64-local", "6to4",
    # "teredo"
    form: str
    ipv4: tuple[ipaddress.IPv4Address, ...]


def _v4(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(value & 0xFFFFFFFF)


# Where RFC 6052 section 2.2 puts the IPv4 address for each prefix length
# allowed inside the local-use prefix (bits 64-71, the "u" octet, are
# always skipped), as byte slices of the IPv6 address.
_RFC6052_LAYOUTS: dict[int, tuple[slice, ...]] = {
    48: (slice(6, 8), slice(9, 11)),
    56: (slice(7, 8), slice(9, 12)),
    64: (slice(9, 13),),
    96: (slice(12, 16),),
}


NAT64_PREFIX_LENGTHS = frozenset(_RFC6052_LAYOUTS)


def nat64_ipv4(address: ipaddress.IPv6Address, prefixlen: int) -> ipaddress.IPv4Address:
    """The IPv4 address RFC 6052 embeds in `address` under a /`prefixlen` prefix."""
    octets = int(address).to_bytes(16, "big")
    return ipaddress.IPv4Address(b"".join(octets[part] for part in _RFC6052_LAYOUTS[prefixlen]))


def _rfc6052_positions(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """Every IPv4 address a local-use NAT64 address may stand for.

    64:ff9b:1::/48 may be used with any RFC 6052 prefix length of 48 or
    more, and the address alone does not say which, so all readings are
    judged. An allow rule for the exact NAT64 prefix in use (for example
    ``[64:ff9b:1:abcd::/96]``) tells the decider the layout instead; see
    `nat64_ipv4`.
    """
    seen: list[ipaddress.IPv4Address] = []
    for prefixlen in _RFC6052_LAYOUTS:
        inner = nat64_ipv4(address, prefixlen)
        if inner not in seen:
            seen.append(inner)
    return tuple(seen)


def embedded_ipv4(address: IPAddress) -> Embedding | None:
    """The IPv4 addresses an IPv6 address embeds, by its form, or None.

    ``::`` and ``::1`` are not treated as IPv4-compatible: they are the
    unspecified and loopback addresses in their own right.
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    bare = ipaddress.IPv6Address(int(address))  # without any zone index
    value = int(bare)
    if bare in _MAPPED:
        return Embedding("mapped", (_v4(value),))
    if bare in _TRANSLATED:
        return Embedding("translated", (_v4(value),))
    if bare in _COMPATIBLE and value > 1:
        return Embedding("compatible", (_v4(value),))
    if bare in _NAT64_WKP:
        return Embedding("nat64", (_v4(value),))
    if bare in _NAT64_LOCAL:
        return Embedding("nat64-local", _rfc6052_positions(bare))
    if bare in _SIXTOFOUR:
        return Embedding("6to4", (_v4(value >> 80),))
    if bare in _TEREDO:
        # RFC 4380 section 4: server in bits 32-63, client (the real peer)
        # in the low 32 bits, inverted. The client is what traffic reaches.
        teredo = bare.teredo
        assert teredo is not None  # inside 2001::/32 by the check above
        server, client = teredo
        return Embedding("teredo", (client, server))
    return None
