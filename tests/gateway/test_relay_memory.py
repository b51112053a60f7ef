"""A closed connection is freed by reference counting, not left to the cyclic GC.

Each relayed connection joins two transports, two protocol halves, a link and
a socket record. If they still point at each other after the close, every
connection leaves them (and the transports' buffers) as cyclic garbage until
the collector runs, and the collector then runs every few dozen connections
on the connect path (bench/README.md, connection rate).
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from support import embedded_gateway, wait_for
from tcpservers import Server, serving

from tether.gateway.core.registry import SocketRecord
from tether.gateway.embedded import EmbeddedGateway

TIMEOUT = 10.0
CONNECTIONS = 20


@pytest.fixture
def embedded() -> Iterator[EmbeddedGateway]:
    with embedded_gateway() as (gw, _):
        yield gw


def _greet(server: Server, conn: socket.socket) -> None:
    conn.sendall(b"!")


def _left_over(types: tuple[type, ...]) -> int:
    """Objects of `types` the collector still tracks (alive, or garbage not yet collected)."""
    return sum(isinstance(o, types) for o in gc.get_objects())


def test_closed_connections_leave_no_transports_or_records_to_the_collector(
    embedded: EmbeddedGateway,
) -> None:
    import tether.socket as tsock

    gw = embedded
    transport_types: tuple[type, ...] = (SocketRecord,)
    with serving(_greet) as peer:
        # One connection first, to learn the event loop's transport class.
        probe = tsock.create_connection(("127.0.0.1", peer.port), timeout=TIMEOUT)
        assert probe.recv(1) == b"!"

        def outbound_type() -> type[Any]:
            assert gw.gateway is not None
            record = next(iter(gw.gateway.registry))
            assert record.link is not None and record.link.peer_side.transport is not None
            return type(record.link.peer_side.transport)

        transport_types += (gw.call(outbound_type),)
        probe.close()
        assert gw.gateway is not None
        registry = gw.gateway.registry
        assert wait_for(lambda: gw.call(lambda: len(registry)) == 0)
        gc.collect()
        gc.disable()
        try:
            before = gw.call(lambda: _left_over(transport_types))
            for _ in range(CONNECTIONS):
                s = tsock.create_connection(("127.0.0.1", peer.port), timeout=TIMEOUT)
                assert s.recv(1) == b"!"
                s.close()
            assert wait_for(lambda: gw.call(lambda: len(registry)) == 0)
            after = gw.call(lambda: _left_over(transport_types))
        finally:
            gc.enable()
    # A few may still be in the loop's hands at the instant of the count;
    # before the fix it was every connection's two transports and its record.
    assert after - before < CONNECTIONS // 2, (before, after)
