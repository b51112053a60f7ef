"""Quotas across a cluster: budget leased from Redis, the bound held, Redis away and back.

* The leased store alone, against the machine's Redis under a prefix of the
  test's own: chunks, the limit never granted past, budget returned.
* A connects_per_minute limit hammered through three nodes: accepted within
  the stated bound (the limit per Redis minute, plus nodes x chunk).
* A node whose Redis is a redis-server this test starts and stops: with
  Redis away, connects of an app with a quota fail closed at once with a
  clear error, an app without one connects, and once Redis is back the
  quota'd app connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from clustersupport import REDIS_PORT, REDIS_URL, Cluster, delete_prefix, running
from support import (
    REQUIRE_SERVICES,
    FakeClock,
    StdSocket,
    echo,
    require_service,
    use_gateway,
    wait_for,
)
from tcpservers import serving

import tether.socket as tsocket
from tether.client import control
from tether.client import settings as client_settings
from tether.cluster.config import parse_cluster
from tether.cluster.membership import connect
from tether.cluster.quota import LeasedStore
from tether.errors import QuotaExceeded
from tether.quota import QuotaBook, parse_quota

LIMIT = 30  # connects per minute, for the app "tests" across the cluster
CHUNK = 3  # 10% of it: each node's lease (cluster.lease_fraction's default)


@pytest.fixture(autouse=True)
def _client_settings() -> Iterator[None]:
    yield
    client_settings.configure(None)
    control.close_all()


def cluster_config(prefix: str, url: str = REDIS_URL) -> dict[str, str]:
    return {"redis": url, "node_id": "unit", "link_listen": "unix:/nonexistent/link.sock",
            "key": "k" * 32, "prefix": prefix}


def redis_minute() -> int:
    seconds, _ = redis.Redis.from_url(REDIS_URL).time()
    return int(seconds) // 60


# -- the store alone -----------------------------------------------------------------


def test_leases_are_chunks_and_never_past_the_limit() -> None:
    require_service(REDIS_PORT, "Redis")
    prefix = f"tether-test-{secrets.token_hex(6)}:"
    config = parse_cluster(cluster_config(prefix))
    assert config is not None
    clock = FakeClock()

    async def main() -> tuple[list[int], int, int]:
        loop = asyncio.get_running_loop()
        client = connect(config)
        stores = [LeasedStore(client, config, loop, clock=clock) for _ in range(3)]
        book = QuotaBook(parse_quota({"connects_per_minute": LIMIT}, {}), clock=clock,
                         wall=time.time)
        accepted = [0, 0, 0]
        for _ in range(2 * LIMIT):
            for i, store in enumerate(stores):
                book.store = store
                if await store.ready(book, "a") is None and book.admit("a") is None:
                    accepted[i] += 1
                await asyncio.sleep(0)  # let a prefetch run
        held = sum(int(s._budget("a", "connects_per_minute", None).units) for s in stores)
        for store in stores:
            await store.give_back()
        key = stores[0]._base("a", "connects_per_minute") + stores[0].budgets[
            ("a", "connects_per_minute")].window
        left = int(await client.get(key) or 0)
        await client.aclose()
        return accepted, held, left

    try:
        accepted, held, left = asyncio.run(main())
    finally:
        delete_prefix(prefix)
    # One Redis minute (or two, if the test crossed a minute): never past the limit per minute.
    assert sum(accepted) <= 2 * LIMIT
    assert sum(accepted) + held <= 2 * LIMIT
    assert all(n >= 1 for n in accepted), accepted  # every node got leases
    # What was held but not spent went back: Redis counts what was used.
    assert left <= sum(accepted)


def test_a_connects_per_minute_limit_holds_across_three_nodes(tmp_path: Path) -> None:
    quota = f"\n[apps.tests.quota]\nconnects_per_minute = {LIMIT}\n"
    with running(tmp_path, config_extra=quota) as cluster, serving(echo) as server:
        first = redis_minute()
        accepted = refused = 0
        for round_ in range(3 * LIMIT):
            node = cluster.node(round_ % 3 + 1)
            use_gateway(node.address, node.app, node.key)
            sock = tsocket.socket()
            sock.settimeout(10)
            try:
                sock.connect(("127.0.0.1", server.port))
            except QuotaExceeded as exc:
                refused += 1
                assert exc.limit == "connects_per_minute" and exc.window == "minute"
            else:
                accepted += 1
            finally:
                sock.close()
        minutes = redis_minute() - first + 1
    # The stated bound: the limit per Redis minute, plus nodes x chunk.
    assert accepted <= minutes * LIMIT + 3 * CHUNK, (accepted, minutes)
    # Budget stranded at the other nodes when the limit is reached: at most their chunks.
    assert accepted >= LIMIT - 2 * CHUNK, accepted
    assert refused >= 3 * LIMIT - accepted - 1


# -- Redis away and back -------------------------------------------------------------


def free_port() -> int:
    probe = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


class RedisServer:
    """A redis-server of this test's own on a loopback port (never the machine's)."""

    def __init__(self, tmp: Path, *options: str, password: str | None = None) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.options = [*options, *(["--requirepass", password] if password else [])]
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            message = "redis-server is not installed (apt-get install redis-server)"
            if REQUIRE_SERVICES:
                pytest.fail(f"{message}; TETHER_REQUIRE_SERVICES is set")
            pytest.skip(message)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp), *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        assert wait_for(self._answers, timeout=10)

    def _answers(self) -> bool:
        try:
            client = redis.Redis(port=self.port, socket_timeout=1, password=self.password)
            return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@contextlib.contextmanager
def one_node_on(server: RedisServer, url: str = "", **options: Any) -> Iterator[Cluster]:
    """`server` started, and a one-node cluster using it (at `url`, default its plain port)."""
    cluster = Cluster(server.tmp, size=1, redis_url=url or f"redis://127.0.0.1:{server.port}/0",
                      **options)
    server.start()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        server.stop()


def test_redis_away_fails_closed_at_once_and_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    quota = (f"\n[apps.tests.quota]\nconnects_per_minute = {LIMIT}\n"
             "\n[apps.free]\nkey = \"free-key-for-the-redis-test\"\n")
    with one_node_on(server, config_extra=quota) as cluster, serving(echo) as target:
        node = cluster.node(1)

        def connect_as(app: str, key: str) -> None:
            use_gateway(node.address, app, key)
            with tsocket.socket() as sock:
                sock.settimeout(10)
                sock.connect(("127.0.0.1", target.port))

        def works() -> bool:
            try:
                connect_as("tests", node.key)
            except ConnectionRefusedError:
                return False
            return True

        connect_as("tests", node.key)  # leased while Redis is there
        server.stop()
        # Spend what the node holds, then: refused, at once, saying why.
        with pytest.raises(ConnectionRefusedError, match=r"Redis failed") as caught:
            for _ in range(LIMIT):
                connect_as("tests", node.key)
        assert "cluster.quota_fail" in str(caught.value)
        assert "connects_per_minute" in str(caught.value)
        # At once: the call failed (refused, or closed by the stopping server); nothing
        # waited for an answer (a wait, bounded by redis_timeout, says "did not answer").
        assert "did not answer" not in str(caught.value)
        connect_as("free", "free-key-for-the-redis-test")  # no quota: not Redis's to refuse
        server.start()
        # Back: within the retry pause (1 s) and a beat, the quota'd app connects again.
        assert wait_for(works, timeout=10)
        assert "cluster quotas:" in node.log_text()
        # The node is back in the cluster: its heartbeat key is in the new Redis.
        assert wait_for(lambda: cluster.live() == {"n1"}, timeout=10)


def test_redis_auth_from_a_password_file(tmp_path: Path) -> None:
    password = secrets.token_urlsafe(16)
    server = RedisServer(tmp_path, password=password)
    (tmp_path / "redis-password").write_text(password + "\n")
    extra = f'redis_password_file = "{tmp_path / "redis-password"}"\n'
    # start() waits until the node's heartbeat key is there: AUTH worked.
    with one_node_on(server, redis_password=password, cluster_extra=extra) as cluster:
        client = redis.Redis(port=server.port, password=password, socket_timeout=5)
        value = client.get(f"{cluster.prefix}node:n1")
        client.close()
        assert value is not None and b"link" in value
        assert password not in cluster.node(1).log_text()


def test_redis_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("tether-node")
    files = {name: tmp_path / f"redis-{name}.pem" for name in
             ("ca", "server", "server-key", "client", "client-key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.cert_chain_pems[0].write_to_path(str(files["server"]))
    server_cert.private_key_pem.write_to_path(str(files["server-key"]))
    client_cert.cert_chain_pems[0].write_to_path(str(files["client"]))
    client_cert.private_key_pem.write_to_path(str(files["client-key"]))
    # The plain port stays for the test's own look; the node speaks TLS on the other.
    tls_port = free_port()
    server = RedisServer(tmp_path, "--tls-port", str(tls_port),
                         "--tls-cert-file", str(files["server"]),
                         "--tls-key-file", str(files["server-key"]),
                         "--tls-ca-cert-file", str(files["ca"]), "--tls-auth-clients", "yes")
    extra = (f'redis_tls_ca = "{files["ca"]}"\nredis_tls_cert = "{files["client"]}"\n'
             f'redis_tls_key = "{files["client-key"]}"\n')
    with one_node_on(server, f"rediss://127.0.0.1:{tls_port}/0", cluster_extra=extra,
                     view_url=f"redis://127.0.0.1:{server.port}/0") as cluster:
        assert cluster.live() == {"n1"}  # its heartbeat key arrived over TLS


def test_a_steady_stream_of_connects_makes_no_redis_round_trip(tmp_path: Path) -> None:
    """Budget is leased in chunks ahead of need: 200 connects, a lease or two, not 200."""
    server = RedisServer(tmp_path)
    limit = 6000  # a minute's: chunks of 600
    quota = f"\n[apps.tests.quota]\nconnects_per_minute = {limit}\n"
    with one_node_on(server, config_extra=quota) as cluster, serving(echo) as target:
        node = cluster.node(1)
        client = redis.Redis(port=server.port, socket_timeout=5)

        def leased() -> int:
            # What Redis has granted this app's connects, over every minute
            # window: the lease script's counters (this server is the
            # test's own). Not commandstats: the heartbeat is a script too.
            keys = list(client.scan_iter(match="*quota:tests:connects_per_minute:*"))
            return sum(int(v) for v in client.mget(keys) if v is not None) if keys else 0

        use_gateway(node.address, node.app, node.key)
        for _ in range(200):
            with tsocket.socket() as sock:
                sock.settimeout(10)
                sock.connect(("127.0.0.1", target.port))
        granted = leased()
        client.close()
        # One chunk of 600 for the window, and one more if the test crossed a
        # minute: never a call per connect (that would be 200 grants of 1).
        assert 600 <= granted <= 2 * 600, granted


def test_a_daily_byte_total_holds_across_stores() -> None:
    """bytes_out_per_day leased per quota day: three nodes' spends stay near the cap."""
    require_service(REDIS_PORT, "Redis")
    prefix = f"tether-test-{secrets.token_hex(6)}:"
    config = parse_cluster(cluster_config(prefix))
    assert config is not None
    cap, step = 10_000, 100
    clock = FakeClock()

    async def main() -> tuple[int, list[int]]:
        loop = asyncio.get_running_loop()
        client = connect(config)
        stores = [LeasedStore(client, config, loop, clock=clock) for _ in range(3)]
        day = float(int(time.time()) // 86_400 * 86_400)  # today (UTC), as the book's
        taken = 0
        for _ in range(200):
            for store in stores:
                taken += store.spend("a", "bytes_out_per_day", step, cap, day, whole=False)
                await asyncio.sleep(0.001)  # leases come back meanwhile
        reached = [s.spent("a", "bytes_out_per_day", day) for s in stores]
        await client.aclose()
        return taken, reached

    try:
        taken, reached = asyncio.run(main())
    finally:
        delete_prefix(prefix)
    # Bytes are never held back for a lease: what nodes relay while theirs is on its
    # way passes the cap, by a chunk (1,000) each at most.
    assert cap - 3 * step <= taken <= cap + 3 * 1_000, taken
    # Every node sees the day's total reached (admission then refuses new sockets).
    assert all(r >= cap - 3 * 1_000 for r in reached), reached
