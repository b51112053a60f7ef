"""Admission: may this app reach this destination, and at which addresses.

:func:`admit` is the one place every front-end and transport asks (bound as
``GatewayCore.admit``): it decides with the policy, keeps the addresses of
the family asked for, counts a denial against the app and writes the audit
line of a decision that ends here. A decision that is admitted is logged
later, with its outcome (connected, connect failed, ...), by the caller.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tether.endpoint import host_port
from tether.gateway import audit
from tether.gateway.core.errors import Refusal
from tether.policy import Decision, ResolutionError, Transport
from tether.wire import pb

if TYPE_CHECKING:
    from tether.gateway.core.gateway import GatewayCore

# The decision and the addresses to try, in the resolver's order: a plain
# tuple, as it is made on every connect.
Admission = tuple[Decision, Sequence[str]]

_FAMILY_NAMES = {int(socket.AF_INET): "IPv4", int(socket.AF_INET6): "IPv6"}


async def admit(
    core: GatewayCore, app: str, host: str, port: int, transport: Transport, family: int
) -> Admission | Refusal:
    """Admit `app` to `host`:`port`, or say why not.

    `family` AF_INET or AF_INET6 keeps only that family's addresses
    (AF_UNSPEC: all). Normalises the host, decides what can be decided
    before a lookup, resolves once, and judges every address.
    """
    decider = core.decider
    target = decider.normalize(host)
    try:
        if target.needs_lookup:
            decision = decider.predecide(app, target, port, transport)
            if decision is None:
                assert target.name is not None
                resolved = await core.resolver.lookup(target.name)
                decision = decider.decide_resolved(app, target, port, transport, resolved)
        else:
            # A numeric target is its own candidate: no addresses to pass.
            decision = decider.decide_resolved(app, target, port, transport, ())
    except ResolutionError as exc:
        return Refusal(pb.Error.GAI, exc.eai, exc.message)
    if not decision.allowed:
        core.registry.app_usage(app).connects_denied += 1
        log_decision(decision, outcome="denied")
        return Refusal(
            pb.Error.PERMISSION_DENIED,
            errno.EACCES,
            decision.describe(),
            rule=decision.rule,
            reason=decision.reason,
        )
    # A per-app quota or connection cap goes here: after the policy (a
    # denied destination never counts against a quota), before any socket
    # is opened; it refuses with its own Refusal, written to the audit log
    # like a denial.
    addresses: Sequence[str] = decision.addresses
    if family != socket.AF_UNSPEC:
        want_v6 = family == socket.AF_INET6
        addresses = [a for a in addresses if (":" in a) == want_v6]
    if not addresses:
        name = _FAMILY_NAMES.get(family, "usable")
        log_decision(decision, outcome=f"no {name} address")
        return Refusal(
            pb.Error.SYSTEM,
            errno.EAFNOSUPPORT,
            f"tether: {host} has no {name} address the policy allows",
        )
    return decision, addresses


def log_decision(
    decision: Decision,
    *,
    outcome: str,
    descriptor: str = "",
    chosen: tuple[Any, ...] | None = None,
) -> None:
    """One audit line per decision, written once its outcome is known.

    The descriptor is shortened to 8 characters: enough to match the close
    line, too little to use the socket.
    """
    # The decision's part is encoded once per decision (Decision.log_json);
    # the fields of this connect are appended to it.
    line = f'{{"event":"decision",{decision.log_json[1:-1]},"outcome":{audit.quote(outcome)}'
    if descriptor:
        line += f',"descriptor":{audit.quote(descriptor[:8])}'
    if chosen is not None:
        line += f',"chosen":{audit.quote(host_port(chosen[0], chosen[1]))}'
    audit.emit_line(line + "}")


__all__ = ["Admission", "admit", "log_decision"]
