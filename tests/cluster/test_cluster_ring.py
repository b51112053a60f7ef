"""A 100-handoff ring across three nodes under load, every byte once and in order.

One socket is passed node 1 -> 2 -> 3 -> 1 ... (a pickle each time, resumed
through the next node, so most resumes are forwarded over a node link, and
Detach requests too) while a stdlib peer streams a deterministic byte stream
at it and checks the one that comes back; meanwhile one load process per
node opens, uses and closes sockets through that node.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from clustersupport import Cluster, running
from support import Peer, stream, use_gateway
from tcpservers import echo, serving

import tether.socket as tsocket
from tether.client import control
from tether.client import settings as client_settings

HOPS = 100
UP_CHUNK = 64 * 1024  # the app sends this much per hop
DOWN_TOTAL = 8 * 1024 * 1024  # the peer's stream
DOWN_SEED = b"ring peer->app"
UP_SEED = b"ring app->peer"

# A load process: connect, echo 1 KiB, close, until told to stop (stdin closes) or 2,000 done.
LOAD = """
import sys, threading, tether, socket
tether.install()
port = int(sys.argv[1])
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
n = 0
while not done.is_set() and n < 2000:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"x" * 1024)
        got = 0
        while got < 1024:
            got += len(s.recv(4096))
    n += 1
print(n)
"""


@pytest.fixture(autouse=True)
def _client_settings() -> Iterator[None]:
    yield
    client_settings.configure(None)
    control.close_all()


def ring_peer(conn: object) -> tuple[str, str, int]:
    """Send DOWN_TOTAL bytes while reading until EOF; (sha256 sent, sha256 received, bytes)."""
    import socket as _s

    assert isinstance(conn, _s.socket)
    sent = hashlib.sha256()
    got = hashlib.sha256()
    count = [0]

    def reader() -> None:
        while data := conn.recv(256 * 1024):
            got.update(data)
            count[0] += len(data)

    t = threading.Thread(target=reader)
    t.start()
    for offset in range(0, DOWN_TOTAL, 256 * 1024):
        chunk = stream(DOWN_SEED, offset, min(256 * 1024, DOWN_TOTAL - offset))
        sent.update(chunk)
        conn.sendall(chunk)
    t.join(60)
    return sent.hexdigest(), got.hexdigest(), count[0]


def load(cluster: Cluster, i: int, port: int) -> subprocess.Popen[str]:
    node = cluster.node(i)
    env = {**os.environ, "TETHER_GATEWAY": node.address, "TETHER_APP": node.app,
           "TETHER_KEY": node.key}
    return subprocess.Popen([sys.executable, "-c", LOAD, str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_a_hundred_handoffs_round_three_nodes_under_load(tmp_path: Path) -> None:
    with (
        running(tmp_path) as cluster,
        Peer(ring_peer, timeout=60) as peer,
        serving(echo) as load_server,
    ):
        loaders = [load(cluster, i, load_server.port) for i in (1, 2, 3)]
        try:
            up = hashlib.sha256()
            down = hashlib.sha256()
            received = 0
            node = cluster.node(1)
            use_gateway(node.address, node.app, node.key)
            sock = tsocket.socket()
            sock.settimeout(30)
            sock.connect(peer.address)
            for hop in range(HOPS):
                chunk = stream(UP_SEED, hop * UP_CHUNK, UP_CHUNK)
                sock.sendall(chunk)
                up.update(chunk)
                data = sock.recv(UP_CHUNK)
                down.update(data)
                received += len(data)
                blob = pickle.dumps(sock)  # the unread rest travels in the pickle
                node = cluster.node((hop + 1) % 3 + 1)
                use_gateway(node.address, node.app, node.key)
                sock = pickle.loads(blob)
            while received < DOWN_TOTAL:
                data = sock.recv(256 * 1024)
                assert data, f"EOF after {received} of {DOWN_TOTAL} bytes"
                down.update(data)
                received += len(data)
            sock.shutdown(tsocket.SHUT_WR)
            assert sock.recv(1) == b""
            sock.close()
        finally:
            counts = []
            for proc in loaders:
                out, err = proc.communicate("", timeout=60)
                assert proc.returncode == 0, err
                counts.append(int(out))
    sent_down, got_up, up_bytes = peer.result
    assert received == DOWN_TOTAL and down.hexdigest() == sent_down
    assert up_bytes == HOPS * UP_CHUNK and got_up == up.hexdigest()
    assert all(n > 0 for n in counts), counts  # each node carried load meanwhile
    # Most resumes went through a node that did not hold the socket.
    forwarded = sum(c.log_text().count("through this node") for c in cluster.nodes)
    assert forwarded >= HOPS * 2 // 3 - 1, forwarded
