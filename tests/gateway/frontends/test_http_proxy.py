"""The HTTP proxy front-end: the raw wire, then real unmodified clients (curl, wget).

An in-thread gateway (injected clock) with `[gateway] http_proxy_listen` on
loopback TCP and on a Unix socket; names are mapped to loopback by
`[resolver.hosts]`, and `blocked.test` (loopback too, on an allowed port)
is denied by name by the app's own rule, so a refusal comes from a rule,
never from a real address. Audit lines are read from the `tether.audit`
logger.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import http.server
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from support import FakeClock, StdSocket, audit_lines, needs_program, recv_exact
from tcpservers import echo, serving, wait_for

from tether.cli.run import offered_proxies
from tether.client.settings import Settings
from tether.config import check_listen, parse_config
from tether.endpoint import parse_endpoint
from tether.errors import ConfigError
from tether.gateway.core.errors import DialTimeout, Failure, Refusal
from tether.gateway.embedded import EmbeddedGateway
from tether.gateway.frontends.http_proxy import refusal_response
from tether.policy import ResolutionError
from tether.proxy.http import HttpProxy
from tether.wire import pb

KEY = "http-proxy-test-key"
IDLE = 60.0
TIMEOUT = 10.0
PAGE = b"hello from tls.test\n"

needs_curl = needs_program("curl")


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers with what it was sent: the request line, the headers, the body."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        text = f"{self.requestline}\n{self.headers}".encode() + body
        self.send_response(200)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Env:
    gw: EmbeddedGateway
    clock: FakeClock
    gateway_address: str
    proxy: str  # host:port
    proxy_unix: str
    http_port: int
    tls_port: int
    echo_port: int
    closed_port: int
    cafile: Path

    def records(self) -> list[Any]:
        gateway = self.gw.gateway
        assert gateway is not None
        return self.gw.call(lambda: list(gateway.registry))

    def curl(
        self, *args: str, auth: str | None = f"tests:{KEY}"
    ) -> subprocess.CompletedProcess[str]:
        """curl through the proxy (`auth`: APP:KEY in the proxy URL, None: no credentials)."""
        proxy = f"http://{auth}@{self.proxy}" if auth is not None else f"http://{self.proxy}"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        return subprocess.run(
            ["curl", "-sS", "-i", "--max-time", str(TIMEOUT), "-x", proxy, *args],
            capture_output=True, text=True, timeout=2 * TIMEOUT, env=env, check=False,
        )


def _serve(server: http.server.HTTPServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("http-proxy")
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("tls.test").configure_cert(context)
    cafile = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    _serve(plain)
    _serve(tls)
    with serving(echo) as echo_server:
        closed = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()  # nothing listens there: a connect is refused
        ports = (plain.server_address[1], tls.server_address[1], echo_server.port, closed_port)
        config = parse_config({
            "gateway": {
                "listen": ["127.0.0.1:0"],
                "http_proxy_listen": ["127.0.0.1:0", f"unix:{tmp}/http.sock"],
                "idle_timeout": IDLE,
            },
            "resolver": {"mode": "static", "hosts": {
                "www.test": ["127.0.0.1"], "tls.test": ["127.0.0.1"],
                "echo.test": ["127.0.0.1"], "blocked.test": ["127.0.0.1"],
            }},
            "policy": {"allow": [f"127.0.0.1:{p}" for p in ports]},
            "apps": {
                # The app's rules are checked before the global ones.
                "tests": {"key": KEY, "policy": {"deny": ["blocked.test"]}},
                "one": {"key": "one-key", "max_sockets": 1},
                "rate": {"key": "rate-key", "quota": {"connects_per_minute": 1}},
                "local": {"uids": [os.getuid()]},
            },
        })
        clock = FakeClock()
        gw = EmbeddedGateway(config, clock=clock)
        endpoints = gw.start()
        gateway = gw.gateway
        assert gateway is not None
        url = gateway.http_proxy
        assert url.startswith("http://127.0.0.1:")
        try:
            yield Env(gw, clock, str(endpoints[0]), url.removeprefix("http://"),
                      f"{tmp}/http.sock", plain.server_address[1], tls.server_address[1],
                      echo_server.port, closed_port, cafile)
        finally:
            gw.stop()
            for server in (plain, tls):
                server.shutdown()
                server.server_close()


def _decision(caplog: pytest.LogCaptureFixture, host: str) -> dict[str, Any]:
    assert wait_for(lambda: [d for d in audit_lines(caplog, "decision") if d["host"] == host])
    return [d for d in audit_lines(caplog, "decision") if d["host"] == host][-1]


def _close_line(caplog: pytest.LogCaptureFixture, descriptor: str) -> dict[str, Any]:
    def found() -> list[dict[str, Any]]:
        return [c for c in audit_lines(caplog, "close") if c["descriptor"] == descriptor]

    assert wait_for(found)
    return found()[0]


def _open(env: Env) -> socket.socket:
    s = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    host, port = env.proxy.rsplit(":", 1)
    s.connect((host, int(port)))
    return s


def _auth(app: str = "tests", key: str = KEY) -> str:
    return "Proxy-Authorization: Basic " + base64.b64encode(f"{app}:{key}".encode()).decode()


def _head(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and the rest read so far of a response."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, rest


def _body(s: socket.socket, rest: bytes, headers: dict[str, str]) -> bytes:
    return rest + recv_exact(s, int(headers["Content-Length"]) - len(rest))


# -- the raw wire --------------------------------------------------------------


def test_the_gateway_offers_its_proxy_in_the_server_hello(env: Env) -> None:
    settings = Settings(gateway=parse_endpoint(env.gateway_address), app="tests", key=KEY)
    http, socks5 = offered_proxies(settings)
    assert http == f"http://{env.proxy}"  # the TCP listener: a URL cannot name a Unix socket
    assert socks5 == ""  # not configured here


def test_connect_carries_the_early_bytes_and_both_directions(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    with _open(env) as s:
        # The head and the first payload in one write: the payload is the peer's.
        s.sendall(f"CONNECT echo.test:{env.echo_port} HTTP/1.1\r\nHost: echo.test\r\n"
                  f"{_auth()}\r\n\r\nfirst".encode())
        status, headers, rest = _head(s)
        assert (status, headers) == (200, {})
        assert rest + recv_exact(s, 5 - len(rest)) == b"first"
        s.sendall(b"x" * 100_000)
        assert recv_exact(s, 100_000) == b"x" * 100_000
        descriptor = _decision(audit, "echo.test")["descriptor"]
    close = _close_line(audit, descriptor)
    # The same meter as a native socket: what the peer got and sent.
    assert (close["bytes_out"], close["bytes_in"]) == (100_005, 100_005)
    assert close["app"] == "tests"


def test_a_denied_destination_gets_403_with_the_reason_and_rule(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    with _open(env) as s:
        s.sendall(f"CONNECT blocked.test:{env.echo_port} HTTP/1.1\r\nHost: b\r\n{_auth()}"
                  "\r\n\r\n".encode())
        status, headers, rest = _head(s)
        body = _body(s, rest, headers)
    assert status == 403
    refusal = headers["X-Tether-Refusal"]
    assert refusal.startswith(f"tether: connection to blocked.test:{env.echo_port} denied "
                              "for app 'tests'")
    assert headers["X-Tether-Rule"] == "deny blocked.test"
    assert body.decode() == refusal + "\n"
    decision = _decision(audit, "blocked.test")
    assert (decision["outcome"], decision["rule"], decision["app"]) == (
        "denied", "deny blocked.test", "tests")


@pytest.mark.parametrize(
    ("auth", "words"),
    [
        ("", "send Proxy-Authorization: Basic APP:KEY"),
        (_auth(key="wrong"), "app 'tests' authentication failed"),
        (_auth(app="*", key="x"), "the admin identity can list sockets but not open them"),
        ("Proxy-Authorization: Bearer t", "scheme 'Bearer' is not served"),
    ],
)
def test_without_usable_credentials_407_says_why(env: Env, auth: str, words: str) -> None:
    with _open(env) as s:
        s.sendall(f"CONNECT echo.test:{env.echo_port} HTTP/1.1\r\nHost: e\r\n"
                  f"{auth + chr(13) + chr(10) if auth else ''}\r\n".encode())
        status, headers, rest = _head(s)
        body = _body(s, rest, headers)
    assert status == 407
    assert headers["Proxy-Authenticate"] == 'Basic realm="tether"'
    assert words in headers["X-Tether-Refusal"]
    assert words in body.decode()


def test_a_unix_listener_knows_the_app_by_its_uid_without_a_key(env: Env) -> None:
    with StdSocket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(env.proxy_unix)
        s.sendall(f"CONNECT echo.test:{env.echo_port} HTTP/1.1\r\nHost: e\r\n\r\nping".encode())
        status, _, rest = _head(s)
        assert status == 200
        assert rest + recv_exact(s, 4 - len(rest)) == b"ping"
    # ... and a key for another app on that connection is refused.
    with StdSocket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(env.proxy_unix)
        s.sendall(f"CONNECT echo.test:{env.echo_port} HTTP/1.1\r\nHost: e\r\n{_auth()}\r\n\r\n"
                  .encode())
        status, headers, _ = _head(s)
    assert status == 407
    assert "this stream is app 'local'" in headers["X-Tether-Refusal"]


@pytest.mark.parametrize(
    ("head", "status", "words"),
    [
        ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "this is a proxy"),
        ("GET https://tls.test/ HTTP/1.1\r\nHost: x\r\n\r\n", 501, "use CONNECT"),
        ("CONNECT tls.test HTTP/1.1\r\nHost: x\r\n\r\n", 400, "give the port"),
    ],
)
def test_a_request_the_proxy_does_not_serve(env: Env, head: str, status: int, words: str) -> None:
    with _open(env) as s:
        s.sendall(head.encode())
        got, headers, rest = _head(s)
        assert got == status
        assert words in _body(s, rest, headers).decode()


def test_a_refused_dial_is_502_naming_app_and_destination(env: Env) -> None:
    with _open(env) as s:
        s.sendall(f"CONNECT www.test:{env.closed_port} HTTP/1.1\r\nHost: w\r\n{_auth()}\r\n\r\n"
                  .encode())
        status, headers, _ = _head(s)
    assert status == 502
    assert headers["X-Tether-Refusal"].startswith(
        f"tether: app 'tests' to www.test:{env.closed_port}: ")
    assert "refused" in headers["X-Tether-Refusal"].lower()


def test_an_app_at_its_socket_cap_gets_429_naming_the_limit(env: Env) -> None:
    with _open(env) as first:
        first.sendall(f"CONNECT echo.test:{env.echo_port} HTTP/1.1\r\nHost: e\r\n"
                      f"{_auth('one', 'one-key')}\r\n\r\n".encode())
        assert _head(first)[0] == 200
        with _open(env) as second:
            second.sendall(f"CONNECT echo.test:{env.echo_port} HTTP/1.1\r\nHost: e\r\n"
                           f"{_auth('one', 'one-key')}\r\n\r\n".encode())
            status, headers, _ = _head(second)
    assert status == 429
    assert headers["X-Tether-Rule"]  # the limit's name
    assert "app 'one' has 1 open sockets" in headers["X-Tether-Refusal"]


def test_a_quota_refusal_is_429_with_retry_after(env: Env) -> None:
    head = (f"CONNECT echo.test:{env.echo_port} HTTP/1.1\r\nHost: e\r\n"
            f"{_auth('rate', 'rate-key')}\r\n\r\n").encode()
    with _open(env) as first:
        first.sendall(head)
        assert _head(first)[0] == 200
    with _open(env) as second:
        second.sendall(head)
        status, headers, _ = _head(second)
    assert status == 429
    assert int(headers["Retry-After"]) >= 1  # when the minute's budget refills
    assert "connects_per_minute" in headers["X-Tether-Rule"]
    assert "'rate'" in headers["X-Tether-Refusal"]


def test_an_idle_tunnel_is_reclaimed_like_a_native_socket(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    with _open(env) as s:
        s.sendall(f"CONNECT echo.test:{env.echo_port} HTTP/1.1\r\nHost: e\r\n{_auth()}\r\n\r\n"
                  .encode())
        assert _head(s)[0] == 200
        descriptor = _decision(audit, "echo.test")["descriptor"]
        env.clock.advance(IDLE + 1)
        gateway = env.gw.gateway
        assert gateway is not None
        assert env.gw.call(gateway.sweep) >= 1
        with contextlib.suppress(ConnectionResetError):  # the reclaim resets the stream
            assert s.recv(1) == b""
    close = _close_line(audit, descriptor)
    assert close["reason"].startswith("reclaimed by the gateway after")


def test_a_connection_without_a_whole_head_in_time_gets_408(env: Env) -> None:
    gateway = env.gw.gateway
    assert gateway is not None
    with _open(env) as s:
        s.sendall(b"CONNECT echo.test:1 HTTP/1.1\r\n")  # half a head, then nothing
        assert wait_for(lambda: env.gw.call(lambda: len(gateway.guard.pending)) == 1)
        env.clock.advance(gateway.config.handshake_timeout + 1)
        env.gw.call(gateway.guard.tick)  # what its timer runs
        status, headers, _ = _head(s)
    assert status == 408
    assert "(gateway.handshake_timeout)" in headers["X-Tether-Refusal"]


def test_a_refused_connection_that_lingers_is_answered_once(env: Env) -> None:
    # After a 407 the gateway drops what the client still sends until it
    # closes; the handshake deadline then only closes it (a second answer
    # after write_eof() would raise in the guard's timer).
    gateway = env.gw.gateway
    assert gateway is not None
    with _open(env) as s:
        s.sendall(b"CONNECT echo.test:1 HTTP/1.1\r\nHost: e\r\n\r\n")
        status, headers, rest = _head(s)
        assert status == 407
        assert _body(s, rest, headers).startswith(b"tether: send Proxy-Authorization")
        s.sendall(b"a body the gateway reads and drops")
        env.clock.advance(gateway.config.handshake_timeout + 1)
        env.gw.call(gateway.guard.tick)
        assert s.recv(65536) == b""
        assert wait_for(lambda: env.gw.call(lambda: len(gateway.guard.pending)) == 0)


def test_failed_keys_are_throttled_and_locked_out_like_native_hellos() -> None:
    config = parse_config({
        "gateway": {"listen": ["127.0.0.1:0"], "http_proxy_listen": "127.0.0.1:0",
                    "auth_failure_limit": 2, "auth_max_delay": 0},
        "apps": {"a": {"key": "right"}},
    })
    gw = EmbeddedGateway(config, clock=FakeClock())
    gw.start()
    try:
        assert gw.gateway is not None
        port = int(gw.gateway.http_proxy.rsplit(":", 1)[1])

        def attempt(key: str) -> str:
            with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(TIMEOUT)
                s.connect(("127.0.0.1", port))
                s.sendall(f"CONNECT x.test:1 HTTP/1.1\r\nHost: x\r\n{_auth('a', key)}\r\n\r\n"
                          .encode())
                status, headers, _ = _head(s)
            assert status == 407
            return headers["X-Tether-Refusal"]

        assert attempt("wrong") == "tether: app 'a' authentication failed"
        assert attempt("wrong") == "tether: app 'a' authentication failed"
        # The pair (a, 127.0.0.1) is locked out: even the right key is not looked at.
        assert "is locked out from 127.0.0.1" in attempt("right")
        summary = gw.call(gw.gateway.guard.summary)
        assert summary["failed"] == 2
        assert summary["refused_locked_out"] == 1
    finally:
        gw.stop()


def test_a_proxy_listener_off_loopback_is_refused_like_the_native_one() -> None:
    config = parse_config({"gateway": {"http_proxy_listen": "192.0.2.1:3128"}})
    with pytest.raises(ConfigError, match=r"gateway\.http_proxy_listen\[0\]"):
        check_listen(config)
    with pytest.raises(ConfigError, match=r"gateway\.http_proxy_listen"):
        parse_config({"gateway": {"http_proxy_listen": []}})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:3128", ["127.0.0.1:3128"]),
        (["[::1]:3128", "unix:/run/t/http.sock"], ["[::1]:3128", "unix:/run/t/http.sock"]),
    ],
)
def test_http_proxy_listen_forms(value: str | list[str], expected: list[str]) -> None:
    config = parse_config({"gateway": {"http_proxy_listen": value}})
    assert [str(e) for e in config.http_proxy_listen] == expected
    assert parse_config({}).http_proxy_listen == ()  # off by default


@pytest.mark.parametrize(
    ("gateway", "path", "words"),
    [
        ({"http_proxy_listen": [42]}, r"gateway\.http_proxy_listen\[0\]", "must be a string"),
        ({"http_proxy_listen": "unix:"}, r"gateway\.http_proxy_listen\[0\]", "needs a path"),
    ],
)
def test_bad_http_proxy_listen(gateway: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError, match=path) as caught:
        parse_config({"gateway": gateway})
    assert words in str(caught.value)


def test_an_app_may_not_take_the_proxy_socket_path() -> None:
    with pytest.raises(ConfigError, match=r"apps\.a\.listen\[0\]"):
        parse_config({
            "gateway": {"http_proxy_listen": "unix:/run/t/p.sock"},
            "apps": {"a": {"listen": "unix:/run/t/p.sock"}},
        })


@pytest.mark.parametrize(
    ("failure", "status", "headers"),
    [
        (Refusal(pb.Error.PERMISSION_DENIED, errno.EACCES, "tether: denied", rule="deny x",
                 reason="r"), 403, {"X-Tether-Rule": "deny x"}),
        (Refusal(pb.Error.AUTH_FAILED, errno.EACCES, "tether: app 'a' was removed"), 407,
         {"Proxy-Authenticate": 'Basic realm="tether"'}),
        (Refusal(pb.Error.LIMIT, errno.EMFILE, "tether: cap", rule="gateway.max_sockets"), 429,
         {"X-Tether-Rule": "gateway.max_sockets"}),
        (Refusal(pb.Error.QUOTA, errno.EDQUOT, "tether: quota", rule="connects_per_minute",
                 retry_after=2.2), 429, {"Retry-After": "3"}),
        (Refusal(pb.Error.UNAVAILABLE, errno.ECONNREFUSED, "tether: draining"), 503, {}),
        (Refusal(pb.Error.CLOSED, errno.ESHUTDOWN, "tether: shutting down"), 503, {}),
        (DialTimeout("www.test", 81, 0.5), 504,
         {"X-Tether-Refusal": "tether: app 'a' to www.test:81: timed out connecting to "
                              "www.test:81 after 0.5 s"}),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), 502,
         {"X-Tether-Refusal": "tether: app 'a' to www.test:81: Connection refused"}),
        (ResolutionError(socket.EAI_NONAME, "tether: no.test: name not known"), 502,
         {"X-Tether-Refusal": "tether: no.test: name not known"}),
    ],
)
def test_each_failure_has_its_status(failure: Failure, status: int,
                                     headers: dict[str, str]) -> None:
    proxy = HttpProxy()
    proxy.receive_data(b"CONNECT www.test:81 HTTP/1.1\r\nHost: w\r\n\r\n")
    proxy.next_event()
    data = refusal_response(proxy, failure, "app 'a' to www.test:81")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert int(lines[0].split()[1]) == status
    got = dict(line.split(": ", 1) for line in lines[1:])
    assert got.items() >= headers.items()
    assert body.decode() == got["X-Tether-Refusal"] + "\n"


# -- real clients -----------------------------------------------------------------


@needs_curl
def test_curl_https_through_connect(env: Env, audit: pytest.LogCaptureFixture) -> None:
    result = env.curl("--cacert", str(env.cafile), f"https://tls.test:{env.tls_port}/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP/1.1 200 Connection established")
    assert result.stdout.endswith(PAGE.decode())
    decision = _decision(audit, "tls.test")
    assert (decision["outcome"], decision["app"], decision["port"]) == (
        "connected", "tests", env.tls_port)


@needs_curl
def test_curl_plain_http_is_forwarded_in_origin_form(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    result = env.curl("-d", "a=1&b=2", f"http://www.test:{env.http_port}/form?x=1")
    assert result.returncode == 0, result.stderr
    seen = result.stdout.partition("\n\n")[2]  # text mode: \r\n read as \n
    # What the destination was sent: origin form, Host from the URI, no proxy
    # credentials, Via, Connection: close; the body as the app sent it.
    assert seen.startswith("POST /form?x=1 HTTP/1.1\n")
    assert f"Host: www.test:{env.http_port}\n" in seen
    assert "Proxy-Authorization" not in seen
    assert "Via: 1.1 tether\n" in seen
    assert "Connection: close\n" in seen
    assert seen.endswith("a=1&b=2")
    assert _decision(audit, "www.test")["outcome"] == "connected"


@needs_curl
def test_curl_denied_by_rule_shows_403_and_the_reason(
    env: Env, audit: pytest.LogCaptureFixture
) -> None:
    result = env.curl(f"http://blocked.test:{env.http_port}/")
    assert result.returncode == 0, result.stderr  # an answer, from the proxy
    assert result.stdout.startswith("HTTP/1.1 403 Forbidden")
    assert "X-Tether-Rule: deny blocked.test" in result.stdout
    assert "denied for app 'tests'" in result.stdout
    # curl -p (CONNECT for plain http too): the tunnel is refused, same words.
    result = env.curl("-p", f"http://blocked.test:{env.http_port}/")
    assert result.returncode == 56
    assert "403" in result.stderr
    assert "X-Tether-Refusal: tether: connection to blocked.test" in result.stdout
    assert _decision(audit, "blocked.test")["outcome"] == "denied"


@needs_curl
def test_curl_without_credentials_gets_407(env: Env) -> None:
    result = env.curl(f"http://www.test:{env.http_port}/", auth=None)
    assert result.stdout.startswith("HTTP/1.1 407 Proxy Authentication Required")
    assert 'Proxy-Authenticate: Basic realm="tether"' in result.stdout


@needs_program("wget")
def test_wget_through_the_proxy(env: Env, tmp_path: Path) -> None:
    proxy = f"http://tests:{KEY}@{env.proxy}"
    base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    result = subprocess.run(
        ["wget", "-q", "-O", "-", "--tries=1", f"--timeout={TIMEOUT:g}",
         f"--ca-certificate={env.cafile}", f"https://tls.test:{env.tls_port}/"],
        capture_output=True, timeout=2 * TIMEOUT, check=False, cwd=tmp_path,
        env={**base, "https_proxy": proxy, "http_proxy": proxy},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == PAGE
    denied = subprocess.run(
        ["wget", "-S", "-O", "-", "--tries=1", f"--timeout={TIMEOUT:g}",
         f"http://blocked.test:{env.http_port}/"],
        capture_output=True, text=True, timeout=2 * TIMEOUT, check=False, cwd=tmp_path,
        env={**base, "http_proxy": proxy},
    )
    assert denied.returncode == 8  # wget: the server issued an error response
    assert "403 Forbidden" in denied.stderr
    assert "X-Tether-Refusal: tether: connection to blocked.test" in denied.stderr
