"""tether.PolicyDenied through a real gateway: a denied TCP connect, a denied UDP destination.

Every destination here is on loopback: the session gateway allows loopback
on every port but 25, and the UDP gateway allows its echo peers' ports only.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest
from support import TIMEOUT, Gateway
from udpsupport import UdpEnv, free_udp_port, udp_env

import tether
import tether.socket as tsock

DENIED_TCP = ("127.0.0.1", 25)


def check(exc: BaseException, destination: str) -> None:
    """The details a program reads, and the words it always had."""
    assert isinstance(exc, tether.PolicyDenied)
    assert isinstance(exc, PermissionError) and exc.errno == errno.EACCES
    assert exc.rule and exc.reason
    message = str(exc)
    assert destination in message and "denied" in message
    # The gateway's sentence ends with the reason and the rule it carries apart.
    assert message.endswith(f"{exc.reason} (rule: {exc.rule})")


def test_a_denied_connect_raises_policy_denied(tethered: Gateway) -> None:
    with pytest.raises(PermissionError) as info:  # what a program wrote before there was a class
        socket.create_connection(DENIED_TCP, timeout=TIMEOUT)
    check(info.value, "127.0.0.1:25")
    assert info.value.rule == "deny port 25"


def test_a_denied_connect_leaves_the_socket_usable(tethered: Gateway, echo_port: int) -> None:
    with socket.socket() as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(DENIED_TCP)
        except PermissionError as exc:
            check(exc, "127.0.0.1:25")
        else:
            pytest.fail("the connect was not denied")
        sock.connect(("127.0.0.1", echo_port))  # on the same gateway stream
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"


def test_a_denied_non_blocking_connect_is_policy_denied_on_first_use(tethered: Gateway) -> None:
    with socket.socket() as sock:
        sock.setblocking(False)
        assert sock.connect_ex(DENIED_TCP) == errno.EINPROGRESS
        sock.setblocking(True)
        with pytest.raises(tether.PolicyDenied) as info:
            sock.recv(1)  # waits for the answer, as Linux does, and raises its error
        check(info.value, "127.0.0.1:25")


@pytest.fixture
def env() -> Iterator[UdpEnv]:
    with udp_env(1) as env:
        yield env


def test_a_denied_udp_destination_raises_policy_denied(env: UdpEnv) -> None:
    port = free_udp_port()
    with tsock.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.sendto(b"must not arrive", ("127.0.0.1", port))
        except PermissionError as exc:
            check(exc, f"127.0.0.1:{port}")
        else:
            pytest.fail("the destination was not denied")
        fresh = tsock.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with fresh, pytest.raises(tether.PolicyDenied) as info:  # as a first destination too
            fresh.connect(("127.0.0.1", port))
        check(info.value, f"127.0.0.1:{port}")
        sock.sendto(b"ok", env.peers[0].address)  # the association is still there
        assert sock.recvfrom(64)[0] == b"ok"
