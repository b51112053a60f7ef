"""A cluster losing a node, a forged handoff, the cluster-wide socket listing.

Each test starts its own 3-node cluster (separate `tether serve` processes on
loopback, the machine's Redis under a prefix of the test's own, deleted after).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import pickle
import re
import secrets
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pg8000.native
import pytest
import trustme
from clustersupport import Cluster, running
from support import (
    Peer,
    StdSocket,
    echo,
    recv_exact,
    require_service,
    stream,
    tether_cli,
    use_gateway,
    wait_for,
)
from tcpservers import echo as echo_h
from tcpservers import serving

import tether.socket as tsocket
from tether.client import control
from tether.client import handoff as client_handoff
from tether.client import settings as client_settings
from tether.cluster.link import Deframer, frame
from tether.cluster.signing import INCARNATION_BYTES
from tether.errors import NodeGone
from tether.wire import NEED_DATA, Connection, Role, encode_frame, pb

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(autouse=True)
def _client_settings() -> Iterator[None]:
    yield
    client_settings.configure(None)
    control.close_all()


def through(cluster: Cluster, i: int, app: str | None = None, key: str | None = None) -> None:
    node = cluster.node(i)
    use_gateway(node.address, app or node.app, key or node.key)


def open_on(cluster: Cluster, i: int, peer: Peer) -> tsocket.socket:
    through(cluster, i)
    sock = tsocket.socket()
    sock.settimeout(10)
    sock.connect(peer.address)
    return sock


def test_a_killed_nodes_sockets_fail_at_once_and_the_others_live_on(tmp_path: Path) -> None:
    with running(tmp_path) as cluster, Peer(echo) as p1, Peer(echo) as p2, Peer(echo) as p3:
        held = {i: open_on(cluster, i, peer) for i, peer in ((1, p1), (2, p2), (3, p3))}
        # Node 2's socket is handed off (waiting in node 2 for its resume), the others too.
        blobs = {i: pickle.dumps(sock) for i, sock in held.items()}
        cluster.kill(2)
        # Through node 3 (its heartbeat key may still be there: the link is refused at once).
        through(cluster, 3)
        with pytest.raises(NodeGone, match="node 'n2' has left the cluster") as caught:
            pickle.loads(blobs[2])
        # At once: its link was refused (or closed unanswered), no timeout or TTL waited out.
        assert re.search(r"Connection refused|closed before it answered", str(caught.value))
        assert caught.value.node == "n2"
        # Once its heartbeat key has expired the answer says so, still at once.
        assert cluster.wait_gone("n2")
        with pytest.raises(NodeGone, match="no heartbeat"):
            pickle.loads(blobs[2])
        # The other nodes' sockets are untouched, resumed across nodes.
        for i, blob in ((1, blobs[1]), (3, blobs[3])):
            through(cluster, 4 - i)  # node 1's through node 3, node 3's through node 1
            sock = pickle.loads(blob)
            sock.sendall(b"still here %d" % i)
            assert recv_exact(sock, 12) == b"still here %d" % i
            sock.close()


def test_a_restarted_nodes_old_handoffs_are_node_gone(tmp_path: Path) -> None:
    """Node 2 killed and started again under the same id: a handoff of its previous life
    is NODE_GONE (its socket died with that process) wherever it is resumed, never
    "no socket"; the restarted node serves new sockets."""
    with running(tmp_path) as cluster, Peer(echo) as old, Peer(echo) as new:
        blob = pickle.dumps(open_on(cluster, 2, old))
        cluster.restart(2)
        for i in (2, 3, 1):  # at the restarted node itself, and forwarded to it
            through(cluster, i)
            with pytest.raises(NodeGone, match=r"node 'n2' .*restarted since the handoff"):
                pickle.loads(blob)
        sock = open_on(cluster, 2, new)
        through(cluster, 3)
        sock = pickle.loads(pickle.dumps(sock))
        sock.sendall(b"new life")
        assert recv_exact(sock, 8) == b"new life"
        sock.close()


def test_a_forged_handoff_is_refused_without_a_lookup(tmp_path: Path) -> None:
    with running(tmp_path, size=3) as cluster, Peer(echo) as peer:
        sock = open_on(cluster, 1, peer)
        state = client_handoff.hand_off(sock)
        assert state.node == "n1" and len(state.signature) == INCARNATION_BYTES + 32
        through(cluster, 2)
        forged = [
            dataclasses.replace(state, node="n2"),  # pointed at another node
            dataclasses.replace(state, signature=bytes(INCARNATION_BYTES + 32)),
            # Another life of node 1 (the MAC is of this one).
            dataclasses.replace(state, signature=bytes(INCARNATION_BYTES)
                                + state.signature[INCARNATION_BYTES:]),
            # Another first character (the same one would be no change at all).
            dataclasses.replace(state, token=("B" if state.token[0] == "A" else "A")
                                + state.token[1:]),
        ]
        for bad in forged:
            with pytest.raises(PermissionError, match="does not carry this cluster's signature"):
                client_handoff.resume(bad)
        assert "signature that does not match" in cluster.node(2).log_text()
        # The genuine one still works, once.
        resumed = client_handoff.resume(state)
        resumed.sendall(b"ping")
        assert recv_exact(resumed, 4) == b"ping"
        # Once, wherever the resumes arrive: again through node 2, through node 3
        # (forwarded too), and at the owner itself.
        for node in (2, 3, 1):
            through(cluster, node)
            with pytest.raises(OSError, match="already resumed"):
                client_handoff.resume(state)
        resumed.close()


def test_the_admin_listing_shows_every_nodes_sockets_with_their_node(tmp_path: Path) -> None:
    admin_key = "admin-key-for-the-cluster-test"
    with running(tmp_path, gateway_extra=f'admin_key = "{admin_key}"') as cluster, \
            Peer(echo) as p1, Peer(echo) as p3:
        s1 = open_on(cluster, 1, p1)
        s3 = open_on(cluster, 3, p3)
        through(cluster, 2, "*", admin_key)
        listing = control.channel(client_settings.current()).request(
            pb.Request(list_sockets=pb.ListSockets())
        ).sockets.sockets
        where = {(info.node, info.peer.port) for info in listing}
        assert where == {("n1", p1.port), ("n3", p3.port)}
        # An app sees its own, on every node, also with the node named.
        through(cluster, 2)
        own = control.channel(client_settings.current()).request(
            pb.Request(list_sockets=pb.ListSockets())
        ).sockets.sockets
        assert {(i.node, i.app) for i in own} == {("n1", "tests"), ("n3", "tests")}
        # `tether sockets` with the admin key, through node 2: a NODE column.
        key_file = tmp_path / "admin.key"
        key_file.write_text(admin_key)
        shown = tether_cli("sockets", "--gateway", cluster.node(2).address,
                           "--admin-key-file", str(key_file))
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0].split()[-1] == "NODE"
        assert sorted(line.split()[-1] for line in lines[1:]) == ["n1", "n3"]
        s1.close()
        s3.close()


def test_tether_usage_adds_up_every_node(tmp_path: Path) -> None:
    """Nodes sharing one [usage] url (PostgreSQL): `tether usage` sees the whole cluster."""
    require_service(5432, "PostgreSQL")
    schema = f"cluster_test_{secrets.token_hex(4)}"
    usage = f'\n[usage]\nurl = "{PG_URL}"\nschema = "{schema}"\nflush_interval = 1\n'
    try:
        with running(tmp_path, size=2, config_extra=usage) as cluster, serving(echo_h) as server:
            for i, size in ((1, 1000), (2, 2345)):
                through(cluster, i)
                with tsocket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                    sock.sendall(b"u" * size)
                    assert recv_exact(sock, size) == b"u" * size

            def totals(*extra: str) -> list[dict[str, Any]]:
                shown = tether_cli("usage", "--ledger", PG_URL, "--schema", schema, "--json",
                                   *extra)
                assert shown.returncode == 0, shown.stderr
                return [json.loads(line) for line in shown.stdout.splitlines()]

            # Flushed within a second or two (flush_interval 1): both nodes' rows, added up.
            assert wait_for(lambda: [r["bytes_out"] for r in totals()] == [3345], timeout=20), (
                totals())
            assert [r["bytes_out"] for r in totals("--node", "n2")] == [2345]
    finally:
        db = pg8000.native.Connection("postgres", host="127.0.0.1", port=5432, database="test")
        try:
            db.run(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            db.close()


def test_only_nodes_may_open_links(tmp_path: Path) -> None:
    """The link listener wants a certificate of the cluster's CA; anything else gets nothing."""
    with running(tmp_path, size=1) as cluster:
        node = cluster.node(1)
        found = re.search(r"links on (\S+):(\d+)", node.log_text())
        assert found is not None
        address = (found.group(1), int(found.group(2)))
        hello = (b"TTHR" + encode_frame(pb.ClientHello(protocol_version=1, app="tests"))
                 + encode_frame(pb.Request(id=1, list_sockets=pb.ListSockets())))
        # In clear: not TLS, so no answer but the end of the stream.
        with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as plain:
            plain.settimeout(10)
            plain.connect(address)
            plain.sendall(hello)
            reply = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := plain.recv(4096):
                    reply += chunk
            # Nothing, or a TLS alert record (type 21): never a Tether answer.
            assert reply == b"" or reply[0] == 21, reply
        # TLS with a certificate of another CA (and with none): the handshake fails.
        other = trustme.CA()
        for client_cert in (other.issue_cert("tether-node"), None):
            ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
            ctx.check_hostname = False
            if client_cert is not None:
                client_cert.configure_cert(ctx)
            with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as raw:
                raw.settimeout(10)
                raw.connect(address)
                with (
                    pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)),
                    ctx.wrap_socket(raw) as tls,
                ):
                    tls.sendall(hello)
                    # TLS 1.3: the server's refusal of our certificate arrives after
                    # the client's side of the handshake is done; reading shows it.
                    if not tls.recv(100):
                        raise ConnectionResetError("closed without an answer")
        # A node's own certificate does get an answer: the same request on a real link.
        ours = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        ours.check_hostname = False
        ours.load_cert_chain(str(tmp_path / "node.pem"), str(tmp_path / "node.key"))
        with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as raw:
            raw.settimeout(10)
            raw.connect(address)
            with ours.wrap_socket(raw) as tls:
                tls.sendall(frame(hello))  # a TLS link carries link frames
                wire, deframer = Connection(Role.CLIENT), Deframer()
                wire.send(pb.ClientHello(protocol_version=1, app="tests"))
                wire.send(pb.Request(id=1, list_sockets=pb.ListSockets()))
                events: list[object] = []
                while not any(isinstance(e, pb.Response) for e in events):
                    for chunk in deframer.feed(tls.recv(4096)):
                        wire.receive_data(chunk or b"")
                    while (event := wire.next_event()) is not NEED_DATA:
                        events.append(event)
                assert isinstance(events[0], pb.ServerHello) and not events[0].HasField("error")


# A transfer a drain lets finish: 4 MiB, many reads through the relay.
TRANSFER = 4 * 1024 * 1024


def transfer_source(conn: socket.socket) -> str:
    """A peer that sends TRANSFER bytes once told to go (one byte); their sha256."""
    conn.recv(1)  # go
    digest = hashlib.sha256()
    for offset in range(0, TRANSFER, 256 * 1024):
        chunk = stream(b"drain", offset, min(256 * 1024, TRANSFER - offset))
        digest.update(chunk)
        conn.sendall(chunk)
    return digest.hexdigest()


def transfer(sock: tsocket.socket) -> str:
    """Tell transfer_source to go and read all it sends: the sha256 of what came."""
    sock.sendall(b"g")
    digest = hashlib.sha256()
    got = 0
    while got < TRANSFER:
        data = sock.recv(256 * 1024)
        assert data, f"EOF after {got} of {TRANSFER} bytes"
        digest.update(data)
        got += len(data)
    return digest.hexdigest()


def test_a_draining_node_finishes_its_transfers_and_sends_new_work_elsewhere(
    tmp_path: Path,
) -> None:
    """SIGTERM on node 2: its live socket's transfer completes intact; new connects and
    resumes through it are refused (retry elsewhere), the cluster serves them."""
    with running(tmp_path, gateway_extra="drain_timeout = 60") as cluster, \
            Peer(transfer_source, timeout=60) as big, Peer(echo) as p1:
        held = open_on(cluster, 2, big)  # a live transfer on node 2
        elsewhere = open_on(cluster, 1, p1)
        blob = pickle.dumps(elsewhere)
        proc = cluster.node(2).process.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: "draining" in cluster.node(2).log_text())
        # New work through node 2 is refused, saying to go elsewhere.
        through(cluster, 2)
        with pytest.raises(ConnectionRefusedError, match="draining"):
            tsocket.create_connection(p1.address, timeout=10)
        with pytest.raises(ConnectionRefusedError, match="draining"):
            pickle.loads(blob)
        # The handoff was not spent by the refusal: node 3 resumes it.
        through(cluster, 3)
        resumed = pickle.loads(blob)
        resumed.sendall(b"moved")
        assert recv_exact(resumed, 5) == b"moved"
        resumed.close()
        # Node 2's own transfer finishes, every byte.
        digest = transfer(held)
        held.close()
        assert proc.wait(30) == 0  # its last socket closed: node 2 exits
    assert digest == big.result


def test_a_draining_node_waits_for_the_streams_it_forwards(tmp_path: Path) -> None:
    """Node 3 forwards node 1's socket (resumed through 3); SIGTERM node 3: it holds no
    socket of its own, yet its forwarded transfer finishes intact before it exits, and new
    work through it is refused (UNAVAILABLE: retry elsewhere)."""
    with running(tmp_path, gateway_extra="drain_timeout = 60") as cluster, \
            Peer(transfer_source, timeout=60) as big:
        blob = pickle.dumps(open_on(cluster, 1, big))
        through(cluster, 3)
        held = pickle.loads(blob)  # node 3 forwards the stream to node 1
        held.settimeout(30)
        assert "of node 'n1' through this node" in cluster.node(3).log_text()
        proc = cluster.node(3).process.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        assert wait_for(
            lambda: "draining: 0 sockets open, 1 streams forwarded" in cluster.node(3).log_text())
        with pytest.raises(ConnectionRefusedError, match="draining") as refused:
            # Refused before any dial: `big` sees no second connection.
            tsocket.create_connection(big.address, timeout=10)
        assert "retry on another gateway" in str(refused.value)
        digest = transfer(held)
        assert proc.poll() is None, "node 3 exited with the forwarded stream still open"
        held.close()
        assert proc.wait(30) == 0  # its last forwarded stream closed: node 3 exits
        assert "drained: every socket finished" in cluster.node(3).log_text()
    assert digest == big.result


def test_a_forwarded_stream_left_at_the_drains_end_is_cut_with_the_drain_reason(
    tmp_path: Path,
) -> None:
    """drain_timeout = 1 on node 3, which forwards node 1's socket: at the drain's end the
    stream is cut, and the app's recv() says the gateway drained (asked of node 3 as it
    answers its last questions)."""
    with running(tmp_path, gateway_extra="drain_timeout = 1") as cluster, Peer(echo) as p1:
        blob = pickle.dumps(open_on(cluster, 1, p1))
        through(cluster, 3)
        held = pickle.loads(blob)
        held.settimeout(60)
        held.sendall(b"x")
        assert recv_exact(held, 1) == b"x"
        proc = cluster.node(3).process.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        # Blocked in recv() through the drain: the reset comes at its end.
        with pytest.raises(ConnectionResetError) as reset:
            held.recv(1)
        assert "closed when the gateway drained: still open after 1 s (gateway.drain_timeout)" \
            in str(reset.value.strerror), reset.value.strerror
        held.close()
        assert proc.wait(30) == 0
