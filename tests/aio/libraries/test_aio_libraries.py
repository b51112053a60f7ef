"""Unmodified asyncio client libraries through a real gateway, on the default loop and uvloop.

Each case runs clients.py as an app would be run by ``tether run`` (a child
process with tether installed at start-up) against this machine's loopback
services or the demo HTTP(S)/SMTP servers, and then reads the gateway's
audit file: exactly one ``decision`` line with outcome ``connected`` per
connection the library opened, on the ports it should have used, and no
other decision. A library that connected on its own, bypassing the gateway,
leaves no line and fails the count.

The same cases run again inside a network namespace with no network (its
own loopback only; tests/netns.py) with the gateway outside, reached over a
Unix socket: there a connection that does not go through the gateway fails
instead of passing. A control case shows that it does: the same namespace,
without tether, cannot reach the host's Redis.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from netns import require_netns, run_in_netns
from support import APP, Gateway, gateway_config, require_service, start_gateway, wait_for

from tether.cli.run import child_env
from tether.demo.servers import HTTPServer, SMTPServer, write_ca_file

CLIENTS = Path(__file__).with_name("clients.py")
REDIS, MYSQL, POSTGRES, AMQP, NATS = 6379, 3306, 5432, 5672, 4222
RUN_TIMEOUT = 90.0  # one child process: interpreter start, imports, the work (~1 s here)
# A decision line reaches the audit file at most FLUSH_DELAY (20 ms,
# gateway/audit.py) after it is made: waiting this much longer than that
# after the last expected line shows that no further one follows.
SETTLE = 0.2


@dataclass(frozen=True)
class Servers:
    """The in-process servers' ports and the CA the clients trust."""

    http: int
    https: int
    smtp: int
    ca_file: Path


@dataclass(frozen=True)
class Library:
    services: tuple[tuple[int, str], ...]
    # port -> connections the client in clients.py opens to it
    connections: Callable[[Servers], dict[int, int]]
    loops: tuple[str, ...] = ("asyncio", "uvloop")


LIBRARIES: dict[str, Library] = {
    # two kept-alive connections (HTTP, HTTPS) and one refused by verification
    "aiohttp": Library((), lambda s: {s.http: 1, s.https: 2}),
    "httpx": Library((), lambda s: {s.http: 1, s.https: 2}),
    # the client's single connection and the pub/sub one
    "redis": Library(((REDIS, "Redis"),), lambda s: {REDIS: 2}),
    "asyncpg": Library(((POSTGRES, "PostgreSQL"),), lambda s: {POSTGRES: 1}),
    "aiomysql": Library(((MYSQL, "MariaDB"),), lambda s: {MYSQL: 1}),
    "aio_pika": Library(((AMQP, "RabbitMQ"),), lambda s: {AMQP: 1}),
    "nats": Library(((NATS, "NATS"),), lambda s: {NATS: 1}),
    "aiosmtplib": Library((), lambda s: {s.smtp: 1}),
    "anyio": Library((), lambda s: {s.http: 1, s.https: 1}),
    # trio runs its own loop on the socket module (tether.socket), not asyncio's
    "trio": Library((), lambda s: {s.http: 1, s.https: 1}, loops=("trio",)),
}

CASES = [
    pytest.param(name, loop, id=f"{name}-{loop}",
                 marks=[pytest.mark.services] if library.services else [])
    for name, library in LIBRARIES.items()
    for loop in library.loops
]


@dataclass
class AuditedGateway:
    """A gateway process writing its audit lines to a file of its own."""

    gateway: Gateway
    audit: Path
    _offset: int = field(default=0)

    def mark(self) -> None:
        """Later calls to decisions() see only lines written after this."""
        self._offset = self.audit.stat().st_size if self.audit.exists() else 0

    def decisions(self) -> list[dict[str, object]]:
        if not self.audit.exists():
            return []
        with self.audit.open("rb") as f:
            f.seek(self._offset)
            text = f.read().decode()
        # Only whole lines: the rest of a batch may still be on its way.
        lines = text[: text.rfind("\n") + 1].splitlines()
        records = [json.loads(line) for line in lines]
        return [r for r in records if r.get("event") == "decision"]


def _start(tmp: Path, listen: str) -> Iterator[AuditedGateway]:
    key = secrets.token_urlsafe(16)
    audit = tmp / "audit.jsonl"
    config = gateway_config(key, gateway=f'audit_log = "{audit}"')
    gw = start_gateway(tmp, config, key, listen=listen)
    try:
        yield AuditedGateway(gw, audit)
    finally:
        gw.process.stop()


@pytest.fixture(scope="module")
def tcp_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditedGateway]:
    yield from _start(tmp_path_factory.mktemp("aio-tcp-gateway"), "127.0.0.1:0")


@pytest.fixture(scope="module")
def unix_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditedGateway]:
    tmp = tmp_path_factory.mktemp("aio-unix-gateway")
    yield from _start(tmp, f"unix:{tmp / 'gateway.sock'}")


@pytest.fixture(scope="module")
def http_server() -> Iterator[HTTPServer]:
    with HTTPServer() as server:
        yield server


@pytest.fixture(scope="module")
def starttls_server(tls_ca: tuple[trustme.CA, ssl.SSLContext]) -> Iterator[SMTPServer]:
    with SMTPServer(tls_ca[1]) as server:
        yield server


@pytest.fixture(scope="module")
def servers(
    tls_ca: tuple[trustme.CA, ssl.SSLContext],
    http_server: HTTPServer,
    https_server: HTTPServer,
    starttls_server: SMTPServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Servers:
    ca_file = write_ca_file(tls_ca[0], tmp_path_factory.mktemp("aio-ca") / "ca.pem")
    return Servers(http_server.port, https_server.port, starttls_server.port, ca_file)


def _arguments(library: str, loop: str, servers: Servers) -> str:
    prefix = f"tether_aio_{library}_{loop}_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    return json.dumps({
        "library": library, "loop": loop, "prefix": prefix, "ca_file": str(servers.ca_file),
        "http_port": servers.http, "https_port": servers.https, "smtp_port": servers.smtp,
        "redis_port": REDIS, "mysql_port": MYSQL, "postgres_port": POSTGRES,
        "amqp_port": AMQP, "nats_port": NATS,
    })


def _connected(decisions: list[dict[str, object]]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for d in decisions:
        if d["outcome"] == "connected":
            port = int(str(d["port"]))
            counts[port] = counts.get(port, 0) + 1
    return counts


def _check_run(
    library: str,
    loop: str,
    servers: Servers,
    audited: AuditedGateway,
    starttls_server: SMTPServer,
    run: Callable[[list[str], dict[str, str]], subprocess.CompletedProcess[str]],
) -> None:
    for port, name in LIBRARIES[library].services:
        require_service(port, name)
    gw = audited.gateway
    env = child_env(gw.address, APP, gw.key)  # what `tether run` gives the app
    arguments = _arguments(library, loop, servers)
    mails_before = len(starttls_server.messages)
    audited.mark()
    result = run([sys.executable, str(CLIENTS), arguments], env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (
        f"{library} on {loop} failed (exit {result.returncode}):\n{result.stderr}"
    )

    expected = LIBRARIES[library].connections(servers)
    wait_for(lambda: _connected(audited.decisions()) == expected)
    time.sleep(SETTLE)
    decisions = audited.decisions()
    assert _connected(decisions) == expected, (
        f"{library} on {loop}: connections the gateway decided (port: count) "
        f"{_connected(decisions)}, expected {expected}\n{decisions}"
    )
    assert all(d["app"] == APP and d["verdict"] == "allow" for d in decisions), decisions

    if library == "aiosmtplib":
        got = starttls_server.wait_for_messages(mails_before + 1)[mails_before:]
        prefix = json.loads(arguments)["prefix"]
        assert [(m.tls, m.mail_from, m.rcpt_tos) for m in got] == [
            (True, "alice@mail.test", ("bob@mail.test",))
        ]
        assert f"Subject: {prefix}".encode() in got[0].content


def _on_host(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env,
                          timeout=RUN_TIMEOUT, check=False)


def _in_netns(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_in_netns(argv, env=env, timeout=RUN_TIMEOUT)


@pytest.mark.parametrize(("library", "loop"), CASES)
def test_library_through_the_gateway(
    library: str, loop: str, servers: Servers, tcp_gateway: AuditedGateway,
    starttls_server: SMTPServer,
) -> None:
    _check_run(library, loop, servers, tcp_gateway, starttls_server, _on_host)


@pytest.mark.parametrize(("library", "loop"), CASES)
def test_library_in_a_namespace_with_no_network(
    library: str, loop: str, servers: Servers, unix_gateway: AuditedGateway,
    starttls_server: SMTPServer,
) -> None:
    require_netns()
    _check_run(library, loop, servers, unix_gateway, starttls_server, _in_netns)


# The control: what the namespace does to a program that is not tethered.
DIRECT = """\
import asyncio, errno, socket, sys
import uvloop
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5)
except OSError as exc:
    print(errno.errorcode[exc.errno])
else:
    sys.exit("a direct connection to the host's service passed")
async def main():
    try:
        await asyncio.open_connection("127.0.0.1", {port})
    except OSError as exc:
        print(errno.errorcode[exc.errno])
    else:
        sys.exit("a direct asyncio connection to the host's service passed")
asyncio.run(main())
uvloop.run(main())  # uvloop connects in C: it too finds nothing there
"""


@pytest.mark.services
def test_namespace_control_direct_connections_fail() -> None:
    require_service(REDIS, "Redis")  # reachable from here, the host...
    require_netns()
    # ...but not from inside: the namespace's loopback is its own.
    result = run_in_netns([sys.executable, "-c", DIRECT.format(port=REDIS)], timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ECONNREFUSED"] * 3
