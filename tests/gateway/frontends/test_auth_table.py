"""The same credentials get the same answer on every front-end (Guard.check).

One in-thread gateway with the three front-ends (the Tether protocol, SOCKS5,
the HTTP proxy), each on loopback TCP and on a Unix socket. Every row of the
table is tried on each front-end with a real client of its protocol: whether
it is let in, the words the front-end can carry (SOCKS5 has none), and what
the shared guard counted (a failure, a locked-out attempt, nothing). The
guard's clock is a fake one, and failed answers are not delayed
(auth_max_delay 0), so nothing here waits for time to pass.
"""

from __future__ import annotations

import base64
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import TIMEOUT, FakeClock, StdSocket, recv_exact

from tether.config import parse_config
from tether.gateway.embedded import EmbeddedGateway
from tether.wire import PROTOCOL_VERSION, Connection, Role, pb

KEY = "table-key"
ADMIN_KEY = "table-admin-key"
OLD_KEY, NEW_KEY = "table-old-key", "table-new-key"
FAILURE_LIMIT = 4  # gateway.auth_failure_limit: above the 3 failures of a row (one a front-end)


@dataclass
class Answer:
    accepted: bool
    words: str | None  # the refusal's text, where the protocol carries one


@dataclass
class Env:
    gw: EmbeddedGateway
    clock: FakeClock
    tcp: dict[str, tuple[str, int]]  # front-end -> its loopback TCP listener
    unix: dict[str, str]  # front-end -> its Unix listener

    @property
    def guard(self) -> Any:
        assert self.gw.gateway is not None
        return self.gw.gateway.guard

    def totals(self) -> dict[str, int]:
        return self.gw.call(lambda: dict(self.guard.totals))


def _settings(tmp: Path, apps: dict[str, Any]) -> dict[str, Any]:
    return {
        "gateway": {
            "listen": ["127.0.0.1:0", f"unix:{tmp}/gw.sock"],
            "socks5_listen": ["127.0.0.1:0", f"unix:{tmp}/socks.sock"],
            "http_proxy_listen": ["127.0.0.1:0", f"unix:{tmp}/http.sock"],
            "admin_key": ADMIN_KEY,
            "auth_max_delay": 0,
            "auth_failure_limit": FAILURE_LIMIT,
            "auth_failure_window": 3600,
            "auth_lockout": 3600,
        },
        "resolver": {"mode": "static"},
        "policy": {"allow": ["127.0.0.0/8:*"]},
        "apps": apps,
    }


APPS: dict[str, Any] = {
    "a": {"key": KEY},
    "local": {"uids": [os.getuid()]},  # known by the Unix peer's uid, no key
    "rotated": {"key": OLD_KEY},  # its key changes (a reload revokes OLD_KEY)
    "lockme": {"key": KEY},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("auth-table")
    gw = EmbeddedGateway(parse_config(_settings(tmp, APPS)), clock=(clock := FakeClock()))
    gw.start()
    try:
        gateway = gw.gateway
        assert gateway is not None
        tcp = {}
        for name, url in (("socks5", gateway.socks5_proxy), ("http", gateway.http_proxy)):
            host, port = url.split("//", 1)[1].rsplit(":", 1)
            tcp[name] = (host, int(port))
        native = gw.endpoints[0]
        tcp["tether"] = (native.host, native.port)
        unix = {"tether": f"{tmp}/gw.sock", "socks5": f"{tmp}/socks.sock",
                "http": f"{tmp}/http.sock"}
        # A reload changes "rotated"'s key: OLD_KEY is revoked, and says so.
        rotated = {**APPS, "rotated": {"key": NEW_KEY}}
        gw.call(lambda: gateway.reload(parse_config(_settings(tmp, rotated))))
        yield Env(gw, clock, tcp, unix)
    finally:
        gw.stop()


def _open(env: Env, frontend: str, unix: bool) -> socket.socket:
    if unix:
        sock = StdSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(env.unix[frontend])
    else:
        sock = StdSocket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(env.tcp[frontend])
    return sock


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- one client per front-end: (app, key) or None for no credentials -----------


def tether_client(sock: socket.socket, creds: tuple[str, str] | None) -> Answer:
    app, key = creds or ("local", "")  # a hello always names its app; no key
    wire = Connection(Role.CLIENT)
    sock.sendall(wire.send(pb.ClientHello(protocol_version=PROTOCOL_VERSION, app=app, key=key)))
    while True:
        event = wire.next_event()
        if isinstance(event, pb.ServerHello):
            if event.HasField("error"):
                assert event.error.code == pb.Error.AUTH_FAILED, event
                return Answer(False, event.error.message)
            return Answer(True, None)
        chunk = sock.recv(65536)
        assert chunk, "closed without a ServerHello"
        wire.receive_data(chunk)


def socks5_client(sock: socket.socket, creds: tuple[str, str] | None) -> Answer:
    if creds is None:
        sock.sendall(b"\x05\x01\x00")  # no authentication only
        method = recv_exact(sock, 2)
        return Answer(method == b"\x05\x00", None)
    sock.sendall(b"\x05\x01\x02")
    assert recv_exact(sock, 2) == b"\x05\x02"
    app, key = (part.encode() for part in creds)
    sock.sendall(b"\x01" + bytes([len(app)]) + app + bytes([len(key)]) + key)
    status = recv_exact(sock, 2)
    if status == b"\x01\x00":
        return Answer(True, None)
    assert _closed(sock)
    return Answer(False, None)


def http_client(sock: socket.socket, creds: tuple[str, str] | None) -> Answer:
    auth = ""
    if creds is not None:
        token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        auth = f"Proxy-Authorization: Basic {token}\r\n"
    # A destination that refuses: past authentication the answer is the
    # connect's (502), never a 407.
    sock.sendall(f"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        assert chunk, head
        head += chunk
    lines = head.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    if status != 407:
        return Answer(True, None)
    return Answer(False, headers["X-Tether-Refusal"])


CLIENTS: dict[str, Callable[[socket.socket, tuple[str, str] | None], Answer]] = {
    "tether": tether_client,
    "socks5": socks5_client,
    "http": http_client,
}


# -- the table ----------------------------------------------------------------------

@dataclass
class Row:
    name: str
    creds: tuple[str, str] | None
    unix: bool = False
    # None: let in; else words every front-end that carries words says.
    refused: str | None = None
    counted: str | None = None  # the guard's total that each attempt adds to
    # Front-ends that serve the row otherwise (the admin identity: the Tether protocol's).
    accepted_on: tuple[str, ...] = ()


ROWS = [
    Row("right key", ("a", KEY)),
    Row("wrong key", ("a", "wrong"), refused="tether: app 'a' authentication failed",
        counted="auth_failed"),
    Row("unknown app", ("nobody", KEY), refused="tether: app 'nobody' authentication failed",
        counted="auth_failed"),
    Row("revoked key", ("rotated", OLD_KEY), refused="tether: app 'rotated''s key changed",
        counted="auth_failed"),
    Row("new key after the reload", ("rotated", NEW_KEY)),
    Row("uid-mapped app, no key, Unix listener", None, unix=True),
    Row("uid-mapped app, its name and no key, Unix listener", ("local", ""), unix=True,
        accepted_on=("tether", "socks5", "http")),
    Row("another app's key on a uid-mapped stream", ("a", KEY), unix=True,
        refused=f"tether: this stream is app 'local' (its peer's uid {os.getuid()}",
        counted="auth_failed"),
    Row("admin key", ("*", ADMIN_KEY),
        refused="tether: the admin identity can list sockets but not open them",
        counted="auth_failed", accepted_on=("tether",)),
]


@pytest.mark.parametrize("frontend", list(CLIENTS))
@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_same_credentials_same_answer(env: Env, row: Row, frontend: str) -> None:
    before = env.totals()
    with _open(env, frontend, row.unix) as sock:
        answer = CLIENTS[frontend](sock, row.creds)
    after = env.totals()
    let_in = row.refused is None or frontend in row.accepted_on
    assert answer.accepted is let_in, answer
    if let_in:
        assert after == before
        return
    assert row.refused is not None
    if answer.words is not None:  # SOCKS5 carries no words
        assert answer.words.startswith(row.refused), answer.words
    assert row.counted is not None
    assert after[row.counted] == before[row.counted] + 1, (before, after)


def test_a_lockout_on_one_front_end_holds_on_every_other(env: Env) -> None:
    """Failures count per (app, peer) in the one guard: guessing on SOCKS5 locks out the
    right key on the Tether protocol and the HTTP proxy too, the key unchecked."""
    for _ in range(FAILURE_LIMIT):
        with _open(env, "socks5", False) as sock:
            assert not socks5_client(sock, ("lockme", "guess")).accepted
    for frontend, client in CLIENTS.items():
        before = env.totals()
        with _open(env, frontend, False) as sock:
            answer = client(sock, ("lockme", KEY))
        assert not answer.accepted, frontend
        if answer.words is not None:
            assert answer.words.startswith(
                "tether: app 'lockme' is locked out from 127.0.0.1 for 3600 s more"), answer
            assert answer.words.endswith("the key was not checked")
        after = env.totals()
        assert after["locked_out"] == before["locked_out"] + 1
        assert after["auth_failed"] == before["auth_failed"]
    # Another app from this peer is not locked out; the lockout ends by the clock.
    for frontend, client in CLIENTS.items():
        with _open(env, frontend, False) as sock:
            assert client(sock, ("a", KEY)).accepted, frontend
    env.clock.advance(3601)
    for frontend, client in CLIENTS.items():
        with _open(env, frontend, False) as sock:
            assert client(sock, ("lockme", KEY)).accepted, frontend


def test_without_credentials_only_a_known_peer_passes(env: Env) -> None:
    """No credentials over TCP: SOCKS5 offers no method, the HTTP proxy asks for them."""
    with _open(env, "socks5", False) as sock:
        assert not socks5_client(sock, None).accepted
    with _open(env, "http", False) as sock:
        answer = http_client(sock, None)
    assert not answer.accepted
    assert answer.words is not None and answer.words.startswith(
        "tether: send Proxy-Authorization: Basic APP:KEY (realm 'tether'); "
        "no app name and key were offered")
