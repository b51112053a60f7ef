"""Quotas end to end: a real gateway (in a thread), the real client, real loopback peers.

Each limit as the app meets it (docs/quotas.md): a switched-off app's
connects, lookups and UDP sockets raise QuotaExceeded; connects_per_minute
refuses the connect over the burst with the exact retry_after and lets it
through once refilled; a daily byte limit passes the bytes up to it, closes
the socket with the reason the app's next call reads, and refuses connects
until the quota day starts again; datagrams over datagrams_per_minute are
dropped and counted; bytes_out_per_minute slows a transfer without losing a
byte. Every refusal is an audit line naming the limit.

The gateway's clock is a fake one (both the pacing and the calendar) for
every limit but the throttle, whose pauses are the event loop's real
timers: that test runs on a gateway with the real clocks and asserts only a
lower bound on the time, which throttling can only make longer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support import TIMEOUT, FakeClock, client_settings_for, stream, wait_for
from tcpservers import MiB, Server, echo, sink
from udpsupport import UdpPeer

import tether
import tether.socket as tsock
from tether import QuotaExceeded
from tether.client import control
from tether.client import settings as client_settings
from tether.config import Config, parse_config
from tether.gateway.embedded import EmbeddedGateway

# 2026-12-05 18:00 UTC: the quota day (from 00:00 UTC) ends six hours later.
EVENING = dt.datetime(2026, 12, 5, 18, 0, tzinfo=dt.UTC).timestamp()
MIDNIGHT = dt.datetime(2026, 12, 6, 0, 0, tzinfo=dt.UTC).timestamp()
KiB = 1024
DAILY = 64 * KiB
SEED = b"quota"

APPS: dict[str, dict[str, Any]] = {
    "off": {"enabled": False},
    "conn": {"connects_per_minute": 3},
    "outday": {"bytes_out_per_day": "64KiB"},
    "inday": {"bytes_in_per_day": "64KiB"},
    "udp": {"datagrams_per_minute": 3},
    "udpday": {"bytes_out_per_day": 100},
    "free": {},
}


class Env:
    def __init__(
        self, caplog: pytest.LogCaptureFixture, clock: FakeClock | None, apps: dict[str, Any]
    ) -> None:
        # No audit file: the lines go to the tether.audit logger, read here.
        caplog.set_level(logging.INFO, "tether.audit")
        self.caplog = caplog
        self.clock = clock
        self.gw = EmbeddedGateway(self.config(apps), clock=clock)
        self.gw.start()
        self.address = str(self.gw.endpoints[0])
        self.opened: list[socket.socket] = []

    @staticmethod
    def config(apps: dict[str, Any]) -> Config:
        return parse_config({
            "gateway": {"listen": ["127.0.0.1:0"]},
            "resolver": {"mode": "static", "hosts": {"peer.test": ["127.0.0.1"]}},
            "policy": {"allow": ["127.0.0.0/8:*"]},
            "apps": {
                name: {"key": f"key-{name}", **({"quota": quota} if quota else {})}
                for name, quota in apps.items()
            },
        })

    def reload(self, apps: dict[str, Any]) -> None:
        gateway = self.gw.gateway
        assert gateway is not None
        config = self.config(apps)
        self.gw.call(lambda: gateway.reload(config))

    def use(self, app: str) -> None:
        client_settings.configure(client_settings_for(self.address, app, f"key-{app}"))

    def connect(self, app: str, port: int) -> socket.socket:
        self.use(app)
        sock = tsock.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.opened.append(sock)
        return sock

    def udp(self, app: str) -> socket.socket:
        """A UDP socket of `app` (its association opens at the first send)."""
        self.use(app)
        sock = tsock.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(TIMEOUT)
        self.opened.append(sock)
        return sock

    def advance(self, seconds: float) -> None:
        assert self.clock is not None
        self.clock.now += seconds

    def audit_lines(self, **match: Any) -> list[dict[str, Any]]:
        lines = [json.loads(r.getMessage()) for r in list(self.caplog.records)
                 if r.name == "tether.audit"]
        return [x for x in lines if all(x.get(k) == v for k, v in match.items())]

    def wait_audit(self, **match: Any) -> dict[str, Any]:
        assert wait_for(lambda: bool(self.audit_lines(**match))), (match, self.audit_lines())
        return self.audit_lines(**match)[-1]

    def usage(self, app: str) -> tuple[int, dict[tuple[str, str], int]]:
        gateway = self.gw.gateway
        assert gateway is not None
        return self.gw.call(
            lambda: (gateway.registry.app_usage(app).quota_refusals, dict(gateway.quota.refusals))
        )

    def close(self) -> None:
        for sock in self.opened:
            sock.close()
        client_settings.configure(None)
        control.close_all()
        self.gw.stop()


@pytest.fixture
def env(caplog: pytest.LogCaptureFixture) -> Iterator[Env]:
    assert not tether.installed(), "the in-thread gateway needs the stdlib socket module"
    clock = FakeClock()
    clock.now = EVENING
    e = Env(caplog, clock, APPS)
    try:
        yield e
    finally:
        e.close()


@pytest.fixture
def echo_server() -> Iterator[Server]:
    server = Server(echo).start()
    yield server
    server.stop()


def test_a_switched_off_app_is_refused_connects_lookups_and_udp(
    env: Env, echo_server: Server
) -> None:
    expected = "tether: sockets are disabled for app 'off' (apps.off.quota.enabled = false)"
    with pytest.raises(QuotaExceeded) as info:
        env.connect("off", echo_server.port)
    refused = info.value
    assert isinstance(refused, OSError) and refused.errno == errno.EDQUOT
    assert str(refused.strerror) == expected
    assert (refused.app, refused.limit, refused.value, refused.window, refused.retry_after) == (
        "off", "enabled", 0, "", 0.0)
    # A name lookup goes nowhere either.
    with pytest.raises(QuotaExceeded, match="sockets are disabled for app 'off'"):
        tsock.getaddrinfo("peer.test", 80)
    with pytest.raises(QuotaExceeded, match="sockets are disabled"):
        tsock.gethostbyname("peer.test")
    # Nor a UDP socket.
    with tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(
        QuotaExceeded, match="sockets are disabled"
    ):
        udp.sendto(b"x", ("127.0.0.1", echo_server.port))
    # Each refusal is one audit line naming the limit, and counted.
    line = env.wait_audit(event="decision", app="off", quota="enabled")
    assert line["outcome"] == "refused: apps.off.quota.enabled is false"
    assert env.wait_audit(event="lookup", app="off", op="getaddrinfo")["quota"] == "enabled"
    refusals, by_limit = env.usage("off")
    assert refusals == 4 and by_limit[("off", "enabled")] == 4
    # Another app is not affected.
    sock = env.connect("free", echo_server.port)
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"


def test_a_reload_that_switches_an_app_off_closes_its_sockets_saying_why(
    env: Env, echo_server: Server
) -> None:
    sock = env.connect("free", echo_server.port)
    other = env.connect("conn", echo_server.port)
    env.reload({**APPS, "free": {"enabled": False}})
    with pytest.raises(ConnectionResetError) as info:
        sock.sendall(b"ping")
        sock.recv(4)
    assert (f"tether: socket to 127.0.0.1:{echo_server.port} was closed by its quota: sockets "
            "were disabled for app 'free' (apps.free.quota.enabled = false)") == str(
                info.value.strerror)
    with pytest.raises(QuotaExceeded, match="sockets are disabled for app 'free'"):
        env.connect("free", echo_server.port)
    # Another app's socket stays open.
    other.sendall(b"pong")
    assert other.recv(4) == b"pong"


def test_connects_per_minute_refuses_over_the_burst_until_it_refills(
    env: Env, echo_server: Server
) -> None:
    for _ in range(3):
        env.connect("conn", echo_server.port).close()
    with pytest.raises(QuotaExceeded) as info:
        env.connect("conn", echo_server.port)
    refused = info.value
    assert (refused.app, refused.limit, refused.value, refused.window) == (
        "conn", "connects_per_minute", 3, "minute")
    assert refused.retry_after == pytest.approx(20.0, abs=1e-3)  # 60 s / 3
    assert str(refused.strerror) == (
        "tether: app 'conn' is over its connects_per_minute quota (3 a minute, "
        "apps.conn.quota.connects_per_minute); it has room again in 20 s")
    line = env.wait_audit(event="decision", app="conn", quota="connects_per_minute")
    assert line["outcome"] == "refused: apps.conn.quota.connects_per_minute 3 reached"
    assert line["retry_after"] == pytest.approx(20.0, abs=1e-3)
    # The refused connect cost nothing: after the wait, exactly one more.
    env.advance(refused.retry_after)
    env.connect("conn", echo_server.port).close()
    with pytest.raises(QuotaExceeded):
        env.connect("conn", echo_server.port)
    assert env.usage("conn")[0] == 2


def test_bytes_out_per_day_passes_up_to_the_limit_then_closes_and_refuses(env: Env) -> None:
    server = Server(sink).start()
    try:
        sock = env.connect("outday", server.port)
        data = stream(SEED, 0, DAILY + 32 * KiB)
        # The first 64 KiB go through; the rest is where the day's quota ends.
        # (sendall may return before the gateway has read it all: then the
        # reset comes at the recv. No shutdown(): after the reset it would
        # say ENOTCONN, not why.)
        with pytest.raises(ConnectionResetError) as info:
            sock.sendall(data)
            while sock.recv(65536):
                pass
        message = str(info.value)
        assert f"tether: socket to 127.0.0.1:{server.port} was closed by its quota: app " in (
            message)
        assert ("'outday' reached its bytes_out_per_day quota (64 KiB a day, "
                "apps.outday.quota.bytes_out_per_day); the quota day starts again at "
                "2026-12-06 00:00 UTC (in 6 h 0 min)") in message
        # The peer got exactly the day's quota, intact.
        total, digest = server.result()
        assert (total, digest) == (DAILY, hashlib.sha256(data[:DAILY]).hexdigest())
        close = env.wait_audit(event="close", app="outday")
        assert close["bytes_out"] == DAILY and close["reason"].startswith("closed by its quota")
        # A new connect is refused until the quota day starts again.
        with pytest.raises(QuotaExceeded) as refused:
            env.connect("outday", server.port)
        assert (refused.value.limit, refused.value.value, refused.value.window) == (
            "bytes_out_per_day", DAILY, "day")
        assert refused.value.retry_after == pytest.approx(6 * 3600)
        assert "has sent 64 KiB today" in str(refused.value)
        env.wait_audit(event="decision", app="outday", quota="bytes_out_per_day")
        env.advance(MIDNIGHT - EVENING)
        again = env.connect("outday", server.port)
        again.sendall(b"a new day")
        again.shutdown(socket.SHUT_WR)
        assert server.result()[0] == len(b"a new day")
    finally:
        server.stop()


def test_bytes_in_per_day_delivers_up_to_the_limit_then_the_reason(env: Env) -> None:
    size = DAILY + 48 * KiB
    sent = threading.Event()

    def source(server: Server, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the gateway closes its side at the quota
            conn.sendall(stream(SEED, 0, size))
        sent.set()

    server = Server(source).start()
    try:
        sock = env.connect("inday", server.port)
        got = bytearray()
        with pytest.raises(ConnectionResetError) as info:
            while chunk := sock.recv(65536):
                got += chunk
        # Every byte up to the quota arrived, intact, and not one more.
        assert bytes(got) == stream(SEED, 0, DAILY)
        assert "closed by its quota: app 'inday' reached its bytes_in_per_day quota" in str(
            info.value)
        with pytest.raises(QuotaExceeded, match="has received 64 KiB today"):
            env.connect("inday", server.port)
        assert sent.wait(TIMEOUT)
    finally:
        server.stop()


@pytest.fixture
def udp_peer() -> Iterator[UdpPeer]:
    peer = UdpPeer()
    yield peer
    peer.close()


def test_datagrams_over_the_minute_are_dropped_and_counted(env: Env, udp_peer: UdpPeer) -> None:
    udp = env.udp("udp")
    for i in range(5):
        udp.sendto(b"d%d" % i, udp_peer.address)
    # The burst of 3 passes, the other 2 are dropped at the gateway.
    replies = {udp.recvfrom(64)[0] for _ in range(3)}
    assert replies == {b"d0", b"d1", b"d2"}
    assert wait_for(lambda: len(udp_peer.received) == 3)
    # One refills every 20 s (fake time).
    env.advance(20)
    udp.sendto(b"later", udp_peer.address)
    assert udp.recvfrom(64)[0] == b"later"
    udp.close()
    close = env.wait_audit(event="close", app="udp", transport="udp")
    assert (close["datagrams_out"], close["dropped_quota"]) == (4, 2)
    assert env.usage("udp")[1][("udp", "datagrams_per_minute")] == 2


def test_a_udp_socket_at_its_daily_bytes_is_closed_with_the_reason(
    env: Env, udp_peer: UdpPeer
) -> None:
    udp = env.udp("udpday")
    udp.sendto(b"x" * 60, udp_peer.address)
    assert udp.recvfrom(100)[0] == b"x" * 60
    udp.sendto(b"y" * 60, udp_peer.address)  # 120 > 100: not sent; the association ends
    close = env.wait_audit(event="close", app="udpday", transport="udp")
    assert close["bytes_out"] == 60 and close["reason"].startswith("closed by its quota")
    with pytest.raises(ConnectionResetError) as info:
        udp.sendto(b"z", udp_peer.address)
    assert "closed by its quota: app 'udpday' reached its bytes_out_per_day quota" in str(
        info.value)
    assert [d for d, _ in udp_peer.received] == [b"x" * 60]


# -- the throttle: real clocks ----------------------------------------------------------

RATE = 6000 * KiB  # bytes_out_per_minute: 100 KiB/s after a burst of 6000 KiB
EXTRA = 600 * KiB  # sent beyond the burst: ~6 s at the rate


@pytest.fixture
def real_env(caplog: pytest.LogCaptureFixture) -> Iterator[Env]:
    assert not tether.installed()
    e = Env(caplog, None, {"slow": {"bytes_out_per_minute": RATE}, "free": {}})
    try:
        yield e
    finally:
        e.close()


def test_bytes_out_per_minute_slows_a_transfer_and_loses_no_byte(real_env: Env) -> None:
    server = Server(sink).start()
    try:
        sock = real_env.connect("slow", server.port)
        data = stream(SEED, 0, RATE + EXTRA)
        started = time.monotonic()
        sock.sendall(data)  # blocks while the gateway is not reading: a slow link
        sock.shutdown(socket.SHUT_WR)
        total, digest = server.result(timeout=120)
        elapsed = time.monotonic() - started
        assert (total, digest) == (len(data), hashlib.sha256(data).hexdigest())
        # Beyond the burst the rate holds. Slowing can only add time, so
        # this lower bound cannot flake: what passed beyond the burst, less
        # one read (asyncio reads up to 256 KiB before the pause), at 100 KiB/s.
        assert elapsed >= (EXTRA - 256 * KiB) / (RATE / 60)
        assert sock.recv(64).startswith(str(len(data)).encode())
        # Nothing was refused or closed: a throttle is not a refusal.
        assert real_env.usage("slow")[0] == 0
    finally:
        server.stop()


def test_a_throttled_socket_hands_off_and_keeps_every_byte(real_env: Env) -> None:
    """Pickled while its reads are paused for the quota: the old holder still drains.

    The gateway reads the old holder's last bytes and its EOF at once (they
    are charged, so the new holder starts with the debt and is slowed in
    its turn); otherwise the detach would wait for the throttle's timer.
    """
    server = Server(sink).start()
    try:
        sock = real_env.connect("slow", server.port)
        first = stream(SEED, 0, RATE + 512 * KiB)  # the burst, then half a megabyte throttled
        sock.sendall(first)
        # While the gateway is not reading (the throttle's pause): the detach
        # lifts the pause and reads the old holder's last bytes and EOF at once.
        payload = pickle.dumps(sock)
        sock.close()
        with pickle.loads(payload) as resumed:
            resumed.sendall(stream(SEED, len(first), 64 * KiB))
            resumed.shutdown(socket.SHUT_WR)
            total, digest = server.result(timeout=60)
        whole = stream(SEED, 0, len(first) + 64 * KiB)
        assert (total, digest) == (len(whole), hashlib.sha256(whole).hexdigest())
    finally:
        server.stop()


def test_the_throttle_is_per_app(real_env: Env) -> None:
    """Another app's transfer is not slowed by the first app's budget."""
    server = Server(sink).start()
    try:
        for app in ("slow", "free"):
            sock = real_env.connect(app, server.port)
            # Within the burst for "slow"; "free" has no limit.
            sock.sendall(stream(SEED, 0, MiB // 4))
            sock.shutdown(socket.SHUT_WR)
            assert server.result()[0] == MiB // 4
    finally:
        server.stop()
