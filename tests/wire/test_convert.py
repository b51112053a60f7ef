"""Mapping between the wire's portable enums and this platform's socket values."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator

import pytest

from tether.wire import pb
from tether.wire.convert import (
    FAMILY_FROM_WIRE,
    FAMILY_TO_WIRE,
    OPTION_LEVELS,
    OPTION_NAMES,
    OPTIONS,
    SOCKTYPE_FROM_WIRE,
    SOCKTYPE_TO_WIRE,
    address_from_wire,
    address_to_wire,
    decode_option,
    encode_option,
    option_label,
)

INT_OPTIONS = [name for name in OPTION_NAMES if name != pb.SO_LINGER]


def over_the_wire(value: pb.OptionValue) -> pb.OptionValue:
    # Round trips go through serialization too: int64/int32/bool on the wire.
    return pb.OptionValue.FromString(value.SerializeToString())


# -- the tables ---------------------------------------------------------------------


def test_every_wire_option_is_mapped() -> None:
    # A new OptionName in the .proto needs a (level, optname) and a label here.
    names = {v for v in pb.OptionName.values() if v != pb.OPTION_UNSPECIFIED}
    assert set(OPTION_LEVELS) == names
    assert set(OPTION_NAMES) == names
    for value, label in OPTION_NAMES.items():
        assert pb.OptionName.Name(value) == label


def test_no_two_options_share_a_wire_name() -> None:
    # OPTION_LEVELS is built as OPTIONS inverted: a shared wire name would
    # silently drop one (level, optname) from it.
    assert len(set(OPTIONS.values())) == len(OPTIONS)


@pytest.mark.parametrize("name", list(OPTION_NAMES), ids=list(OPTION_NAMES.values()))
def test_options_use_this_platforms_numbers(name: pb.OptionName.ValueType) -> None:
    level, optname = OPTION_LEVELS[name]
    expected_level = (
        socket.IPPROTO_TCP if OPTION_NAMES[name].startswith("TCP_") else socket.SOL_SOCKET
    )
    assert (level, optname) == (expected_level, getattr(socket, OPTION_NAMES[name]))


@pytest.mark.parametrize(
    ("family", "wire"),
    [
        (socket.AF_UNSPEC, pb.FAMILY_UNSPEC),
        (socket.AF_INET, pb.FAMILY_INET),
        (socket.AF_INET6, pb.FAMILY_INET6),
    ],
)
def test_family_round_trip(family: int, wire: int) -> None:
    assert FAMILY_TO_WIRE[family] == wire
    assert FAMILY_FROM_WIRE[wire] == family
    # An AddressFamily member, as the stdlib reports families.
    assert isinstance(FAMILY_FROM_WIRE[wire], socket.AddressFamily)


@pytest.mark.parametrize(
    ("socktype", "wire"),
    [
        (0, pb.SOCKTYPE_ANY),
        (socket.SOCK_STREAM, pb.SOCKTYPE_STREAM),
        (socket.SOCK_DGRAM, pb.SOCKTYPE_DGRAM),
        (socket.SOCK_RAW, pb.SOCKTYPE_RAW),
    ],
)
def test_socktype_round_trip(socktype: int, wire: int) -> None:
    assert SOCKTYPE_TO_WIRE[socktype] == wire
    assert SOCKTYPE_FROM_WIRE[wire] == socktype


# -- integer options ----------------------------------------------------------------


@pytest.mark.parametrize("name", INT_OPTIONS, ids=[OPTION_NAMES[n] for n in INT_OPTIONS])
@pytest.mark.parametrize("value", [0, 1, 4096, 212_992, -1, 2**31 - 1, -(2**31)])
def test_int_option_round_trip(name: pb.OptionName.ValueType, value: int) -> None:
    encoded = encode_option(name, value)
    assert encoded.name == name
    assert encoded.int_value == value
    assert decode_option(over_the_wire(encoded)) == value


@pytest.mark.parametrize("value", [0, 1, 8192, -1, 2**31 - 1])
def test_int_option_as_bytes_round_trip(value: int) -> None:
    # setsockopt(level, opt, bytes) passes a C int in native byte order, and
    # getsockopt(level, opt, buflen) returns one; both must survive the wire.
    packed = struct.pack("i", value)
    encoded = encode_option(pb.SO_RCVBUF, packed)
    assert encoded.int_value == value
    assert decode_option(over_the_wire(encoded), buflen=4) == packed


@pytest.mark.parametrize(
    ("buflen", "expected"),
    [(1, struct.pack("i", 7)[:1]), (4, struct.pack("i", 7)), (64, struct.pack("i", 7))],
)
def test_int_option_buflen(buflen: int, expected: bytes) -> None:
    # Like the kernel: at most sizeof(int) bytes, fewer when buflen is smaller.
    assert decode_option(pb.OptionValue(name=pb.SO_SNDBUF, int_value=7), buflen) == expected


@pytest.mark.parametrize("value", [b"", b"\x01", b"\x01\x00\x00"])
def test_bytes_shorter_than_an_int_are_einval(value: bytes) -> None:
    # The kernel refuses an optlen below sizeof(int) (tests/client/test_options.py
    # compares every kind of value with the stdlib's own socket).
    with pytest.raises(OSError) as info:
        encode_option(pb.SO_KEEPALIVE, value)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_an_int(value: bool) -> None:
    encoded = over_the_wire(encode_option(pb.TCP_NODELAY, value))
    assert decode_option(encoded) == int(value)


# -- SO_LINGER ----------------------------------------------------------------------

LINGERS = [(0, 0), (1, 0), (1, 30), (0, 5), (1, 2**31 - 1)]


@pytest.mark.parametrize(("on", "seconds"), LINGERS)
def test_linger_round_trip(on: int, seconds: int) -> None:
    packed = struct.pack("ii", on, seconds)
    encoded = encode_option(pb.SO_LINGER, packed)
    assert (encoded.name, encoded.linger_on, encoded.linger_seconds) == (
        pb.SO_LINGER,
        bool(on),
        seconds,
    )
    decoded = over_the_wire(encoded)
    assert decode_option(decoded, buflen=struct.calcsize("ii")) == packed
    # getsockopt() without buflen gives the first int of the struct, l_onoff.
    assert decode_option(decoded) == on


def test_linger_truncated_to_buflen() -> None:
    encoded = encode_option(pb.SO_LINGER, struct.pack("ii", 1, 9))
    assert decode_option(encoded, buflen=4) == struct.pack("i", 1)


def test_linger_ignores_bytes_past_the_struct() -> None:
    packed = struct.pack("ii", 1, 9)
    assert encode_option(pb.SO_LINGER, packed + b"junk") == encode_option(pb.SO_LINGER, packed)


@pytest.mark.parametrize("value", [1, True, struct.pack("i", 1)])
def test_linger_needs_a_whole_struct(value: int | bytes) -> None:
    # An int is sizeof(int) bytes to the kernel: short for a struct linger.
    with pytest.raises(OSError, match="SO_LINGER") as info:
        encode_option(pb.SO_LINGER, value)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(("on", "seconds"), [(1, 30), (0, 0)])
def test_linger_layout_matches_the_kernel(on: int, seconds: int) -> None:
    # What the gateway's real socket would answer must equal what the client
    # rebuilds from the wire, so the "ii" layout has to be this platform's.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", on, seconds))
        size = struct.calcsize("ii")
        kernel = s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, size)
    wire = encode_option(pb.SO_LINGER, kernel)
    assert decode_option(over_the_wire(wire), buflen=size) == kernel


# -- option_label -------------------------------------------------------------------


def _labels() -> Iterator[object]:
    for (level, optname), wire in OPTIONS.items():
        level_name = "IPPROTO_TCP" if level == socket.IPPROTO_TCP else "SOL_SOCKET"
        name = OPTION_NAMES[wire]
        marks = []
        yield pytest.param(level, optname, f"{level_name}/{name}", id=name, marks=marks)


@pytest.mark.parametrize(("level", "optname", "label"), list(_labels()))
def test_option_label_for_supported_options(level: int, optname: int, label: str) -> None:
    assert option_label(level, optname) == label


@pytest.mark.parametrize(
    ("level", "optname", "label"),
    [
        # An option tether refuses still gets its name in the error message.
        pytest.param(socket.SOL_SOCKET, socket.SO_BROADCAST, "SOL_SOCKET/SO_BROADCAST", id="known"),
        pytest.param(socket.IPPROTO_TCP, socket.TCP_MAXSEG, "IPPROTO_TCP/TCP_MAXSEG", id="tcp"),
        # Numbers no constant has stay numbers.
        pytest.param(socket.SOL_SOCKET, 987_654, "SOL_SOCKET/987654", id="unknown-optname"),
        pytest.param(socket.IPPROTO_TCP, 987_654, "IPPROTO_TCP/987654", id="unknown-tcp"),
        pytest.param(4321, 987_654, "4321/987654", id="unknown-level"),
    ],
)
def test_option_label_other_options(level: int, optname: int, label: str) -> None:
    assert option_label(level, optname) == label


def test_option_label_other_level_names_the_option() -> None:
    # Levels without a name table still look the option up among IP_/IPV6_/SO_/TCP_.
    label = option_label(socket.IPPROTO_IP, 987_654)
    assert label == f"{socket.IPPROTO_IP}/987654"
    level, name = option_label(socket.IPPROTO_IP, socket.IP_TTL).split("/")
    assert level == str(socket.IPPROTO_IP)
    assert name.startswith(("IP_", "IPV6_", "SO_", "TCP_"))
    assert getattr(socket, name) == socket.IP_TTL


# -- addresses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sockaddr", "family", "expected"),
    [
        pytest.param(("192.0.2.1", 443), socket.AF_INET, ("192.0.2.1", 443), id="v4"),
        pytest.param(("0.0.0.0", 0), socket.AF_INET, ("0.0.0.0", 0), id="v4-any"),
        pytest.param(
            ("2001:db8::1", 443, 0, 0), socket.AF_INET6, ("2001:db8::1", 443, 0, 0), id="v6"
        ),
        pytest.param(
            ("fe80::1", 22, 0x12345, 3),
            socket.AF_INET6,
            ("fe80::1", 22, 0x12345, 3),
            id="v6-flowinfo-scope",
        ),
        # A 2-tuple for AF_INET6 is accepted (connect() takes one) and comes
        # back as the 4-tuple the stdlib reports.
        pytest.param(("::1", 80), socket.AF_INET6, ("::1", 80, 0, 0), id="v6-short"),
        pytest.param(("::ffff:192.0.2.1", 65535), socket.AF_INET6, None, id="v4-mapped"),
    ],
)
def test_address_round_trip(
    sockaddr: tuple[object, ...], family: int, expected: tuple[object, ...] | None
) -> None:
    wire = address_to_wire(sockaddr, family)
    assert wire.family == FAMILY_TO_WIRE[family]
    assert (wire.host, wire.port) == sockaddr[:2]
    back = address_from_wire(pb.Address.FromString(wire.SerializeToString()))
    assert back == (expected if expected is not None else (*sockaddr, 0, 0))


def test_address_v4_ignores_extra_fields() -> None:
    wire = address_to_wire(("192.0.2.1", 80, 7, 9), socket.AF_INET)
    assert (wire.flowinfo, wire.scope_id) == (0, 0)
    assert address_from_wire(wire) == ("192.0.2.1", 80)


def _bound_address(family: socket.AddressFamily, host: str) -> tuple[object, ...]:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return tuple(s.getsockname())
    except OSError as exc:
        pytest.skip(f"cannot bind {host}: {exc}")


@pytest.mark.parametrize(
    ("family", "host"),
    [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
    ids=["v4", "v6"],
)
def test_address_round_trip_matches_getsockname(family: socket.AddressFamily, host: str) -> None:
    # What a real socket reports at the gateway is what the app gets back.
    sockaddr = _bound_address(family, host)
    assert address_from_wire(address_to_wire(sockaddr, family)) == sockaddr
