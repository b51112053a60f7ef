"""The SOCKS5 front-end: the raw wire, then real unmodified clients (curl, PySocks).

An in-thread gateway (injected clock) with `[gateway] socks5_listen` on
loopback TCP and on a Unix socket; names are mapped to loopback by
`[resolver.hosts]`, and `blocked.test` (loopback too, on an allowed port)
is denied by name, so a refusal comes from a rule, never from a real
address. Audit lines are read from the `tether.audit` logger.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http.server
import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import socks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import FakeClock, StdSocket, audit_lines, needs_program, recv_exact
from tcpservers import echo, http_page, serving, wait_for
from udpsupport import UdpPeer, free_udp_port

from tether.config import check_listen, parse_config
from tether.endpoint import parse_endpoint
from tether.errors import ConfigError
from tether.gateway.core.errors import DialTimeout, Refusal
from tether.gateway.embedded import EmbeddedGateway
from tether.gateway.frontends.socks5 import Socks5Association
from tether.proxy import socks5
from tether.wire import pb

KEY = "socks-test-key"
ADMIN_KEY = "socks-test-admin-key"
IDLE = 60.0
TIMEOUT = 10.0
PAGE = b"hello from www.test\n"


@dataclass
class Env:
    gw: EmbeddedGateway
    clock: FakeClock
    socks_port: int
    socks_unix: str
    echo_port: int
    http_port: int
    closed_port: int
    udp: UdpPeer
    udp_denied_port: int
    git_port: int  # a static web server with a bare repository (git's dumb HTTP)
    tmp: Path

    @property
    def gateway(self) -> Any:
        assert self.gw.gateway is not None
        return self.gw.gateway

    def socks_v6_port(self) -> int:
        """The [::1] SOCKS5 listener's port (the URL names the first TCP one)."""
        ports = [int(s.getsockname()[1]) for server in self.gateway._servers
                 for s in server.sockets if s.family == socket.AF_INET6]
        return ports[-1]

    def association(self, bound_port: int) -> Any:
        """The record of the UDP association whose client socket is on `bound_port`.

        (A previous test's socket may still be closing: each test finds its own.)
        """
        def find() -> list[Any]:
            return [r for r in self.gateway.registry if isinstance(
                getattr(r.on_finish, "__self__", None), Socks5Association
            ) and r.on_finish.__self__.client_sock.getsockname()[1] == bound_port]

        [record] = self.gw.call(find)
        return record

    def records(self) -> list[Any]:
        gateway = self.gw.gateway
        assert gateway is not None
        return self.gw.call(lambda: list(gateway.registry))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("socks5")
    udp = UdpPeer()
    repos = _git_repos(tmp)
    with serving(echo) as echo_server, serving(http_page(PAGE)) as web, _static(repos) as git_web:
        closed = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()  # nothing listens there: a connect is refused
        ports = (echo_server.port, web.port, closed_port, git_web)
        config = parse_config({
            "gateway": {
                "listen": ["127.0.0.1:0"],
                "socks5_listen": ["127.0.0.1:0", f"unix:{tmp}/socks.sock", "[::1]:0"],
                "idle_timeout": IDLE,
                "admin_key": ADMIN_KEY,
                # Failed logins answered within a loop turn or two, locked out
                # after a few ("tests" fails twice in this module, on purpose).
                "auth_max_delay": 0.01,
                "auth_failure_limit": 5,
            },
            "resolver": {"mode": "static", "hosts": {
                "www.test": ["127.0.0.1"], "echo.test": ["127.0.0.1"],
                "blocked.test": ["127.0.0.1"],
            }},
            "policy": {
                "allow": [*(f"127.0.0.1:{p}" for p in ports), f"127.0.0.1:{udp.port}/udp"],
            },
            "apps": {
                # The app's rules are checked before the global ones.
                "tests": {"key": KEY, "policy": {"deny": ["blocked.test"]}},
                "local": {"uids": [os.getuid()]},
                "limited": {"key": KEY, "quota": {"datagrams_per_minute": 1}},
                "lockme": {"key": KEY},
            },
        })
        clock = FakeClock()
        gw = EmbeddedGateway(config, clock=clock)
        gw.start()
        gateway = gw.gateway
        assert gateway is not None
        url = gateway.socks5_proxy
        assert url.startswith("socks5h://127.0.0.1:")
        try:
            yield Env(gw, clock, int(url.rsplit(":", 1)[1]), f"{tmp}/socks.sock",
                      echo_server.port, web.port, closed_port, udp,
                      free_udp_port(), git_web, tmp)
        finally:
            gw.stop()
            udp.close()


def _git_repos(tmp: Path) -> Path:
    """tmp/web/repo.git: a bare repository with one commit, ready for git's dumb HTTP."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@test", "-c", "init.defaultBranch=main"]
    work, web = tmp / "work", tmp / "web"
    subprocess.run([*git, "init", "-q", str(work)], check=True, timeout=60)
    (work / "README").write_text("cloned through SOCKS5\n")
    subprocess.run([*git, "-C", str(work), "add", "README"], check=True, timeout=60)
    subprocess.run([*git, "-C", str(work), "commit", "-q", "-m", "one"], check=True, timeout=60)
    subprocess.run([*git, "clone", "-q", "--bare", str(work), str(web / "repo.git")],
                   check=True, timeout=60)
    subprocess.run([*git, "-C", str(web / "repo.git"), "update-server-info"], check=True,
                   timeout=60)
    return web


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _static(directory: Path) -> Iterator[int]:
    """A static file server on loopback for `directory`; yields its port."""
    handler = functools.partial(_Quiet, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


def _open(env: Env) -> socket.socket:
    s = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(("127.0.0.1", env.socks_port))
    return s


def _login(s: socket.socket, app: str = "tests", key: str = KEY) -> bytes:
    s.sendall(b"\x05\x01\x02")
    assert recv_exact(s, 2) == b"\x05\x02"
    s.sendall(b"\x01" + bytes([len(app)]) + app.encode() + bytes([len(key)]) + key.encode())
    return recv_exact(s, 2)


def _connect_request(host: str, port: int) -> bytes:
    return b"\x05\x01\x00" + socks5.encode_address(host, port)


def _read_reply(s: socket.socket) -> tuple[int, str, int]:
    head = recv_exact(s, 4)
    atyp = head[3]
    size = {1: 4, 4: 16}[atyp]
    raw = recv_exact(s, size)
    (port,) = struct.unpack(">H", recv_exact(s, 2))
    host = socket.inet_ntop(socket.AF_INET if atyp == 1 else socket.AF_INET6, raw)
    return head[1], host, port


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


# -- the raw wire --------------------------------------------------------------


def test_a_wrong_key_gets_rfc1929_failure_and_the_stream_closes(env: Env) -> None:
    with _open(env) as s:
        assert _login(s, key="not-the-key") == socks5.AUTH_FAILED
        assert _closed(s)


def test_failed_logins_lock_the_app_out_from_that_peer_even_with_the_right_key(
    env: Env,
) -> None:
    limit = env.gateway.config.auth_failure_limit
    for _ in range(limit):
        with _open(env) as s:
            assert _login(s, app="lockme", key="guess") == socks5.AUTH_FAILED
    with _open(env) as s:
        assert _login(s, app="lockme") == socks5.AUTH_FAILED
    assert env.gw.call(lambda: env.gateway.guard.locked("lockme", "127.0.0.1")) > 0
    with _open(env) as s:  # another app from the same peer is not locked out
        assert _login(s) == socks5.AUTH_OK


def test_no_authentication_over_tcp_is_not_acceptable(env: Env) -> None:
    with _open(env) as s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\xff"
        assert _closed(s)


def test_not_socks5_is_closed_with_the_reason_logged(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    with _open(env) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert _closed(s)
    assert wait_for(lambda: "looks like an HTTP request" in audit.text)


def test_a_denied_destination_gets_reply_2_and_its_audit_line_names_the_rule(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    with _open(env) as s:
        assert _login(s) == socks5.AUTH_OK
        s.sendall(_connect_request("blocked.test", env.echo_port))
        assert _read_reply(s) == (socks5.NOT_ALLOWED, "0.0.0.0", 0)
        assert _closed(s)
    [decision] = audit_lines(audit, "decision")
    assert (decision["app"], decision["host"], decision["verdict"], decision["outcome"]) == (
        "tests", "blocked.test", "deny", "denied")
    assert decision["rule"] == "deny blocked.test"
    assert "blocked.test" in audit.text and "reply 2, connection not allowed by ruleset" in (
        audit.text)


def test_connect_by_name_relays_early_data_and_writes_the_close_line(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    with _open(env) as s:
        key = KEY.encode()
        # A client may pipeline everything: greeting, login, request, first bytes.
        s.sendall(b"\x05\x01\x02" + b"\x01\x05tests" + bytes([len(key)]) + key
                  + _connect_request("echo.test", env.echo_port) + b"early")
        assert recv_exact(s, 4) == b"\x05\x02" + socks5.AUTH_OK
        code, host, port = _read_reply(s)
        assert (code, host) == (socks5.SUCCEEDED, "127.0.0.1") and port > 0  # BND: outbound
        assert recv_exact(s, 5) == b"early"
        s.sendall(b"x" * 1000)
        assert recv_exact(s, 1000) == b"x" * 1000
        [record] = [r for r in env.records() if r.local[1] == port]
        assert (record.app, record.transport) == ("tests", "tcp")
    [decision] = audit_lines(audit, "decision")

    def close_lines() -> list[dict[str, Any]]:  # this socket's (another may close meanwhile)
        return [c for c in audit_lines(audit, "close") if c["descriptor"] == decision["descriptor"]]

    assert wait_for(close_lines)
    [close] = close_lines()
    assert (decision["host"], decision["outcome"]) == ("echo.test", "connected")
    assert (close["bytes_out"], close["bytes_in"], close["transport"]) == (1005, 1005, "tcp")
    assert close["descriptor"] == decision["descriptor"]
    # The echo server closes when it reads the app's EOF: whichever the relay saw first.
    assert close["reason"] in ("closed by the app", "closed by both sides")


def test_a_refused_connect_gets_reply_5(env: Env) -> None:
    with _open(env) as s:
        assert _login(s) == socks5.AUTH_OK
        s.sendall(_connect_request("127.0.0.1", env.closed_port))
        assert _read_reply(s)[0] == socks5.CONNECTION_REFUSED


def test_a_name_that_does_not_resolve_gets_reply_4(env: Env) -> None:
    with _open(env) as s:
        assert _login(s) == socks5.AUTH_OK
        s.sendall(_connect_request("nowhere.test", env.echo_port))  # not in [resolver.hosts]
        assert _read_reply(s)[0] == socks5.HOST_UNREACHABLE


def test_bind_gets_reply_7(env: Env) -> None:
    with _open(env) as s:
        assert _login(s) == socks5.AUTH_OK
        s.sendall(b"\x05\x02\x00" + socks5.encode_address("127.0.0.1", 80))
        assert _read_reply(s)[0] == socks5.COMMAND_NOT_SUPPORTED
        assert _closed(s)


def test_a_unix_peer_mapped_to_an_app_needs_no_authentication(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    with StdSocket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(env.socks_unix)
        s.sendall(b"\x05\x01\x00")
        assert recv_exact(s, 2) == b"\x05\x00"
        s.sendall(_connect_request("127.0.0.1", env.echo_port))
        assert _read_reply(s)[0] == socks5.SUCCEEDED
        s.sendall(b"ping")
        assert recv_exact(s, 4) == b"ping"
    [decision] = audit_lines(audit, "decision")
    assert decision["app"] == "local"


def test_shutdown_or_revocation_ends_a_stream_still_in_its_handshake(env: Env) -> None:
    with _open(env) as s:
        s.sendall(b"\x05\x01\x02")
        assert recv_exact(s, 2) == b"\x05\x02"
        gateway = env.gw.gateway
        assert gateway is not None
        assert wait_for(lambda: env.gw.call(lambda: len(gateway.streams)) >= 1)
        # The core ends every stream it holds (what revocation and shutdown do).
        refusal = Refusal(pb.Error.AUTH_FAILED, errno.EACCES, "tether: app 'tests' revoked")
        assert env.gw.call(lambda: gateway._end_streams(refusal, "tests")) == 0  # not its app yet
        assert env.gw.call(lambda: gateway._end_streams(refusal)) >= 1
        assert _closed(s)


def test_a_silent_client_is_closed_at_the_handshake_deadline(env: Env) -> None:
    with _open(env) as s:
        s.sendall(b"\x05\x01\x02")  # a greeting, then nothing
        assert recv_exact(s, 2) == b"\x05\x02"
        guard = env.gateway.guard
        assert wait_for(lambda: env.gw.call(lambda: len(guard.pending)) >= 1)
        env.clock.advance(env.gateway.config.handshake_timeout + 1)
        env.gw.call(guard.tick)
        assert _closed(s)


def test_the_admin_identity_opens_nothing(env: Env) -> None:
    """Refused at login, as on the HTTP proxy (Guard.check: the admin key is not looked at)."""
    with _open(env) as s:
        assert _login(s, app="*", key=ADMIN_KEY) != socks5.AUTH_OK
        assert _closed(s)
    failed = env.gw.call(lambda: dict(env.gateway.guard.failed_pair))
    assert failed.get(("*", "127.0.0.1"), 0) >= 1


def test_ipv6_listener_udp_associate_reaches_an_ipv4_destination(env: Env) -> None:
    """The client on ::1, the destination on 127.0.0.1: the dual-stack outbound socket."""
    with StdSocket(socket.AF_INET6, socket.SOCK_STREAM) as control, StdSocket(
        socket.AF_INET6, socket.SOCK_DGRAM
    ) as udp:
        control.settimeout(TIMEOUT)
        udp.settimeout(TIMEOUT)
        control.connect(("::1", env.socks_v6_port()))
        assert _login(control) == socks5.AUTH_OK
        udp.bind(("::1", 0))
        control.sendall(b"\x05\x03\x00" + socks5.encode_address("::", udp.getsockname()[1]))
        code, host, port = _read_reply(control)
        assert (code, host) == (socks5.SUCCEEDED, "::1")
        udp.sendto(socks5.build_datagram("127.0.0.1", env.udp.port, b"over v6"), (host, port))
        reply = socks5.parse_datagram(udp.recv(256))
        assert (reply.host, reply.port, reply.data) == ("127.0.0.1", env.udp.port, b"over v6")
        # A header the gateway cannot read is dropped, not relayed.
        udp.sendto(b"\x00\x00\x01" + socks5.encode_address("127.0.0.1", env.udp.port), (host, port))

        def counters() -> dict[str, int]:
            return dict(env.association(port).extra)

        assert wait_for(lambda: counters()["dropped"] == 1)


# Random bytes after a greeting or half a login. The login is app "fuzz" (no
# such app): failed logins are throttled per (app, peer), and "tests" must not
# be locked out for the module's other tests.
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from([b"", b"\x05\x01\x02", b"\x05\x01\x02\x01\x04fuzz"]),
       garbage=st.binary(max_size=300))
def test_whatever_a_client_sends_the_front_end_serves_on(
    env: Env, audit: pytest.LogCaptureFixture, prefix: bytes, garbage: bytes
) -> None:
    with _open(env) as s, contextlib.suppress(OSError):
        s.sendall(prefix + garbage)
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass
    assert "internal error" not in audit.text
    with _open(env) as s:  # and a well-behaved client is still served
        assert _login(s) == socks5.AUTH_OK


# -- real clients --------------------------------------------------------------

CURL = shutil.which("curl")
needs_curl = needs_program("curl")


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run([CURL, "-sS", "--max-time", "20", *args], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


@needs_curl
def test_curl_socks5_hostname_sends_the_name_to_the_gateway(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    done = _curl("--socks5-hostname", f"127.0.0.1:{env.socks_port}", "--proxy-user",
                 f"tests:{KEY}", f"http://www.test:{env.http_port}/")
    assert (done.returncode, done.stdout) == (0, PAGE.decode()), done.stderr
    [decision] = audit_lines(audit, "decision")
    assert (decision["host"], decision["verdict"], decision["outcome"]) == (
        "www.test", "allow", "connected")
    assert wait_for(lambda: audit_lines(audit, "close"))


@needs_curl
def test_curl_socks5_with_an_address_and_a_socks5h_url(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    done = _curl("--socks5", f"127.0.0.1:{env.socks_port}", "--proxy-user", f"tests:{KEY}",
                 f"http://127.0.0.1:{env.http_port}/")
    assert (done.returncode, done.stdout) == (0, PAGE.decode()), done.stderr
    done = _curl("-x", f"socks5h://tests:{KEY}@127.0.0.1:{env.socks_port}",
                 f"http://www.test:{env.http_port}/")
    assert (done.returncode, done.stdout) == (0, PAGE.decode()), done.stderr
    hosts = [d["host"] for d in audit_lines(audit, "decision")]
    assert hosts == ["127.0.0.1", "www.test"]


@needs_curl
def test_curl_is_refused_for_a_denied_name_and_for_a_wrong_key(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    done = _curl("--socks5-hostname", f"127.0.0.1:{env.socks_port}", "--proxy-user",
                 f"tests:{KEY}", f"http://blocked.test:{env.echo_port}/")
    # curl 7.88 prints the reply code: 2, "connection not allowed by ruleset".
    assert done.returncode == 97 and done.stderr.rstrip().endswith("(2)"), done.stderr
    [decision] = audit_lines(audit, "decision")
    assert (decision["rule"], decision["verdict"]) == ("deny blocked.test", "deny")
    done = _curl("--socks5-hostname", f"127.0.0.1:{env.socks_port}", "--proxy-user",
                 "tests:wrong", f"http://www.test:{env.http_port}/")
    assert done.returncode == 97 and "rejected" in done.stderr, done.stderr


@needs_curl
def test_curl_through_the_unix_listener_as_a_uid_mapped_app(env: Env) -> None:
    done = _curl("-x", f"socks5h://localhost{env.socks_unix}",
                 f"http://www.test:{env.http_port}/")
    if done.returncode != 0 and "unix" in done.stderr.lower():
        pytest.skip(f"this curl cannot reach a SOCKS5 proxy on a Unix socket: {done.stderr}")
    assert (done.returncode, done.stdout) == (0, PAGE.decode()), done.stderr


@needs_program("git")
def test_git_clone_through_socks5h(env: Env, audit: pytest.LogCaptureFixture) -> None:
    target = env.tmp / "clone"
    done = subprocess.run(
        ["git", "-c", f"http.proxy=socks5h://tests:{KEY}@127.0.0.1:{env.socks_port}",
         "clone", "-q", f"http://www.test:{env.git_port}/repo.git", str(target)],
        capture_output=True, text=True, timeout=120, check=False,
        env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
    )
    assert done.returncode == 0, done.stderr
    assert (target / "README").read_text() == "cloned through SOCKS5\n"
    decisions = audit_lines(audit, "decision")
    assert decisions and {(d["host"], d["outcome"]) for d in decisions} == {
        ("www.test", "connected")}


JAVA_GET = r"""
import java.io.*;
import java.net.*;

public class Get {
    public static void main(String[] args) throws Exception {
        Authenticator.setDefault(new Authenticator() {
            protected PasswordAuthentication getPasswordAuthentication() {
                return new PasswordAuthentication(args[2], args[3].toCharArray());
            }
        });
        Socket s = new Socket();  // socksProxyHost/Port: through the gateway
        s.connect(InetSocketAddress.createUnresolved(args[0], Integer.parseInt(args[1])), 20000);
        s.getOutputStream().write(("GET / HTTP/1.0\r\nHost: " + args[0] + "\r\n\r\n").getBytes());
        System.out.print(new String(s.getInputStream().readAllBytes()));
    }
}
"""


@needs_program("java")
def test_java_socket_through_socks5(env: Env, audit: pytest.LogCaptureFixture) -> None:
    source = env.tmp / "Get.java"
    source.write_text(JAVA_GET)
    done = subprocess.run(
        ["java", "-DsocksProxyHost=127.0.0.1", f"-DsocksProxyPort={env.socks_port}",
         str(source), "www.test", str(env.http_port), "tests", KEY],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(PAGE.decode())
    [decision] = audit_lines(audit, "decision")
    assert (decision["host"], decision["outcome"]) == ("www.test", "connected")


def _pysocks(env: Env, kind: int, app: str = "tests") -> socks.socksocket:
    s = socks.socksocket(socket.AF_INET, kind)
    s.set_proxy(socks.SOCKS5, "127.0.0.1", env.socks_port, rdns=True, username=app,
                password=KEY)
    s.settimeout(TIMEOUT)
    return s


def test_pysocks_tcp_by_name(env: Env) -> None:
    with _pysocks(env, socket.SOCK_STREAM) as s:
        s.connect(("echo.test", env.echo_port))
        s.sendall(b"through socks")
        assert recv_exact(s, 13) == b"through socks"


def test_pysocks_tcp_denied_is_reported_as_the_ruleset(env: Env) -> None:
    with _pysocks(env, socket.SOCK_STREAM) as s, pytest.raises(
        socks.GeneralProxyError, match="not allowed by ruleset"
    ):
        s.connect(("blocked.test", env.echo_port))


def test_pysocks_udp_associate_relays_meters_and_drops_denied_destinations(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    with _pysocks(env, socket.SOCK_DGRAM) as s:
        s.sendto(b"ping", ("127.0.0.1", env.udp.port))
        data, source = s.recvfrom(64)
        assert (data, source) == (b"ping", ("127.0.0.1", env.udp.port))
        s.sendto(b"not allowed", ("127.0.0.1", env.udp_denied_port))
        s.sendto(b"pong!", ("127.0.0.1", env.udp.port))
        assert s.recvfrom(64)[0] == b"pong!"
        record = env.association(StdSocket.getpeername(s)[1])  # PySocks sends to the reply's BND

        def counters() -> dict[str, int]:
            return dict(record.extra)

        assert wait_for(lambda: counters()["dropped_denied"] == 1)
        assert counters()["datagrams_out"] == counters()["datagrams_in"] == 2

    def close_lines() -> list[dict[str, Any]]:
        return [c for c in audit_lines(audit, "close") if c["descriptor"] == record.descriptor[:8]]

    assert wait_for(close_lines)
    [close] = close_lines()
    assert (close["transport"], close["bytes_out"], close["bytes_in"]) == ("udp", 9, 9)
    assert close["reason"] == "closed by the app"
    decisions = audit_lines(audit, "decision")
    assert [(d["port"], d["transport"], d["outcome"]) for d in decisions] == [
        (env.udp.port, "udp", "allowed"), (env.udp_denied_port, "udp", "denied")]
    assert [data for data, _ in env.udp.received][-2:] == [b"ping", b"pong!"]


def test_udp_datagrams_are_charged_to_the_apps_datagram_quota(env: Env) -> None:
    with _pysocks(env, socket.SOCK_DGRAM, app="limited") as s:
        s.sendto(b"first", ("127.0.0.1", env.udp.port))
        assert s.recvfrom(64)[0] == b"first"
        # datagrams_per_minute = 1 and the gateway's clock stands still: dropped.
        s.sendto(b"second", ("127.0.0.1", env.udp.port))
        s.sendto(b"third", ("127.0.0.1", env.udp.port))
        record = env.association(StdSocket.getpeername(s)[1])

        def counters() -> dict[str, int]:
            return dict(record.extra)

        assert wait_for(lambda: counters()["dropped_quota"] == 2)
        assert counters()["datagrams_out"] == 1
    assert b"second" not in [data for data, _ in env.udp.received]


def test_an_association_decides_at_most_max_destinations(env: Env) -> None:
    from tether.gateway.udp import MAX_DESTINATIONS

    extra = 6
    with _pysocks(env, socket.SOCK_DGRAM) as s:
        s.sendto(b"ok", ("127.0.0.1", env.udp.port))
        assert s.recvfrom(8)[0] == b"ok"
        # Loopback ports no rule allows: each new one is one decision (denied), up
        # to the cap; past it the datagram is dropped without one.
        ports = [p for p in range(20000, 20200) if p != env.udp.port][:MAX_DESTINATIONS + extra]
        for port in ports:
            s.sendto(b"x", ("127.0.0.1", port))
        record = env.association(StdSocket.getpeername(s)[1])

        def counters() -> dict[str, int]:
            return dict(record.extra)

        assert wait_for(lambda: counters()["dropped_denied"] + counters()["dropped"] == len(ports))
        # The allowed destination is one of the MAX_DESTINATIONS decided.
        assert counters()["dropped_denied"] == MAX_DESTINATIONS - 1
        assert counters()["dropped"] == extra + 1


def test_the_tether_hello_offers_the_socks5_url(env: Env) -> None:
    from tether.cli.run import offered_proxies
    from tether.client.settings import Settings

    gateway = env.gw.gateway
    assert gateway is not None
    settings = Settings(gateway=env.gw.endpoints[0], app="tests", key=KEY)
    assert offered_proxies(settings)[1] == f"socks5h://127.0.0.1:{env.socks_port}"


def test_an_idle_association_is_reclaimed_and_its_stream_closed(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    with _pysocks(env, socket.SOCK_DGRAM) as s:
        s.sendto(b"hi", ("127.0.0.1", env.udp.port))
        assert s.recvfrom(8)[0] == b"hi"
        record = env.association(StdSocket.getpeername(s)[1])
        env.clock.advance(IDLE + 1)
        env.gw.call(env.gateway.sweep)
        assert wait_for(lambda: record not in env.records())
        control = s._proxyconn  # PySocks' TCP stream that holds the association
        control.settimeout(TIMEOUT)
        assert _closed(control)

    def close_lines() -> list[dict[str, Any]]:
        return [c for c in audit_lines(audit, "close") if c["descriptor"] == record.descriptor[:8]]

    assert wait_for(close_lines)
    [close] = close_lines()
    assert str(close["reason"]).startswith("reclaimed by the gateway after")


# -- config --------------------------------------------------------------------


def test_socks5_listen_is_parsed_and_off_loopback_needs_cleartext_keys() -> None:
    config = parse_config({"gateway": {"socks5_listen": ["127.0.0.1:1080", "unix:/tmp/s"]}})
    assert config.socks5_listen == (parse_endpoint("127.0.0.1:1080"), parse_endpoint("unix:/tmp/s"))
    assert parse_config({}).socks5_listen == ()
    wide = parse_config({"gateway": {"socks5_listen": "0.0.0.0:1080"}})
    with pytest.raises(ConfigError, match=r"gateway\.socks5_listen\[0\]"):
        check_listen(wide)
    with pytest.raises(ConfigError, match=r"gateway\.socks5_listen\[0\]"):
        parse_config({"gateway": {"socks5_listen": ["nohost:port"]}})
    with pytest.raises(ConfigError, match="already"):
        parse_config({
            "gateway": {"socks5_listen": "unix:/tmp/x"},
            "apps": {"a": {"listen": "unix:/tmp/x"}},
        })


def test_proxy_url_names_the_first_tcp_listener() -> None:
    from tether.gateway.frontends.socks5 import proxy_url

    assert proxy_url([]) == ""
    assert proxy_url([parse_endpoint("unix:/run/s.sock")]) == "socks5h://localhost/run/s.sock"
    assert proxy_url([parse_endpoint("unix:/a"), parse_endpoint("[::1]:1080")]) == (
        "socks5h://[::1]:1080")


def test_reply_codes_for_refusals() -> None:
    from tether.gateway.frontends.socks5 import reply_code

    table = [
        (Refusal(pb.Error.PERMISSION_DENIED, errno.EACCES, "x"), socks5.NOT_ALLOWED),
        (Refusal(pb.Error.QUOTA, errno.EDQUOT, "x"), socks5.NOT_ALLOWED),
        (Refusal(pb.Error.GAI, -2, "x"), socks5.HOST_UNREACHABLE),
        (Refusal(pb.Error.LIMIT, errno.EMFILE, "x"), socks5.GENERAL_FAILURE),
        (Refusal(pb.Error.SYSTEM, errno.EAFNOSUPPORT, "x"), socks5.ADDRESS_TYPE_NOT_SUPPORTED),
        (DialTimeout("h", 1, 2.0), socks5.TTL_EXPIRED),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), socks5.CONNECTION_REFUSED),
        (OSError(errno.EHOSTUNREACH, "no route"), socks5.HOST_UNREACHABLE),
    ]
    for failure, code in table:
        assert reply_code(failure) == code, failure

