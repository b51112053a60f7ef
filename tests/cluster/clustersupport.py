"""A test cluster: N `tether serve` processes on loopback sharing the machine's Redis.

Each cluster has a Redis key prefix of its own (``tether-test-RANDOM:``) and
deletes exactly those keys when it stops (SCAN + DEL of the prefix; never a
FLUSH). Node links use mutual TLS with certificates from a throwaway CA
(trustme).
"""

from __future__ import annotations

import contextlib
import secrets
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
import trustme
from support import Gateway, gateway_config, require_service, start_gateway, wait_for

REDIS_PORT = 6379
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/0"


def tls_files(tmp: Path) -> dict[str, Path]:
    """Where certificates(tmp) writes each [cluster] TLS key's file."""
    return {"tls_ca": tmp / "ca.pem", "tls_cert": tmp / "node.pem", "tls_key": tmp / "node.key"}


def certificates(tmp: Path) -> dict[str, str]:
    """A CA and one node certificate (every node shows it), as files: the [cluster] TLS keys."""
    ca = trustme.CA()
    cert = ca.issue_cert("tether-node")
    paths = tls_files(tmp)
    ca.cert_pem.write_to_path(str(paths["tls_ca"]))
    cert.private_key_pem.write_to_path(str(paths["tls_key"]))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(paths["tls_cert"]), append=i > 0)
    return {k: str(v) for k, v in paths.items()}


def delete_prefix(prefix: str, url: str = REDIS_URL, password: str | None = None) -> int:
    """Delete every key under `prefix` (and nothing else); how many."""
    client = redis.Redis.from_url(url, socket_timeout=5, password=password)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


@dataclass
class Cluster:
    tmp: Path
    size: int = 3
    redis_url: str = REDIS_URL
    redis_password: str | None = None  # the test's own redis-server's (the machine's has none)
    view_url: str = ""  # where the test itself reads that Redis, if not at redis_url
    cluster_extra: str = ""  # more [cluster] lines
    config_extra: str = ""  # more tables at the end of every node's config
    gateway_extra: str = ""  # more [gateway] lines
    unix_links: bool = False  # node links over Unix sockets (the workers of one host), no TLS
    key: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    prefix: str = field(default_factory=lambda: f"tether-test-{secrets.token_hex(6)}:")
    nodes: list[Gateway] = field(default_factory=list)

    def config(self, i: int, tls: dict[str, str]) -> str:
        link = f"unix:{self.tmp}/link-n{i}.sock" if self.unix_links else "127.0.0.1:0"
        files = "" if self.unix_links else "\n".join(f'{k} = "{v}"' for k, v in tls.items())
        return gateway_config(self.key, gateway=self.gateway_extra, extra=(
            f"\n[cluster]\nredis = \"{self.redis_url}\"\nnode_id = \"n{i}\"\n"
            f"link_listen = \"{link}\"\nkey = \"{self.secret}\"\nprefix = \"{self.prefix}\"\n"
            f"{files}\n{self.cluster_extra}\n{self.config_extra}"
        ))

    def start(self) -> Cluster:
        require_service(REDIS_PORT, "Redis")
        tls = certificates(self.tmp)
        try:
            for i in range(1, self.size + 1):
                self.nodes.append(start_gateway(self.tmp, self.config(i, tls), self.key,
                                                name=f"n{i}.toml"))
            for node in self.nodes:
                assert wait_for(lambda n=node: "in the cluster" in n.log_text()), node.log_text()
            assert wait_for(lambda: len(self.live()) == self.size), self.live()
        except BaseException:
            self.stop()
            raise
        return self

    def live(self) -> set[str]:
        client = redis.Redis.from_url(self.view_url or self.redis_url, socket_timeout=5,
                                      password=self.redis_password)
        try:
            return {k.decode()[len(self.prefix) + 5:]
                    for k in client.scan_iter(match=f"{self.prefix}node:*")}
        finally:
            client.close()

    def wait_gone(self, node: str) -> bool:
        """Wait (bounded) until `node`'s heartbeat key has expired."""
        return wait_for(lambda: node not in self.live(), timeout=15)

    def node(self, i: int) -> Gateway:
        """Node i, counted from 1 (its id is "n{i}")."""
        return self.nodes[i - 1]

    def kill(self, i: int) -> None:
        proc = self.node(i).process.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def restart(self, i: int) -> Gateway:
        """Kill node i (SIGKILL) and start it again under the same id: a new process, with
        new link and gateway ports; once it has joined."""
        self.kill(i)
        with contextlib.suppress(Exception):
            self.node(i).process.stop()
        tls = {k: str(v) for k, v in tls_files(self.tmp).items()}
        node = start_gateway(self.tmp, self.config(i, tls), self.key, name=f"n{i}-again.toml")
        self.nodes[i - 1] = node
        assert wait_for(lambda: "in the cluster" in node.log_text()), node.log_text()
        return node

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.process.stop()
        if self.redis_url == REDIS_URL:
            delete_prefix(self.prefix, self.redis_url)
        else:  # a test's own redis-server, which the test may have stopped
            with contextlib.suppress(redis.ConnectionError):
                delete_prefix(self.prefix, self.view_url or self.redis_url, self.redis_password)


@contextlib.contextmanager
def running(tmp: Path, **options: object) -> Iterator[Cluster]:
    cluster = Cluster(tmp, **options)  # type: ignore[arg-type]
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
