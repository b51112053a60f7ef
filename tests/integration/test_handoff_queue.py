"""A socket exported as a signed token, queued on a real Redis list, taken by a worker process.

The test process opens a tether socket to a stdlib peer (which streams a
deterministic byte stream at it), reads part, exports the socket with
``handoff.to_bytes`` and pushes the token onto a Redis list under a unique
key. A worker of *another* app pops it first: it cannot verify the token,
says so, and puts it back. Then a worker of the same app pops it, imports the
socket with ``handoff.from_bytes`` (no unpickling), reads exactly the rest
of the stream, answers the peer, and finds that a second import of the same
token is refused: exactly once, no byte lost. The key is deleted afterwards.

Run as a script (``python test_handoff_queue.py KEY SEED OFFSET TOTAL``), this
file is the worker; its credentials come from TETHER_* in its environment.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
TIMEOUT = 30.0
SEED = b"handoff-queue"
TOTAL = 4 * MiB  # what the peer sends; more than the buffers on the way hold
READ_FIRST = 100_000  # what the exporting process reads before exporting
REPLY = b"taken from the queue\n"
REDIS_PORT = 6379


def worker(key: str, seed: bytes, offset: int, total: int) -> int:
    """Pop one token, import it as this process's app, read the rest, reply; print the result."""
    import redis

    from tether.client import handoff

    sys.path.insert(0, str(ROOT / "tests"))
    from support import recv_exact, stream

    queue = redis.Redis(host="127.0.0.1", port=REDIS_PORT, socket_timeout=TIMEOUT)
    popped = queue.blpop([key], timeout=TIMEOUT)
    if popped is None:
        print("nothing on the queue")
        return 1
    data = popped[1]
    try:
        sock = handoff.from_bytes(data)
    except handoff.HandoffTokenError as exc:
        queue.lpush(key, data)  # not ours: back on the queue for the right worker
        print(f"refused: {exc}")
        return 0
    with sock:
        rest = recv_exact(sock, total - offset)
        expected = stream(seed, offset, total - offset)
        if rest != expected:
            print(
                f"wrong bytes: sha256 {hashlib.sha256(rest).hexdigest()} != "
                f"{hashlib.sha256(expected).hexdigest()}"
            )
            return 1
        sock.sendall(REPLY)
        try:
            handoff.from_bytes(data)
        except OSError as exc:
            again = str(exc)
        else:
            print("the same token resumed twice")
            return 1
        sock.shutdown(socket.SHUT_WR)
        if sock.recv(1) != b"":  # the peer closes after the reply
            print("bytes after the stream's end")
            return 1
    print(f"ok: {total - offset} bytes; second import: {again}")
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4])))


# -- the test ---------------------------------------------------------------------

import pytest  # noqa: E402
from support import (  # noqa: E402
    Gateway,
    Peer,
    recv_exact,
    require_service,
    stream,
    use_gateway,
)

from tether.client import control, handoff  # noqa: E402
from tether.client import settings as client_settings  # noqa: E402


def _run_worker(gateway: Gateway, app: str, key: str, queue_key: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(TETHER_GATEWAY=gateway.address, TETHER_APP=app, TETHER_KEY=key)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, __file__, queue_key, SEED.decode(), str(READ_FIRST), str(TOTAL)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def test_a_socket_moves_through_a_redis_list_as_a_signed_token(gateway: Gateway) -> None:
    require_service(REDIS_PORT, "Redis")
    import redis

    import tether.socket as tsock

    queue = redis.Redis(host="127.0.0.1", port=REDIS_PORT, socket_timeout=TIMEOUT)
    queue_key = f"tether-test:handoff-queue:{uuid.uuid4().hex}"

    def peer(conn: socket.socket) -> bytes:
        conn.sendall(stream(SEED, 0, TOTAL))
        reply = recv_exact(conn, len(REPLY))
        assert conn.recv(1) == b""  # the worker half-closes after its reply
        return reply

    use_gateway(gateway.address, gateway.app, gateway.key)
    try:
        with Peer(peer, timeout=TIMEOUT) as p:
            sock = tsock.create_connection(("127.0.0.1", p.port), timeout=TIMEOUT)
            assert recv_exact(sock, READ_FIRST) == stream(SEED, 0, READ_FIRST)
            token = handoff.to_bytes(sock)
            assert not token.startswith(b"\x80")  # plain data, not a pickle
            assert gateway.key.encode() not in token
            queue.rpush(queue_key, token)

            refused = _run_worker(gateway, "other", f"other-{gateway.key}", queue_key)
            assert refused.startswith(
                "refused: tether: handoff token signature does not match for app 'other'"
            ), refused
            assert queue.llen(queue_key) == 1  # put back, untouched

            taken = _run_worker(gateway, gateway.app, gateway.key, queue_key)
            assert taken.startswith(f"ok: {TOTAL - READ_FIRST} bytes"), taken
            assert "already resumed" in taken, taken
            assert queue.llen(queue_key) == 0
        assert p.result == REPLY
        # The exporting process's object is spent, like a pickled one.
        with pytest.raises(OSError, match="handed off"):
            sock.recv(1)
    finally:
        queue.delete(queue_key)
        queue.close()
        client_settings.configure(None)
        control.close_all()
