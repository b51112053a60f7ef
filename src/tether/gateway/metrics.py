"""The gateway's Prometheus metrics (docs/metrics.md).

Nearly everything is computed when ``/metrics`` is scraped, from what the
core already counts for its own work: the registry's live records and
per-app :class:`~tether.gateway.core.registry.AppUsage`, the caps, the
quota book and the usage ledger. Nothing is added to the relay's per-chunk
path. The two latency histograms are the exception: a handshake and a
decision are observed where they happen, once per connection, by
:class:`Histogram` (a list append, no lock: the gateway's loop is its
only writer and the scrape runs on the same loop).

:class:`GatewayCollector` reads the core on the loop's thread (the admin
listener calls it from the loop), so nothing reads the registry while the
relay changes it.
"""

from __future__ import annotations

import math
import platform
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from tether import __version__

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, Metric

    from tether.gateway.core.gateway import GatewayCore

# Upper bounds, in seconds, of the latency histograms' buckets. A connect
# costs the gateway ~0.3 ms of CPU on the reference machine (bench/README.md,
# connection rate), so the smallest bucket is 100 us; the
# largest is gateway.handshake_timeout's default (5 s), past which a hello
# no longer counts, and about the longest an upstream lookup takes (2
# attempts of 2 s, tether.resolver.upstream).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
)
# The connect verdicts of tether_connects_total, and the AppUsage counter of each.
VERDICTS: Mapping[str, str] = {
    "allowed": "sockets_opened",
    "denied": "connects_denied",
    "limit": "limit_refusals",
    "quota": "quota_refusals",
    "failed": "connects_failed",
}


class Histogram:
    """Observations in fixed buckets, exported as a Prometheus histogram at scrape time.

    ``observe`` is a ``list.append``: a C call that stores the value, no
    Python frame on the connect path. :meth:`fold` sorts what was stored
    into the buckets (a sort, then a bisect per bucket); the scrape folds,
    and so does the gateway's sweep once a second, so what waits is one
    second's observations (64 KB a histogram at 2,000 connections/s: a
    float object and its pointer each). prometheus_client's Histogram takes
    a lock per bucket and walks the buckets in Python (timeit on the loaded
    2-core machine: 1,960 ns an observation, against 116 ns to store here).
    Cost per connection, both histograms (python -m bench.instructions
    --paths tether-tcp --side proxy --connections 300, the gateway with
    PYTHONHASHSEED=0; with and without the observations): 2.1k with this
    fold (363.7k/365.0k/362.9k against 362.2k/361.4k), 3.8k with the bisect
    per sample it replaced (365.4k/365.8k); a Python observe() method
    cost 6k more. A list, not an ``array("d")``: the array's append parses its argument
    (PyArg_Parse "d", ~400 instructions) and its fold made a float of every
    sample again; the list cost 2.7k less (374.5k -> 371.9k).
    """

    __slots__ = ("_samples", "bounds", "counts", "observe", "total")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        # counts[i]: observations in (bounds[i-1], bounds[i]]; the last, above every bound.
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self._samples: list[float] = []
        self.observe: Callable[[float], None] = self._samples.append

    def fold(self) -> None:
        """Move the stored observations into the buckets."""
        samples = self._samples
        if not samples:
            return
        # Sorted (list.sort compares floats in C without the generic path),
        # then cut at each bound: bisect_right counts the values <= the bound,
        # as Prometheus's "le" asks. A bisect per sample into the bounds cost
        # ~700 instructions a sample; this is a few a sample plus a bisect per
        # bucket reached, and stops at the largest sample's bucket.
        samples.sort()
        counts = self.counts
        end = len(samples)
        low = 0
        for i, bound in enumerate(self.bounds):
            high = bisect_right(samples, bound, low)
            counts[i] += high - low
            low = high
            if low == end:
                break
        else:
            counts[-1] += end - low
        self.total += math.fsum(samples)
        samples.clear()

    @property
    def count(self) -> int:
        self.fold()
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, ending with "+Inf"."""
        self.fold()
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((_float_text(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


class GatewayMetrics:
    """What the core observes as it works (``core.metrics``); the rest is read at scrape.

    `handshakes` is keyed by front-end ("tether", "socks5", "http_proxy"),
    so a proxy's handshake is not mixed with a Tether hello; the guard
    observes one with ``handshake[type(session)](seconds)``.
    """

    __slots__ = ("decisions", "handshake", "handshakes")

    def __init__(self) -> None:
        # A stream accepted -> authenticated (core/auth.py Guard.authenticated).
        self.handshakes: dict[str, Histogram] = {"tether": Histogram()}
        self.handshake = _ObserverBySession(self.handshakes)
        # admission.admit: the policy's decision, with the name lookup it needs.
        self.decisions = Histogram()

    def fold(self) -> None:
        """Fold every histogram's stored observations (the sweep, once a second)."""
        self.decisions.fold()
        for histogram in self.handshakes.values():
            histogram.fold()


class _ObserverBySession(dict[type, Callable[[float], None]]):
    """Session class -> its front-end's ``observe``: a plain dict lookup once known."""

    def __init__(self, histograms: dict[str, Histogram]) -> None:
        super().__init__()
        self.histograms = histograms

    def __missing__(self, session: type) -> Callable[[float], None]:
        histogram = self.histograms.setdefault(frontend_name(session), Histogram())
        observe = self[session] = histogram.observe
        return observe


def frontend_name(session: type) -> str:
    """A front-end's label from its session class: TetherSession -> "tether",
    Socks5Session -> "socks5", HttpProxySession -> "http_proxy"."""
    name = session.__name__.removesuffix("Session") or session.__name__
    return "".join(
        f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name)
    )


class GatewayCollector:
    """A prometheus_client collector reading one gateway core at scrape time."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    def collect(self) -> Iterator[Metric]:
        # Imported here: prometheus_client costs ~55 ms to import, and a
        # gateway without an admin listener never needs it.
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        from tether.usage.ledger import cumulative

        core = self.core
        registry = core.registry

        # Live sockets by (app, transport, state); those slowed by a byte quota now.
        # UDP associations' datagram counters: closed ones' per app, plus the live ones'.
        live: dict[tuple[str, str, str], int] = {}
        throttled: dict[str, int] = {}
        udp = {app: dict(usage.udp) for app, usage in registry.usage.items() if usage.udp}
        for record in registry:
            key = (record.app, record.transport, str(record.state))
            live[key] = live.get(key, 0) + 1
            link = record.link
            if link is not None and link.throttled is not None:
                throttled[record.app] = throttled.get(record.app, 0) + 1
            if record.extra:
                counts = udp.setdefault(record.app, {})
                for name, n in record.extra.items():
                    counts[name] = counts.get(name, 0) + n
        sockets = GaugeMetricFamily(
            "tether_sockets",
            "Live sockets (TCP sockets and UDP associations) by app, transport and state",
            labels=["app", "transport", "state"],
        )
        for (app, transport, state), n in sorted(live.items()):
            sockets.add_metric([app, transport, state], n)
        yield sockets
        slowed = GaugeMetricFamily(
            "tether_throttled_sockets",
            "Live sockets the gateway is not reading from right now because the app is over "
            "its bytes_out_per_minute burst (slowed, not broken: docs/quotas.md)",
            labels=["app"],
        )
        for app, n in sorted(throttled.items()):
            slowed.add_metric([app], n)
        yield slowed

        # Per app: closed sockets' totals plus the live ones' so far, as the
        # usage ledger reads them. Every configured app has its series from
        # the start (at 0), so a rate over its first scrapes has a beginning.
        totals = cumulative(registry)
        apps = sorted(set(core.config.apps) | set(totals))
        connects = CounterMetricFamily(
            "tether_connects",
            "Connects and UDP associations by app and verdict: allowed (a socket was opened), "
            "denied (the policy), limit (a gateway-wide cap), quota (the app's quota, "
            "its sockets limit included), failed (the outbound connect failed or timed out)",
            labels=["app", "verdict"],
        )
        sent = CounterMetricFamily(
            "tether_sent_bytes",
            "Bytes the app sent to its destinations (out: what is billed), closed and live sockets",
            labels=["app"],
        )
        received = CounterMetricFamily(
            "tether_received_bytes",
            "Bytes the app received from its destinations (in), closed and live sockets",
            labels=["app"],
        )
        seconds = CounterMetricFamily(
            "tether_socket_seconds",
            "Seconds the app's sockets were open, closed and live ones summed",
            labels=["app"],
        )
        for app in apps:
            usage = registry.usage.get(app)
            for verdict, field in VERDICTS.items():
                connects.add_metric([app, verdict], getattr(usage, field) if usage else 0)
            total = totals.get(app)
            sent.add_metric([app], total.bytes_out if total else 0)
            received.add_metric([app], total.bytes_in if total else 0)
            seconds.add_metric([app], total.socket_seconds if total else 0.0)
        yield connects
        yield sent
        yield received
        yield seconds
        yield from _udp(udp, CounterMetricFamily)
        quota = CounterMetricFamily(
            "tether_quota_refusals",
            "Connects and lookups a quota refused and datagrams it dropped, by app and limit",
            labels=["app", "limit"],
        )
        for (app, limit), n in sorted(core.quota.refusals.items()):
            quota.add_metric([app, limit], n)
        yield quota

        handshake = HistogramMetricFamily(
            "tether_handshake_seconds",
            "From an app stream's accept to its hello authenticated, by front-end",
            labels=["frontend"],
        )
        for frontend, histogram in sorted(core.metrics.handshakes.items()):
            handshake.add_metric([frontend], histogram.buckets(), histogram.total)
        yield handshake
        decisions = core.metrics.decisions
        decision = HistogramMetricFamily(
            "tether_decision_seconds",
            "Admission of a destination: the policy's decision with the name lookup it needs",
        )
        decision.add_metric([], decisions.buckets(), decisions.total)
        yield decision

        ledger = core.ledger
        if ledger is not None:  # no usage ledger configured: no gauge pretending one
            yield GaugeMetricFamily(
                "tether_ledger_flush_lag_seconds",
                "Seconds of usage not yet confirmed written to the ledger (up to "
                "[usage] flush_interval while the store is healthy)",
                value=ledger.flush_lag(),
            )
            yield GaugeMetricFamily(
                "tether_ledger_pending_rows",
                "Ledger rows (app, minute) sampled but not yet confirmed written",
                value=ledger.pending_rows,
            )
            yield GaugeMetricFamily(
                "tether_ledger_write_failures",
                "Consecutive failed writes to the ledger's store (0: the last one succeeded)",
                value=ledger.failures,
            )
            yield CounterMetricFamily(
                "tether_ledger_dropped_rows",
                "Ledger rows dropped unwritten past [usage] max_pending_rows",
                value=ledger.dropped_rows,
            )

        preauth = CounterMetricFamily(
            "tether_preauth_refusals",
            "Streams and hellos refused before authenticating, by reason: auth_failed (a "
            "wrong key or app), locked_out (an app and peer locked out after failures), "
            "timed_out (no hello within gateway.handshake_timeout), evicted (over a pre-auth cap)",
            labels=["reason"],
        )
        for reason, n in core.guard.totals.items():
            preauth.add_metric([reason], n)
        yield preauth

        streams = GaugeMetricFamily(
            "tether_streams",
            "App streams not relaying a socket, by stage: unauthenticated (before the "
            "hello) or framed (requests, UDP associations, connects being answered)",
            labels=["stage"],
        )
        pending = len(core.guard.pending)
        streams.add_metric(["unauthenticated"], pending)
        streams.add_metric(["framed"], max(0, len(core.streams) - pending))
        yield streams
        yield GaugeMetricFamily(
            "tether_connecting", "Outbound connects being dialled", value=core.connecting
        )
        yield GaugeMetricFamily(
            "tether_ready",
            "1 while the gateway takes new work (/readyz answers 200), 0 while it drains "
            "or shuts down",
            value=0 if not_ready(core) else 1,
        )

        yield GaugeMetricFamily(
            "tether_open_files_limit",
            "The gateway's open-files soft limit (RLIMIT_NOFILE), from which the caps derive",
            value=core.fd_limit,
        )
        yield GaugeMetricFamily(
            "tether_fd_reserve",
            "Descriptors kept for the gateway's own work (gateway.fd_reserve)",
            value=core.fd_reserve,
        )
        yield GaugeMetricFamily(
            "tether_max_sockets",
            "Sockets all apps together may hold (gateway.max_sockets)",
            value=core.max_sockets,
        )
        caps = GaugeMetricFamily(
            "tether_app_max_sockets",
            "Sockets an app may hold at once (its sockets quota: [apps.NAME] max_sockets, "
            "[quota] sockets, or gateway.max_sockets_per_app)",
            labels=["app"],
        )
        for name, entry in sorted(core.config.apps.items()):
            caps.add_metric([name], core.app_cap(entry)[0])
        yield caps
        yield InfoMetricFamily(
            "tether_build",
            "The gateway's version, its Python, and its node id (gateway.node_id)",
            value={
                "version": __version__,
                "python": platform.python_version(),
                "node": core.node_id,
            },
        )


def _udp(
    totals: Mapping[str, Mapping[str, int]], counter: type[CounterMetricFamily]
) -> Iterator[Metric]:
    """UDP datagrams relayed and dropped per app, from their counters summed per app."""
    datagrams = counter(
        "tether_udp_datagrams",
        "UDP datagrams relayed, by app and direction (out: the app's, to its destinations)",
        labels=["app", "direction"],
    )
    dropped = counter(
        "tether_udp_dropped_datagrams",
        "UDP datagrams dropped, by app and reason: unsolicited (from a source the app never "
        "sent to), quota, denied (SOCKS5: a destination the policy denies), other (a full "
        "send buffer; SOCKS5: a malformed or fragmented datagram)",
        labels=["app", "reason"],
    )
    for app, counts in sorted(totals.items()):
        datagrams.add_metric([app, "out"], counts.get("datagrams_out", 0))
        datagrams.add_metric([app, "in"], counts.get("datagrams_in", 0))
        for key, n in sorted(counts.items()):
            if key.startswith("dropped"):
                dropped.add_metric([app, key.removeprefix("dropped").lstrip("_") or "other"], n)
    yield datagrams
    yield dropped


def not_ready(core: GatewayCore) -> str | None:
    """Why the gateway takes no new work (draining, shutting down), or None if it does."""
    if core.shutting_down:
        return "the gateway is shutting down"
    if core.draining:  # SIGTERM's drain (gateway.drain_timeout)
        return "the gateway is draining: live sockets finish, new work goes elsewhere"
    return None


def _float_text(value: float) -> str:
    # The "le" label as Prometheus's own clients write it (1.0, 0.0001).
    return repr(float(value))


def collector_registry(core: GatewayCore) -> CollectorRegistry:
    """A registry of this gateway's own (never prometheus_client's global one).

    The global default registry would mix in whatever else the process
    registered there (an embedding application's metrics, or a second
    gateway's in tests); this one holds the gateway's collector and the
    process's CPU, memory and descriptor counts (``process_*``).
    """
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(core))
    ProcessCollector(registry=registry)
    return registry


__all__ = [
    "LATENCY_BUCKETS",
    "VERDICTS",
    "GatewayCollector",
    "GatewayMetrics",
    "Histogram",
    "collector_registry",
    "frontend_name",
    "not_ready",
]
