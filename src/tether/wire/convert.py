"""Mapping between the wire's portable enums and this platform's socket values.

Both the client and the gateway use these, so a value means the same thing on
both ends whatever their platforms number it as.
"""

from __future__ import annotations

import errno
import operator
import socket
import struct
import sys
from typing import Any, Final

from tether.wire._pb import tether_pb2 as pb

FAMILY_TO_WIRE: Final[dict[int, pb.Family.ValueType]] = {
    socket.AF_UNSPEC: pb.FAMILY_UNSPEC,
    socket.AF_INET: pb.FAMILY_INET,
    socket.AF_INET6: pb.FAMILY_INET6,
}
FAMILY_FROM_WIRE: Final[dict[int, socket.AddressFamily]] = {
    pb.FAMILY_UNSPEC: socket.AF_UNSPEC,
    pb.FAMILY_INET: socket.AF_INET,
    pb.FAMILY_INET6: socket.AF_INET6,
}
SOCKTYPE_TO_WIRE: Final[dict[int, pb.SockType.ValueType]] = {
    0: pb.SOCKTYPE_ANY,
    socket.SOCK_STREAM: pb.SOCKTYPE_STREAM,
    socket.SOCK_DGRAM: pb.SOCKTYPE_DGRAM,
    socket.SOCK_RAW: pb.SOCKTYPE_RAW,
}
SOCKTYPE_FROM_WIRE: Final[dict[int, int]] = {v: k for k, v in SOCKTYPE_TO_WIRE.items()}

# The supported options: App Engine's documented set plus keepalive tuning
# (see tether.proto). (level, optname) on this platform -> the wire name.
# SO_ERROR and SO_TYPE are answered locally.
OPTIONS: Final[dict[tuple[int, int], pb.OptionName.ValueType]] = {
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE): pb.SO_KEEPALIVE,
    (socket.SOL_SOCKET, socket.SO_DEBUG): pb.SO_DEBUG,
    (socket.IPPROTO_TCP, socket.TCP_NODELAY): pb.TCP_NODELAY,
    (socket.SOL_SOCKET, socket.SO_LINGER): pb.SO_LINGER,
    (socket.SOL_SOCKET, socket.SO_OOBINLINE): pb.SO_OOBINLINE,
    (socket.SOL_SOCKET, socket.SO_SNDBUF): pb.SO_SNDBUF,
    (socket.SOL_SOCKET, socket.SO_RCVBUF): pb.SO_RCVBUF,
    (socket.SOL_SOCKET, socket.SO_REUSEADDR): pb.SO_REUSEADDR,
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE): pb.TCP_KEEPIDLE,
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL): pb.TCP_KEEPINTVL,
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT): pb.TCP_KEEPCNT,
}
OPTION_LEVELS: Final[dict[pb.OptionName.ValueType, tuple[int, int]]] = {
    v: k for k, v in OPTIONS.items()
}
OPTION_NAMES: Final[dict[pb.OptionName.ValueType, str]] = {
    pb.SO_KEEPALIVE: "SO_KEEPALIVE",
    pb.SO_DEBUG: "SO_DEBUG",
    pb.TCP_NODELAY: "TCP_NODELAY",
    pb.SO_LINGER: "SO_LINGER",
    pb.SO_OOBINLINE: "SO_OOBINLINE",
    pb.SO_SNDBUF: "SO_SNDBUF",
    pb.SO_RCVBUF: "SO_RCVBUF",
    pb.SO_REUSEADDR: "SO_REUSEADDR",
    pb.TCP_KEEPIDLE: "TCP_KEEPIDLE",
    pb.TCP_KEEPINTVL: "TCP_KEEPINTVL",
    pb.TCP_KEEPCNT: "TCP_KEEPCNT",
}
_LINGER = struct.Struct("ii")  # struct linger on Linux: int l_onoff, int l_linger
_INT_SIZE = struct.calcsize("i")
_INT_MIN, _INT_MAX = -(2 ** (8 * _INT_SIZE - 1)), 2 ** (8 * _INT_SIZE - 1) - 1


def option_label(level: int, optname: int) -> str:
    """A readable name for any (level, optname), for error messages."""
    supported = OPTIONS.get((level, optname))
    if supported is not None:
        # Several SO_* constants share a number on Linux: name the one we mean.
        lvl = "IPPROTO_TCP" if level == socket.IPPROTO_TCP else "SOL_SOCKET"
        return f"{lvl}/{OPTION_NAMES[supported]}"
    level_names = {socket.SOL_SOCKET: "SOL_SOCKET", socket.IPPROTO_TCP: "IPPROTO_TCP"}
    prefixes = {socket.SOL_SOCKET: ("SO_",), socket.IPPROTO_TCP: ("TCP_",)}.get(
        level, ("IP_", "IPV6_", "SO_", "TCP_")
    )
    name = next(
        (
            n
            for n in dir(socket)
            if n.startswith(prefixes) and getattr(socket, n) == optname and n.isupper()
        ),
        str(optname),
    )
    return f"{level_names.get(level, str(level))}/{name}"


def option_key(level: Any, optname: Any) -> tuple[int, int]:
    """(level, optname) as C ints, checked as the stdlib's setsockopt/getsockopt check them.

    For the slow path only (not exact ints, or not an option tether carries):
    a bool, an IntEnum or any object with __index__ is the int it stands
    for; anything else is a TypeError and an int outside a C int an
    OverflowError, as the stdlib raises them.
    """
    key = (operator.index(level), operator.index(optname))
    for number in key:
        if not _INT_MIN <= number <= _INT_MAX:
            raise OverflowError(
                "signed integer is greater than maximum"
                if number > 0
                else "signed integer is less than minimum"
            )
    return key


def encode_option(name: pb.OptionName.ValueType, value: Any, optlen: Any = None) -> pb.OptionValue:
    """An option value as the app passed it to setsockopt(level, opt, value[, optlen]).

    Accepts and refuses what the stdlib and the kernel do, with their
    exception types (CPython's sock_setsockopt, Linux's sk_setsockopt and
    do_tcp_setsockopt): an integer is anything with __index__ that fits a C
    int (a bool is 0 or 1); otherwise a C-contiguous bytes-like object whose
    first sizeof(int) bytes (sizeof(struct linger) for SO_LINGER) are read,
    shorter being EINVAL. ``None`` with an optlen is the stdlib's NULL
    option value, which no supported option takes.
    """
    if (
        optlen is None
        and type(value) is int
        and _INT_MIN <= value <= _INT_MAX
        and name != pb.SO_LINGER
    ):
        return pb.OptionValue(name=name, int_value=value)  # the common case
    size = _LINGER.size if name == pb.SO_LINGER else _INT_SIZE
    label = OPTION_NAMES.get(name, str(name))
    if optlen is not None:
        if value is not None:
            raise TypeError(f"setsockopt() takes an optlen only with None as the value ({label})")
        # The stdlib passes optlen as a C unsigned int (no overflow check) and
        # the kernel reads it as an int: negative or shorter than an int is
        # EINVAL; then it reads an int from the NULL value: EFAULT (for
        # SO_LINGER too, before its own size check).
        length = operator.index(optlen) & 0xFFFF_FFFF
        if length > _INT_MAX or length < _INT_SIZE:
            raise OSError(errno.EINVAL, f"tether: {label} takes {size} bytes, not {length}")
        raise OSError(errno.EFAULT, f"tether: {label} needs a value, not None")
    if name != pb.SO_LINGER:
        number = _c_int(value)
        if number is not None:
            return pb.OptionValue(name=name, int_value=number)
    elif _c_int(value) is not None:
        # The stdlib passes an int as sizeof(int) bytes: short for a struct linger.
        raise OSError(
            errno.EINVAL, f"tether: {label} takes a packed struct linger ({size} bytes), not an int"
        )
    try:
        view = memoryview(value)
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not '{type(value).__name__}'") from None
    with view:
        if not view.c_contiguous:
            raise BufferError("memoryview: underlying buffer is not C-contiguous")
        if view.nbytes < size:
            raise OSError(errno.EINVAL, f"tether: {label} takes {size} bytes, not {view.nbytes}")
        data = view.tobytes()[:size]
    if name == pb.SO_LINGER:
        onoff, seconds = _LINGER.unpack(data)
        return pb.OptionValue(name=name, linger_on=bool(onoff), linger_seconds=seconds)
    return pb.OptionValue(name=name, int_value=int.from_bytes(data, sys.byteorder, signed=True))


def _c_int(value: Any) -> int | None:
    """The C int the stdlib's "i" format makes of value, or None when it makes none."""
    if type(value) is not int:
        try:
            value = operator.index(value)
        except TypeError:
            return None
    # Out of range, the stdlib tries the value as a buffer next (a TypeError).
    return value if _INT_MIN <= value <= _INT_MAX else None


def decode_option(value: pb.OptionValue, buflen: int | None = None) -> int | bytes:
    """What getsockopt() returns for it: an int, or bytes when buflen is given."""
    if value.name == pb.SO_LINGER:
        packed = _LINGER.pack(int(value.linger_on), value.linger_seconds)
        if buflen is None:
            return int(value.linger_on)
        return packed[:buflen]
    if buflen is not None:
        return value.int_value.to_bytes(4, sys.byteorder, signed=True)[:buflen]
    return value.int_value


def address_to_wire(sockaddr: tuple[object, ...], family: int) -> pb.Address:
    host = str(sockaddr[0])
    port = int(sockaddr[1])  # type: ignore[call-overload]
    addr = pb.Address(family=FAMILY_TO_WIRE[family], host=host, port=port)
    if family == socket.AF_INET6 and len(sockaddr) >= 4:
        addr.flowinfo = int(sockaddr[2])  # type: ignore[call-overload]
        addr.scope_id = int(sockaddr[3])  # type: ignore[call-overload]
    return addr


def address_from_wire(addr: pb.Address) -> tuple[str, int] | tuple[str, int, int, int]:
    """The sockaddr tuple the stdlib would give for this address."""
    if addr.family == pb.FAMILY_INET6:
        return (addr.host, addr.port, addr.flowinfo, addr.scope_id)
    return (addr.host, addr.port)
