"""The wire machine's share of a connect: ``python -m bench.wire``.

One connect's whole exchange, both sides, with no sockets: the client sends
its hello and a Connect, the gateway reads both and answers with its hello
and a ConnectResult, the client reads the answers and switches to raw bytes
with the target's first byte behind them. Messages are built as the client
and the gateway build them (the hellos encoded once, as both sides do).

It says how much a faster wire machine could give the connection rate at
most: the whole exchange is a few percent of one connection's CPU
(bench/README.md, connection rate), so compiling it (mypyc, Cython) is not
where the rate is won.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time

from tether import __version__
from tether.wire import PROTOCOL_VERSION, Connection, Role, State, encode_frame, pb
from tether.wire.convert import address_from_wire, address_to_wire

# As a client configured for one app sends it (tether.client.stream.hello).
_HELLO = pb.ClientHello(
    protocol_version=PROTOCOL_VERSION, app="bench", key="k" * 32, client_version=__version__
)
_HELLO_FRAME = encode_frame(_HELLO)
_SERVER_HELLO = pb.ServerHello(protocol_version=PROTOCOL_VERSION, gateway_version=__version__)
_SERVER_HELLO_FRAME = encode_frame(_SERVER_HELLO)
_DESCRIPTOR = "A" * 22  # 16 random bytes, URL-safe base64 (gateway/core/registry.py)


def _expect(event: object, kind: type) -> None:
    if not isinstance(event, kind):
        raise TypeError(f"expected {kind.__name__}, the machine gave {event!r}")


def exchange() -> bytes:
    """One connect through both machines; returns the client's first raw bytes."""
    client = Connection(Role.CLIENT)
    gateway = Connection(Role.GATEWAY)
    out = client.send(_HELLO, frame=_HELLO_FRAME) + client.send(
        pb.Connect(host="127.0.0.1", port=4000, transport=pb.TRANSPORT_TCP)
    )
    gateway.receive_data(out)
    _expect(gateway.next_event(), pb.ClientHello)
    back = gateway.send(_SERVER_HELLO, frame=_SERVER_HELLO_FRAME)
    _expect(gateway.next_event(), pb.Connect)
    back += gateway.send(pb.ConnectResult(
        descriptor=_DESCRIPTOR,
        peer=address_to_wire(("127.0.0.1", 4000), socket.AF_INET),
        local=address_to_wire(("127.0.0.1", 50000), socket.AF_INET),
    ))
    client.receive_data(back + b"!")
    client.next_event()
    result = client.next_event()
    if not isinstance(result, pb.ConnectResult):
        raise TypeError(f"expected ConnectResult, the machine gave {result!r}")
    address_from_wire(result.peer)  # the client keeps both as sockaddr tuples
    address_from_wire(result.local)
    if client.state is not State.RELAY:
        raise RuntimeError(f"the client ended {client.state.value}, not relaying")
    return client.trailing_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wire", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20_000, help="exchanges per repetition")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    if exchange() != b"!":
        raise RuntimeError("the target's byte did not come out as raw data")
    for _ in range(args.count // 10):  # warm-up
        exchange()
    per: list[float] = []
    for _ in range(args.reps):
        start = time.perf_counter()
        for _ in range(args.count):
            exchange()
        per.append((time.perf_counter() - start) / args.count * 1e6)
    print(f"wire exchange (both sides, one connect): median {statistics.median(per):.2f} us, "
          f"best {min(per):.2f} us ({args.reps} x {args.count:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
