"""``[cluster]``: this gateway as one node of several sharing a Redis.

Parsed here and hooked into :func:`tether.config.parse_config`; absent, the
gateway is one process with no Redis (``Config.cluster`` is None). Every
problem is a :class:`~tether.errors.ConfigError` naming ``cluster.KEY``.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tether.endpoint import Endpoint, parse_endpoint
from tether.errors import ConfigError

# Liveness is a Redis key with a TTL, refreshed every HEARTBEAT_INTERVAL.
# 1 s: a node's death is noticed within the TTL. 3 s TTL: three beats, so a
# loaded loop (or one Redis hiccup) that delays one beat does not make a live
# node look gone, while a resume of a dead node's socket still fails within
# seconds (and at once when its link is refused: a dead process's port is closed).
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TTL = 3.0
# Every Redis call is bounded: Redis on the same host or LAN answers in well
# under a millisecond; 0.5 s is far above that and short enough that nothing
# an app waits on hangs when Redis does not answer.
REDIS_TIMEOUT = 0.5
# A node's share of a per-minute limit taken from Redis at a time: 10% (the
# issue's example), so a steady stream of connects goes to Redis about once
# per tenth of its limit, and the overshoot bound (nodes x chunk) stays small.
LEASE_FRACTION = 0.1
DEFAULT_PREFIX = "tether:"
# Fail closed (refuse connects of quota-limited apps while Redis cannot be
# asked for budget): a quota that silently stops holding is a billing hole.
QUOTA_FAIL_MODES = ("closed", "open")
# The HMAC key signs descriptors other nodes route by: 16 bytes is the floor
# of what HMAC-SHA256 keys should be (RFC 2104: not shorter than the hash's
# output is recommended; 16 bytes is 128 bits, what the descriptors carry).
MIN_KEY_LENGTH = 16

KEYS = {
    "redis", "redis_password_file", "redis_tls_ca", "redis_tls_cert", "redis_tls_key",
    "node_id", "advertise", "link_listen", "tls_cert", "tls_key", "tls_ca", "key", "key_file",
    "prefix", "heartbeat_interval", "heartbeat_ttl", "redis_timeout", "quota_fail",
    "lease_fraction",
}


@dataclass(frozen=True)
class ClusterConfig:
    """What ``[cluster]`` says (docs/deploy.md, docs/configuration.md)."""

    redis: str = field(repr=False)  # may carry a password
    node_id: str
    link_listen: Endpoint
    advertise: Endpoint | None  # None: the bound link_listen address
    key: bytes = field(repr=False)  # the HMAC key the nodes share
    prefix: str = DEFAULT_PREFIX
    redis_password: str | None = field(default=None, repr=False)
    redis_tls_ca: str | None = None
    redis_tls_cert: str | None = None
    redis_tls_key: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_ttl: float = HEARTBEAT_TTL
    redis_timeout: float = REDIS_TIMEOUT
    quota_fail: str = "closed"
    lease_fraction: float = LEASE_FRACTION

    @property
    def tls(self) -> bool:
        """Node links over TCP use mutual TLS; over a Unix socket (workers of one host) not."""
        return not self.link_listen.is_unix


def parse_cluster(table: Any) -> ClusterConfig | None:
    """The ``[cluster]`` table, or None when the config has none."""
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise ConfigError("cluster", "must be a table")
    for name in table:
        if name not in KEYS:
            known = ", ".join(sorted(KEYS))
            raise ConfigError(f"cluster.{name}", f"unknown setting (known: {known})")
    redis = _text(table, "redis")
    if redis is None:
        raise ConfigError("cluster.redis", 'missing: the Redis the nodes share ("redis://host:6379/0")')
    if not redis.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("cluster.redis", "must be a redis://, rediss:// (TLS) or unix:// URL")
    node_id = _text(table, "node_id") or socket.gethostname()
    if not all(c.isalnum() or c in "-_." for c in node_id) or len(node_id) > 64:
        raise ConfigError(
            "cluster.node_id",
            f"{node_id!r}: use letters, digits, '-', '_' and '.', at most 64 characters "
            "(it names the node in descriptors' signatures and Redis keys)",
        )
    link_listen = _endpoint(table, "link_listen")
    if link_listen is None:
        raise ConfigError(
            "cluster.link_listen",
            'missing: where other nodes reach this one ("0.0.0.0:7341" with mutual TLS, or '
            '"unix:/run/tether/node.sock" between the workers of one host)',
        )
    advertise = _endpoint(table, "advertise")
    if advertise is not None and advertise.is_unix != link_listen.is_unix:
        raise ConfigError("cluster.advertise", "must be of the same kind as cluster.link_listen")
    tls = {name: _file(table, name) for name in ("tls_cert", "tls_key", "tls_ca")}
    if not link_listen.is_unix:
        for name, value in tls.items():
            if value is None:
                raise ConfigError(
                    f"cluster.{name}",
                    "missing: node links over TCP use mutual TLS (tls_cert, tls_key: this "
                    "node's certificate and key; tls_ca: the CA that signed every node's)",
                )
    return ClusterConfig(
        redis=redis,
        node_id=node_id,
        link_listen=link_listen,
        advertise=advertise,
        key=_key(table),
        prefix=_prefix(table),
        redis_password=_secret_file(table, "redis_password_file"),
        redis_tls_ca=_file(table, "redis_tls_ca"),
        redis_tls_cert=_file(table, "redis_tls_cert"),
        redis_tls_key=_file(table, "redis_tls_key"),
        heartbeat_interval=_seconds(table, "heartbeat_interval", HEARTBEAT_INTERVAL),
        heartbeat_ttl=_ttl(table),
        redis_timeout=_seconds(table, "redis_timeout", REDIS_TIMEOUT),
        quota_fail=_choice(table, "quota_fail", QUOTA_FAIL_MODES),
        lease_fraction=_fraction(table),
        **tls,
    )


def for_worker(config: ClusterConfig, index: int, unix_link: str) -> ClusterConfig:
    """Worker `index` of `tether serve --workers N` as a node of its own.

    Its id is ``NODE_ID-INDEX``; a Unix link listens on the worker's own
    socket (`unix_link`, in the supervisor's private directory); a TCP link
    on the configured port plus `index` (so the workers of one host need N
    consecutive ports), advertised the same way.
    """

    def shifted(endpoint: Endpoint | None) -> Endpoint | None:
        if endpoint is None:
            return None
        if endpoint.is_unix:
            return Endpoint(path=unix_link)
        return Endpoint(host=endpoint.host, port=endpoint.port + index if endpoint.port else 0)

    link_listen = shifted(config.link_listen)
    assert link_listen is not None
    return replace(config, node_id=f"{config.node_id}-{index}", link_listen=link_listen,
                   advertise=shifted(config.advertise))


def _text(table: Mapping[str, Any], name: str) -> str | None:
    value = table.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"cluster.{name}", "must be a non-empty string")
    return value


def _endpoint(table: Mapping[str, Any], name: str) -> Endpoint | None:
    text = _text(table, name)
    if text is None:
        return None
    try:
        return parse_endpoint(text)
    except ValueError as exc:
        raise ConfigError(f"cluster.{name}", str(exc)) from exc


def _file(table: Mapping[str, Any], name: str) -> str | None:
    path = _text(table, name)
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"cluster.{name}", f"{path}: no such file")
    return path


def _secret_file(table: Mapping[str, Any], name: str) -> str | None:
    path = _file(table, name)
    if path is None:
        return None
    return Path(path).read_text().strip()


def _key(table: Mapping[str, Any]) -> bytes:
    if "key" in table and "key_file" in table:
        raise ConfigError("cluster.key", "give key or key_file, not both")
    key = _text(table, "key")
    if key is None:
        key = _secret_file(table, "key_file")
    if key is None:
        raise ConfigError(
            "cluster.key",
            "missing: the key every node shares to sign descriptors (key, or key_file)",
        )
    if len(key.encode()) < MIN_KEY_LENGTH:
        raise ConfigError(
            "cluster.key", f"is {len(key.encode())} bytes; at least {MIN_KEY_LENGTH} are needed"
        )
    return key.encode()


def _prefix(table: Mapping[str, Any]) -> str:
    prefix = table.get("prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "*?[]"):
        raise ConfigError("cluster.prefix", "must be a non-empty string without * ? [ ]")
    return prefix


def _seconds(table: Mapping[str, Any], name: str, default: float) -> float:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
        0 < value < math.inf
    ):
        raise ConfigError(f"cluster.{name}", "must be a positive number of seconds")
    return float(value)


def _ttl(table: Mapping[str, Any]) -> float:
    ttl = _seconds(table, "heartbeat_ttl", HEARTBEAT_TTL)
    interval = _seconds(table, "heartbeat_interval", HEARTBEAT_INTERVAL)
    if ttl < 2 * interval:
        raise ConfigError(
            "cluster.heartbeat_ttl",
            f"must be at least twice cluster.heartbeat_interval ({interval:g} s): one late "
            "beat must not make a live node look gone",
        )
    return ttl


def _choice(table: Mapping[str, Any], name: str, choices: tuple[str, ...]) -> str:
    value = table.get(name, choices[0])
    if value not in choices:
        raise ConfigError(f"cluster.{name}", f"must be one of {', '.join(map(repr, choices))}")
    return str(value)


def _fraction(table: Mapping[str, Any]) -> float:
    value = table.get("lease_fraction", LEASE_FRACTION)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError("cluster.lease_fraction", "must be a number above 0, at most 1")
    return float(value)


__all__ = [
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_TTL",
    "LEASE_FRACTION",
    "REDIS_TIMEOUT",
    "ClusterConfig",
    "for_worker",
    "parse_cluster",
]
