"""Socket handoff between processes, through the session's real gateway process.

* A ring of worker processes (multiprocessing, 'spawn': fresh interpreters,
  each installing tether with its own credentials) passes one live socket
  around hundreds of times while a stdlib peer in this process streams a
  deterministic byte stream at it and checks the one that comes back: every
  byte exactly once, in order, both ways, sha256 equal at both ends.
* Protocol clients (poplib, smtplib) opened in one process and continued in
  another, including bytes left in the client's buffered reader.
* A holder killed with SIGKILL mid-stream, and one killed between Detach and
  producing its payload.
* The worked example in examples/handoff_smtp, end to end.

Nothing here talks to anything but loopback; every process started here is
stopped here, by its own handle.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import pickle
import poplib
import queue
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest
from support import Gateway, StdSocket, list_sockets, recv_exact, require_service, stream, wait_for

from tether.demo.servers import MAILBOX_MESSAGE, PASSWORD, USER, POP3Server, SMTPServer

MiB = 1024 * 1024
TIMEOUT = 30.0  # any single wait in this module; the whole ring takes a few seconds
CTX = multiprocessing.get_context("spawn")
ROOT = Path(__file__).resolve().parents[2]

# The ring: >= 32 MiB each way, >= 200 handoffs between 3 processes.
RING_TOTAL = 32 * MiB
RING_MIN_HOPS = 200
RING_WORKERS = 3
DOWN_SEED = b"peer->app"
UP_SEED = b"app->peer"


def stream_sha256(seed: bytes, total: int) -> str:
    h = hashlib.sha256()
    for offset in range(0, total, 4 * MiB):
        h.update(stream(seed, offset, min(4 * MiB, total - offset)))
    return h.hexdigest()


def first_difference(got: bytes, want: bytes) -> int:
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return i
    return min(len(got), len(want))


def listener(host: str = "127.0.0.1") -> socket.socket:
    sock = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(8)
    sock.settimeout(TIMEOUT)
    return sock


def stop_processes(processes: list[Any]) -> None:
    """Join every process this test started; kill (by its own handle) what hangs."""
    for p in processes:
        p.join(TIMEOUT)
        if p.is_alive():
            p.kill()
            p.join(5)


# -- the ring -------------------------------------------------------------------


def _ring_plan(hop: int) -> tuple[int, int]:
    """(bytes to read, bytes to write) at `hop`: uneven, sometimes none at all.

    The mean is RING_TOTAL / 210 per direction, so both directions end near
    hop 210; a hop that reads nothing hands off a socket whose unread bytes
    have piled up, one that reads 1 byte hands off almost all of them.
    """
    import random

    rng = random.Random(hop)
    mean = RING_TOTAL // 210
    kind = rng.random()
    if kind < 0.08:
        read = 0
    elif kind < 0.14:
        read = 1
    else:
        read = rng.randint(1, 2 * mean)
    write = 0 if rng.random() < 0.08 else rng.randint(1, 2 * mean)
    return read, write


def ring_worker(
    index: int,
    address: str,
    app: str,
    key: str,
    inboxes: list[Any],
    results: Any,
) -> None:
    """One holder: resume, read some, write some, pickle, pass to the next worker."""
    import tether

    tether.install(gateway=address, app=app, key=key)  # this process's own credentials
    inbox, outbox = inboxes[index], inboxes[(index + 1) % len(inboxes)]
    try:
        while True:
            msg = inbox.get(timeout=TIMEOUT)
            if msg[0] == "stop":
                return
            if msg[0] == "start":
                sock = socket.create_connection(("127.0.0.1", msg[1]), timeout=TIMEOUT)
                hop, down, up = 0, 0, 0
            else:
                _, hop, payload, down, up = msg
                sock = pickle.loads(payload)
            want_read, want_write = _ring_plan(hop)
            nread = min(want_read, RING_TOTAL - down)
            nwrite = min(want_write, RING_TOTAL - up)
            data = recv_exact(sock, nread)
            _check_down(hop, down, data)
            results.put(("down", hop, down, data))
            sock.sendall(stream(UP_SEED, up, nwrite))
            down, up, hop = down + nread, up + nwrite, hop + 1
            if down == RING_TOTAL and up == RING_TOTAL and hop >= RING_MIN_HOPS:
                _finish(sock)
                results.put(("done", hop, os.getpid()))
                continue
            # Both picklers, alternately: pickle's and multiprocessing's.
            payload = pickle.dumps(sock) if hop % 2 else bytes(ForkingPickler.dumps(sock))
            _check_moved(sock)
            results.put(("hop", hop, os.getpid(), len(payload)))
            outbox.put(("hop", hop, payload, down, up))
    except BaseException:
        results.put(("error", index, traceback.format_exc()))


def _check_down(hop: int, offset: int, data: bytes) -> None:
    expected = stream(DOWN_SEED, offset, len(data))
    if data != expected:
        at = offset + first_difference(data, expected)
        raise AssertionError(f"hop {hop}: downstream differs at byte {at}")


def _finish(sock: socket.socket) -> None:
    """The last holder: the peer's EOF must come next (exactly once), then ours."""
    if sock.recv(1) != b"":
        raise AssertionError("bytes after the end of the downstream")
    sock.shutdown(socket.SHUT_WR)
    sock.close()


def _check_moved(sock: socket.socket) -> None:
    try:
        sock.send(b"!")
    except OSError as exc:
        if "handed off" not in str(exc):
            raise
    else:
        raise AssertionError("the pickled socket still sends")


class RingPeer:
    """The remote end: streams DOWN_SEED at the app and checks UP_SEED coming back."""

    def __init__(self) -> None:
        self.listener = listener()
        self.port: int = self.listener.getsockname()[1]
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.received_bytes = 0
        self.mismatch: int | None = None
        self.errors: list[str] = []
        self.eof = threading.Event()
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.listener:
                conn, _ = self.listener.accept()
            self.conn = conn
            conn.settimeout(TIMEOUT)
            sender = threading.Thread(target=self._send, args=(conn,), daemon=True)
            sender.start()
            self._receive(conn)
            sender.join(TIMEOUT)
        except BaseException:
            self.errors.append(traceback.format_exc())

    def _send(self, conn: socket.socket) -> None:
        try:
            for offset in range(0, RING_TOTAL, 64 * 1024):
                chunk = stream(DOWN_SEED, offset, min(64 * 1024, RING_TOTAL - offset))
                conn.sendall(chunk)
                self.sent.update(chunk)
            conn.shutdown(socket.SHUT_WR)
        except BaseException:
            self.errors.append(traceback.format_exc())

    def _receive(self, conn: socket.socket) -> None:
        while True:
            chunk = conn.recv(256 * 1024)
            if not chunk:
                break
            want = stream(UP_SEED, self.received_bytes, len(chunk))
            if chunk != want and self.mismatch is None:
                self.mismatch = self.received_bytes + first_difference(chunk, want)
            self.received.update(chunk)
            self.received_bytes += len(chunk)
            if self.received_bytes > RING_TOTAL:
                break
        self.eof.set()

    def close(self) -> None:
        self.listener.close()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
        self.thread.join(TIMEOUT)
        if self.conn is not None:
            self.conn.close()


def _log_tail(gateway: Gateway, lines: int = 15) -> str:
    return "\n".join([line for line in gateway.process.log if "decision" not in line][-lines:])


def test_ring_of_processes_bidirectional_stream(gateway: Gateway) -> None:
    """>= 32 MiB each way, >= 200 handoffs among 3 processes, every byte once and in order."""
    peer = RingPeer()
    inboxes = [CTX.Queue() for _ in range(RING_WORKERS)]
    results = CTX.Queue()
    workers = [
        CTX.Process(
            target=ring_worker,
            args=(i, gateway.address, gateway.app, gateway.key, inboxes, results),
            daemon=True,
        )
        for i in range(RING_WORKERS)
    ]
    for w in workers:
        w.start()
    chunks: dict[int, tuple[int, bytes]] = {}
    holders: dict[int, int] = {}
    payload_sizes: list[int] = []
    done: tuple[Any, ...] | None = None
    started = time.monotonic()
    try:
        inboxes[0].put(("start", peer.port))
        while done is None:
            try:
                msg = results.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(
                    f"the ring stalled after {len(holders)} handoffs; peer errors: {peer.errors}"
                ) from None
            if msg[0] == "error":
                raise AssertionError(
                    f"worker {msg[1]} failed after {len(holders)} handoffs:\n{msg[2]}\n"
                    f"gateway log:\n{_log_tail(gateway)}"
                )
            if msg[0] == "down":
                chunks[msg[1]] = (msg[2], msg[3])
            elif msg[0] == "hop":
                holders[msg[1]] = msg[2]
                payload_sizes.append(msg[3])
            else:
                done = msg
        assert peer.eof.wait(TIMEOUT), "the app's EOF never reached the peer"
    finally:
        for box in inboxes:
            box.put(("stop",))
        stop_processes(workers)
        peer.close()
        for q in [*inboxes, results]:
            q.close()
            q.join_thread()
    elapsed = time.monotonic() - started
    assert not peer.errors, peer.errors

    # Downstream: the holders' pieces tile the stream exactly, in hop order.
    offset, whole = 0, hashlib.sha256()
    for hop in sorted(chunks):
        at, data = chunks[hop]
        assert at == offset, f"hop {hop} read from byte {at}, expected {offset}"
        whole.update(data)
        offset += len(data)
    assert offset == RING_TOTAL
    assert whole.hexdigest() == peer.sent.hexdigest() == stream_sha256(DOWN_SEED, RING_TOTAL)

    # Upstream: the peer got exactly what the holders wrote, in order.
    assert peer.mismatch is None, f"upstream differs at byte {peer.mismatch}"
    assert peer.received_bytes == RING_TOTAL
    assert peer.received.hexdigest() == stream_sha256(UP_SEED, RING_TOTAL)

    hops = done[1]
    assert hops >= RING_MIN_HOPS
    assert len(holders) == hops - 1  # every hop but the last handed off
    assert len(set(holders.values())) == RING_WORKERS
    print(
        f"ring: {hops} holders, {len(holders)} handoffs, 2 x {RING_TOTAL >> 20} MiB in "
        f"{elapsed:.1f} s; payload max {max(payload_sizes) >> 10} KiB, "
        f"mean {sum(payload_sizes) // len(payload_sizes) >> 10} KiB"
    )


# -- protocol clients across processes ------------------------------------------


def _install(address: str, app: str, key: str) -> None:
    import tether

    tether.install(gateway=address, app=app, key=key)


def pop3_worker(address: str, app: str, key: str, payload: bytes, out: Any) -> None:
    try:
        _install(address, app, key)
        client = pickle.loads(payload)
        noop = client._getresp()  # the reply left in the producer's reader buffer
        _, lines, _ = client.retr(1)
        client.quit()
        out.put(("ok", noop, b"\r\n".join(lines) + b"\r\n"))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def smtp_worker(address: str, app: str, key: str, payload: bytes, out: Any) -> None:
    try:
        _install(address, app, key)
        client = pickle.loads(payload)
        reply = client.getreply()  # RSET's reply, carried in the payload
        refused = client.sendmail(
            "producer@mail.test", ["worker@mail.test"],
            f"Subject: continued in process {os.getpid()}\r\n\r\nhello\r\n".encode(),
        )
        client.quit()
        out.put(("ok", reply[0], refused))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def _run_worker(target: Callable[..., None], gateway: Gateway, payload: bytes) -> tuple[Any, ...]:
    out = CTX.Queue()
    proc = CTX.Process(
        target=target, args=(gateway.address, gateway.app, gateway.key, payload, out)
    )
    proc.start()
    try:
        result = out.get(timeout=TIMEOUT)
    finally:
        stop_processes([proc])
        out.close()
        out.join_thread()
    assert result[0] == "ok", result[1]
    assert proc.exitcode == 0
    return result


def _wait_two_lines(sock: socket.socket) -> None:
    deadline = time.monotonic() + TIMEOUT
    while sock.recv(256, socket.MSG_PEEK).count(b"\r\n") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_pop3_continued_in_another_process(
    pop3_server: POP3Server, tethered: Gateway
) -> None:
    from tether.client import handoff

    client = poplib.POP3("127.0.0.1", pop3_server.address[1], timeout=TIMEOUT)
    client.user(USER)
    client.pass_(PASSWORD)
    client._putcmd("STAT")
    client._putcmd("NOOP")
    _wait_two_lines(client.sock)
    assert client._getresp().startswith(b"+OK 1 ")
    assert client.file.peek() == b"+OK\r\n"  # NOOP's reply: in the reader, not the kernel
    payload = handoff.dumps(client)
    client.file.close()
    _, noop, message = _run_worker(pop3_worker, tethered, payload)
    assert noop == b"+OK"
    assert message == MAILBOX_MESSAGE


def test_smtp_continued_in_another_process(
    smtp_server: SMTPServer, tethered: Gateway
) -> None:
    from tether.client import handoff

    before = len(smtp_server.messages)
    client = smtplib.SMTP("mail.test", smtp_server.address[1], timeout=TIMEOUT)
    client.ehlo("producer.test")
    client.putcmd("noop")
    client.putcmd("rset")
    assert client.sock is not None
    _wait_two_lines(client.sock)
    assert client.getreply()[0] == 250
    payload = handoff.dumps(client)
    assert client.file is not None
    client.file.close()
    _, code, refused = _run_worker(smtp_worker, tethered, payload)
    assert (code, refused) == (250, {})
    got = smtp_server.wait_for_messages(before + 1)[before]
    assert got.helo == "producer.test"  # the producer's EHLO: one SMTP session
    assert got.rcpt_tos == ("worker@mail.test",)


# -- holders that die ---------------------------------------------------------------


KILLED_HOLDER = """
import hashlib, os, pickle, socket, sys, tether
tether.install(gateway=sys.argv[1], app=sys.argv[2], key=sys.argv[3])
sock = socket.create_connection(("127.0.0.1", int(sys.argv[4])), timeout=30)
sock = pickle.loads(pickle.dumps(sock))  # one handoff: its payload is stale from now
stale = pickle.dumps(sock)
sock = pickle.loads(stale)
sys.stdout.buffer.write(stale.hex().encode() + b"\\n")
sys.stdout.flush()
k = 0
while True:  # write a numbered stream (64 KiB blocks) and read, until killed
    sock.sendall(hashlib.shake_128(b"killed" + k.to_bytes(8, "big")).digest(65536))
    sock.recv(65536)
    k += 1
"""


def test_holder_killed_mid_stream(gateway: Gateway) -> None:
    """SIGKILL: the peer sees a clean prefix then EOF; nobody can resume the socket."""
    lst = listener()
    port = lst.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_HOLDER, gateway.address, gateway.app, gateway.key,
         str(port)],
        stdout=subprocess.PIPE,
    )
    conn: socket.socket | None = None
    try:
        conn, _ = lst.accept()
        conn.settimeout(TIMEOUT)
        assert proc.stdout is not None
        stale = bytes.fromhex(proc.stdout.readline().decode())
        received = 0
        stop_sending = threading.Event()

        def blast() -> None:  # the peer keeps sending, so the holder dies with unread bytes
            with contextlib.suppress(OSError):
                while not stop_sending.is_set():
                    assert conn is not None
                    conn.sendall(b"p" * 65536)

        sender = threading.Thread(target=blast, daemon=True)
        sender.start()
        killed = False
        ended = "eof"
        while True:
            try:
                chunk = conn.recv(65536)
            except ConnectionResetError:
                ended = "reset"
                break
            if not chunk:
                break
            # No byte lost, duplicated or reordered up to wherever the stream stops.
            want = stream(b"killed", received, len(chunk))
            assert chunk == want, f"byte {received + first_difference(chunk, want)} slipped"
            received += len(chunk)
            if not killed and received >= 4 * MiB:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
        stop_sending.set()
        assert killed and received >= 4 * MiB
        assert proc.wait(TIMEOUT) == -signal.SIGKILL
        sender.join(TIMEOUT)
        print(f"killed holder: peer got {received} bytes, then {ended}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()
        if conn is not None:
            conn.close()
        lst.close()

    # The socket is gone at the gateway, and nobody can pick it up again: the
    # only payload ever made was used up before the kill.
    assert _wait_gone(gateway, port), "the gateway still lists the dead holder's socket"
    import tether

    tether.install(gateway=gateway.address, app=gateway.app, key=gateway.key)
    try:
        with pytest.raises(ConnectionResetError, match=r"connection lost|closed by"):
            pickle.loads(stale)
    finally:
        tether.uninstall()


def _wait_gone(gateway: Gateway, port: int) -> bool:
    return wait_for(
        lambda: not [s for s in list_sockets(gateway) if s.peer.port == port],
        timeout=TIMEOUT,
        step=0.05,
    )


# -- the worked example -----------------------------------------------------------


@pytest.mark.parametrize("queue_kind", ["multiprocessing", "redis"])
def test_example_handoff_smtp_runs(queue_kind: str) -> None:
    if queue_kind == "redis":
        require_service(6379, "Redis")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT / "src")]))
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "handoff_smtp" / "run.py"), "--queue", queue_kind],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "delivered: 1 message" in result.stdout, result.stdout
    assert "handoffs=1" in result.stdout, result.stdout
