"""Who an app stream speaks for: an app and its key, or the operator.

And what a stream may cost before it has said (:class:`Guard`): a deadline
for the hello, caps on streams that have not authenticated, and the
throttling of failed authentications. docs/security.md has the threat
model; docs/configuration.md the keys and their defaults.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tether.gateway import audit
from tether.gateway.core.errors import Refusal
from tether.wire import pb

if TYPE_CHECKING:
    from tether.config import Config
    from tether.gateway.core.gateway import GatewayCore

# Compared against when the app is unknown, so a wrong app name costs the
# same time as a wrong key and timing does not reveal which apps exist.
_DUMMY_KEY = os.urandom(32).hex()
ADMIN_APP = "*"  # not a valid app table name in practice; see [gateway] admin_key


def authenticate(core: GatewayCore, app: str, key: str) -> bool:
    """True if `key` is `app`'s (or, for ADMIN_APP, the operator's) key.

    Bound as ``GatewayCore.authenticate``.
    """
    config = core.config
    if app == ADMIN_APP:
        # The operator's identity: may list every app's sockets, open none.
        expected = config.admin_key or _DUMMY_KEY
        known = config.admin_key is not None
    else:
        entry = config.apps.get(app)
        # An app without a key ("") is identified only by its listener or
        # its peer's credentials (authenticate_bound), never by a hello.
        expected = entry.key if entry is not None and entry.key else _DUMMY_KEY
        known = entry is not None and bool(entry.key)
    return hmac.compare_digest(key.encode(), expected.encode()) and known


def authenticate_bound(core: GatewayCore, app: str, key: str, bound: str) -> bool:
    """A stream the listener or the peer's credentials say is app `bound`.

    The hello must name that app (and it must still be in the config); no
    key is needed, but one that is given must be the app's.
    """
    if app != bound or bound not in core.config.apps:
        return False
    return not key or authenticate(core, app, key)


def peer_app(config: Config, uid: int, gid: int) -> str | None:
    """The app a Unix peer's uid (first) or gid is mapped to, if any."""
    return config.apps_by_uid.get(uid) or config.apps_by_gid.get(gid)


def identified_by(transport: asyncio.BaseTransport | None, by_peer: bool) -> str:
    """How a stream's app was known without a key, for a refusal's words."""
    if by_peer:
        creds = peer_creds(transport)
        return f"its peer's uid {creds[1]}, gid {creds[2]}" if creds else "its peer"
    sock = transport.get_extra_info("socket") if transport is not None else None
    return f"its listener unix:{sock.getsockname()}" if sock is not None else "its listener"


@dataclass(frozen=True, slots=True)
class AuthRefusal:
    """Why :meth:`Guard.check` refused a stream's credentials, and when to say so.

    Each front-end turns it into its own answer (a ServerHello error, an
    RFC 1929 failure status, a 407) after `delay` seconds, then closes.
    """

    message: str  # "tether: ..." for the app; never holds the key
    delay: float  # the guard's throttling: how long the answer waits
    locked: bool = False  # a lockout: the key was not looked at


def peer_key(transport: asyncio.BaseTransport | None) -> str:
    """Who an app stream comes from, for the pre-auth caps and throttling (every front-end).

    TCP: the source IP. A Unix socket: the peer's uid (SO_PEERCRED), so
    tenants under different uids are counted apart; "unix" if unknown.
    """
    if transport is None:
        return "unknown"
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        host = str(peer[0])
        return host[7:] if host.startswith("::ffff:") else host  # IPv4-mapped
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        creds = peer_creds(transport)
        return "unix" if creds is None else f"uid {creds[1]}"
    return "unknown"


def peer_creds(transport: asyncio.BaseTransport | None) -> tuple[int, int, int] | None:
    """A Unix stream's peer (pid, uid, gid) from SO_PEERCRED; None if not to be had."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(creds)
    return pid, uid, gid


# struct ucred (pid, uid, gid): what SO_PEERCRED returns on Linux.
_UCRED = struct.Struct("3i")


# The guard looks at the streams that have not authenticated when the first
# of them is due (its deadline, GRACE for the per-peer cap, the window's
# end), never sooner than this after the last look: no timer per stream,
# and none at all while every stream authenticates (the usual case).
TICK = 0.25
# A stream gets this long before the per-peer cap may close it. A client
# sends its hello with the connect, so a legitimate stream authenticates
# within one round trip; a burst of connects accepted in one loop turn is
# read in the next, and must not be cut for being many.
GRACE = 1.0
# The first failure of a window is answered at once (a typo); each further
# one waits twice as long as the one before, from this, up to auth_max_delay.
DELAY_BASE = 0.1
# At most this many (app, peer) pairs, apps and peers are counted per window:
# names and addresses are the client's, and their tables must stay bounded.
# Past it, failures count under OVERFLOW (and throttle together).
MAX_TRACKED = 10_000
OVERFLOW = "(other)"
# The summary line lists the largest counts only.
SUMMARY_TOP = 20

log = logging.getLogger("tether.gateway")


class Pending(Protocol):
    """A stream that has not authenticated yet (the front-end's session)."""

    def peer_key(self) -> str:
        """Who the stream comes from: the source IP, or a Unix peer's uid."""

    def end_preauth(self, refusal: Refusal) -> None:
        """Close the stream, telling the app why."""


class Guard:
    """Pre-auth protection for one gateway (docs/security.md).

    * every stream not yet authenticated is in `pending` (oldest first) and
      is closed when it has not authenticated within ``handshake_timeout``;
    * at most ``preauth_limit`` of them in all (the oldest is closed for a
      new one; a burst younger than GRACE may reach twice that before it
      does) and, once older than GRACE, ``preauth_limit_per_peer`` per peer
      (that peer's oldest are closed);
    * failed authentications are counted per app name, per peer and per
      (app, peer) in windows of ``auth_failure_window``: each failure's
      answer waits longer than the one before (DELAY_BASE doubling up to
      ``auth_max_delay``), and a pair with ``auth_failure_limit`` failures
      is locked out for ``auth_lockout``: its hellos are refused without
      the key being looked at. The lockout is per (app, peer), never per
      app: guessing from one peer cannot lock the app out anywhere else.
    * one summary line per window, not one per event.

    Times are the core's clock (injectable), so tests move it instead of
    sleeping. A legitimate hello costs two dict operations here.
    """

    def __init__(self, core: GatewayCore) -> None:
        self.core = core
        self.clock = core.registry.clock
        self.pending: dict[Pending, float] = {}
        self.lockouts: dict[tuple[str, str], float] = {}  # (app, peer) -> until
        self._tick: asyncio.TimerHandle | None = None
        # preauth_limit as in force: read at each tick (a reload changes it),
        # so a new stream's check is one comparison.
        self.cap = self.limit()
        self.peer_cap = core.config.preauth_limit_per_peer
        # Cumulative, for the metrics (tether_preauth_refusals_total): streams
        # and hellos refused by kind, never reset (the window's counts are).
        self.totals = dict.fromkeys(("auth_failed", "locked_out", "timed_out", "evicted"), 0)
        self._reset_window(None)

    def _reset_window(self, start: float | None) -> None:
        self.window_end = None if start is None else start + self.core.config.auth_failure_window
        self.failed_pair: dict[tuple[str, str], int] = {}
        self.failed_app: dict[str, int] = {}
        self.failed_peer: dict[str, int] = {}
        self.refused_locked = 0
        self.timed_out: dict[str, int] = {}
        self.evicted = 0

    # -- the stream's life before its hello ----------------------------------

    def limit(self) -> int:
        """The cap on streams not yet authenticated, in all."""
        config = self.core.config
        if config.preauth_limit is not None:
            return config.preauth_limit
        # Half the descriptors the gateway keeps back from the apps' sockets
        # (gateway.fd_reserve: a tenth of the open-files limit by default),
        # so silent streams never take what live sockets need; 32 .. 1,024.
        return max(32, min(1024, self.core.fd_reserve // 2))

    def arrived(self, stream: Pending) -> None:
        """A new stream; closes the oldest waiting one if there are too many."""
        pending = self.pending
        pending[stream] = self.clock()
        if self._tick is None:  # the first look: this stream's deadline
            self._tick = self.core.loop.call_later(self.core.config.handshake_timeout, self.tick)
        if len(pending) > self.cap:
            started = next(iter(pending.values()))
            if len(pending) <= 2 * self.cap and started > self.clock() - GRACE:
                # All of them are fresh: a burst of connects whose hellos are
                # read next turn, not a flood of silent streams (yet). Up to
                # twice the cap they get their GRACE; the guard looks then.
                self._wake(GRACE)
                return
            self._evict_oldest()
        elif len(pending) > self.peer_cap:
            self._wake(GRACE)  # some peer may be over its cap once its streams are stale

    def _evict_oldest(self) -> None:
        oldest = next(iter(self.pending))
        del self.pending[oldest]
        self._count_event("evicted")
        self.evicted += 1
        limit = self.cap
        oldest.end_preauth(_limit_refusal(
            f"tether: the gateway holds {limit} connections that have not "
            "authenticated yet (gateway.preauth_limit); this one was the oldest",
            "gateway.preauth_limit", limit,
        ))

    def tick(self) -> None:
        """Close streams past their deadline or over the per-peer cap; end the window."""
        self._tick = None
        config = self.core.config
        self.cap = self.limit()
        self.peer_cap = config.preauth_limit_per_peer
        now = self.clock()
        pending = self.pending
        deadline = now - config.handshake_timeout
        expired = []
        for stream, started in pending.items():
            if started > deadline:
                break
            expired.append(stream)
        for stream in expired:
            del pending[stream]
            self._count_event("timed_out")
            peer = _key(self.timed_out, stream.peer_key())
            self.timed_out[peer] = self.timed_out.get(peer, 0) + 1
            timeout = config.handshake_timeout
            stream.end_preauth(Refusal(
                pb.Error.TIMEOUT, errno.ETIMEDOUT,
                f"tether: no hello within {timeout:g} s (gateway.handshake_timeout)",
            ))
        while len(pending) > self.cap:
            # A burst that did not authenticate within GRACE, judged by the
            # core's clock (the timer that woke us runs on the loop's).
            if len(pending) <= 2 * self.cap and next(iter(pending.values())) > now - GRACE:
                break
            self._evict_oldest()
        per_peer = config.preauth_limit_per_peer
        if len(pending) > per_peer:
            stale = now - GRACE
            by_peer: dict[str, list[Pending]] = {}
            for stream, started in pending.items():
                if started > stale:
                    break
                by_peer.setdefault(stream.peer_key(), []).append(stream)
            for streams in by_peer.values():
                for stream in streams[: max(0, len(streams) - per_peer)]:
                    del pending[stream]
                    self._count_event("evicted")
                    self.evicted += 1
                    stream.end_preauth(_limit_refusal(
                        f"tether: this address holds {per_peer} connections that "
                        "have not authenticated yet (gateway.preauth_limit_per_peer); "
                        "this one was the oldest",
                        "gateway.preauth_limit_per_peer", per_peer,
                    ))
        if self.window_end is not None and now >= self.window_end:
            self._summarize()
            self._reset_window(None)
            self.lockouts = {k: v for k, v in self.lockouts.items() if v > now}
        due = []
        if pending:
            due.append(next(iter(pending.values())) + config.handshake_timeout - now)
            if len(pending) > min(per_peer, self.cap):
                due.append(GRACE)
        if self.window_end is not None:
            due.append(self.window_end - now)
        if due:
            self._wake(max(TICK, min(due)))

    def _wake(self, delay: float) -> None:
        """Look again in `delay` seconds at the latest."""
        loop = self.core.loop
        when = loop.time() + delay
        if self._tick is not None:
            if self._tick.when() <= when:
                return
            self._tick.cancel()
        self._tick = loop.call_at(when, self.tick)

    def authenticated(self, stream: Pending) -> None:
        """The stream said who it is: no deadline, no cap from here on."""
        arrived = self.pending.pop(stream, None)
        if arrived is not None:  # accept -> hello authenticated (tether_handshake_seconds)
            self.core.metrics.handshake[type(stream)](self.clock() - arrived)

    def gone(self, stream: Pending) -> None:
        """The stream closed before authenticating."""
        self.pending.pop(stream, None)

    # -- credentials ----------------------------------------------------------

    def check(
        self,
        stream: Pending,
        app: str | None,
        key: str,
        *,
        transport: asyncio.BaseTransport | None = None,
        unix: bool = False,
        bound: str | None = None,
        admin: bool = False,
    ) -> str | AuthRefusal:
        """Who `stream` is, from the credentials it offered: the app, or why not.

        The one check of every front-end, so the same credentials get the
        same answer on each. `app` None: no credentials were offered (a
        SOCKS5 client without username/password, an HTTP request without
        Proxy-Authorization); only a stream whose app is known without a
        key passes then. `bound` is the app of the listener the stream came
        on; on a Unix listener (`unix`) the peer's uid/gid may name one.
        `admin`: the front-end serves the operator's identity (ADMIN_APP);
        where it does not, that name is refused without its key being
        looked at (no oracle for the admin key on a proxy port), and counted
        as a failure. On success the stream leaves the pre-auth caps.
        """
        core = self.core
        by_peer = False
        if bound is None and unix and core.config.identifies_peers:
            # Only a Unix stream, with some app mapped to uids or gids, pays
            # for the credentials lookup.
            creds = peer_creds(transport)
            bound = None if creds is None else peer_app(core.config, creds[1], creds[2])
            by_peer = bound is not None
        if app is None:
            if bound is not None:
                self.authenticated(stream)
                return bound
            return AuthRefusal(
                "tether: no app name and key were offered"
                + (" and the peer's uid/gid is not mapped to an app" if unix else ""),
                0.0,
            )
        # Only a peer with failures on record pays for the lookup.
        locked = self.locked(app, stream.peer_key()) if self.lockouts else 0.0
        if locked:
            # The key is not looked at: a lockout that let the right key
            # through would let guessing go on.
            return AuthRefusal(
                f"tether: app {app!r} is locked out from {stream.peer_key()} for "
                f"{locked:.0f} s more after too many failed authentications "
                "(gateway.auth_failure_limit); the key was not checked",
                core.config.auth_max_delay, locked=True,
            )
        if app == ADMIN_APP and not admin:
            why = "the admin identity can list sockets but not open them"
        elif (
            core.authenticate(app, key) if bound is None
            else authenticate_bound(core, app, key, bound)
        ):
            self.authenticated(stream)
            return app
        elif bound is not None and app != bound:
            why = (f"this stream is app {bound!r} ({identified_by(transport, by_peer)}), "
                   f"not {app!r}")
        else:
            # A key a reload revoked is told why (its holder knew it).
            why = core.revoked(app, key) or f"app {app!r} authentication failed"
        # No line per failure: the guard's summary counts them per app and
        # peer, once a window (the key is never logged).
        return AuthRefusal("tether: " + why, self.failed(app, stream.peer_key()))

    # -- failures -----------------------------------------------------------

    def locked(self, app: str, peer: str) -> float:
        """Seconds `app` stays locked out from `peer` (0: not locked)."""
        until = self.lockouts.get((app, peer))
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self.lockouts[(app, peer)]
            return 0.0
        self._count_event("locked_out")
        self.refused_locked += 1
        return left

    def failed(self, app: str, peer: str) -> float:
        """Count a failed authentication; how long its answer waits."""
        config = self.core.config
        self._count_event("auth_failed")
        pair = (app, peer)
        if pair not in self.failed_pair and len(self.failed_pair) >= MAX_TRACKED:
            pair = (OVERFLOW, peer) if peer in self.failed_peer else (OVERFLOW, OVERFLOW)
        app_key = _key(self.failed_app, app)
        peer_key = _key(self.failed_peer, peer)
        before = max(self.failed_app.get(app_key, 0), self.failed_peer.get(peer_key, 0))
        n = self.failed_pair[pair] = self.failed_pair.get(pair, 0) + 1
        self.failed_app[app_key] = self.failed_app.get(app_key, 0) + 1
        self.failed_peer[peer_key] = self.failed_peer.get(peer_key, 0) + 1
        if n >= config.auth_failure_limit:
            self.lockouts[pair] = self.clock() + config.auth_lockout
            if pair != (app, peer):
                self.lockouts[(app, peer)] = self.lockouts[pair]
        return self.delay(before)

    def delay(self, failures_before: int) -> float:
        """How long a failed answer waits, after `failures_before` in this window."""
        if failures_before <= 0:
            return 0.0
        grown = DELAY_BASE * 2.0 ** min(failures_before - 1, 30)
        return min(self.core.config.auth_max_delay, grown)

    def _count_event(self, kind: str) -> None:
        """An event for the window's summary; opens a window if none is."""
        self.totals[kind] += 1
        if self.window_end is None:
            window = self.core.config.auth_failure_window
            self.window_end = self.clock() + window
            self._wake(window)

    def summary(self) -> dict[str, object]:
        """The window's counts (what the summary line says), largest first."""

        def top(counts: dict[str, int] | dict[tuple[str, str], int]) -> list[list[object]]:
            items = sorted(counts.items(), key=lambda kv: -kv[1])[:SUMMARY_TOP]
            return [[*k, n] if isinstance(k, tuple) else [k, n] for k, n in items]

        now = self.clock()
        return {
            "event": "preauth",
            "window_s": self.core.config.auth_failure_window,
            "failed": sum(self.failed_pair.values()),
            "failed_by": top(self.failed_pair),  # [app, peer, count]
            "refused_locked_out": self.refused_locked,
            "locked_out": [
                [app, peer, round(until - now)] for (app, peer), until in
                sorted(self.lockouts.items(), key=lambda kv: -kv[1])[:SUMMARY_TOP]
                if until > now
            ],
            "timed_out": sum(self.timed_out.values()),
            "timed_out_by": top(self.timed_out),  # [peer, count]
            "evicted": self.evicted,
        }

    def _summarize(self) -> None:
        # JSON: app names and the like are the client's, so they are escaped
        # and the line stays one line whatever they contain.
        log.warning("pre-auth summary: %s", audit.encode(self.summary()))


def _key(table: dict[str, int], key: str) -> str:
    return key if key in table or len(table) < MAX_TRACKED else OVERFLOW


def _limit_refusal(message: str, rule: str, value: int) -> Refusal:
    # A LIMIT error names the limit in `rule` and its value in `reason`.
    return Refusal(pb.Error.LIMIT, errno.EAGAIN, message, rule=rule, reason=str(value))


__all__ = [
    "ADMIN_APP", "AuthRefusal", "Guard", "Pending", "authenticate", "authenticate_bound",
    "identified_by", "peer_app", "peer_creds", "peer_key",
]
