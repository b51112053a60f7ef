"""`tether serve --workers 2`: two gateway processes behind one port, under a supervisor.

Real processes on loopback: both workers take connections (their audit
lines name their node), a worker killed with SIGKILL is restarted while the
other keeps answering, SIGHUP reaches every worker, SIGTERM drains them all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import signal
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from served import Served
from support import (
    APP,
    Gateway,
    Peer,
    descriptor,
    gateway_config,
    list_sockets,
    recv_exact,
    stream,
    use_gateway,
)
from tcpservers import echo, serving, sink

import tether.socket as ts
from tether.client import control
from tether.client import settings as client_settings
from tether.config import Config, parse_config
from tether.errors import NodeGone
from tether.gateway.supervisor import (
    RESTART_FIRST,
    WorkerSpec,
    share,
    share_caps,
    worker_config,
)

MiB = 1024 * 1024
# Connections whose audit lines are looked at to see both workers: the kernel
# hashes each new connection to a worker, so 64 all landing on one worker
# has a chance of 2**-63.
SPREAD = 64
# Handoffs of each socket in the ring test: each resume reaches a worker the
# kernel picks, so about half are passed on to the worker holding the socket.
HANDOFFS = 100
# Resumes of a restarted worker's old handoff: each reaches a worker the kernel
# picks; all of them landing on one worker has a chance of 2**-15.
RESUMES_AFTER_RESTART = 16
_CONNECTED = re.compile(r"tether\.audit\[(\S+)\]: .*\"outcome\":\"connected\"")


@pytest.fixture(autouse=True)
def _reset_settings() -> Iterator[None]:
    yield
    control.close_all()
    client_settings.configure(None)


def start(tmp_path: Path, key: str, gateway: str = "", allow: list[str] | None = None) -> Served:
    config = tmp_path / "tether.toml"
    config.write_text(gateway_config(key, gateway=gateway, allow=allow))
    served = Served(config, "--listen", "127.0.0.1:0", "--workers", "2")
    use_gateway(served.address(workers=True), APP, key)
    return served


def nodes_connected(served: Served, after: int = 0) -> set[str]:
    """The nodes whose audit lines (from log line `after` on) record a connect."""
    return {m.group(1) for line in served.log[after:] if (m := _CONNECTED.search(line))}


def connect_until_both(served: Served, port: int, after: int = 0) -> set[str]:
    for _ in range(SPREAD):
        with ts.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"ping")
            assert recv_exact(sock, 4) == b"ping"
        if len(nodes_connected(served, after)) == 2:
            break
    # The audit lines are written in batches: wait for them, bounded.
    served.wait_for(r"tether\.audit\[\S+-1\]: .*\"outcome\":\"connected\"", after=after)
    served.wait_for(r"tether\.audit\[\S+-0\]: .*\"outcome\":\"connected\"", after=after)
    return nodes_connected(served, after)


def worker_pid(served: Served, index: int, after: int = 0) -> int:
    found = served.wait_for(rf"worker {index} \(node (\S+), pid (\d+)\) listening", after=after)
    return int(found[0].group(2))


def test_both_workers_serve_and_a_killed_one_is_restarted(tmp_path: Path) -> None:
    served = start(tmp_path, "k-workers")
    try:
        base = socket.gethostname()
        with serving(echo) as server:
            assert connect_until_both(served, server.port) == {f"{base}-0", f"{base}-1"}
            victim = worker_pid(served, 0)
            survivor = worker_pid(served, 1)
            mark = len(served.log)
            os.kill(victim, signal.SIGKILL)
            served.wait_for(
                rf"worker 0 \(pid {victim}\) was killed by SIGKILL; restarting it in "
                rf"{RESTART_FIRST:g} s", after=mark,
            )
            # The other worker answers all the while (the kernel no longer
            # hashes connections to the dead worker's closed listener).
            for _ in range(8):
                with ts.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                    sock.sendall(b"alive")
                    assert recv_exact(sock, 5) == b"alive"
            restarted = worker_pid(served, 0, after=mark)
            assert restarted != victim
            assert worker_pid(served, 1) == survivor
            # The new worker 0 takes connections again.
            after = len(served.log)
            assert connect_until_both(served, server.port, after) == {f"{base}-0", f"{base}-1"}
        assert served.proc.poll() is None
    finally:
        assert served.stop() == 0


def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    key = "k-workers-hup"
    with serving(echo) as server:
        served = start(tmp_path, key, allow=[f"127.0.0.1:{server.port}"])
        try:
            with ts.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(b"x")
                assert recv_exact(sock, 1) == b"x"
            (tmp_path / "tether.toml").write_text(gateway_config(key, allow=[]))
            mark = len(served.log)
            served.signal(signal.SIGHUP)
            served.wait_for(r"SIGHUP: passed on to 2 workers", after=mark)
            reloaded = served.wait_for(r"tether\.gateway\[(\S+)\]: reloaded", count=2, after=mark)
            assert {m.group(1) for m in reloaded} == {
                f"{socket.gethostname()}-0", f"{socket.gethostname()}-1"}
            # Whichever worker a connect lands on, the new policy holds there.
            for _ in range(16):
                with pytest.raises(PermissionError, match="loopback"):
                    ts.create_connection(("127.0.0.1", server.port), timeout=30)
        finally:
            assert served.stop() == 0


def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    served = start(tmp_path, "k-workers-term", gateway="drain_timeout = 240")
    try:
        with serving(sink) as sink_server, serving(echo) as echo_server:
            live = ts.create_connection(("127.0.0.1", sink_server.port), timeout=30)
            mark = len(served.log)
            served.signal(signal.SIGTERM)
            served.wait_for(r"SIGTERM: passed on to 2 workers", after=mark)
            draining = served.wait_for(r"\]: draining: 1 sockets open", after=mark)
            # The idle worker has exited (its listener closed with it).
            served.wait_for(r"worker \d \(pid \d+\) exited with status 0", after=mark)
            assert draining
            # Only the draining worker listens: it refuses.
            with pytest.raises(ConnectionRefusedError, match=r"is draining.*retry on another"):
                ts.create_connection(("127.0.0.1", echo_server.port), timeout=30)
            data = stream(b"workers-drain", 0, 4 * MiB)
            live.sendall(data)
            live.shutdown(socket.SHUT_WR)
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = live.recv(4096)
                assert chunk, "the drained transfer was cut"
                answer += chunk
            assert answer.decode().split() == [str(len(data)), hashlib.sha256(data).hexdigest()]
            live.close()
            assert served.proc.wait(60) == 0
        served.wait_for(r"worker 0 \(pid \d+\) exited with status 0")
        served.wait_for(r"worker 1 \(pid \d+\) exited with status 0")
    finally:
        served.stop()


def test_workers_share_a_unix_listener(tmp_path: Path) -> None:
    path = tmp_path / "gw.sock"
    config = tmp_path / "tether.toml"
    config.write_text(gateway_config("k-workers-unix"))
    served = Served(config, "--listen", f"unix:{path}", "--workers", "2")
    try:
        served.wait_for(r"2 workers ready on unix:")
        use_gateway(f"unix:{path}", APP, "k-workers-unix")
        with serving(echo) as server:
            for _ in range(8):
                with ts.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                    sock.sendall(b"unix")
                    assert recv_exact(sock, 4) == b"unix"
    finally:
        assert served.stop() == 0
    # The supervisor removes the socket it bound; the workers did not unlink it under it.
    assert not path.exists()
    assert "cannot listen" not in served.text()


def _listing(served: Served, key: str) -> dict[str, str]:
    """The app's sockets, descriptor prefix -> the node (worker) holding it, from any worker."""
    gw = Gateway(process=None, address=served.address(workers=True), app=APP, key=key,
                 config_path=Path())  # type: ignore[arg-type]
    return {info.descriptor_prefix: info.node for info in list_sockets(gw)}


def _on_both_workers(served: Served, key: str, port: int) -> list[socket.socket]:
    """Tether sockets to `port`, opened until both workers hold one (bounded by SPREAD)."""
    socks = []
    for _ in range(SPREAD):
        socks.append(ts.create_connection(("127.0.0.1", port), timeout=30))
        if len(set(_listing(served, key).values())) == 2:
            return socks
    raise AssertionError(f"{SPREAD} sockets, all on one worker: {_listing(served, key)}")


@contextlib.contextmanager
def sockets_on_both_workers(tmp_path: Path, key: str) -> Iterator[tuple[Served, list[Any]]]:
    """Two workers and tether sockets to an echo peer, at least one held by each worker."""
    served = start(tmp_path, key)
    try:
        with serving(echo) as server:
            socks = _on_both_workers(served, key, server.port)
            yield served, socks
            for sock in socks:
                sock.close()
    finally:
        assert served.stop() == 0


def test_handoffs_across_workers_in_both_directions(tmp_path: Path) -> None:
    key = "k-workers-ring"
    with sockets_on_both_workers(tmp_path, key) as (served, socks):
        held = _listing(served, key)
        assert set(held.values()) == {f"{socket.gethostname()}-0", f"{socket.gethostname()}-1"}
        for n in range(len(socks)):
            sent = received = b""
            for i in range(HANDOFFS):
                chunk = stream(b"ring%d" % n, i * 1000, 1000)
                socks[n].sendall(chunk)
                sent += chunk
                received += recv_exact(socks[n], len(chunk))
                socks[n] = pickle.loads(pickle.dumps(socks[n]))
                # A new control stream each time: the kernel picks its worker.
                control.close_all()
            assert hashlib.sha256(received).digest() == hashlib.sha256(sent).digest()
        # Some resumes reached the worker that did not hold the socket and
        # were passed to the one that did (2**-HANDOFFS if none did).
        served.wait_for(r"its resume passed to \S+ \(same host\)")
        assert _listing(served, key) == held  # each socket still where it was opened


def test_unread_megabytes_survive_handoffs_across_workers(tmp_path: Path) -> None:
    """A tail of MiBs: the resume's stream carries it; passed on, more than one send holds."""
    key = "k-workers-tail"
    size = 6 * MiB
    data = stream(b"tail", 0, size)

    def peer(conn: socket.socket) -> None:
        conn.sendall(data)
        assert recv_exact(conn, 4) == b"done"

    served = start(tmp_path, key)
    try:
        with Peer(peer) as p:
            sock = ts.create_connection(("127.0.0.1", p.port), timeout=30)
            got = bytearray()
            # 24 handoffs: a resume reaches the other worker about half the
            # time (none of 24 doing so: 2**-24).
            for cut in (1, 65_536, 300_001, 1, 2_000_000, 7, *([1] * 9), *([50_000] * 9)):
                got += recv_exact(sock, cut)
                sock = pickle.loads(pickle.dumps(sock))  # MiBs unread travel with it
                control.close_all()
            got += recv_exact(sock, size - len(got))
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            sock.sendall(b"done")
            sock.close()
        served.wait_for(r"its resume passed to \S+ \(same host\)")
    finally:
        assert served.stop() == 0


def test_requests_reach_the_worker_holding_the_socket(tmp_path: Path) -> None:
    with sockets_on_both_workers(tmp_path, "k-workers-requests") as (_, socks):
        for sock in socks:
            for value in (1, 0, 1, 0, 1, 0):
                control.close_all()  # the next request on a new stream, any worker
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, value)
                control.close_all()
                assert bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)) is bool(
                    value)


def test_a_killed_workers_handed_off_socket_fails_at_once_the_others_live_on(
    tmp_path: Path,
) -> None:
    key = "k-workers-kill"
    with sockets_on_both_workers(tmp_path, key) as (served, socks):
        held = _listing(served, key)
        victim_node = f"{socket.gethostname()}-0"
        victims = [s for s in socks if held[descriptor(s)[:8]] == victim_node]
        others = [s for s in socks if held[descriptor(s)[:8]] != victim_node]
        blob = pickle.dumps(victims[0])
        mark = len(served.log)
        os.kill(worker_pid(served, 0), signal.SIGKILL)
        served.wait_for(r"worker 0 \(pid \d+\) was killed by SIGKILL", after=mark)
        # Its socket died with it: the resume is refused, whichever worker it
        # reaches (the owner's link is gone, or the restarted worker had it in
        # its previous life), never after a timeout.
        with pytest.raises(NodeGone, match=victim_node):
            pickle.loads(blob)
        for sock in others:
            sock.sendall(b"still here")
            assert recv_exact(sock, 10) == b"still here"
        # Once worker 0 is back (same node id), the handoff is still of a life
        # that is over: NODE_GONE at the restarted worker itself and when
        # worker 1 passes the stream there, never "no socket".
        worker_pid(served, 0, after=mark)
        after = len(served.log)
        for _ in range(RESUMES_AFTER_RESTART):
            control.close_all()  # a new stream: the kernel picks a worker each time
            with pytest.raises(NodeGone, match=rf"{victim_node}.*restarted since the handoff"):
                pickle.loads(blob)
        served.wait_for(rf"its resume passed to {victim_node}", after=after)  # through worker 1
        passed = sum(f"its resume passed to {victim_node}" in line for line in served.log[after:])
        assert passed < RESUMES_AFTER_RESTART  # and straight to the restarted worker 0


# -- the pure parts ----------------------------------------------------------------


def _config(text: str) -> Config:
    return parse_config(tomllib.loads(text))


@pytest.mark.parametrize(
    ("text", "count", "gateway_cap", "per_app", "app_cap"),
    [
        ("", 2, None, None, None),  # derived caps are per process already
        ("[gateway]\nmax_sockets = 100\nmax_sockets_per_app = 10\n", 2, 50, 5, None),
        ("[gateway]\nmax_sockets = 101\n", 2, 51, None, None),  # rounded up
        ("[gateway]\nmax_sockets = 1\n", 4, 1, None, None),  # never below 1
        ("[apps.a]\nkey = \"k\"\nmax_sockets = 9\n", 3, None, None, 3),
        ("[gateway]\nmax_sockets = 100\n", 1, 100, None, None),  # one worker: unchanged
    ],
)
def test_share_caps(
    text: str, count: int, gateway_cap: int | None, per_app: int | None, app_cap: int | None
) -> None:
    shared = share_caps(_config(text), count)
    assert shared.max_sockets == gateway_cap
    assert shared.max_sockets_per_app == per_app
    if "apps.a" in text:
        assert shared.apps["a"].max_sockets == app_cap
        assert shared.quota.limits("a").sockets == app_cap  # the same limit, as a quota


@pytest.mark.parametrize(("cluster", "expected"), [(False, 34), (True, 100)])
def test_quotas_are_shared_unless_a_cluster_counts_them(
    tmp_path: Path, cluster: bool, expected: int
) -> None:
    text = "[quota]\nconnects_per_minute = 100\n[apps.a]\nkey = \"k\"\n"
    config = _config(text)
    if cluster:
        from dataclasses import replace

        from tether.cluster.config import parse_cluster

        key = tmp_path / "cluster.key"
        key.write_text("k" * 32)
        config = replace(config, cluster=parse_cluster({
            "redis": "redis://127.0.0.1:6379/0", "link_listen": f"unix:{tmp_path}/l.sock",
            "key_file": str(key)}))
    assert share_caps(config, 3).quota.limits("a").connects_per_minute == expected


@pytest.mark.parametrize(("admin", "index", "expected"), [
    ("127.0.0.1:9464", 0, "127.0.0.1:9464"),
    ("127.0.0.1:9464", 2, "127.0.0.1:9466"),
    ("unix:/run/t/admin.sock", 1, "unix:/run/t/admin-1.sock"),
])
def test_each_worker_has_its_own_admin_listener(admin: str, index: int, expected: str) -> None:
    spec = WorkerSpec(index=index, count=3, base="h", runtime_dir="/run/t", supervisor=1,
                      proxies={"socks5_listen": ["127.0.0.1:41000"]})
    config = worker_config(_config(f'[gateway]\nadmin_listen = "{admin}"\n'), spec)
    assert str(config.admin_listen) == expected
    assert [str(e) for e in config.socks5_listen] == ["127.0.0.1:41000"]


@given(st.integers(min_value=1, max_value=10**12), st.integers(min_value=1, max_value=64))
def test_a_share_is_the_limit_over_n_rounded_up(limit: int, count: int) -> None:
    part = share(limit, count)
    assert part is not None and part >= 1
    # The workers together allow the limit, and at most count - 1 more.
    assert limit <= part * count < limit + count


@pytest.mark.parametrize(
    ("node", "signed_by", "refused"),
    [
        ("h-0", "h-0", None),  # this worker's own
        ("h-2", "h-2", None),  # a sibling's: passed there
        ("h-2", "h-0", "does not carry this gateway's signature"),  # node name changed
        ("h-7", "h-7", "names no worker of this gateway"),
        ("other-host", "other-host", "names no worker of this gateway"),
    ],
)
def test_a_resume_names_a_worker_signed_with_this_runs_key(
    node: str, signed_by: str, refused: str | None
) -> None:
    from tether.cluster import signing
    from tether.gateway.core.gateway import GatewayCore
    from tether.gateway.workerlink import WorkerLinks
    from tether.wire import pb

    spec = WorkerSpec(index=0, count=3, base="h", runtime_dir="/nonexistent", supervisor=1)
    key = b"k" * 32
    links = WorkerLinks(GatewayCore(parse_config({})), spec, key)
    handoff = pb.Handoff(token="t0k3n")
    links.sign_handoff(handoff, "d35cr1pt0r")
    assert handoff.node == "h-0"
    own = pb.Resume(descriptor="d35cr1pt0r", token="t0k3n", node="h-0",
                    signature=handoff.signature)
    assert signing.signed_in(key, own) == links.incarnation
    # Signed by `signed_by` in some life of it (a sibling's is not this worker's to know).
    made = pb.Handoff(token="t0k3n")
    signing.sign_handoff(key, signed_by, links.incarnation, made, "d35cr1pt0r")
    req = pb.Resume(descriptor="d35cr1pt0r", token="t0k3n", node=node, signature=made.signature)
    refusal = links.check_resume("tests", req)
    if refused is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.code == pb.Error.PERMISSION_DENIED
        assert refused in refusal.message


@pytest.mark.parametrize(
    ("node", "life", "gone"),
    [
        ("h-0", "now", False),  # this worker's own, this life
        ("h-0", "before", True),  # this worker's, before it was restarted
        ("h-2", "before", False),  # a sibling's, of whichever life: passed there to judge
    ],
)
def test_a_restarted_workers_old_handoff_is_node_gone(node: str, life: str, gone: bool) -> None:
    from tether.cluster import signing
    from tether.gateway.core.gateway import GatewayCore
    from tether.gateway.workerlink import WorkerLinks
    from tether.wire import pb

    spec = WorkerSpec(index=0, count=3, base="h", runtime_dir="/nonexistent", supervisor=1)
    key = b"k" * 32
    links = WorkerLinks(GatewayCore(parse_config({})), spec, key)
    before = WorkerLinks(GatewayCore(parse_config({})), spec, key).incarnation
    assert before != links.incarnation
    made = pb.Handoff(token="t0k3n")
    signing.sign_handoff(key, node, links.incarnation if life == "now" else before, made, "d")
    refusal = links.check_resume(
        "tests", pb.Resume(descriptor="d", token="t0k3n", node=node, signature=made.signature))
    if not gone:
        assert refusal is None
    else:
        assert refusal is not None and refusal.code == pb.Error.NODE_GONE
        assert "'h-0'" in refusal.message and "restarted since the handoff" in refusal.message


class _Exited:
    """A worker process that has exited with `status` (what reap() reads of a Popen)."""

    def __init__(self, pid: int, status: int) -> None:
        self.pid = pid
        self.returncode = status

    def poll(self) -> int:
        return self.returncode


def test_restarts_back_off_and_a_worker_that_ran_long_starts_over() -> None:
    from tether.gateway.supervisor import RESTART_MAX, RESTART_RESET, Supervisor

    now = [1000.0]
    sup = Supervisor(_config(""), 1, lambda endpoints, spec: [], clock=lambda: now[0])
    worker = sup.workers[0]
    delays = []
    for _ in range(9):  # dies at once, again and again
        worker.proc, worker.started = _Exited(7, 1), now[0]  # type: ignore[assignment]
        sup.reap()
        assert worker.proc is None and worker.restart_at is not None
        delays.append(worker.restart_at - now[0])
        now[0] = worker.restart_at
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, RESTART_MAX, RESTART_MAX, RESTART_MAX]
    # One that ran RESTART_RESET s before dying is restarted soon again.
    worker.proc, worker.started = _Exited(8, -9), now[0]  # type: ignore[assignment]
    now[0] += RESTART_RESET
    sup.reap()
    assert worker.restart_at == now[0] + RESTART_FIRST
    # Stopping: a worker that exits is not restarted.
    sup.stopping = signal.SIGTERM
    worker.proc, worker.restart_at = _Exited(9, 0), None  # type: ignore[assignment]
    sup.reap()
    assert worker.proc is None and worker.restart_at is None and sup.status == 0


@pytest.mark.parametrize("text", ["[gateway]\nworkers = 0\n", "[gateway]\nworkers = true\n"])
def test_bad_workers_count_names_the_key(text: str) -> None:
    from tether.errors import ConfigError

    with pytest.raises(ConfigError, match=r"gateway\.workers"):
        _config(text)


def test_worker_spec_round_trip_and_peers() -> None:
    spec = WorkerSpec(index=1, count=3, base="h", runtime_dir="/run/t", supervisor=42,
                      ready_fd=7, unix={"/run/gw.sock": 5},
                      proxies={"http_proxy_listen": ["127.0.0.1:3128", "unix:/run/p.sock"]})
    again = WorkerSpec.from_json(spec.to_json())
    assert again == spec
    assert json.loads(spec.to_json())["unix"] == {"/run/gw.sock": 5}
    assert spec.node_id == "h-1"
    assert spec.peers == {"h-0": "/run/t/worker-0.sock", "h-2": "/run/t/worker-2.sock"}


def test_workers_config_key() -> None:
    assert _config("[gateway]\nworkers = 3\n").workers == 3
    assert _config("").workers == 1


def test_a_worker_that_does_not_exit_after_the_drain_is_killed(tmp_path: Path) -> None:
    """The supervisor waits drain_timeout + STOP_SLACK for its workers, then kills them."""
    from tether.gateway.supervisor import STOP_SLACK

    served = start(tmp_path, "k-workers-stuck", gateway="drain_timeout = 0")
    try:
        stuck = worker_pid(served, 1)
        os.kill(stuck, signal.SIGSTOP)  # it cannot act on the SIGTERM
        mark = len(served.log)
        served.signal(signal.SIGTERM)
        served.wait_for(rf"workers still running {STOP_SLACK:g} s after the drain: killing them",
                        after=mark, timeout=STOP_SLACK + 60)
        served.wait_for(rf"worker 1 \(pid {stuck}\) was killed by SIGKILL", after=mark)
        assert served.proc.wait(60) == 1  # not a clean stop
    finally:
        served.stop()


def test_bad_workers_flag(tmp_path: Path) -> None:
    from support import run_module

    result = run_module("tether.gateway", "--workers", "0", timeout=60)
    assert result.returncode == 2
    assert "--workers" in result.stderr and "1 or more" in result.stderr
