"""CPython's own ``test.test_socket``, with the client half through a real gateway.

The outbound-only classes of the stdlib's socket tests run unmodified: their
servers (listening, accepting) stay on the stdlib, and every ``socket.*``
lookup the client half makes (``socket.socket``, ``socket.create_connection``,
``socket.getaddrinfo``...) is answered by ``tether.socket``; see
``_cpython_harness`` for how the two halves are told apart. Each CPython test
is one pytest test, run against the session ``gateway`` (a real ``tether
serve`` allowing 127.0.0.0/8). The tests that cannot pass are listed in
``EXPECTED_FAILURES`` with the reason and the error they must fail with; one
that starts passing fails the run (unless it is a race, marked ``racy``).
"""

from __future__ import annotations

import re
import select
import socket as std
import threading
import unittest
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import _cpython_harness as harness  # tests/client is on sys.path (rootdir-style test dirs)
import pytest
from support import Gateway

from tether.client import settings as tsettings
from tether.client.sock import socket as TetherSocket
from tether.endpoint import parse_endpoint

test_socket = harness.load_test_socket()

CLASSES = [
    "BasicTCPTest",
    "BasicTCPTest2",
    "NonBlockingTCPTests",
    "FileObjectClassTestCase",
    "UnbufferedFileObjectClassTestCase",
    "LineBufferedFileObjectClassTestCase",
    "SmallBufferedFileObjectClassTestCase",
    "UnicodeReadFileObjectClassTestCase",
    "UnicodeWriteFileObjectClassTestCase",
    "UnicodeReadWriteFileObjectClassTestCase",
    "NetworkConnectionNoServer",
    "NetworkConnectionAttributesTest",
    "TCPCloserTest",
    "ContextManagersTest",
    "BufferIOTest",
]


@dataclass(frozen=True)
class Expected:
    reason: str
    pattern: str  # the failure's traceback text must match this
    racy: bool = False  # a race: passing is allowed too


EXPECTED_FAILURES: dict[str, Expected] = {
    "NetworkConnectionAttributesTest.testSourceAddress": Expected(
        "tether sockets are outbound only: create_connection(source_address=('', port)) "
        "binds the client to a specific local port, which tether refuses (EACCES)",
        r"PermissionError: \[Errno 13\] tether: sockets are outbound only; "
        r"bind to \*:\d+ is not allowed",
    ),
}

# The client half of these never connects (so no connect to the gateway either).
CLIENT_NEVER_CONNECTS = {
    "NonBlockingTCPTests.testSetBlocking",  # the tests are about the server socket
    "NonBlockingTCPTests.testSetBlocking_overflow",
    "NonBlockingTCPTests.testInitNonBlocking",
    "NetworkConnectionNoServer.test_create_connection_timeout",  # its mock socket times out
    "NetworkConnectionAttributesTest.testSourceAddress",  # bind() is refused first
}

CASES = [
    pytest.param(name, method, id=f"{name}.{method}")
    for name in CLASSES
    for method in unittest.TestLoader().getTestCaseNames(getattr(test_socket, name))
]


@pytest.fixture
def client_settings(gateway: Gateway) -> Iterator[Gateway]:
    """tether's client settings for the session gateway, without install()."""
    previous = tsettings._configured
    tsettings.configure(
        tsettings.Settings(
            gateway=parse_endpoint(gateway.address), app=gateway.app, key=gateway.key
        )
    )
    try:
        yield gateway
    finally:
        tsettings.configure(previous)


def _gateway_sockaddr(gateway: Gateway) -> tuple[Any, ...]:
    return tuple(parse_endpoint(gateway.address).sockaddr)


def test_every_class_found() -> None:
    counts = {name: sum(1 for p in CASES if p.values[0] == name) for name in CLASSES}
    assert all(counts.values()), counts
    assert set(EXPECTED_FAILURES) <= {p.id for p in CASES}
    assert {p.id for p in CASES} >= CLIENT_NEVER_CONNECTS


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("class_name", "method"), CASES)
def test_cpython(client_settings: Gateway, class_name: str, method: str) -> None:
    outcome = harness.run_case(getattr(test_socket, class_name), method)
    test_id = f"{class_name}.{method}"
    assert not outcome.refused, f"non-loopback network use: {outcome.refused}"
    # The routing really happened: every kernel connect() the client half made
    # went to the gateway, and the server half connected nowhere.
    gateway_addr = _gateway_sockaddr(client_settings)
    stray = [a for a in outcome.client_connects if tuple(a) != gateway_addr]
    assert not stray, f"client half connected around the gateway: {stray}"
    assert not outcome.server_connects, f"server half connected: {outcome.server_connects}"
    if test_id not in CLIENT_NEVER_CONNECTS:
        assert outcome.client_connects, "the client half never reached the gateway"
    expected = EXPECTED_FAILURES.get(test_id)
    if expected is not None and (outcome.status == "failed" or not expected.racy):
        assert outcome.status == "failed", (
            f"{test_id} is listed as an expected failure ({expected.reason}) "
            f"but {outcome.status}: remove it from EXPECTED_FAILURES"
        )
        assert re.search(expected.pattern, outcome.details), (
            f"{test_id} failed, but not as expected ({expected.pattern!r}):\n{outcome.details}"
        )
        pytest.xfail(expected.reason)
    if outcome.status == "skipped":
        pytest.skip(f"CPython skips it: {outcome.details}")
    assert outcome.status == "passed", outcome.details


class _Probe(test_socket.BasicTCPTest):  # type: ignore[misc,name-defined]
    """BasicTCPTest.testRecv, noting what each half's sockets really are."""

    __test__ = False  # run only through the harness, by the test below
    seen: ClassVar[dict[str, Any]] = {}

    def setUp(self) -> None:
        super().setUp()
        self.seen["server"] = type(self.serv)
        self.seen["accepted"] = type(self.cli_conn)
        self.seen["accepted_peer"] = self.cli_conn.getpeername()

    def clientSetUp(self) -> None:  # CPython's name
        super().clientSetUp()
        cli = self.cli
        self.seen["client"] = type(cli)
        self.seen["client_state"] = cli._tether.state if cli._tether else None
        self.seen["client_peer"] = cli.getpeername()
        self.seen["client_kernel_peer"] = std.socket.getpeername(cli)
        self.seen["client_kernel_name"] = std.socket.getsockname(cli)


def test_client_half_is_tether_server_half_is_stdlib(client_settings: Gateway) -> None:
    outcome = harness.run_case(_Probe, "testRecv")
    assert outcome.status == "passed", outcome.details
    seen = _Probe.seen
    assert seen["client"] is TetherSocket
    assert seen["client_state"] == "connected"
    assert seen["server"] is std.socket
    assert seen["accepted"] is std.socket
    port = seen["client_peer"][1]
    assert seen["client_peer"] == ("127.0.0.1", port)  # the emulated peer: the test's server
    # ...while the descriptor itself is connected to the gateway, and the server
    # was reached by the gateway's outbound socket, not by the client's.
    assert seen["client_kernel_peer"] == _gateway_sockaddr(client_settings)
    assert seen["accepted_peer"] != seen["client_kernel_name"]


def test_recv_from_another_thread_during_blocking_connect(client_settings: Gateway) -> None:
    """TCPCloserTest's pattern, 30 times: a recv() racing a blocking connect() waits for it.

    Before the per-socket connect lock, the recv() read the gateway's answer
    frames itself in most attempts (ENOTCONN, EAGAIN, or protocol bytes as data).
    """
    server = std.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    failures: list[str] = []
    with server:
        for _ in range(30):
            cli = TetherSocket()
            with cli:

                def connect(cli: TetherSocket = cli) -> None:
                    try:
                        cli.connect(("127.0.0.1", port))
                    except Exception as exc:  # any failure is the finding
                        failures.append(f"connect: {exc!r}")

                thread = threading.Thread(target=connect)
                thread.start()
                conn, _ = server.accept()
                conn.close()
                select.select([cli], [], [], 1.0)
                try:
                    data = cli.recv(1)
                except Exception as exc:
                    failures.append(f"recv: {exc!r}")
                else:
                    if data:
                        failures.append(f"recv: protocol bytes read as data: {data!r}")
                thread.join(10)
    assert not failures, failures
