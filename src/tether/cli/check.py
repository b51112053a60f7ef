"""``tether check HOST PORT``: what would the policy say? Connects to nothing.

Exit status: 0 allowed (also in report mode), 1 denied, 2 usage or config
error, or a name that could not be resolved. Names are resolved from
``--resolve`` if given, else as the gateway would resolve them: the config's
``[resolver.hosts]`` table, then the system resolver (``system`` mode) or
the configured DNS servers (``upstream`` mode); ``static`` mode asks nothing
else.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from tether.errors import ConfigError
from tether.policy import Decider, Decision, PolicySet, ResolutionError, Resolver, Transport
from tether.resolver import StaticResolver

if TYPE_CHECKING:
    from tether.config import Config

__all__ = [
    "decide_and_print",
    "format_decision",
    "parse_resolve",
    "register",
    "run",
]

EXIT_ALLOW = 0
EXIT_DENY = 1
EXIT_ERROR = 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``check`` subcommand."""
    parser = subparsers.add_parser(
        "check",
        help="show whether the policy allows a destination (connects to nothing)",
        description=(
            "Decide HOST PORT against the egress policy and print the decision, "
            "its reason and rule, and every resolved address with its own verdict. "
            "Exit status: 0 allowed, 1 denied, 2 usage or configuration error."
        ),
    )
    parser.add_argument("host", help="host name or address, as a program would pass it")
    parser.add_argument("port", type=_port, help="destination port")
    parser.add_argument("--udp", action="store_true", help="check UDP instead of TCP")
    parser.add_argument("--app", default="", metavar="NAME", help="decide for this app's rules")
    parser.add_argument("--config", type=Path, metavar="FILE", help="gateway config (TOML)")
    parser.add_argument(
        "--resolve",
        action="append",
        default=[],
        metavar="NAME=ADDR[,ADDR...]",
        help="what NAME resolves to (repeatable); no DNS query is made",
    )
    parser.set_defaults(func=run)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    # 0 is let through so the decider can say why it is refused.
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0-65535)")
    return value


def parse_resolve(values: Iterable[str]) -> dict[str, list[str]]:
    """``NAME=ADDR[,ADDR...]`` options as a mapping; ValueError if malformed."""
    table: dict[str, list[str]] = {}
    for value in values:
        name, equals, addresses = value.partition("=")
        if not equals or not name or not addresses:
            raise ValueError(f"--resolve {value!r}: expected NAME=ADDR[,ADDR...]")
        for address in addresses.split(","):
            try:
                ipaddress.ip_address(address.strip())
            except ValueError:
                raise ValueError(
                    f"--resolve {value!r}: {address.strip()!r} is not a numeric address"
                ) from None
            table.setdefault(name, []).append(address.strip())
    return table


class _ConfigResolver:
    """The gateway's own resolver for `config`, answered synchronously."""

    def __init__(self, config: Config) -> None:
        from tether.gateway.resolve import GatewayResolver

        self._resolver = GatewayResolver.from_config(config)

    def resolve(self, name: str) -> Sequence[str]:
        # One short-lived event loop per lookup: a CLI decides one target.
        return asyncio.run(self._resolver.lookup(name))


def format_decision(decision: Decision) -> str:
    """A few readable lines: verdict, reason, rule, candidates, addresses."""
    if not decision.allowed:
        verdict = "deny"
    elif decision.would_deny:
        verdict = "allow (report mode; enforce mode would deny)"
    else:
        verdict = "allow"
    for_app = f" for app {decision.app!r}" if decision.app else ""
    lines = [
        f"{verdict}: {decision.transport.value} {decision.destination}{for_app}",
        f"  reason: {decision.reason}",
        f"  rule:   {decision.rule}",
        f"  mode:   {decision.mode}",
    ]
    if decision.candidates:
        lines.append("  candidates:")
        width = max(len(c.address) for c in decision.candidates)
        for c in decision.candidates:
            mark = "allow" if c.allowed else "deny "
            lines.append(f"    {mark} {c.address:<{width}}  {c.reason} (rule: {c.rule})")
    if decision.allowed:
        lines.append(f"  connect to: {', '.join(decision.addresses)}")
    return "\n".join(lines)


def decide_and_print(
    decider: Decider,
    args: argparse.Namespace,
    out: TextIO,
    *,
    resolver: Resolver | None = None,
    err: TextIO | None = None,
) -> int:
    """Decide ``args.host``/``args.port`` and print; returns the exit status.

    Without `resolver`, names are resolved only from ``args.resolve``.
    """
    err = err if err is not None else sys.stderr
    if resolver is None:
        try:
            resolver = StaticResolver(parse_resolve(getattr(args, "resolve", None) or []))
        except ValueError as exc:
            print(f"tether check: {exc}", file=err)
            return EXIT_ERROR
    transport = Transport.UDP if getattr(args, "udp", False) else Transport.TCP
    app = getattr(args, "app", None) or ""
    port: int = args.port
    target = decider.normalize(args.host)
    decision = decider.predecide(app, target, port, transport)
    if decision is None:
        name = target.name
        assert name is not None  # predecide decides every non-name target
        try:
            answers = resolver.resolve(name)
        except ResolutionError as exc:
            print(
                f"tether check: cannot resolve {name}: {exc.message}; "
                f"pass --resolve {name}=ADDR[,ADDR...] to say what it resolves to",
                file=err,
            )
            return EXIT_ERROR
        decision = decider.decide_resolved(app, target, port, transport, answers)
    print(format_decision(decision), file=out)
    return EXIT_ALLOW if decision.allowed else EXIT_DENY


def _self_addresses(pairs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    # Listen addresses the decider cannot take without a lookup (a host
    # name) are skipped: check must not resolve them, and the gateway
    # itself passes the numeric addresses it actually bound.
    usable: list[tuple[str, int]] = []
    for pair in pairs:
        try:
            Decider(PolicySet(), [pair])
        except ValueError:
            continue
        usable.append(pair)
    return usable


def run(args: argparse.Namespace) -> int:
    """Entry point for ``tether check``."""
    from tether.config import load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"tether check: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        static = parse_resolve(args.resolve or [])
    except ValueError as exc:
        print(f"tether check: {exc}", file=sys.stderr)
        return EXIT_ERROR
    resolver: Resolver = StaticResolver(static) if static else _ConfigResolver(config)
    decider = Decider(config.policy, _self_addresses(config.listen_addresses))
    return decide_and_print(decider, args, sys.stdout, resolver=resolver, err=sys.stderr)
