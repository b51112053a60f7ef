"""Idle reclamation with an injectable clock: no 10-minute sleeps.

The gateway runs in a thread (EmbeddedGateway) with a fake clock the test
moves by hand; ``gateway.sweep()`` is called on the gateway's own loop right
after. The client side is ``tether.socket`` used directly with
``tether.client.settings.configure()``: this module never calls
``tether.install()`` (the in-thread gateway must open real sockets).

Covered: the app's next call after a reclaim fails with a message that says
so and for how long the socket was idle; a handed-off socket (waiting for
its Resume) is reclaimed too and its payload is then refused; keepalive(),
traffic either way and socket operations reset the clock; gateway-wide and
per-app idle_timeout; a holder that dies between Detach and producing its
payload; the background sweeper.
"""

from __future__ import annotations

import errno
import os
import pickle
import select
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator

import pytest
from support import (
    TIMEOUT,
    FakeClock,
    client_settings_for,
    descriptor,
    recv_exact,
    wait_for,
)
from tcpservers import Server

import tether
import tether.socket as tsock
from tether.client import control, handoff
from tether.client import settings as client_settings
from tether.client.settings import Settings
from tether.config import parse_config
from tether.gateway.core.registry import TOMBSTONE_TTL
from tether.gateway.embedded import EmbeddedGateway
from tether.gateway.server import SWEEP_INTERVAL
from tether.wire import pb

GATEWAY_IDLE = 60.0  # [gateway] idle_timeout in these tests
FAST_IDLE = 5.0  # [apps.fast] idle_timeout
SLOW_IDLE = 900.0  # [apps.slow] idle_timeout: longer than the gateway's


class EchoPeer:
    """A stdlib echo server on loopback; remembers how each connection ended.

    Two words change what it does: ``sink`` is swallowed (traffic in one
    direction only), and ``later`` is answered with ``now`` only when the
    test sets ``release`` (the peer speaking on its own, at a time the test
    chooses).
    """

    def __init__(self) -> None:
        self.endings: list[str] = []
        self.release = threading.Event()
        self.server = Server(self._echo).start()
        self.port: int = self.server.port

    def _echo(self, server: Server, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(65536)
            except ConnectionResetError:
                self.endings.append("reset")
                return
            if not data:
                self.endings.append("eof")
                return
            if data.startswith(b"sink"):
                continue
            if data == b"later":
                self.release.wait(TIMEOUT)
                self.release.clear()
                data = b"now"
            conn.sendall(data)

    def close(self) -> None:
        self.server.stop()


class Env:
    """The embedded gateway, its clock, and a way to open sockets as each app."""

    def __init__(self, gw: EmbeddedGateway, clock: FakeClock, peer: EchoPeer) -> None:
        self.gw = gw
        self.clock = clock
        self.peer = peer
        self.address = str(gw.endpoints[0])
        self.opened: list[socket.socket] = []

    def settings(self, app: str) -> Settings:
        return client_settings_for(self.address, app, f"key-{app}")

    def use(self, app: str) -> None:
        client_settings.configure(self.settings(app))

    def connect(self, app: str = "a") -> socket.socket:
        """A connected tether socket of `app` (it keeps that app's settings)."""
        self.use(app)
        sock = tsock.create_connection(("127.0.0.1", self.peer.port), timeout=TIMEOUT)
        self.opened.append(sock)
        sock.sendall(b"hi")
        assert recv_exact(sock, 2) == b"hi"
        return sock

    def sweep(self) -> int:
        assert self.gw.gateway is not None
        return self.gw.call(self.gw.gateway.sweep)

    def live(self) -> set[str]:
        """Descriptors the gateway still holds (read on its own loop)."""
        gateway = self.gw.gateway
        assert gateway is not None
        return self.gw.call(lambda: {r.descriptor for r in gateway.registry})

    def state(self, descriptor: str) -> str | None:
        gateway = self.gw.gateway
        assert gateway is not None
        return self.gw.call(
            lambda: next((r.state for r in gateway.registry if r.descriptor == descriptor), None)
        )

    def bytes_out(self, descriptor: str) -> int:
        gateway = self.gw.gateway
        assert gateway is not None
        return self.gw.call(
            lambda: next(r.bytes_out for r in gateway.registry if r.descriptor == descriptor)
        )

    def advance_and_sweep(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.sweep()  # the 1 s background sweeper may get there first: both are fine


def wait_reset_arrived(sock: socket.socket) -> None:
    """The gateway's reset makes the fd readable: wait for it before sending."""
    r, _, _ = select.select([sock], [], [], TIMEOUT)
    assert r, "the reclaim never reached the app's stream"


@pytest.fixture
def env() -> Iterator[Env]:
    assert not tether.installed(), "the in-thread gateway needs the stdlib socket module"
    clock = FakeClock()
    config = parse_config({
        "gateway": {"listen": ["127.0.0.1:0"], "idle_timeout": GATEWAY_IDLE},
        "resolver": {"mode": "static"},
        "policy": {"allow": ["127.0.0.0/8:*"]},
        "apps": {
            "a": {"key": "key-a"},
            "fast": {"key": "key-fast", "idle_timeout": FAST_IDLE},
            "slow": {"key": "key-slow", "idle_timeout": SLOW_IDLE},
        },
    })
    peer = EchoPeer()
    gw = EmbeddedGateway(config, clock=clock)
    gw.start()
    e = Env(gw, clock, peer)
    try:
        yield e
    finally:
        for sock in e.opened:
            sock.close()
        client_settings.configure(None)
        control.close_all()
        gw.stop()
        peer.close()


# -- reclaiming and telling the app ------------------------------------------------


def test_idle_socket_reclaimed_next_recv_says_why(env: Env) -> None:
    sock = env.connect()
    env.advance_and_sweep(GATEWAY_IDLE + 1)
    assert descriptor(sock) not in env.live()
    with pytest.raises(ConnectionResetError) as info:
        sock.recv(1)
    message = str(info.value)
    assert "reclaimed by the gateway after 61 s idle" in message
    assert "idle_timeout 60 s" in message
    assert f"127.0.0.1:{env.peer.port}" in message
    assert info.value.errno == errno.ECONNRESET
    # The peer's connection is closed too (aborted, not left dangling).
    assert wait_for(lambda: len(env.peer.endings) == 1), env.peer.endings


def test_idle_socket_reclaimed_next_send_says_why(env: Env) -> None:
    sock = env.connect()
    env.advance_and_sweep(GATEWAY_IDLE * 2)
    wait_reset_arrived(sock)
    with pytest.raises(ConnectionError, match="reclaimed by the gateway after 120 s idle"):
        sock.sendall(b"too late")


def test_keepalive_on_a_reclaimed_socket_says_why(env: Env) -> None:
    sock = env.connect()
    env.advance_and_sweep(GATEWAY_IDLE)  # idle_timeout reached exactly: reclaimed
    with pytest.raises(ConnectionResetError, match=r"reclaimed .* after 60 s idle"):
        tether.keepalive(sock)


def test_just_under_the_timeout_is_not_reclaimed(env: Env) -> None:
    sock = env.connect()
    env.advance_and_sweep(GATEWAY_IDLE - 0.5)
    assert descriptor(sock) in env.live()
    sock.sendall(b"alive")
    assert recv_exact(sock, 5) == b"alive"


def test_reclaim_reason_is_forgotten_after_the_tombstone_ttl(env: Env) -> None:
    """Documented limit: the reason is kept for TOMBSTONE_TTL (an hour), then a plain reset."""
    sock = env.connect()
    env.advance_and_sweep(GATEWAY_IDLE + 1)
    wait_reset_arrived(sock)
    env.clock.advance(TOMBSTONE_TTL + 1)
    with pytest.raises(ConnectionResetError) as info:
        sock.recv(1)
    assert "reclaimed" not in str(info.value)


def test_background_sweeper_reclaims_without_being_called(env: Env) -> None:
    sock = env.connect()
    env.clock.advance(GATEWAY_IDLE + 5)
    # The gateway's own sweeper runs every SWEEP_INTERVAL seconds of real time.
    assert wait_for(lambda: descriptor(sock) not in env.live(), timeout=SWEEP_INTERVAL * 5)
    with pytest.raises(ConnectionResetError, match="after 65 s idle"):
        sock.recv(1)


# -- what resets the clock ------------------------------------------------------------


def test_keepalive_resets_the_clock(env: Env) -> None:
    kept, left = env.connect(), env.connect()
    for _ in range(5):  # 5 x 40 s: far past the 60 s timeout in total
        env.clock.advance(40)
        tether.keepalive(kept)
        env.sweep()
    assert descriptor(kept) in env.live()
    assert descriptor(left) not in env.live()
    kept.sendall(b"still here")
    assert recv_exact(kept, 10) == b"still here"


def test_app_to_peer_traffic_resets_the_clock(env: Env) -> None:
    sock = env.connect()
    name = descriptor(sock)
    for i in range(4):  # 4 x 45 s of quiet, each ended by the app writing
        env.clock.advance(45)
        want = env.bytes_out(name) + 4
        sock.sendall(b"sink")  # the peer swallows it: one direction only
        assert wait_for(lambda w=want: env.bytes_out(name) == w)  # relayed, at "now"
        env.sweep()
        assert name in env.live(), f"reclaimed at round {i}"


def test_peer_to_app_traffic_resets_the_clock(env: Env) -> None:
    sock = env.connect()
    name = descriptor(sock)
    for i in range(3):
        sock.sendall(b"later")  # the app's last word, at time T
        env.clock.advance(45)
        env.peer.release.set()  # the peer speaks at T + 45 ...
        assert recv_exact(sock, 3) == b"now"
        env.clock.advance(45)  # ... so at T + 90 the socket has been idle 45 s, not 90
        env.sweep()
        assert name in env.live(), f"reclaimed at round {i}"
    env.advance_and_sweep(GATEWAY_IDLE - 45)
    assert name not in env.live()


def test_socket_operations_reset_the_clock(env: Env) -> None:
    sock = env.connect()
    operations: list[Callable[[], object]] = [
        lambda: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        lambda: sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ]
    for op in operations:
        env.clock.advance(50)
        op()
        env.sweep()
        assert descriptor(sock) in env.live()


def test_a_blocked_recv_is_not_activity(env: Env) -> None:
    """Waiting for data the peer never sends does not keep a socket alive."""
    sock = env.connect()
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(1)
    sock.settimeout(TIMEOUT)
    env.advance_and_sweep(GATEWAY_IDLE + 1)
    with pytest.raises(ConnectionResetError, match="reclaimed"):
        sock.recv(1)


# -- configuration: gateway-wide and per app --------------------------------------------


def test_per_app_idle_timeouts(env: Env) -> None:
    default, fast, slow = env.connect("a"), env.connect("fast"), env.connect("slow")
    env.advance_and_sweep(FAST_IDLE + 1)
    assert env.live() == {descriptor(default), descriptor(slow)}
    with pytest.raises(ConnectionResetError, match=r"after 6 s idle \(idle_timeout 5 s\)"):
        fast.recv(1)
    env.advance_and_sweep(GATEWAY_IDLE)  # 66 s in all: past the gateway's 60
    assert env.live() == {descriptor(slow)}
    with pytest.raises(ConnectionResetError, match=r"after 66 s idle \(idle_timeout 60 s\)"):
        default.recv(1)
    env.advance_and_sweep(SLOW_IDLE)
    assert env.live() == set()
    with pytest.raises(ConnectionResetError, match=r"idle_timeout 900 s"):
        slow.recv(1)


def test_default_idle_timeout_is_ten_minutes() -> None:
    config = parse_config({"apps": {"a": {"key": "k"}, "b": {"key": "k", "idle_timeout": 30}}})
    assert config.idle_timeout == 600.0
    assert config.apps["a"].idle_timeout is None
    assert config.apps["b"].idle_timeout == 30.0


@pytest.mark.parametrize("value", [0, -1, "600", True, float("inf")])
def test_bad_idle_timeouts_are_refused(value: object) -> None:
    from tether.errors import ConfigError

    with pytest.raises(ConfigError, match=r"gateway\.idle_timeout"):
        parse_config({"gateway": {"idle_timeout": value}})
    with pytest.raises(ConfigError, match=r"apps\.a\.idle_timeout"):
        parse_config({"apps": {"a": {"key": "k", "idle_timeout": value}}})


# -- handed-off sockets count as idle ------------------------------------------------------


def test_handed_off_socket_is_reclaimed_and_its_payload_refused(env: Env) -> None:
    sock = env.connect()
    name = descriptor(sock)
    payload = pickle.dumps(sock)
    assert wait_for(lambda: env.state(name) == "handed-off")
    env.advance_and_sweep(GATEWAY_IDLE + 1)
    assert name not in env.live()
    with pytest.raises(ConnectionResetError) as info:
        pickle.loads(payload)
    assert "reclaimed by the gateway after 61 s idle" in str(info.value)
    assert wait_for(lambda: len(env.peer.endings) == 1)


def test_waiting_starts_the_clock_at_the_handoff(env: Env) -> None:
    """A socket handed off after 50 quiet seconds gets its full idle_timeout to be resumed."""
    sock = env.connect()
    env.clock.advance(50)
    payload = pickle.dumps(sock)
    env.advance_and_sweep(GATEWAY_IDLE - 1)
    with pickle.loads(payload) as resumed:
        resumed.sendall(b"resumed in time")
        assert recv_exact(resumed, 15) == b"resumed in time"


DETACH_THEN_DIE = textwrap.dedent(
    """
    import os, sys
    import tether.socket as ts
    from tether.client import control
    from tether.client.settings import current
    from tether.wire import pb

    sock = ts.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    t = sock._tether
    # The first step of pickle.dumps(sock), and then nothing: no tail drained,
    # no payload produced, the token exists only in this dying process.
    reply = control.channel(current()).request(
        pb.Request(detach=pb.Detach(descriptor=t.descriptor)))
    print(t.descriptor, reply.handoff.token, sock.getpeername()[1], sock.getsockname()[0],
          sock.getsockname()[1], flush=True)
    os._exit(0)
    """
)


def test_holder_dies_between_detach_and_payload(env: Env) -> None:
    """Nobody can ever resume it; the idle sweep reclaims it like any waiting socket."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    child_env.update(TETHER_GATEWAY=env.address, TETHER_APP="a", TETHER_KEY="key-a")
    out = subprocess.run(
        [sys.executable, "-c", DETACH_THEN_DIE, str(env.peer.port)],
        capture_output=True, text=True, env=child_env, timeout=60, check=True,
    ).stdout.split()
    name, token, peer_port, local_host, local_port = out[0], out[1], out[2], out[3], out[4]
    # The gateway saw the holder's stream close mid-handoff: the socket waits.
    assert wait_for(lambda: env.state(name) == "handed-off"), env.state(name)
    env.advance_and_sweep(GATEWAY_IDLE + 1)
    assert name not in env.live()
    # Even the right token (which no payload ever carried) is now refused.
    env.use("a")
    state = handoff.HandoffState(
        descriptor=name, token=token, family=socket.AF_INET, type=socket.SOCK_STREAM,
        proto=0, timeout=TIMEOUT, peer=("127.0.0.1", int(peer_port)),
        local=(local_host, int(local_port)),
    )
    with pytest.raises(ConnectionResetError, match="reclaimed by the gateway after 61 s idle"):
        handoff.resume(state)
    assert wait_for(lambda: len(env.peer.endings) == 1)


def test_listing_shows_idle_time_from_the_gateway_clock(env: Env) -> None:
    sock = env.connect()
    env.clock.advance(42)
    channel = control.ControlChannel(env.settings("a"))
    try:
        listing = channel.request(pb.Request(list_sockets=pb.ListSockets()))
    finally:
        channel.close()
    name = descriptor(sock)
    (info,) = [s for s in listing.sockets.sockets if name.startswith(s.descriptor_prefix)]
    assert info.idle_seconds == pytest.approx(42, abs=0.01)
    assert info.state == "attached"
