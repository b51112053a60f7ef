"""setsockopt()/getsockopt() on tether sockets take what the stdlib's take, with its meaning.

Every case is run on a real stdlib socket too and the outcomes compared: the
value the kernel ends up with when both accept, the exception type (and
errno) when the stdlib refuses. Through a real gateway (tests/conftest.py
`tethered`) for the TCP socket, its SSL wrapper and the UDP socket; and the
encoding alone (tether.wire.convert.encode_option + what the gateway does
with it) against the stdlib for every supported option.
"""

from __future__ import annotations

import array
import enum
import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import Gateway, StdSocket, descriptor, list_sockets
from tcpservers import echo, serving

from tether.demo.servers import HTTPServer, client_context
from tether.gateway.core.options import apply_option
from tether.wire import pb
from tether.wire.convert import OPTION_LEVELS, OPTION_NAMES, encode_option

LINGER = pb.SO_LINGER
LINGER_SIZE = struct.calcsize("ii")


class Index:
    """An object the stdlib takes as an int through __index__ (like numpy's integers)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


class IntOnly:
    """__int__ without __index__: the stdlib refuses it (no implicit float-style conversion)."""

    def __int__(self) -> int:
        return 1


class Switch(enum.IntEnum):
    ON = 1
    OFF = 0


def _non_contiguous() -> memoryview:
    return memoryview(struct.pack("ii", 1, 1))[::2]


# (id, value): every kind of value setsockopt's three-argument form can be given.
VALUES: list[tuple[str, Any]] = [
    ("True", True),
    ("False", False),
    ("int-1", 1),
    ("int-0", 0),
    ("int-minus-1", -1),
    ("int-65536", 65536),
    ("int-max", 2**31 - 1),
    ("int-min", -(2**31)),
    ("int-over", 2**31),
    ("int-under", -(2**31) - 1),
    ("int-huge", 2**64),
    ("IntEnum", Switch.ON),
    ("IntEnum-off", Switch.OFF),
    ("index", Index(1)),
    ("index-huge", Index(2**40)),
    ("int-only", IntOnly()),
    ("float", 1.0),
    ("str", "1"),
    ("None", None),
    ("list", [1]),
    ("object", object()),
    ("bytes-empty", b""),
    ("bytes-1", b"\x01"),
    ("bytes-int", struct.pack("i", 1)),
    ("bytes-int-zero", struct.pack("i", 0)),
    ("bytes-int-junk", struct.pack("i", 1) + b"junk"),
    ("bytearray", bytearray(struct.pack("i", 1))),
    ("memoryview", memoryview(struct.pack("i", 1))),
    ("array-i", array.array("i", [1])),
    ("non-contiguous", _non_contiguous()),
    ("linger-on", struct.pack("ii", 1, 7)),
    ("linger-off", struct.pack("ii", 0, 3)),
    ("linger-junk", struct.pack("ii", 1, 7) + b"junk"),
]
# The four-argument form: setsockopt(level, opt, None, optlen).
WITH_OPTLEN: list[tuple[str, Any, Any]] = [
    ("None-0", None, 0),
    ("None-4", None, 4),
    ("None-8", None, 8),
    ("None-minus-1", None, -1),
    ("None-True", None, True),
    ("None-index", None, Index(4)),
    ("None-str", None, "4"),
    ("int-and-optlen", 1, 4),
    ("bytes-and-optlen", b"\x01\0\0\0", 4),
]


Outcome = tuple[Any, ...]


def outcome(call: Callable[[], Any]) -> Outcome:
    """("ok", result) or the exception's type and errno: what the app can tell apart."""
    try:
        result = call()
    except Exception as exc:  # whatever each side raises is compared
        return (type(exc), getattr(exc, "errno", None))
    return ("ok", result)


def read_back(sock: socket.socket, level: int, optname: int) -> Any:
    if (level, optname) == (socket.SOL_SOCKET, socket.SO_LINGER):
        return sock.getsockopt(level, optname, LINGER_SIZE)
    return sock.getsockopt(level, optname)


def stdlib_outcome(level: int, optname: int, *args: Any, stream: bool = True) -> Outcome:
    """setsockopt(level, optname, *args) on a fresh stdlib socket, and the value it kept."""
    kind = socket.SOCK_STREAM if stream else socket.SOCK_DGRAM
    with StdSocket(socket.AF_INET, kind) as sock:
        done = outcome(lambda: sock.setsockopt(level, optname, *args))
        if done[0] != "ok":
            return done
        return ("ok", read_back(sock, level, optname))


def ids(table: list[Any]) -> list[str]:
    return [row[0] for row in table]


# -- the encoding: what the gateway applies is what the stdlib would have set ------------

OPTION_IDS = [OPTION_NAMES[name] for name in OPTION_LEVELS]


def gateway_outcome(name: pb.OptionName.ValueType, *args: Any) -> Outcome:
    """encode_option (the client) then apply_option (the gateway) on a fresh socket."""
    level, optname = OPTION_LEVELS[name]
    encoded = outcome(lambda: encode_option(name, *args))
    if encoded[0] != "ok":
        return encoded
    wire = pb.OptionValue.FromString(encoded[1].SerializeToString())
    with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        done = outcome(lambda: apply_option(sock, wire))
        if done[0] != "ok":
            return done
        return ("ok", read_back(sock, level, optname))


@pytest.mark.parametrize("name", list(OPTION_LEVELS), ids=OPTION_IDS)
@pytest.mark.parametrize(("case", "value"), VALUES, ids=ids(VALUES))
def test_encoding_means_what_the_stdlib_does(
    name: pb.OptionName.ValueType, case: str, value: Any
) -> None:
    level, optname = OPTION_LEVELS[name]
    assert gateway_outcome(name, value) == stdlib_outcome(level, optname, value)


@pytest.mark.parametrize("name", list(OPTION_LEVELS), ids=OPTION_IDS)
@pytest.mark.parametrize(("case", "value", "optlen"), WITH_OPTLEN, ids=ids(WITH_OPTLEN))
def test_encoding_with_optlen_is_refused_like_the_stdlib(
    name: pb.OptionName.ValueType, case: str, value: Any, optlen: Any
) -> None:
    level, optname = OPTION_LEVELS[name]
    assert gateway_outcome(name, value, optlen) == stdlib_outcome(level, optname, value, optlen)


def test_a_bool_travels_as_an_int() -> None:
    # The TypeError: protobuf refuses a bool for an integer field.
    encoded = encode_option(pb.TCP_NODELAY, True)
    assert type(encoded.int_value) is int and encoded.int_value == 1


# -- a tether TCP socket through a real gateway -----------------------------------------

# Options whose every int value the kernel takes, so a value kept before
# connect() is judged by the client alone and must be refused there or never.
PRECONNECT = [
    (socket.IPPROTO_TCP, socket.TCP_NODELAY),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    (socket.SOL_SOCKET, socket.SO_RCVBUF),
    (socket.SOL_SOCKET, socket.SO_LINGER),
]
CONNECTED = [*PRECONNECT, (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)]


def label(option: tuple[int, int]) -> str:
    level, optname = option
    return next(OPTION_NAMES[n] for n, key in OPTION_LEVELS.items() if key == (level, optname))


@pytest.fixture(scope="module")
def echo_server() -> Iterator[int]:
    with serving(echo) as server:
        yield server.port


def direct(port: int, level: int, optname: int, *args: Any) -> Outcome:
    """The same setsockopt on a stdlib socket connected straight to the target."""
    with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.connect(("127.0.0.1", port))
        done = outcome(lambda: sock.setsockopt(level, optname, *args))
        if done[0] != "ok":
            return done
        return ("ok", read_back(sock, level, optname))


@pytest.mark.parametrize("option", CONNECTED, ids=[label(o) for o in CONNECTED])
@pytest.mark.parametrize(("case", "value"), VALUES, ids=ids(VALUES))
def test_connected_socket_takes_what_the_stdlib_takes(
    tethered: Gateway, echo_server: int, option: tuple[int, int], case: str, value: Any
) -> None:
    level, optname = option
    with socket.create_connection(("127.0.0.1", echo_server), timeout=10) as sock:
        assert descriptor(sock)  # through the gateway, not a direct connection
        done = outcome(lambda: sock.setsockopt(level, optname, value))
        got = done if done[0] != "ok" else ("ok", read_back(sock, level, optname))
    assert got == direct(echo_server, level, optname, value)


@pytest.mark.parametrize("option", PRECONNECT, ids=[label(o) for o in PRECONNECT])
@pytest.mark.parametrize(("case", "value"), VALUES, ids=ids(VALUES))
def test_option_set_before_connect_means_the_same(
    tethered: Gateway, echo_server: int, option: tuple[int, int], case: str, value: Any
) -> None:
    # Kept by the client and sent with the Connect: refused at setsockopt()
    # exactly when the stdlib refuses, and in force on the outbound socket.
    level, optname = option
    with socket.socket() as sock:
        done = outcome(lambda: sock.setsockopt(level, optname, value))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", echo_server))
        got = done if done[0] != "ok" else ("ok", read_back(sock, level, optname))
    assert got == direct(echo_server, level, optname, value)


@pytest.mark.parametrize("option", CONNECTED, ids=[label(o) for o in CONNECTED])
@pytest.mark.parametrize(("case", "value", "optlen"), WITH_OPTLEN, ids=ids(WITH_OPTLEN))
def test_optlen_form_is_refused_like_the_stdlib(
    tethered: Gateway, echo_server: int, option: tuple[int, int], case: str, value: Any,
    optlen: Any,
) -> None:
    level, optname = option
    with socket.create_connection(("127.0.0.1", echo_server), timeout=10) as sock:
        got = outcome(lambda: sock.setsockopt(level, optname, value, optlen))
    assert got == direct(echo_server, level, optname, value, optlen)


LEVELS: list[tuple[str, Any, Any]] = [
    ("IntEnum-level", socket.IPPROTO_TCP, socket.TCP_NODELAY),
    ("index-level", Index(socket.IPPROTO_TCP), socket.TCP_NODELAY),
    ("index-optname", socket.IPPROTO_TCP, Index(socket.TCP_NODELAY)),
    ("bool-level", True, socket.SO_KEEPALIVE),  # SOL_SOCKET is 1 on Linux
    ("float-level", float(socket.IPPROTO_TCP), socket.TCP_NODELAY),
    ("str-optname", socket.IPPROTO_TCP, "1"),
    ("huge-level", 2**40, socket.TCP_NODELAY),
    ("huge-optname", socket.IPPROTO_TCP, 2**40),
    ("unknown-level", -1, 1),
]


@pytest.mark.parametrize(("case", "level", "optname"), LEVELS, ids=ids(LEVELS))
def test_level_and_name_are_taken_like_the_stdlib(
    tethered: Gateway, echo_server: int, case: str, level: Any, optname: Any
) -> None:
    with socket.create_connection(("127.0.0.1", echo_server), timeout=10) as sock:
        set_tether = outcome(lambda: sock.setsockopt(level, optname, 1))
        get_tether = outcome(lambda: sock.getsockopt(level, optname))
    with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as plain:
        set_stdlib = outcome(lambda: plain.setsockopt(level, optname, 1))
        get_stdlib = outcome(lambda: plain.getsockopt(level, optname))
    if case == "unknown-level":
        # Tether refuses every option it does not carry with ENOPROTOOPT,
        # where the kernel may say EOPNOTSUPP: an OSError either way.
        set_tether, get_tether = set_tether[:1], get_tether[:1]
        set_stdlib, get_stdlib = set_stdlib[:1], get_stdlib[:1]
    assert set_tether == set_stdlib
    assert get_tether == get_stdlib


BUFLENS: list[tuple[str, Any]] = [
    ("zero", 0),
    ("one", 1),
    ("four", 4),
    ("max", 1024),
    ("over", 1025),
    ("negative", -1),
    ("index", Index(4)),
    ("float", 4.0),
]


@pytest.mark.parametrize(("case", "buflen"), BUFLENS, ids=ids(BUFLENS))
def test_getsockopt_buflen_like_the_stdlib(
    tethered: Gateway, echo_server: int, case: str, buflen: Any
) -> None:
    level, optname = socket.IPPROTO_TCP, socket.TCP_NODELAY
    with socket.create_connection(("127.0.0.1", echo_server), timeout=10) as sock:
        sock.setsockopt(level, optname, True)
        got = outcome(lambda: sock.getsockopt(level, optname, buflen))
    with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as plain:
        plain.setsockopt(level, optname, True)
        want = outcome(lambda: plain.getsockopt(level, optname, buflen))
    assert got == want


def test_keywords_are_refused_like_the_stdlib(tethered: Gateway, echo_server: int) -> None:
    with (
        socket.create_connection(("127.0.0.1", echo_server), timeout=10) as sock,
        pytest.raises(TypeError),
    ):
        sock.setsockopt(level=socket.IPPROTO_TCP, optname=socket.TCP_NODELAY, value=1)  # type: ignore[call-arg]


def test_nodelay_true_end_to_end(tethered: Gateway, echo_server: int) -> None:
    # The case, as trio and aiohttp do it; getsockopt asks the gateway,
    # so 1 is the outbound socket's own value.
    with socket.create_connection(("127.0.0.1", echo_server), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, False)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"


# -- the SSL wrapper and the UDP socket --------------------------------------------------


@pytest.mark.parametrize(
    ("case", "args"),
    [
        ("True", (True,)),
        ("IntEnum", (Switch.ON,)),
        ("bytes", (struct.pack("i", 1),)),
        ("None", (None,)),
        ("float", (1.0,)),
        ("None-optlen", (None, 4)),
        ("int-optlen", (1, 4)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_ssl_socket_takes_what_the_stdlib_takes(
    tethered: Gateway,
    https_server: HTTPServer,
    tls_ca: Any,
    echo_server: int,
    case: str,
    args: tuple[Any, ...],
) -> None:
    level, optname = socket.IPPROTO_TCP, socket.TCP_NODELAY
    ctx = client_context(tls_ca[0])
    raw = socket.create_connection(("127.0.0.1", https_server.port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="www.test") as tls:
        assert isinstance(tls, ssl.SSLSocket)
        tls.setsockopt(level, optname, False)
        done = outcome(lambda: tls.setsockopt(level, optname, *args))
        got = done if done[0] != "ok" else ("ok", tls.getsockopt(level, optname))
    with StdSocket(socket.AF_INET, socket.SOCK_STREAM) as plain:
        plain.connect(("127.0.0.1", echo_server))
        plain.setsockopt(level, optname, False)
        done = outcome(lambda: plain.setsockopt(level, optname, *args))
        want = done if done[0] != "ok" else ("ok", plain.getsockopt(level, optname))
    assert got == want


UDP_OPTIONS = [
    (socket.SOL_SOCKET, socket.SO_REUSEADDR),
    (socket.SOL_SOCKET, socket.SO_RCVBUF),
]


@pytest.mark.parametrize("option", UDP_OPTIONS, ids=["SO_REUSEADDR", "SO_RCVBUF"])
@pytest.mark.parametrize(("case", "value"), VALUES, ids=ids(VALUES))
def test_udp_socket_takes_what_the_stdlib_takes(
    tethered: Gateway, option: tuple[int, int], case: str, value: Any
) -> None:
    level, optname = option
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert type(sock).__name__ == "DatagramSocket"
        sock.bind(("0.0.0.0", 0))  # opens the association: the option goes to the gateway too
        done = outcome(lambda: sock.setsockopt(level, optname, value))
        got = done if done[0] != "ok" else ("ok", read_back(sock, level, optname))
    assert got == stdlib_outcome(level, optname, value, stream=False)


@pytest.mark.parametrize(("case", "value", "optlen"), WITH_OPTLEN, ids=ids(WITH_OPTLEN))
def test_udp_optlen_form_is_refused_like_the_stdlib(
    tethered: Gateway, case: str, value: Any, optlen: Any
) -> None:
    level, optname = socket.SOL_SOCKET, socket.SO_REUSEADDR
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        got = outcome(lambda: sock.setsockopt(level, optname, value, optlen))
    assert got == stdlib_outcome(level, optname, value, optlen, stream=False)


# -- trio, whose SocketStream sets TCP_NODELAY to True -----------------------------------


def test_trio_open_tcp_stream_through_the_gateway(tethered: Gateway, echo_server: int) -> None:
    import trio

    async def main() -> tuple[bytes, int, bool]:
        stream = await trio.open_tcp_stream("127.0.0.1", echo_server)
        async with stream:
            raw = stream.socket._sock  # type: ignore[attr-defined]  # trio wraps socket.socket
            prefix = descriptor(raw)[:8]
            # Listed by the gateway: the connection went through it, not direct.
            at_gateway = prefix in {s.descriptor_prefix for s in list_sockets(tethered)}
            nodelay = stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await stream.send_all(b"hello trio")
            got = b""
            with trio.fail_after(10):
                while len(got) < 10:
                    got += await stream.receive_some(64)
            return got, nodelay, at_gateway

    got, nodelay, at_gateway = trio.run(main)
    assert got == b"hello trio"
    assert nodelay == 1  # trio's SocketStream set it to True
    assert at_gateway
