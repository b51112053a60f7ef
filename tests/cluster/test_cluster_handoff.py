"""Handoff across nodes: a socket opened through one node, resumed through another.

Three `tether serve` processes on loopback share the machine's Redis under
a prefix of this test's own; the app's stream to the resuming node is
forwarded to the owner over a mutual-TLS node link.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from clustersupport import Cluster, running
from support import Peer, echo, recv_exact, stream, use_gateway

import tether.socket as tsocket
from tether.client import control
from tether.client import settings as client_settings


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(autouse=True)
def _client_settings() -> Iterator[None]:
    yield
    client_settings.configure(None)
    control.close_all()


def through(cluster: Cluster, i: int) -> None:
    """The client's gateway is node i from now on (a process on that node's host)."""
    node = cluster.node(i)
    use_gateway(node.address, node.app, node.key)


def test_open_on_one_node_resume_on_another_both_ways(cluster: Cluster) -> None:
    sent = hashlib.sha256()
    got = hashlib.sha256()
    total = 0
    with Peer(echo) as peer:
        through(cluster, 1)
        sock = tsocket.socket()
        sock.settimeout(10)
        sock.connect(peer.address)
        # 1 -> 3 -> 1 -> 2 -> 3: each hop a pickle between "processes" of different nodes.
        for hop, node in enumerate([3, 1, 2, 3, 1]):
            chunk = stream(b"cluster", total, 100_000 + hop)
            sock.sendall(chunk)
            sent.update(chunk)
            # Half of it read back before the handoff, the rest after (in the tail).
            got.update(recv_exact(sock, len(chunk) // 2))
            blob = pickle.dumps(sock)
            through(cluster, node)
            sock = pickle.loads(blob)
            got.update(recv_exact(sock, len(chunk) - len(chunk) // 2))
            total += len(chunk)
        sock.close()
    assert got.hexdigest() == sent.hexdigest()
    # The resumes through nodes 2 and 3 were forwarded to node 1, which held the socket.
    assert "of node 'n1' through this node" in cluster.node(3).log_text()
    assert "of node 'n1' through this node" in cluster.node(2).log_text()


def test_unix_links_between_the_workers_of_one_host(tmp_path: Path) -> None:
    """Node links over Unix sockets (no TLS, no framing): a handoff both ways, a half-close."""
    with running(tmp_path, size=2, unix_links=True) as cluster, Peer(echo) as peer:
        link = tmp_path / "link-n1.sock"
        assert link.stat().st_mode & 0o077 == 0  # the gateway's user's alone
        through(cluster, 1)
        sock = tsocket.socket()
        sock.settimeout(10)
        sock.connect(peer.address)
        for i, node in enumerate([2, 1, 2]):
            sock.sendall(b"hop %d" % i)
            blob = pickle.dumps(sock)
            through(cluster, node)
            sock = pickle.loads(blob)
            assert recv_exact(sock, 5) == b"hop %d" % i
        # A half-close passes through the link: the echo peer sees EOF and closes.
        sock.shutdown(tsocket.SHUT_WR)
        assert sock.recv(1) == b""
        sock.close()
        assert "unix:" in cluster.node(2).log_text().split("through this node (")[1][:6]


def test_a_forwarded_socket_reclaimed_idle_says_why(tmp_path: Path) -> None:
    """The owner reclaims an idle socket resumed through another node: the app is told why."""
    with running(tmp_path, size=2, gateway_extra="idle_timeout = 1") as cluster, \
            Peer(echo) as peer:
        through(cluster, 1)
        sock = tsocket.socket()
        sock.settimeout(10)
        sock.connect(peer.address)
        blob = pickle.dumps(sock)
        through(cluster, 2)
        sock = pickle.loads(blob)
        # Idle past 1 s: the owner's sweep resets it; the reset crosses the link as a
        # reset, and the reason comes from the owner through node 2.
        with pytest.raises(ConnectionResetError, match="reclaimed by the gateway"):
            sock.recv(1)
        sock.close()
