"""The job queues the example can hand a payload through.

``RedisQueue`` is a Redis list (RPUSH to put, BLPOP to take) reached with
redis-py; in the producer and the worker that connection goes through tether
too, like every other socket of a sandboxed process. ``multiprocessing``
queues need no adapter: they already have put() and get(timeout=...).
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379


class JobQueue(Protocol):
    def put(self, payload: bytes) -> None: ...

    def get(self, timeout: float) -> bytes: ...


class RedisQueue:
    """A Redis list; picklable (it holds only its address and key) and lazy."""

    def __init__(self, key: str | None = None, host: str = REDIS_HOST, port: int = REDIS_PORT):
        self.key = key or f"tether-example-handoff-{uuid.uuid4().hex}"
        self.host = host
        self.port = port

    def _client(self) -> Any:
        import redis

        # Short-lived connections: no TCP keepalive tuning to ask the gateway for.
        return redis.Redis(
            host=self.host, port=self.port, socket_timeout=30, socket_keepalive=False
        )

    def put(self, payload: bytes) -> None:
        with self._client() as client:
            client.rpush(self.key, payload)

    def get(self, timeout: float) -> bytes:
        with self._client() as client:
            item = client.blpop([self.key], timeout=max(1, int(timeout)))
        if item is None:
            raise TimeoutError(f"nothing in Redis list {self.key!r} after {timeout:g} s")
        return bytes(item[1])

    def delete(self) -> None:
        with self._client() as client:
            client.delete(self.key)
