"""Allow and deny rules: ``HOST[:PORTS][/tcp|/udp]``.

HOST is ``*`` (any host), an exact name (``db.example.com``), a wildcard
(``*.example.com``: any name strictly under example.com, at any depth, not
example.com itself), an IPv4 or IPv6 address, or a CIDR network. An IPv6
host must be in brackets when a port follows (``[::1]:80``,
``[fc00::/7]:443``). PORTS is a number, ``LO-HI`` or ``*``; left out it
means every port. The suffix limits the rule to one transport; left out the
rule covers both.

``str(Rule.parse(text))`` is the canonical spelling, and
``Rule.parse(str(rule)) == rule`` for every rule.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from tether.policy.hosts import normalize_name
from tether.policy.ranges import IPAddress, IPNetwork, strip_scope

__all__ = ["PortRange", "Rule", "RuleError", "Transport"]

# Highest TCP/UDP port number (16-bit field, RFC 793 / RFC 768). Port 0 is
# not a destination, so rules start at 1.
MAX_PORT = 65535


class Transport(enum.Enum):
    """The transport a connection uses."""

    TCP = "tcp"
    UDP = "udp"

    # Members are singletons compared by identity, so identity hashing is
    # exact, and it is C: Enum's own __hash__ is Python, and a Transport is
    # in the key of every decision memo lookup (policy/decider.py).
    __hash__ = object.__hash__


class RuleError(ValueError):
    """A rule's text is not valid; the message says what is wrong."""


@dataclass(frozen=True)
class PortRange:
    """An inclusive port range; a single port has ``low == high``."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high <= MAX_PORT:
            raise RuleError(f"port range {self.low}-{self.high} is not within 1-{MAX_PORT}")

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"

    @classmethod
    def parse(cls, text: str) -> PortRange:
        low_text, dash, high_text = text.partition("-")
        low = _port_number(low_text, text)
        high = _port_number(high_text, text) if dash else low
        if high < low:
            raise RuleError(f"port range {text!r} runs backwards")
        return cls(low, high)


def _port_number(text: str, whole: str) -> int:
    if not text or not text.isascii() or not text.isdigit():
        raise RuleError(f"{whole!r} is not a port, a LO-HI port range or '*'")
    value = int(text)
    if not 1 <= value <= MAX_PORT:
        raise RuleError(f"port {value} is not within 1-{MAX_PORT}")
    return value


HostKind = Literal["any", "name", "wildcard", "address"]


@dataclass(frozen=True)
class Rule:
    """One allow or deny rule (the list it is in says which).

    `host` is the canonical host text: ``*``, a lower-case ASCII name, a
    wildcard's suffix without the ``*.``, or the network in CIDR form.
    """

    kind: HostKind
    host: str
    network: IPNetwork | None = None
    ports: PortRange | None = None
    transport: Transport | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        """Parse rule text; raises `RuleError` with a plain-words reason."""
        if not isinstance(text, str):
            raise RuleError(f"a rule must be a string, not {type(text).__name__}")
        spec = text.strip()
        if not spec:
            raise RuleError("the rule is empty")
        transport: Transport | None = None
        lowered = spec.lower()
        for candidate in Transport:
            if lowered.endswith("/" + candidate.value):
                transport = candidate
                spec = spec[: -len(candidate.value) - 1]
                break
        host_text, port_text = _split_host_port(spec, text)
        ports = None if port_text in (None, "*") else PortRange.parse(port_text)
        kind, host, network = _parse_host(host_text, text)
        return cls(kind, host, network, ports, transport)

    def __str__(self) -> str:
        return self._text

    @cached_property
    def _text(self) -> str:
        # Cached: a decision quotes its rule on every connect (frozen, so safe).
        if self.kind == "wildcard":
            host = "*." + self.host
        elif self.network is not None:
            net = self.network
            single = net.prefixlen == net.max_prefixlen
            body = str(net.network_address) if single else str(net)
            host = f"[{body}]" if net.version == 6 else body
        else:
            host = self.host
        if self.ports is not None:
            host += f":{self.ports}"
        elif self.transport is not None:
            # Spell the port out so the suffix cannot be read as a prefix
            # length ("10.0.0.0/8:*/udp", not "10.0.0.0/8/udp").
            host += ":*"
        if self.transport is not None:
            host += "/" + self.transport.value
        return host

    @property
    def names_port(self) -> bool:
        """True when the rule lists ports (anything but ``*``).

        Only such a rule lifts ``deny_ports``/``allow_ports`` for the ports it
        lists: allowing ``mail.example.com`` does not open port 25 to it,
        ``mail.example.com:25`` does.
        """
        return self.ports is not None

    def covers(self, port: int, transport: Transport) -> bool:
        """True when the rule's port and transport parts match."""
        if self.transport is not None and self.transport is not transport:
            return False
        return self.ports is None or port in self.ports

    def matches_name(self, name: str) -> bool:
        """True when a name rule (or ``*``) matches a normalised name."""
        if self.kind == "any":
            return True
        if self.kind == "name":
            return name == self.host
        if self.kind == "wildcard":
            return name.endswith("." + self.host)
        return False

    def contains(self, address: IPAddress) -> bool:
        """True when an address rule's network contains `address` as is."""
        if self.network is None:
            return False
        bare = strip_scope(address)
        return bare.version == self.network.version and bare in self.network


def _split_host_port(spec: str, whole: str) -> tuple[str, str | None]:
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0:
            raise RuleError(f"{whole!r} has '[' without ']'")
        host = spec[1:close]
        rest = spec[close + 1 :]
        if rest.startswith("/"):
            # "[fc00::]/7:443": the prefix length written outside brackets.
            length, colon, port = rest[1:].partition(":")
            host = f"{host}/{length}"
            rest = colon + port
        if not rest:
            return "[" + host, None
        if not rest.startswith(":"):
            raise RuleError(f"{whole!r} has {rest!r} after ']'; expected ':PORT'")
        return "[" + host, rest[1:]
    if spec.count(":") >= 2:
        # An unbracketed IPv6 address or network; it cannot carry a port.
        return spec, None
    host, colon, port = spec.partition(":")
    return host, (port if colon else None)


def _parse_network(text: str, whole: str) -> IPNetwork:
    if "%" in text:
        raise RuleError(f"{whole!r}: rules cannot name an IPv6 zone; leave out the '%...'")
    try:
        if "/" in text:
            return ipaddress.ip_network(text, strict=True)
        return ipaddress.ip_network(ipaddress.ip_address(text))
    except ValueError as exc:
        if "/" in text:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                pass
            else:
                raise RuleError(f"{text} has host bits set; did you mean {loose}?") from exc
        raise RuleError(f"{text!r} is not a valid IP address or network") from exc


def _parse_host(text: str, whole: str) -> tuple[HostKind, str, IPNetwork | None]:
    if text.startswith("["):
        network = _parse_network(text[1:], whole)
        if network.version != 6:
            raise RuleError(f"{whole!r}: brackets are only for IPv6 addresses")
        return "address", str(network), network
    if not text:
        raise RuleError(f"{whole!r} has no host part")
    if text == "*":
        return "any", "*", None
    if ":" in text or "/" in text:
        network = _parse_network(text, whole)
        return "address", str(network), network
    if _all_numeric(text):
        try:
            network = ipaddress.ip_network(ipaddress.IPv4Address(text))
        except ValueError as exc:
            # Rules are read strictly: "127.1" or "0x7f.0.0.1" in a config
            # file is more likely a typo than a wish for C's readings.
            raise RuleError(
                f"{whole!r}: write IPv4 addresses as four decimal numbers, e.g. 127.0.0.1"
            ) from exc
        return "address", str(network), network
    wildcard = text.startswith("*.")
    name_text = text[2:] if wildcard else text
    if "*" in name_text:
        raise RuleError(
            f"{whole!r}: '*' may only be the whole host or a first label, as in *.example.com"
        )
    try:
        name = normalize_name(name_text)
    except ValueError as exc:
        raise RuleError(f"{whole!r}: {exc}") from exc
    return ("wildcard" if wildcard else "name"), name, None


def _all_numeric(text: str) -> bool:
    """True when the last label starts with a digit and only IPv4-form characters are used.

    No top-level domain starts with a digit (RFC 3696 section 2), so such
    text is meant as an address.
    """
    stripped = text[:-1] if text.endswith(".") else text
    last = stripped.rsplit(".", 1)[-1]
    return (
        bool(last)
        and last[0] in "0123456789"
        and all(c in "0123456789abcdefxABCDEFX." for c in stripped)
    )
