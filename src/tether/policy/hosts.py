"""Host normalisation: read a host string the way the C library would.

A sandboxed program hands the gateway a host string. If the policy read it
differently from the code that finally connects, ``0x7f.1`` or
``2130706433`` would be judged as a name and then reach 127.0.0.1. So every
host is first turned into a `Target` the way glibc's getaddrinfo (numeric
part: ``__inet_aton_exact`` and ``inet_pton``) and CPython's socket module
(``''``, ``'<broadcast>'``, the ``idna`` codec) read it, and only then
judged. Anything that cannot be read unambiguously gets a ``problem`` and is
denied without a lookup.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass, field

from tether.policy.ranges import IPAddress

__all__ = [
    "Target",
    "normalize_host",
    "normalize_name",
    "parse_c_ipv4",
    "reserved_name",
]

# Longest DNS name in text form: 255 octets on the wire minus the length
# octets and root label (RFC 1035 section 2.3.4) leaves 253 characters.
MAX_NAME_LENGTH = 253
# Longest label (RFC 1035 section 2.3.4).
MAX_LABEL_LENGTH = 63

_DIGITS = frozenset("0123456789")
_OCTAL = frozenset("01234567")
_HEX = frozenset("0123456789abcdefABCDEF")
# What glibc's inet_aton accepts after the address: isascii && isspace in
# the C locale.
_C_SPACE = frozenset(" \t\n\v\f\r")
# Largest value of the last part given how many parts came before it
# (inet_aton: a, a.b with b 24 bits, a.b.c with c 16 bits, a.b.c.d).
_LAST_PART_MAX = (0xFFFFFFFF, 0xFFFFFF, 0xFFFF, 0xFF)
# Label characters accepted in names: letters, digits, hyphen (RFC 1123)
# and underscore, which real deployments use (RFC 2181 section 11 allows any
# octet; the hostname rules are stricter, but rejecting '_' breaks
# docker-compose style service names).
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
# Dots that IDNA (RFC 3490 section 3.1) treats as label separators.
_UNICODE_DOTS = ("\u3002", "\uff0e", "\uff61")

# Names that mean the local host (RFC 6761 section 6.3 for localhost and
# everything under it; the others are the aliases Debian and most Linux
# distributions ship in /etc/hosts).
_LOCALHOST_NAMES = frozenset(
    {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
)
# Cloud instance-metadata names. The addresses behind them (169.254.169.254,
# fd00:ec2::254) are in the default deny table already; denying the names
# too means no lookup is made and the denial is clear even when a resolver
# is misconfigured.
_METADATA_NAMES: dict[str, str] = {
    "metadata.google.internal": "the Google Cloud metadata server",
    "metadata.goog": "the Google Cloud metadata server",
    "metadata": "a cloud metadata server (short name)",
    "instance-data": "the AWS EC2 instance metadata service",
    "instance-data.ec2.internal": "the AWS EC2 instance metadata service",
}


@dataclass(frozen=True)
class Target:
    """A host after normalisation.

    Exactly one of `address` and `name` is set, unless `problem` is set, in
    which case the host is denied before any lookup (``address`` may still
    hold what the C library would have read, for the message).

    `needs_lookup` is true when the host is a name that must be resolved
    before a decision; the gateway resolves it itself and then calls
    `Decider.decide_resolved`. Call `Decider.predecide` first: it returns a
    final `Decision` whenever one can be made without a lookup (numeric
    hosts, malformed hosts, denied ports, localhost and metadata names,
    names a deny rule matches) and None when a lookup is needed.
    """

    original: str
    address: IPAddress | None = None
    name: str | None = None
    problem: str | None = None
    needs_lookup: bool = field(init=False)
    text: str = field(init=False, repr=False, compare=False)  # str(self), made once

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs_lookup", self.problem is None and self.name is not None)
        if self.address is not None:
            text = str(self.address)
        else:
            text = self.name if self.name is not None else self.original
        object.__setattr__(self, "text", text)

    def __str__(self) -> str:
        return self.text


# A canonical dotted quad (four decimal octets, no leading zeros, ASCII):
# every reading of it agrees, so it skips the general parser below. It is
# what nearly every connect names, and this is on every connect's path.
_DOTTED_QUAD = re.compile(
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
    r"(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}"
)


def parse_c_ipv4(text: str) -> tuple[ipaddress.IPv4Address, str] | None:
    """Parse an IPv4 address the way glibc's ``inet_aton`` does.

    Returns the address and whatever follows it (empty, or text starting
    with whitespace, which ``inet_aton`` ignores but getaddrinfo's
    ``__inet_aton_exact`` rejects), or None if it is not an address.

    Each part is a C integer constant: ``0x`` hex, leading ``0`` octal,
    otherwise decimal. ``a`` is 32 bits, ``a.b`` is 8.24, ``a.b.c`` is
    8.8.16 and ``a.b.c.d`` is 8.8.8.8. This mirrors glibc
    resolv/inet_addr.c (strtoul with base 0), including its quirks: ``0x``
    with no hex digit after it parses as ``0`` followed by junk.
    """
    if _DOTTED_QUAD.fullmatch(text):
        a, b, c, d = text.split(".")
        return ipaddress.IPv4Address(int(a) << 24 | int(b) << 16 | int(c) << 8 | int(d)), ""
    return _parse_c_ipv4(text)


def _parse_c_ipv4(text: str) -> tuple[ipaddress.IPv4Address, str] | None:
    """`parse_c_ipv4` for every form, strtoul(base 0) part by part."""
    parts: list[int] = []
    i, n = 0, len(text)
    while True:
        if i >= n or text[i] not in _DIGITS:
            return None
        if text[i] == "0" and i + 2 < n and text[i + 1] in "xX" and text[i + 2] in _HEX:
            start = j = i + 2
            while j < n and text[j] in _HEX:
                j += 1
            base = 16
        elif text[i] == "0":
            start = j = i
            while j < n and text[j] in _OCTAL:
                j += 1
            base = 8
        else:
            start = j = i
            while j < n and text[j] in _DIGITS:
                j += 1
            base = 10
        digits = text[start:j].lstrip("0") or "0"
        # 11 significant digits exceed 32 bits in every base; checking the
        # length first keeps int() away from absurdly long strings.
        if len(digits) > 11:
            return None
        value = int(digits, base)
        if value > 0xFFFFFFFF:
            return None
        i = j
        if i < n and text[i] == ".":
            if len(parts) > 2 or value > 0xFF:
                return None
            parts.append(value)
            i += 1
            continue
        break
    if i < n and text[i] not in _C_SPACE:
        return None
    if value > _LAST_PART_MAX[len(parts)]:
        return None
    packed = 0
    for index, part in enumerate(parts):
        packed |= part << (24 - 8 * index)
    return ipaddress.IPv4Address(packed | value), text[i:]


def _looks_numeric(label: str) -> bool:
    """True for a last label no real top-level domain can have.

    TLDs are never all-numeric (RFC 3696 section 2), so ``127.0.0.256`` or
    ``1.2.3.0x1f0`` can only be a mistyped or deliberately odd address; a
    resolver might still answer for them, so they are refused instead.
    """
    if label and all(c in _DIGITS for c in label):
        return True
    return label.startswith("0x") and all(c in _HEX for c in label[2:])


def normalize_name(text: str) -> str:
    """Lower-case ASCII form of a host name, or ValueError saying why not.

    Drops one trailing dot, encodes non-ASCII labels with Python's ``idna``
    codec (the one CPython's socket module uses), and checks label
    characters and lengths. Numeric-looking names are rejected here; callers
    try the numeric forms first.
    """
    name = text
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"{text!r} is not a valid internationalised host name") from exc
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise ValueError("the host name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"the host name is longer than {MAX_NAME_LENGTH} characters")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise ValueError(f"{text!r} has an empty label")
        if len(label) > MAX_LABEL_LENGTH:
            raise ValueError(f"{text!r} has a label longer than {MAX_LABEL_LENGTH} characters")
        bad = sorted(set(label) - _LABEL_CHARS)
        if bad:
            raise ValueError(f"{text!r} contains {bad[0]!r}, which is not allowed in a host name")
    if _looks_numeric(labels[-1]):
        raise ValueError(f"{text!r} looks like an IPv4 address but is not one")
    return name


def _parse_ipv6(text: str) -> ipaddress.IPv6Address | None:
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        return None


def _normalize_ascii(original: str, text: str) -> Target:
    if text.startswith("["):
        inner = text[1:-1] if text.endswith("]") else None
        address6 = _parse_ipv6(inner) if inner is not None else None
        if address6 is None:
            return Target(original, problem="brackets may only enclose an IPv6 address")
        return Target(original, address=address6)
    if ":" in text:
        address6 = _parse_ipv6(text)
        if address6 is None:
            return Target(original, problem=f"{original!r} is not a valid IPv6 address")
        return Target(original, address=address6)
    lowered = text.lower()
    # getaddrinfo treats a trailing dot as part of a name, so "127.0.0.1."
    # would go to DNS; reading it as the address it spells is the
    # conservative choice.
    stripped = lowered[:-1] if lowered.endswith(".") else lowered
    parsed = parse_c_ipv4(stripped)
    if parsed is not None:
        address4, rest = parsed
        if rest:
            return Target(
                original,
                address=address4,
                problem=f"host {original!r} has characters after the IPv4 address {address4}",
            )
        return Target(original, address=address4)
    try:
        name = normalize_name(text)
    except ValueError as exc:
        return Target(original, problem=str(exc))
    return Target(original, name=name)


def normalize_host(host: str) -> Target:
    """Normalise a host string from a sandboxed program.

    Handles, in order: embedded NUL bytes (denied: C would cut the string
    short), CPython's special hosts ``''`` (INADDR_ANY, 0.0.0.0) and
    ``'<broadcast>'`` (255.255.255.255), Unicode (NFKC and the ``idna``
    codec; if either reading is numeric the host is judged as that number),
    bracketed and zone-indexed IPv6, every IPv4 form ``inet_aton`` accepts
    (decimal, hex, octal, short forms), trailing dots and case.
    """
    if "\x00" in host:
        return Target(
            host, problem="the host contains a NUL byte; C code would read only the part before it"
        )
    if host == "":
        return Target(host, address=ipaddress.IPv4Address("0.0.0.0"))
    if host == "<broadcast>":
        return Target(host, address=ipaddress.IPv4Address("255.255.255.255"))
    if host.isascii():
        return _normalize_ascii(host, host)
    # NFKC first: fullwidth or circled digits and Unicode dots read as an
    # address here, as they do after the idna codec's nameprep step. Judging
    # the numeric reading whenever there is one is the conservative choice.
    folded = unicodedata.normalize("NFKC", host)
    for dot in _UNICODE_DOTS:
        folded = folded.replace(dot, ".")
    if folded.isascii():
        target = _normalize_ascii(host, folded)
        if target.address is not None:
            return target
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError:
        return Target(host, problem=f"{host!r} is not a valid internationalised host name")
    return _normalize_ascii(host, encoded)


def reserved_name(name: str) -> tuple[str, str] | None:
    """(reason, rule) if `name` is denied before any lookup, else None."""
    if name in _LOCALHOST_NAMES:
        return f"{name} is the local host (RFC 6761)", f"deny {name}"
    if name.endswith(".localhost"):
        return f"{name} is under .localhost, the local host (RFC 6761)", "deny *.localhost"
    what = _METADATA_NAMES.get(name)
    if what is not None:
        return f"{name} is {what}", f"deny {name}"
    return None
