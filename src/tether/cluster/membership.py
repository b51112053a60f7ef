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
        self._task: asyncio.Task[None] | None = None
        self.healthy = False  # the last beat reached Redis
        # The last members seen (each beat reads them): answers when Redis cannot.
        self.known: dict[str, Endpoint] = {}

    def key_of(self, node: str) -> str:
        return f"{self.config.prefix}node:{node}"

    async def beat(self) -> None:
        """Write this node's key with its TTL (StoreUnavailable if Redis does not take it)."""
        ttl_ms = int(self.config.heartbeat_ttl * 1000)
        await bounded(self.redis.set(self.key, self.value, px=ttl_ms), self.config.redis_timeout,
                      "this node's heartbeat")

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
                self.known = await self.members()
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
        pattern = f"{self.config.prefix}node:*"
        keys: list[bytes] = []

        async def scan() -> None:
            async for key in self.redis.scan_iter(match=pattern, count=100):
                keys.append(key)

        await bounded(scan(), self.config.redis_timeout, "the list of nodes")
        if not keys:
            return {}
        values = await bounded(self.redis.mget(keys), self.config.redis_timeout,
                               "the nodes' addresses")
        start = len(self.key_of(""))
        found = {}
        for key, raw in zip(keys, values, strict=True):
            if raw is not None:
                found[key.decode()[start:]] = _link(raw)
        return found

    async def leave(self) -> None:
        """Remove this node's key now (shutdown), if it is still ours."""
        if self._task is not None:
            self._task.cancel()
        script = (
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
            "end return 0"
        )
        try:
            await bounded(self.redis.eval(script, 1, self.key, self.value),
                          self.config.redis_timeout, "removing this node's heartbeat")
        except StoreUnavailable as exc:
            log.warning("cluster: %s; the key expires by itself in %g s", exc,
                        self.config.heartbeat_ttl)


def _link(raw: bytes | str) -> Endpoint:
    return parse_endpoint(json.loads(raw)["link"])


__all__ = ["Membership", "StoreUnavailable", "bounded", "connect"]
