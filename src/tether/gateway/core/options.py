"""Socket options on the gateway's outbound sockets, as the wire names them."""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import socket
from collections.abc import Iterator
from typing import Any

from tether.gateway.core.errors import Refusal
from tether.gateway.core.registry import SocketRecord
from tether.wire import pb
from tether.wire.convert import OPTION_LEVELS, decode_option, encode_option

# Options that must be on the socket before connect(): the buffer sizes
# decide the window scale the SYN announces.
PRE_CONNECT_OPTIONS = frozenset({pb.SO_RCVBUF, pb.SO_SNDBUF})
# setsockopt() takes a C int (32 bits on every platform Python runs on).
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


def _level(name: pb.OptionName.ValueType) -> tuple[int, int]:
    """The (level, optname) of a wire option name; OSError for one this gateway does not know.

    The name comes from the app (proto3 enums are open: any number decodes),
    so an unknown one is the app's error, answered like the kernel's, never
    a KeyError inside the gateway (found by the fuzzer, tests/fuzz).
    """
    try:
        return OPTION_LEVELS[name]
    except KeyError:
        raise OSError(
            errno.ENOPROTOOPT, f"tether: socket option number {name} is not one the gateway knows"
        ) from None


def apply_option(sock: Any, value: pb.OptionValue) -> None:
    level, optname = _level(value.name)
    if value.name == pb.SO_LINGER:
        packed = decode_option(value, 8)
        assert isinstance(packed, bytes)
        sock.setsockopt(level, optname, packed)
    elif not _INT_MIN <= value.int_value <= _INT_MAX:
        # The wire's int64 is wider than setsockopt's C int (found by the fuzzer).
        raise OSError(
            errno.EINVAL,
            f"tether: socket option value {value.int_value} is out of range for a C int",
        )
    else:
        sock.setsockopt(level, optname, value.int_value)


def read_option(sock: socket.socket, name: pb.OptionName.ValueType) -> pb.OptionValue:
    level, optname = _level(name)
    if name == pb.SO_LINGER:
        return encode_option(name, sock.getsockopt(level, optname, 8))
    return pb.OptionValue(name=name, int_value=sock.getsockopt(level, optname))


def outbound_socket(record: SocketRecord) -> socket.socket | Refusal:
    """The outbound socket of a TCP socket, for its options; a Refusal while it closes."""
    link = record.link
    if link is None or link.peer_side.transport is None:
        return Refusal(
            pb.Error.CLOSED, errno.EBADF, f"tether: socket {record.descriptor[:8]}... is closing"
        )
    sock: socket.socket = link.peer_side.transport.get_extra_info("socket")
    return sock


@contextlib.contextmanager
def socket_on(transport: asyncio.BaseTransport, family: int) -> Iterator[_socket.socket]:
    """A socket object on the transport's fd, for setsockopt.

    Made with its family, type and protocol given, so the C constructor asks
    the kernel for none of them (uvloop's socket wrapper makes a new socket
    object, with a getsockname(), for every call).
    """
    fd = transport.get_extra_info("socket").fileno()
    sock = _socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fd)
    try:
        yield sock
    finally:
        sock.detach()


__all__ = ["PRE_CONNECT_OPTIONS", "apply_option", "outbound_socket", "read_option", "socket_on"]
