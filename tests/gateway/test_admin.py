"""The admin listener: /metrics, /healthz, /readyz, and what a scraper cannot do to it.

A real gateway (in a thread, so the test can look at its state and run its
timers early) with traffic through it; /metrics is fetched over loopback and
parsed with prometheus_client's own parser, and its values are checked
against the traffic the test sent. The HTTP side is driven with raw
sockets: bad requests, an oversize head, bodies, a client that never
finishes its request, one that never reads, and the connection cap.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import platform
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from support import (
    TIMEOUT,
    Peer,
    StdSocket,
    echo,
    recv_exact,
    stream,
    tether_cli,
    wait_for,
)

import tether.socket as ts
from tether import __version__
from tether.client import control
from tether.client import settings as client_settings
from tether.config import check_listen, parse_config
from tether.endpoint import Endpoint, parse_endpoint
from tether.errors import ConfigError, LimitExceeded, PolicyDenied
from tether.gateway import admin
from tether.gateway.embedded import EmbeddedGateway
from tether.gateway.metrics import (
    LATENCY_BUCKETS,
    VERDICTS,
    GatewayMetrics,
    Histogram,
    frontend_name,
)
from tether.gateway.server import Gateway

# -- the histogram (pure) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], [0] * (len(LATENCY_BUCKETS) + 1)),
        # exactly on a bound counts in that bound's bucket ("le")
        ([0.0001], [1] * (len(LATENCY_BUCKETS) + 1)),
        ([0.0], [1] * (len(LATENCY_BUCKETS) + 1)),
        # above every bound: only +Inf
        ([60.0], [0] * len(LATENCY_BUCKETS) + [1]),
        ([0.0003, 0.002], [0, 0, 1, 1, 2] + [2] * (len(LATENCY_BUCKETS) - 4)),
    ],
)
def test_histogram_buckets_are_cumulative_and_le(values: list[float], expected: list[int]) -> None:
    histogram = Histogram()
    for v in values:
        histogram.observe(v)
    buckets = histogram.buckets()
    assert [le for le, _ in buckets] == [repr(b) for b in LATENCY_BUCKETS] + ["+Inf"]
    assert [n for _, n in buckets] == expected
    assert histogram.count == len(values)
    assert histogram.total == pytest.approx(sum(values))


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=200))
def test_histogram_matches_counting_by_hand(values: list[float]) -> None:
    histogram = Histogram()
    for v in values:
        histogram.observe(v)
    for le, n in histogram.buckets():
        bound = math.inf if le == "+Inf" else float(le)
        assert n == sum(1 for v in values if v <= bound)



@settings(deadline=None)  # pure counting: a loaded machine's pauses are not a failure
@given(st.lists(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50),
                max_size=6))
def test_histogram_folded_in_batches_counts_every_value_once(batches: list[list[float]]) -> None:
    """The sweep folds once a second: what each fold sorts adds to the buckets so far."""
    histogram = Histogram()
    for batch in batches:
        for v in batch:
            histogram.observe(v)
        histogram.fold()
    values = [v for batch in batches for v in batch]
    for le, n in histogram.buckets():
        bound = math.inf if le == "+Inf" else float(le)
        assert n == sum(1 for v in values if v <= bound)
    assert histogram.count == len(values)


def test_each_front_end_has_its_handshake_label() -> None:
    from tether.gateway.frontends.http_proxy import HttpProxySession
    from tether.gateway.frontends.socks5 import Socks5Session
    from tether.gateway.frontends.tether import TetherSession

    metrics = GatewayMetrics()
    for session, label in [
        (TetherSession, "tether"), (Socks5Session, "socks5"), (HttpProxySession, "http_proxy")
    ]:
        assert frontend_name(session) == label
        metrics.handshake[session](0.001)
        assert metrics.handshakes[label].count == 1
    metrics.handshake[TetherSession](0.002)
    assert metrics.handshakes["tether"].count == 2


# -- config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "endpoint"),
    [
        ("127.0.0.1:9464", Endpoint(host="127.0.0.1", port=9464)),
        ("[::1]:0", Endpoint(host="::1", port=0)),
        ("unix:/run/tether/admin.sock", Endpoint(path="/run/tether/admin.sock")),
    ],
)
def test_admin_listen_parses(value: str, endpoint: Endpoint) -> None:
    config = parse_config({"gateway": {"admin_listen": value}})
    assert config.admin_listen == endpoint
    check_listen(config)


def test_admin_listen_is_off_by_default() -> None:
    assert parse_config({}).admin_listen is None


@pytest.mark.parametrize(
    ("gateway", "message"),
    [
        ({"admin_listen": 9464}, "gateway.admin_listen: must be one address"),
        ({"admin_listen": ["127.0.0.1:1"]}, "gateway.admin_listen: must be one address"),
        ({"admin_listen": "/run/a.sock"}, "gateway.admin_listen: write a Unix socket as unix:/"),
        ({"admin_listen": "127.0.0.1:99999"}, "gateway.admin_listen: '127.0.0.1:99999': port"),
        ({"admin_allow_remote": "yes"}, "gateway.admin_allow_remote: must be true or false"),
    ],
)
def test_bad_admin_settings_name_their_path(gateway: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"gateway": gateway})
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("gateway", "apps", "owner"),
    [
        ({"listen": ["unix:/run/t.sock"]}, {}, "gateway.listen's"),
        ({}, {"a": {"listen": "unix:/run/t.sock"}}, "apps.a's"),
    ],
)
def test_admin_socket_is_no_other_listeners(
    gateway: dict[str, object], apps: dict[str, object], owner: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"gateway": {**gateway, "admin_listen": "unix:/run/t.sock"}, "apps": apps})
    assert str(info.value) == f"gateway.admin_listen: unix:/run/t.sock is already {owner}"


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "[::]:9464", "192.0.2.7:9464"])
def test_admin_off_loopback_needs_the_opt_in(listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_listen(parse_config({"gateway": {"admin_listen": listen}}))
    message = str(info.value)
    assert message.startswith(f"gateway.admin_listen: {parse_endpoint(listen)} is not a loopback")
    assert "without authentication" in message
    assert "admin_allow_remote = true" in message
    # The keys' opt-in is another matter: it does not open the admin listener.
    with pytest.raises(ConfigError):
        check_listen(parse_config(
            {"gateway": {"admin_listen": listen, "allow_cleartext_keys": True}}
        ))
    check_listen(parse_config({"gateway": {"admin_listen": listen, "admin_allow_remote": True}}))


def test_refused_before_anything_binds(tmp_path: Path) -> None:
    """`tether serve` with admin_listen off loopback exits 2 saying why, having bound nothing."""
    path = tmp_path / "tether.toml"
    path.write_text('[gateway]\nlisten = ["127.0.0.1:0"]\nadmin_listen = "0.0.0.0:0"\n')
    done = tether_cli("serve", "--config", str(path))
    assert done.returncode == 2, done.stderr
    assert "gateway.admin_listen: 0.0.0.0:0 is not a loopback address" in done.stderr
    assert "listening on" not in done.stderr


# -- a gateway with traffic ----------------------------------------------------------

KEYS = {"a": "key-a", "b": "key-b"}


@pytest.fixture
def gateway() -> Iterator[EmbeddedGateway]:
    config = parse_config({
        "gateway": {"listen": ["127.0.0.1:0"], "admin_listen": "127.0.0.1:0"},
        "resolver": {"mode": "static"},
        "policy": {"allow": ["127.0.0.1:*"]},
        "apps": {"a": {"key": KEYS["a"]}, "b": {"key": KEYS["b"], "max_sockets": 1}},
    })
    gw = EmbeddedGateway(config)
    gw.start()
    try:
        yield gw
    finally:
        client_settings.configure(None)
        control.close_all()
        gw.stop()


def core(gw: EmbeddedGateway) -> Gateway:
    assert gw.gateway is not None
    return gw.gateway


def admin_port(gw: EmbeddedGateway) -> int:
    server = core(gw).admin
    assert server is not None
    return server.endpoint.port


def as_app(gw: EmbeddedGateway, app: str) -> None:
    client_settings.configure(client_settings.Settings(
        gateway=parse_endpoint(str(gw.endpoints[0])), app=app, key=KEYS[app]
    ))


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read().decode()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


class Scrape:
    """One /metrics answer, parsed by prometheus_client's parser."""

    def __init__(self, port: int) -> None:
        status, headers, self.text = get(port, "/metrics")
        assert status == 200, self.text
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}

    def samples(self, name: str) -> list[Sample]:
        return [s for f in self.families.values() for s in f.samples if s.name == name]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples(name) if s.labels == labels]
        assert len(found) == 1, f"{name}{labels}: {found} in\n{self.text}"
        return found[0]


def closed_port() -> int:
    """A loopback port nothing listens on (connects to it are refused)."""
    with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_metrics_count_the_traffic_sent(gateway: EmbeddedGateway) -> None:
    port = admin_port(gateway)
    before = Scrape(port)
    assert before.value("tether_connects_total", app="a", verdict="allowed") == 0
    assert before.value("tether_sent_bytes_total", app="a") == 0

    size = 3 * 1024 * 1024 + 17
    payload = stream(b"admin", 0, size)
    as_app(gateway, "a")
    with Peer(echo) as peer:
        sock = ts.create_connection(peer.address, timeout=TIMEOUT)
        sock.sendall(payload)
        assert recv_exact(sock, size) == payload
        # Live: the socket is counted, with its bytes so far.
        live = Scrape(port)
        assert live.value("tether_sockets", app="a", transport="tcp", state="attached") == 1
        assert live.value("tether_sent_bytes_total", app="a") == size
        assert live.value("tether_received_bytes_total", app="a") == size
        sock.close()
    assert wait_for(lambda: len(core(gateway).registry) == 0)

    with pytest.raises(PolicyDenied):  # 127.0.0.2 is not in the allow list
        ts.create_connection(("127.0.0.2", 80), timeout=TIMEOUT)
    with pytest.raises(PolicyDenied) as denied:  # the admin listener is the gateway's own
        ts.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    assert "gateway" in str(denied.value)
    with pytest.raises(ConnectionRefusedError):
        ts.create_connection(("127.0.0.1", closed_port()), timeout=TIMEOUT)
    as_app(gateway, "b")
    with Peer(echo) as peer:
        held = ts.create_connection(peer.address, timeout=TIMEOUT)
        with pytest.raises(LimitExceeded):  # b's max_sockets is 1
            ts.create_connection(peer.address, timeout=TIMEOUT)
        held.close()

    after = Scrape(port)
    # Closed: the bytes moved to the app's usage, and the socket-seconds with them.
    assert after.value("tether_sent_bytes_total", app="a") == size
    assert after.value("tether_received_bytes_total", app="a") == size
    assert after.value("tether_socket_seconds_total", app="a") > 0
    assert not after.samples("tether_sockets") or all(
        s.value == 0 for s in after.samples("tether_sockets") if s.labels["app"] == "a"
    )
    expected = {
        ("a", "allowed"): 1, ("a", "denied"): 2, ("a", "failed"): 1, ("a", "limit"): 0,
        ("a", "quota"): 0,
        # b's max_sockets is its sockets quota: refused by the quota, not a gateway cap.
        ("b", "allowed"): 1, ("b", "denied"): 0, ("b", "failed"): 0, ("b", "limit"): 0,
        ("b", "quota"): 1,
    }
    for (app, verdict), n in expected.items():
        assert after.value("tether_connects_total", app=app, verdict=verdict) == n, (app, verdict)
    assert after.value("tether_quota_refusals_total", app="b", limit="sockets") == 1
    assert [s.labels for s in after.samples("tether_quota_refusals_total")] == [
        {"app": "b", "limit": "sockets"}
    ]

    # Six admissions (a: echo, two denied, refused port; b: held, over its
    # cap), each timed once; and a handshake for every stream that authenticated.
    assert after.value("tether_decision_seconds_count") == 6
    assert after.value("tether_decision_seconds_bucket", le="+Inf") == 6
    assert after.value("tether_handshake_seconds_count", frontend="tether") >= 6
    assert after.value("tether_app_max_sockets", app="b") == 1
    assert after.value("tether_max_sockets") == core(gateway).max_sockets
    assert after.value("tether_open_files_limit") == core(gateway).fd_limit
    assert after.value("tether_ready") == 1
    assert after.value(
        "tether_build_info",
        version=__version__, python=platform.python_version(), node=core(gateway).node_id,
    ) == 1
    assert after.samples("process_open_fds")  # the process collector is there


def test_names_follow_prometheus_conventions(gateway: EmbeddedGateway) -> None:
    scrape = Scrape(admin_port(gateway))
    ours = {n: f for n, f in scrape.families.items() if n.startswith("tether_")}
    assert set(ours) >= {
        "tether_sockets", "tether_connects", "tether_sent_bytes", "tether_received_bytes",
        "tether_socket_seconds", "tether_quota_refusals", "tether_handshake_seconds",
        "tether_decision_seconds", "tether_streams", "tether_connecting", "tether_ready",
        "tether_open_files_limit", "tether_fd_reserve", "tether_max_sockets",
        "tether_app_max_sockets", "tether_build_info",
    }
    for name, family in ours.items():
        if family.type == "counter":
            assert all(s.name in (name + "_total", name + "_created") for s in family.samples)
        if family.type == "histogram":
            assert name.endswith("_seconds")
        assert family.documentation, name
    assert set(VERDICTS) == {"allowed", "denied", "limit", "quota", "failed"}
    # No ledger configured: no lag gauge pretending one exists.
    assert "tether_ledger_flush_lag_seconds" not in scrape.families


def test_openmetrics_when_asked(gateway: EmbeddedGateway) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", admin_port(gateway), timeout=TIMEOUT)
    conn.request("GET", "/metrics", headers={"Accept": "application/openmetrics-text"})
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    # OpenMetrics is the stricter format (counters' _total, info metrics, units): it parses.
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om

    names = {f.name for f in parse_om(body)}
    assert {"tether_connects", "tether_build", "tether_handshake_seconds"} <= names


# -- health -------------------------------------------------------------------------


def test_healthz_and_readyz(gateway: EmbeddedGateway) -> None:
    port = admin_port(gateway)
    assert get(port, "/healthz")[::2] == (200, "ok\n")
    assert get(port, "/readyz")[::2] == (200, "ready\n")
    head = get(port, "/readyz", method="HEAD")
    assert head[0] == 200 and head[2] == "" and head[1]["content-length"] == "6"


def test_readyz_is_503_while_draining(gateway: EmbeddedGateway) -> None:
    port = admin_port(gateway)
    gateway.call(lambda: setattr(core(gateway), "draining", True))
    status, _, body = get(port, "/readyz")
    assert (status, body) == (
        503, "not ready: the gateway is draining: live sockets finish, new work goes elsewhere\n"
    )
    assert get(port, "/healthz")[0] == 200  # alive all the same
    assert Scrape(port).value("tether_ready") == 0
    gateway.call(lambda: setattr(core(gateway), "draining", False))
    assert get(port, "/readyz")[0] == 200


def test_readyz_is_503_once_shutdown_begins(gateway: EmbeddedGateway) -> None:
    port = admin_port(gateway)
    gateway.call(core(gateway).begin_shutdown)
    assert get(port, "/readyz")[::2] == (503, "not ready: the gateway is shutting down\n")
    assert get(port, "/healthz")[0] == 200


def test_the_listener_closes_with_the_gateway(gateway: EmbeddedGateway) -> None:
    port = admin_port(gateway)
    gateway.stop()
    with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(
        ConnectionRefusedError
    ):
        sock.connect(("127.0.0.1", port))


# -- what a scraper cannot do ----------------------------------------------------------


@contextlib.contextmanager
def raw(port: int) -> Iterator[socket.socket]:
    sock = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    try:
        yield sock
    finally:
        sock.close()


def read_all(sock: socket.socket) -> bytes:
    """Everything until the gateway closes (a reset counts as closed)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"404"),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
         b"405"),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", b"413"),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         b"413"),
        (b"this is not http\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 needs a Host
    ],
)
def test_bad_requests_are_answered_and_closed(
    gateway: EmbeddedGateway, request_bytes: bytes, status: bytes
) -> None:
    with raw(admin_port(gateway)) as sock:
        sock.sendall(request_bytes)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert wait_for(lambda: not core(gateway).admin.sessions)  # type: ignore[union-attr]


def test_an_endless_head_is_cut_at_the_limit(gateway: EmbeddedGateway) -> None:
    """A head that never ends is refused once it passes MAX_REQUEST_HEAD, not buffered."""
    with raw(admin_port(gateway)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        sent = 0
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while sent < 10 * admin.MAX_REQUEST_HEAD:
                sock.sendall(b"X-Pad: " + b"p" * 1000 + b"\r\n")
                sent += 1009
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]


def test_keep_alive_and_pipelining(gateway: EmbeddedGateway) -> None:
    with raw(admin_port(gateway)) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answer = read_all(sock)
    assert answer.count(b"HTTP/1.1 200") == 3
    assert answer.index(b"ok\n") < answer.index(b"ready\n") < answer.rindex(b"ok\n")


def test_an_unfinished_request_is_closed_at_the_read_timeout(gateway: EmbeddedGateway) -> None:
    """The slow client: its timer is armed for READ_TIMEOUT; run early, it answers 408 and
    closes (the test runs the gateway's timer instead of waiting for it)."""
    server = core(gateway).admin
    assert server is not None
    with raw(admin_port(gateway)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert wait_for(lambda: len(server.sessions) == 1)
        session = next(iter(server.sessions))
        assert wait_for(lambda: bool(session.http.trailing_data[0]))
        assert session._timer is not None
        left = gateway.call(lambda: session._timer.when() - core(gateway).loop.time())  # type: ignore[union-attr]
        assert 0 < left <= admin.READ_TIMEOUT
        gateway.call(session._expired)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"request not complete within 10 s" in answer


def test_an_idle_keep_alive_connection_is_closed_quietly(gateway: EmbeddedGateway) -> None:
    server = core(gateway).admin
    assert server is not None
    with raw(admin_port(gateway)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        session = next(iter(server.sessions))
        gateway.call(session._expired)
        assert read_all(sock) == b""


def test_a_client_that_does_not_read_is_not_read_either(gateway: EmbeddedGateway) -> None:
    """Pipelined scrapes never read: the gateway stops reading them once its buffer is full,
    and the read timeout drops the connection (run early here)."""
    server = core(gateway).admin
    assert server is not None
    with raw(admin_port(gateway)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < 20_000:
                sock.send(request)
                sent += 1
        assert wait_for(lambda: bool(server.sessions))
        session = next(iter(server.sessions))
        assert wait_for(lambda: session._write_paused)
        assert sent > 0
        buffered = gateway.call(session.transport.get_write_buffer_size)  # type: ignore[union-attr]
        # Bounded: about the transport's high-water mark and one answer, not 20,000 answers.
        assert buffered < 4 * 1024 * 1024
        gateway.call(session._expired)
        sock.setblocking(True)
        with contextlib.suppress(OSError):
            read_all(sock)
    assert wait_for(lambda: not server.sessions)


def test_connection_cap(gateway: EmbeddedGateway) -> None:
    port = admin_port(gateway)
    server = core(gateway).admin
    assert server is not None
    held = []
    try:
        for _ in range(admin.MAX_CONNECTIONS):
            sock = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(TIMEOUT)
            sock.connect(("127.0.0.1", port))
            held.append(sock)
        assert wait_for(lambda: len(server.sessions) == admin.MAX_CONNECTIONS)
        with raw(port) as extra:
            answer = read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"already has 16 connections" in answer
        # The held ones still work.
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    assert wait_for(lambda: not server.sessions)
    assert get(port, "/healthz")[0] == 200


# -- tether serve, on a Unix socket ------------------------------------------------------


def test_serve_on_a_unix_socket(tmp_path: Path) -> None:
    from tether.devmode import GatewayProcess

    path = tmp_path / "admin.sock"
    config = tmp_path / "tether.toml"
    config.write_text(
        f'[gateway]\nadmin_listen = "unix:{path}"\n[apps.a]\nkey = "key-a"\n'
    )
    gw = GatewayProcess(config)
    gw.start()
    try:
        # Up before "listening on", which start() waited for.
        assert path.exists()
        assert "admin listener on unix:" in gw.log_text()
        sock = StdSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_all(sock)
        sock.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        families = {f.name for f in text_string_to_metric_families(body.decode())}
        assert "tether_connects" in families
    finally:
        assert gw.stop() == 0
    assert not path.exists()  # removed at exit


def unix_get(path: Path, target: str) -> tuple[bytes, bytes]:
    sock = StdSocket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(str(path))
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = read_all(sock)
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def test_workers_each_answer_for_themselves(tmp_path: Path) -> None:
    """`tether serve --workers 2`: each worker its own admin socket (admin-0.sock,
    admin-1.sock: supervisor.worker_config); each scrape names its own node."""
    from tether.devmode import GatewayProcess

    path = tmp_path / "admin.sock"
    config = tmp_path / "tether.toml"
    config.write_text(f'[gateway]\nadmin_listen = "unix:{path}"\n[apps.a]\nkey = "key-a"\n')
    gw = GatewayProcess(config, args=["--workers", "2"])
    gw.start()
    try:
        paths = [tmp_path / "admin-0.sock", tmp_path / "admin-1.sock"]
        assert wait_for(lambda: all(p.exists() for p in paths)), gw.log_text()
        nodes = set()
        for p in paths:
            assert wait_for(lambda p=p: unix_get(p, "/readyz")[0].startswith(b"HTTP/1.1 200"))
            head, body = unix_get(p, "/metrics")
            assert head.startswith(b"HTTP/1.1 200")
            for family in text_string_to_metric_families(body.decode()):
                if family.name == "tether_build_info":
                    nodes.add(family.samples[0].labels["node"])
        assert len(nodes) == 2, nodes
        assert all(node.endswith(("-0", "-1")) for node in nodes)
    finally:
        assert gw.stop() == 0


def test_readyz_turns_503_when_sigterm_drains_a_real_gateway(tmp_path: Path) -> None:
    """`tether serve` given SIGTERM with a socket open drains: /readyz answers 503 (the admin
    listener stays up) until the socket closes and the gateway exits 0."""
    import os
    import signal

    from tether.devmode import GatewayProcess

    path = tmp_path / "admin.sock"
    config = tmp_path / "tether.toml"
    config.write_text(
        f'[gateway]\nadmin_listen = "unix:{path}"\n[resolver]\nmode = "static"\n'
        f'[policy]\nallow = ["127.0.0.1:*"]\n[apps.a]\nkey = "key-a"\n'
    )
    gw = GatewayProcess(config)
    address = gw.start()
    client_settings.configure(client_settings.Settings(
        gateway=parse_endpoint(address), app="a", key="key-a"
    ))
    try:
        assert unix_get(path, "/readyz")[1] == b"ready\n"
        with Peer(echo) as peer:
            sock = ts.create_connection(peer.address, timeout=TIMEOUT)
            sock.sendall(b"ping")
            assert recv_exact(sock, 4) == b"ping"
            assert gw.proc is not None
            os.kill(gw.proc.pid, signal.SIGTERM)
            assert wait_for(lambda: unix_get(path, "/readyz")[0].startswith(b"HTTP/1.1 503"))
            _, body = unix_get(path, "/readyz")
            assert body == (
                b"not ready: the gateway is draining: live sockets finish, new work goes "
                b"elsewhere\n"
            )
            assert unix_get(path, "/healthz")[0].startswith(b"HTTP/1.1 200")
            # The drain lets the live socket finish its work.
            sock.sendall(b"pong")
            assert recv_exact(sock, 4) == b"pong"
            sock.close()
        assert gw.proc.wait(TIMEOUT) == 0
    finally:
        client_settings.configure(None)
        control.close_all()
        gw.stop()


def test_ledger_gauges_when_a_ledger_is_configured(tmp_path: Path) -> None:
    """With [usage] (SQLite here), the ledger's lag and backlog are scraped; once a flush is
    confirmed the lag is at most the flush interval (no sleeping: the flush is run now)."""
    import asyncio

    config = parse_config({
        "gateway": {"listen": ["127.0.0.1:0"], "admin_listen": "127.0.0.1:0"},
        "usage": {"path": str(tmp_path / "usage.db"), "flush_interval": 60},
        "resolver": {"mode": "static"},
        "policy": {"allow": ["127.0.0.1:*"]},
        "apps": {"a": {"key": KEYS["a"]}},
    })
    gw = EmbeddedGateway(config)
    gw.start()
    try:
        port = admin_port(gw)
        before = Scrape(port)
        assert before.value("tether_ledger_pending_rows") >= 0
        assert before.value("tether_ledger_write_failures") == 0
        assert before.value("tether_ledger_dropped_rows_total") == 0
        ledger = core(gw).ledger
        assert ledger is not None
        assert before.value("tether_ledger_flush_lag_seconds") >= 0
        # As if the gateway had run 1,000 s without a flush confirmed.
        gw.call(lambda: setattr(ledger, "started", ledger.started - 1000))
        assert Scrape(port).value("tether_ledger_flush_lag_seconds") >= 1000
        # Something to write: a socket's bytes, sampled into a row, then flushed.
        as_app(gw, "a")
        with Peer(echo) as peer:
            sock = ts.create_connection(peer.address, timeout=TIMEOUT)
            sock.sendall(b"ledger")
            assert recv_exact(sock, 6) == b"ledger"
            sock.close()
        gw.call(ledger.sample)
        assert Scrape(port).value("tether_ledger_pending_rows") == 1
        assert gw._loop is not None
        flushed = asyncio.run_coroutine_threadsafe(ledger.flush(), gw._loop).result(TIMEOUT)
        assert flushed
        assert Scrape(port).value("tether_ledger_pending_rows") == 0
        after = Scrape(port)
        assert after.value("tether_ledger_write_failures") == 0
        assert after.value("tether_ledger_flush_lag_seconds") < 60
        assert after.value("tether_ledger_flush_lag_seconds") == pytest.approx(
            gw.call(ledger.flush_lag), abs=5
        )
    finally:
        client_settings.configure(None)
        control.close_all()
        gw.stop()


def test_preauth_refusals_and_handshake_time_with_an_injected_clock() -> None:
    """A wrong key and a silent stream past the handshake deadline are counted by reason;
    a hello that arrives 0.25 s (of the gateway's clock) after its accept is observed in
    the 0.25 s bucket. The clock is moved by the test, the guard's timer run early."""
    from support import FakeClock

    from tether.wire import PROTOCOL_VERSION, Connection, Role, pb

    clock = FakeClock()
    config = parse_config({
        "gateway": {"listen": ["127.0.0.1:0"], "admin_listen": "127.0.0.1:0",
                    "handshake_timeout": 5},
        "apps": {"a": {"key": KEYS["a"]}},
    })
    gw = EmbeddedGateway(config, clock=clock)
    endpoint = gw.start()[0]
    guard = core(gw).guard
    try:
        port = admin_port(gw)
        before = Scrape(port)
        for reason in ("auth_failed", "locked_out", "timed_out", "evicted"):
            assert before.value("tether_preauth_refusals_total", reason=reason) == 0

        def hello(key: str) -> socket.socket:
            assert wait_for(lambda: not guard.pending)  # the stream before is gone
            sock = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(TIMEOUT)
            sock.connect((endpoint.host, endpoint.port))
            assert wait_for(lambda: len(guard.pending) == 1)
            clock.advance(0.25)
            wire = Connection(Role.CLIENT)
            sock.sendall(wire.send(pb.ClientHello(
                protocol_version=PROTOCOL_VERSION, app="a", key=key
            )))
            return sock

        with hello("not-the-key") as bad:
            assert bad.recv(65536)  # the refusal
        with hello(KEYS["a"]) as good:
            assert good.recv(65536)  # the ServerHello
            with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as silent:
                silent.connect((endpoint.host, endpoint.port))
                assert wait_for(lambda: len(guard.pending) == 1)
                clock.advance(5.1)
                gw.call(guard.tick)
                assert wait_for(lambda: not guard.pending)
        after = Scrape(port)
        assert after.value("tether_preauth_refusals_total", reason="auth_failed") == 1
        assert after.value("tether_preauth_refusals_total", reason="timed_out") == 1
        assert after.value("tether_preauth_refusals_total", reason="evicted") == 0
        # Only the hello that authenticated is a handshake: 0.25 s, le="0.25" and above.
        assert after.value("tether_handshake_seconds_count", frontend="tether") == 1
        assert after.value("tether_handshake_seconds_sum", frontend="tether") == 0.25
        assert after.value("tether_handshake_seconds_bucket", frontend="tether", le="0.1") == 0
        assert after.value("tether_handshake_seconds_bucket", frontend="tether", le="0.25") == 1
    finally:
        gw.stop()


def test_udp_datagrams_live_and_closed(gateway: EmbeddedGateway) -> None:
    from udpsupport import UdpPeer

    port = admin_port(gateway)
    assert not Scrape(port).samples("tether_udp_datagrams_total")  # no UDP yet: no series
    as_app(gateway, "a")
    peer = UdpPeer()
    try:
        sock = ts.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(TIMEOUT)
        for i in range(3):
            sock.sendto(b"datagram %d" % i, peer.address)
            assert sock.recvfrom(100)[0] == b"datagram %d" % i
        live = Scrape(port)
        assert live.value("tether_sockets", app="a", transport="udp", state="attached") == 1
        assert live.value("tether_udp_datagrams_total", app="a", direction="out") == 3
        assert live.value("tether_udp_datagrams_total", app="a", direction="in") == 3
        assert live.value("tether_sent_bytes_total", app="a") == 3 * 10
        sock.close()
        assert wait_for(lambda: len(core(gateway).registry) == 0)
    finally:
        peer.close()
    closed = Scrape(port)
    assert closed.value("tether_udp_datagrams_total", app="a", direction="out") == 3
    assert closed.value("tether_udp_datagrams_total", app="a", direction="in") == 3
    assert closed.value("tether_udp_dropped_datagrams_total", app="a", reason="unsolicited") == 0
    assert closed.value("tether_udp_dropped_datagrams_total", app="a", reason="other") == 0


def test_a_socket_slowed_by_its_byte_quota_is_counted_while_it_is() -> None:
    """An app over bytes_out_per_minute is not read from (slowed, not broken): the scrape
    shows its socket as throttled while the gateway holds back."""
    config = parse_config({
        "gateway": {"listen": ["127.0.0.1:0"], "admin_listen": "127.0.0.1:0"},
        "resolver": {"mode": "static"},
        "policy": {"allow": ["127.0.0.1:*"]},
        "apps": {"a": {"key": KEYS["a"], "quota": {"bytes_out_per_minute": "64KiB"}}},
    })
    gw = EmbeddedGateway(config)
    gw.start()

    def drain(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    try:
        port = admin_port(gw)
        assert not Scrape(port).samples("tether_throttled_sockets")
        as_app(gw, "a")
        with Peer(drain) as peer:
            sock = ts.create_connection(peer.address, timeout=TIMEOUT)
            sock.setblocking(False)
            sent = 0
            with contextlib.suppress(BlockingIOError):
                while sent < 64 * 1024 * 1024:  # far past the burst; the kernel fills first
                    sent += sock.send(b"x" * 65536)
            assert wait_for(lambda: bool(Scrape(port).samples("tether_throttled_sockets")))
            assert Scrape(port).value("tether_throttled_sockets", app="a") == 1
            # The app's close waits behind its unsent bytes (the gateway reads them at the
            # quota's pace); stopping the gateway ends the peer's connection now.
            gw.stop()
            sock.close()
    finally:
        client_settings.configure(None)
        control.close_all()
        gw.stop()


def test_a_socks5_handshake_is_observed_under_its_front_end() -> None:
    """The SOCKS5 front-end authenticates through the same guard: its handshake is counted
    under frontend="socks5", not mixed with Tether hellos."""
    config = parse_config({
        "gateway": {"listen": ["127.0.0.1:0"], "admin_listen": "127.0.0.1:0",
                    "socks5_listen": ["127.0.0.1:0"]},
        "apps": {"a": {"key": KEYS["a"]}},
    })
    gw = EmbeddedGateway(config)
    gw.start()
    try:
        proxy = core(gw).socks5_proxy  # socks5h://127.0.0.1:PORT
        host, _, proxy_port = proxy.rpartition("/")[2].rpartition(":")
        with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect((host, int(proxy_port)))
            sock.sendall(b"\x05\x01\x02")  # RFC 1928: version 5, one method: username/password
            assert recv_exact(sock, 2) == b"\x05\x02"
            user, password = b"a", KEYS["a"].encode()
            sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            assert recv_exact(sock, 2) == b"\x01\x00"  # RFC 1929: success
        scrape = Scrape(admin_port(gw))
        assert scrape.value("tether_handshake_seconds_count", frontend="socks5") == 1
        assert scrape.value("tether_handshake_seconds_count", frontend="tether") == 0
    finally:
        gw.stop()
