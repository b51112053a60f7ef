"""The Tether front-end on the wire: what a refusal carries, frame by frame.

A raw stream (the stdlib's socket and tether.wire's state machine), so
this checks what the gateway sends, whatever the client makes of it.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest
from support import embedded_gateway

from tether.gateway.embedded import EmbeddedGateway
from tether.wire import PROTOCOL_VERSION, Connection, Role, pb

DENIED_REASON = "10.0.0.0/8 is private-use (RFC 1918)"
DENIED_RULE = "deny 10.0.0.0/8"


@pytest.fixture
def gateway() -> Iterator[EmbeddedGateway]:
    with embedded_gateway() as (gw, _settings):
        yield gw


def exchange(gw: EmbeddedGateway, *messages: pb.Connect | pb.Request) -> list[object]:
    """Hello, then each of `messages` once the one before is answered; the answers."""
    host, port = gw.endpoints[0].host, gw.endpoints[0].port
    wire = Connection(Role.CLIENT)
    answers: list[object] = []
    with socket.create_connection((host, port), timeout=5) as sock:
        hello = wire.send(pb.ClientHello(protocol_version=PROTOCOL_VERSION, app="a", key="key-a"))
        for message in messages:
            sock.sendall(hello + wire.send(message))
            hello = b""
            answer = None
            while answer is None:
                chunk = sock.recv(65536)
                assert chunk, f"the gateway hung up after {answers}"
                wire.receive_data(chunk)
                while answer is None:
                    event = wire.next_event()
                    if isinstance(event, pb.ConnectResult | pb.Response):
                        answer = event
                    elif not isinstance(event, pb.ServerHello):
                        break
            answers.append(answer)
    return answers


def assert_policy_denial(error: pb.Error, what: str, port: int) -> None:
    assert (error.code, error.errno) == (pb.Error.PERMISSION_DENIED, errno.EACCES)
    assert (error.rule, error.reason) == (DENIED_RULE, DENIED_REASON)
    # The message is the policy's sentence, as before the reason had a field of its own.
    assert error.message == (
        f"tether: {what} to 10.0.0.1:{port} denied for app 'a': {DENIED_REASON} "
        f"(rule: {DENIED_RULE})"
    )


def test_a_denied_connect_carries_rule_and_reason(gateway: EmbeddedGateway) -> None:
    (result,) = exchange(gateway, pb.Connect(
        transport=pb.TRANSPORT_TCP, family=pb.FAMILY_INET, host="10.0.0.1", port=80))
    assert isinstance(result, pb.ConnectResult)
    assert_policy_denial(result.error, "connection", 80)


def test_a_denied_udp_destination_carries_rule_and_reason(gateway: EmbeddedGateway) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as app_udp:
        app_udp.bind(("127.0.0.1", 0))
        source = pb.Address(family=pb.FAMILY_INET, host="127.0.0.1",
                            port=app_udp.getsockname()[1])
        # Denied as the association's first destination (a connected socket) ...
        (opened,) = exchange(gateway, pb.Connect(
            transport=pb.TRANSPORT_UDP, family=pb.FAMILY_INET, source=source,
            host="10.0.0.1", port=53))
        assert isinstance(opened, pb.ConnectResult)
        assert_policy_denial(opened.error, "UDP traffic", 53)
        # ... and as a later one (AllowDestination on an open association).
        opened, allowed = exchange(
            gateway,
            pb.Connect(transport=pb.TRANSPORT_UDP, family=pb.FAMILY_INET, source=source),
            pb.Request(id=7, allow_destination=pb.AllowDestination(host="10.0.0.1", port=53)),
        )
    assert isinstance(opened, pb.ConnectResult) and opened.descriptor
    assert isinstance(allowed, pb.Response) and allowed.id == 7
    assert_policy_denial(allowed.error, "UDP traffic", 53)


def test_other_refusals_carry_no_rule(gateway: EmbeddedGateway) -> None:
    (result,) = exchange(gateway, pb.Request(
        id=1, close_reason=pb.CloseReason(descriptor="nosuchdescriptor")))
    assert isinstance(result, pb.Response)
    assert result.error == pb.Error(code=pb.Error.NOT_FOUND, errno=errno.EBADF,
                                    message="tether: no socket nosuchde... for app 'a'")
