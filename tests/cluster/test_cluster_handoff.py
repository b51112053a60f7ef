"""Handoff across nodes: a socket opened through one node, resumed through another.

Three `tether serve` processes on loopback share the machine's Redis under
a prefix of this test's own; the app's stream to the resuming node is
forwarded to the owner over a mutual-TLS node link.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterator

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
