"""The blocking driver of an exchange (client/stream.py): send_now and read_answer.

They leave the socket's timeout alone, so each is checked with a blocking
socket, a non-blocking one and one with a timeout, on a socket pair
standing in for the gateway stream.
"""

from __future__ import annotations

import os
import socket as std
import threading
from collections.abc import Iterator

import pytest

from tether.client.exchange import Exchange
from tether.client.settings import Settings
from tether.client.stream import Deadline, read_answer, send_now
from tether.endpoint import parse_endpoint
from tether.wire import Connection, Role, pb

SETTINGS = Settings(gateway=parse_endpoint("127.0.0.1:9999"), app="a", key="k")

TIMEOUTS = [None, 0.0, 5.0]


@pytest.fixture
def pair() -> Iterator[tuple[std.socket, std.socket]]:
    a, b = std.socketpair()
    with a, b:
        yield a, b


def handshake() -> tuple[Exchange, bytes]:
    """A client exchange that has sent hello + Connect, and the gateway's answer to it."""
    client = Exchange(SETTINGS.gateway)
    sent = client.open(SETTINGS)
    sent += client.send(pb.Connect(transport=pb.TRANSPORT_TCP, host="127.0.0.1", port=9))
    gateway = Connection(Role.GATEWAY)
    gateway.receive_data(sent)
    assert isinstance(gateway.next_event(), pb.ClientHello)
    answer = gateway.send(pb.ServerHello(protocol_version=1))
    assert isinstance(gateway.next_event(), pb.Connect)
    answer += gateway.send(
        pb.ConnectResult(
            descriptor="d" * 32,
            peer=pb.Address(family=pb.FAMILY_INET, host="127.0.0.1", port=9),
            local=pb.Address(family=pb.FAMILY_INET, host="127.0.0.1", port=40000),
        )
    )
    return client, answer


def assert_in_step(sock: std.socket, timeout: float | None) -> None:
    assert sock.gettimeout() == timeout
    assert os.get_blocking(sock.fileno()) == (timeout is None)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_read_answer_consumes_exactly_the_frames(
    pair: tuple[std.socket, std.socket], timeout: float | None
) -> None:
    app, gw = pair
    app.settimeout(timeout)
    exchange, answer = handshake()
    gw.sendall(answer + b"220 greeting")  # the target spoke right behind the result
    result = read_answer(app, exchange, Deadline(5.0))
    # Both frames were read: the ServerHello (its version) and the ConnectResult.
    assert (exchange.wire.peer_version, type(result)) == (1, pb.ConnectResult)
    assert_in_step(app, timeout)
    app.settimeout(5.0)
    assert app.recv(100) == b"220 greeting"


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_read_answer_waits_for_the_rest_of_a_frame(
    pair: tuple[std.socket, std.socket], timeout: float | None
) -> None:
    app, gw = pair
    app.settimeout(timeout)
    exchange, answer = handshake()
    cut = len(answer) - 5  # inside the ConnectResult frame
    gw.sendall(answer[:cut])
    result: list[object] = []
    reader = threading.Thread(
        target=lambda: result.append(read_answer(app, exchange, Deadline(30.0)))
    )
    reader.start()
    gw.sendall(answer[cut:] + b"x")
    reader.join(60)
    assert not reader.is_alive()
    assert isinstance(result[0], pb.ConnectResult)
    assert_in_step(app, timeout)
    app.settimeout(5.0)
    assert app.recv(100) == b"x"


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_read_answer_times_out_at_the_deadline_not_the_sockets_timeout(
    pair: tuple[std.socket, std.socket], timeout: float | None
) -> None:
    app, _gw = pair
    app.settimeout(timeout)
    exchange, _answer = handshake()
    with pytest.raises(TimeoutError, match="timed out"):
        read_answer(app, exchange, Deadline(0.01))
    assert_in_step(app, timeout)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_read_answer_reports_a_hang_up(
    pair: tuple[std.socket, std.socket], timeout: float | None
) -> None:
    app, gw = pair
    app.settimeout(timeout)
    exchange, answer = handshake()
    gw.sendall(answer[:6])  # the ServerHello's frame, cut short
    gw.shutdown(std.SHUT_WR)
    with pytest.raises(ConnectionError, match="stream ended inside a frame"):
        read_answer(app, exchange, Deadline(5.0))


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_send_now(pair: tuple[std.socket, std.socket], timeout: float | None) -> None:
    app, gw = pair
    app.settimeout(timeout)
    send_now(app, b"hello", Deadline(5.0))
    assert_in_step(app, timeout)
    gw.settimeout(5.0)
    assert gw.recv(100) == b"hello"


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_send_now_sends_what_one_send_cannot(
    pair: tuple[std.socket, std.socket], timeout: float | None
) -> None:
    app, gw = pair
    app.setsockopt(std.SOL_SOCKET, std.SO_SNDBUF, 4096)
    app.settimeout(timeout)
    data = os.urandom(4 * 1024 * 1024)  # far more than the send buffer holds
    received = bytearray()

    def drain() -> None:
        gw.settimeout(30.0)
        while len(received) < len(data):
            chunk = gw.recv(65536)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    send_now(app, data, Deadline(60.0))
    reader.join(60)
    assert bytes(received) == data
    assert_in_step(app, timeout)
