"""Unmodified programs under ``tether run --isolate``, with no proxy option, through a real gateway.

Each client is run twice: to a name the gateway allows (``www.test``) and to
one this app's policy denies (``mail.test``); both names map to 127.0.0.1 in
the gateway's ``[resolver.hosts]``, and the servers (a stdlib HTTP server
here, and the machine's PostgreSQL, Redis and MariaDB) are on the host's
loopback, reached from the gateway outside the namespace. Every run shows
its audit decision line; every denial is reported with the rule.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from isolate_tools import require_isolation, require_program
from support import Gateway, gateway_config, require_service, start_gateway

ALLOWED, DENIED = "www.test", "mail.test"
BODY = "hello from the isolate test server"
RUN_TIMEOUT = 120.0  # one `tether run --isolate` with a cold JVM on a loaded 2-core machine
HERE = Path(__file__).resolve().parent


@dataclass
class Setup:
    gateway: Gateway
    audit: Path
    http_port: int


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = BODY.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    require_isolation()
    tmp = tmp_path_factory.mktemp("isolate")
    key = secrets.token_urlsafe(16)
    audit = tmp / "audit.jsonl"
    text = gateway_config(
        key,
        gateway=f'audit_log = "{audit}"',
        extra=f'\n[apps.tests.policy]\ndeny = ["{DENIED}"]\n',
    )
    gw = start_gateway(tmp, text, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Setup(gw, audit, server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        gw.process.stop()


def isolated(s: Setup, argv: list[str], env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    """`tether run --isolate -- argv` against the test gateway; output captured."""
    # No proxy variables: the programs are given no way to the gateway but the namespace's.
    full_env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    full_env.update(TETHER_KEY=s.gateway.key, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "tether.cli.main", "run", "--isolate", "--gateway",
         s.gateway.address, "--app", s.gateway.app, "--", *argv],
        capture_output=True, text=True, env=full_env, timeout=RUN_TIMEOUT, check=False,
    )


def decision(s: Setup, host: str, port: int, outcome: str) -> dict[str, object]:
    """The gateway's audit decision line for host:port with that outcome (waited for)."""
    deadline = time.monotonic() + 10  # the audit file is written in batches of up to 20 ms
    while True:
        text = s.audit.read_text() if s.audit.exists() else ""
        lines = [json.loads(x) for x in text.splitlines()]
        found = [x for x in lines if x.get("event") == "decision" and x.get("host") == host
                 and x.get("port") == port and x.get("outcome") == outcome]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"no {outcome} decision for {host}:{port} in {lines[-5:]}")
        time.sleep(0.05)


@dataclass(frozen=True)
class Client:
    program: str
    package: str
    argv: Callable[[str, int], list[str]]  # (host, http port) -> command line
    port: Callable[[Setup], int]  # the target's port
    expect: str  # in stdout when it worked
    service: tuple[int, str] | None = None


def _http(s: Setup) -> int:
    return s.http_port


JAVA = str(HERE / "Get.java")
NODE_FETCH = ("fetch(process.argv[1]).then(r => r.text()).then(t => console.log('node ' + t))"
              ".catch(e => { console.error('node failed: ' + e.cause); process.exit(3); })")
PYTHON_DROP_IN = textwrap.dedent("""\
    import os, socket, sys, tether
    assert tether.installed(), "the drop-in is not installed"
    assert os.environ["TETHER_GATEWAY"].startswith("unix:"), os.environ["TETHER_GATEWAY"]
    s = socket.socket()
    try:
        s.connect((sys.argv[1], int(sys.argv[2])))
    except PermissionError as exc:
        print(f"python refused: {exc}", file=sys.stderr)
        sys.exit(3)
    assert s._tether is not None, "not a tether socket"
    s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print("python", data.split(b"\\r\\n\\r\\n", 1)[1].decode())
""")

CLIENTS = [
    Client("curl", "curl", lambda h, p: ["curl", "-sS", "-m", "30", f"http://{h}:{p}/"], _http,
           BODY),
    Client("wget", "wget", lambda h, p: ["wget", "-q", "-O", "-", "-T", "30", "-t", "1",
                                         f"http://{h}:{p}/"], _http, BODY),
    Client("node", "nodejs", lambda h, p: ["node", "-e", NODE_FETCH, f"http://{h}:{p}/"], _http,
           f"node {BODY}"),
    Client("java", "openjdk-17-jdk-headless", lambda h, p: ["java", JAVA, f"http://{h}:{p}/"],
           _http, f"java 200 {BODY}"),
    Client("python", "python3", lambda h, p: [sys.executable, "-c", PYTHON_DROP_IN, h, str(p)],
           _http, f"python {BODY}"),
    Client("psql", "postgresql-client",
           lambda h, p: ["psql", "-h", h, "-p", str(p), "-U", "postgres", "-d", "test", "-tAc",
                         "select 'psql-' || 'ok'"],
           lambda s: 5432, "psql-ok", (5432, "PostgreSQL")),
    Client("redis-cli", "redis-tools",
           lambda h, p: ["redis-cli", "-h", h, "-p", str(p), "ECHO", "redis-ok"],
           lambda s: 6379, "redis-ok", (6379, "Redis")),
    Client("mysql", "mariadb-client",
           lambda h, p: ["mysql", "-h", h, "-P", str(p), "-u", "root", "test", "-N", "-e",
                         "select concat('mysql-', 'ok')"],
           lambda s: 3306, "mysql-ok", (3306, "MariaDB")),
]


def _ready(s: Setup, client: Client) -> int:
    if client.program != "python":
        require_program(client.program, client.package)
    if client.service is not None:
        require_service(*client.service)
    return client.port(s)


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.program)
def test_allowed_name_goes_through(setup: Setup, client: Client) -> None:
    port = _ready(setup, client)
    done = isolated(setup, client.argv(ALLOWED, port))
    assert done.returncode == 0, done.stderr
    assert client.expect in done.stdout, (done.stdout, done.stderr)
    line = decision(setup, ALLOWED, port, "connected")
    assert line["app"] == "tests" and line["verdict"] == "allow"
    assert line["chosen"] == f"127.0.0.1:{port}"


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.program)
def test_denied_name_is_refused_with_the_rule(setup: Setup, client: Client) -> None:
    port = _ready(setup, client)
    done = isolated(setup, client.argv(DENIED, port))
    assert done.returncode != 0, done.stdout
    assert client.expect not in done.stdout
    rule = f"(rule: deny {DENIED})"
    if client.program == "python":
        # The drop-in asks the gateway itself: the refusal reaches the program as PolicyDenied.
        assert f"python refused: [Errno 13] tether: connection to {DENIED}:{port} denied" in \
            done.stderr and rule in done.stderr, done.stderr
    else:
        # The agent resets the program's connection and says why.
        assert f"tether isolate: reset the connection to {DENIED}:{port} (dialled 198.1" in \
            done.stderr and rule in done.stderr, done.stderr
    line = decision(setup, DENIED, port, "denied")
    assert line["rule"] == f"deny {DENIED}" and line["app"] == "tests"


def test_a_number_passes_as_the_number(setup: Setup) -> None:
    require_program("curl", "curl")
    done = isolated(setup, ["curl", "-sS", "-m", "30", f"http://127.0.0.1:{setup.http_port}/"])
    assert done.returncode == 0 and BODY in done.stdout, done.stderr
    assert decision(setup, "127.0.0.1", setup.http_port, "connected")["app"] == "tests"


def test_unknown_name_is_nxdomain_and_unnamed_fake_address_is_reset(setup: Setup) -> None:
    require_program("curl", "curl")
    done = isolated(setup, ["sh", "-c",
                            "getent hosts nosuch.test; echo getent=$?; "
                            "getent hosts www.test; "
                            "curl -sS -m 30 http://198.18.200.200:80/; echo curl=$?"])
    assert "getent=2" in done.stdout, done.stdout  # 2: not found
    assert "198.18.0." in done.stdout and "www.test" in done.stdout
    # The agent resets an unassigned fake address as soon as it reads it: curl
    # sees the reset either while it completes its connect (7) or at its first
    # receive (56), depending on which runs first; never a success or a timeout.
    assert "curl=56" in done.stdout or "curl=7" in done.stdout, done.stdout
    assert "198.18.200.200 is in the namespace's fake range" in done.stderr, done.stderr


def test_udp_other_than_dns_goes_nowhere(setup: Setup) -> None:
    """A non-Python program's UDP datagram to a real listener on the host's loopback: dropped."""
    import socket

    from support import StdSocket

    listener = StdSocket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(0)
    port = listener.getsockname()[1]
    try:
        done = isolated(setup, ["bash", "-c", f"echo datagram > /dev/udp/127.0.0.1/{port}; "
                                              "echo bash=$?"])
        assert "bash=1" in done.stdout, (done.stdout, done.stderr)
        assert "Operation not permitted" in done.stderr, done.stderr  # the filter's drop
        with pytest.raises(BlockingIOError):
            listener.recv(100)  # nothing arrived (and the namespace's 127.0.0.1 is not the host's)
    finally:
        listener.close()


def test_user_namespace_path_leaves_the_command_no_power_over_the_rules(
    setup: Setup, tmp_path: Path
) -> None:
    """The unprivileged path (a user namespace for the setup, a nested one for the command).

    Forced here for root with the `user_namespace` switch: the command's
    traffic still goes through, and `nft flush ruleset` is refused to it.
    """
    require_program("curl", "curl")
    from tether.cli.run import child_env
    from tether.client.settings import Settings
    from tether.endpoint import parse_endpoint
    from tether.isolate.launch import Isolated

    gw = setup.gateway
    script = (f"curl -sS -m 30 http://{ALLOWED}:{setup.http_port}/ > {tmp_path}/curl 2>&1; "
              f"nft flush ruleset > {tmp_path}/nft 2>&1; echo \"exit $?\" >> {tmp_path}/nft")
    settings = Settings(gateway=parse_endpoint(gw.address), app=gw.app, key=gw.key)
    isolated = Isolated(["sh", "-c", script], child_env(gw.address, gw.app, gw.key), settings,
                        user_namespace=True)
    proc = isolated.start()
    try:
        status = proc.wait(RUN_TIMEOUT)
    finally:
        isolated.stop()
    assert status == 0
    assert (tmp_path / "curl").read_text() == BODY
    nft = (tmp_path / "nft").read_text()
    assert "Operation not permitted" in nft and "exit 0" not in nft, nft


def test_python_uses_a_unix_gateway_directly(setup: Setup, tmp_path: Path) -> None:
    """With a gateway on a Unix socket, Python's drop-in gets that socket itself (no bridge)."""
    key = secrets.token_urlsafe(16)
    sock_path = tmp_path / "gw.sock"
    gw = start_gateway(tmp_path, gateway_config(key), key, listen=f"unix:{sock_path}")
    try:
        code = (PYTHON_DROP_IN.replace('s = socket.socket()', 'print("gw", os.environ['
                                       '"TETHER_GATEWAY"]); s = socket.socket()'))
        done = subprocess.run(
            [sys.executable, "-m", "tether.cli.main", "run", "--isolate", "--gateway",
             f"unix:{sock_path}", "--app", gw.app, "--", sys.executable, "-c", code, ALLOWED,
             str(setup.http_port)],
            capture_output=True, text=True, env=dict(os.environ, TETHER_KEY=key),
            timeout=RUN_TIMEOUT, check=False)
    finally:
        gw.process.stop()
    assert done.returncode == 0, done.stderr
    assert f"gw unix:{sock_path}" in done.stdout
    assert f"python {BODY}" in done.stdout


HAND_OFF = textwrap.dedent("""\
    import pickle, socket, sys
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = socket.create_connection((host, port))
    s.sendall(b"one,")
    assert s.recv(4) == b"one,"
    with open(path, "wb") as f:
        f.write(pickle.dumps(s))   # the gateway holds the connection for the next process
""")
RESUME = textwrap.dedent("""\
    import pickle, sys
    with open(sys.argv[1], "rb") as f:
        s = pickle.loads(f.read())
    s.sendall(b"two")
    data = b""
    while len(data) < 3:
        data += s.recv(3 - len(data))
    print("resumed", data.decode(), s.getpeername()[1])
""")


def test_python_hands_a_socket_off_inside_the_namespace(setup: Setup, tmp_path: Path) -> None:
    """The real-fd path inside: one Python process pickles its socket, another resumes it."""
    from tcpservers import echo, serving

    token = tmp_path / "socket.pickle"
    with serving(echo) as server:
        done = isolated(setup, ["sh", "-c",
                                f'"$0" -c "$1" {ALLOWED} {server.port} {token} && '
                                f'"$0" -c "$2" {token}',
                                sys.executable, HAND_OFF, RESUME])
    assert done.returncode == 0, done.stderr
    assert f"resumed two {server.port}" in done.stdout, (done.stdout, done.stderr)


@pytest.fixture
def git_daemon(tmp_path: Path) -> Iterator[int]:
    """A `git daemon` on the host's loopback serving one repository with one commit."""
    import socket

    from support import StdSocket, wait_for

    git = require_program("git", "git")
    repo = tmp_path / "served" / "repo.git"
    work = tmp_path / "work"
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@test",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@test", HOME=str(tmp_path))
    for argv in (["init", "-q", "-b", "main", str(work)],
                 ["-C", str(work), "commit", "-q", "--allow-empty", "-m", "isolate-commit"],
                 ["clone", "-q", "--bare", str(work), str(repo)]):
        subprocess.run([git, *argv], check=True, env=env, capture_output=True, timeout=60)
    probe = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # git daemon binds it next (git daemon cannot report a port it chose)
    daemon = subprocess.Popen(
        [git, "daemon", f"--base-path={tmp_path / 'served'}", "--export-all", "--reuseaddr",
         "--listen=127.0.0.1", f"--port={port}", str(tmp_path / "served")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from support import service_reachable

        assert wait_for(lambda: service_reachable(port) is None), "git daemon did not start"
        yield port
    finally:
        daemon.terminate()
        daemon.wait(10)


def test_git_clone_from_a_loopback_git_daemon(setup: Setup, git_daemon: int,
                                              tmp_path: Path) -> None:
    dest = tmp_path / "clone"
    done = isolated(setup, ["sh", "-c", f"git clone -q git://{ALLOWED}:{git_daemon}/repo.git "
                                        f"{dest} && git -C {dest} log --format=%s"])
    assert done.returncode == 0, done.stderr
    assert "isolate-commit" in done.stdout
    assert decision(setup, ALLOWED, git_daemon, "connected")["app"] == "tests"
    refused = isolated(setup, ["git", "clone", "-q", f"git://{DENIED}:{git_daemon}/repo.git",
                               str(tmp_path / "denied")])
    assert refused.returncode != 0
    assert f"(rule: deny {DENIED})" in refused.stderr, refused.stderr


def test_a_missing_command_is_127_with_its_name(setup: Setup) -> None:
    done = isolated(setup, ["/nonexistent/isolate-test-command"])
    assert done.returncode == 127
    assert "cannot start '/nonexistent/isolate-test-command'" in done.stderr
