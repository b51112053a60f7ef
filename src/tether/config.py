"""Gateway configuration: a TOML file validated completely at start-up.

Every problem is reported as a :class:`~tether.errors.ConfigError` whose
path points into the document (``gateway.listen[1]``, ``apps.billing.key``)
before anything listens. Unknown keys are errors: a typo must not silently
turn a setting off.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from tether.cluster.config import ClusterConfig, parse_cluster
from tether.endpoint import DEFAULT_PORT, Endpoint, parse_endpoint
from tether.errors import ConfigError
from tether.policy import PolicySet, parse_policy
from tether.quota.limits import QuotaConfig, parse_quota
from tether.usage.config import UsageConfig, parse_usage
from tether.wire import DEFAULT_MAX_FRAME

# App Engine reclaimed sockets idle for 10 minutes (2 minutes in the 2013 preview).
DEFAULT_IDLE_TIMEOUT = 600.0
# The outbound connect default: about what Linux's SYN retries give (~2 min) is
# too long for a sandboxed worker; 30 s matches common client libraries.
DEFAULT_CONNECT_TIMEOUT = 30.0
# A client sends its hello with the connect, so it arrives within one round
# trip; 5 s also covers two lost hello segments retransmitted with TCP's
# initial 1 s timeout (RFC 6298: 1 + 2 s), while a silent stream is dropped
# long before it matters (the issue saw 2,000 of them held for 90 s).
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
# Far above what one well-behaved host has mid-hello (a hello is read in the
# loop turn after its connect); counted only for streams older than a second.
DEFAULT_PREAUTH_LIMIT_PER_PEER = 128
# fail2ban's and sshd's order of magnitude: a typo or two pass, a guesser stops.
DEFAULT_AUTH_FAILURE_LIMIT = 10
DEFAULT_AUTH_FAILURE_WINDOW = 60.0
DEFAULT_AUTH_LOCKOUT = 300.0
# The growing delay of a failed answer stops here (below the handshake timeout).
DEFAULT_AUTH_MAX_DELAY = 2.0
# Once an app stream's unread answers pass the transport's high-water mark
# (64 KiB) the gateway stops reading it; a client that reads nothing for 30 s
# (the connect timeout's order) is not coming back for them.
DEFAULT_WRITE_STALL_TIMEOUT = 30.0
# SIGTERM lets live sockets finish for this long before closing them.
# Kubernetes sends SIGKILL 30 s after SIGTERM (terminationGracePeriodSeconds'
# default); 25 s leaves the rest for the close itself and for apps asking why
# their socket was closed (server.SHUTDOWN_GRACE, 2 s). 0: no drain.
DEFAULT_DRAIN_TIMEOUT = 25.0
DEFAULT_LISTEN: tuple[Endpoint, ...] = (Endpoint(host="127.0.0.1", port=DEFAULT_PORT),)
RESOLVER_MODES = ("system", "static", "upstream")
# Settings only `upstream` mode reads; naming one in another mode is an error.
_UPSTREAM_KEYS = ("servers", "timeout", "attempts", "cache_size", "min_ttl", "max_ttl")
# The DNS port (RFC 1035), for a server given without one.
_DNS_PORT = 53


@dataclass(frozen=True)
class UpstreamConfig:
    """``[resolver]`` settings of ``mode = "upstream"``; defaults in tether.resolver."""

    servers: tuple[tuple[str, int], ...]
    timeout: float = 2.0  # tether.resolver.upstream.DEFAULT_TIMEOUT (dnspython's)
    attempts: int = 2  # glibc's resolv.conf default
    cache_size: int = 100_000  # tether.resolver.cache.DEFAULT_CACHE_SIZE (dnspython's)
    min_ttl: float = 0.0
    max_ttl: float = 86_400.0  # Unbound's cache-max-ttl


@dataclass(frozen=True)
class AppConfig:
    name: str
    # Never in a repr, so never in a log. "": no key, the app is identified only
    # by its Unix peer credentials or its own listener (uids, gids, listen).
    key: str = field(repr=False)
    idle_timeout: float | None = None
    # Concurrent sockets (TCP sockets and UDP associations); None: the gateway's default
    max_sockets: int | None = None
    # A stream on a Unix listener whose peer (SO_PEERCRED) has one of these
    # uids, else one of these gids, is this app, without a key.
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    # Unix sockets of this app alone: every stream accepted there is this app.
    listen: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class Config:
    listen: tuple[Endpoint, ...] = DEFAULT_LISTEN
    # The HTTP proxy front-end's listeners (CONNECT and http:// requests); none: off
    http_proxy_listen: tuple[Endpoint, ...] = ()
    # The SOCKS5 front-end's listeners (CONNECT and UDP ASSOCIATE); none: off
    socks5_listen: tuple[Endpoint, ...] = ()
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_frame: int = DEFAULT_MAX_FRAME
    # JSON lines, one per decision and per closed socket; None: the gateway's log
    audit_log: str | None = None
    # Socket caps (docs/configuration.md, "Limits"): None derives them from the
    # open-files limit at start-up (tether.gateway.core.gateway.derive_caps).
    max_sockets: int | None = None
    max_sockets_per_app: int | None = None
    fd_reserve: int | None = None
    # Pre-auth protection (docs/security.md; defaults and why in
    # tether.gateway.core.auth and docs/configuration.md)
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    preauth_limit: int | None = None  # None: half of the fd reserve, 32 .. 1,024
    preauth_limit_per_peer: int = DEFAULT_PREAUTH_LIMIT_PER_PEER
    auth_failure_limit: int = DEFAULT_AUTH_FAILURE_LIMIT
    auth_failure_window: float = DEFAULT_AUTH_FAILURE_WINDOW
    auth_lockout: float = DEFAULT_AUTH_LOCKOUT
    auth_max_delay: float = DEFAULT_AUTH_MAX_DELAY
    # A stream whose app has not read its answers for this long is closed.
    write_stall_timeout: float = DEFAULT_WRITE_STALL_TIMEOUT
    # SIGTERM: refuse new connects (UNAVAILABLE) and let live sockets finish
    # for this long (docs/workers.md); 0: close them at once
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    # Gateway processes sharing the listeners (`tether serve --workers`)
    workers: int = 1
    # `tether sockets --admin` lists every app's sockets with this key
    admin_key: str | None = field(default=None, repr=False)
    # A TCP listener on a non-loopback address is refused unless this is set
    # (check_listen: keys cross that network in clear).
    allow_cleartext_keys: bool = False
    # The admin HTTP listener (/metrics, /healthz, /readyz: gateway/admin.py); None: off
    admin_listen: Endpoint | None = None
    # admin_listen off loopback is refused unless this is set (check_admin_listen)
    admin_allow_remote: bool = False
    resolver_mode: str = "system"
    resolver_hosts: Mapping[str, list[str]] = field(default_factory=dict)
    resolver_upstream: UpstreamConfig | None = None
    # getaddrinfo/gethostbyname leave out addresses the app's policy denies
    resolver_hide_denied: bool = False
    policy: PolicySet = field(default_factory=lambda: parse_policy(None))
    apps: Mapping[str, AppConfig] = field(default_factory=dict)
    # [cluster]: this gateway as a node sharing Redis with others; None: alone
    cluster: ClusterConfig | None = None
    # [usage]: the durable usage ledger (docs/usage.md); None: none is kept
    usage: UsageConfig | None = None
    # [quota] and [apps.NAME.quota]: per-app limits (docs/quotas.md)
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    source: str | None = None

    @property
    def listen_addresses(self) -> list[tuple[str, int]]:
        return [(e.host, e.port) for e in self.listen if not e.is_unix]

    def with_listen(self, listen: tuple[Endpoint, ...]) -> Config:
        return _replace(self, listen=listen)

    def with_apps(self, apps: Mapping[str, AppConfig]) -> Config:
        return _replace(self, apps=dict(apps))

    # Read on every hello on a Unix listener: derived once per config.
    @cached_property
    def apps_by_uid(self) -> dict[int, str]:
        return {uid: app.name for app in self.apps.values() for uid in app.uids}

    @cached_property
    def apps_by_gid(self) -> dict[int, str]:
        return {gid: app.name for app in self.apps.values() for gid in app.gids}

    @cached_property
    def identifies_peers(self) -> bool:
        """Some app is identified by a Unix peer's uid or gid."""
        return bool(self.apps_by_uid or self.apps_by_gid)

    @property
    def app_listeners(self) -> list[tuple[Endpoint, str]]:
        """Each app's own Unix listeners, with the app."""
        return [(e, app.name) for app in self.apps.values() for e in app.listen]


def is_loopback_host(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1, IPv4-mapped 127.x) or "localhost"."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # any other name may resolve to any address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_listen(config: Config) -> None:
    """Refuse a TCP listener off loopback unless the config accepts keys in clear there.

    An app's stream to the gateway is its own byte stream: once connected,
    the gateway splices it to the target and the descriptor the app holds
    is the real socket, so it cannot be wrapped in TLS, and the hello's key
    crosses that network as it is. Read at start-up (listeners do not move
    on reload).
    """
    check_admin_listen(config)
    if config.allow_cleartext_keys:
        return
    # A proxy front-end's Basic credentials (app and key) cross it in clear too.
    listeners = [("listen", i, e) for i, e in enumerate(config.listen)]
    listeners += [("http_proxy_listen", i, e) for i, e in enumerate(config.http_proxy_listen)]
    listeners += [("socks5_listen", i, e) for i, e in enumerate(config.socks5_listen)]
    for key, i, endpoint in listeners:
        if not endpoint.is_unix and not is_loopback_host(endpoint.host):
            raise ConfigError(
                f"gateway.{key}[{i}]",
                f"{endpoint} is not a loopback address: app keys would cross that network in "
                "clear (the stream to the gateway becomes the app's own socket to its target, "
                "so it cannot be TLS). Listen on loopback or a Unix socket and run a gateway "
                "on each host; or, if that network is trusted with the keys, set "
                "[gateway] allow_cleartext_keys = true",
                source=config.source,
            )


def check_admin_listen(config: Config) -> None:
    """Refuse an admin listener off loopback unless admin_allow_remote says so.

    /metrics names every app and its traffic and /readyz steers traffic,
    with no authentication: on a network, anyone there reads them.
    """
    endpoint = config.admin_listen
    if (
        endpoint is None
        or endpoint.is_unix
        or is_loopback_host(endpoint.host)
        or config.admin_allow_remote
    ):
        return
    raise ConfigError(
        "gateway.admin_listen",
        f"{endpoint} is not a loopback address: /metrics (every app's name and traffic) and "
        "/readyz would be open to that network without authentication. Listen on loopback "
        "or a Unix socket (a local Prometheus agent scrapes it there); or, if that network "
        "may read them, set [gateway] admin_allow_remote = true",
        source=config.source,
    )


def _ids(app: Mapping[str, Any], where: str, key: str, owner: dict[int, str]) -> frozenset[int]:
    """[apps.NAME] uids or gids: each a uid/gid that no other app claims."""
    if key not in app:
        return frozenset()
    items = app[key]
    if not isinstance(items, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**32 - 1 for i in items
    ):
        raise ConfigError(f"{where}.{key}", "must be a list of whole numbers from 0 to 4294967294")
    for i in items:
        if owner.setdefault(i, where) != where:
            raise ConfigError(f"{where}.{key}", f"{i} is already {owner[i]}'s: one app per id")
    return frozenset(items)


def _app_listen(
    app: Mapping[str, Any], where: str, owner: dict[str, str]
) -> tuple[Endpoint, ...]:
    """[apps.NAME] listen: Unix sockets of this app alone, no path listened on twice."""
    if "listen" not in app:
        return ()
    items = app["listen"]
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}.listen", "must be a non-empty list of unix:/path addresses")
    parsed = []
    for i, item in enumerate(items):
        path = f"{where}.listen[{i}]"
        try:
            endpoint = parse_endpoint(item) if isinstance(item, str) else None
        except ValueError as exc:
            raise ConfigError(path, str(exc)) from exc
        if endpoint is None or not endpoint.is_unix:
            raise ConfigError(
                path, "must be a unix:/path address (an app's own listener is a Unix socket: "
                "whoever can open its path is the app)",
            )
        if owner.setdefault(endpoint.path, where) != where:
            raise ConfigError(path, f"{endpoint} is already {owner[endpoint.path]}'s")
        parsed.append(endpoint)
    return tuple(parsed)


def _replace(config: Config, **changes: Any) -> Config:
    from dataclasses import replace

    return replace(config, **changes)


def load_config(path: Path | None) -> Config:
    """Read and validate a TOML config; ``None`` gives the defaults."""
    if path is None:
        return Config()
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError("(file)", "not found", source=source) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("(file)", f"not valid TOML: {exc}", source=source) from exc
    return parse_config(data, source=source)


def parse_config(data: Mapping[str, Any], *, source: str | None = None) -> Config:
    try:
        return _parse(data, source)
    except ConfigError as exc:
        if exc.source is None and source is not None:
            raise ConfigError(exc.path, exc.message, source=source) from exc
        raise


def _parse(data: Mapping[str, Any], source: str | None) -> Config:
    _known(data, "", {"cluster", "gateway", "resolver", "policy", "apps", "usage", "quota"})
    gateway = _table(data, "gateway")
    _known(
        gateway,
        "gateway",
        {
            "listen", "idle_timeout", "connect_timeout", "max_frame", "audit_log", "admin_key",
            "allow_cleartext_keys", "max_sockets", "max_sockets_per_app", "fd_reserve",
            "admin_listen", "admin_allow_remote",
            "http_proxy_listen", "socks5_listen",
            "drain_timeout", "workers",
            *_PREAUTH_KEYS,
        },
    )
    preauth = _preauth(gateway)
    max_sockets = _count(gateway, "gateway", "max_sockets")
    max_sockets_per_app = _count(gateway, "gateway", "max_sockets_per_app")
    fd_reserve = _count(gateway, "gateway", "fd_reserve")
    drain_timeout = gateway.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT)
    if isinstance(drain_timeout, bool) or not isinstance(drain_timeout, int | float) or not (
        0 <= drain_timeout < math.inf
    ):
        raise ConfigError("gateway.drain_timeout", "must be a number of seconds, 0 or more")
    workers = _count(gateway, "gateway", "workers") or 1
    admin_key = gateway.get("admin_key")
    if admin_key is not None and (not isinstance(admin_key, str) or not admin_key):
        raise ConfigError("gateway.admin_key", "must be a non-empty string")
    allow_cleartext_keys = gateway.get("allow_cleartext_keys", False)
    if not isinstance(allow_cleartext_keys, bool):
        raise ConfigError("gateway.allow_cleartext_keys", "must be true or false")
    admin_listen, admin_allow_remote = _admin_listen(gateway)
    audit_log = gateway.get("audit_log")
    if audit_log is not None and (not isinstance(audit_log, str) or not audit_log):
        raise ConfigError("gateway.audit_log", "must be a file path")
    listen = _endpoints(gateway, "gateway", "listen") or DEFAULT_LISTEN
    # The HTTP proxy front-end (docs/proxies.md): off unless configured.
    http_proxy_listen = _endpoints(gateway, "gateway", "http_proxy_listen")
    # The SOCKS5 front-end (docs/proxies.md): off unless configured.
    socks5_listen = _endpoints(gateway, "gateway", "socks5_listen")
    idle = _seconds(gateway, "gateway", "idle_timeout", DEFAULT_IDLE_TIMEOUT)
    connect_timeout = _seconds(gateway, "gateway", "connect_timeout", DEFAULT_CONNECT_TIMEOUT)
    max_frame = gateway.get("max_frame", DEFAULT_MAX_FRAME)
    if isinstance(max_frame, bool) or not isinstance(max_frame, int) or not (
        1024 <= max_frame <= 16 * 1024 * 1024
    ):
        raise ConfigError("gateway.max_frame", "must be a whole number from 1024 to 16777216")

    resolver = _table(data, "resolver")
    _known(resolver, "resolver", {"mode", "hosts", "hide_denied", *_UPSTREAM_KEYS})
    mode = resolver.get("mode", "system")
    if mode not in RESOLVER_MODES:
        raise ConfigError("resolver.mode", f"must be one of {', '.join(RESOLVER_MODES)}")
    upstream = _upstream(resolver) if mode == "upstream" else None
    for setting in _UPSTREAM_KEYS:
        if setting in resolver and mode != "upstream":
            raise ConfigError(f"resolver.{setting}", 'only used when resolver.mode is "upstream"')
    hide_denied = resolver.get("hide_denied", False)
    if not isinstance(hide_denied, bool):
        raise ConfigError("resolver.hide_denied", "must be true or false")
    hosts_table = _table(resolver, "hosts", where="resolver.hosts")
    hosts: dict[str, list[str]] = {}
    for name, value in hosts_table.items():
        addrs = [value] if isinstance(value, str) else value
        if not isinstance(addrs, list) or not addrs or not all(isinstance(a, str) for a in addrs):
            raise ConfigError(f"resolver.hosts.{name}", "must be an address or list of addresses")
        for a in addrs:
            try:
                ipaddress.ip_address(a)
            except ValueError as exc:
                raise ConfigError(
                    f"resolver.hosts.{name}", f"{a!r} is not a numeric IP address"
                ) from exc
        hosts[name.lower().rstrip(".")] = list(addrs)

    apps_table = _table(data, "apps")
    apps: dict[str, AppConfig] = {}
    # Who claimed each uid, gid and Unix socket path: one app each.
    uid_owner: dict[int, str] = {}
    gid_owner: dict[int, str] = {}
    listen_owner: dict[str, str] = {e.path: "gateway.listen" for e in listen if e.is_unix}
    listen_owner.update(
        (e.path, "gateway.http_proxy_listen") for e in http_proxy_listen if e.is_unix
    )
    listen_owner.update((e.path, "gateway.socks5_listen") for e in socks5_listen if e.is_unix)
    app_policies: dict[str, Mapping[str, Any]] = {}
    app_quotas: dict[str, tuple[Mapping[str, Any] | None, int | None]] = {}
    for name, app in apps_table.items():
        where = f"apps.{name}"
        if not isinstance(app, Mapping):
            raise ConfigError(where, "must be a table")
        _known(
            app, where,
            {"key", "idle_timeout", "policy", "max_sockets", "uids", "gids", "listen", "quota"},
        )
        uids = _ids(app, where, "uids", uid_owner)
        gids = _ids(app, where, "gids", gid_owner)
        own_listen = _app_listen(app, where, listen_owner)
        key = app.get("key", "")
        if not isinstance(key, str) or (not key and "key" in app):
            raise ConfigError(f"{where}.key", "must be a non-empty string")
        if not key and not (uids or gids or own_listen):
            raise ConfigError(
                f"{where}.key",
                "missing: an app needs a key, or uids, gids or its own Unix listener (listen)",
            )
        app_idle = _seconds(app, where, "idle_timeout", None) if "idle_timeout" in app else None
        apps[name] = AppConfig(
            name=name, key=key, idle_timeout=app_idle,
            max_sockets=_count(app, where, "max_sockets"), uids=uids, gids=gids, listen=own_listen,
        )
        if "policy" in app:
            app_policies[name] = _table(app, "policy", where=f"{where}.policy")
        app_quotas[name] = (
            _table(app, "quota", where=f"{where}.quota") if "quota" in app else None,
            apps[name].max_sockets,
        )
    if admin_listen is not None and admin_listen.path in listen_owner:
        # It would unlink that listener's socket as a stale one and take its path.
        raise ConfigError(
            "gateway.admin_listen", f"{admin_listen} is already {listen_owner[admin_listen.path]}'s"
        )
    policy = parse_policy(_table(data, "policy") or None, app_policies)
    # [gateway] max_sockets_per_app and [apps.NAME] max_sockets are the
    # sockets quota under their older names.
    quota = parse_quota(_table(data, "quota"), app_quotas, sockets_alias=max_sockets_per_app)
    return Config(
        listen=listen,
        http_proxy_listen=http_proxy_listen,
        socks5_listen=socks5_listen,
        idle_timeout=idle,
        connect_timeout=connect_timeout,
        max_frame=max_frame,
        audit_log=audit_log,
        admin_key=admin_key,
        allow_cleartext_keys=allow_cleartext_keys,
        admin_listen=admin_listen,
        admin_allow_remote=admin_allow_remote,
        **preauth,
        max_sockets=max_sockets,
        max_sockets_per_app=max_sockets_per_app,
        fd_reserve=fd_reserve,
        drain_timeout=float(drain_timeout),
        workers=workers,
        resolver_mode=mode,
        resolver_hosts=hosts,
        resolver_upstream=upstream,
        resolver_hide_denied=hide_denied,
        policy=policy,
        apps=apps,
        quota=quota,
        cluster=parse_cluster(data.get("cluster")),
        usage=parse_usage(data.get("usage")),
        source=source,
    )


_PREAUTH_KEYS = (
    "handshake_timeout", "preauth_limit", "preauth_limit_per_peer", "auth_failure_limit",
    "auth_failure_window", "auth_lockout", "auth_max_delay", "write_stall_timeout",
)


def _preauth(gateway: Mapping[str, Any]) -> dict[str, Any]:
    """[gateway]'s pre-auth and stalled-stream settings, as Config fields."""
    values: dict[str, Any] = {}
    for key in _PREAUTH_KEYS:
        default = getattr(Config, key)
        if key in ("preauth_limit", "preauth_limit_per_peer", "auth_failure_limit"):
            counted = gateway.get(key, default)
            if counted is not None and (
                isinstance(counted, bool) or not isinstance(counted, int) or counted < 1
            ):
                raise ConfigError(f"gateway.{key}", "must be a whole number, 1 or more")
            values[key] = counted
        elif key == "auth_max_delay":
            delay = gateway.get(key, default)
            if isinstance(delay, bool) or not isinstance(delay, int | float) or not (
                0 <= delay < math.inf
            ):
                raise ConfigError(
                    "gateway.auth_max_delay", "must be a number of seconds, 0 or more"
                )
            values[key] = float(delay)
        else:
            values[key] = _seconds(gateway, "gateway", key, default)
    if values["auth_max_delay"] >= values["handshake_timeout"]:
        raise ConfigError(
            "gateway.auth_max_delay",
            f"must be less than gateway.handshake_timeout ({values['handshake_timeout']:g} s): "
            "a failed hello waiting for its answer is still within its handshake",
        )
    return values


def _admin_listen(gateway: Mapping[str, Any]) -> tuple[Endpoint | None, bool]:
    """[gateway] admin_listen (one host:port or unix:/path) and admin_allow_remote."""
    allow_remote = gateway.get("admin_allow_remote", False)
    if not isinstance(allow_remote, bool):
        raise ConfigError("gateway.admin_allow_remote", "must be true or false")
    text = gateway.get("admin_listen")
    if text is None:
        return None, allow_remote
    if not isinstance(text, str):
        raise ConfigError(
            "gateway.admin_listen", 'must be one address, as "127.0.0.1:9464" or "unix:/path"'
        )
    if text.startswith("/"):
        raise ConfigError("gateway.admin_listen", f"write a Unix socket as unix:{text}")
    try:
        return parse_endpoint(text), allow_remote
    except ValueError as exc:
        raise ConfigError("gateway.admin_listen", str(exc)) from exc


def _upstream(resolver: Mapping[str, Any]) -> UpstreamConfig:
    servers = resolver.get("servers")
    if not isinstance(servers, list) or not servers:
        raise ConfigError(
            "resolver.servers", 'must be a non-empty list of "address[:port]" (upstream mode)'
        )
    parsed: list[tuple[str, int]] = []
    for i, item in enumerate(servers):
        where = f"resolver.servers[{i}]"
        if not isinstance(item, str):
            raise ConfigError(where, "must be a string")
        server = _dns_server(item)
        if server is None:
            raise ConfigError(
                where,
                f"{item!r} is not a numeric address with an optional port "
                '(as "127.0.0.1", "127.0.0.1:5353", "::1" or "[::1]:5353")',
            )
        parsed.append(server)
    defaults = UpstreamConfig(servers=())
    attempts = resolver.get("attempts", defaults.attempts)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 10:
        raise ConfigError("resolver.attempts", "must be a whole number from 1 to 10")
    cache_size = resolver.get("cache_size", defaults.cache_size)
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
        raise ConfigError("resolver.cache_size", "must be a whole number, 0 (no cache) or more")
    ttls: dict[str, float] = {}
    for key in ("min_ttl", "max_ttl"):
        value = resolver.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ConfigError(f"resolver.{key}", "must be a number of seconds, 0 or more")
        if not value < math.inf:
            raise ConfigError(f"resolver.{key}", "must be a finite number of seconds")
        ttls[key] = float(value)
    if ttls["min_ttl"] > ttls["max_ttl"]:
        limit = ttls["max_ttl"]
        raise ConfigError("resolver.min_ttl", f"must not exceed resolver.max_ttl ({limit:g})")
    return UpstreamConfig(
        servers=tuple(parsed),
        timeout=_seconds(resolver, "resolver", "timeout", defaults.timeout),
        attempts=attempts,
        cache_size=cache_size,
        min_ttl=ttls["min_ttl"],
        max_ttl=ttls["max_ttl"],
    )


def _dns_server(text: str) -> tuple[str, int] | None:
    """``addr``, ``addr:port``, ``v6`` or ``[v6]:port``; None if it is none of them."""
    host, port_text = text.strip(), ""
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                return None
            port_text = rest[1:]
    elif host.count(":") == 1:
        host, _, port_text = host.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    if not port_text:
        return host, _DNS_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return None
    return host, int(port_text)


def _known(table: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            path = f"{where}.{key}" if where else key
            raise ConfigError(path, f"unknown setting (known: {', '.join(sorted(allowed))})")


def _table(parent: Mapping[str, Any], key: str, *, where: str | None = None) -> Mapping[str, Any]:
    value = parent.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(where or key, "must be a table")
    return value


def _endpoints(table: Mapping[str, Any], where: str, key: str) -> tuple[Endpoint, ...]:
    """A listener setting: one address or a non-empty list (host:port, [v6]:port,
    unix:/path); () when the key is absent."""
    if key not in table:
        return ()
    items = table[key]
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}.{key}", "must be a non-empty list of addresses")
    parsed = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(f"{where}.{key}[{i}]", "must be a string")
        try:
            parsed.append(parse_endpoint(item))
        except ValueError as exc:
            raise ConfigError(f"{where}.{key}[{i}]", str(exc)) from exc
    return tuple(parsed)


def _count(table: Mapping[str, Any], where: str, key: str) -> int | None:
    """A positive whole number, or None when the key is absent."""
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}.{key}", "must be a whole number, 1 or more")
    return value


def _seconds(table: Mapping[str, Any], where: str, key: str, default: Any) -> Any:
    value = table.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        0 < value < math.inf
    ):
        raise ConfigError(f"{where}.{key}", "must be a positive number of seconds")
    return float(value)
