"""Node membership: a heartbeat key per node in Redis, with a TTL.

``PREFIX node:ID`` holds the node's link address (JSON) and lives for
``heartbeat_ttl`` seconds (3 s), rewritten every ``heartbeat_interval`` (1
s; the numbers and why: tether.cluster.config). A node is alive while its
key exists: a node that dies stops writing, and within the TTL every other
node sees it gone. Every Redis call has a deadline (``redis_timeout``), so
nothing waits on a Redis that does not answer, and the heartbeat keeps
trying until Redis is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from tether.cluster.config import ClusterConfig
from tether.endpoint import Endpoint, parse_endpoint

log = logging.getLogger("tether.cluster")
T = TypeVar("T")


# The members are a sorted set scored by when each one's heartbeat expires
# (Redis's clock), their values a hash: one beat writes this node's key (its
# liveness, what a resume looks up), refreshes its entries, drops the expired
# ones and reads the rest, atomically, in O(log n) with n the nodes; never a
# SCAN of a Redis the cluster may share with other data.
# KEYS: node key, members, links; ARGV: value, TTL (ms), node id.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[1])
for _, n in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[3], n)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('PEXPIRE', KEYS[2], ttl * 10)
redis.call('PEXPIRE', KEYS[3], ttl * 10)
local live = redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')
if #live == 0 then return {} end
local values = redis.call('HMGET', KEYS[3], unpack(live))
local out = {}
for i, n in ipairs(live) do out[2 * i - 1] = n; out[2 * i] = values[i] end
return out
"""
# KEYS: members, links. The live members and their values, read only.
_MEMBERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
if #live == 0 then return {} end
local values = redis.call('HMGET', KEYS[2], unpack(live))
local out = {}
for i, n in ipairs(live) do out[2 * i - 1] = n; out[2 * i] = values[i] end
return out
"""
# KEYS: node key, members, links; ARGV: value, node id. Only if still ours.
_LEAVE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('HDEL', KEYS[3], ARGV[2])
  return 1
end
return 0
"""


class StoreUnavailable(ConnectionError):
    """The cluster's Redis did not answer (down, unreachable, refusing us)."""


def connect(config: ClusterConfig) -> aioredis.Redis:
    """A redis.asyncio client for `config`: every call bounded, no silent retries."""
    options: dict[str, Any] = {
        "socket_timeout": config.redis_timeout,
        "socket_connect_timeout": config.redis_timeout,
        # One attempt per call: the callers decide what a failure means
        # (heartbeat: try at the next beat; quota: fail closed or open).
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
    }
    if config.redis_password is not None:
        options["password"] = config.redis_password
    if config.redis.startswith("rediss://"):
        options.update(
            ssl_ca_certs=config.redis_tls_ca,
            ssl_certfile=config.redis_tls_cert,
            ssl_keyfile=config.redis_tls_key,
        )
    return aioredis.Redis.from_url(config.redis, **options)


async def bounded(call: Awaitable[T], timeout: float, what: str) -> T:
    """Await one Redis call within `timeout`; StoreUnavailable says what failed and why."""
    try:
        async with asyncio.timeout(timeout):
            return await call
    except TimeoutError as exc:
        raise StoreUnavailable(
            f"the cluster's Redis did not answer {what} in {timeout:g} s"
        ) from exc
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"the cluster's Redis failed {what}: {exc}") from exc


class Membership:
    """This node's heartbeat, and where the other nodes are."""

    def __init__(self, redis: aioredis.Redis, config: ClusterConfig, advertise: Endpoint) -> None:
        self.redis = redis
        self.config = config
        self.node_id = config.node_id
        self.advertise = advertise
        self.value = json.dumps(
            {"link": str(advertise), "pid": os.getpid(), "since": time.time()}
        ).encode()
        self.key = self.key_of(self.node_id)
        self._beat = redis.register_script(_BEAT)
        self._members = redis.register_script(_MEMBERS)
        self._leave = redis.register_script(_LEAVE)
        self._task: asyncio.Task[None] | None = None
        self.healthy = False  # the last beat reached Redis
        # The last members seen (each beat reads them): answers when Redis cannot.
        self.known: dict[str, Endpoint] = {}

    def key_of(self, node: str) -> str:
        return f"{self.config.prefix}node:{node}"

    async def beat(self) -> dict[str, Endpoint]:
        """Write this node's key with its TTL; every live node (StoreUnavailable if Redis
        does not take it)."""
        ttl_ms = int(self.config.heartbeat_ttl * 1000)
        found = await bounded(
            self._beat(keys=self._keys(), args=[self.value, ttl_ms, self.node_id]),
            self.config.redis_timeout, "this node's heartbeat",
        )
        return _members(found)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                self.known = await self.beat()
            except StoreUnavailable as exc:
                if self.healthy or not self.known:
                    log.warning("cluster: %s; node %r will look gone to the others after %g s "
                                "(retrying every %g s)", exc, self.node_id,
                                self.config.heartbeat_ttl, self.config.heartbeat_interval)
                self.healthy = False
                self.known = self.known or {self.node_id: self.advertise}
            else:
                if not self.healthy:
                    log.info("cluster: node %r is in the cluster (%d nodes live)",
                             self.node_id, len(self.known))
                self.healthy = True
            await asyncio.sleep(self.config.heartbeat_interval)

    async def address(self, node: str) -> Endpoint | None:
        """Where `node` is, or None when its heartbeat key is gone (StoreUnavailable)."""
        raw = await bounded(self.redis.get(self.key_of(node)), self.config.redis_timeout,
                            f"where node {node!r} is")
        return None if raw is None else _link(raw)

    async def members(self) -> dict[str, Endpoint]:
        """Every live node and its link address (StoreUnavailable)."""
        found = await bounded(self._members(keys=self._keys()[1:]),
                              self.config.redis_timeout, "the list of nodes")
        return _members(found)

    def _keys(self) -> list[str]:
        """This node's heartbeat key, the members (by expiry), their values."""
        return [self.key, f"{self.config.prefix}nodes", f"{self.config.prefix}nodes:links"]

    async def leave(self) -> None:
        """Remove this node's key now (shutdown), if it is still ours."""
        if self._task is not None:
            self._task.cancel()
        try:
            await bounded(self._leave(keys=self._keys(), args=[self.value, self.node_id]),
                          self.config.redis_timeout, "removing this node's heartbeat")
        except StoreUnavailable as exc:
            log.warning("cluster: %s; the key expires by itself in %g s", exc,
                        self.config.heartbeat_ttl)


def _members(flat: list[bytes | None]) -> dict[str, Endpoint]:
    """[node, value, node, value, ...] from the scripts: node -> link address."""
    found = {}
    for node, raw in zip(flat[::2], flat[1::2], strict=True):
        if node is not None and raw is not None:
            found[node.decode()] = _link(raw)
    return found


def _link(raw: bytes | str) -> Endpoint:
    return parse_endpoint(json.loads(raw)["link"])


__all__ = ["Membership", "StoreUnavailable", "bounded", "connect"]
