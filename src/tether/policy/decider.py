"""The egress decider: pure, no sockets, no lookups of its own.

Evaluation order for each address a host stands for (docs/policy.md has
the long form):

1. Hard denials, which no rule and no report mode lift: a malformed host,
   a port outside 1-65535, the gateway's own listening addresses, a
   resolver answer that is not a numeric address.
2. Reserved names (localhost, ``*.localhost``, cloud metadata names),
   unless an allow rule names the name exactly or an address allow rule
   covers the address it resolved to.
3. Rules, first match wins: app allow, app deny, global allow (configured,
   then App Engine's defaults), global deny.
4. Port rules (``deny_ports``, ``allow_ports``), unless the allow rule that
   matched lists the port explicitly.
5. The default deny range table, unless an address (IP/CIDR) allow rule
   covers the address. A name rule vouches for the name only: every
   address the name resolves to is still judged by address rules and the
   table, so ``*.example.com`` resolving to 10.0.0.1 stays denied.
6. Otherwise allowed.

IPv6 forms that embed an IPv4 address are judged as themselves and by the
embedded address; see `Decider` and docs/policy.md for the exact rule.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from tether.policy._resolution import Resolver
from tether.policy.hosts import Target, normalize_host, reserved_name
from tether.policy.policyset import PolicySet
from tether.policy.ranges import (
    NAT64_PREFIX_LENGTHS,
    Embedding,
    IPAddress,
    classify,
    embedded_ipv4,
    nat64_ipv4,
    strip_scope,
)
from tether.policy.rules import MAX_PORT, Rule, Transport

__all__ = ["Candidate", "Decider", "Decision"]

DEFAULT_ALLOW_RULE = "default allow"

# Decisions and host readings are pure functions of the policy and the
# request, and apps connect to the same few destinations over and over, so a
# Decider keeps what it decided (a reload makes a new Decider, so a memo never
# outlives its policy). Judging a request costs ~30 us of Python; a memo hit
# ~1 us (bench/README.md, connection rate). 4,096 distinct requests bound
# the memo at a few MiB; when it is full it starts over.
MEMO_LIMIT = 4096

# Why the default denied ports are denied, in App Engine's words.
_PORT_REASONS = {
    25: "port 25 (SMTP) is denied; use authenticated submission on port 587",
    21: "port 21 (FTP) is denied; FTP is not supported",
}

_Ordered = tuple[tuple[Rule, bool], ...]
_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass(frozen=True)
class Candidate:
    """One address a host resolved to, with its own verdict."""

    address: str
    allowed: bool
    reason: str
    rule: str

    def to_log(self) -> dict[str, object]:
        return {
            "address": self.address,
            "verdict": "allow" if self.allowed else "deny",
            "reason": self.reason,
            "rule": self.rule,
        }


@dataclass(frozen=True)
class Decision:
    """The outcome for one connection request.

    `addresses` are the validated numeric addresses the gateway may connect
    to, in resolver order; it must use them and never look the name up
    again. They are empty when the request is denied. `candidates` lists
    every address considered with its own verdict. In report mode a request
    enforce mode would deny is allowed with ``would_deny=True``; `reason`
    and `rule` then say what enforce mode would have denied it for.
    """

    allowed: bool
    reason: str
    rule: str
    app: str
    host: str
    port: int
    transport: Transport
    addresses: tuple[str, ...] = ()
    candidates: tuple[Candidate, ...] = ()
    mode: str = "enforce"
    would_deny: bool = False
    normalized: str = ""

    @property
    def destination(self) -> str:
        """``host:port`` as requested, with how a numeric host was read if that differs."""
        shown = self.host if self.host and self.host.isprintable() else repr(self.host)
        literal = _as_address(self.normalized)
        if literal is not None and literal.version == 6 and not shown.startswith("["):
            shown = f"[{shown}]"
        dest = f"{shown}:{self.port}"
        if literal is not None and self.normalized != self.host.strip("[]"):
            dest += f" (read as {self.normalized})"
        return dest

    def describe(self) -> str:
        """One sentence for an error message or log line."""
        what = "connection" if self.transport is Transport.TCP else "UDP traffic"
        for_app = f" for app {self.app!r}" if self.app else ""
        head = f"tether: {what} to {self.destination}"
        if not self.allowed:
            return f"{head} denied{for_app}: {self.reason} (rule: {self.rule})"
        if self.would_deny:
            return (
                f"{head} allowed{for_app} in report mode; enforce mode would deny it: "
                f"{self.reason} (rule: {self.rule})"
            )
        return f"{head} allowed{for_app}: {self.reason} (rule: {self.rule})"

    @functools.cached_property
    def log_json(self) -> str:
        """`to_log()` as compact JSON, made once: a decision is logged on every connect."""
        return json.dumps(self.to_log(), separators=(",", ":"))

    def to_log(self) -> dict[str, object]:
        """A JSON-able record for the audit log."""
        return {
            "app": self.app,
            "host": self.host,
            "normalized": self.normalized,
            "port": self.port,
            "transport": self.transport.value,
            "verdict": "allow" if self.allowed else "deny",
            "would_deny": self.would_deny,
            "reason": self.reason,
            "rule": self.rule,
            "mode": self.mode,
            "addresses": list(self.addresses),
            "candidates": [candidate.to_log() for candidate in self.candidates],
        }


def _as_address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class _Verdict:
    allowed: bool
    reason: str
    rule: str
    hard: bool = False  # never lifted by report mode
    by_rule: bool = False  # a configured rule decided, not the default table
    names_port: bool = False  # the allow rule that decided lists the port


_LOCAL_NETWORKS = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("::/127"),  # :: and ::1
)


def _is_local(address: IPAddress) -> bool:
    return any(address.version == n.version and address in n for n in _LOCAL_NETWORKS)


def _parse_self_address(host: str, port: int) -> list[tuple[IPAddress | None, int]]:
    target = normalize_host(host)
    if target.problem is not None:
        raise ValueError(f"gateway listen address {host!r}: {target.problem}")
    if target.address is not None:
        address = strip_scope(target.address)
        return [(None if address.is_unspecified else address, port)]
    if target.name in ("localhost", "ip6-localhost", "ip6-loopback", "localhost.localdomain"):
        return [
            (ipaddress.IPv4Address("127.0.0.1"), port),
            (ipaddress.IPv6Address("::1"), port),
        ]
    raise ValueError(
        f"gateway listen address {host!r} must be numeric or localhost; the decider "
        "does not look names up"
    )


class Decider:
    """Decides whether an app may reach a host and port; see the module doc.

    Typical gateway use, with its own async lookup::

        target = decider.normalize(host)
        decision = decider.predecide(app, target, port, transport)
        if decision is None:              # a name that needs a lookup
            answers = await lookup(target.name)
            decision = decider.decide_resolved(app, target, port, transport, answers)
        if decision.allowed:
            connect to decision.addresses (never to the name again)

    `self_addresses` are the gateway's own listening (host, port) pairs,
    numeric or ``localhost``; connections to them are always denied so a
    program cannot loop through the gateway. A wildcard listener (``''``,
    ``0.0.0.0``, ``::``) denies its port on the loopback and unspecified
    addresses; pass the machine's other addresses explicitly if they matter.
    """

    def __init__(self, policy: PolicySet, self_addresses: Iterable[tuple[str, int]] = ()) -> None:
        self._policy = policy
        self._self: list[tuple[IPAddress | None, int]] = []
        for host, port in self_addresses:
            self._self.extend(_parse_self_address(host, port))
        self._orders: dict[str, _Ordered] = {}
        self._targets: dict[str, Target] = {}
        self._decisions: dict[tuple[object, ...], Decision] = {}
        self._predecided: dict[tuple[object, ...], Decision | None] = {}

    @property
    def policy(self) -> PolicySet:
        return self._policy

    # ----------------------------------------------------------------- API

    def normalize(self, host: str) -> Target:
        """Read `host` the way the C library would; see `normalize_host`."""
        target = self._targets.get(host)
        if target is None:
            target = _remember(self._targets, host, normalize_host(host))
        return target

    def predecide(
        self, app: str, target: Target, port: int, transport: Transport
    ) -> Decision | None:
        """The decision if it can be made without a lookup, else None.

        Numeric and malformed targets always get a decision. A name gets a
        denial when it is certain before any lookup: a reserved name
        (localhost, metadata), a deny rule for the name that no earlier
        rule can pre-empt, or a denied port no allow rule could lift. In
        report mode such soft denials return None, so the lookup happens and
        `decide_resolved` can allow the connection with ``would_deny``.
        """
        if target.problem is not None or target.address is not None or not _port_ok(port):
            return self.decide_resolved(app, target, port, transport, ())
        assert target.name is not None  # no problem and no address: a name
        key = (app, target.original, target.name, port, transport)
        if key in self._predecided:
            return self._predecided[key]
        verdict = self._prejudge_name(self._order(app), target.name, port, transport)
        early = None
        if verdict is not None and self._policy.mode_for(app) != "report":
            early = self._decision(app, target, port, transport, verdict, ())
        return _remember(self._predecided, key, early)

    def decide_resolved(
        self,
        app: str,
        target: Target,
        port: int,
        transport: Transport,
        addresses: Sequence[str],
    ) -> Decision:
        """Decide with the resolver's answers for a name target.

        `addresses` are judged one by one; denied ones are dropped and the
        rest become `Decision.addresses`, in order. They are ignored for a
        numeric target, which is its own single candidate.
        """
        # Everything the decision depends on besides the policy. A Target is
        # fixed by how it was read (its text, and whether that is an address
        # or a problem), which is cheaper to hash than the Target itself.
        key = (
            app,
            target.original,
            target.text,
            target.address is None,
            target.problem,
            port,
            transport,
            () if target.address is not None else tuple(addresses),
        )
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide_resolved(app, target, port, transport, addresses)
            _remember(self._decisions, key, decision)
        return decision

    def _decide_resolved(
        self,
        app: str,
        target: Target,
        port: int,
        transport: Transport,
        addresses: Sequence[str],
    ) -> Decision:
        hard = _hard_target_verdict(target, port)
        if hard is not None:
            return self._decision(app, target, port, transport, hard, ())
        order = self._order(app)
        parsed: list[tuple[str, IPAddress | None]] = []
        if target.address is not None:
            parsed.append((target.text, target.address))
        else:
            seen: set[str] = set()
            for text in addresses:
                try:
                    address: IPAddress | None = ipaddress.ip_address(text)
                except ValueError:
                    address = None
                key = str(address) if address is not None else text
                if key not in seen:
                    seen.add(key)
                    parsed.append((key, address))
        if not parsed:
            verdict = _Verdict(
                False, f"{target} resolved to no addresses", "deny unresolved", hard=True
            )
            return self._decision(app, target, port, transport, verdict, ())
        judged: list[tuple[Candidate, _Verdict]] = []
        for text, address in parsed:
            if address is None:
                verdict = _Verdict(
                    False,
                    f"the resolver answered {text!r}, which is not a numeric address",
                    "deny invalid answer",
                    hard=True,
                )
            else:
                verdict = self._judge(order, target, address, port, transport)
            judged.append((Candidate(text, verdict.allowed, verdict.reason, verdict.rule), verdict))
        return self._conclude(app, target, port, transport, judged)

    def decide(
        self,
        app: str,
        host: str,
        port: int,
        transport: Transport = Transport.TCP,
        resolver: Resolver | None = None,
    ) -> Decision:
        """Normalise, try `predecide`, resolve a name once, `decide_resolved`.

        Raises `ResolutionError` from the resolver (the name does not exist:
        that is for the program to see as a gaierror, not a policy
        decision), and ValueError when a name needs a lookup and no
        resolver was given.
        """
        target = self.normalize(host)
        early = self.predecide(app, target, port, transport)
        if early is not None:
            return early
        assert target.name is not None
        if resolver is None:
            raise ValueError(f"deciding on {target.name!r} needs a resolver")
        answers = resolver.resolve(target.name)
        return self.decide_resolved(app, target, port, transport, answers)

    # ------------------------------------------------------------ internals

    def _order(self, app: str) -> _Ordered:
        key = app if app in self._policy.apps else ""
        order = self._orders.get(key)
        if order is None:
            order = self._orders[key] = self._policy.ordered_rules(key)
        return order

    def _decision(
        self,
        app: str,
        target: Target,
        port: int,
        transport: Transport,
        verdict: _Verdict,
        candidates: tuple[Candidate, ...],
        addresses: tuple[str, ...] = (),
        would_deny: bool = False,
    ) -> Decision:
        return Decision(
            allowed=verdict.allowed or would_deny,
            reason=verdict.reason,
            rule=verdict.rule,
            app=app,
            host=target.original,
            port=port,
            transport=transport,
            addresses=addresses,
            candidates=candidates,
            mode=self._policy.mode_for(app),
            would_deny=would_deny,
            normalized=target.text,
        )

    def _conclude(
        self,
        app: str,
        target: Target,
        port: int,
        transport: Transport,
        judged: list[tuple[Candidate, _Verdict]],
    ) -> Decision:
        candidates = tuple(candidate for candidate, _ in judged)
        allowed = [(c, v) for c, v in judged if v.allowed]
        if allowed:
            first = allowed[0][1]
            return self._decision(
                app,
                target,
                port,
                transport,
                first,
                candidates,
                addresses=tuple(c.address for c, _ in allowed),
            )
        if self._policy.mode_for(app) == "report":
            soft = [(c, v) for c, v in judged if not v.hard]
            if soft:
                return self._decision(
                    app,
                    target,
                    port,
                    transport,
                    soft[0][1],
                    candidates,
                    addresses=tuple(c.address for c, _ in soft),
                    would_deny=True,
                )
        return self._decision(app, target, port, transport, judged[0][1], candidates)

    def _self_hit(self, forms: list[IPAddress], port: int) -> str | None:
        for address, self_port in self._self:
            if self_port != port:
                continue
            if address is None:
                if any(_is_local(form) for form in forms):
                    return f"*:{port}"
            elif address in forms:
                return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
        return None

    def _judge(
        self,
        order: _Ordered,
        target: Target,
        address: IPAddress,
        port: int,
        transport: Transport,
    ) -> _Verdict:
        embedding = embedded_ipv4(address)
        forms: list[IPAddress] = [strip_scope(address)]
        if embedding is not None:
            forms.extend(embedding.ipv4)
        own = self._self_hit(forms, port)
        if own is not None:
            return _Verdict(
                False,
                f"{own} is the gateway's own listening address",
                f"deny self {own}",
                hard=True,
            )
        name = target.name
        by_address = _address_verdict(order, address, embedding, port, transport)
        if name is not None and not (by_address.allowed and by_address.by_rule):
            reserved = _reserved_verdict(order, name, port, transport)
            if reserved is not None:
                return reserved
        primary = _primary(order, name, address, embedding, port, transport)
        if primary is not None and not primary[1]:
            rule = primary[0]
            if rule.kind == "address":
                subject = _text(address)
                if not rule.contains(address):
                    subject = f"{address} embeds an address that"
            else:
                subject = name if name is not None else _text(address)
            return _Verdict(False, f"{subject} matches a deny rule", f"deny {rule}", by_rule=True)
        names_port = (primary is not None and primary[0].names_port) or (
            by_address.allowed and by_address.names_port
        )
        if not by_address.allowed and by_address.by_rule:
            return by_address
        if not names_port:
            by_port = self._port_verdict(port)
            if by_port is not None:
                return by_port
        if not by_address.allowed:
            return by_address
        if primary is not None and primary[0].kind != "address":
            subject = name if name is not None else _text(address)
            return _Verdict(
                True, f"{subject} matches an allow rule", f"allow {primary[0]}", by_rule=True
            )
        return by_address

    def _port_verdict(self, port: int) -> _Verdict | None:
        if port in self._policy.deny_ports:
            reason = _PORT_REASONS.get(port, f"port {port} is in deny_ports")
            return _Verdict(False, reason, f"deny port {port}")
        allow_ports = self._policy.allow_ports
        if allow_ports is not None and port not in allow_ports:
            return _Verdict(False, f"port {port} is not in allow_ports", "allow_ports")
        return None

    def _prejudge_name(
        self, order: _Ordered, name: str, port: int, transport: Transport
    ) -> _Verdict | None:
        reserved = _reserved_verdict(order, name, port, transport)
        if reserved is not None and not any(
            allow and rule.kind == "address" and rule.covers(port, transport)
            for rule, allow in order
        ):
            # No address rule could open what the name resolves to.
            return reserved
        for rule, allow in order:
            if not rule.covers(port, transport):
                continue
            if rule.kind == "address":
                if allow:
                    # It may match an answer and win before any name rule.
                    break
                continue
            if rule.matches_name(name):
                if allow:
                    break
                return _Verdict(False, f"{name} matches a deny rule", f"deny {rule}", by_rule=True)
        by_port = self._port_verdict(port)
        if by_port is None:
            return None
        for rule, allow in order:
            could_match = rule.kind == "address" or rule.matches_name(name)
            if allow and rule.names_port and rule.covers(port, transport) and could_match:
                return None
        return by_port


def _remember(memo: dict[_K, _V], key: _K, value: _V) -> _V:
    """Store in a bounded memo (see MEMO_LIMIT); returns `value`."""
    if len(memo) >= MEMO_LIMIT:
        memo.clear()
    memo[key] = value
    return value


# str() of an ipaddress object is computed in Python on every call, and a
# decision quotes the same few addresses over and over; bounded.
_text = functools.lru_cache(maxsize=4096)(str)


def _port_ok(port: int) -> bool:
    return isinstance(port, int) and 1 <= port <= MAX_PORT


def _hard_target_verdict(target: Target, port: int) -> _Verdict | None:
    if target.problem is not None:
        return _Verdict(False, target.problem, "deny invalid host", hard=True)
    if not _port_ok(port):
        return _Verdict(
            False,
            f"port {port} is not a destination port (1-{MAX_PORT})",
            f"deny port {port}",
            hard=True,
        )
    return None


def _reserved_verdict(
    order: _Ordered, name: str, port: int, transport: Transport
) -> _Verdict | None:
    reserved = reserved_name(name)
    if reserved is None:
        return None
    for rule, allow in order:
        if allow and rule.kind == "name" and rule.host == name and rule.covers(port, transport):
            return None
    return _Verdict(False, reserved[0], reserved[1])


def _address_matches(
    rule: Rule, allow: bool, address: IPAddress, embedding: Embedding | None
) -> bool:
    """Whether an address rule matches, counting embedded IPv4 addresses.

    An IPv4 deny rule matches every form that embeds an address it covers.
    An IPv4 allow rule matches only the IPv4-mapped form, the one the
    kernel itself sends to the IPv4 address; for 6to4, NAT64 and the rest
    an IPv6 rule must open the outer range.
    """
    if rule.contains(address):
        return True
    if embedding is None or rule.network is None or rule.network.version != 4:
        return False
    if allow and embedding.form != "mapped":
        return False
    return any(rule.contains(inner) for inner in embedding.ipv4)


def _primary(
    order: _Ordered,
    name: str | None,
    address: IPAddress,
    embedding: Embedding | None,
    port: int,
    transport: Transport,
) -> tuple[Rule, bool] | None:
    for rule, allow in order:
        if not rule.covers(port, transport):
            continue
        if rule.kind == "address":
            if _address_matches(rule, allow, address, embedding):
                return rule, allow
        elif rule.kind == "any" or (name is not None and rule.matches_name(name)):
            return rule, allow
    return None


def _address_verdict(
    order: _Ordered,
    address: IPAddress,
    embedding: Embedding | None,
    port: int,
    transport: Transport,
) -> _Verdict:
    """The verdict of address rules and the default table for one address."""
    first: tuple[Rule, bool] | None = None
    for rule, allow in order:
        if (
            rule.kind == "address"
            and rule.covers(port, transport)
            and _address_matches(rule, allow, address, embedding)
        ):
            first = rule, allow
            break
    if first is not None and not first[1]:
        return _Verdict(
            False, f"{_text(address)} matches a deny rule", f"deny {first[0]}", by_rule=True
        )
    if first is not None:
        rule = first[0]
        outer = _Verdict(
            True,
            f"{_text(address)} matches an allow rule",
            f"allow {rule}",
            by_rule=True,
            names_port=rule.names_port,
        )
    else:
        row = classify(address)
        if row is not None:
            outer = _Verdict(False, row.reason, row.rule)
        else:
            outer = _Verdict(True, f"{_text(address)} is in no denied range", DEFAULT_ALLOW_RULE)
    if embedding is None:
        return outer
    # The embedded IPv4 address must pass on its own too, unless the rule
    # that opened the outer address names it: an IPv4 rule covering it, or
    # an IPv6 rule for exactly this address. A broad IPv6 allow (a NAT64
    # prefix, ::ffff:0:0/96) thus reaches public IPv4 hosts, never private
    # or loopback ones.
    inners = embedding.ipv4
    if first is not None:
        network = first[0].network
        assert network is not None
        if network.version == 4 or network.prefixlen == network.max_prefixlen:
            return outer
        if embedding.form == "nat64-local" and network.prefixlen in NAT64_PREFIX_LENGTHS:
            # The rule names the NAT64 prefix in use, so its length says
            # where the IPv4 address sits.
            assert isinstance(address, ipaddress.IPv6Address)
            inners = (nat64_ipv4(address, network.prefixlen),)
    for inner in inners:
        verdict = _address_verdict(order, inner, None, port, transport)
        if not verdict.allowed:
            return replace(verdict, reason=f"{address} embeds {inner}: {verdict.reason}")
    return outer
