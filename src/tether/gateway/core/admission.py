"""Admission: may this app reach this destination, and at which addresses.

:func:`admit` is the one place every front-end and transport asks (bound as
``GatewayCore.admit``): it decides with the policy, checks the gateway's caps
and the app's quota (``core.quota``, tether.quota), keeps the addresses of
the family asked for, counts a denial or a quota refusal against the app and
writes the audit line of a decision that ends here. A decision that is
admitted is logged later, with its outcome (connected, connect failed, ...),
by the caller. :func:`lookup_refusal` is the quota's word on a name lookup.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any

from tether.endpoint import host_port
from tether.gateway import audit
from tether.gateway.core import drain
from tether.gateway.core.errors import Refusal
from tether.gateway.core.registry import FDS_PER_SOCKET
from tether.policy import Decision, ResolutionError, Transport
from tether.wire import pb

if TYPE_CHECKING:
    from tether.config import Config
    from tether.gateway.core.gateway import GatewayCore
    from tether.quota import Exceeded

# The decision and the addresses to try, in the resolver's order: a plain
# tuple, as it is made on every connect.
Admission = tuple[Decision, Sequence[str]]

_FAMILY_NAMES = {int(socket.AF_INET): "IPv4", int(socket.AF_INET6): "IPv6"}


async def admit(
    core: GatewayCore,
    app: str,
    host: str,
    port: int,
    transport: Transport,
    family: int,
    *,
    new_socket: bool = True,
) -> Admission | Refusal:
    """Admit `app` to `host`:`port`, or say why not.

    `family` AF_INET or AF_INET6 keeps only that family's addresses
    (AF_UNSPEC: all). Normalises the host, decides what can be decided
    before a lookup, resolves once, and judges every address. `new_socket`
    False: a destination for a socket that exists (a UDP association's),
    not counted against the socket caps.
    """
    started = perf_counter()  # the decision's latency (tether_decision_seconds)
    # The app's limits, asked only when some app has a limit checked here
    # (QuotaBook.admission; flags derived at parse time).
    quota = core.quota
    limits = quota.config.limits(app) if quota.admission else None
    if limits is not None and not limits.enabled:
        # Switched off: refused before the policy and before any lookup.
        off = core.quota.disabled(app)
        assert off is not None
        return quota_refusal(core, off, None, transport)
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
        core.metrics.decisions.observe(perf_counter() - started)
        return Refusal(pb.Error.GAI, exc.eai, exc.message)
    core.metrics.decisions.observe(perf_counter() - started)
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
    # Quotas and caps: after the policy (a denied destination never counts
    # against a quota), before any socket is opened; a refusal is written to
    # the audit log like a denial.
    refused = capacity(core, app, decision, new_socket=new_socket)
    if refused is not None:
        return refused
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
    if new_socket and limits is not None and limits.admission:
        # Last: a connect refused for any other reason is not counted
        # against connects_per_minute. Only an app with such a limit gets
        # here, so no other connect awaits the cluster's readiness.
        cluster = core.cluster  # quotas counted across nodes: budget leased (tether.cluster)
        if cluster is not None and (unready := await cluster.quota.ready(core.quota, app)):
            return unready
        if (over := quota.admit(app)) is not None:
            return quota_refusal(core, over, decision, transport)
    return decision, addresses


def capacity(
    core: GatewayCore, app: str, decision: Decision | None = None, *, new_socket: bool = True
) -> Refusal | None:
    """None if `app` may open one more socket, else the Refusal naming the limit.

    `new_socket` False: one more descriptor for a socket that exists (a UDP
    destination's relay), checked against the descriptors only.

    Sockets being dialled count (``AppUsage.connecting``), so a burst of
    slow connects cannot overshoot. The app is checked first: at its own
    cap, an app is told about its cap, not the gateway's. An app no longer
    in the config (removed by a reload while this stream was open) opens
    nothing. `decision` is the one to log the refusal with; without it (a
    UDP association opened with no destination yet) a line of its own.
    """
    if core.shutting_down:
        return Refusal(pb.Error.CLOSED, errno.ESHUTDOWN, "tether: the gateway is shutting down")
    if core.draining and new_socket:  # SIGTERM: live sockets finish, new ones go elsewhere
        return drain.refusal(core, "connections")
    entry = core.config.apps.get(app)
    if entry is None:
        return Refusal(pb.Error.AUTH_FAILED, errno.EACCES,
            f"tether: app '{app}' is not in the gateway's config (it was removed)")
    usage = core.registry.app_usage(app)
    in_use = usage.open_sockets + usage.connecting
    cap, name = core.app_caps.get(app) or core.app_cap(entry)  # worked out once per config
    registry = core.registry
    total = len(registry) + core.connecting
    # Two descriptors a socket (a UDP association's relays on top), and what
    # this request would add: a socket's two, or one relay.
    fds = FDS_PER_SOCKET * (total + int(new_socket)) + registry.extra_fds + int(not new_socket)
    spare = core.fd_limit - core.fd_reserve
    if new_socket and in_use >= cap:
        # The app's sockets quota ([quota] sockets; gateway.max_sockets_per_app
        # and apps.NAME.max_sockets are its older names).
        over = core.quota.sockets(app, in_use, cap, name)
        return quota_refusal(core, over, decision, Transport.UDP if decision is None else None)
    if new_socket and total >= core.max_sockets:
        cap, name = core.max_sockets, "gateway.max_sockets"
        message = (f"tether: the gateway has {total} open sockets, its max_sockets ({cap}) "
                   "for all apps together; try again when some close")
    elif fds > spare:
        cap, name = core.fd_reserve, "gateway.fd_reserve"
        message = (f"tether: the gateway has no descriptor to spare: its sockets would hold "
                   f"{fds} of its {core.fd_limit}, and {cap} are kept for its own work; "
                   "try again when some close")
    else:
        return None
    usage.limit_refusals += 1
    outcome = f"refused: {name} {cap} reached"
    if decision is not None:
        log_decision(decision, outcome=outcome)
    else:
        audit.emit({"event": "decision", "app": app, "transport": "udp", "outcome": outcome})
    return Refusal(pb.Error.LIMIT, errno.EMFILE, message, rule=name, reason=str(cap))


def quota_refusal(
    core: GatewayCore, over: Exceeded, decision: Decision | None, transport: Transport | None
) -> Refusal:
    """The Refusal of a request `over` a quota: counted, and one audit line naming the limit.

    `decision` is the policy's, to log the refusal with; without one (a
    switched-off app, a UDP association with no destination yet) a line of
    its own for `transport`.
    """
    core.registry.app_usage(over.app).quota_refusals += 1
    core.quota.refused(over.app, over.limit)
    outcome = f"refused: {over.setting} {over.value} reached"
    if over.limit == "enabled":
        outcome = f"refused: {over.setting} is false"
    fields = {"quota": over.limit, "window": over.window,
              "retry_after": round(over.retry_after, 3)}
    if decision is not None:
        log_decision(decision, outcome=outcome, extra=fields)
    else:
        line: dict[str, Any] = {"event": "decision", "app": over.app}
        if transport is not None:
            line["transport"] = transport.value
        audit.emit({**line, "outcome": outcome, **fields})
    return Refusal(
        pb.Error.QUOTA,
        errno.EDQUOT,
        over.message(),
        rule=over.limit,
        reason=str(over.value),
        window=over.window,
        retry_after=over.retry_after,
        app=over.app,
    )


def lookup_refusal(core: GatewayCore, app: str, what: str) -> Refusal | None:
    """None if `app` may look names up, else the Refusal (its sockets are switched off).

    `what` names the lookup for the audit line (``getaddrinfo``).
    """
    off = core.quota.disabled(app)
    if off is None:
        return None
    core.registry.app_usage(app).quota_refusals += 1
    core.quota.refused(app, off.limit)
    audit.emit({"event": "lookup", "app": app, "op": what,
                "outcome": f"refused: {off.setting} is false", "quota": off.limit})
    return Refusal(pb.Error.QUOTA, errno.EDQUOT, off.message(), rule=off.limit, reason="0",
                   app=app)


def reconfigure(core: GatewayCore, old: Config) -> None:
    """A reload: the book takes the new limits; an app just switched off loses its sockets.

    Each socket's tombstone says why, so the app's next call on it does.
    """
    book = core.quota
    book.configure(core.config.quota)
    for app in core.config.apps:
        off = book.disabled(app)
        if off is not None and old.quota.limits(app).enabled:
            core._end(off.reason(), app)


def log_decision(
    decision: Decision,
    *,
    outcome: str,
    descriptor: str = "",
    chosen: tuple[Any, ...] | None = None,
    extra: dict[str, Any] | None = None,
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
    if extra:
        line += "," + audit.encode(extra)[1:-1]
    audit.emit_line(line + "}")


__all__ = [
    "Admission",
    "admit",
    "capacity",
    "log_decision",
    "lookup_refusal",
    "quota_refusal",
    "reconfigure",
]
